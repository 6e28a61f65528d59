//! Flat index over case embeddings (no sled here; usable on its own).
//!
//! The embeddings live in contiguous row-major buffers: a `Vec<f32>` and/or
//! a `Vec<i8>` with one quantization step per row ([`Residency`] says which
//! are kept), plus one sign bit per dimension of every row (always kept:
//! 1/8 of the int8 copy). An exact query scans every row with simsimd's
//! runtime-dispatched dot kernels and keeps the best `k` in a small heap. A
//! coarse query ([`SearchStrategy`]) first ranks every row by the Hamming
//! distance of its bits to the query's (simsimd's binary kernels, 1/8 of the
//! int8 bytes), then scores the nearest few thousand exactly. Deleting
//! swap-removes the row so the buffers stay dense; `rows` maps each case id
//! to its current row.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::ops::Range;

use simsimd::SpatialSimilarity;
use thiserror::Error;

use crate::case::{CaseId, CaseSource};

mod coarse;

pub(crate) use coarse::bytes_per_row as sign_bytes_per_row;
use coarse::SignBits;

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
    #[error(
        "{requested:?} scoring needs the {requested:?} rows, but this index keeps only \
         {resident:?}; search with ScoreKind::{resident:?} or open the store with \
         Residency::Both"
    )]
    KindNotResident {
        requested: ScoreKind,
        resident: Residency,
    },
}

/// Which copies of the embeddings an index keeps in memory, chosen when it
/// is created (for a store: at open).
///
/// Why not always both: at 100k cases of dim 2048 the f32 rows are 819 MB
/// and the int8 rows 205 MB. On the handheld (a few GB of RAM shared with the
/// encoder and the camera pipeline) the daemon only needs `Int8`: its
/// recall@10 against exact f32 is above 0.9 in our tests and a scan reads 4x
/// fewer bytes. Deriving int8 lazily from a resident f32 copy would not save
/// memory, and keeping f32 "just in case" costs 4x the RAM and 4x the cold
/// start I/O. Tools that compare both kinds (the CLI's `--int8` flag, eval)
/// use `Both`, which is what [`FlatIndex::new`] and `CaseStore::open` keep.
/// Scoring with a kind that is not resident is a typed error
/// ([`IndexError::KindNotResident`]), never a silent fallback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Residency {
    /// Only the f32 rows: exact scores, 4 bytes per dimension.
    F32,
    /// Only the int8 rows: approximate scores, 1 byte per dimension.
    Int8,
    /// Both copies: either kind can be scored.
    #[default]
    Both,
}

impl Residency {
    pub fn has_f32(self) -> bool {
        matches!(self, Residency::F32 | Residency::Both)
    }

    pub fn has_int8(self) -> bool {
        matches!(self, Residency::Int8 | Residency::Both)
    }

    pub fn supports(self, kind: ScoreKind) -> bool {
        match kind {
            ScoreKind::F32 => self.has_f32(),
            ScoreKind::Int8 => self.has_int8(),
        }
    }
}

/// Which copy of the embeddings a query is scored against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScoreKind {
    /// Exact inner products on the f32 rows.
    F32,
    /// Inner products on the int8 rows (4x fewer bytes scanned), rescaled by
    /// the row's and the query's quantization steps to approximate the f32
    /// inner product.
    Int8,
}

/// How a search finds its `k` best: scoring every row, or scoring the rows
/// a coarse pass over the sign bits picked.
///
/// Guarantees: `Exact` returns the true top-k of the scored kind. `Coarse`
/// returns the same type with the same (exact) scores, but may miss a true
/// neighbour whose bits are far from the query's: its recall@10 against
/// exact f32 is measured, not guaranteed (`docs/benchmarks.md`, Index). It
/// never returns a case that is not indexed or that the filter refuses, and
/// where at most `candidates` rows pass the filter it is exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SearchStrategy {
    /// `Exact` while the index holds at most [`COARSE_ABOVE`] rows,
    /// `Coarse` with [`DEFAULT_CANDIDATES`] beyond (decided at each search,
    /// so a library that grows past the line switches without a reopen).
    #[default]
    Auto,
    /// Score every row.
    Exact,
    /// Rank every row by sign-bit Hamming distance, then score the nearest
    /// `candidates` rows exactly in the requested [`ScoreKind`].
    Coarse { candidates: usize },
}

