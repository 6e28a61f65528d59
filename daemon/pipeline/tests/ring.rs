//! A press chooses from the frames the camera thread already holds: the
//! ring. A scripted camera hands over exactly the frames a test queues,
//! stamped with capture times on a `ManualClock` the test moves, so which
//! frames are "recent", "stale" or "after the press" is decided by the
//! test, never by how fast this machine runs.

mod support;

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dermascope_device::{
    CaptureError, Clock, Frame, FrameSource, InMemoryDisplay, ManualClock, PresentedScreens,
    Trigger, TriggerError, TriggerEvent,
};
use dermascope_pipeline::{
    Analyzer, CameraFeed, CaptureMode, Daemon, FeedOptions, FrameOrigin, NoSupervisor, RunSummary,
};
use dermascope_quality::QualityThresholds;
use dermascope_store::{CaseStore, ScoreKind, StoreIdentity};
use image::RgbImage;
use support::{host_daemon, lesion, reference_case, BROWN};

/// Watchdog for anything the test waits on another thread for: far above
/// the milliseconds it takes, only there so a broken feed fails the test
/// instead of hanging the suite.
const WATCHDOG: Duration = Duration::from_secs(60);

const WINDOW: Duration = Duration::from_millis(150);
const FOLLOW_UP: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Script {
    queue: VecDeque<Result<Frame, CaptureError>>,
    /// Calls of `next_frame` so far: when it is n + 1, the first n queued
    /// items have been handed to the camera thread (and the frames among
    /// them are in its ring, which it fills before asking again).
    asked: u64,
    closed: bool,
}

/// The test's side of a [`ScriptedCamera`].
#[derive(Clone, Default)]
struct Camera(Arc<(Mutex<Script>, Condvar)>);

impl Camera {
    fn push(&self, item: Result<Frame, CaptureError>) {
        let (script, changed) = &*self.0;
        script.lock().unwrap().queue.push_back(item);
        changed.notify_all();
    }

