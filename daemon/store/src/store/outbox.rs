//! The outbox: captured cases (at a revision) awaiting upload to the fleet
//! service.

use sled::transaction::ConflictableTransactionError;

use super::error::{storage, transaction, StoreError};
use super::CaseStore;
use crate::case::CaseId;
use crate::codec;

/// A captured case's revision that the fleet service has not acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingUpload {
    pub id: CaseId,
    pub revision: u64,
}

impl CaseStore {
    /// Captured cases waiting to be uploaded to the fleet service, in id
    /// order (UUIDv7 ids: roughly oldest first). A capture enters this
    /// outbox in the same transaction as the case, and again at each new
    /// revision; only [`CaseStore::mark_uploaded`] takes it out.
    pub fn pending_uploads(&self) -> Result<Vec<PendingUpload>, StoreError> {
        let mut pending = Vec::new();
        for item in self.trees.outbox.iter() {
            let (key, value) = item.map_err(storage("reading the outbox"))?;
            let text = String::from_utf8_lossy(&key).into_owned();
            let corrupt = |reason: String| StoreError::CorruptCase {
                id: text.clone(),
                tree: super::trees::Tree::Outbox.name(),
                reason,
            };
            let id = CaseId::new(text.clone()).map_err(|e| corrupt(e.to_string()))?;
            let revision = codec::decode_outbox_revision(&value).map_err(corrupt)?;
            pending.push(PendingUpload { id, revision });
        }
        Ok(pending)
    }

    /// Number of captured cases waiting to be uploaded (no disk reads).
    pub fn pending_upload_count(&self) -> usize {
        self.trees.outbox.len()
    }

    /// Takes acknowledged uploads out of the outbox, flushed before
    /// returning. An entry leaves only if the acknowledged revision is at
    /// least the pending one: a case changed while its upload was in flight
    /// stays pending at its new revision. Returns how many entries left.
    pub fn mark_uploaded(&self, acknowledged: &[PendingUpload]) -> Result<usize, StoreError> {
        let cleared = self
            .trees
            .outbox
            .transaction(|o| {
                let mut cleared = 0;
                for ack in acknowledged {
                    let key = ack.id.as_str().as_bytes();
                    let Some(value) = o.get(key)? else { continue };
                    // A garbled value is kept: uploading again is harmless,
                    // losing an upload is not.
                    let pending = codec::decode_outbox_revision(&value).unwrap_or(u64::MAX);
                    if pending <= ack.revision {
                        o.remove(key)?;
                        cleared += 1;
                    }
                }
                Ok::<_, ConflictableTransactionError<()>>(cleared)
            })
            .map_err(transaction("updating the outbox"))?;
        self.flush("flushing the outbox")?;
        Ok(cleared)
    }
}
