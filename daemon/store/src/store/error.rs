//! The store's one error type, and how sled's and the OS's errors map onto it.

use std::io;
use std::path::PathBuf;

use sled::transaction::TransactionError;
use thiserror::Error;

use crate::case::CaseError;
use crate::index::IndexError;

/// How a message names a case: by [`crate::CaseId::log_tag`], never by its
/// id (a clinic's file name, which can hold a patient's name), since
/// errors end up in logs. The `id` fields keep the id for the caller.
fn tag(id: &str) -> String {
    format!("(tag {})", crate::case::log_tag_of(id))
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "store at {path} was embedded by model {store_model:?} (dim {store_dim}); this encoder is \
         {encoder_model:?} (dim {encoder_dim}): re-run `dermascope ingest` into a new store, or \
         move this one to the new encoder with `dermascope reembed --store {path} --bundle \
         <the new encoder's bundle>` (cases need their original photographs: ingest with \
         --keep-originals)"
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
    #[error(
        "the case store at {path} is in use by another process (is `dermascope run` running?): \
         stop it first"
    )]
    InUse { path: PathBuf },
    #[error("{path} holds data but no case-store header; it is not a Dermascope case store")]
    NotACaseStore { path: PathBuf },
    #[error("store header at {path} is unreadable: {reason}")]
    BadHeader { path: PathBuf, reason: String },
    #[error("invalid store identity: {0}")]
    InvalidIdentity(String),
    #[error("case {} refused: {source}", tag(id))]
    InvalidCase {
        id: String,
        #[source]
        source: CaseError,
    },
    #[error(
        "case {} is stored already; a stored case is changed with an update (a new \
         revision), never overwritten by an insert",
        tag(id)
    )]
    CaseExists { id: String },
    #[error("case {} appears twice in one batch; nothing was written", tag(id))]
    DuplicateInBatch { id: String },
    #[error(
        "pulled case {} is marked as captured on this device; a pulled case is a fleet or \
         reference case; nothing of the page was written",
        tag(id)
    )]
    PulledAsCaptured { id: String },
    #[error("sync cursor refused ({reason}); nothing of the page was written")]
    InvalidSyncCursor { reason: String },
    #[error(
        "the stored fleet sync cursor is unreadable ({reason}); pulling again from the start \
         is safe (pulled cases are applied by revision)"
    )]
    CorruptSyncCursor { reason: String },
    #[error("case {} is not in the store, so it cannot be updated", tag(id))]
    NoSuchCase { id: String },
    #[error("case {} is corrupt in the {tree} tree: {reason}", tag(id))]
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
    #[error("adapter embedding for case {} is empty or not finite", tag(id))]
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

pub(crate) fn storage(op: &'static str) -> impl Fn(sled::Error) -> StoreError {
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

pub(crate) fn io_error(op: &'static str, source: io::Error) -> StoreError {
    match source.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge | io::ErrorKind::QuotaExceeded => {
            StoreError::DiskFull { op, source }
        }
        _ => StoreError::Io { op, source },
    }
}

pub(crate) fn transaction(op: &'static str) -> impl Fn(TransactionError<()>) -> StoreError {
    move |e| match e {
        TransactionError::Storage(e) => storage(op)(e),
        TransactionError::Abort(()) => StoreError::Storage {
            op,
            detail: "transaction aborted".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disk_io_errors_map_to_disk_full() {
        let efbig = io::Error::from_raw_os_error(27);
        let enospc = io::Error::from_raw_os_error(28);
        assert!(io_error("x", efbig).is_disk_full());
        assert!(io_error("x", enospc).is_disk_full());
        assert!(!io_error("x", io::Error::from(io::ErrorKind::PermissionDenied)).is_disk_full());
    }
}
