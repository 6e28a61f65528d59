//! `CaseStore`: the cases in sled plus the in-memory `FlatIndex` over them.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use sled::transaction::{ConflictableTransactionResult, TransactionError};
use sled::Transactional;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::cache::{self, CacheKind, Miss};
use crate::case::{Case, CaseError, CaseId, CaseSource};
use crate::codec;
use crate::index::{CaseFilter, FlatIndex, IndexError, Residency, ScoreKind, SearchHit};

mod adapter_space;
pub use adapter_space::AdapterSpaceStatus;

/// Version of the on-disk layout (tree names, meta keys, value layouts).
///
/// 2 added the write generation and the `changes` tree that validate the
/// index cache. Version 1 stores are upgraded in place when opened (they
/// lack only those); the bump keeps a version-1 build, which would write
/// without bumping the generation and so make a cache look current, from
/// opening an upgraded store.
pub const FORMAT_VERSION: u32 = 2;

const META_TREE: &str = "meta";
const CASES_TREE: &str = "cases";
const EMBEDDINGS_TREE: &str = "embeddings";
/// Write generation -> ids that write touched (see `cache`).
const CHANGES_TREE: &str = "changes";
/// Case id -> adapter embedding (see `adapter_space`).
const ADAPTER_TREE: &str = "adapter_embeddings";
/// Ids of captured cases not yet uploaded to the fleet service (empty values).
const OUTBOX_TREE: &str = "outbox";
const KEY_FORMAT: &str = "format_version";
const KEY_MODEL: &str = "model_id";
const KEY_DIM: &str = "embedding_dim";
/// Number of acknowledged-or-attempted writes; bumped in each write's transaction.
const KEY_GENERATION: &str = "generation";

/// sled's page cache. Its default (1 GiB) would sit on top of the index's
/// own copy of every embedding; reads after open are mostly single cases.
const SLED_CACHE_BYTES: u64 = 64 << 20;

/// The encoder a store belongs to. Embeddings of different models (or
/// dimensions) are not comparable, so a store only ever holds one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreIdentity {
    pub model_id: String,
    pub embedding_dim: usize,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "store at {path} was embedded by model {store_model:?} (dim {store_dim}); this encoder is \
         {encoder_model:?} (dim {encoder_dim}): re-run `dermascope ingest` into a new store or \
         `dermascope reembed` this one"
    )]
    ModelMismatch {
        path: PathBuf,
        store_model: String,
        store_dim: usize,
        encoder_model: String,
        encoder_dim: usize,
    },
    #[error(
        "store at {path} has format version {found}; this build reads version {expected}: \
         re-run `dermascope ingest` into a new store with this build"
    )]
    FormatMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path} holds data but no case-store header; it is not a Dermascope case store")]
    NotACaseStore { path: PathBuf },
    #[error("store header at {path} is unreadable: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error("invalid store identity: {0}")]
    InvalidIdentity(String),
    #[error("case {id:?} refused: {source}")]
    InvalidCase {
        id: String,
        #[source]
        source: CaseError,
    },
    #[error("case {id:?} is corrupt in the {tree} tree: {reason}")]
    CorruptCase {
        id: String,
        tree: &'static str,
        reason: String,
    },
    #[error(
        "disk full while {op}: {source}; the operation was not acknowledged, cases acknowledged \
         earlier are safe; free space and reopen the store"
    )]
    DiskFull {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("I/O error while {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("storage engine found corruption while {op}: {detail}")]
    StorageCorrupt { op: &'static str, detail: String },
    #[error("storage engine error while {op}: {detail}")]
    Storage { op: &'static str, detail: String },
    #[error("search refused: {0}")]
    Index(#[from] IndexError),
    #[error("no adapter space is attached: install an adapter (`dermascope adapter train`) first")]
    NoAdapterSpace,
    #[error("adapter embedding for case {id:?} is empty or not finite")]
    InvalidAdapterEmbedding { id: String },
    #[error("the in-memory index was poisoned by a panic in another thread; reopen the store")]
    Poisoned,
}

impl StoreError {
    /// True for the errors a full disk (or file-size limit) produces.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::DiskFull { .. })
    }
}

fn storage(op: &'static str) -> impl Fn(sled::Error) -> StoreError {
    move |e| match e {
        sled::Error::Io(source) => io_error(op, source),
        sled::Error::Corruption { at, .. } => StoreError::StorageCorrupt {
            op,
            detail: format!("at {at:?}"),
        },
        other => StoreError::Storage {
            op,
            detail: other.to_string(),
        },
    }
}

fn io_error(op: &'static str, source: io::Error) -> StoreError {
    match source.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge | io::ErrorKind::QuotaExceeded => {
            StoreError::DiskFull { op, source }
        }
        _ => StoreError::Io { op, source },
    }
}

fn transaction(op: &'static str) -> impl Fn(TransactionError<()>) -> StoreError {
    move |e| match e {
        TransactionError::Storage(e) => storage(op)(e),
        TransactionError::Abort(()) => StoreError::Storage {
            op,
            detail: "transaction aborted".to_owned(),
        },
    }
}

/// A value that could not be decoded when the store was opened; the case is
/// left out of the index and `get` reports it as corrupt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptEntry {
    pub id: String,
    pub tree: &'static str,
    pub reason: String,
}

/// Where `open` got the index from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexSource {
    /// The index cache was current.
    Cache { generation: u64 },
    /// The index cache was older than sled; the writes since were replayed
    /// by re-reading the cases they touched from sled.
    CacheReplayed {
        cache_generation: u64,
        writes_replayed: u64,
        cases_reread: usize,
    },
    /// Every embedding row was read from sled, for this reason.
    Scan { reason: String },
}