/// Where `SearchStrategy::Auto` switches to the coarse pass: about where one
/// exact int8 scan outgrows 50 ms, a quarter of the daemon's 203 ms p95
/// trigger-to-screen (2-core EPYC: 29-38 ms mean, 55 ms p95 at 100k; 340 ms
/// at 1M; `scripts/bench index`, docs/benchmarks.md).
pub const COARSE_ABOVE: usize = 100_000;

/// Rows the coarse pass hands to the exact re-rank by default. Measured on
/// lesion-like synthetic embeddings (docs/benchmarks.md): at 100k, 4,000
/// gave recall@10 0.91 and 8,000 0.96 (exact int8: 0.98); at 1M every count
/// from 1,000 matched exact int8 (0.96), and 8,000 costs about what 4,000
/// does there (36 ms), since the pass over the bits dominates.
pub const DEFAULT_CANDIDATES: usize = 8_000;

impl SearchStrategy {
    /// What this strategy does on an index of `rows` rows: `None` for an
    /// exact scan, `Some(candidates)` for the coarse pass.
    pub fn coarse_candidates(self, rows: usize) -> Option<usize> {
        match self {
            SearchStrategy::Exact => None,
            SearchStrategy::Auto if rows <= COARSE_ABOVE => None,
            SearchStrategy::Auto => Some(DEFAULT_CANDIDATES),
            // A re-rank of every row is the exact scan, done more slowly.
            SearchStrategy::Coarse { candidates } if candidates >= rows => None,
            SearchStrategy::Coarse { candidates } => Some(candidates.max(1)),
        }
    }
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

/// The sign bits and their centre as read from the index cache.
pub(crate) struct LoadedSigns {
    pub centre: Vec<f32>,
    pub centred_at: usize,
    pub bits: Vec<u8>,
}

/// Interned tags of one row, built by [`FlatIndex::row_tags_for`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowTagsHandle(RowTags);

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

/// Exact top-k inner-product index over f32 and/or int8 copies of the embeddings.
#[derive(Debug)]
pub struct FlatIndex {
    dim: usize,
    residency: Residency,
    ids: Vec<CaseId>,
    rows: HashMap<CaseId, usize>,
    tags: Vec<RowTags>,
    /// Empty unless `residency.has_f32()`.
    vectors: Vec<f32>,
    /// Empty unless `residency.has_int8()`.
    quantized: Vec<i8>,
    /// Quantization step of each int8 row (max |x| of the row / 127). Per row
    /// rather than global so that a new row with a larger component never
    /// forces requantizing the whole index (which needs the f32 copy and
    /// stalls writers), and so each row uses the full int8 range.
    row_scales: Vec<f32>,
    /// Sign bits of every row, whatever the residency.
    signs: SignBits,
    strategy: SearchStrategy,
    diagnoses: Vocab,
    sites: Vocab,
    scan_threads: usize,
}

impl FlatIndex {
    /// An empty index keeping both copies ([`Residency::Both`]).
    pub fn new(dim: usize) -> Result<Self, IndexError> {
        Self::with_residency(dim, Residency::Both)
    }

