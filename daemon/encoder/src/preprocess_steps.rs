//! The steps [`PreprocessSpec`] names: Shades of Gray colour constancy, the
//! dermatoscope's dark vignette, lesion framing, and test-time augmentation
//! of the input tensor.
//!
//! The vignette and the lesion are found on a coarse grid of cell means
//! (at most [`COARSE_SIDE`] cells a side), so a 1024 px photograph costs a
//! few milliseconds. The lesion is found the way the quality gate
//! (`dermascope-quality`) judges one: Otsu's two-class split of a pigment
//! channel (darkness plus saturation). The encoder cannot call the gate (the
//! dependency rules keep the two crates apart), and it must not: the library
//! is embedded by `ingest`, `reembed` and `eval` too, which never run the
//! gate, and every embedding has to be framed the same way.

use image::RgbImage;

use crate::manifest::{InputSpec, TensorLayout};
use crate::preprocess_spec::{ColourConstancy, Framing, PreprocessSpec, PREPROCESS_ENV};

/// Minkowski norm of Shades of Gray: 6, as in the ISIC-challenge entries
/// (Barata et al. 2015; Ng et al. 2019).
pub const SHADES_OF_GRAY_P: i32 = 6;

/// Margin added around the lesion's box on every side, as a fraction of the
/// box's side: the border and the skin right around a lesion carry much of
/// what a dermatologist reads (symmetry, the edge's sharpness), and
/// HAM10000's photographs, on which the encoder was fine-tuned, frame the
/// lesion with about this much skin.
pub const LESION_MARGIN: f32 = 0.25;

/// The framed region is never smaller than this fraction of the field of
/// view's side: a small spurious "lesion" (a hair knot, an ink dot) must not
/// blow a few pixels up to the whole input.
pub const MIN_FRAME_FRACTION: f32 = 0.3;

/// Longest side of the coarse grid the searches run on.
pub const COARSE_SIDE: u32 = 160;

/// Below this separation of Otsu's classes no lesion stands out: the
/// quality gate's default `min_lesion_contrast`.
pub const MIN_LESION_CONTRAST: f32 = 0.015;

/// Coarse cells dropped from the field of view's edge before the lesion
/// search: the vignette's soft rim is dark and would read as pigment.
const RIM_CELLS: usize = 3;

/// Cell means of an image.
struct Coarse {
    cell: u32,
    width: usize,
    height: usize,
    /// Mean R, G, B (0-255) per cell, row-major.
    rgb: Vec<[f32; 3]>,
}

impl Coarse {
    fn of(image: &RgbImage) -> Coarse {
        let (w, h) = image.dimensions();
        let cell = w.max(h).div_ceil(COARSE_SIDE).max(1);
        let width = w.div_ceil(cell) as usize;
        let height = h.div_ceil(cell) as usize;
        let mut sums = vec![[0u32; 4]; width * height];
        for (x, y, pixel) in image.enumerate_pixels() {
            let s = &mut sums[(y / cell) as usize * width + (x / cell) as usize];
            s[0] += u32::from(pixel.0[0]);
            s[1] += u32::from(pixel.0[1]);
            s[2] += u32::from(pixel.0[2]);
            s[3] += 1;
        }
        let rgb = sums
            .iter()
            .map(|s| {
                let n = s[3].max(1) as f32;
                [s[0] as f32 / n, s[1] as f32 / n, s[2] as f32 / n]
            })
            .collect();
        Coarse {
            cell,
            width,
            height,
            rgb,
        }
    }

    fn luma(&self, i: usize) -> f32 {
        let [r, g, b] = self.rgb[i];
        0.299 * r + 0.587 * g + 0.114 * b
    }
}

/// The dermatoscope's field of view: the image minus the dark border
/// (vignette) connected to its edges, on the coarse grid.
#[derive(Debug, Clone)]
pub struct FieldOfView {
    cell: u32,
    width: usize,
    height: usize,
    /// True for cells inside the field of view.
    inside: Vec<bool>,
}

impl FieldOfView {
    /// Fraction of the image the vignette covers.
    pub fn vignette_fraction(&self) -> f32 {
        let outside = self.inside.iter().filter(|inside| !**inside).count();
        outside as f32 / self.inside.len() as f32
    }

    /// Whether the pixel at (x, y) is inside the field of view.
    pub fn contains(&self, x: u32, y: u32) -> bool {
        let (cx, cy) = ((x / self.cell) as usize, (y / self.cell) as usize);
        cx < self.width && cy < self.height && self.inside[cy * self.width + cx]
    }

