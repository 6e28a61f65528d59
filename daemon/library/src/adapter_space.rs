//! Bringing the case library's adapter space up to date with an installed
//! adapter: the store lists what is missing or stale, the adapter computes
//! it, in flushed batches so an interrupted run resumes.

use dermascope_adapter::{Adapter, AdapterError};
use dermascope_store::{CaseId, CaseStore, StoreError};
use tracing::warn;

/// Rows per flushed batch: an interruption loses at most one batch.
const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AdapterSpaceError {
    #[error("case store: {0}")]
    Store(#[from] StoreError),
    #[error("adapter: {0}")]
    Adapter(#[from] AdapterError),
}

/// Attaches `adapter`'s space to the store and computes the adapter
/// embeddings it lacks. Returns how many were computed.
pub fn index_adapter_space(
    store: &CaseStore,
    adapter: &Adapter,
) -> Result<usize, AdapterSpaceError> {
    let status = store.attach_adapter_space(adapter.adapter_id(), adapter.hidden())?;
    let mut computed = 0;
    for ids in status.missing.chunks(BATCH) {
        let mut embeddings: Vec<(CaseId, Vec<f32>)> = Vec::with_capacity(ids.len());
        for id in ids {
            match store.get(id) {
                Ok(Some(case)) => embeddings.push((case.id, case.embedding)),
                Ok(None) => {}
                Err(e) => warn!(case = %id.log_tag(), error = %e, "case skipped"),
            }
        }
        let outputs = adapter.predict_many(
            &embeddings
                .iter()
                .map(|(_, e)| e.as_slice())
                .collect::<Vec<_>>(),
        )?;
        let rows: Vec<(CaseId, Vec<f32>)> = embeddings
            .into_iter()
            .zip(outputs)
            .map(|((id, _), out)| (id, out.embedding))
            .collect();
        computed += rows.len();
        store.put_adapter_embeddings(adapter.adapter_id(), &rows)?;
    }
    Ok(computed)
}
