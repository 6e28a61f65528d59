//! What the daemon tests of `trouble.rs` and `with_adapter.rs` share: the
//! host stand-ins wired into a `Daemon`, a trigger that waits for screens
//! instead of wall-clock delays, and the screen pixels a view model draws.

#![allow(dead_code)] // each test file uses its own part

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dermascope_device::{
    Display, Frame, FrameSource, InMemoryDisplay, LoggingLight, PresentedScreens, ReplaySource,
    Trigger, TriggerError, TriggerEvent,
};
use dermascope_encoder::{Encoder, EncoderOptions};
use dermascope_pipeline::{Analyzer, CameraFeed, Daemon};
use dermascope_store::{Case, CaseId, CaseMetadata, CaseSource, Diagnosis};
use dermascope_ui::{Canvas, Screen, StatusView, SyncState, STATUS_BAR_HEIGHT};
use image::{Rgb, RgbImage};

pub const WIDTH: u32 = 320;
pub const HEIGHT: u32 = 240;

/// Watchdog for a screen the test waits for: far above the few hundred
/// milliseconds it takes, only there so a broken daemon fails instead of
/// hanging the suite.
pub const SCREEN_WATCHDOG: Duration = Duration::from_secs(60);

pub fn encoder() -> Encoder {
    Encoder::load(
        &dermascope_testkit::bundle_dir(),
        &EncoderOptions::default(),
    )
    .unwrap()
}

/// A sharp pigmented blob on skin, which the default quality gate accepts;
/// `pigment` colours the blob so that classes can differ.
pub fn lesion(seed: u32, pigment: [f32; 3]) -> RgbImage {
    let cx = 160.0 + (seed % 5) as f32 * 6.0;
    let cy = 120.0 + (seed % 3) as f32 * 5.0;
    RgbImage::from_fn(WIDTH, HEIGHT, |x, y| {
        let dx = x as f32 - cx;
        let dy = y as f32 - cy;
        let d = (dx * dx + dy * dy).sqrt();
        // A speckled, irregular border gives the gate fine detail to see.
        let speckle = ((x * 7 + y * 13 + seed) % 17) as f32 * 3.0;
        if d < 55.0 + 8.0 * (dx.atan2(dy) * 5.0).sin() {
            Rgb([
                (pigment[0] + speckle) as u8,
                (pigment[1] + speckle) as u8,
                (pigment[2] + speckle / 2.0) as u8,
            ])
        } else {
            Rgb([
                220,
                (165.0 + speckle / 3.0) as u8,
                (145.0 + speckle / 4.0) as u8,
            ])
        }
    })
}

pub const BROWN: [f32; 3] = [90.0, 50.0, 35.0];

/// A reference case of `photo` as `encoder` embeds it.
pub fn reference_case(id: &str, code: &str, photo: &RgbImage, encoder: &Encoder) -> Case {
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
        .encode_image(&image::imageops::thumbnail(photo, 96, 72))
        .unwrap();
    Case {
        id: CaseId::new(id).unwrap(),
        embedding: encoder.embed_rgb(photo).unwrap().into_values(),
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
    }
}

/// A replay folder holding only `photo`, so every frame of a burst is it.
pub fn replay_of(dir: &Path, photo: &RgbImage) {
    std::fs::create_dir_all(dir).unwrap();
    photo.save(dir.join("frame.png")).unwrap();
}

/// The camera thread over a replay folder at 30 fps.
pub fn replay_feed(folder: &Path) -> CameraFeed {
    let source = ReplaySource::open(folder, 30.0).unwrap();
    CameraFeed::start(Box::new(source) as Box<dyn FrameSource>).unwrap()
}

/// The frame a replay of `folder` delivers, as the daemon's burst gets it.
pub fn replayed_frame(folder: &Path) -> Arc<Frame> {
    let mut source = ReplaySource::open(folder, 30.0).unwrap();
    Arc::new(source.next_frame().unwrap())
}

/// The daemon on the host stand-ins, with an in-memory 320x240 screen.
pub fn host_daemon(
    analyzer: Arc<Analyzer>,
    feed: CameraFeed,
    trigger: Box<dyn Trigger>,
    display: InMemoryDisplay,
) -> Daemon {
    Daemon {
        analyzer,
        feed,
        trigger,
        light: Box::new(LoggingLight::new()),
        display: Box::new(display) as Box<dyn Display>,
        capture_mode: dermascope_pipeline::CaptureMode::Burst,
        burst: 3,
        // Watchdog for the burst: 3 frames at 30 fps take 0.1 s.
        camera_timeout: Duration::from_secs(10),
        live_view: Duration::ZERO,
        cases: dermascope_pipeline::CaseSettings::default(),
        notice: None,
        storage_failed: false,
        fleet: None,
        updates: None,
        retrainer: None,
    }
}