    /// The bounding box (x, y, w, h) in pixels of the field of view, within
    /// an image of `width` x `height`.
    pub fn bounds(&self, width: u32, height: u32) -> (u32, u32, u32, u32) {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for (i, _) in self
            .inside
            .iter()
            .enumerate()
            .filter(|(_, inside)| **inside)
        {
            let (cx, cy) = (i % self.width, i / self.width);
            x0 = x0.min(cx);
            y0 = y0.min(cy);
            x1 = x1.max(cx + 1);
            y1 = y1.max(cy + 1);
        }
        if x0 == usize::MAX {
            return (0, 0, width, height);
        }
        let px = |c: usize, limit: u32| (c as u32 * self.cell).min(limit);
        let (x0, y0) = (px(x0, width), px(y0, height));
        (x0, y0, px(x1, width) - x0, px(y1, height) - y0)
    }
}

/// Finds the dark vignette of a dermatoscope photograph: cells much darker
/// than the image's median, connected to the image's edge. `None` when there
/// is none (under 0.5% of the image) or when nearly everything is dark (over
/// 85%: an under-exposed frame, the quality gate's business, not a border).
pub fn find_vignette(image: &RgbImage) -> Option<FieldOfView> {
    find_vignette_on(&Coarse::of(image))
}

fn find_vignette_on(coarse: &Coarse) -> Option<FieldOfView> {
    let (w, h) = (coarse.width, coarse.height);
    let luma: Vec<f32> = (0..w * h).map(|i| coarse.luma(i)).collect();
    let mut sorted = luma.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[sorted.len() / 2];
    // The border is near black whatever the exposure; a dark but lit image
    // keeps its skin above a third of its median.
    let dark_level = (0.3 * median).clamp(8.0, 35.0);
    let dark: Vec<bool> = luma.iter().map(|&l| l < dark_level).collect();
    let mut outside = vec![false; w * h];
    let mut stack: Vec<usize> = Vec::new();
    for x in 0..w {
        stack.push(x);
        stack.push((h - 1) * w + x);
    }
    for y in 0..h {
        stack.push(y * w);
        stack.push(y * w + w - 1);
    }
    while let Some(i) = stack.pop() {
        if outside[i] || !dark[i] {
            continue;
        }
        outside[i] = true;
        let (x, y) = (i % w, i / w);
        if x > 0 {
            stack.push(i - 1);
        }
        if x + 1 < w {
            stack.push(i + 1);
        }
        if y > 0 {
            stack.push(i - w);
        }
        if y + 1 < h {
            stack.push(i + w);
        }
    }
    let fraction = outside.iter().filter(|o| **o).count() as f32 / (w * h) as f32;
    if !(0.005..=0.85).contains(&fraction) {
        return None;
    }
    Some(FieldOfView {
        cell: coarse.cell,
        width: w,
        height: h,
        inside: outside.iter().map(|o| !o).collect(),
    })
}

/// Shades of Gray gains for R, G, B: the illuminant estimate of each channel
/// is its Minkowski p-mean over the field of view (the whole image without
/// `field`); the gains bring the three to one level and average 1, so the
/// image's brightness stays where the camera put it.
pub fn shades_of_gray_gains(image: &RgbImage, field: Option<&FieldOfView>) -> [f32; 3] {
    let power: Vec<f64> = (0..=255u32)
        .map(|v| f64::from(v).powi(SHADES_OF_GRAY_P))
        .collect();
    let mut sums = [0f64; 3];
    let mut count = 0u64;
    for (x, y, pixel) in image.enumerate_pixels() {
        if field.is_some_and(|f| !f.contains(x, y)) {
            continue;
        }
        for (sum, &v) in sums.iter_mut().zip(&pixel.0) {
            *sum += power[usize::from(v)];
        }
        count += 1;
    }
    if count == 0 {
        return [1.0; 3];
    }
    let estimate = sums.map(|s| (s / count as f64).powf(1.0 / f64::from(SHADES_OF_GRAY_P)));
    if estimate.iter().any(|e| !(e.is_finite() && *e > 1e-6)) {
        // A channel that is black everywhere cannot be balanced; leave it.
        return [1.0; 3];
    }
    let inverse = estimate.map(|e| 1.0 / e);
    let mean = inverse.iter().sum::<f64>() / 3.0;
    inverse.map(|g| (g / mean) as f32)
}

