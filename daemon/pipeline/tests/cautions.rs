//! The melanoma review flag and "no close match" on the results screen
//! (issue 17 parts 4 and 5): with the calibration an adapter's manifest
//! carries, the daemon flags a capture whose combined melanoma score
//! reaches the clinic's threshold and says "no close match" when the best
//! match is below the no-match rule, and draws each beside the matches.
//!
//! The real encoder, a real store, an adapter trained here on a synthetic
//! library and the host stand-ins. The thresholds are the test's, written
//! into the adapter's manifest with `record_calibration` exactly at (and
//! just past) the score and similarity the capture has, so a daemon that
//! compared anything else than the combined score of its own capture, or
//! the best match's similarity, would draw the wrong screen.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use dermascope_adapter::{
    record_calibration, save, train, Adapter, Calibration, LabelledEmbedding, NoMatchRule,
    OperatingPoint, TrainingConfig,
};
use dermascope_device::{InMemoryDisplay, TriggerEvent};
use dermascope_encoder::Encoder;
use dermascope_library::evaluation::COMBINED_K;
use dermascope_library::{combined_probabilities, melanoma_score, Neighbour};
use dermascope_pipeline::{index_adapter_space, Analyzer, NoSupervisor, StageTimings};
use dermascope_quality::QualityThresholds;
use dermascope_store::{Case, CaseFilter, CaseStore, ScoreKind, StoreIdentity};
use dermascope_ui::{ResultsView, Screen};
use image::RgbImage;
use support::{
    body_of, body_pixels, encoder, host_daemon, keep_screen, lesion, reference_case, replay_feed,
    replay_of, replayed_frame, Step, StepTrigger, HEIGHT, WIDTH,
};

/// Three synthetic "diagnoses" the adapter can tell apart by pigment.
const CLASSES: [(&str, [f32; 3]); 3] = [
    ("nv", [120.0, 70.0, 40.0]),
    ("mel", [35.0, 25.0, 30.0]),
    ("vasc", [170.0, 30.0, 50.0]),
];
const PER_CLASS: u32 = 8;
/// Look-alikes of the near query in the library, half of each label.
const AMBIGUOUS: u32 = 8;
const TOP_K: usize = 5;
/// How the analyzer scores raw-space matches here.
const RAW_SCORE: ScoreKind = ScoreKind::Int8;

/// The near query's pigment: between the nevus and the melanoma ones.
const NEAR_PIGMENT: [f32; 3] = [78.0, 48.0, 35.0];

/// Pigments none of the library's cases has: the far query is the
/// farthest of them that the quality gate accepts.
const FAR_PIGMENTS: [[f32; 3]; 3] = [
    [40.0, 150.0, 190.0],
    [60.0, 140.0, 60.0],
    [200.0, 190.0, 40.0],
];

struct Rig {
    _dir: tempfile::TempDir,
    encoder: Encoder,
    store: Arc<CaseStore>,
    adapter_dir: PathBuf,
    adapter_id: String,
    near: PathBuf,
}

/// The library, an adapter trained on it with its adapter space indexed,
/// and a replay folder of a capture near the library's melanomas.
fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let encoder = encoder();
    let store = Arc::new(
        CaseStore::open(
            dir.path().join("store"),
            StoreIdentity {
                model_id: encoder.model_id().to_string(),
                embedding_dim: encoder.dim(),
            },
        )
        .unwrap(),
    );
    let mut cases: Vec<Case> = Vec::new();
    for (class, (code, pigment)) in CLASSES.iter().enumerate() {
        for i in 0..PER_CLASS {
            let photo = lesion(i * 3 + class as u32, *pigment);
            cases.push(reference_case(
                &format!("ref-{code}-{i}"),
                code,
                &photo,
                &encoder,
            ));
        }
    }
    // Lesions of the near query's pigment under both labels, as a real
    // library holds look-alikes of either diagnosis: its neighbours then
    // vote for both, and the vote depends on how many of them count.
    for i in 0..AMBIGUOUS {
        let code = if i % 2 == 0 { "mel" } else { "nv" };
        let photo = lesion(200 + i, NEAR_PIGMENT);
        cases.push(reference_case(
            &format!("ambiguous-{code}-{i}"),
            code,
            &photo,
            &encoder,
        ));
    }
    store.insert_batch(&cases).unwrap();
    let examples: Vec<LabelledEmbedding> = cases
        .iter()
        .map(|c| LabelledEmbedding {
            embedding: c.embedding.clone(),
            label: c.diagnosis.code.clone(),
            model_id: c.model_id.clone(),
            lesion: c.id.to_string(),
        })
        .collect();
    let (train_set, validation): (Vec<_>, Vec<_>) =
        examples.iter().enumerate().partition(|(i, _)| i % 4 != 3);
    let train_set: Vec<&LabelledEmbedding> = train_set.into_iter().map(|(_, e)| e).collect();
    let validation: Vec<&LabelledEmbedding> = validation.into_iter().map(|(_, e)| e).collect();
    let config = TrainingConfig {
        hidden: 32,
        max_epochs: 20,
        learning_rate: 1e-3,
        ..TrainingConfig::default()
    };
    let trained = train(&train_set, &validation, &config).unwrap();
    let adapter_dir = dir.path().join("adapter");
    save(&trained, config.seed, &adapter_dir).unwrap();
    let adapter = Adapter::load(&adapter_dir, encoder.model_id(), encoder.dim()).unwrap();
    assert!(
        adapter.manifest().calibration.is_none(),
        "a fresh adapter must start without rules for this test to set them"
    );
    index_adapter_space(&store, &adapter).unwrap();
    let near = dir.path().join("near");
    // Between the nevus and the melanoma pigments, so that neither the
    // adapter nor the neighbours are unanimous.
    replay_of(&near, &lesion(101, NEAR_PIGMENT));
    Rig {
        adapter_id: adapter.adapter_id().to_string(),
        encoder,
        _dir: dir,
        store,
        adapter_dir,
        near,
    }
}

