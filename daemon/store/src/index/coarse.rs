//! The coarse first pass: one sign bit per dimension of each embedding,
//! taken against a centre vector, compared by Hamming distance.
//!
//! Why centred: the encoder's embeddings come after a ReLU and a global
//! average pool, so every component is >= 0 and signs taken against zero
//! are nearly all ones. Against the library's mean they split each
//! dimension about evenly, which is what makes a bit carry information.
//!
//! The centre is the mean of the rows when it was last computed. It is
//! recomputed (and every row's bits with it) each time the index doubles,
//! up to [`RECENTRE_UP_TO`] rows; beyond that the mean of that many
//! embeddings moves too little to be worth re-encoding a large index under
//! the write lock. A load from the index cache keeps the cache's centre; a
//! load without bits computes it from every row.

use simsimd::BinarySimilarity;

/// Below this many rows the centre is not computed yet (too few rows for a
/// meaningful mean; small indexes are searched exactly anyway).
const RECENTRE_FROM: usize = 256;
/// The last size at which a doubling recomputes the centre.
pub(crate) const RECENTRE_UP_TO: usize = 1 << 16;

/// One sign bit per dimension for every row, row-major, `bytes_per_row`
/// bytes each (the last byte's unused high bits are zero).
#[derive(Debug, Clone)]
pub(crate) struct SignBits {
    dim: usize,
    bytes_per_row: usize,
    centre: Vec<f32>,
    /// How many rows the centre was computed over; 0: not computed (the
    /// centre is zero).
    centred_at: usize,
    bits: Vec<u8>,
}

impl SignBits {
    pub(crate) fn new(dim: usize) -> Self {
        Self {
            dim,
            bytes_per_row: bytes_per_row(dim),
            centre: vec![0.0; dim],
            centred_at: 0,
            bits: Vec::new(),
        }
    }

    pub(crate) fn bytes_per_row(&self) -> usize {
        self.bytes_per_row
    }

    pub(crate) fn bits(&self) -> &[u8] {
        &self.bits
    }

    pub(crate) fn centre(&self) -> &[f32] {
        &self.centre
    }

    pub(crate) fn centred_at(&self) -> usize {
        self.centred_at
    }

    pub(crate) fn reserve(&mut self, rows: usize) {
        self.bits.reserve(rows * self.bytes_per_row);
    }

    pub(crate) fn clear(&mut self) {
        self.bits.clear();
    }

    /// The bits of `v` against the current centre.
    pub(crate) fn encode(&self, v: &[f32], out: &mut [u8]) {
        encode_into(v, &self.centre, out);
    }

    pub(crate) fn push(&mut self, v: &[f32]) {
        let start = self.bits.len();
        self.bits.resize(start + self.bytes_per_row, 0);
        encode_into(v, &self.centre, &mut self.bits[start..]);
    }

    pub(crate) fn set(&mut self, row: usize, v: &[f32]) {
        let b = self.bytes_per_row;
        encode_into(v, &self.centre, &mut self.bits[row * b..(row + 1) * b]);
    }

    /// Mirrors the index's swap-remove: the last row takes `row`'s place.
    pub(crate) fn swap_remove(&mut self, row: usize, last: usize) {
        let b = self.bytes_per_row;
        if row != last {
            self.bits.copy_within(last * b..(last + 1) * b, row * b);
        }
        self.bits.truncate(last * b);
    }

    /// Whether an index that just grew to `rows` rows should recompute its
    /// centre (at each doubling, while the index is small enough).
    pub(crate) fn wants_recentre(&self, rows: usize) -> bool {
        rows >= RECENTRE_FROM && rows >= 2 * self.centred_at && self.centred_at < RECENTRE_UP_TO
    }

    /// Replaces the centre and re-encodes every row; `row(i, scratch)`
    /// writes row `i`'s f32 values into `scratch`.
    pub(crate) fn recentre(&mut self, rows: usize, mut row: impl FnMut(usize, &mut [f32])) {
        let mut scratch = vec![0f32; self.dim];
        let mut sum = vec![0f64; self.dim];
        for i in 0..rows {
            row(i, &mut scratch);
            for (s, &x) in sum.iter_mut().zip(&scratch) {
                *s += x as f64;
            }
        }
        if rows > 0 {
            for (c, s) in self.centre.iter_mut().zip(&sum) {
                *c = (*s / rows as f64) as f32;
            }
        }
        self.centred_at = rows;
        self.bits.clear();
        self.bits.resize(rows * self.bytes_per_row, 0);
        let b = self.bytes_per_row;
        for i in 0..rows {
            row(i, &mut scratch);
            encode_into(&scratch, &self.centre, &mut self.bits[i * b..(i + 1) * b]);
        }
    }