/// Multiplies each channel by its gain, rounding and saturating at 255.
pub fn apply_gains(image: &mut RgbImage, gains: [f32; 3]) {
    let tables: [[u8; 256]; 3] = gains.map(|gain| {
        let mut table = [0u8; 256];
        for (v, out) in table.iter_mut().enumerate() {
            *out = (v as f32 * gain).round().clamp(0.0, 255.0) as u8;
        }
        table
    });
    for pixel in image.pixels_mut() {
        for (c, v) in pixel.0.iter_mut().enumerate() {
            *v = tables[c][usize::from(*v)];
        }
    }
}

/// The lesion's bounding box (x, y, w, h) in pixels, or `None` when no
/// region of the field of view stands out (see the module docs).
pub fn find_lesion(image: &RgbImage, field: Option<&FieldOfView>) -> Option<(u32, u32, u32, u32)> {
    find_lesion_on(&Coarse::of(image), field, image.dimensions())
}

fn find_lesion_on(
    coarse: &Coarse,
    field: Option<&FieldOfView>,
    (image_w, image_h): (u32, u32),
) -> Option<(u32, u32, u32, u32)> {
    let (w, h) = (coarse.width, coarse.height);
    // Inside the field of view and at least RIM_CELLS from its edge.
    let mut usable: Vec<bool> = match field {
        Some(f) if f.width == w && f.height == h => f.inside.clone(),
        _ => vec![true; w * h],
    };
    if field.is_some() {
        for _ in 0..RIM_CELLS {
            let before = usable.clone();
            for y in 0..h {
                for x in 0..w {
                    let i = y * w + x;
                    let edge = x == 0 || y == 0 || x + 1 == w || y + 1 == h;
                    if before[i]
                        && (edge
                            || !before[i - 1]
                            || !before[i + 1]
                            || !before[i - w]
                            || !before[i + w])
                    {
                        usable[i] = false;
                    }
                }
            }
        }
    }
    let pigment: Vec<f32> = (0..w * h)
        .map(|i| {
            let [r, g, b] = coarse.rgb[i];
            let chroma = r.max(g).max(b) - r.min(g).min(b);
            ((255.0 - coarse.luma(i)) + chroma) / 510.0
        })
        .collect();
    let values: Vec<f32> = (0..w * h)
        .filter(|&i| usable[i])
        .map(|i| pigment[i])
        .collect();
    let usable_count = values.len();
    if usable_count < 16 {
        return None;
    }
    let (threshold, contrast) = otsu(&values);
    if contrast.is_nan() || contrast < MIN_LESION_CONTRAST {
        return None;
    }
    let lesion: Vec<bool> = (0..w * h)
        .map(|i| usable[i] && pigment[i] > threshold)
        .collect();

    // 8-connected components; the lesion is the one with the most cells,
    // discounted by its distance from the centre (a dermatoscope is aimed
    // at the lesion; dark corners, hair and rulers sit off-centre).
    let mut label = vec![usize::MAX; w * h];
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let radius = (cx * cx + cy * cy).sqrt();
    let mut best: Option<(f32, usize, [usize; 4])> = None;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !lesion[start] || label[start] != usize::MAX {
            continue;
        }
        label[start] = start;
        stack.push(start);
        let (mut count, mut sx, mut sy) = (0usize, 0f32, 0f32);
        let mut bbox = [usize::MAX, usize::MAX, 0, 0];
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            count += 1;
            sx += x as f32;
            sy += y as f32;
            bbox = [
                bbox[0].min(x),
                bbox[1].min(y),
                bbox[2].max(x),
                bbox[3].max(y),
            ];
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if lesion[j] && label[j] == usize::MAX {
                        label[j] = start;
                        stack.push(j);
                    }
                }
            }
        }
        let (mx, my) = (sx / count as f32, sy / count as f32);
        let distance = ((mx - cx).powi(2) + (my - cy).powi(2)).sqrt() / radius;
        let score = count as f32 / (1.0 + 4.0 * distance * distance);
        if best.is_none_or(|(s, _, _)| score > s) {
            best = Some((score, count, bbox));
        }
    }
    let (_, count, [x0, y0, x1, y1]) = best?;
    // A speck is not a lesion.
    if (count as f32) < 0.005 * usable_count as f32 {
        return None;
    }
    let cell = coarse.cell;
    let px = |c: usize, limit: u32| (c as u32 * cell).min(limit);
    let (x0p, y0p) = (px(x0, image_w), px(y0, image_h));
    Some((
        x0p,
        y0p,
        px(x1 + 1, image_w) - x0p,
        px(y1 + 1, image_h) - y0p,
    ))
}

