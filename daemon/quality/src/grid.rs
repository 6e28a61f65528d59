//! The analysis grid: the frame's centre, area-averaged to a fixed size, and
//! the measurements taken on it.

use crate::{Frame, ANALYSIS_CROP, ANALYSIS_WIDTH};

/// A channel at or above this is clipped; sensors rarely reach a clean 255
/// after demosaicing and white balance.
const CLIP_LEVEL: u8 = 250;
/// Luminance at or below this carries no usable detail.
const CRUSH_LEVEL: u32 = 10;

#[derive(Clone, Copy)]
pub(crate) struct Exposure {
    pub clipped_highlights: f32,
    pub crushed_shadows: f32,
    pub mean_luma: f32,
}

pub(crate) struct AnalysisGrid {
    width: usize,
    height: usize,
    /// BT.601 luminance, 0-255, per cell.
    luma: Vec<f32>,
    /// Darkness plus saturation, 0-1, per cell: what sets a pigmented or
    /// vascular lesion apart from the skin around it.
    pigment: Vec<f32>,
    exposure: Exposure,
}

/// BT.601 luminance in fixed point (weights sum to 256).
fn luma_u8(r: u8, g: u8, b: u8) -> u32 {
    (77 * r as u32 + 150 * g as u32 + 29 * b as u32) >> 8
}

impl AnalysisGrid {
    pub(crate) fn from_frame(frame: &Frame<'_>) -> Self {
        let fw = frame.width() as usize;
        let fh = frame.height() as usize;
        // Frame::new guarantees both sides >= MIN_FRAME_SIDE, so the crop is
        // never empty.
        let crop_w = ((fw as f32 * ANALYSIS_CROP) as usize).max(1);
        let crop_h = ((fh as f32 * ANALYSIS_CROP) as usize).max(1);
        let x0 = (fw - crop_w) / 2;
        let y0 = (fh - crop_h) / 2;
        let width = ANALYSIS_WIDTH.min(crop_w);
        let height = ((width * crop_h + crop_w / 2) / crop_w).clamp(1, crop_h);

        let cells = width * height;
        let mut sums = vec![[0u32; 4]; cells];
        let mut clipped = 0u32;
        let mut crushed = 0u32;
        let mut luma_total = 0u64;
        let rgb = frame.rgb();
        // Column-to-cell map computed once; rows map on the fly.
        let cell_x: Vec<usize> = (0..crop_w).map(|x| x * width / crop_w).collect();
        for y in 0..crop_h {
            let row_cells = &mut sums[(y * height / crop_h) * width..][..width];
            let row = &rgb[((y0 + y) * fw + x0) * 3..][..crop_w * 3];
            for (px, &cx) in row.chunks_exact(3).zip(&cell_x) {
                let (r, g, b) = (px[0], px[1], px[2]);
                let l = luma_u8(r, g, b);
                clipped += u32::from(r >= CLIP_LEVEL || g >= CLIP_LEVEL || b >= CLIP_LEVEL);
                crushed += u32::from(l <= CRUSH_LEVEL);
                luma_total += u64::from(l);
                let s = &mut row_cells[cx];
                s[0] += r as u32;
                s[1] += g as u32;
                s[2] += b as u32;
                s[3] += 1;
            }
        }

        let mut luma = Vec::with_capacity(cells);
        let mut pigment = Vec::with_capacity(cells);
        for s in &sums {
            let n = s[3].max(1) as f32;
            let (r, g, b) = (s[0] as f32 / n, s[1] as f32 / n, s[2] as f32 / n);
            let l = 0.299 * r + 0.587 * g + 0.114 * b;
            let chroma = r.max(g).max(b) - r.min(g).min(b);
            luma.push(l);
            pigment.push(((255.0 - l) + chroma) / 510.0);
        }

        let pixels = (crop_w * crop_h) as f32;
        Self {
            width,
            height,
            luma,
            pigment,
            exposure: Exposure {
                clipped_highlights: clipped as f32 / pixels,
                crushed_shadows: crushed as f32 / pixels,
                mean_luma: luma_total as f32 / pixels,
            },
        }
    }

    pub(crate) fn exposure(&self) -> Exposure {
        self.exposure
    }

    /// Variance of the 4-neighbour Laplacian of luminance over the grid's
    /// interior (see `QualityReport::focus`).
    pub(crate) fn focus(&self) -> f32 {
        let (w, h) = (self.width, self.height);
        if w < 3 || h < 3 {
            return 0.0;
        }
        let l = &self.luma;
        let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
        for y in 1..h - 1 {
            let (up, mid, down) = (&l[(y - 1) * w..], &l[y * w..], &l[(y + 1) * w..]);
            for x in 1..w - 1 {
                let laplacian = f64::from(up[x] + down[x] + mid[x - 1] + mid[x + 1] - 4.0 * mid[x]);
                sum += laplacian;
                sum_sq += laplacian * laplacian;
            }
        }
        let n = ((w - 2) * (h - 2)) as f64;
        let mean = sum / n;
        (sum_sq / n - mean * mean).max(0.0) as f32
    }

    /// Twice the between-class standard deviation of Otsu's split of the
    /// pigment channel: `2 * sqrt(w0 * w1) * (m1 - m0)`, 0-1.
    pub(crate) fn lesion_contrast(&self) -> f32 {
        const BINS: usize = 256;
        let mut histogram = [0u32; BINS];
        for &p in &self.pigment {
            let bin = (p.clamp(0.0, 1.0) * (BINS - 1) as f32).round() as usize;
            histogram[bin.min(BINS - 1)] += 1;
        }
        let total = self.pigment.len() as f64;
        let scale = 1.0 / (BINS - 1) as f64;
        let sum_all: f64 = histogram
            .iter()
            .enumerate()
            .map(|(i, &c)| i as f64 * scale * f64::from(c))
            .sum();
        let (mut count_low, mut sum_low) = (0.0f64, 0.0f64);
        let mut best_between = 0.0f64;
        for (i, &c) in histogram.iter().enumerate() {
            count_low += f64::from(c);
            sum_low += i as f64 * scale * f64::from(c);
            let count_high = total - count_low;
            if count_low == 0.0 || count_high <= 0.0 {
                continue;
            }
            let (w0, w1) = (count_low / total, count_high / total);
            let (m0, m1) = (sum_low / count_low, (sum_all - sum_low) / count_high);
            best_between = best_between.max(w0 * w1 * (m1 - m0).powi(2));
        }
        (2.0 * best_between.sqrt()) as f32
    }
}
