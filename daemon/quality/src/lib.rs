//! dermascope-quality: the gate a camera frame passes before it is embedded.
//!
//! Embedding a blurred, over-exposed or empty frame wastes a second of the
//! clinician's time and, worse, returns "similar cases" for a photograph of
//! nothing. This crate judges one RGB888 frame (or a burst of them) with
//! cheap, explainable measurements and says why a frame is refused, so the
//! screen can tell the clinician what to do about it.
//!
//! Boundaries: pure functions over raw RGB888 bytes. No camera, no decoding,
//! no logging of pixels, no knowledge of encoders or cases. The daemon
//! decides what to do with a [`QualityReport`]; thresholds are configuration
//! ([`QualityThresholds`] deserialises from the daemon's TOML with defaults).
//!
//! All measurements run on the same *analysis grid*: the central
//! [`ANALYSIS_CROP`] of the frame in each dimension (inside the circular field
//! of a contact dermatoscope, where the lesion is framed), area-averaged down
//! to [`ANALYSIS_WIDTH`] columns. A fixed grid makes the numbers comparable
//! across camera resolutions and keeps a 640x480 frame well under 5 ms.
//!
//! # Limits of the lesion check
//! "Is there a lesion in view?" is a heuristic, not a detector: it asks
//! whether the centre holds a region clearly darker or more saturated than
//! the rest (Otsu's two-class split of a pigment channel, see
//! [`QualityReport::lesion_contrast`]). It catches an empty field (plain
//! skin, a table, the lens cap's uniform grey) and is fooled by anything with
//! strong contrast: hair, a ruler, ink marks, a shadow. Very pale lesions on
//! pale skin (amelanotic lesions, some early lesions) can be refused as "no
//! lesion". It never judges what the lesion is.
//!
//! # Limits of the focus check
//! The variance of the Laplacian grows with sensor noise as well as with
//! detail, so a noisy, defocused frame (dim light, high gain) can pass, and
//! the default [`QualityThresholds::min_focus`] was calibrated on HAM10000
//! photographs (200x150), not on the device's camera. Recalibrate it with
//! the device's own in-focus and defocused frames before trusting it.
//!
//! # Default thresholds and where they come from
//! Measured on all 4176 photographs of the HAM10000 subset in
//! `../shared/data/derm`: 99.1% pass; every one of those that passed is
//! refused as blurry once Gaussian-blurred with sigma = 1.5% of its width.
//! In-focus photographs' focus starts at 5.9 (1st percentile 15.5); blurred
//! copies' stays below 4.7. Lesion contrast starts at 0.021 on real lesions
//! (0.018 once blurred) and is about 0.004 on synthetic plain skin.

use serde::{Deserialize, Serialize};

mod grid;

use grid::AnalysisGrid;

/// Fraction of the frame's width and of its height, centred, that the gate
/// looks at. Contact dermatoscopes show a circular field with dark corners;
/// 0.6 x 0.6 stays inside the inscribed circle of a 4:3 frame.
pub const ANALYSIS_CROP: f32 = 0.6;

/// Width in samples of the downscaled analysis grid (height keeps the crop's
/// aspect ratio).
pub const ANALYSIS_WIDTH: usize = 128;

/// Smallest frame the gate accepts to judge, per side, in pixels. Below this
/// the analysis grid would be upsampled and the focus measure meaningless.
pub const MIN_FRAME_SIDE: u32 = 64;

/// Why a frame could not be judged at all (as opposed to judged and refused).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QualityError {
    /// The buffer does not hold `width * height * 3` bytes.
    #[error("frame of {width}x{height} needs {expected} RGB888 bytes, got {actual}")]
    LengthMismatch {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// `width * height * 3`.
        expected: usize,
        /// Bytes actually supplied.
        actual: usize,
    },
    /// The frame is smaller than [`MIN_FRAME_SIDE`] on some side.
    #[error("frame of {width}x{height} is too small to judge (minimum {min}x{min})")]
    TooSmall {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// [`MIN_FRAME_SIDE`].
        min: u32,
    },
    /// `width * height * 3` does not fit in memory addresses.
    #[error("frame dimensions {width}x{height} overflow")]
    DimensionsOverflow {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
}

/// A borrowed RGB888 frame (row-major, 3 bytes per pixel, no padding) whose
/// size has been checked against its buffer.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    width: u32,
    height: u32,
    rgb: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Checks that `rgb` holds exactly `width * height` RGB888 pixels and
    /// that the frame is big enough to judge.
    pub fn new(width: u32, height: u32, rgb: &'a [u8]) -> Result<Self, QualityError> {
        let expected = (width as usize)
            .checked_mul(height as usize)
            .and_then(|n| n.checked_mul(3))
            .ok_or(QualityError::DimensionsOverflow { width, height })?;
        if rgb.len() != expected {
            return Err(QualityError::LengthMismatch {
                width,
                height,
                expected,
                actual: rgb.len(),
            });
        }
        if width < MIN_FRAME_SIDE || height < MIN_FRAME_SIDE {
            return Err(QualityError::TooSmall {
                width,
                height,
                min: MIN_FRAME_SIDE,
            });
        }
        Ok(Self { width, height, rgb })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The RGB888 bytes.
    pub fn rgb(&self) -> &'a [u8] {
        self.rgb
    }
}