impl Rig {
    /// The adapter as installed, after writing `calibration` into its
    /// manifest (`None`: a manifest without the section).
    fn adapter_with(&self, calibration: Option<Calibration>) -> Adapter {
        if let Some(calibration) = calibration {
            record_calibration(&self.adapter_dir, &self.adapter_id, calibration).unwrap();
        }
        Adapter::load(
            &self.adapter_dir,
            self.encoder.model_id(),
            self.encoder.dim(),
        )
        .unwrap()
    }

    fn analyzer(&self, adapter: Adapter) -> Arc<Analyzer> {
        Arc::new(Analyzer {
            encoder: encoder(),
            adapter: Some(adapter).into(),
            store: Arc::clone(&self.store),
            thresholds: QualityThresholds::default(),
            top_k: TOP_K,
            raw_score: RAW_SCORE,
        })
    }

    /// What the capture of `replay` measures in the adapter's space: the
    /// combined melanoma score (the library's one definition, over the
    /// `COMBINED_K` nearest cases) and the best match's similarity; and the
    /// best match's similarity in the raw space.
    fn measure(&self, adapter: &Adapter, replay: &Path) -> Measured {
        let frame = replayed_frame(replay);
        let photo = RgbImage::from_raw(frame.width, frame.height, frame.rgb.clone()).unwrap();
        let embedding = self.encoder.embed_rgb(&photo).unwrap().into_values();
        let out = adapter.predict(&embedding).unwrap();
        let hits = self
            .store
            .search_adapter_space(&out.embedding, COMBINED_K, &CaseFilter::any())
            .unwrap();
        let neighbours: Vec<Neighbour> = hits
            .iter()
            .map(|h| Neighbour {
                label: self.store.get(&h.id).unwrap().unwrap().diagnosis.code,
                similarity: h.score,
            })
            .collect();
        let score_of = |k: usize| {
            let combined = combined_probabilities(&out, &neighbours, adapter.classes(), k);
            melanoma_score(adapter.classes(), &combined).expect("a melanoma class")
        };
        let mel = adapter.classes().iter().position(|c| c == "mel").unwrap();
        let raw_top1 = self
            .store
            .search(&embedding, 1, &CaseFilter::any(), RAW_SCORE)
            .unwrap()[0]
            .score;
        Measured {
            score: score_of(COMBINED_K),
            listed_vote: score_of(TOP_K),
            adapter_alone: f64::from(out.probabilities[mel]),
            top1: hits[0].score,
            raw_top1,
        }
    }
}

/// What one capture measures in the adapter's space.
struct Measured {
    /// The combined melanoma score over the `COMBINED_K` nearest cases.
    score: f64,
    /// The same with a vote of the listed matches only.
    listed_vote: f64,
    /// The adapter's own melanoma probability.
    adapter_alone: f64,
    /// The best match's similarity.
    top1: f32,
    /// The best match's similarity in the raw space, scored as the
    /// analyzer scores it.
    raw_top1: f32,
}

fn point(threshold: f64) -> OperatingPoint {
    OperatingPoint {
        class: "mel".into(),
        target_sensitivity: 0.95,
        threshold,
        sensitivity: 0.95,
        specificity: 0.5,
        validation_positives: 2,
        validation_negatives: 4,
    }
}

