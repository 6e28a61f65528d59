//! The adapter space: adapter embeddings beside the encoder's, searched when
//! an adapter is installed.
//!
//! Rows live in the `adapter_embeddings` tree, keyed by case id, each
//! stamped with the adapter that made it and the checksum of the encoder
//! embedding row it was computed from. A row whose adapter or source
//! checksum does not match is stale; attaching an adapter lists the cases
//! with no fresh row, and the caller (which owns the adapter model; the store
//! does not run models) computes them in batches with
//! [`CaseStore::put_adapter_embeddings`]. Each batch is flushed, so a killed
//! re-computation resumes where it stopped. Replacing a case drops its
//! adapter embedding from the in-memory space until a fresh one is put;
//! removing a case drops its row.

use std::collections::BTreeSet;

use tracing::{debug, info, warn};

use super::error::{storage, StoreError};
use super::CaseStore;
use crate::case::CaseId;
use crate::codec;
use crate::index::{CaseFilter, FlatIndex, Residency, ScoreKind, SearchHit};

/// The adapter space currently attached, in memory.
pub(crate) struct AdapterSpace {
    pub(crate) adapter_id: String,
    pub(crate) index: FlatIndex,
}

/// What attaching an adapter space found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSpaceStatus {
    pub adapter_id: String,
    pub dim: usize,
    /// Cases with a fresh adapter embedding, now searchable in the space.
    pub indexed: usize,
    /// Searchable cases that still need an adapter embedding.
    pub missing: Vec<CaseId>,
    /// Rows dropped because their case no longer exists.
    pub dropped: usize,
}

impl CaseStore {
    /// Loads the fresh rows of `adapter_id` into memory (replacing any space
    /// attached before) and lists the cases that still need one.
    pub fn attach_adapter_space(
        &self,
        adapter_id: &str,
        dim: usize,
    ) -> Result<AdapterSpaceStatus, StoreError> {
        if adapter_id.is_empty() || adapter_id.len() > u16::MAX as usize || dim == 0 {
            return Err(StoreError::InvalidIdentity(format!(
                "adapter space {adapter_id:?} with dimension {dim}"
            )));
        }
        let mut index = FlatIndex::with_residency(dim, Residency::F32)?;
        let mut orphans = Vec::new();
        let main = self.read_index()?;
        for item in self.trees.adapter_rows.iter() {
            let (key, value) = item.map_err(storage("reading adapter embeddings"))?;
            let id_text = String::from_utf8_lossy(&key).into_owned();
            let Ok(id) = CaseId::new(id_text) else {
                orphans.push(key.to_vec());
                continue;
            };
            let Some(tags) = main.tags(&id) else {
                orphans.push(key.to_vec());
                continue;
            };
            let row = match codec::decode_adapter_row(&value) {
                Ok(row) => row,
                Err(reason) => {
                    warn!(case = %id.log_tag(), %reason, "unreadable adapter embedding; recomputing it");
                    continue;
                }
            };
            if row.adapter_id != adapter_id || row.vector.len() != dim {
                continue;
            }
            let source = self
                .trees
                .embeddings
                .get(key.as_ref())
                .map_err(storage("reading an embedding row"))?;
            if source.as_deref().and_then(codec::row_checksum) != Some(row.source_checksum) {
                continue;
            }
            index.upsert(id, &row.vector, &tags)?;
        }
        let missing: Vec<CaseId> = main
            .ids()
            .filter(|id| !index.contains(id))
            .cloned()
            .collect();
        drop(main);
        for key in &orphans {
            self.trees
                .adapter_rows
                .remove(key)
                .map_err(storage("dropping orphaned adapter embeddings"))?;
        }
        let status = AdapterSpaceStatus {
            adapter_id: adapter_id.to_string(),
            dim,
            indexed: index.len(),
            missing,
            dropped: orphans.len(),
        };
        info!(
            adapter_id,
            indexed = status.indexed,
            missing = status.missing.len(),
            dropped = status.dropped,
            "adapter space attached"
        );
        *self
            .adapter_space
            .write()
            .map_err(|_| StoreError::Poisoned)? = Some(AdapterSpace {
            adapter_id: adapter_id.to_string(),
            index,
        });
        Ok(status)
    }

