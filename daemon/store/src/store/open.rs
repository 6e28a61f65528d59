//! Opening a store: the header, then the index from its cache (replaying
//! the writes made since) or, failing that, from a scan of sled.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::disk_sync::DiskSync;
use super::error::{io_error, storage, StoreError};
use super::header::{check_or_write_header, StoreIdentity};
use super::journal;
use super::trees::{Tree, Trees};
use super::write::durable_flush;
use super::{CaseStore, WriterState};
use crate::cache::{self, CacheKind, Miss};
use crate::case::CaseId;
use crate::codec;
use crate::index::{FlatIndex, Residency};
use crate::report::{CorruptEntry, IndexSource, JournalRecovery, OpenReport};

/// sled's page cache. Its default (1 GiB) would sit on top of the index's
/// own copy of every embedding; reads after open are mostly single cases.
const SLED_CACHE_BYTES: u64 = 64 << 20;

/// How to open a store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Which copies of the embeddings stay in memory; searches with a kind
    /// that is not resident fail with `IndexError::KindNotResident`.
    pub residency: Residency,
    /// Leave the index cache as it is when the store is dropped (the next
    /// open then replays the writes made since). For short-lived tools that
    /// must not spend the time, and for tests of the replay.
    pub no_cache_on_close: bool,
}

impl CaseStore {
    /// The encoder identity of the store at `path`, without opening its
    /// index; `None` where no store exists. For tools that must decide which
    /// encoder a store needs (re-embedding, updates) before opening it.
    pub fn identity_at(path: impl AsRef<Path>) -> Result<Option<StoreIdentity>, StoreError> {
        let path = path.as_ref();
        // sled creates a database wherever it is opened: look before opening.
        if !path.join("conf").is_file() {
            return Ok(None);
        }
        let db = open_sled(path)?;
        let meta = db
            .open_tree(Tree::Meta.name())
            .map_err(storage("opening the meta tree"))?;
        if meta.is_empty() {
            return Err(StoreError::NotACaseStore {
                path: path.to_path_buf(),
            });
        }
        super::header::read_identity(&meta, path).map(Some)
    }

    /// Opens (or creates) the store at `path` for the encoder `identity`,
    /// keeping both the f32 and the int8 rows in memory.
    pub fn open(path: impl AsRef<Path>, identity: StoreIdentity) -> Result<Self, StoreError> {
        Self::open_with(path, identity, OpenOptions::default())
    }

    /// Opens (or creates) the store. The index comes from the index cache
    /// when it is valid (plus a replay of the writes made after it), else
    /// from a scan of every embedding row, after which the cache is rewritten.
    pub fn open_with(
        path: impl AsRef<Path>,
        identity: StoreIdentity,
        options: OpenOptions,
    ) -> Result<Self, StoreError> {
        let started = Instant::now();
        let path = path.as_ref().to_path_buf();
        if identity.embedding_dim == 0 || identity.model_id.is_empty() {
            return Err(StoreError::InvalidIdentity(format!(
                "model id {:?} with dimension {}",
                identity.model_id, identity.embedding_dim
            )));
        }
        let db = open_sled(&path)?;
        let sled_open = started.elapsed();
        let trees = Trees::open(&db)?;
        let log_file = std::fs::File::open(path.join("db"))
            .map_err(|e| io_error("opening sled's log file for fsync", e))?;
        // What sled recovered (or just created) may so far be only in the
        // page cache, left there by a writer that was killed: every write
        // from now on builds on it.
        let disk = DiskSync::open(&path).map_err(|e| io_error("syncing sled's files", e))?;
        // Before anything reads the trees: the last write, if it was cut,
        // is made whole (or stays absent) here.
        let journal = settle_journal(&path, &db, &trees, &disk, &log_file)?;

        let generation = check_or_write_header(&db, &trees, &path, &identity)?;

        let residency = options.residency;
        let primary = primary_cache(residency);
        let cached = load_cached(
            &path,
            &identity,
            residency,
            generation,
            &trees.changes,
            &trees.embeddings,
        )?;
        let (index, corrupt, index_source) = match cached {
            Ok(loaded) => loaded,
            Err(miss) => {
                let reason = miss.to_string();
                if matches!(miss, Miss::Invalid(_)) {
                    warn!(%reason, "index cache not used; scanning the embeddings tree");
                } else {
                    info!(%reason, "scanning the embeddings tree");
                }
                let hint = cache::peek(&path, primary, identity.embedding_dim, &identity.model_id)
                    .map_or(0, |h| h.count);
                let (index, corrupt) = scan(&trees.embeddings, &identity, residency, hint)?;
                (index, corrupt, IndexSource::Scan { reason })
            }
        };
        let report = OpenReport {
            cases_indexed: index.len(),
            corrupt: corrupt.values().cloned().collect(),
            elapsed: started.elapsed(),
            sled_open,
            index_source,
            journal,
        };
        let cached_generation = match &report.index_source {
            IndexSource::Cache { generation } => Some(*generation),
            _ => None,
        };
        let store = Self {
            path,
            identity,
            db,
            trees,
            index: RwLock::new(index),
            log_file,
            disk,
            writer: Mutex::new(WriterState {
                generation,
                cached_generation,
                index_matches_sled: true,
                corrupt,
                pending: Vec::new(),
            }),
            report,
            cache_on_close: !options.no_cache_on_close,
            adapter_space: RwLock::new(None),
        };
        // A scan is the slow path this cache exists to avoid; pay the write
        // now rather than scanning again if the process dies before close.
        if matches!(store.report.index_source, IndexSource::Scan { .. }) {
            if let Err(e) = store.checkpoint() {
                warn!(error = %e, "could not write the index cache; the next open will scan again");
            }
        }
        info!(
            cases = store.report.cases_indexed,
            corrupt = store.report.corrupt.len(),
            elapsed_ms = store.report.elapsed.as_millis() as u64,
            sled_open_ms = store.report.sled_open.as_millis() as u64,
            source = ?store.report.index_source,
            ?residency,
            model_id = %store.identity.model_id,
            "case store opened"
        );
        Ok(store)
    }
}