impl Default for IndexSource {
    fn default() -> Self {
        IndexSource::Scan {
            reason: String::new(),
        }
    }
}

/// What `open` found.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    pub cases_indexed: usize,
    pub corrupt: Vec<CorruptEntry>,
    pub elapsed: Duration,
    pub index_source: IndexSource,
}

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

/// Case counts for the library overview (searchable cases only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaseCounts {
    pub total: usize,
    pub by_diagnosis: BTreeMap<String, usize>,
    pub by_source: BTreeMap<CaseSource, usize>,
}

/// The case library. Share it as `Arc<CaseStore>`: searches run concurrently
/// under a read lock; writes are serialised and take the write lock only to
/// update the in-memory index after sled has flushed.
pub struct CaseStore {
    path: PathBuf,
    identity: StoreIdentity,
    db: sled::Db,
    cases: sled::Tree,
    embeddings: sled::Tree,
    index: RwLock<FlatIndex>,
    /// sled's log file. sled 0.34.7's `flush` on Linux ends with
    /// `sync_file_range`, which neither flushes the drive's write cache nor
    /// the file's size/metadata; its own fsync runs only every 500 ms in a
    /// background thread. We fsync this handle after every flush so an
    /// acknowledged case also survives a power cut.
    log_file: std::fs::File,
    /// Serialises writers so the index applies writes in the order sled
    /// did, and guards what the index cache needs to know.
    writer: Mutex<WriterState>,
    meta: sled::Tree,
    changes: sled::Tree,
    report: OpenReport,
    cache_on_close: bool,
    adapter_rows: sled::Tree,
    adapter_space: RwLock<Option<adapter_space::AdapterSpace>>,
    outbox: sled::Tree,
}

struct WriterState {
    /// sled's write generation, as of the last write this instance committed.
    generation: u64,
    /// The generation the cache files of the resident kinds were written or
    /// loaded at (`None`: unknown or none).
    cached_generation: Option<u64>,
    /// False once a write failed after sled may have committed it, or the
    /// index could not apply one: the index may then differ from sled, and
    /// it must not be written as a cache labelled with sled's generation.
    index_matches_sled: bool,
    /// Rows left out of the index because they do not decode; written into
    /// the cache so a cached open reports them like a scan would.
    corrupt: BTreeMap<String, CorruptEntry>,
}

