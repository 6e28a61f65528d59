//! Writes: every one is a sled transaction over the trees it touches that
//! also bumps the write generation and logs the ids for the index cache,
//! then a flush and an fsync, and only then the in-memory index.

use sled::transaction::ConflictableTransactionResult;
use sled::Transactional;
use tracing::{debug, warn};

use super::error::{io_error, storage, transaction, StoreError};
use super::{header, CaseStore};
use crate::case::{Case, CaseId, CaseSource};
use crate::codec;

impl CaseStore {
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
            &self.trees.cases,
            &self.trees.embeddings,
            &self.trees.meta,
            &self.trees.changes,
            &self.trees.outbox,
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
                m.insert(header::KEY_GENERATION, &generation.to_le_bytes())?;
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
            &self.trees.cases,
            &self.trees.embeddings,
            &self.trees.meta,
            &self.trees.changes,
            &self.trees.outbox,
        )
            .transaction(|(c, e, m, ch, o)| -> ConflictableTransactionResult<bool> {
                let had_case = c.remove(id.as_str().as_bytes())?.is_some();
                let had_row = e.remove(id.as_str().as_bytes())?.is_some();
                o.remove(id.as_str().as_bytes())?;
                m.insert(header::KEY_GENERATION, &generation.to_le_bytes())?;
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
        if let Err(e) = self.trees.adapter_rows.remove(id.as_str().as_bytes()) {
            warn!(error = %e, "could not drop a removed case's adapter embedding");
        }
        Ok(existed)
    }

    pub(super) fn flush(&self, op: &'static str) -> Result<(), StoreError> {
        let flushed = self
            .db
            .flush()
            .map_err(storage(op))
            .and_then(|_| self.log_file.sync_all().map_err(|e| io_error(op, e)));
        flushed.inspect_err(|err| {
            warn!(error = %err, "store flush failed; the write is not acknowledged");
        })
    }
}