fn rule(min_top1_similarity: f32) -> NoMatchRule {
    NoMatchRule {
        quantile: 0.02,
        min_top1_similarity,
        min_top1_raw_similarity: None,
        space_quantile: None,
        validation_rate: None,
        validation_queries: 6,
    }
}

/// The rule of both spaces, as `calibrate` writes it.
fn rule_of_both(min_top1_similarity: f32, min_top1_raw_similarity: f32) -> NoMatchRule {
    NoMatchRule {
        min_top1_raw_similarity: Some(min_top1_raw_similarity),
        space_quantile: Some(0.012),
        validation_rate: Some(0.02),
        ..rule(min_top1_similarity)
    }
}

/// The log of a run, as the daemon's tracing writes it.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One press of the daemon over `replay`: the view model the analyzer
/// gives that frame, the results screen the display showed, and the log.
fn press(analyzer: Arc<Analyzer>, replay: &Path, name: &str) -> (ResultsView, Vec<u8>, String) {
    let answer = analyzer.analyse(&[replayed_frame(replay)], &mut StageTimings::default());
    let Screen::Results(view) = answer.screen else {
        panic!(
            "{name}: the photograph was not answered: {:?}",
            answer.screen
        );
    };
    let display = InMemoryDisplay::new(WIDTH, HEIGHT);
    let kept = Arc::new(Mutex::new(None));
    let trigger = StepTrigger::new(
        vec![
            Step::Press(TriggerEvent::Capture),
            Step::AwaitScreens("capturing, then results", 2),
            Step::Keep(Arc::clone(&kept)),
            Step::Press(TriggerEvent::Shutdown),
        ],
        display.presented(),
    );
    let daemon = host_daemon(analyzer, replay_feed(replay), Box::new(trigger), display);
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The loop, which analyses the capture, runs on this thread.
    let summary = tracing::subscriber::with_default(subscriber, || {
        daemon.run(&AtomicBool::new(false), &NoSupervisor, None)
    })
    .unwrap();
    let screens: Vec<&str> = summary.screens.iter().map(String::as_str).collect();
    let results = format!("results:{TOP_K}");
    assert_eq!(
        screens[..3],
        ["ready", "capturing", results.as_str()],
        "{name}"
    );
    let shown = kept.lock().unwrap().clone().expect("the results were kept");
    keep_screen(name, &shown.rgb);
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    (view, body_of(&shown.rgb), log)
}

/// The same view with the two cautions set otherwise.
fn with_cautions(view: &ResultsView, review: bool, no_close_match: bool) -> Screen {
    Screen::Results(ResultsView {
        review,
        no_close_match,
        ..view.clone()
    })
}

const FLAG_LINE: &str = "capture flagged for review";
const FAR_LINE: &str = "no close match in the library";

