//! Exact flat index over case embeddings (no sled here; usable on its own).
//!
//! All embeddings live in ONE contiguous row-major `Vec<f32>`, mirrored by a
//! row-major `Vec<i8>` quantized with a single global scale. A query scans
//! every row with simsimd's runtime-dispatched dot kernels and keeps the best
//! `k` in a small heap. Deleting swap-removes the row so the buffers stay
//! dense; `rows` maps each case id to its current row.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::ops::Range;

use simsimd::SpatialSimilarity;
use thiserror::Error;

use crate::case::{CaseId, CaseSource};

/// Below this many bytes scanned per query a second thread costs more to
/// start than it saves.
const PARALLEL_MIN_BYTES: usize = 8 << 20;
/// Symmetric int8 range: -127..=127 (so negation never overflows).
const I8_LEVELS: f32 = 127.0;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum IndexError {
    #[error("embedding dimension must be at least 1")]
    ZeroDimension,
    #[error("vector has {found} dimensions; the index holds {expected}")]
    DimMismatch { expected: usize, found: usize },
    #[error("vector component {index} is not finite")]
    NonFinite { index: usize },
}

/// Which copy of the embeddings a query is scored against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScoreKind {
    /// Exact inner products on the f32 rows.
    F32,
    /// Inner products on the int8 rows (4x fewer bytes scanned), rescaled to
    /// approximate the f32 inner product.
    Int8,
}

/// One result: the case and its (approximate, for `Int8`) inner product with the query.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchHit {
    pub id: CaseId,
    pub score: f32,
}

/// The per-case fields a search can filter on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseTags {
    pub diagnosis_code: String,
    pub source: CaseSource,
    pub anatomical_site: Option<String>,
    pub label_confirmed: bool,
}

/// Restricts a search. Every `Some` set must contain the case's value; an
/// empty set matches nothing. `CaseFilter::default()` matches every case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaseFilter {
    pub diagnosis_codes: Option<BTreeSet<String>>,
    pub sources: Option<BTreeSet<CaseSource>>,
    /// A case without a recorded site never matches a site filter.
    pub anatomical_sites: Option<BTreeSet<String>>,
    pub confirmed_only: bool,
}

impl CaseFilter {
    pub fn any() -> Self {
        Self::default()
    }

    pub fn with_diagnoses<I, S>(mut self, codes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.diagnosis_codes = Some(codes.into_iter().map(Into::into).collect());
        self
    }

    pub fn with_sources(mut self, sources: impl IntoIterator<Item = CaseSource>) -> Self {
        self.sources = Some(sources.into_iter().collect());
        self
    }

    pub fn with_sites<I, S>(mut self, sites: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.anatomical_sites = Some(sites.into_iter().map(Into::into).collect());
        self
    }

    pub fn confirmed_only(mut self) -> Self {
        self.confirmed_only = true;
        self
    }

    pub fn matches(&self, tags: &CaseTags) -> bool {
        self.diagnosis_codes
            .as_ref()
            .is_none_or(|set| set.contains(&tags.diagnosis_code))
            && self
                .sources
                .as_ref()
                .is_none_or(|set| set.contains(&tags.source))
            && self.anatomical_sites.as_ref().is_none_or(|set| {
                tags.anatomical_site
                    .as_ref()
                    .is_some_and(|site| set.contains(site))
            })
            && (!self.confirmed_only || tags.label_confirmed)
    }
}

/// Interned strings, so per-row tags are a few integers and a filter check is
/// a table lookup instead of string compares inside the scan loop.
#[derive(Default, Debug)]
struct Vocab {
    names: Vec<String>,
    symbols: HashMap<String, u32>,
}

impl Vocab {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&sym) = self.symbols.get(name) {
            return sym;
        }
        let sym = u32::try_from(self.names.len()).unwrap_or(u32::MAX - 1);
        self.names.push(name.to_owned());
        self.symbols.insert(name.to_owned(), sym);
        sym
    }

    fn name(&self, sym: u32) -> &str {
        self.names.get(sym as usize).map_or("", String::as_str)
    }

    /// `Some(table)` where `table[sym]` says whether that value is allowed.
    fn allowed(&self, wanted: Option<&BTreeSet<String>>) -> Option<Vec<bool>> {
        wanted.map(|set| self.names.iter().map(|n| set.contains(n)).collect())
    }
}