impl std::fmt::Debug for CaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaseStore")
            .field("path", &self.path)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl CaseStore {
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
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(storage("opening the store"))?;
        let meta = db
            .open_tree(META_TREE)
            .map_err(storage("opening the meta tree"))?;
        let cases = db
            .open_tree(CASES_TREE)
            .map_err(storage("opening the cases tree"))?;
        let embeddings = db
            .open_tree(EMBEDDINGS_TREE)
            .map_err(storage("opening the embeddings tree"))?;
        let changes = db
            .open_tree(CHANGES_TREE)
            .map_err(storage("opening the changes tree"))?;
        let adapter_rows = db
            .open_tree(ADAPTER_TREE)
            .map_err(storage("opening the adapter embeddings tree"))?;
        let outbox = db
            .open_tree(OUTBOX_TREE)
            .map_err(storage("opening the outbox tree"))?;

        let generation = check_or_write_header(&db, &meta, &cases, &embeddings, &path, &identity)?;
        let log_file = std::fs::File::open(path.join("db"))
            .map_err(|e| io_error("opening sled's log file for fsync", e))?;

        let residency = options.residency;
        let primary = primary_cache(residency);
        let cached = load_cached(
            &path,
            &identity,
            residency,
            generation,
            &changes,
            &embeddings,
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
                let (index, corrupt) = scan(&embeddings, &identity, residency, hint)?;
                (index, corrupt, IndexSource::Scan { reason })
            }
        };
        let report = OpenReport {
            cases_indexed: index.len(),
            corrupt: corrupt.values().cloned().collect(),
            elapsed: started.elapsed(),
            index_source,
        };
        let cached_generation = match &report.index_source {
            IndexSource::Cache { generation } => Some(*generation),
            _ => None,
        };
        let store = Self {
            path,
            identity,
            db,
            cases,
            embeddings,
            index: RwLock::new(index),
            log_file,
            writer: Mutex::new(WriterState {
                generation,
                cached_generation,
                index_matches_sled: true,
                corrupt,
            }),
            meta,
            changes,
            report,
            cache_on_close: !options.no_cache_on_close,
            adapter_rows,
            adapter_space: RwLock::new(None),
            outbox,
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
            source = ?store.report.index_source,
            ?residency,
            model_id = %store.identity.model_id,
            "case store opened"
        );
        Ok(store)
    }

    /// Writes the index cache if the index changed since it was written
    /// (`Ok(false)`: nothing to do, or the index may differ from sled after
    /// a failed write and must not be cached). Called at open after a scan
    /// and when the store is dropped; call it after a large ingest so that a
    /// crash before close does not cost a rescan. Writers wait meanwhile;
    /// searches do not.
    pub fn checkpoint(&self) -> Result<bool, StoreError> {
        let mut state = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        if !state.index_matches_sled {
            warn!("index cache not written: a failed write may have left the index behind sled");
            return Ok(false);
        }
        if state.cached_generation == Some(state.generation) {
            return Ok(false);
        }
        let started = Instant::now();
        let index = self.read_index()?;
        let corrupt: Vec<CorruptEntry> = state.corrupt.values().cloned().collect();
        let mut bytes = 0;
        for kind in cache_kinds(index.residency()) {
            bytes += cache::write(
                &self.path,
                kind,
                &index,
                state.generation,
                &self.identity.model_id,
                &corrupt,
            )
            .map_err(|e| io_error("writing the index cache", e))?;
        }
        drop(index);
        state.cached_generation = Some(state.generation);
        self.prune_changes()?;
        info!(
            generation = state.generation,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "index cache written"
        );
        Ok(true)
    }

    /// Drops change-log entries that no cache file still needs. Not flushed:
    /// if the removal is lost, the entries are merely replayed for nothing.
    fn prune_changes(&self) -> Result<(), StoreError> {
        let dim = self.identity.embedding_dim;
        let model = &self.identity.model_id;
        let oldest = [CacheKind::F32, CacheKind::Int8]
            .into_iter()
            .filter_map(|kind| cache::peek(&self.path, kind, dim, model))
            .map(|h| h.generation)
            .min();
        let Some(oldest) = oldest else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        for key in self.changes.range(..=oldest.to_be_bytes()).keys() {
            batch.remove(key.map_err(storage("pruning the change log"))?);
        }
        self.changes
            .apply_batch(batch)
            .map_err(storage("pruning the change log"))
    }

    pub fn identity(&self) -> &StoreIdentity {
        &self.identity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What `open` found (time taken, values it could not decode).
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    fn read_index(&self) -> Result<RwLockReadGuard<'_, FlatIndex>, StoreError> {
        self.index.read().map_err(|_| StoreError::Poisoned)
    }

    fn write_index(&self) -> Result<RwLockWriteGuard<'_, FlatIndex>, StoreError> {
        self.index.write().map_err(|_| StoreError::Poisoned)
    }

    /// Adds or replaces one case. Returns only after the case is flushed to
    /// disk: `Ok` means it survives a crash or power cut from then on.
    pub fn insert(&self, case: &Case) -> Result<(), StoreError> {
        self.insert_batch(std::slice::from_ref(case))
    }

    /// Adds or replaces several cases atomically, with one flush. Every case
    /// is validated first, so one bad case writes nothing.
    pub fn insert_batch(&self, cases: &[Case]) -> Result<(), StoreError> {
        if cases.is_empty() {
            return Ok(());
        }
        let mut encoded = Vec::with_capacity(cases.len());
        for case in cases {
            let invalid = |source| StoreError::InvalidCase {
                id: case.id.to_string(),
                source,
            };
            case.validate(&self.identity.model_id, self.identity.embedding_dim)
                .map_err(invalid)?;
            let record = codec::encode_case(case).map_err(|reason| StoreError::Storage {
                op: "encoding a case",
                detail: reason,
            })?;
            encoded.push((case.id.as_str(), record, codec::encode_embedding(case)));
        }
        let ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
        let change = codec::encode_change(&ids);
        let mut state = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let generation = state.generation + 1;
        let captured: Vec<&str> = cases
            .iter()
            .filter(|c| c.source == CaseSource::Captured)
            .map(|c| c.id.as_str())
            .collect();
        (
            &self.cases,
            &self.embeddings,
            &self.meta,
            &self.changes,
            &self.outbox,
        )
            .transaction(|(c, e, m, ch, o)| -> ConflictableTransactionResult<()> {
                for (key, record, row) in &encoded {
                    c.insert(key.as_bytes(), record.as_slice())?;
                    e.insert(key.as_bytes(), row.as_slice())?;
                }
                // A capture enters the outbox with the case itself, so no
                // acknowledged capture can miss its upload.
                for key in &captured {
                    o.insert(key.as_bytes(), &[])?;
                }
                m.insert(KEY_GENERATION, &generation.to_le_bytes())?;
                ch.insert(&generation.to_be_bytes(), change.as_slice())?;
                Ok(())
            })
            .map_err(transaction("writing cases"))?;
        // Committed in sled's memory: even if the flush fails, sled may
        // persist it, so the next write must use the next generation.
        state.generation = generation;
        if let Err(e) = self.flush("flushing inserted cases") {
            state.index_matches_sled = false;
            return Err(e);
        }
        // Only now may searches see the cases: a hit is always a durable case.
        let mut index = self.write_index()?;
        for case in cases {
            if let Err(e) = index.upsert(case.id.clone(), &case.embedding, &codec::tags_of(case)) {
                state.index_matches_sled = false;
                return Err(e.into());
            }
            state.corrupt.remove(case.id.as_str());
        }
        drop(index);
        self.forget_adapter_embeddings(cases.iter().map(|c| &c.id))?;
        debug!(cases = cases.len(), generation, "cases inserted");
        Ok(())
    }

    /// Deletes a case; `Ok(false)` if it was not there. Flushed before returning.
    pub fn remove(&self, id: &CaseId) -> Result<bool, StoreError> {
        let change = codec::encode_change(&[id.as_str()]);
        let mut state = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let generation = state.generation + 1;
        let existed = (
            &self.cases,
            &self.embeddings,
            &self.meta,
            &self.changes,
            &self.outbox,
        )
            .transaction(|(c, e, m, ch, o)| -> ConflictableTransactionResult<bool> {
                let had_case = c.remove(id.as_str().as_bytes())?.is_some();
                let had_row = e.remove(id.as_str().as_bytes())?.is_some();
                o.remove(id.as_str().as_bytes())?;
                m.insert(KEY_GENERATION, &generation.to_le_bytes())?;
                ch.insert(&generation.to_be_bytes(), change.as_slice())?;
                Ok(had_case || had_row)
            })
            .map_err(transaction("removing a case"))?;
        state.generation = generation;
        if let Err(e) = self.flush("flushing a removal") {
            state.index_matches_sled = false;
            return Err(e);
        }
        self.write_index()?.remove(id);
        state.corrupt.remove(id.as_str());
        self.forget_adapter_embeddings(std::iter::once(id))?;
        // Not part of the transaction: an orphaned adapter row is harmless
        // and dropped when an adapter space is next attached.
        if let Err(e) = self.adapter_rows.remove(id.as_str().as_bytes()) {
            warn!(error = %e, "could not drop a removed case's adapter embedding");
        }
        Ok(existed)
    }

    fn flush(&self, op: &'static str) -> Result<(), StoreError> {
        let flushed = self
            .db
            .flush()
            .map_err(storage(op))
            .and_then(|_| self.log_file.sync_all().map_err(|e| io_error(op, e)));
        flushed.inspect_err(|err| {
            warn!(error = %err, "store flush failed; the write is not acknowledged");
        })
    }

    /// Captured cases waiting to be uploaded to the fleet service, oldest id
    /// first. A capture enters this outbox in the same transaction as the
    /// case; only [`CaseStore::mark_uploaded`] takes it out.
    pub fn pending_uploads(&self) -> Result<Vec<CaseId>, StoreError> {
        let mut ids = Vec::new();
        for key in self.outbox.iter().keys() {
            let key = key.map_err(storage("reading the outbox"))?;
            if let Ok(id) = CaseId::new(String::from_utf8_lossy(&key).into_owned()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Number of captured cases waiting to be uploaded (no disk reads).
    pub fn pending_upload_count(&self) -> usize {
        self.outbox.len()
    }

    /// Takes uploaded cases out of the outbox (flushed before returning).
    pub fn mark_uploaded(&self, ids: &[CaseId]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.remove(id.as_str().as_bytes());
        }
        self.outbox
            .apply_batch(batch)
            .map_err(storage("updating the outbox"))?;
        self.flush("flushing the outbox")
    }

    /// The case, read from disk. A case whose bytes do not decode is an
    /// error naming it; other cases are unaffected.
    pub fn get(&self, id: &CaseId) -> Result<Option<Case>, StoreError> {
        let key = id.as_str().as_bytes();
        let record = self.cases.get(key).map_err(storage("reading a case"))?;
        let row = self
            .embeddings
            .get(key)
            .map_err(storage("reading an embedding"))?;
        let corrupt = |tree, reason: String| StoreError::CorruptCase {
            id: id.to_string(),
            tree,
            reason,
        };
        match (record, row) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(corrupt(EMBEDDINGS_TREE, "embedding row missing".into())),
            (None, Some(_)) => Err(corrupt(CASES_TREE, "case record missing".into())),
            (Some(record), Some(row)) => {
                let record = codec::decode_case(&record).map_err(|r| corrupt(CASES_TREE, r))?;
                if record.id != *id {
                    return Err(corrupt(
                        CASES_TREE,
                        format!("record belongs to case {:?}", record.id.as_str()),
                    ));
                }
                let (_, raw) = codec::decode_embedding(&row, self.identity.embedding_dim)
                    .map_err(|r| corrupt(EMBEDDINGS_TREE, r))?;
                Ok(Some(record.into_case(codec::decode_f32_le(raw))))
            }
        }
    }

    /// Whether a record for this id exists on disk (even a corrupt one).
    pub fn contains(&self, id: &CaseId) -> Result<bool, StoreError> {
        self.cases
            .contains_key(id.as_str().as_bytes())
            .map_err(storage("reading a case"))
    }

    /// Number of searchable cases.
    pub fn len(&self) -> Result<usize, StoreError> {
        Ok(self.read_index()?.len())
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Searchable cases per diagnosis code and per source (no disk reads).
    pub fn counts(&self) -> Result<CaseCounts, StoreError> {
        let index = self.read_index()?;
        let (by_diagnosis, by_source) = index.counts();
        Ok(CaseCounts {
            total: index.len(),
            by_diagnosis,
            by_source,
        })
    }

    /// Ids of every case record on disk, in id order.
    pub fn ids(&self) -> Result<Vec<CaseId>, StoreError> {
        let mut ids = Vec::new();
        for item in self.cases.iter().keys() {
            let key = item.map_err(storage("listing cases"))?;
            let text = String::from_utf8_lossy(&key).into_owned();
            let id = CaseId::new(text.clone()).map_err(|e| StoreError::CorruptCase {
                id: text,
                tree: CASES_TREE,
                reason: format!("key is not a case id: {e}"),
            })?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// Every case, in id order, read lazily from disk. A corrupt case yields
    /// an error item and iteration goes on.
    pub fn cases(&self) -> impl Iterator<Item = Result<Case, StoreError>> + '_ {
        self.cases.iter().keys().filter_map(move |key| {
            let key = match key {
                Ok(key) => key,
                Err(e) => return Some(Err(storage("listing cases")(e))),
            };
            let text = String::from_utf8_lossy(&key).into_owned();
            let id = match CaseId::new(text.clone()) {
                Ok(id) => id,
                Err(e) => {
                    return Some(Err(StoreError::CorruptCase {
                        id: text,
                        tree: CASES_TREE,
                        reason: format!("key is not a case id: {e}"),
                    }))
                }
            };
            // None: removed between listing and reading.
            self.get(&id).transpose()
        })
    }

    /// The `k` most similar searchable cases, best first.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: &CaseFilter,
        kind: ScoreKind,
    ) -> Result<Vec<SearchHit>, StoreError> {
        Ok(self.read_index()?.search(query, k, filter, kind)?)
    }

    /// Several queries in one scan of the index.
    pub fn search_batch<Q: AsRef<[f32]>>(
        &self,
        queries: &[Q],
        k: usize,
        filter: &CaseFilter,
        kind: ScoreKind,
    ) -> Result<Vec<Vec<SearchHit>>, StoreError> {
        Ok(self.read_index()?.search_batch(queries, k, filter, kind)?)
    }

    /// Which embedding copies are in memory (chosen at open).
    pub fn residency(&self) -> Result<Residency, StoreError> {
        Ok(self.read_index()?.residency())
    }

    /// Threads a large index scan may use (default: all cores).
    pub fn set_scan_threads(&self, threads: usize) -> Result<(), StoreError> {
        self.write_index()?.set_scan_threads(threads);
        Ok(())
    }

    /// Walks both trees and lists every case whose record and embedding row
    /// do not both exist and decode. Slow (reads every value); for tests and
    /// `dermascope doctor`-style checks, not the hot path.
    pub fn check_integrity(&self) -> Result<Vec<CorruptEntry>, StoreError> {
        let mut problems = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for item in self
            .cases
            .iter()
            .keys()
            .chain(self.embeddings.iter().keys())
        {
            let key = item.map_err(storage("checking integrity"))?;
            if !seen.insert(key.to_vec()) {
                continue;
            }
            let text = String::from_utf8_lossy(&key).into_owned();
            let outcome = match CaseId::new(text.clone()) {
                Ok(id) => self.get(&id).map(|_| ()),
                Err(e) => Err(StoreError::CorruptCase {
                    id: text.clone(),
                    tree: CASES_TREE,
                    reason: e.to_string(),
                }),
            };
            match outcome {
                Ok(()) => {}
                Err(StoreError::CorruptCase { id, tree, reason }) => {
                    problems.push(CorruptEntry { id, tree, reason })
                }
                Err(other) => return Err(other),
            }
        }
        Ok(problems)
    }
}

fn check_or_write_header(
    db: &sled::Db,
    meta: &sled::Tree,
    cases: &sled::Tree,
    embeddings: &sled::Tree,
    path: &Path,
    identity: &StoreIdentity,
) -> Result<u64, StoreError> {
    let read = |key: &str| meta.get(key).map_err(storage("reading the store header"));
    let bad = |reason: &str| StoreError::BadHeader {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    let Some(format) = read(KEY_FORMAT)? else {
        let has_data = !cases.is_empty() || !embeddings.is_empty() || !meta.is_empty();
        if has_data {
            return Err(StoreError::NotACaseStore {
                path: path.to_path_buf(),
            });
        }
        // A new store. The header goes in one batch and is flushed before
        // any case can be written, so a store never holds headerless cases.
        let mut batch = sled::Batch::default();
        batch.insert(KEY_FORMAT, &FORMAT_VERSION.to_le_bytes());
        batch.insert(KEY_MODEL, identity.model_id.as_bytes());
        batch.insert(KEY_DIM, &(identity.embedding_dim as u64).to_le_bytes());
        batch.insert(KEY_GENERATION, &0u64.to_le_bytes());
        meta.apply_batch(batch)
            .map_err(storage("writing the store header"))?;
        db.flush().map_err(storage("flushing the store header"))?;
        info!(model_id = %identity.model_id, dim = identity.embedding_dim, "new case store created");
        return Ok(0);
    };
    let format: [u8; 4] = format
        .as_ref()
        .try_into()
        .map_err(|_| bad("format version is not 4 bytes"))?;
    let mut found = u32::from_le_bytes(format);
    if found == 1 {
        // Version 1 differs only by lacking the generation (and the change
        // log, created empty on open). Stamping both keys in one flushed
        // batch means no version-1 build writes to this store again.
        let mut batch = sled::Batch::default();
        batch.insert(KEY_FORMAT, &FORMAT_VERSION.to_le_bytes());
        batch.insert(KEY_GENERATION, &0u64.to_le_bytes());
        meta.apply_batch(batch)
            .map_err(storage("upgrading the store header"))?;
        db.flush()
            .map_err(storage("flushing the upgraded store header"))?;
        info!(path = %path.display(), "store upgraded from format 1 to 2");
        found = FORMAT_VERSION;
    }
    if found != FORMAT_VERSION {
        return Err(StoreError::FormatMismatch {
            path: path.to_path_buf(),
            found,
            expected: FORMAT_VERSION,
        });
    }
    let model = read(KEY_MODEL)?.ok_or_else(|| bad("model id missing"))?;
    let store_model =
        String::from_utf8(model.to_vec()).map_err(|_| bad("model id is not UTF-8"))?;
    let dim = read(KEY_DIM)?.ok_or_else(|| bad("embedding dimension missing"))?;
    let dim: [u8; 8] = dim
        .as_ref()
        .try_into()
        .map_err(|_| bad("embedding dimension is not 8 bytes"))?;
    let store_dim = usize::try_from(u64::from_le_bytes(dim))
        .map_err(|_| bad("embedding dimension does not fit this machine"))?;
    if store_model != identity.model_id || store_dim != identity.embedding_dim {
        return Err(StoreError::ModelMismatch {
            path: path.to_path_buf(),
            store_model,
            store_dim,
            encoder_model: identity.model_id.clone(),
            encoder_dim: identity.embedding_dim,
        });
    }
    let generation = read(KEY_GENERATION)?.ok_or_else(|| bad("write generation missing"))?;
    let generation: [u8; 8] = generation
        .as_ref()
        .try_into()
        .map_err(|_| bad("write generation is not 8 bytes"))?;
    Ok(u64::from_le_bytes(generation))
}

/// The cache file `open` loads for this residency. `Both` loads the f32
/// rows and derives the int8 copy, which is cheaper than reading and
/// checksumming a second file.
fn primary_cache(residency: Residency) -> CacheKind {
    match residency {
        Residency::Int8 => CacheKind::Int8,
        Residency::F32 | Residency::Both => CacheKind::F32,
    }
}

/// The cache files a checkpoint writes: one per resident copy, so a later
/// open with either residency finds its file.
fn cache_kinds(residency: Residency) -> Vec<CacheKind> {
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
    if let Err(why) = index.load_rows(loaded.ids, tags, loaded.vectors, loaded.quantized) {
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
                "change log names an invalid id {id_text:?}"
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
            warn!(case_id = %id_text, %reason, "corrupt embedding row left out of the index");
            index.remove(&id);
            corrupt.insert(
                id_text.clone(),
                CorruptEntry {
                    id: id_text.clone(),
                    tree: EMBEDDINGS_TREE,
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
            warn!(case_id = %id_text, %reason, "corrupt embedding row left out of the index");
            corrupt.insert(
                id_text.clone(),
                CorruptEntry {
                    id: id_text,
                    tree: EMBEDDINGS_TREE,
                    reason,
                },
            );
        }
    }
    Ok((index, corrupt))
}

impl Drop for CaseStore {
    /// A clean close leaves a current index cache, so the next open is one
    /// sequential read. Errors are only logged: the cache is an optimisation
    /// and sled already holds every acknowledged write.
    fn drop(&mut self) {
        if !self.cache_on_close {
            return;
        }
        if let Err(e) = self.checkpoint() {
            warn!(error = %e, "index cache not written at close; the next open replays or scans");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CaseStore>();
    }

    #[test]
    fn full_disk_io_errors_map_to_disk_full() {
        let efbig = io::Error::from_raw_os_error(27);
        let enospc = io::Error::from_raw_os_error(28);
        assert!(io_error("x", efbig).is_disk_full());
        assert!(io_error("x", enospc).is_disk_full());
        assert!(!io_error("x", io::Error::from(io::ErrorKind::PermissionDenied)).is_disk_full());
    }
}