/// The cache file `open` loads for this residency. `Both` loads the f32
/// rows and derives the int8 copy, which is cheaper than reading and
/// checksumming a second file.
/// How long `open` waits for sled's file lock. sled 0.34 releases it from
/// a background thread shortly after the last handle is dropped, so a
/// reopen in the same process (a restart of the loop, `reembed`'s switch)
/// can find it still held for some milliseconds; another process holding
/// it is refused once this is over.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Applies a whole journal left by a write that was cut, or drops a torn
/// one, then removes it durably (see `journal`).
fn settle_journal(
    path: &Path,
    db: &sled::Db,
    trees: &Trees,
    disk: &DiskSync,
    log_file: &std::fs::File,
) -> Result<JournalRecovery, StoreError> {
    let found = journal::replay(path, trees).map_err(|e| match e {
        journal::ReplayError::Io(e) => io_error("reading the store's journal", e),
        journal::ReplayError::Sled(e) => storage("applying the store's journal")(e),
    })?;
    match found {
        JournalRecovery::None => return Ok(found),
        JournalRecovery::Replayed { rows } => {
            durable_flush(db, disk, log_file, "flushing the store's journal")?;
            warn!(
                rows,
                "the last write was cut before it was acknowledged; made whole from the journal"
            );
        }
        JournalRecovery::Torn => {
            warn!("the last write was cut while its journal was written; it was not stored");
        }
    }
    journal::remove(path)
        .and_then(|()| disk.sync_store_dir_now())
        .map_err(|e| io_error("removing the store's journal", e))?;
    Ok(found)
}