/// Otsu's threshold over values in 0..=1 and the separation of its two
/// classes, `2 * sqrt(w0 * w1) * (m1 - m0)` (the quality gate's
/// `lesion_contrast`).
fn otsu(values: &[f32]) -> (f32, f32) {
    const BINS: usize = 256;
    let mut histogram = [0u32; BINS];
    for &v in values {
        let bin = (v.clamp(0.0, 1.0) * (BINS - 1) as f32).round() as usize;
        histogram[bin.min(BINS - 1)] += 1;
    }
    let total = values.len() as f64;
    let scale = 1.0 / (BINS - 1) as f64;
    let sum_all: f64 = histogram
        .iter()
        .enumerate()
        .map(|(i, &c)| i as f64 * scale * f64::from(c))
        .sum();
    let (mut count_low, mut sum_low) = (0f64, 0f64);
    let (mut best_between, mut best_bin) = (0f64, 0usize);
    for (i, &c) in histogram.iter().enumerate() {
        count_low += f64::from(c);
        sum_low += i as f64 * scale * f64::from(c);
        let count_high = total - count_low;
        if count_low == 0.0 || count_high <= 0.0 {
            continue;
        }
        let (w0, w1) = (count_low / total, count_high / total);
        let (m0, m1) = (sum_low / count_low, (sum_all - sum_low) / count_high);
        let between = w0 * w1 * (m1 - m0).powi(2);
        if between > best_between {
            best_between = between;
            best_bin = i;
        }
    }
    // Values in the threshold's bin belong to the low class.
    let threshold = (best_bin as f64 + 0.5) * scale;
    (threshold as f32, (2.0 * best_between.sqrt()) as f32)
}

/// The region (x, y, w, h) embedded for a lesion box: the box plus
/// [`LESION_MARGIN`] on every side, grown to the image's aspect ratio (so it
/// is stretched to the input exactly as a whole photograph is), at least
/// [`MIN_FRAME_FRACTION`] of the field of view, kept inside `bounds` (the
/// field of view's box, or the whole image).
pub fn frame_region(
    lesion: (u32, u32, u32, u32),
    (image_w, image_h): (u32, u32),
    bounds: (u32, u32, u32, u32),
) -> (u32, u32, u32, u32) {
    let (lx, ly, lw, lh) = (
        lesion.0 as f32,
        lesion.1 as f32,
        lesion.2 as f32,
        lesion.3 as f32,
    );
    let (bx, by, bw, bh) = (
        bounds.0 as f32,
        bounds.1 as f32,
        bounds.2.max(1) as f32,
        bounds.3.max(1) as f32,
    );
    let aspect = image_w as f32 / image_h.max(1) as f32;
    let mut w = (lw * (1.0 + 2.0 * LESION_MARGIN)).max(MIN_FRAME_FRACTION * bw);
    let mut h = (lh * (1.0 + 2.0 * LESION_MARGIN)).max(MIN_FRAME_FRACTION * bh);
    if w / h < aspect {
        w = h * aspect;
    } else {
        h = w / aspect;
    }
    let (w, h) = (w.min(bw), h.min(bh));
    let centre = |start: f32, len: f32, size: f32, lo: f32, span: f32| {
        (start + len / 2.0 - size / 2.0).clamp(lo, lo + span - size)
    };
    let x = centre(lx, lw, w, bx, bw);
    let y = centre(ly, lh, h, by, bh);
    // Never below the encoder's smallest image, never beyond the image.
    let side = |v: f32, limit: u32| (v.round() as u32).max(crate::MIN_IMAGE_SIDE).min(limit);
    let (w, h) = (side(w, image_w), side(h, image_h));
    let x = (x.round() as u32).min(image_w - w);
    let y = (y.round() as u32).min(image_h - h);
    (x, y, w, h)
}

/// What [`prepare`] did to one image, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prepared {
    /// The colour gains applied, if any.
    pub gains: Option<[f32; 3]>,
    /// The fraction of the image the vignette covers (0 when none was found).
    pub vignette_fraction: f32,
    /// The region embedded, or `None` for the whole image.
    pub region: Option<(u32, u32, u32, u32)>,
}