    /// Takes a centre and bits read from the index cache; `Err` if their
    /// sizes do not fit `rows` rows of this dimension.
    pub(crate) fn load(
        &mut self,
        rows: usize,
        centre: Vec<f32>,
        centred_at: usize,
        bits: Vec<u8>,
    ) -> Result<(), String> {
        if centre.len() != self.dim || bits.len() != rows * self.bytes_per_row {
            return Err(format!(
                "sign bits: centre of {} values and {} bytes for {rows} rows of dim {}",
                centre.len(),
                bits.len(),
                self.dim
            ));
        }
        if centre.iter().any(|c| !c.is_finite()) {
            return Err("sign bits: a centre component is not finite".into());
        }
        self.centre = centre;
        self.centred_at = centred_at;
        self.bits = bits;
        Ok(())
    }

    /// Hamming distance of every row in `rows` to `query` (the query's own
    /// bits), written to `out`; rows the filter refuses get `u16::MAX`, so
    /// they are never candidates.
    pub(crate) fn distances(
        &self,
        query: &[u8],
        rows: std::ops::Range<usize>,
        pass: impl Fn(usize) -> bool,
        out: &mut [u16],
    ) {
        let b = self.bytes_per_row;
        let block = &self.bits[rows.start * b..rows.end * b];
        for ((offset, row_bits), d) in block.chunks_exact(b).enumerate().zip(out.iter_mut()) {
            *d = if pass(rows.start + offset) {
                // Equal lengths by construction; a distance is at most the
                // dimension, which fits u16 for any dimension we accept.
                u8::hamming(row_bits, query).map_or(u16::MAX - 1, |h| h.min(MAX_DISTANCE) as u16)
            } else {
                u16::MAX
            };
        }
    }
}

/// Distances saturate here (dimensions above 65,533 only lose ordering
/// among their farthest rows); `u16::MAX` marks a filtered row.
const MAX_DISTANCE: f64 = (u16::MAX - 1) as f64;

pub(crate) fn bytes_per_row(dim: usize) -> usize {
    dim.div_ceil(8)
}

fn encode_into(v: &[f32], centre: &[f32], out: &mut [u8]) {
    for ((byte, xs), cs) in out.iter_mut().zip(v.chunks(8)).zip(centre.chunks(8)) {
        let mut b = 0u8;
        for (i, (x, c)) in xs.iter().zip(cs).enumerate() {
            b |= u8::from(x > c) << i;
        }
        *byte = b;
    }
}

/// The rows with the `count` smallest distances (ties at the cut broken by
/// row order), skipping `u16::MAX` (filtered out). Counting sort over the
/// distance values: distances are small integers, and this is a pass over
/// `dists` instead of a heap operation per row.
pub(crate) fn nearest(dists: &[u16], count: usize, dim: usize) -> Vec<usize> {
    let buckets = (dim + 1).min(u16::MAX as usize);
    let mut histogram = vec![0usize; buckets];
    for &d in dists {
        if d != u16::MAX {
            histogram[(d as usize).min(buckets - 1)] += 1;
        }
    }
    // The smallest distance `cut` such that rows with d <= cut number at
    // least `count` (or all passing rows).
    let mut taken = 0usize;
    let mut cut = 0usize;
    let mut below_cut = 0usize;
    for (d, &h) in histogram.iter().enumerate() {
        cut = d;
        below_cut = taken;
        taken += h;
        if taken >= count {
            break;
        }
    }
    let mut at_cut_left = count.saturating_sub(below_cut);
    let mut out = Vec::with_capacity(count.min(taken));
    for (row, &d) in dists.iter().enumerate() {
        if d == u16::MAX {
            continue;
        }
        let d = (d as usize).min(buckets - 1);
        if d < cut {
            out.push(row);
        } else if d == cut && at_cut_left > 0 {
            out.push(row);
            at_cut_left -= 1;
        }
    }
    out
}