const NO_SITE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct RowTags {
    diagnosis: u32,
    site: u32,
    source: CaseSource,
    confirmed: bool,
}

struct RowFilter {
    everything: bool,
    diagnoses: Option<Vec<bool>>,
    sites: Option<Vec<bool>>,
    sources: Option<BTreeSet<CaseSource>>,
    confirmed_only: bool,
}

impl RowFilter {
    #[inline]
    fn pass(&self, t: &RowTags) -> bool {
        if self.everything {
            return true;
        }
        let allowed = |table: &Option<Vec<bool>>, sym: u32| {
            table
                .as_ref()
                .is_none_or(|tbl| tbl.get(sym as usize).copied().unwrap_or(false))
        };
        allowed(&self.diagnoses, t.diagnosis)
            && allowed(&self.sites, t.site)
            && self.sources.as_ref().is_none_or(|s| s.contains(&t.source))
            && (!self.confirmed_only || t.confirmed)
    }
}

/// A candidate as kept in the top-k heap: ordered so that the heap's maximum
/// is the *worst* candidate, which is the one to evict.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    score: f32,
    row: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then(self.row.cmp(&other.row))
    }
}

struct TopK {
    k: usize,
    heap: BinaryHeap<Candidate>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    #[inline]
    fn offer(&mut self, score: f32, row: usize) {
        let cand = Candidate { score, row };
        if self.heap.len() < self.k {
            self.heap.push(cand);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if cand < *worst {
                *worst = cand;
            }
        }
    }

    fn merge(&mut self, other: TopK) {
        for c in other.heap {
            self.offer(c.score, c.row);
        }
    }
}

/// Exact top-k inner-product index over f32 and int8 copies of the embeddings.
#[derive(Debug)]
pub struct FlatIndex {
    dim: usize,
    ids: Vec<CaseId>,
    rows: HashMap<CaseId, usize>,
    tags: Vec<RowTags>,
    vectors: Vec<f32>,
    quantized: Vec<i8>,
    /// Largest |component| seen; int8 level 127 stands for this value. Only
    /// grows (deletes do not shrink it) so existing int8 rows stay valid.
    max_abs: f32,
    diagnoses: Vocab,
    sites: Vocab,
    scan_threads: usize,
}