    /// Waits (watchdog [`WATCHDOG`]) until the camera thread has asked for
    /// its `n`th item.
    fn wait_asked(&self, n: u64) {
        let (script, changed) = &*self.0;
        let mut state = script.lock().unwrap();
        let since = Instant::now();
        while state.asked < n {
            assert!(
                since.elapsed() < WATCHDOG,
                "watchdog: the camera thread asked for {} items, not {n}",
                state.asked
            );
            state = changed
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    fn asked(&self) -> u64 {
        self.0 .0.lock().unwrap().asked
    }

    /// Ends the script: the camera thread's next call returns an error that
    /// stops it, so dropping the feed does not wait for a frame.
    fn close(&self) {
        let (script, changed) = &*self.0;
        script.lock().unwrap().closed = true;
        changed.notify_all();
    }

    fn source(&self) -> Box<dyn FrameSource> {
        Box::new(ScriptedCamera(self.clone()))
    }
}

struct ScriptedCamera(Camera);

impl FrameSource for ScriptedCamera {
    fn next_frame(&mut self) -> Result<Frame, CaptureError> {
        let (script, changed) = &*self.0 .0;
        let mut state = script.lock().unwrap();
        state.asked += 1;
        changed.notify_all();
        loop {
            if let Some(item) = state.queue.pop_front() {
                return item;
            }
            if state.closed {
                return Err(CaptureError::Unsupported {
                    device: "scripted camera".into(),
                    reason: "the script ended".into(),
                });
            }
            state = changed.wait(state).unwrap();
        }
    }

    fn describe(&self) -> String {
        "scripted camera".into()
    }
}

/// A frame of `photo` captured `at_ms` after the clock's start.
fn frame(photo: &RgbImage, sequence: u64, clock: &ManualClock, at_ms: u64) -> Frame {
    Frame {
        width: photo.width(),
        height: photo.height(),
        rgb: photo.as_raw().clone(),
        sequence,
        captured_at: clock.start() + Duration::from_millis(at_ms),
    }
}

fn sharp(seed: u32) -> RgbImage {
    lesion(seed, BROWN)
}

/// Blurred far below the default gate's focus threshold.
fn blurry(seed: u32) -> RgbImage {
    image::imageops::blur(&lesion(seed, BROWN), 6.0)
}

/// One step of a [`StepScript`].
enum Step {
    Event(TriggerEvent),
    /// Run on the loop's thread before the next event is delivered.
    Run(Box<dyn FnOnce() + Send>),
}

/// A button whose script can also act (move the clock, wait for frames)
/// between the daemon's calls, on the loop's own thread.
struct StepScript(VecDeque<Step>);

impl Trigger for StepScript {
    fn wait(&mut self, _: Duration) -> Result<Option<TriggerEvent>, TriggerError> {
        loop {
            match self.0.pop_front() {
                Some(Step::Run(action)) => action(),
                Some(Step::Event(event)) => return Ok(Some(event)),
                None => return Ok(Some(TriggerEvent::Shutdown)),
            }
        }
    }
}

struct Rig {
    camera: Camera,
    clock: ManualClock,
    presented: PresentedScreens,
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

/// The daemon in ring mode over a scripted camera whose ring holds
/// `ring_frames`, with a one-case library.
fn rig(ring_frames: usize) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let encoder = support::encoder();
    let store = CaseStore::open(
        dir.path().join("store"),
        StoreIdentity {
            model_id: encoder.model_id().to_string(),
            embedding_dim: encoder.dim(),
        },
    )
    .unwrap();
    store
        .insert_batch(&[reference_case("ref-0", "nv", &sharp(40), &encoder)])
        .unwrap();
    let analyzer = Analyzer {
        encoder,
        adapter: None.into(),
        store: Arc::new(store),
        thresholds: QualityThresholds::default(),
        top_k: 5,
        raw_score: ScoreKind::Int8,
    };
    let camera = Camera::default();
    let clock = ManualClock::new();
    let feed = CameraFeed::start_source(
        camera.source(),
        FeedOptions {
            ring_frames,
            clock: Arc::new(clock.clone()) as Arc<dyn Clock>,
        },
    )
    .unwrap();
    let display = InMemoryDisplay::new(support::WIDTH, support::HEIGHT);
    let presented = display.presented();
    let mut daemon = host_daemon(
        Arc::new(analyzer),
        feed,
        Box::new(StepScript(VecDeque::new())),
        display,
    );
    daemon.capture_mode = CaptureMode::Ring {
        window: WINDOW,
        follow_up: FOLLOW_UP,
    };
    daemon.camera_timeout = WATCHDOG;
    Rig {
        camera,
        clock,
        presented,
        daemon,
        _dir: dir,
    }
}

impl Rig {
    /// One press after the camera thread has taken `delivered` items and
    /// the clock stands at `press_ms`; the daemon's light (and so the
    /// ring's oldest usable frame) came on at the clock's start.
    fn press(self, delivered: u64, press_ms: u64) -> RunSummary {
        let Rig {
            camera,
            clock,
            mut daemon,
            ..
        } = self;
        let (waiting, closing) = (camera.clone(), camera.clone());
        daemon.trigger = Box::new(StepScript(VecDeque::from([
            Step::Run(Box::new(move || waiting.wait_asked(delivered + 1))),
            Step::Run(Box::new(move || {
                clock.advance(Duration::from_millis(press_ms) - clock.elapsed())
            })),
            Step::Event(TriggerEvent::Capture),
            Step::Run(Box::new(move || closing.close())),
            Step::Event(TriggerEvent::Shutdown),
        ])));
        daemon
            .run(&AtomicBool::new(false), &NoSupervisor, None)
            .unwrap()
    }
}

fn chosen(summary: &RunSummary) -> (FrameOrigin, u64, f64) {
    assert_eq!(summary.captures, 1);
    assert_eq!(summary.rejected, 0, "screens: {:?}", summary.screens);
    let frame = summary.timings[0]
        .frame
        .expect("an answered capture names its frame");
    (frame.origin, frame.sequence, frame.age_ms)
}

#[test]
fn a_good_recent_frame_answers_the_press_without_waiting_for_another() {
    let rig = rig(16);
    // Only frame 3 passes the gate; nothing is queued after frame 4, so a
    // capture that waited for a new frame would hang until the watchdog.
    for (sequence, at_ms) in [(1, 0), (2, 33), (3, 66), (4, 100)] {
        let photo = if sequence == 3 {
            sharp(sequence as u32)
        } else {
            blurry(sequence as u32)
        };
        rig.camera
            .push(Ok(frame(&photo, sequence, &rig.clock, at_ms)));
    }
    let camera = rig.camera.clone();
    let summary = rig.press(4, 120);
    let (origin, sequence, age_ms) = chosen(&summary);
    assert_eq!((origin, sequence), (FrameOrigin::Ring, 3));
    assert!((age_ms - 54.0).abs() < 1e-6, "{age_ms}");
    assert!(
        !summary.screens.iter().any(|s| s == "capturing"),
        "{:?}",
        summary.screens
    );
    // The 5th call, blocked until the script closed, delivered nothing.
    assert_eq!(camera.asked(), 5);
}

#[test]
fn a_stale_ring_is_not_used_even_when_its_frames_are_sharp() {
    let rig = rig(16);
    for (sequence, at_ms) in [(1, 0), (2, 33), (3, 66), (4, 100)] {
        rig.camera.push(Ok(frame(
            &sharp(sequence as u32),
            sequence,
            &rig.clock,
            at_ms,
        )));
    }
    // The scope moved: the press comes a second later, and the frames
    // after it (the 4th closes the 100 ms after the press) are what it shows now.
    for (sequence, at_ms) in [(5, 1010), (6, 1040), (7, 1070), (8, 1130)] {
        rig.camera.push(Ok(frame(
            &sharp(sequence as u32),
            sequence,
            &rig.clock,
            at_ms,
        )));
    }
    let summary = rig.press(8, 1000);
    let (origin, sequence, age_ms) = chosen(&summary);
    assert_eq!(origin, FrameOrigin::FollowUp);
    assert!((5..=7).contains(&sequence), "frame {sequence}");
    assert!(age_ms < 0.0, "{age_ms}");
}

#[test]
fn an_all_blurry_ring_falls_back_to_the_frames_after_the_press() {
    let rig = rig(16);
    for (sequence, at_ms) in [(1, 0), (2, 33), (3, 66), (4, 100)] {
        rig.camera.push(Ok(frame(
            &blurry(sequence as u32),
            sequence,
            &rig.clock,
            at_ms,
        )));
    }
    // The frames after the press arrive only once the daemon shows that it
    // waits for them (ready, then capturing): the wait itself is exercised.
    let (camera, clock, presented) = (rig.camera.clone(), rig.clock.clone(), rig.presented.clone());
    let feeder = std::thread::spawn(move || {
        let since = Instant::now();
        while presented.count() < 2 {
            assert!(since.elapsed() < WATCHDOG, "watchdog: no capturing screen");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Frame 7 is sharp too but captured past the 100 ms: it only ends
        // the wait.
        camera.push(Ok(frame(&sharp(5), 5, &clock, 150)));
        camera.push(Ok(frame(&blurry(6), 6, &clock, 180)));
        camera.push(Ok(frame(&sharp(7), 7, &clock, 230)));
    });
    let summary = rig.press(4, 120);
    feeder.join().unwrap();
    let (origin, sequence, age_ms) = chosen(&summary);
    assert_eq!((origin, sequence), (FrameOrigin::FollowUp, 5));
    assert!((age_ms + 30.0).abs() < 1e-6, "{age_ms}");
    assert!(
        summary.screens.iter().any(|s| s == "capturing"),
        "{:?}",
        summary.screens
    );
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_malformed_frame_in_the_ring_is_skipped_with_a_log_line_and_costs_only_itself() {
    let rig = rig(16);
    rig.camera.push(Ok(frame(&blurry(1), 1, &rig.clock, 0)));
    rig.camera.push(Err(CaptureError::CorruptFrame {
        sequence: 2,
        reason: "truncated JPEG".into(),
    }));
    // Pixels that do not fill its stated size: the gate cannot judge it.
    let mut malformed = frame(&sharp(3), 3, &rig.clock, 50);
    malformed.rgb.truncate(malformed.rgb.len() / 2);
    rig.camera.push(Ok(malformed));
    rig.camera.push(Ok(frame(&sharp(4), 4, &rig.clock, 100)));

    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The daemon's loop runs on this thread, where the subscriber is set.
    let summary = tracing::subscriber::with_default(subscriber, || rig.press(4, 120));
    let (origin, sequence, _) = chosen(&summary);
    assert_eq!((origin, sequence), (FrameOrigin::Ring, 4));
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("malformed camera frame skipped"))
        .unwrap_or_else(|| panic!("no line for the malformed frame in:\n{log}"));
    assert!(line.contains("sequence=3"), "{line}");
}

#[test]
fn a_corrupt_frame_from_the_camera_drops_nothing_from_the_ring() {
    let camera = Camera::default();
    let clock = ManualClock::new();
    let feed = CameraFeed::start_source(
        camera.source(),
        FeedOptions {
            ring_frames: 8,
            clock: Arc::new(clock.clone()) as Arc<dyn Clock>,
        },
    )
    .unwrap();
    camera.push(Ok(frame(&sharp(1), 1, &clock, 0)));
    camera.push(Err(CaptureError::CorruptFrame {
        sequence: 2,
        reason: "truncated JPEG".into(),
    }));
    camera.push(Ok(frame(&sharp(3), 3, &clock, 66)));
    camera.wait_asked(4);
    let far = clock.start() + Duration::from_secs(3600);
    let kept: Vec<u64> = feed.recent(None, far).iter().map(|f| f.sequence).collect();
    assert_eq!(kept, [1, 3]);
    assert_eq!(feed.health(), dermascope_pipeline::CameraHealth::Streaming);
    camera.close();
}

#[test]
fn the_ring_holds_at_most_its_size_of_frames_however_many_arrive() {
    let camera = Camera::default();
    let clock = ManualClock::new();
    let feed = CameraFeed::start_source(
        camera.source(),
        FeedOptions {
            ring_frames: 4,
            clock: Arc::new(clock.clone()) as Arc<dyn Clock>,
        },
    )
    .unwrap();
    let photo = sharp(1);
    let frame_bytes = photo.as_raw().len();
    let mut delivered = Vec::new();
    for sequence in 1..=40u64 {
        camera.push(Ok(frame(&photo, sequence, &clock, sequence * 33)));
        camera.wait_asked(sequence + 1);
        let latest = feed.latest().expect("a frame was delivered");
        assert_eq!(latest.sequence, sequence);
        delivered.push(Arc::downgrade(&latest));
    }
    // Frames the ring let go of are freed, not kept by anything else.
    let alive: Vec<u64> = delivered
        .iter()
        .filter_map(|weak| weak.upgrade().map(|f| f.sequence))
        .collect();
    assert_eq!(alive, [37, 38, 39, 40]);
    assert_eq!(feed.ring_usage(), (4, 4 * frame_bytes));
    camera.close();
}