/// Applies colour constancy and framing: the image the encoder resizes.
/// `None` when the spec leaves the image as it is (no copy is made).
pub fn prepare(image: &RgbImage, spec: &PreprocessSpec) -> Option<(RgbImage, Prepared)> {
    if spec.colour_constancy == ColourConstancy::None && spec.frame == Framing::Whole {
        return None;
    }
    let (width, height) = image.dimensions();
    // Both steps read the original: the lesion search does not depend on
    // whether colours were balanced.
    let coarse = Coarse::of(image);
    let field = find_vignette_on(&coarse);
    let region = match spec.frame {
        Framing::Whole => None,
        Framing::Lesion => find_lesion_on(&coarse, field.as_ref(), (width, height)).map(|lesion| {
            let bounds = field
                .as_ref()
                .map_or((0, 0, width, height), |f| f.bounds(width, height));
            frame_region(lesion, (width, height), bounds)
        }),
    };
    let mut out = match region {
        Some((x, y, w, h)) => image::imageops::crop_imm(image, x, y, w, h).to_image(),
        None => image.clone(),
    };
    let gains = match spec.colour_constancy {
        ColourConstancy::None => None,
        ColourConstancy::ShadesOfGray => {
            let gains = shades_of_gray_gains(image, field.as_ref());
            apply_gains(&mut out, gains);
            Some(gains)
        }
    };
    Some((
        out,
        Prepared {
            gains,
            vignette_fraction: field.as_ref().map_or(0.0, FieldOfView::vignette_fraction),
            region,
        },
    ))
}

/// The input tensor seen through symmetry `k` of the square (0 identity,
/// 1 mirror left-right, 2 mirror top-bottom, 3 half turn, 4 transpose,
/// 5 quarter turn clockwise, 6 anticlockwise, 7 anti-transpose). 0..4 suit
/// any input; 4..8 need a square one (checked with the manifest).
pub fn transform_tensor(tensor: &[f32], input: &InputSpec, k: usize) -> Vec<f32> {
    let (h, w) = (input.height as usize, input.width as usize);
    let plane = h * w;
    let mut out = vec![0f32; tensor.len()];
    for y in 0..h {
        for x in 0..w {
            let (sy, sx) = match k {
                0 => (y, x),
                1 => (y, w - 1 - x),
                2 => (h - 1 - y, x),
                3 => (h - 1 - y, w - 1 - x),
                4 => (x, y),
                5 => (h - 1 - x, y),
                6 => (x, w - 1 - y),
                _ => (w - 1 - x, h - 1 - y),
            };
            let (to, from) = (y * w + x, sy * w + sx);
            match input.layout {
                TensorLayout::Nchw => {
                    for c in 0..3 {
                        out[c * plane + to] = tensor[c * plane + from];
                    }
                }
                TensorLayout::Nhwc => {
                    out[to * 3..to * 3 + 3].copy_from_slice(&tensor[from * 3..from * 3 + 3]);
                }
            }
        }
    }
    out
}

/// The preprocessing an encoder loads with: `explicit` (from
/// [`crate::EncoderOptions::preprocess`]), else [`PREPROCESS_ENV`] when set,
/// else the manifest's table; checked against the manifest's input.
pub(crate) fn chosen_spec(
    manifest: &crate::EncoderManifest,
    explicit: Option<PreprocessSpec>,
) -> Result<PreprocessSpec, crate::EncoderError> {
    let (spec, from_env) = match explicit {
        Some(spec) => (spec, None),
        None => match std::env::var(PREPROCESS_ENV) {
            Ok(value) => {
                let spec = PreprocessSpec::parse_list(&value).map_err(|message| {
                    crate::EncoderError::PreprocessOverride {
                        value: value.clone(),
                        message,
                    }
                })?;
                (spec, Some(value))
            }
            Err(_) => (manifest.preprocess, None),
        },
    };
    spec.check(&manifest.input)
        .map_err(|message| crate::EncoderError::PreprocessOverride {
            value: from_env.unwrap_or_else(|| spec.describe()),
            message,
        })?;
    if !spec.is_default() {
        tracing::info!(preprocess = %spec.describe(), overridden = (spec != manifest.preprocess), "encoder preprocessing");
    }
    Ok(spec)
}

impl crate::Encoder {
    /// Embeds `tensor` and, with test-time augmentation, its flips and
    /// rotations: each embedding normalised, their mean normalised again.
    pub(crate) fn embed_tensor_with_tta(
        &self,
        tensor: &[f32],
    ) -> Result<crate::Embedding, crate::EncoderError> {
        let first = crate::Embedding::from_raw(self.run_tensor(tensor)?)?;
        if self.preprocess.tta <= 1 {
            return Ok(first);
        }
        let mut sum = first.into_values();
        for k in 1..usize::from(self.preprocess.tta) {
            let view = transform_tensor(tensor, &self.manifest.input, k);
            let embedding = crate::Embedding::from_raw(self.run_tensor(&view)?)?;
            for (s, v) in sum.iter_mut().zip(embedding.values()) {
                *s += v;
            }
        }
        crate::Embedding::from_raw(sum)
    }
}
