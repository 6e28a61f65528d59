//! The gate against real dermoscopy (HAM10000 subset in
//! `../shared/data/derm`, never copied here): in-focus photographs must pass
//! and heavily blurred copies of them must be refused as blurry.

use std::path::PathBuf;

use dermascope_quality::{assess, Frame, QualityThresholds, RejectReason, Verdict};

const SAMPLE: usize = 200;
/// "Heavily blurred": a Gaussian whose sigma is 1.5% of the image width
/// (about 10 px on a 640 px frame), a clearly missed focus.
const HEAVY_BLUR_FRACTION: f32 = 0.015;

#[test]
fn real_dermoscopy_passes_and_blurred_copies_are_refused() {
    let Some(data) =
        dermascope_testkit::derm_data("real_dermoscopy_passes_and_blurred_copies_are_refused")
    else {
        return;
    };
    let dir = data.join("images");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("jpg")))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= SAMPLE,
        "only {} images in {}",
        paths.len(),
        dir.display()
    );
    // Evenly spaced over the sorted names, so the sample is fixed and spans
    // the folder rather than its first few lesions.
    let step = paths.len() / SAMPLE;
    let thresholds = QualityThresholds::default();

    let mut accepted = 0usize;
    let mut refusals = Vec::new();
    let mut blurred_not_blurry = Vec::new();
    for path in paths.iter().step_by(step).take(SAMPLE) {
        let image = image::open(path).unwrap().to_rgb8();
        let (w, h) = image.dimensions();
        let report = assess(&Frame::new(w, h, image.as_raw()).unwrap(), &thresholds);
        if report.verdict != Verdict::Accept {
            // Refused for exposure or lesion: its blurred copy is refused for
            // the same reason first, which is the order the gate checks in.
            refusals.push((path.file_name().unwrap().to_owned(), report));
            continue;
        }
        accepted += 1;
        let blurred = image::imageops::blur(&image, w as f32 * HEAVY_BLUR_FRACTION);
        let report = assess(&Frame::new(w, h, blurred.as_raw()).unwrap(), &thresholds);
        if report.verdict != Verdict::Reject(RejectReason::Blurry) {
            blurred_not_blurry.push((path.file_name().unwrap().to_owned(), report));
        }
    }
    let rate = accepted as f64 / SAMPLE as f64;
    println!(
        "accepted {accepted}/{SAMPLE} real images ({:.1}%)",
        rate * 100.0
    );
    for (name, report) in &refusals {
        println!("refused {name:?}: {report:?}");
    }
    assert!(
        rate >= 0.95,
        "only {accepted}/{SAMPLE} accepted: {refusals:?}"
    );
    assert!(
        blurred_not_blurry.is_empty(),
        "{} blurred copies of accepted images not refused as blurry: {blurred_not_blurry:?}",
        blurred_not_blurry.len()
    );
}
