//! The daemon with an adapter installed (README: "`search` and the daemon
//! then search that space and show the adapter's suggestion"; ARCHITECTURE:
//! the case writer "stores confirmed captures (and their adapter
//! embeddings)"). An adapter trained here on a synthetic library, the real
//! encoder, a real store and the host stand-ins.

mod support;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use dermascope_adapter::{save, train, Adapter, LabelledEmbedding, TrainingConfig};
use dermascope_device::{InMemoryDisplay, TriggerEvent};
use dermascope_pipeline::{analysis::display_name, index_adapter_space, Analyzer, NoSupervisor};
use dermascope_pipeline::{CapturedLesion, StageTimings};
use dermascope_quality::QualityThresholds;
use dermascope_store::{Case, CaseFilter, CaseSource, CaseStore, ScoreKind, StoreIdentity};
use dermascope_ui::{PredictionView, Screen};
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

#[test]
fn the_adapter_suggests_on_screen_and_its_embedding_is_stored_with_the_capture() {
    let dir = tempfile::tempdir().unwrap();
    let encoder = encoder();
    let store_dir = dir.path().join("store");
    let identity = StoreIdentity {
        model_id: encoder.model_id().to_string(),
        embedding_dim: encoder.dim(),
    };
    let store = Arc::new(CaseStore::open(&store_dir, identity.clone()).unwrap());
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
    store.insert_batch(&cases).unwrap();

    // Every fourth case validates; each case is its own lesion.
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
    let computed = index_adapter_space(&store, &adapter).unwrap();
    assert_eq!(computed, cases.len());
    let adapter_id = adapter.adapter_id().to_string();
    let hidden = adapter.hidden();

    // What the adapter says about the photograph the camera will show.
    let replay = dir.path().join("replay");
    replay_of(&replay, &lesion(101, CLASSES[1].1));
    let frame = replayed_frame(&replay);
    let photo = RgbImage::from_raw(frame.width, frame.height, frame.rgb.clone()).unwrap();
    let verdict = adapter
        .predict(&encoder.embed_rgb(&photo).unwrap().into_values())
        .unwrap();
    let suggestion = PredictionView {
        diagnosis: display_name(&adapter.classes()[verdict.predicted]),
        probability: verdict.probabilities[verdict.predicted],
    };

    let analyzer = Arc::new(Analyzer {
        encoder,
        adapter: Some(adapter).into(),
        store: Arc::clone(&store),
        thresholds: QualityThresholds::default(),
        top_k: 5,
        raw_score: ScoreKind::Int8,
    });
    // The view model of the answer, before the capture joins the library.
    let answer = analyzer.analyse(&[Arc::clone(&frame)], &mut StageTimings::default());
    let Screen::Results(results) = &answer.screen else {
        panic!("the photograph was not answered: {:?}", answer.screen);
    };
    assert_eq!(results.prediction.as_ref(), Some(&suggestion));
    assert_eq!(results.matches.len(), 5);
    let CapturedLesion {
        adapter_embedding, ..
    } = answer
        .capture
        .expect("an answered capture can be confirmed");
    let adapter_embedding = adapter_embedding.expect("the adapter ran");
    assert_eq!(adapter_embedding, verdict.embedding);

    let display = InMemoryDisplay::new(WIDTH, HEIGHT);
    let presented = display.presented();
    let results_shown = Arc::new(std::sync::Mutex::new(None));
    let trigger = StepTrigger::new(
        vec![
            Step::Press(TriggerEvent::Capture),
            Step::AwaitScreens("capturing, then results", 2),
            Step::Keep(Arc::clone(&results_shown)),
            Step::Press(TriggerEvent::Confirm {
                label: Some("mel".into()),
            }),
            Step::Press(TriggerEvent::Shutdown),
        ],
        presented.clone(),
    );
    let daemon = host_daemon(
        Arc::clone(&analyzer),
        replay_feed(&replay),
        Box::new(trigger),
        display,
    );
    let summary = daemon
        .run(&AtomicBool::new(false), &NoSupervisor, None)
        .unwrap();
    let screens: Vec<&str> = summary.screens.iter().map(String::as_str).collect();
    assert_eq!(
        screens[..4],
        ["ready", "capturing", "results:5", "ready:saving"]
    );
    assert_eq!((summary.confirmed, summary.saved), (1, 1));

    // The results screen shown is the adapter's answer, suggestion drawn:
    // the same view without it gives other pixels.
    let results_shown = results_shown
        .lock()
        .unwrap()
        .clone()
        .expect("the results screen was kept");
    let shown = body_of(&results_shown.rgb);
    keep_screen("results-with-adapter", &results_shown.rgb);
    assert!(
        shown == body_pixels(&answer.screen),
        "the results screen shown is not the adapter's answer"
    );
    let mut unsuggested = results.clone();
    unsuggested.prediction = None;
    assert!(
        shown != body_pixels(&Screen::Results(unsuggested)),
        "the suggestion is not visible on the results screen"
    );

    // `run` flushed the capture and its adapter embedding before returning;
    // a fresh open of the store finds both.
    drop(analyzer);
    drop(store);
    let store = CaseStore::open(&store_dir, identity).unwrap();
    let captured: Vec<Case> = store
        .cases()
        .map(Result::unwrap)
        .filter(|c| c.source == CaseSource::Captured)
        .collect();
    assert_eq!(captured.len(), 1);
    let capture = &captured[0];
    assert!(capture.diagnosis.code == "mel" && capture.label_confirmed);
    let space = store.attach_adapter_space(&adapter_id, hidden).unwrap();
    assert!(
        space.missing.is_empty(),
        "cases without an adapter embedding: {:?}",
        space.missing
    );
    assert_eq!(space.indexed, cases.len() + 1);
    let hits = store
        .search_adapter_space(&adapter_embedding, cases.len() + 1, &CaseFilter::any())
        .unwrap();
    let own = hits
        .iter()
        .find(|h| h.id == capture.id)
        .expect("the capture is in the adapter space");
    // Both vectors are unit length: a cosine of 1 means the stored row is
    // the capture's adapter embedding.
    assert!(
        (own.score - 1.0).abs() < 1e-5,
        "stored adapter embedding differs from the capture's: cosine {}",
        own.score
    );
}
