//! The daemon's loop on the host implementations: a replay camera, a
//! scripted button, an in-memory screen, the real encoder and a real store.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use dermascope_device::{
    Display, FrameSource, InMemoryDisplay, LoggingLight, ReplaySource, ScriptedTrigger,
    TriggerEvent,
};
use dermascope_encoder::{Encoder, EncoderOptions};
use dermascope_pipeline::{hardware, Analyzer, CameraFeed, Config, Daemon, NoSupervisor};
use dermascope_quality::QualityThresholds;
use dermascope_store::{
    Case, CaseId, CaseMetadata, CaseSource, CaseStore, Diagnosis, ScoreKind, StoreIdentity,
};
use image::{Rgb, RgbImage};

fn bundle() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/dist/sklesion-xception");
    assert!(
        dir.join("manifest.toml").is_file(),
        "run models/build first"
    );
    dir
}

/// A sharp pigmented blob on skin, like the quality gate expects a lesion.
fn lesion(seed: u32, blur: f32) -> RgbImage {
    let cx = 160.0 + (seed % 5) as f32 * 6.0;
    let cy = 120.0 + (seed % 3) as f32 * 5.0;
    let image = RgbImage::from_fn(320, 240, |x, y| {
        let dx = x as f32 - cx;
        let dy = y as f32 - cy;
        let d = (dx * dx + dy * dy).sqrt();
        // A speckled, irregular border gives the gate fine detail to see.
        let speckle = ((x * 7 + y * 13 + seed) % 17) as f32 * 3.0;
        if d < 55.0 + 8.0 * (dx.atan2(dy) * 5.0).sin() {
            Rgb([
                (90.0 + speckle) as u8,
                (50.0 + speckle) as u8,
                (35.0 + speckle / 2.0) as u8,
            ])
        } else {
            Rgb([
                220,
                (165.0 + speckle / 3.0) as u8,
                (145.0 + speckle / 4.0) as u8,
            ])
        }
    });
    if blur > 0.0 {
        image::imageops::blur(&image, blur)
    } else {
        image
    }
}

fn write_images(dir: &Path, count: u32, blur: f32) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..count {
        lesion(i, blur)
            .save(dir.join(format!("frame{i:02}.png")))
            .unwrap();
    }
}

/// How similar each library case is to the replayed lesion (`lesion(0, 0.0)`),
/// by construction: far enough apart that int8 scoring keeps the order.
const SIMILARITY: [f32; 6] = [0.95, 0.2, 0.8, 0.6, 0.4, 0.0];

/// `ref-i` ids best first by [`SIMILARITY`]: what top 5 must list.
const EXPECTED_ORDER: [&str; 5] = ["ref-0", "ref-2", "ref-3", "ref-4", "ref-1"];

/// A unit vector with cosine `similarity` to the unit vector `query`: the
/// query scaled, plus a pseudo-random direction orthogonal to it.
fn at_similarity(query: &[f32], similarity: f32, seed: u32) -> Vec<f32> {
    let mut other: Vec<f32> = (0..query.len())
        .map(|j| ((j as f32 + 1.0) * (seed as f32 + 1.7)).sin())
        .collect();
    let along: f32 = other.iter().zip(query).map(|(o, q)| o * q).sum();
    for (o, q) in other.iter_mut().zip(query) {
        *o -= along * q;
    }
    let norm = other.iter().map(|o| o * o).sum::<f32>().sqrt();
    let side = (1.0 - similarity * similarity).sqrt();
    query
        .iter()
        .zip(&other)
        .map(|(q, o)| similarity * q + side * o / norm)
        .collect()
}