    pub fn with_residency(dim: usize, residency: Residency) -> Result<Self, IndexError> {
        if dim == 0 {
            return Err(IndexError::ZeroDimension);
        }
        Ok(Self {
            dim,
            residency,
            ids: Vec::new(),
            rows: HashMap::new(),
            tags: Vec::new(),
            vectors: Vec::new(),
            quantized: Vec::new(),
            row_scales: Vec::new(),
            signs: SignBits::new(dim),
            strategy: SearchStrategy::default(),
            diagnoses: Vocab::default(),
            sites: Vocab::default(),
            scan_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn residency(&self) -> Residency {
        self.residency
    }

    /// Makes room for `additional` more rows without reallocating on the way
    /// (a doubling `Vec` would briefly hold 1.5-2x the final buffer).
    pub fn reserve(&mut self, additional: usize) {
        self.ids.reserve(additional);
        self.rows.reserve(additional);
        self.tags.reserve(additional);
        if self.residency.has_f32() {
            self.vectors.reserve(additional * self.dim);
        }
        if self.residency.has_int8() {
            self.quantized.reserve(additional * self.dim);
            self.row_scales.reserve(additional);
        }
        self.signs.reserve(additional);
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

    /// How `search` and `search_batch` find their results (default
    /// [`SearchStrategy::Auto`]).
    pub fn set_search_strategy(&mut self, strategy: SearchStrategy) {
        self.strategy = strategy;
    }

    pub fn search_strategy(&self) -> SearchStrategy {
        self.strategy
    }

    /// The row-major sign bits the coarse pass reads (`bytes_per_row` each,
    /// row `i` the `i`-th id), the centre they were taken against, and how
    /// many rows that centre is the mean of.
    pub fn sign_bits(&self) -> (&[u8], usize, &[f32], usize) {
        (
            self.signs.bits(),
            self.signs.bytes_per_row(),
            self.signs.centre(),
            self.signs.centred_at(),
        )
    }

    /// Recomputes the sign bits' centre as the mean of every row and
    /// re-encodes every row (also done by itself as a small index grows).
    pub fn recentre(&mut self) {
        let dim = self.dim;
        let n = self.ids.len();
        if self.residency.has_f32() {
            let vectors = &self.vectors;
            self.signs.recentre(n, |i, out| {
                out.copy_from_slice(&vectors[i * dim..(i + 1) * dim]);
            });
        } else {
            let (quantized, steps) = (&self.quantized, &self.row_scales);
            self.signs.recentre(n, |i, out| {
                let step = steps[i];
                for (o, &q) in out.iter_mut().zip(&quantized[i * dim..(i + 1) * dim]) {
                    *o = q as f32 * step;
                }
            });
        }
    }

    /// The int8 quantization step of a case's row: component `x` is stored
    /// as `round(x / step)`, step = max |x| of the row / 127. `None` if the
    /// case is not indexed or no int8 rows are kept.
    pub fn int8_step(&self, id: &CaseId) -> Option<f32> {
        let row = *self.rows.get(id)?;
        self.row_scales.get(row).copied()
    }

    /// The row-major f32 buffer a `ScoreKind::F32` scan reads (row `i` is
    /// the `i`-th id of [`FlatIndex::ids`]); `None` if not resident.
    pub fn f32_rows(&self) -> Option<&[f32]> {
        self.residency.has_f32().then_some(self.vectors.as_slice())
    }

    /// The row-major int8 buffer a `ScoreKind::Int8` scan reads, and the
    /// step of each row; `None` if not resident.
    pub fn int8_rows(&self) -> Option<(&[i8], &[f32])> {
        self.residency
            .has_int8()
            .then_some((self.quantized.as_slice(), self.row_scales.as_slice()))
    }

    /// Ids in row order (which changes on removal).
    pub fn ids(&self) -> impl ExactSizeIterator<Item = &CaseId> {
        self.ids.iter()
    }

    /// The stored f32 embedding of a case (`None` if f32 rows are not resident).
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
        let row_tags = self.intern_tags(tags);
        let dim = self.dim;
        let step = step_for(row_max);
        match self.rows.get(&id) {
            Some(&row) => {
                if self.residency.has_f32() {
                    self.vectors[row * dim..(row + 1) * dim].copy_from_slice(embedding);
                }
                if self.residency.has_int8() {
                    quantize_into(
                        embedding,
                        &mut self.quantized[row * dim..(row + 1) * dim],
                        1.0 / step,
                    );
                    self.row_scales[row] = step;
                }
                self.signs.set(row, embedding);
                self.tags[row] = row_tags;
            }
            None => {
                let row = self.ids.len();
                if self.residency.has_f32() {
                    self.vectors.extend_from_slice(embedding);
                }
                if self.residency.has_int8() {
                    self.quantized.resize((row + 1) * dim, 0);
                    quantize_into(embedding, &mut self.quantized[row * dim..], 1.0 / step);
                    self.row_scales.push(step);
                }
                self.signs.push(embedding);
                self.tags.push(row_tags);
                self.rows.insert(id.clone(), row);
                self.ids.push(id);
                if self.signs.wants_recentre(self.ids.len()) {
                    self.recentre();
                }
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
            if self.residency.has_f32() {
                self.vectors
                    .copy_within(last * dim..(last + 1) * dim, row * dim);
            }
            if self.residency.has_int8() {
                self.quantized
                    .copy_within(last * dim..(last + 1) * dim, row * dim);
            }
            let moved = self.ids[last].clone();
            self.rows.insert(moved, row);
        }
        if self.residency.has_f32() {
            self.vectors.truncate(last * dim);
        }
        if self.residency.has_int8() {
            self.quantized.truncate(last * dim);
            self.row_scales.swap_remove(row);
        }
        self.signs.swap_remove(row, last);
        self.ids.swap_remove(row);
        self.tags.swap_remove(row);
        true
    }

    /// Adds a row given as little-endian f32 bytes (the layout of the
    /// embeddings tree), decoded into `scratch` so no `Vec` is allocated per row.
    pub(crate) fn push_le(
        &mut self,
        id: CaseId,
        embedding_le: &[u8],
        tags: &CaseTags,
        scratch: &mut Vec<f32>,
    ) -> Result<(), IndexError> {
        if embedding_le.len() != self.dim * 4 {
            return Err(IndexError::DimMismatch {
                expected: self.dim,
                found: embedding_le.len() / 4,
            });
        }
        scratch.clear();
        scratch.extend(
            embedding_le
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        self.upsert(id, scratch, tags)
    }

    /// Interns the tags of a row loaded from the index cache.
    pub(crate) fn row_tags_for(&mut self, tags: &CaseTags) -> RowTagsHandle {
        RowTagsHandle(self.intern_tags(tags))
    }

    /// Replaces the whole content with rows loaded from the index cache.
    /// `vectors` must hold the f32 rows if they are resident; `quantized`
    /// (int8 rows and steps) may be omitted, and is then derived from
    /// `vectors`; so may `signs`, then derived (with a new centre) from the rows.
    pub(crate) fn load_rows(
        &mut self,
        ids: Vec<CaseId>,
        tags: Vec<RowTagsHandle>,
        vectors: Vec<f32>,
        quantized: Option<(Vec<i8>, Vec<f32>)>,
        signs: Option<LoadedSigns>,
    ) -> Result<(), String> {
        let n = ids.len();
        if tags.len() != n {
            return Err(format!("{} tag rows for {n} ids", tags.len()));
        }
        let (quantized, row_scales) = match (self.residency.has_int8(), quantized) {
            (false, _) => (Vec::new(), Vec::new()),
            (true, Some((q, s))) => (q, s),
            (true, None) if vectors.len() == n * self.dim => {
                quantize_rows(&vectors, self.dim, self.scan_threads)
            }
            (true, None) => return Err("no rows to derive the int8 copy from".to_owned()),
        };
        if self.residency.has_f32() && vectors.len() != n * self.dim {
            return Err(format!("{} f32 values for {n} rows", vectors.len()));
        }
        if self.residency.has_int8() && (quantized.len() != n * self.dim || row_scales.len() != n) {
            return Err(format!(
                "{} int8 values and {} steps for {n} rows",
                quantized.len(),
                row_scales.len()
            ));
        }
        let mut rows = HashMap::with_capacity(n);
        for (row, id) in ids.iter().enumerate() {
            if rows.insert(id.clone(), row).is_some() {
                return Err(format!("case (tag {}) appears twice", id.log_tag()));
            }
        }
        self.ids = ids;
        self.rows = rows;
        self.tags = tags.into_iter().map(|t| t.0).collect();
        self.vectors = if self.residency.has_f32() {
            vectors
        } else {
            Vec::new()
        };
        self.quantized = quantized;
        self.row_scales = row_scales;
        match signs {
            Some(s) => self.signs.load(n, s.centre, s.centred_at, s.bits)?,
            None => {
                self.signs.clear();
                self.recentre();
            }
        }
        Ok(())
    }

    /// Each row's id and filter fields, in row order (for the index cache).
    pub(crate) fn row_tags(&self) -> impl Iterator<Item = (&CaseId, CaseTags)> {
        self.ids
            .iter()
            .zip(&self.tags)
            .map(|(id, t)| (id, self.expand_tags(t)))
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

    /// The `k` best cases by inner product with `query`, best first (ties by
    /// id), found as the index's [`SearchStrategy`] says.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: &CaseFilter,
        kind: ScoreKind,
    ) -> Result<Vec<SearchHit>, IndexError> {
        self.search_with(query, k, filter, kind, self.strategy)
    }

    /// [`FlatIndex::search`] with a strategy for this query only.
    pub fn search_with(
        &self,
        query: &[f32],
        k: usize,
        filter: &CaseFilter,
        kind: ScoreKind,
        strategy: SearchStrategy,
    ) -> Result<Vec<SearchHit>, IndexError> {
        Ok(self
            .search_batch_with(std::slice::from_ref(&query), k, filter, kind, strategy)?
            .pop()
            .unwrap_or_default())
    }

    /// Several queries in one pass: each row is loaded once and scored
    /// against every query while it is in L1, so a batch of 32 costs far less
    /// memory traffic than 32 single searches. (A coarse search takes the
    /// queries one by one: its pass reads 1/8 of the int8 bytes anyway.)
    pub fn search_batch<Q: AsRef<[f32]>>(
        &self,
        queries: &[Q],
        k: usize,
        filter: &CaseFilter,
        kind: ScoreKind,
    ) -> Result<Vec<Vec<SearchHit>>, IndexError> {
        self.search_batch_with(queries, k, filter, kind, self.strategy)
    }

    /// [`FlatIndex::search_batch`] with a strategy for these queries only.
    pub fn search_batch_with<Q: AsRef<[f32]>>(
        &self,
        queries: &[Q],
        k: usize,
        filter: &CaseFilter,
        kind: ScoreKind,
        strategy: SearchStrategy,
    ) -> Result<Vec<Vec<SearchHit>>, IndexError> {
        for q in queries {
            self.check(q.as_ref())?;
        }
        if !self.residency.supports(kind) {
            return Err(IndexError::KindNotResident {
                requested: kind,
                resident: self.residency,
            });
        }
        if k == 0 || self.is_empty() || queries.is_empty() {
            return Ok(vec![Vec::new(); queries.len()]);
        }
        let filter = self.compile(filter);
        if let Some(candidates) = strategy.coarse_candidates(self.len()) {
            return queries
                .iter()
                .map(|q| self.search_coarse(q.as_ref(), k, &filter, kind, candidates))
                .collect();
        }
        let tops = match kind {
            ScoreKind::F32 => {
                let qs: Vec<&[f32]> = queries.iter().map(AsRef::as_ref).collect();
                let factors = vec![1.0; qs.len()];
                self.scan_parallel(&self.vectors, None, &qs, &factors, k, &filter, 4)
            }
            ScoreKind::Int8 => {
                let mut quantized = Vec::with_capacity(queries.len());
                let mut factors = Vec::with_capacity(queries.len());
                for q in queries {
                    let (qi, q_scale) = self.quantize_query(q.as_ref())?;
                    quantized.push(qi);
                    factors.push(q_scale);
                }
                let qs: Vec<&[i8]> = quantized.iter().map(Vec::as_slice).collect();
                let steps = Some(self.row_scales.as_slice());
                self.scan_parallel(&self.quantized, steps, &qs, &factors, k, &filter, 1)
            }
        };
        Ok(tops.into_iter().map(|t| self.hits(t)).collect())
    }

    /// The query in int8 and its step. Each query gets its own step so it
    /// uses the full int8 range whatever its norm; the product rescales back.
    fn quantize_query(&self, q: &[f32]) -> Result<(Vec<i8>, f32), IndexError> {
        let q_max = max_abs_finite(q)?;
        let q_scale = if q_max > 0.0 { q_max / I8_LEVELS } else { 1.0 };
        let mut qi = vec![0i8; self.dim];
        quantize_into(q, &mut qi, 1.0 / q_scale);
        Ok((qi, q_scale))
    }

    /// Sign-bit Hamming distances of every row to the query's bits, the
    /// nearest `candidates` rows, then the exact `kind` score of those.
    fn search_coarse(
        &self,
        query: &[f32],
        k: usize,
        filter: &RowFilter,
        kind: ScoreKind,
        candidates: usize,
    ) -> Result<Vec<SearchHit>, IndexError> {
        let n = self.ids.len();
        let mut query_bits = vec![0u8; self.signs.bytes_per_row()];
        self.signs.encode(query, &mut query_bits);
        let mut dists = vec![0u16; n];
        let pass = |row: usize| filter.pass(&self.tags[row]);
        let threads = self.threads_for(n * self.signs.bytes_per_row());
        if threads <= 1 {
            self.signs.distances(&query_bits, 0..n, pass, &mut dists);
        } else {
            let per = n.div_ceil(threads);
            std::thread::scope(|s| {
                for (t, out) in dists.chunks_mut(per).enumerate() {
                    let (bits, pass) = (&query_bits, &pass);
                    let range = t * per..t * per + out.len();
                    s.spawn(move || self.signs.distances(bits, range, pass, out));
                }
            });
        }
        let rows = coarse::nearest(&dists, candidates, self.dim);
        drop(dists);
        let dim = self.dim;
        let mut top = TopK::new(k);
        match kind {
            ScoreKind::F32 => {
                for row in rows {
                    let v = &self.vectors[row * dim..(row + 1) * dim];
                    let dot = f32::dot(v, query).unwrap_or(f64::NEG_INFINITY);
                    top.offer(dot as f32, row);
                }
            }
            ScoreKind::Int8 => {
                let (qi, q_scale) = self.quantize_query(query)?;
                for row in rows {
                    let v = &self.quantized[row * dim..(row + 1) * dim];
                    let dot = i8::dot(v, &qi).unwrap_or(f64::NEG_INFINITY);
                    top.offer(dot as f32 * (q_scale * self.row_scales[row]), row);
                }
            }
        }
        Ok(self.hits(top))
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

    #[allow(clippy::too_many_arguments)]
    fn scan_parallel<T: SpatialSimilarity + Sync>(
        &self,
        data: &[T],
        row_steps: Option<&[f32]>,
        queries: &[&[T]],
        factors: &[f32],
        k: usize,
        filter: &RowFilter,
        elem_bytes: usize,
    ) -> Vec<TopK> {
        let n = self.ids.len();
        let threads = self.threads_for(n * self.dim * elem_bytes);
        if threads <= 1 {
            return self.scan(data, row_steps, queries, factors, k, filter, 0..n);
        }
        let per = n.div_ceil(threads);
        let mut parts: Vec<Vec<TopK>> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..threads)
                .map(|t| {
                    let range = (t * per).min(n)..((t + 1) * per).min(n);
                    s.spawn(move || self.scan(data, row_steps, queries, factors, k, filter, range))
                })
                .collect();
            let mut parts =
                vec![self.scan(data, row_steps, queries, factors, k, filter, 0..per.min(n))];
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

    #[allow(clippy::too_many_arguments)]
    fn scan<T: SpatialSimilarity>(
        &self,
        data: &[T],
        row_steps: Option<&[f32]>,
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
            let step = row_steps.map_or(1.0, |s| s[row]);
            for ((q, top), factor) in queries.iter().zip(tops.iter_mut()).zip(factors) {
                // Lengths are equal by construction; None cannot happen, and
                // -inf would only ever rank the row last.
                let dot = T::dot(row_vec, q).unwrap_or(f64::NEG_INFINITY);
                top.offer(dot as f32 * (factor * step), row);
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

/// The int8 step for a row whose largest |component| is `row_max`.
fn step_for(row_max: f32) -> f32 {
    if row_max > 0.0 {
        row_max / I8_LEVELS
    } else {
        1.0
    }
}

/// Int8 rows and their steps for a row-major f32 buffer, split over threads
/// (this runs at open when the cache holds only f32 rows).
fn quantize_rows(vectors: &[f32], dim: usize, threads: usize) -> (Vec<i8>, Vec<f32>) {
    let n = vectors.len() / dim;
    let mut quantized = vec![0i8; vectors.len()];
    let mut steps = vec![0f32; n];
    let work = |src: &[f32], dst: &mut [i8], steps: &mut [f32]| {
        for ((row, out), step) in src
            .chunks_exact(dim)
            .zip(dst.chunks_exact_mut(dim))
            .zip(steps.iter_mut())
        {
            // Cache rows were checked when they were indexed and the cache
            // is checksummed; clamping keeps a bug from producing an inf step.
            let max = row.iter().fold(0.0f32, |m, x| m.max(x.abs())).min(f32::MAX);
            *step = step_for(max);
            quantize_into(row, out, 1.0 / *step);
        }
    };
    let threads = if vectors.len() * 4 < PARALLEL_MIN_BYTES {
        1
    } else {
        threads.max(1)
    };
    let rows_per = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for ((src, dst), st) in vectors
            .chunks(rows_per * dim)
            .zip(quantized.chunks_mut(rows_per * dim))
            .zip(steps.chunks_mut(rows_per))
        {
            s.spawn(move || work(src, dst, st));
        }
    });
    (quantized, steps)
}

fn quantize_into(src: &[f32], dst: &mut [i8], inv_scale: f32) {
    for (d, &x) in dst.iter_mut().zip(src) {
        // Round half away from zero via add-and-truncate: `f32::round` is a
        // libm call per element on baseline x86-64 (no SSE4.1), which made
        // quantizing 100k x 2048 take 1.5 s; this form vectorises.
        let y = (x * inv_scale).clamp(-I8_LEVELS, I8_LEVELS);
        *d = (y + 0.5f32.copysign(y)) as i8;
    }
}

#[cfg(test)]
mod tests;
