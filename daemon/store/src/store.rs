//! `CaseStore`: the cases in sled plus the in-memory `FlatIndex` over them.
//!
//! By concern: `error` (the error type and sled's mapping onto it), `trees`
//! (the sled trees), `header` (format version, identity, migration), `open`
//! (index from the cache, a replay or a scan), `journal` (what makes an
//! unacknowledged write whole or absent after a power cut), `write`, `read`, `outbox`,
//! `pulled` (pages from the fleet service) and `adapter_space`. This file holds the type and the index cache's
//! checkpoint, which `open`, the writers and `Drop` all reach.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use tracing::{info, warn};

use crate::cache::{self, CacheKind};
use crate::index::FlatIndex;
use crate::report::{CorruptEntry, OpenReport};

mod adapter_space;
mod disk_sync;
mod error;
mod header;
mod journal;
mod open;
mod outbox;
mod pulled;
mod read;
mod trees;
mod write;

pub use adapter_space::AdapterSpaceStatus;
use error::io_error;
pub(crate) use error::storage;
pub use error::StoreError;
pub use header::{StoreIdentity, FORMAT_VERSION};
use open::cache_kinds;
pub use open::OpenOptions;
pub use outbox::PendingUpload;
pub use pulled::{PulledApplied, MAX_SYNC_CURSOR_BYTES};
pub use read::CaseCounts;
use trees::Trees;
pub use write::CaseWrite;

/// The case library. Share it as `Arc<CaseStore>`: searches run concurrently
/// under a read lock; writes are serialised and take the write lock only to
/// update the in-memory index after sled has flushed.
pub struct CaseStore {
    path: PathBuf,
    identity: StoreIdentity,
    db: sled::Db,
    trees: Trees,
    index: RwLock<FlatIndex>,
    /// sled's log file. sled 0.34.7's `flush` on Linux ends with
    /// `sync_file_range`, which neither flushes the drive's write cache nor
    /// the file's size/metadata; its own fsync runs only every 500 ms in a
    /// background thread. We fsync this handle after every flush so an
    /// acknowledged case also survives a power cut.
    log_file: std::fs::File,
    /// The blob files and directories sled never fsyncs (see `disk_sync`).
    disk: disk_sync::DiskSync,
    /// Serialises writers so the index applies writes in the order sled
    /// did, and guards what the index cache needs to know.
    writer: Mutex<WriterState>,
    report: OpenReport,
    cache_on_close: bool,
    adapter_space: RwLock<Option<adapter_space::AdapterSpace>>,
}

pub(super) struct WriterState {
    /// sled's write generation, as of the last write this instance committed.
    pub(super) generation: u64,
    /// The generation the cache files of the resident kinds were written or
    /// loaded at (`None`: unknown or none).
    pub(super) cached_generation: Option<u64>,
    /// False once a write failed after sled may have committed it, or the
    /// index could not apply one: the index may then differ from sled, and
    /// it must not be written as a cache labelled with sled's generation.
    pub(super) index_matches_sled: bool,
    /// Rows left out of the index because they do not decode; written into
    /// the cache so a cached open reports them like a scan would.
    pub(super) corrupt: BTreeMap<String, CorruptEntry>,
    /// Rows of writes that failed after their journal was written: they
    /// stay in every journal (and transaction) until one write succeeds.
    pub(super) pending: Vec<journal::Op>,
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
        for key in self.trees.changes.range(..=oldest.to_be_bytes()).keys() {
            batch.remove(key.map_err(storage("pruning the change log"))?);
        }
        self.trees
            .changes
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

    pub(super) fn read_index(&self) -> Result<RwLockReadGuard<'_, FlatIndex>, StoreError> {
        self.index.read().map_err(|_| StoreError::Poisoned)
    }

    pub(super) fn write_index(&self) -> Result<RwLockWriteGuard<'_, FlatIndex>, StoreError> {
        self.index.write().map_err(|_| StoreError::Poisoned)
    }
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
}
