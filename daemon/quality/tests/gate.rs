//! The gate on synthetic frames: each failure mode is refused for the right
//! reason, a good frame is accepted, and bad buffers are typed errors.

mod common;

use common::*;
use dermascope_quality::{
    assess, assess_burst, best_of_burst, sharpest_accepted, Frame, QualityError, QualityThresholds,
    RejectReason, Verdict,
};

fn judge(rgb: &[u8]) -> dermascope_quality::QualityReport {
    let frame = Frame::new(WIDTH, HEIGHT, rgb).unwrap();
    assess(&frame, &QualityThresholds::default())
}

#[test]
fn sharp_lesion_on_skin_is_accepted() {
    let report = judge(&lesion_on_skin());
    assert_eq!(report.verdict, Verdict::Accept, "{report:?}");
    let t = QualityThresholds::default();
    assert!(report.focus > 2.0 * t.min_focus, "{report:?}");
    assert!(
        report.lesion_contrast > 2.0 * t.min_lesion_contrast,
        "{report:?}"
    );
}

#[test]
fn blurred_lesion_is_blurry() {
    let sharp = lesion_on_skin();
    let report = judge(&blurred(&sharp, 8.0));
    assert_eq!(
        report.verdict,
        Verdict::Reject(RejectReason::Blurry),
        "{report:?}"
    );
    // Blur hides detail, not the lesion: the lesion check still passes.
    assert!(report.lesion_contrast >= QualityThresholds::default().min_lesion_contrast);
}

#[test]
fn focus_falls_as_blur_grows() {
    let sharp = lesion_on_skin();
    let focus: Vec<f32> = [0.0, 1.5, 3.0, 6.0]
        .iter()
        .map(|&s| {
            if s == 0.0 {
                judge(&sharp).focus
            } else {
                judge(&blurred(&sharp, s)).focus
            }
        })
        .collect();
    assert!(focus.windows(2).all(|w| w[0] > w[1]), "{focus:?}");
}

#[test]
fn near_white_is_too_bright() {
    let report = judge(&uniform([252.0, 250.0, 248.0]));
    assert_eq!(
        report.verdict,
        Verdict::Reject(RejectReason::TooBright),
        "{report:?}"
    );
    assert!(report.clipped_highlights > 0.5);
}

#[test]
fn overexposed_lesion_is_too_bright() {
    let report = judge(&exposed(&lesion_on_skin(), 1.8));
    assert_eq!(
        report.verdict,
        Verdict::Reject(RejectReason::TooBright),
        "{report:?}"
    );
}

#[test]
fn near_black_is_too_dark() {
    let report = judge(&uniform([6.0, 4.0, 4.0]));
    assert_eq!(
        report.verdict,
        Verdict::Reject(RejectReason::TooDark),
        "{report:?}"
    );
    assert!(report.crushed_shadows > 0.5);
}

#[test]
fn underexposed_lesion_is_too_dark() {
    let report = judge(&exposed(&lesion_on_skin(), 0.12));
    assert_eq!(
        report.verdict,
        Verdict::Reject(RejectReason::TooDark),
        "{report:?}"
    );
}

#[test]
fn plain_skin_has_no_lesion() {
    let report = judge(&plain_skin());
    assert_eq!(
        report.verdict,
        Verdict::Reject(RejectReason::NoLesion),
        "{report:?}"
    );
}

#[test]
fn short_buffer_is_a_typed_error() {
    let rgb = lesion_on_skin();
    let err = Frame::new(WIDTH, HEIGHT, &rgb[..rgb.len() - 1]).unwrap_err();
    assert_eq!(
        err,
        QualityError::LengthMismatch {
            width: WIDTH,
            height: HEIGHT,
            expected: rgb.len(),
            actual: rgb.len() - 1
        }
    );
    assert!(matches!(
        Frame::new(WIDTH, HEIGHT, &[]),
        Err(QualityError::LengthMismatch { actual: 0, .. })
    ));
}

#[test]
fn long_buffer_and_absurd_sizes_are_typed_errors() {
    let rgb = vec![128u8; (WIDTH * HEIGHT * 3 + 3) as usize];
    assert!(matches!(
        Frame::new(WIDTH, HEIGHT, &rgb),
        Err(QualityError::LengthMismatch { .. })
    ));
    // u32::MAX squared times three overflows usize on 32-bit and is never
    // the length of a real buffer on 64-bit.
    assert!(Frame::new(u32::MAX, u32::MAX, &rgb).is_err());
    assert_eq!(
        Frame::new(0, 0, &[]).unwrap_err(),
        QualityError::TooSmall {
            width: 0,
            height: 0,
            min: dermascope_quality::MIN_FRAME_SIDE
        }
    );
    assert!(matches!(
        Frame::new(10, 2000, &vec![0u8; 10 * 2000 * 3]),
        Err(QualityError::TooSmall { .. })
    ));
}

/// `rgb` (a `WIDTH x HEIGHT` frame) resampled to `width x height`.
fn resized(rgb: &[u8], width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, rgb.to_vec()).unwrap();
    image::imageops::resize(&img, width, height, image::imageops::FilterType::Triangle).into_raw()
}