/// One step of a [`StepTrigger`] script.
pub enum Step {
    /// Deliver this event.
    Press(TriggerEvent),
    /// Deliver nothing until the display has shown a screen after the last
    /// delivered event (failing the run after [`SCREEN_WATCHDOG`]).
    AwaitScreen(&'static str),
    /// The same for this many screens after the last delivered event (a
    /// confirmation shows "saving" at once, then what the writer reported).
    AwaitScreens(&'static str, u64),
    /// Keep the screen shown now in this slot, for the test to look at
    /// after the run (later screens replace it on the display).
    Keep(Arc<std::sync::Mutex<Option<dermascope_device::Screen>>>),
}

/// A scripted button that can wait for the daemon to show something, so a
/// test orders its events after what happens on other threads (the case
/// writer) without sleeping for a guessed time.
pub struct StepTrigger {
    steps: VecDeque<Step>,
    presented: PresentedScreens,
    /// Screens shown when the last event was delivered.
    shown_at_last_event: u64,
    waiting_since: Option<Instant>,
}

impl StepTrigger {
    pub fn new(steps: Vec<Step>, presented: PresentedScreens) -> Self {
        Self {
            steps: steps.into(),
            shown_at_last_event: presented.count(),
            presented,
            waiting_since: None,
        }
    }
}

impl Trigger for StepTrigger {
    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, TriggerError> {
        loop {
            match self.steps.front() {
                None => {
                    std::thread::sleep(timeout);
                    return Ok(None);
                }
                Some(Step::Press(_)) => {
                    let Some(Step::Press(event)) = self.steps.pop_front() else {
                        unreachable!()
                    };
                    self.shown_at_last_event = self.presented.count();
                    return Ok(Some(event));
                }
                Some(Step::Keep(slot)) => {
                    if let Ok(mut slot) = slot.lock() {
                        *slot = self.presented.last();
                    }
                    self.steps.pop_front();
                    continue;
                }
                Some(Step::AwaitScreen(what)) | Some(Step::AwaitScreens(what, _)) => {
                    let wanted = match self.steps.front() {
                        Some(Step::AwaitScreens(_, n)) => *n,
                        _ => 1,
                    };
                    let what = *what;
                    if self.presented.count() >= self.shown_at_last_event + wanted {
                        self.steps.pop_front();
                        self.waiting_since = None;
                        continue;
                    }
                    let since = *self.waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > SCREEN_WATCHDOG {
                        return Err(TriggerError::Closed {
                            reason: format!(
                                "watchdog: no {what} screen within {SCREEN_WATCHDOG:?}"
                            ),
                        });
                    }
                    // Back to the loop, which looks at the case writer each tick.
                    std::thread::sleep(timeout.min(Duration::from_millis(10)));
                    return Ok(None);
                }
            }
        }
    }
}

/// The pixels below the status bar that `screen` draws at 320x240: what
/// the clinician reads, without the counts the status bar adds.
pub fn body_pixels(screen: &Screen) -> Vec<u8> {
    let mut canvas = Canvas::new(WIDTH, HEIGHT).unwrap();
    let status = StatusView {
        sync: SyncState::Offline,
        pending_uploads: 0,
        cases_in_library: 0,
        clock: None,
        last_sync_minutes: None,
    };
    dermascope_ui::render(&mut canvas, &status, screen).unwrap();
    body_of(canvas.pixels())
}

/// The part of a presented 320x240 frame below the status bar.
pub fn body_of(rgb: &[u8]) -> Vec<u8> {
    rgb[(STATUS_BAR_HEIGHT * WIDTH * 3) as usize..].to_vec()
}

/// Writes `rgb` (320x240) as a PNG under `$DERMASCOPE_TEST_SCREENS`, when
/// set, so a person can look at what a test saw.
pub fn keep_screen(name: &str, rgb: &[u8]) {
    if let Some(dir) = std::env::var_os("DERMASCOPE_TEST_SCREENS") {
        let image = RgbImage::from_raw(WIDTH, HEIGHT, rgb.to_vec()).unwrap();
        image
            .save(Path::new(&dir).join(format!("{name}.png")))
            .unwrap();
    }
}