/// Six reference cases whose embeddings sit at [`SIMILARITY`] to the
/// encoder's embedding of the replayed lesion, so the right answer to a
/// capture of it is known without trusting the search.
fn library(dir: &Path, encoder: &Encoder) -> Arc<CaseStore> {
    let store = CaseStore::open(
        dir,
        StoreIdentity {
            model_id: encoder.model_id().to_string(),
            embedding_dim: encoder.dim(),
        },
    )
    .unwrap();
    let query = encoder.embed_rgb(&lesion(0, 0.0)).unwrap().into_values();
    let mut cases = Vec::new();
    for (i, code) in ["nv", "mel", "bkl", "nv", "mel", "df"].iter().enumerate() {
        let photo = lesion(i as u32 + 20, 0.0);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
            .encode_image(&image::imageops::thumbnail(&photo, 96, 72))
            .unwrap();
        cases.push(Case {
            id: CaseId::new(format!("ref-{i}")).unwrap(),
            embedding: at_similarity(&query, SIMILARITY[i], i as u32),
            diagnosis: Diagnosis::from_code(code).unwrap(),
            source: CaseSource::Reference,
            metadata: CaseMetadata::default(),
            thumbnail_jpeg: jpeg,
            model_id: encoder.model_id().to_string(),
            created_at_ms: 0,
            updated_at_ms: 0,
            label_confirmed: true,
            device_id: None,
            revision: 1,
        });
    }
    store.insert_batch(&cases).unwrap();
    Arc::new(store)
}

fn daemon(
    feed: CameraFeed,
    store: Arc<CaseStore>,
    encoder: Encoder,
    events: Vec<TriggerEvent>,
) -> (Daemon, dermascope_device::PresentedScreens) {
    let display = InMemoryDisplay::new(320, 240);
    let presented = display.presented();
    let analyzer = Analyzer {
        encoder,
        adapter: None.into(),
        store,
        thresholds: QualityThresholds::default(),
        top_k: 5,
        raw_score: ScoreKind::Int8,
    };
    (
        Daemon {
            analyzer: Arc::new(analyzer),
            feed,
            trigger: Box::new(ScriptedTrigger::new(events)),
            light: Box::new(LoggingLight::new()),
            display: Box::new(display) as Box<dyn Display>,
            capture_mode: dermascope_pipeline::CaptureMode::Burst,
            burst: 3,
            camera_timeout: Duration::from_secs(3),
            live_view: Duration::ZERO,
            cases: dermascope_pipeline::CaseSettings::default(),
            notice: None,
            storage_failed: false,
            fleet: None,
            updates: None,
            retrainer: None,
        },
        presented,
    )
}

/// The camera thread over a folder of photographs at 30 fps.
fn replay_feed(folder: &Path) -> CameraFeed {
    let source = ReplaySource::open(folder, 30.0).unwrap();
    CameraFeed::start(Box::new(source) as Box<dyn FrameSource>).unwrap()
}

fn encoder() -> Encoder {
    Encoder::load(&bundle(), &EncoderOptions::default()).unwrap()
}