#[test]
fn smallest_frame_is_judged_like_a_larger_one() {
    let side = dermascope_quality::MIN_FRAME_SIDE;
    let t = QualityThresholds::default();

    // A flat field has no detail and no lesion; exposure is fine, so it is
    // refused as empty, not as dark, bright or blurred.
    let rgb = vec![200u8; (side * side * 3) as usize];
    let report = assess(&Frame::new(side, side, &rgb).unwrap(), &t);
    assert_eq!(report.focus, 0.0, "{report:?}");
    assert_eq!(report.lesion_contrast, 0.0, "{report:?}");
    assert_eq!(report.mean_luma, 200.0, "{report:?}");
    assert_eq!(
        (report.clipped_highlights, report.crushed_shadows),
        (0.0, 0.0)
    );
    assert_eq!(report.verdict, Verdict::Reject(RejectReason::NoLesion));

    // The lesion frame and plain skin shrunk to the smallest size (4:3
    // kept) get the verdicts of the full frames, and nearly the measures
    // that do not depend on scale.
    let (w, h) = (side * 4 / 3, side);
    let big = judge(&lesion_on_skin());
    let small_rgb = resized(&lesion_on_skin(), w, h);
    let small = assess(&Frame::new(w, h, &small_rgb).unwrap(), &t);
    assert_eq!(big.verdict, Verdict::Accept, "{big:?}");
    assert_eq!(small.verdict, big.verdict, "{small:?} vs {big:?}");
    assert!(
        (small.lesion_contrast / big.lesion_contrast - 1.0).abs() < 0.1,
        "{small:?} vs {big:?}"
    );
    assert!(
        (small.mean_luma - big.mean_luma).abs() < 2.0,
        "{small:?} vs {big:?}"
    );
    assert!(small.focus > 2.0 * t.min_focus, "{small:?}");
    let skin = resized(&plain_skin(), w, h);
    let skin = assess(&Frame::new(w, h, &skin).unwrap(), &t);
    assert_eq!(skin.verdict, judge(&plain_skin()).verdict, "{skin:?}");
    assert_eq!(skin.verdict, Verdict::Reject(RejectReason::NoLesion));
}

#[test]
fn best_of_burst_picks_the_sharpest_accepted_frame() {
    let sharp = lesion_on_skin();
    let soft = blurred(&sharp, 0.8);
    let very_blurred = blurred(&sharp, 8.0);
    let white = uniform([252.0, 250.0, 248.0]);
    let frames: Vec<Frame<'_>> = [&very_blurred, &soft, &white, &sharp, &soft]
        .iter()
        .map(|rgb| Frame::new(WIDTH, HEIGHT, rgb).unwrap())
        .collect();
    let t = QualityThresholds::default();
    let reports = assess_burst(&frames, &t);
    assert_eq!(reports[1].verdict, Verdict::Accept, "{:?}", reports[1]);
    assert!(reports[3].focus > reports[1].focus);
    assert_eq!(best_of_burst(&frames, &t), Some(3));
    assert_eq!(sharpest_accepted(&reports), Some(3));
    // Without the sharp frame, the soft one is the best acceptable, and the
    // earlier of two equal ones wins.
    assert_eq!(
        best_of_burst(&[frames[0], frames[1], frames[2], frames[4]], &t),
        Some(1)
    );
}

#[test]
fn burst_of_rejects_has_no_best() {
    let white = uniform([252.0, 250.0, 248.0]);
    let skin = plain_skin();
    let frames = [
        Frame::new(WIDTH, HEIGHT, &white).unwrap(),
        Frame::new(WIDTH, HEIGHT, &skin).unwrap(),
    ];
    assert_eq!(best_of_burst(&frames, &QualityThresholds::default()), None);
    assert_eq!(best_of_burst(&[], &QualityThresholds::default()), None);
}

#[test]
fn thresholds_are_configuration_with_defaults() {
    let partial: QualityThresholds = toml::from_str("min_focus = 3.5\n").unwrap();
    assert_eq!(partial.min_focus, 3.5);
    let defaults = QualityThresholds::default();
    assert_eq!(
        partial.max_clipped_highlights,
        defaults.max_clipped_highlights
    );
    assert_eq!(partial.min_lesion_contrast, defaults.min_lesion_contrast);
    let empty: QualityThresholds = toml::from_str("").unwrap();
    assert_eq!(empty, defaults);
    assert!(toml::from_str::<QualityThresholds>("min_focs = 1.0\n").is_err());
}

#[test]
fn thresholds_change_the_verdict() {
    let rgb = blurred(&lesion_on_skin(), 8.0);
    let frame = Frame::new(WIDTH, HEIGHT, &rgb).unwrap();
    let lenient = QualityThresholds {
        min_focus: 0.0,
        ..QualityThresholds::default()
    };
    assert_eq!(assess(&frame, &lenient).verdict, Verdict::Accept);
}