fn open_sled(path: &Path) -> Result<sled::Db, StoreError> {
    // Before sled, which would make the directory with the umask.
    crate::private::create_dir(path)
        .map_err(|e| io_error("creating the store directory (mode 0700)", e))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
        {
            Ok(db) => {
                // After sled, so that the files it just made are covered too.
                if let Err(e) = crate::private::tighten_all(path) {
                    warn!(error = %e, "the store directory could not be made private to its user");
                }
                return Ok(db);
            }
            Err(sled::Error::Io(e)) if is_lock_held(&e) => {
                if Instant::now() >= deadline {
                    return Err(StoreError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(storage("opening the store")(e)),
        }
    }
}

/// sled 0.34 reports a held lock as an untyped I/O error (`ErrorKind::Other`)
/// whose message is all that tells it apart.
fn is_lock_held(error: &std::io::Error) -> bool {
    error.to_string().contains("could not acquire lock")
}

pub(super) fn primary_cache(residency: Residency) -> CacheKind {
    match residency {
        Residency::Int8 => CacheKind::Int8,
        Residency::F32 | Residency::Both => CacheKind::F32,
    }
}

/// The cache files a checkpoint writes: one per resident copy, so a later
/// open with either residency finds its file.
pub(super) fn cache_kinds(residency: Residency) -> Vec<CacheKind> {
    match residency {
        Residency::F32 => vec![CacheKind::F32],
        Residency::Int8 => vec![CacheKind::Int8],
        Residency::Both => vec![CacheKind::F32, CacheKind::Int8],
    }
}

type Indexed = (FlatIndex, BTreeMap<String, CorruptEntry>, IndexSource);

/// The index from the cache file plus the writes sled has that the cache
/// lacks. `Ok(Err(miss))`: fall back to a scan; `Err`: sled itself failed.
fn load_cached(
    path: &Path,
    identity: &StoreIdentity,
    residency: Residency,
    generation: u64,
    changes: &sled::Tree,
    embeddings: &sled::Tree,
) -> Result<Result<Indexed, Miss>, StoreError> {
    let dim = identity.embedding_dim;
    let loaded = match cache::load(path, primary_cache(residency), dim, &identity.model_id) {
        Ok(loaded) => loaded,
        Err(miss) => return Ok(Err(miss)),
    };
    let cache_generation = loaded.generation;
    if cache_generation > generation {
        // Written after writes sled no longer has (e.g. the database was
        // restored from an older backup): it could hold removed cases.
        return Ok(Err(Miss::Invalid(format!(
            "written at generation {cache_generation}, newer than the database's {generation}"
        ))));
    }
    let mut index = FlatIndex::with_residency(dim, residency)?;
    let tags = loaded.tags.iter().map(|t| index.row_tags_for(t)).collect();
    if let Err(why) = index.load_rows(
        loaded.ids,
        tags,
        loaded.vectors,
        loaded.quantized,
        Some(loaded.signs),
    ) {
        return Ok(Err(Miss::Invalid(why)));
    }
    let mut corrupt: BTreeMap<String, CorruptEntry> = loaded
        .corrupt
        .into_iter()
        .map(|c| (c.id.clone(), c))
        .collect();
    if cache_generation == generation {
        return Ok(Ok((
            index,
            corrupt,
            IndexSource::Cache {
                generation: cache_generation,
            },
        )));
    }
    // Every write since the cache, in order and without gaps; a missing
    // entry means the cache cannot be brought up to date.
    let mut touched = BTreeSet::new();
    let mut expected = cache_generation + 1;
    for item in changes.range((cache_generation + 1).to_be_bytes()..) {
        let (key, value) = item.map_err(storage("reading the change log"))?;
        let key: [u8; 8] = match key.as_ref().try_into() {
            Ok(key) => key,
            Err(_) => return Ok(Err(Miss::Invalid("garbled change-log key".into()))),
        };
        let g = u64::from_be_bytes(key);
        if g > generation {
            break;
        }
        if g != expected {
            return Ok(Err(Miss::Invalid(format!(
                "change log lacks write {expected}"
            ))));
        }
        match codec::decode_change(&value) {
            Ok(ids) => touched.extend(ids),
            Err(why) => {
                return Ok(Err(Miss::Invalid(format!(
                    "change-log entry {g} is corrupt: {why}"
                ))))
            }
        }
        expected += 1;
    }
    if expected != generation + 1 {
        return Ok(Err(Miss::Invalid(format!(
            "change log lacks write {expected}"
        ))));
    }
    // sled is the truth: each touched case is indexed as sled has it now.
    let mut scratch = Vec::with_capacity(dim);
    for id_text in &touched {
        let Ok(id) = CaseId::new(id_text.clone()) else {
            return Ok(Err(Miss::Invalid(format!(
                "change log names an invalid id (tag {})",
                crate::case::log_tag_of(id_text)
            ))));
        };
        corrupt.remove(id_text);
        let row = embeddings
            .get(id_text.as_bytes())
            .map_err(storage("reading the embeddings tree"))?;
        let Some(row) = row else {
            index.remove(&id);
            continue;
        };
        let pushed = codec::decode_embedding(&row, dim).and_then(|(tags, raw)| {
            index
                .push_le(id.clone(), raw, &tags, &mut scratch)
                .map_err(|e| e.to_string())
        });
        if let Err(reason) = pushed {
            warn!(case = %crate::case::log_tag_of(id_text), %reason, "corrupt embedding row left out of the index");
            index.remove(&id);
            corrupt.insert(
                id_text.clone(),
                CorruptEntry {
                    id: id_text.clone(),
                    tree: Tree::Embeddings.name(),
                    reason,
                },
            );
        }
    }
    Ok(Ok((
        index,
        corrupt,
        IndexSource::CacheReplayed {
            cache_generation,
            writes_replayed: generation - cache_generation,
            cases_reread: touched.len(),
        },
    )))
}

/// The index from every row of the embeddings tree (the fallback).
fn scan(
    embeddings: &sled::Tree,
    identity: &StoreIdentity,
    residency: Residency,
    size_hint: usize,
) -> Result<(FlatIndex, BTreeMap<String, CorruptEntry>), StoreError> {
    let dim = identity.embedding_dim;
    let mut index = FlatIndex::with_residency(dim, residency)?;
    index.reserve(size_hint);
    let mut corrupt = BTreeMap::new();
    let mut scratch = Vec::with_capacity(dim);
    for item in embeddings.iter() {
        let (key, value) = item.map_err(storage("reading the embeddings tree"))?;
        let id_text = String::from_utf8_lossy(&key).into_owned();
        let pushed = CaseId::new(id_text.clone())
            .map_err(|e| e.to_string())
            .and_then(|id| {
                let (tags, raw) = codec::decode_embedding(&value, dim)?;
                index
                    .push_le(id, raw, &tags, &mut scratch)
                    .map_err(|e| e.to_string())
            });
        if let Err(reason) = pushed {
            warn!(case = %crate::case::log_tag_of(&id_text), %reason, "corrupt embedding row left out of the index");
            corrupt.insert(
                id_text.clone(),
                CorruptEntry {
                    id: id_text,
                    tree: Tree::Embeddings.name(),
                    reason,
                },
            );
        }
    }
    Ok((index, corrupt))
}
