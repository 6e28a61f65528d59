//! Reads: cases from sled, searches from the in-memory index.

use std::collections::BTreeMap;

use super::error::{storage, StoreError};
use super::trees::Tree;
use super::CaseStore;
use crate::case::{Case, CaseId, CaseSource, OriginalPhoto};
use crate::codec;
use crate::index::{CaseFilter, Residency, ScoreKind, SearchHit, SearchStrategy};
use crate::report::CorruptEntry;

/// Case counts for the library overview (searchable cases only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaseCounts {
    pub total: usize,
    pub by_diagnosis: BTreeMap<String, usize>,
    pub by_source: BTreeMap<CaseSource, usize>,
}

impl CaseStore {
    /// The case, read from disk. A case whose bytes do not decode is an
    /// error naming it; other cases are unaffected.
    pub fn get(&self, id: &CaseId) -> Result<Option<Case>, StoreError> {
        let key = id.as_str().as_bytes();
        let record = self
            .trees
            .cases
            .get(key)
            .map_err(storage("reading a case"))?;
        let row = self
            .trees
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
            (Some(_), None) => Err(corrupt(
                Tree::Embeddings.name(),
                "embedding row missing".into(),
            )),
            (None, Some(_)) => Err(corrupt(Tree::Cases.name(), "case record missing".into())),
            (Some(record), Some(row)) => {
                let record =
                    codec::decode_case(&record).map_err(|r| corrupt(Tree::Cases.name(), r))?;
                if record.id != *id {
                    return Err(corrupt(
                        Tree::Cases.name(),
                        format!("record belongs to case {:?}", record.id.as_str()),
                    ));
                }
                let (_, raw) = codec::decode_embedding(&row, self.identity.embedding_dim)
                    .map_err(|r| corrupt(Tree::Embeddings.name(), r))?;
                Ok(Some(record.into_case(codec::decode_f32_le(raw))))
            }
        }
    }

    /// The photograph the case was made from, where it was kept.
    pub fn original(&self, id: &CaseId) -> Result<Option<OriginalPhoto>, StoreError> {
        let Some(value) = self
            .trees
            .originals
            .get(id.as_str().as_bytes())
            .map_err(storage("reading an original photograph"))?
        else {
            return Ok(None);
        };
        let corrupt = |reason: String| StoreError::CorruptCase {
            id: id.to_string(),
            tree: Tree::Originals.name(),
            reason,
        };
        let jpeg = codec::decode_original(&value).map_err(corrupt)?;
        OriginalPhoto::from_jpeg(jpeg.to_vec())
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    /// Whether an original photograph is kept for this case.
    pub fn has_original(&self, id: &CaseId) -> Result<bool, StoreError> {
        self.trees
            .originals
            .contains_key(id.as_str().as_bytes())
            .map_err(storage("reading an original photograph"))
    }

    /// Whether a record for this id exists on disk (even a corrupt one).
    pub fn contains(&self, id: &CaseId) -> Result<bool, StoreError> {
        self.trees
            .cases
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
        for item in self.trees.cases.iter().keys() {
            let key = item.map_err(storage("listing cases"))?;
            let text = String::from_utf8_lossy(&key).into_owned();
            let id = CaseId::new(text.clone()).map_err(|e| StoreError::CorruptCase {
                id: text,
                tree: Tree::Cases.name(),
                reason: format!("key is not a case id: {e}"),
            })?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// Every case, in id order, read lazily from disk. A corrupt case yields
    /// an error item and iteration goes on.
    pub fn cases(&self) -> impl Iterator<Item = Result<Case, StoreError>> + '_ {
        self.trees.cases.iter().keys().filter_map(move |key| {
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
                        tree: Tree::Cases.name(),
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

    /// How searches find their results (default [`SearchStrategy::Auto`]:
    /// exact up to [`crate::COARSE_ABOVE`] cases, the coarse pass beyond).
    pub fn set_search_strategy(&self, strategy: SearchStrategy) -> Result<(), StoreError> {
        self.write_index()?.set_search_strategy(strategy);
        Ok(())
    }

    pub fn search_strategy(&self) -> Result<SearchStrategy, StoreError> {
        Ok(self.read_index()?.search_strategy())
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
            .trees
            .cases
            .iter()
            .keys()
            .chain(self.trees.embeddings.iter().keys())
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
                    tree: Tree::Cases.name(),
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
