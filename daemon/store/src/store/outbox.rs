//! The outbox: captured cases awaiting upload to the fleet service.

use super::error::{storage, StoreError};
use super::CaseStore;
use crate::case::CaseId;

impl CaseStore {
    /// Captured cases waiting to be uploaded to the fleet service, oldest id
    /// first. A capture enters this outbox in the same transaction as the
    /// case; only [`CaseStore::mark_uploaded`] takes it out.
    pub fn pending_uploads(&self) -> Result<Vec<CaseId>, StoreError> {
        let mut ids = Vec::new();
        for key in self.trees.outbox.iter().keys() {
            let key = key.map_err(storage("reading the outbox"))?;
            if let Ok(id) = CaseId::new(String::from_utf8_lossy(&key).into_owned()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Number of captured cases waiting to be uploaded (no disk reads).
    pub fn pending_upload_count(&self) -> usize {
        self.trees.outbox.len()
    }

    /// Takes uploaded cases out of the outbox (flushed before returning).
    pub fn mark_uploaded(&self, ids: &[CaseId]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.remove(id.as_str().as_bytes());
        }
        self.trees
            .outbox
            .apply_batch(batch)
            .map_err(storage("updating the outbox"))?;
        self.flush("flushing the outbox")
    }
}