    /// The attached adapter space's id, if any.
    pub fn adapter_space(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .adapter_space
            .read()
            .map_err(|_| StoreError::Poisoned)?
            .as_ref()
            .map(|s| s.adapter_id.clone()))
    }

    /// Searchable cases without an adapter embedding in the attached space.
    pub fn adapter_space_missing(&self) -> Result<Vec<CaseId>, StoreError> {
        let space = self
            .adapter_space
            .read()
            .map_err(|_| StoreError::Poisoned)?;
        let space = space.as_ref().ok_or(StoreError::NoAdapterSpace)?;
        Ok(self
            .read_index()?
            .ids()
            .filter(|id| !space.index.contains(id))
            .cloned()
            .collect())
    }

    /// Stores adapter embeddings computed by `adapter_id` and flushes them;
    /// they join the in-memory space if it is `adapter_id`'s. Cases that are
    /// not (or no longer) in the store are skipped and counted in the result.
    pub fn put_adapter_embeddings(
        &self,
        adapter_id: &str,
        rows: &[(CaseId, Vec<f32>)],
    ) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut accepted = Vec::with_capacity(rows.len());
        let mut seen = BTreeSet::new();
        for (id, vector) in rows {
            if vector.is_empty() || vector.iter().any(|v| !v.is_finite()) {
                return Err(StoreError::InvalidAdapterEmbedding { id: id.to_string() });
            }
            let key = id.as_str().as_bytes();
            let source = self
                .trees
                .embeddings
                .get(key)
                .map_err(storage("reading an embedding row"))?;
            let Some(checksum) = source.as_deref().and_then(codec::row_checksum) else {
                continue;
            };
            if seen.insert(id.clone()) {
                batch.insert(key, codec::encode_adapter_row(adapter_id, checksum, vector));
                accepted.push((id, vector));
            }
        }
        let skipped = rows.len() - accepted.len();
        if accepted.is_empty() {
            return Ok(skipped);
        }
        // Held across the write so a concurrent replace of the same case
        // cannot slip between reading its checksum and indexing the row.
        let _writer = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        self.trees
            .adapter_rows
            .apply_batch(batch)
            .map_err(storage("writing adapter embeddings"))?;
        self.flush("flushing adapter embeddings")?;
        // Logged once durable, like "cases written": what a killed
        // re-computation may be expected to have kept.
        debug!(rows = accepted.len(), "adapter embeddings written");
        let mut space = self
            .adapter_space
            .write()
            .map_err(|_| StoreError::Poisoned)?;
        if let Some(space) = space.as_mut().filter(|s| s.adapter_id == adapter_id) {
            let main = self.read_index()?;
            for (id, vector) in accepted {
                if let Some(tags) = main.tags(id) {
                    space.index.upsert(id.clone(), vector, &tags)?;
                }
            }
        }
        Ok(skipped)
    }

    /// The `k` most similar cases in the attached adapter space.
    pub fn search_adapter_space(
        &self,
        query: &[f32],
        k: usize,
        filter: &CaseFilter,
    ) -> Result<Vec<SearchHit>, StoreError> {
        let space = self
            .adapter_space
            .read()
            .map_err(|_| StoreError::Poisoned)?;
        let space = space.as_ref().ok_or(StoreError::NoAdapterSpace)?;
        Ok(space.index.search(query, k, filter, ScoreKind::F32)?)
    }

    /// Several queries in one scan of the adapter space.
    pub fn search_adapter_space_batch<Q: AsRef<[f32]>>(
        &self,
        queries: &[Q],
        k: usize,
        filter: &CaseFilter,
    ) -> Result<Vec<Vec<SearchHit>>, StoreError> {
        let space = self
            .adapter_space
            .read()
            .map_err(|_| StoreError::Poisoned)?;
        let space = space.as_ref().ok_or(StoreError::NoAdapterSpace)?;
        Ok(space
            .index
            .search_batch(queries, k, filter, ScoreKind::F32)?)
    }

    /// Called by writers: a replaced or removed case's adapter embedding no
    /// longer describes it.
    pub(super) fn forget_adapter_embeddings<'a>(
        &self,
        ids: impl Iterator<Item = &'a CaseId>,
    ) -> Result<(), StoreError> {
        let mut space = self
            .adapter_space
            .write()
            .map_err(|_| StoreError::Poisoned)?;
        if let Some(space) = space.as_mut() {
            for id in ids {
                space.index.remove(id);
            }
        }
        Ok(())
    }
}