#[test]
fn capture_finds_similar_cases_and_a_confirmation_becomes_a_case() {
    let dir = tempfile::tempdir().unwrap();
    // One photograph, so every frame of every burst is the lesion the
    // library was built around.
    write_images(&dir.path().join("replay"), 1, 0.0);
    let encoder = encoder();
    let store = library(&dir.path().join("store"), &encoder);
    let feed = replay_feed(&dir.path().join("replay"));
    let events = vec![
        TriggerEvent::Capture,
        TriggerEvent::Confirm {
            label: Some("mel".into()),
        },
        TriggerEvent::Capture,
        TriggerEvent::Confirm { label: None },
        TriggerEvent::Shutdown,
    ];
    let (daemon, presented) = daemon(feed, Arc::clone(&store), encoder, events);
    let summary = daemon
        .run(&AtomicBool::new(false), &NoSupervisor, None)
        .unwrap();
    assert_eq!(summary.captures, 2, "{:?}", summary.screens);
    assert_eq!(summary.confirmed, 2);
    // Each confirmation says "saving" at once and "saved" once the writer
    // has flushed it, which may come after the next press or after the stop.
    assert_eq!(summary.saved, 2);
    let saved_shown = summary
        .screens
        .iter()
        .filter(|s| *s == "ready:saved")
        .count();
    assert!(saved_shown <= 2, "{:?}", summary.screens);
    let screens: Vec<&str> = summary
        .screens
        .iter()
        .map(String::as_str)
        .filter(|s| *s != "ready:saved")
        .collect();
    assert_eq!(
        screens,
        [
            "ready",
            "capturing",
            "results:5",
            "ready:saving",
            "capturing",
            "results:5",
            "ready:saving"
        ]
    );
    assert!(presented.count() >= 5);
    let last = presented.last().unwrap();
    assert_eq!((last.width, last.height), (320, 240));
    // Both confirmations were flushed before `run` returned.
    let counts = store.counts().unwrap();
    assert_eq!(counts.by_source.get(&CaseSource::Captured), Some(&2));
    // Both wait in the outbox for the fleet sync.
    assert_eq!(store.pending_upload_count(), 2);
    let captured: Vec<Case> = store
        .cases()
        .map(Result::unwrap)
        .filter(|c| c.source == CaseSource::Captured)
        .collect();
    assert!(captured
        .iter()
        .any(|c| c.diagnosis.code == "mel" && c.label_confirmed));
    assert!(captured.iter().any(|c| !c.label_confirmed));

    // The first capture lists the five most similar cases, best first,
    // with their scores (int8 scoring: within 0.02).
    assert_eq!(summary.matches.len(), 2);
    let first: Vec<&str> = summary.matches[0].iter().map(|h| h.id.as_str()).collect();
    assert_eq!(first, EXPECTED_ORDER, "{:?}", summary.matches[0]);
    for hit in &summary.matches[0] {
        let i: usize = hit.id.as_str()["ref-".len()..].parse().unwrap();
        assert!(
            (hit.score - SIMILARITY[i]).abs() < 0.02,
            "{}: {} vs {}",
            hit.id.as_str(),
            hit.score,
            SIMILARITY[i]
        );
    }
    // The second may also find the first capture (the same lesion, so
    // first) if the case writer stored it in time; the references follow
    // in the same order.
    let second = &summary.matches[1];
    let captured_first = second
        .iter()
        .take_while(|h| !h.id.as_str().starts_with("ref-"));
    for hit in captured_first.clone() {
        assert!(hit.score > 0.98, "{second:?}");
    }
    let refs: Vec<&str> = second
        .iter()
        .skip(captured_first.count())
        .map(|h| h.id.as_str())
        .collect();
    assert!(refs.len() >= 4, "{second:?}");
    assert_eq!(refs, EXPECTED_ORDER[..refs.len()], "{second:?}");

    // Every stage of an answered capture ran and was timed, the adapter's
    // (there is none) did not; the stages fit in the total.
    for t in &summary.timings {
        let ran = [
            t.burst_ms,
            t.quality_ms,
            t.encoder_ms,
            t.search_ms,
            t.thumbnails_ms,
            t.render_ms,
            t.present_ms,
        ];
        assert!(ran.iter().all(Option::is_some), "{t:?}");
        assert_eq!(t.adapter_ms, None, "{t:?}");
        let stages: f64 = ran.iter().flatten().sum();
        assert!(stages <= t.total_ms + 1e-6, "{t:?}");
    }
}

#[test]
fn blurred_frames_are_refused_with_the_reason_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    write_images(&dir.path().join("replay"), 3, 6.0);
    let encoder = encoder();
    let store = library(&dir.path().join("store"), &encoder);
    let feed = replay_feed(&dir.path().join("replay"));
    let events = vec![
        TriggerEvent::Capture,
        TriggerEvent::Confirm { label: None },
        TriggerEvent::Shutdown,
    ];
    let (daemon, _) = daemon(feed, Arc::clone(&store), encoder, events);
    let summary = daemon
        .run(&AtomicBool::new(false), &NoSupervisor, None)
        .unwrap();
    assert_eq!(summary.rejected, 1);
    assert_eq!(summary.confirmed, 0);
    assert!(
        summary.screens.iter().any(|s| s == "rejected:Blurry"),
        "{:?}",
        summary.screens
    );
    assert_eq!(store.len().unwrap(), 6);
    assert!(summary.matches.is_empty());
    let t = &summary.timings[0];
    assert!(t.burst_ms.is_some() && t.quality_ms.is_some(), "{t:?}");
    assert_eq!(
        (t.encoder_ms, t.search_ms, t.thumbnails_ms),
        (None, None, None),
        "{t:?}"
    );
    assert!(t.render_ms.is_some() && t.present_ms.is_some(), "{t:?}");
}

