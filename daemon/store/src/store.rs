//! `CaseStore`: the cases in sled plus the in-memory `FlatIndex` over them.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use sled::transaction::{ConflictableTransactionResult, TransactionError};
use sled::Transactional;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::case::{Case, CaseError, CaseId, CaseSource};
use crate::codec;
use crate::index::{CaseFilter, FlatIndex, IndexError, ScoreKind, SearchHit};

/// Version of the on-disk layout (tree names, meta keys, value layouts).
pub const FORMAT_VERSION: u32 = 1;

const META_TREE: &str = "meta";
const CASES_TREE: &str = "cases";
const EMBEDDINGS_TREE: &str = "embeddings";
const KEY_FORMAT: &str = "format_version";
const KEY_MODEL: &str = "model_id";
const KEY_DIM: &str = "embedding_dim";

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

/// What `open` found.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    pub cases_indexed: usize,
    pub corrupt: Vec<CorruptEntry>,
    pub elapsed: Duration,
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
    /// Serialises writers so the index applies writes in the order sled did.
    writer: Mutex<()>,
    report: OpenReport,
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
    /// Opens (or creates) the store at `path` for the encoder `identity`.
    pub fn open(path: impl AsRef<Path>, identity: StoreIdentity) -> Result<Self, StoreError> {
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

        check_or_write_header(&db, &meta, &cases, &embeddings, &path, &identity)?;
        let log_file = std::fs::File::open(path.join("db"))
            .map_err(|e| io_error("opening sled's log file for fsync", e))?;

        let mut index = FlatIndex::new(identity.embedding_dim)?;
        let mut corrupt = Vec::new();
        for item in embeddings.iter() {
            let (key, value) = item.map_err(storage("reading the embeddings tree"))?;
            let id_text = String::from_utf8_lossy(&key).into_owned();
            let pushed = CaseId::new(id_text.clone())
                .map_err(|e| e.to_string())
                .and_then(|id| {
                    let (tags, raw) = codec::decode_embedding(&value, identity.embedding_dim)?;
                    index
                        .bulk_push_le(id, raw, &tags)
                        .map_err(|e| e.to_string())
                });
            if let Err(reason) = pushed {
                warn!(case_id = %id_text, %reason, "corrupt embedding row left out of the index");
                corrupt.push(CorruptEntry {
                    id: id_text,
                    tree: EMBEDDINGS_TREE,
                    reason,
                });
            }
        }
        index.finish_bulk();
        let report = OpenReport {
            cases_indexed: index.len(),
            corrupt,
            elapsed: started.elapsed(),
        };
        info!(
            cases = report.cases_indexed,
            corrupt = report.corrupt.len(),
            elapsed_ms = report.elapsed.as_millis() as u64,
            model_id = %identity.model_id,
            "case store opened"
        );
        Ok(Self {
            path,
            identity,
            db,
            cases,
            embeddings,
            index: RwLock::new(index),
            log_file,
            writer: Mutex::new(()),
            report,
        })
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
        let _writer = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        (&self.cases, &self.embeddings)
            .transaction(|(c, e)| -> ConflictableTransactionResult<()> {
                for (key, record, row) in &encoded {
                    c.insert(key.as_bytes(), record.as_slice())?;
                    e.insert(key.as_bytes(), row.as_slice())?;
                }
                Ok(())
            })
            .map_err(transaction("writing cases"))?;
        self.flush("flushing inserted cases")?;
        // Only now may searches see the cases: a hit is always a durable case.
        let mut index = self.write_index()?;
        for case in cases {
            index.upsert(case.id.clone(), &case.embedding, &codec::tags_of(case))?;
        }
        debug!(cases = cases.len(), "cases inserted");
        Ok(())
    }

    /// Deletes a case; `Ok(false)` if it was not there. Flushed before returning.
    pub fn remove(&self, id: &CaseId) -> Result<bool, StoreError> {
        let _writer = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let existed = (&self.cases, &self.embeddings)
            .transaction(|(c, e)| -> ConflictableTransactionResult<bool> {
                let had_case = c.remove(id.as_str().as_bytes())?.is_some();
                let had_row = e.remove(id.as_str().as_bytes())?.is_some();
                Ok(had_case || had_row)
            })
            .map_err(transaction("removing a case"))?;
        self.flush("flushing a removal")?;
        self.write_index()?.remove(id);
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

    /// The int8 quantization step currently used by `ScoreKind::Int8`.
    pub fn int8_scale(&self) -> Result<f32, StoreError> {
        Ok(self.read_index()?.int8_scale())
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
) -> Result<(), StoreError> {
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
        meta.apply_batch(batch)
            .map_err(storage("writing the store header"))?;
        db.flush().map_err(storage("flushing the store header"))?;
        info!(model_id = %identity.model_id, dim = identity.embedding_dim, "new case store created");
        return Ok(());
    };
    let format: [u8; 4] = format
        .as_ref()
        .try_into()
        .map_err(|_| bad("format version is not 4 bytes"))?;
    let found = u32::from_le_bytes(format);
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
    Ok(())
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
