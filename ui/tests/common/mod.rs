//! View models for every screen, with synthetic thumbnails drawn from a
//! seed: lesion-like blobs on skin, never a real patient's photograph.

#![allow(dead_code)]

use dermascope_ui::{
    Clock, FleetSource, FleetView, MatchView, PredictionView, RejectionView, ResultsView, Screen,
    StatusView, SyncState, Thumbnail,
};

/// Sizes every screen is drawn at: the landscape panel and a square one.
pub const SIZES: [(u32, u32); 2] = [(320, 240), (240, 240)];

/// A deterministic lesion-like picture: skin, a lobed blob whose colour
/// and shape come from `seed`, a reticular pattern, and the dark corners of
/// a dermatoscope's circular field.
pub fn synthetic_lesion(seed: u32, width: u32, height: u32) -> Thumbnail {
    let skins = [
        [222.0, 178.0, 152.0],
        [196.0, 150.0, 120.0],
        [236.0, 196.0, 176.0],
    ];
    let lesions = [
        [112.0, 70.0, 48.0],
        [70.0, 44.0, 36.0],
        [176.0, 92.0, 96.0],
        [96.0, 86.0, 110.0],
        [140.0, 96.0, 66.0],
    ];
    let skin: [f32; 3] = skins[seed as usize % skins.len()];
    let lesion: [f32; 3] = lesions[seed as usize % lesions.len()];
    let phase = seed as f32 * 0.9;
    let lobes = 2.0 + (seed % 4) as f32;
    let (w, h) = (width as f32, height as f32);
    let (cx, cy) = (
        w * (0.5 + 0.04 * (phase.sin())),
        h * (0.5 + 0.04 * (phase.cos())),
    );
    let base = 0.27 * w.min(h) * (1.0 + 0.12 * (seed % 3) as f32);
    let field = 0.5 * (w * w + h * h).sqrt() * 0.92;
    let mut rgb = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let r = (dx * dx + dy * dy).sqrt();
            let angle = dy.atan2(dx);
            let edge = base
                * (1.0 + 0.18 * (lobes * angle + phase).sin() + 0.07 * (7.0 * angle - phase).cos());
            // Soft border over a few pixels, as real lesions have.
            let inside = ((edge - r) / (0.06 * base) + 0.5).clamp(0.0, 1.0);
            let cell = (2.0 * std::f32::consts::PI * x as f32 / (w / 14.0)).sin()
                * (2.0 * std::f32::consts::PI * y as f32 / (h / 14.0)).sin();
            let network = 1.0 - 0.18 * inside * (cell > 0.55) as u8 as f32;
            let dx0 = x as f32 + 0.5 - w / 2.0;
            let dy0 = y as f32 + 0.5 - h / 2.0;
            let vignette =
                (1.0 - ((dx0 * dx0 + dy0 * dy0).sqrt() - field) / (0.06 * field)).clamp(0.08, 1.0);
            for c in 0..3 {
                let v = (skin[c] * (1.0 - inside) + lesion[c] * inside) * network * vignette;
                rgb.push(v.round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    Thumbnail::new(width, height, rgb).expect("synthetic thumbnail size")
}

pub fn status(sync: SyncState, pending_uploads: u32, clock: Option<(u8, u8)>) -> StatusView {
    StatusView {
        sync,
        pending_uploads,
        cases_in_library: 1204,
        clock: clock.map(|(hours, minutes)| Clock { hours, minutes }),
        last_sync_minutes: None,
    }
}

pub fn matches(names: &[(&str, f32, bool)]) -> Vec<MatchView> {
    names
        .iter()
        .enumerate()
        .map(|(i, &(diagnosis, similarity, confirmed))| MatchView {
            diagnosis: diagnosis.to_owned(),
            similarity,
            thumbnail: synthetic_lesion(10 + i as u32, 64, 64),
            confirmed,
        })
        .collect()
}

/// Every screen the golden tests pin, with its file stem.
pub fn screens() -> Vec<(&'static str, StatusView, Screen)> {
    let online = status(SyncState::Online, 0, Some((9, 41)));
    vec![
        (
            "ready_live",
            online.clone(),
            Screen::Ready {
                live: Some(synthetic_lesion(1, 160, 120)),
                hint: "Centre the lesion in the circle, then press the button".to_owned(),
            },
        ),
        (
            "ready_camera_starting",
            status(SyncState::Offline, 3, None),
            Screen::Ready {
                live: None,
                hint: "Press the button to capture".to_owned(),
            },
        ),
        (
            "capturing",
            status(SyncState::Syncing, 3, Some((9, 42))),
            Screen::Capturing {
                frames_taken: 2,
                burst_len: 5,
            },
        ),
        (
            "rejected_blurry",
            online.clone(),
            Screen::rejected(RejectionView::Blurry),
        ),
        (
            "rejected_no_lesion",
            online.clone(),
            Screen::rejected(RejectionView::NoLesion),
        ),
        (
            "rejected_too_bright",
            online.clone(),
            Screen::rejected(RejectionView::TooBright),
        ),
        (
            "results",
            online.clone(),
            Screen::Results(ResultsView {
                query: synthetic_lesion(2, 96, 96),
                matches: matches(&[
                    ("Melanocytic nevus", 0.94, true),
                    ("Melanocytic nevus", 0.91, true),
                    ("Melanoma", 0.87, true),
                    ("Benign keratosis", 0.82, false),
                    ("Dermatofibroma", 0.78, true),
                ]),
                prediction: Some(PredictionView {
                    diagnosis: "Melanocytic nevus".to_owned(),
                    probability: 0.72,
                }),
                fleet: None,
                review: false,
                no_close_match: false,
            }),
        ),
        (
            "results_fleet_model",
            StatusView {
                last_sync_minutes: Some(3),
                ..status(SyncState::Online, 2, Some((9, 44)))
            },
            Screen::Results(ResultsView {
                query: synthetic_lesion(2, 96, 96),
                matches: matches(&[
                    ("Melanocytic nevus", 0.94, true),
                    ("Melanoma", 0.87, true),
                    ("Benign keratosis", 0.82, true),
                ]),
                prediction: Some(PredictionView {
                    diagnosis: "Melanocytic nevus".to_owned(),
                    probability: 0.72,
                }),
                fleet: Some(FleetView {
                    differential: vec![
                        "Melanocytic nevus".to_owned(),
                        "Melanoma".to_owned(),
                        "Benign keratosis".to_owned(),
                    ],
                    source: FleetSource::Model,
                }),
                review: false,
                no_close_match: false,
            }),
        ),
        (
            "results_fleet_cases",
            StatusView {
                last_sync_minutes: Some(190),
                ..status(SyncState::Offline, 0, None)
            },
            Screen::Results(ResultsView {
                query: synthetic_lesion(3, 96, 96),
                matches: matches(&[("Melanoma", 0.9, true), ("Melanoma", 0.85, true)]),
                prediction: None,
                fleet: Some(FleetView {
                    differential: vec!["Melanoma".to_owned()],
                    source: FleetSource::Cases,
                }),
                review: false,
                no_close_match: false,
            }),
        ),
        (
            "results_long_names",
            status(SyncState::Offline, 12, Some((17, 5))),
            Screen::Results(ResultsView {
                query: synthetic_lesion(3, 120, 90),
                matches: matches(&[
                    (
                        "Pigmented basal cell carcinoma, superficial type",
                        0.83,
                        true,
                    ),
                    ("Actinic keratosis / intraepithelial carcinoma", 0.79, false),
                    ("Vascular lesion (angioma)", 0.64, true),
                ]),
                prediction: Some(PredictionView {
                    diagnosis: "Basal cell carcinoma (nodular and pigmented)".to_owned(),
                    probability: 0.48,
                }),
                fleet: None,
                review: false,
                no_close_match: false,
            }),
        ),
        (
            "results_no_matches",
            status(SyncState::Offline, 1, None),
            Screen::Results(ResultsView {
                query: synthetic_lesion(4, 96, 96),
                matches: Vec::new(),
                prediction: None,
                fleet: None,
                review: false,
                no_close_match: false,
            }),
        ),
        (
            "results_review",
            online.clone(),
            Screen::Results(ResultsView {
                query: synthetic_lesion(1, 96, 96),
                matches: matches(&[
                    ("Melanoma", 0.93, true),
                    ("Melanocytic nevus", 0.9, true),
                    ("Melanoma", 0.88, true),
                    ("Melanocytic nevus", 0.84, false),
                    ("Benign keratosis", 0.8, true),
                ]),
                prediction: Some(PredictionView {
                    diagnosis: "Melanocytic nevus".to_owned(),
                    probability: 0.55,
                }),
                fleet: None,
                review: true,
                no_close_match: false,
            }),
        ),
        (
            "results_no_close_match",
            online.clone(),
            Screen::Results(ResultsView {
                query: synthetic_lesion(5, 96, 96),
                matches: matches(&[
                    ("Benign keratosis", 0.41, true),
                    ("Melanocytic nevus", 0.38, true),
                    ("Dermatofibroma", 0.35, true),
                ]),
                prediction: Some(PredictionView {
                    diagnosis: "Benign keratosis".to_owned(),
                    probability: 0.37,
                }),
                fleet: None,
                review: false,
                no_close_match: true,
            }),
        ),
        (
            "results_review_far_fleet",
            status(SyncState::Online, 1, Some((11, 2))),
            Screen::Results(ResultsView {
                query: synthetic_lesion(6, 96, 96),
                matches: matches(&[
                    ("Melanoma", 0.44, true),
                    ("Melanocytic nevus", 0.42, true),
                    ("Melanoma", 0.4, false),
                    ("Benign keratosis", 0.39, true),
                ]),
                prediction: Some(PredictionView {
                    diagnosis: "Melanoma".to_owned(),
                    probability: 0.46,
                }),
                fleet: Some(FleetView {
                    differential: vec!["Melanoma".to_owned(), "Melanocytic nevus".to_owned()],
                    source: FleetSource::Model,
                }),
                review: true,
                no_close_match: true,
            }),
        ),
        (
            "updating",
            status(SyncState::Online, 0, None),
            Screen::Updating {
                title: "Installing update 12".to_owned(),
                detail: "Re-embedding the case library for the new model".to_owned(),
                done: 1375,
                total: 4000,
            },
        ),
        (
            "error",
            online,
            Screen::Error {
                title: "Case library unavailable".to_owned(),
                what_to_fix: "The storage card could not be read. Restart the device; if this \
                              repeats, contact support."
                    .to_owned(),
            },
        ),
    ]
}