impl FlatIndex {
    pub fn new(dim: usize) -> Result<Self, IndexError> {
        if dim == 0 {
            return Err(IndexError::ZeroDimension);
        }
        Ok(Self {
            dim,
            ids: Vec::new(),
            rows: HashMap::new(),
            tags: Vec::new(),
            vectors: Vec::new(),
            quantized: Vec::new(),
            max_abs: 0.0,
            diagnoses: Vocab::default(),
            sites: Vocab::default(),
            scan_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn contains(&self, id: &CaseId) -> bool {
        self.rows.contains_key(id)
    }

    /// Threads a large scan is split across (at least 1). Defaults to the
    /// number of cores; small indexes are always scanned on one thread.
    pub fn set_scan_threads(&mut self, threads: usize) {
        self.scan_threads = threads.max(1);
    }

    /// The int8 quantization step: component `x` is stored as
    /// `round(x / scale)` clamped to -127..=127. Chosen from the data as
    /// max |x| / 127, and raised (with a requantization) when a new row exceeds it.
    pub fn int8_scale(&self) -> f32 {
        if self.max_abs > 0.0 {
            self.max_abs / I8_LEVELS
        } else {
            1.0
        }
    }

    /// Ids in row order (which changes on removal).
    pub fn ids(&self) -> impl ExactSizeIterator<Item = &CaseId> {
        self.ids.iter()
    }

    /// The stored f32 embedding of a case.
    pub fn embedding(&self, id: &CaseId) -> Option<&[f32]> {
        let row = *self.rows.get(id)?;
        self.vectors.get(row * self.dim..(row + 1) * self.dim)
    }

    pub fn tags(&self, id: &CaseId) -> Option<CaseTags> {
        let row = *self.rows.get(id)?;
        self.tags.get(row).map(|t| self.expand_tags(t))
    }

    fn expand_tags(&self, t: &RowTags) -> CaseTags {
        CaseTags {
            diagnosis_code: self.diagnoses.name(t.diagnosis).to_owned(),
            source: t.source,
            anatomical_site: (t.site != NO_SITE).then(|| self.sites.name(t.site).to_owned()),
            label_confirmed: t.confirmed,
        }
    }

    /// Cases per diagnosis code and per source.
    pub fn counts(&self) -> (BTreeMap<String, usize>, BTreeMap<CaseSource, usize>) {
        let mut by_diagnosis = BTreeMap::new();
        let mut by_source = BTreeMap::new();
        for t in &self.tags {
            *by_diagnosis
                .entry(self.diagnoses.name(t.diagnosis).to_owned())
                .or_insert(0) += 1;
            *by_source.entry(t.source).or_insert(0) += 1;
        }
        (by_diagnosis, by_source)
    }

    fn check(&self, v: &[f32]) -> Result<f32, IndexError> {
        if v.len() != self.dim {
            return Err(IndexError::DimMismatch {
                expected: self.dim,
                found: v.len(),
            });
        }
        max_abs_finite(v)
    }

    fn intern_tags(&mut self, tags: &CaseTags) -> RowTags {
        RowTags {
            diagnosis: self.diagnoses.intern(&tags.diagnosis_code),
            site: tags
                .anatomical_site
                .as_deref()
                .map_or(NO_SITE, |s| self.sites.intern(s)),
            source: tags.source,
            confirmed: tags.label_confirmed,
        }
    }

    /// Adds a case, or replaces its row if the id is already indexed.
    pub fn upsert(
        &mut self,
        id: CaseId,
        embedding: &[f32],
        tags: &CaseTags,
    ) -> Result<(), IndexError> {
        let row_max = self.check(embedding)?;
        if row_max > self.max_abs {
            self.max_abs = row_max;
            // The new scale must cover this row; old rows are re-derived
            // from their f32 copies (rare: the max only grows).
            self.requantize_all();
        }
        let row_tags = self.intern_tags(tags);
        let inv = 1.0 / self.int8_scale();
        let dim = self.dim;
        match self.rows.get(&id) {
            Some(&row) => {
                self.vectors[row * dim..(row + 1) * dim].copy_from_slice(embedding);
                quantize_into(
                    embedding,
                    &mut self.quantized[row * dim..(row + 1) * dim],
                    inv,
                );
                self.tags[row] = row_tags;
            }
            None => {
                let row = self.ids.len();
                self.vectors.extend_from_slice(embedding);
                self.quantized.resize((row + 1) * dim, 0);
                quantize_into(embedding, &mut self.quantized[row * dim..], inv);
                self.tags.push(row_tags);
                self.rows.insert(id.clone(), row);
                self.ids.push(id);
            }
        }
        Ok(())
    }

    /// Removes a case; `false` if it was not indexed. The last row takes its place.
    pub fn remove(&mut self, id: &CaseId) -> bool {
        let Some(row) = self.rows.remove(id) else {
            return false;
        };
        let last = self.ids.len() - 1;
        let dim = self.dim;
        if row != last {
            self.vectors
                .copy_within(last * dim..(last + 1) * dim, row * dim);
            self.quantized
                .copy_within(last * dim..(last + 1) * dim, row * dim);
            let moved = self.ids[last].clone();
            self.rows.insert(moved, row);
        }
        self.vectors.truncate(last * dim);
        self.quantized.truncate(last * dim);
        self.ids.swap_remove(row);
        self.tags.swap_remove(row);
        true
    }

    /// Bulk load: appends f32 rows decoded from little-endian bytes without
    /// quantizing; `finish_bulk` must run before the index is searched.
    /// Duplicated ids fall back to `upsert` semantics.
    pub(crate) fn bulk_push_le(
        &mut self,
        id: CaseId,
        embedding_le: &[u8],
        tags: &CaseTags,
    ) -> Result<(), IndexError> {
        if embedding_le.len() != self.dim * 4 {
            return Err(IndexError::DimMismatch {
                expected: self.dim,
                found: embedding_le.len() / 4,
            });
        }
        if self.rows.contains_key(&id) {
            let v = decode_le(embedding_le);
            self.finish_bulk();
            return self.upsert(id, &v, tags);
        }
        let start = self.vectors.len();
        self.vectors.extend(
            embedding_le
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        match max_abs_finite(&self.vectors[start..]) {
            Ok(m) => self.max_abs = self.max_abs.max(m),
            Err(e) => {
                self.vectors.truncate(start);
                return Err(e);
            }
        }
        let row_tags = self.intern_tags(tags);
        self.tags.push(row_tags);
        self.rows.insert(id.clone(), self.ids.len());
        self.ids.push(id);
        Ok(())
    }

    pub(crate) fn finish_bulk(&mut self) {
        if self.quantized.len() != self.vectors.len() {
            self.requantize_all();
        }
    }

    fn requantize_all(&mut self) {
        self.quantized.resize(self.vectors.len(), 0);
        let inv = 1.0 / self.int8_scale();
        let threads = self.threads_for(self.vectors.len() * 4);
        if threads <= 1 {
            quantize_into(&self.vectors, &mut self.quantized, inv);
            return;
        }
        let rows_per = self.ids.len().div_ceil(threads).max(1) * self.dim;
        std::thread::scope(|s| {
            for (src, dst) in self
                .vectors
                .chunks(rows_per)
                .zip(self.quantized.chunks_mut(rows_per))
            {
                s.spawn(move || quantize_into(src, dst, inv));
            }
        });
    }

    fn threads_for(&self, bytes_per_scan: usize) -> usize {
        if bytes_per_scan < PARALLEL_MIN_BYTES {
            1
        } else {
            self.scan_threads.min(self.ids.len()).max(1)
        }
    }

    fn compile(&self, filter: &CaseFilter) -> RowFilter {
        RowFilter {
            everything: *filter == CaseFilter::default(),
            diagnoses: self.diagnoses.allowed(filter.diagnosis_codes.as_ref()),
            sites: self.sites.allowed(filter.anatomical_sites.as_ref()),
            sources: filter.sources.clone(),
            confirmed_only: filter.confirmed_only,
        }
    }

    /// The `k` best cases by inner product with `query`, best first (ties by id).
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: &CaseFilter,
        kind: ScoreKind,
    ) -> Result<Vec<SearchHit>, IndexError> {
        Ok(self
            .search_batch(std::slice::from_ref(&query), k, filter, kind)?
            .pop()
            .unwrap_or_default())
    }

    /// Several queries in one pass: each row is loaded once and scored
    /// against every query while it is in L1, so a batch of 32 costs far less
    /// memory traffic than 32 single searches.
    pub fn search_batch<Q: AsRef<[f32]>>(
        &self,
        queries: &[Q],
        k: usize,
        filter: &CaseFilter,
        kind: ScoreKind,
    ) -> Result<Vec<Vec<SearchHit>>, IndexError> {
        for q in queries {
            self.check(q.as_ref())?;
        }
        if k == 0 || self.is_empty() || queries.is_empty() {
            return Ok(vec![Vec::new(); queries.len()]);
        }
        let filter = self.compile(filter);
        let tops = match kind {
            ScoreKind::F32 => {
                let qs: Vec<&[f32]> = queries.iter().map(AsRef::as_ref).collect();
                let factors = vec![1.0; qs.len()];
                self.scan_parallel(&self.vectors, &qs, &factors, k, &filter, 4)
            }
            ScoreKind::Int8 => {
                let row_scale = self.int8_scale();
                let mut quantized = Vec::with_capacity(queries.len());
                let mut factors = Vec::with_capacity(queries.len());
                for q in queries {
                    let q = q.as_ref();
                    // Each query gets its own scale so it uses the full int8
                    // range whatever its norm; the product rescales back.
                    let q_max = max_abs_finite(q)?;
                    let q_scale = if q_max > 0.0 { q_max / I8_LEVELS } else { 1.0 };
                    let mut qi = vec![0i8; self.dim];
                    quantize_into(q, &mut qi, 1.0 / q_scale);
                    quantized.push(qi);
                    factors.push(row_scale * q_scale);
                }
                let qs: Vec<&[i8]> = quantized.iter().map(Vec::as_slice).collect();
                self.scan_parallel(&self.quantized, &qs, &factors, k, &filter, 1)
            }
        };
        Ok(tops.into_iter().map(|t| self.hits(t)).collect())
    }

    fn hits(&self, top: TopK) -> Vec<SearchHit> {
        let mut hits: Vec<SearchHit> = top
            .heap
            .into_iter()
            .filter_map(|c| {
                self.ids.get(c.row).map(|id| SearchHit {
                    id: id.clone(),
                    score: c.score,
                })
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
        hits
    }

    fn scan_parallel<T: SpatialSimilarity + Sync>(
        &self,
        data: &[T],
        queries: &[&[T]],
        factors: &[f32],
        k: usize,
        filter: &RowFilter,
        elem_bytes: usize,
    ) -> Vec<TopK> {
        let n = self.ids.len();
        let threads = self.threads_for(n * self.dim * elem_bytes);
        if threads <= 1 {
            return self.scan(data, queries, factors, k, filter, 0..n);
        }
        let per = n.div_ceil(threads);
        let mut parts: Vec<Vec<TopK>> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..threads)
                .map(|t| {
                    let range = (t * per).min(n)..((t + 1) * per).min(n);
                    s.spawn(move || self.scan(data, queries, factors, k, filter, range))
                })
                .collect();
            let mut parts = vec![self.scan(data, queries, factors, k, filter, 0..per.min(n))];
            for h in handles {
                match h.join() {
                    Ok(p) => parts.push(p),
                    // A scan has no fallible input left; a panic here is a
                    // bug and must not be turned into a silently short result.
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            parts
        });
        let mut merged = parts.remove(0);
        for part in parts {
            for (m, p) in merged.iter_mut().zip(part) {
                m.merge(p);
            }
        }
        merged
    }

    fn scan<T: SpatialSimilarity>(
        &self,
        data: &[T],
        queries: &[&[T]],
        factors: &[f32],
        k: usize,
        filter: &RowFilter,
        rows: Range<usize>,
    ) -> Vec<TopK> {
        let dim = self.dim;
        let mut tops: Vec<TopK> = queries.iter().map(|_| TopK::new(k)).collect();
        let start = rows.start;
        let block = &data[rows.start * dim..rows.end * dim];
        for (offset, row_vec) in block.chunks_exact(dim).enumerate() {
            let row = start + offset;
            if !filter.pass(&self.tags[row]) {
                continue;
            }
            for ((q, top), factor) in queries.iter().zip(tops.iter_mut()).zip(factors) {
                // Lengths are equal by construction; None cannot happen, and
                // -inf would only ever rank the row last.
                let dot = T::dot(row_vec, q).unwrap_or(f64::NEG_INFINITY);
                top.offer(dot as f32 * factor, row);
            }
        }
        tops
    }
}

/// max |x|, or the first non-finite component.
fn max_abs_finite(v: &[f32]) -> Result<f32, IndexError> {
    let mut max = 0.0f32;
    let mut finite = true;
    for &x in v {
        let a = x.abs();
        // Branch-free so the loop vectorises; NaN fails `<=` too.
        finite &= a <= f32::MAX;
        max = max.max(a);
    }
    if finite {
        Ok(max)
    } else {
        let index = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
        Err(IndexError::NonFinite { index })
    }
}

fn quantize_into(src: &[f32], dst: &mut [i8], inv_scale: f32) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = (x * inv_scale).round().clamp(-I8_LEVELS, I8_LEVELS) as i8;
    }
}

fn decode_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[cfg(test)]
mod tests;