/// Drivers whose camera is never there: each open fails as the V4L2 driver
/// does for a missing node (retryable `NotFound`, tested in
/// dermascope-device-linux), so the camera thread keeps trying.
fn absent_camera() -> Arc<dyn hardware::Drivers> {
    use hardware::{Drivers, NoHardware};
    struct AbsentCamera;
    impl Drivers for AbsentCamera {
        fn open_camera(
            &self,
            config: &dermascope_device::CameraConfig,
        ) -> Result<Box<dyn FrameSource>, dermascope_device::CaptureError> {
            Err(dermascope_device::CaptureError::NotFound {
                device: config.device.display().to_string(),
            })
        }
        fn open_buttons(
            &self,
            config: &dermascope_device::ButtonConfig,
        ) -> Result<Box<dyn dermascope_device::Trigger>, dermascope_device::TriggerError> {
            NoHardware.open_buttons(config)
        }
        fn open_light(
            &self,
            pin: u8,
        ) -> Result<Box<dyn dermascope_device::Light>, dermascope_device::LightError> {
            NoHardware.open_light(pin)
        }
        fn open_framebuffer(
            &self,
            device: &Path,
        ) -> Result<Box<dyn Display>, dermascope_device::DisplayError> {
            NoHardware.open_framebuffer(device)
        }
        fn open_spi_panel(
            &self,
            config: &dermascope_device::SpiPanelConfig,
        ) -> Result<Box<dyn Display>, dermascope_device::DisplayError> {
            NoHardware.open_spi_panel(config)
        }
    }
    Arc::new(AbsentCamera)
}

#[test]
fn absent_camera_is_shown_and_retried_while_the_daemon_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let encoder = encoder();
    let store = library(&dir.path().join("store"), &encoder);
    let config = Config::parse(
        "[camera]\nsource = \"v4l2\"\ndevice = \"/dev/video-not-here\"\n",
        Path::new("test.toml"),
    )
    .unwrap();
    let feed = hardware::start_camera(&config, &absent_camera()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let events = vec![TriggerEvent::Capture, TriggerEvent::Shutdown];
    let (mut daemon, _) = daemon(feed, store, encoder, events);
    daemon.camera_timeout = Duration::from_millis(300);
    let summary = daemon
        .run(&AtomicBool::new(false), &NoSupervisor, None)
        .unwrap();
    let screens: Vec<&str> = summary.screens.iter().map(String::as_str).collect();
    assert!(screens.contains(&"rejected:CameraError"), "{screens:?}");
    assert_eq!(summary.captures, 1);
    // No frames came: the burst was waited for, nothing after it ran.
    let t = &summary.timings[0];
    assert!(t.burst_ms.is_some(), "{t:?}");
    assert_eq!((t.quality_ms, t.encoder_ms), (None, None), "{t:?}");
}

#[test]
fn a_folder_of_corrupt_frames_gives_a_camera_problem_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let replay = dir.path().join("replay");
    std::fs::create_dir_all(&replay).unwrap();
    std::fs::write(replay.join("broken.jpg"), [0xFF, 0xD8, 0xFF, 0xE0, 0, 1, 2]).unwrap();
    let encoder = encoder();
    let store = library(&dir.path().join("store"), &encoder);
    let feed = replay_feed(&replay);
    let (mut daemon, _) = daemon(
        feed,
        store,
        encoder,
        vec![TriggerEvent::Capture, TriggerEvent::Shutdown],
    );
    daemon.camera_timeout = Duration::from_millis(500);
    let summary = daemon
        .run(&AtomicBool::new(false), &NoSupervisor, None)
        .unwrap();
    assert!(
        summary.screens.iter().any(|s| s == "rejected:CameraError"),
        "{:?}",
        summary.screens
    );
}

#[test]
fn missing_hardware_says_what_to_change() {
    // A build without the Linux drivers; their own errors for missing
    // hardware are tested in dermascope-device-linux.
    let drivers: Arc<dyn hardware::Drivers> = Arc::new(hardware::NoHardware);
    let gpio = Config::parse("[trigger]\ninput = \"gpio\"\n", Path::new("t.toml")).unwrap();
    let err = hardware::open_trigger(&gpio, &drivers)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("input = \"socket\""), "{err}");

    let fb = Config::parse(
        "[display]\noutput = \"framebuffer\"\nframebuffer = \"/dev/fb-not-here\"\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let err = hardware::open_display(&fb, &drivers)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("fb-not-here") && err.contains("output = \"png\""),
        "{err}"
    );

    let spi = Config::parse("[display]\noutput = \"spi\"\n", Path::new("t.toml")).unwrap();
    let err = hardware::open_display(&spi, &drivers)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("output = \"png\""), "{err}");
}