/// Limits a frame must meet to be embedded. Every field has a default, so
/// the daemon's TOML may set only the ones it wants to change.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QualityThresholds {
    /// Minimum [`QualityReport::focus`]; below it the frame is
    /// [`RejectReason::Blurry`].
    pub min_focus: f32,
    /// Maximum fraction of analysed pixels with a clipped channel
    /// ([`QualityReport::clipped_highlights`]).
    pub max_clipped_highlights: f32,
    /// Maximum fraction of analysed pixels that are crushed to black
    /// ([`QualityReport::crushed_shadows`]).
    pub max_crushed_shadows: f32,
    /// Minimum mean luminance (0-255) of the analysed region.
    pub min_mean_luma: f32,
    /// Maximum mean luminance (0-255) of the analysed region.
    pub max_mean_luma: f32,
    /// Minimum [`QualityReport::lesion_contrast`]; below it the frame is
    /// [`RejectReason::NoLesion`].
    pub min_lesion_contrast: f32,
}

impl Default for QualityThresholds {
    /// Focus 8, clipped and crushed at most 25% each, mean luminance 40-230,
    /// lesion contrast 0.015 (see the crate docs for the measurements).
    fn default() -> Self {
        Self {
            min_focus: 8.0,
            max_clipped_highlights: 0.25,
            max_crushed_shadows: 0.25,
            min_mean_luma: 40.0,
            max_mean_luma: 230.0,
            min_lesion_contrast: 0.015,
        }
    }
}

/// Why a frame was refused, in the order the gate checks: exposure first
/// (nothing else can be judged in a white or black frame), then whether a
/// lesion is in view (an empty field has no edges and would otherwise read
/// as blurred), then focus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// Too many crushed shadows or too low a mean luminance.
    TooDark,
    /// Too many clipped highlights or too high a mean luminance.
    TooBright,
    /// No region in the centre stands out from the surrounding skin.
    NoLesion,
    /// Too little fine detail: out of focus or moved during exposure.
    Blurry,
}

/// The gate's decision on one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Good enough to embed.
    Accept,
    /// Refused, with the first failed check.
    Reject(RejectReason),
}

/// Measurements of one frame and the verdict they lead to under the
/// thresholds used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QualityReport {
    /// Sharpness: variance of the Laplacian of the analysis grid's
    /// luminance (0-255 units squared); larger is sharper. Chosen over
    /// Tenengrad because on real dermoscopy it separated in-focus photographs
    /// from blurred copies completely where Tenengrad's built-in smoothing did
    /// not (see the crate's tests).
    pub focus: f32,
    /// Fraction (0-1) of analysed pixels with any channel at or above 250.
    pub clipped_highlights: f32,
    /// Fraction (0-1) of analysed pixels with luminance at or below 10.
    pub crushed_shadows: f32,
    /// Mean luminance (BT.601, 0-255) of the analysed region.
    pub mean_luma: f32,
    /// Separation (0-1) of Otsu's two classes on a pigment channel (darkness
    /// plus saturation), scaled by how balanced the classes are, so a few
    /// dark hairs on plain skin score low while a lesion against skin scores
    /// high.
    pub lesion_contrast: f32,
    /// Accept, or the first reason to refuse.
    pub verdict: Verdict,
}

/// Measures one frame and judges it against `thresholds`.
pub fn assess(frame: &Frame<'_>, thresholds: &QualityThresholds) -> QualityReport {
    let grid = AnalysisGrid::from_frame(frame);
    let exposure = grid.exposure();
    let focus = grid.focus();
    let lesion_contrast = grid.lesion_contrast();
    let verdict = judge(
        thresholds,
        focus,
        exposure.clipped_highlights,
        exposure.crushed_shadows,
        exposure.mean_luma,
        lesion_contrast,
    );
    QualityReport {
        focus,
        clipped_highlights: exposure.clipped_highlights,
        crushed_shadows: exposure.crushed_shadows,
        mean_luma: exposure.mean_luma,
        lesion_contrast,
        verdict,
    }
}

fn judge(
    t: &QualityThresholds,
    focus: f32,
    clipped_highlights: f32,
    crushed_shadows: f32,
    mean_luma: f32,
    lesion_contrast: f32,
) -> Verdict {
    // A NaN measure (never expected, but the frame comes from hardware) must
    // refuse rather than slip through every comparison.
    let below = |value: f32, min: f32| value.is_nan() || value < min;
    let reason = if crushed_shadows > t.max_crushed_shadows || below(mean_luma, t.min_mean_luma) {
        Some(RejectReason::TooDark)
    } else if clipped_highlights > t.max_clipped_highlights || mean_luma > t.max_mean_luma {
        Some(RejectReason::TooBright)
    } else if below(lesion_contrast, t.min_lesion_contrast) {
        Some(RejectReason::NoLesion)
    } else if below(focus, t.min_focus) {
        Some(RejectReason::Blurry)
    } else {
        None
    };
    reason.map_or(Verdict::Accept, Verdict::Reject)
}

/// Judges every frame of a burst, in order.
pub fn assess_burst(frames: &[Frame<'_>], thresholds: &QualityThresholds) -> Vec<QualityReport> {
    frames.iter().map(|f| assess(f, thresholds)).collect()
}

/// Index of the sharpest accepted report, or `None` when every frame was
/// refused. Ties go to the earliest frame (closest to the button press).
pub fn sharpest_accepted(reports: &[QualityReport]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, r) in reports.iter().enumerate() {
        if r.verdict != Verdict::Accept {
            continue;
        }
        if best.is_none_or(|(_, focus)| r.focus > focus) {
            best = Some((i, r.focus));
        }
    }
    best.map(|(i, _)| i)
}

/// Index of the frame of a burst to embed: the sharpest one the gate
/// accepts, or `None` when it accepts none (then [`assess_burst`] says why).
pub fn best_of_burst(frames: &[Frame<'_>], thresholds: &QualityThresholds) -> Option<usize> {
    sharpest_accepted(&assess_burst(frames, thresholds))
}