#[test]
fn the_review_flag_and_no_close_match_follow_the_manifests_thresholds() {
    let rig = rig();
    let plain = rig.adapter_with(None);
    let near = rig.measure(&plain, &rig.near);
    let (score, top1) = (near.score, near.top1);
    // The thresholds below sit exactly at this score: they tell it apart
    // from a vote of only the listed matches, or the adapter alone.
    assert!(
        score != near.listed_vote && score != near.adapter_alone,
        "precondition: the combined score ({score}) must differ from the {TOP_K}-vote ({}) and \
         the adapter's ({})",
        near.listed_vote,
        near.adapter_alone
    );

    // Without the calibration neither is shown, and nothing else changes.
    let view = {
        let analyzer = rig.analyzer(plain);
        let answer = analyzer.analyse(&[replayed_frame(&rig.near)], &mut StageTimings::default());
        let Screen::Results(view) = answer.screen else {
            panic!("not answered: {:?}", answer.screen);
        };
        view
    };
    assert!(!view.review && !view.no_close_match, "{view:?}");
    assert_eq!(view.matches.len(), TOP_K);

    // The threshold at the capture's own score: crossed (>=). The rule at
    // its best match's similarity: still a close match.
    let adapter = rig.adapter_with(Some(Calibration {
        melanoma: Some(point(score)),
        no_match: Some(rule(top1)),
    }));
    let (view, shown, log) = press(rig.analyzer(adapter), &rig.near, "cautions-review");
    assert!(view.review, "a score at the threshold must be flagged");
    assert!(!view.no_close_match, "a best match at the rule is close");
    assert_eq!(
        view.matches.len(),
        TOP_K,
        "the matches stay beside the flag"
    );
    assert!(
        shown == body_pixels(&Screen::Results(view.clone())),
        "the screen shown is not the analysed one"
    );
    assert!(
        shown != body_pixels(&with_cautions(&view, false, false)),
        "the review flag is not visible"
    );
    assert!(log.contains(FLAG_LINE), "no log line for the flag:\n{log}");
    assert!(!log.contains(FAR_LINE), "{log}");

    // A threshold just above the score: not flagged, nothing drawn for it.
    let adapter = rig.adapter_with(Some(Calibration {
        melanoma: Some(point(score + 1e-9)),
        no_match: Some(rule(top1)),
    }));
    let (view, shown, log) = press(rig.analyzer(adapter), &rig.near, "cautions-below");
    assert!(!view.review && !view.no_close_match, "{view:?}");
    assert!(shown == body_pixels(&Screen::Results(view.clone())));
    assert!(shown != body_pixels(&with_cautions(&view, true, false)));
    assert!(!log.contains(FLAG_LINE), "a flag was logged:\n{log}");

    // A far query: a pigment the library lacks, its best match below a
    // rule the near capture passes.
    let far_dir = rig.adapter_dir.with_file_name("far");
    let gate = QualityThresholds::default();
    let (far_top1, far_pigment) = FAR_PIGMENTS
        .iter()
        .filter_map(|pigment| {
            let photo = lesion(7, *pigment);
            let frame = dermascope_quality::Frame::new(WIDTH, HEIGHT, photo.as_raw()).ok()?;
            let report = dermascope_quality::assess_burst(&[frame], &gate);
            dermascope_quality::sharpest_accepted(&report)?;
            replay_of(&far_dir, &photo);
            Some((
                rig.measure(&rig.adapter_with(None), &far_dir).top1,
                *pigment,
            ))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .expect("a far photograph the quality gate accepts");
    assert!(
        far_top1 < top1 - 0.01,
        "precondition: the far query ({far_top1}) must be farther than the near one ({top1})"
    );
    replay_of(&far_dir, &lesion(7, far_pigment));
    let between = (far_top1 + top1) / 2.0;
    let adapter = rig.adapter_with(Some(Calibration {
        // Never crossed: a combined score is at most 1.
        melanoma: Some(point(2.0)),
        no_match: Some(rule(between)),
    }));
    let (view, shown, log) = press(rig.analyzer(adapter), &far_dir, "cautions-far");
    assert!(view.no_close_match && !view.review, "{view:?}");
    assert_eq!(view.matches.len(), TOP_K, "far matches stay listed");
    assert!(shown == body_pixels(&Screen::Results(view.clone())));
    assert!(
        shown != body_pixels(&with_cautions(&view, false, false)),
        "\"no close match\" is not visible"
    );
    assert!(
        log.contains(FAR_LINE),
        "no log line for no close match:\n{log}"
    );
    // The log says that the rule fired, never how far the capture was.
    assert!(!log.contains(&far_top1.to_string()), "{log}");
    assert!(!log.contains(FLAG_LINE), "{log}");

    // The same rule keeps the near capture a close match.
    let adapter = rig.adapter_with(None);
    let analyzer = rig.analyzer(adapter);
    let answer = analyzer.analyse(&[replayed_frame(&rig.near)], &mut StageTimings::default());
    let Screen::Results(view) = answer.screen else {
        panic!("not answered: {:?}", answer.screen);
    };
    assert!(!view.no_close_match, "{view:?}");
}

#[test]
fn no_close_match_fires_on_the_raw_space_alone() {
    // A photograph the adapter maps close to a class (here the near
    // capture, whose adapter-space match passes its threshold) but whose
    // raw-space best match is below the raw threshold: far.
    let rig = rig();
    let near = rig.measure(&rig.adapter_with(None), &rig.near);
    let adapter = rig.adapter_with(Some(Calibration {
        melanoma: Some(point(2.0)),
        no_match: Some(rule_of_both(near.top1, near.raw_top1)),
    }));
    let (view, _, log) = press(rig.analyzer(adapter), &rig.near, "cautions-raw-close");
    assert!(
        !view.no_close_match,
        "both best matches at their thresholds are close: {view:?}"
    );
    assert!(!log.contains(FAR_LINE), "{log}");

    let adapter = rig.adapter_with(Some(Calibration {
        melanoma: Some(point(2.0)),
        no_match: Some(rule_of_both(near.top1, near.raw_top1 + 1e-4)),
    }));
    let (view, shown, log) = press(rig.analyzer(adapter), &rig.near, "cautions-raw-far");
    assert!(
        view.no_close_match && !view.review,
        "a raw best match below the raw threshold is far, whatever the adapter's space says: \
         {view:?}"
    );
    assert_eq!(view.matches.len(), TOP_K, "far matches stay listed");
    assert!(shown == body_pixels(&Screen::Results(view.clone())));
    assert!(log.contains(FAR_LINE), "{log}");
    assert!(log.contains("raw space"), "the log says which space: {log}");
    assert!(!log.contains(&near.raw_top1.to_string()), "{log}");
}
