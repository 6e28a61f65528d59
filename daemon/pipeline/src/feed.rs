//! The camera runs in its own thread and never waits for anyone: it keeps
//! dequeuing (a V4L2 queue that is not drained stalls) and keeps its last
//! frames in a small ring, so a capture can choose from what was already
//! captured just before the press ([`CameraFeed::recent`]), or take the
//! frames that follow it ([`CameraFeed::frames_after`], [`CameraFeed::burst`]).
//!
//! Which frames count as "before" and "after" a press is decided by the
//! frames' own capture times against the feed's [`Clock`], never by when
//! the loop happened to look, so tests decide it exactly on a
//! [`dermascope_device::ManualClock`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dermascope_device::{monotonic, CaptureError, Clock, Frame, FrameSource};
use tracing::{info, warn};

/// Frames the ring keeps unless configured otherwise: the 150 ms window
/// at 30 fps holds 5, and a 60 fps camera still finds 100 ms in it.
pub const DEFAULT_RING_FRAMES: usize = 8;

/// How the camera thread keeps frames and reads the time.
#[derive(Clone, Debug)]
pub struct FeedOptions {
    /// Frames kept (at least 1). The ring's memory is this many frames at
    /// the camera's resolution, whatever the camera does.
    pub ring_frames: usize,
    /// The clock the sources stamp frames with (`Frame::captured_at`):
    /// the monotonic one on the device, a manual one in tests.
    pub clock: Arc<dyn Clock>,
}

impl Default for FeedOptions {
    fn default() -> Self {
        Self {
            ring_frames: DEFAULT_RING_FRAMES,
            clock: monotonic(),
        }
    }
}

/// What the camera thread last reported, for the screen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CameraHealth {
    /// Frames are arriving.
    Streaming,
    /// Frames stopped for a reason that can clear by itself (unplugged,
    /// busy, corrupt frames); the thread keeps trying.
    Interrupted(String),
    /// The camera cannot work as configured; the thread has stopped.
    Failed(String),
}

struct FeedState {
    latest: Option<Arc<Frame>>,
    /// Frames delivered so far (not the source's sequence, which counts
    /// corrupt frames too).
    delivered: u64,
    /// The last frames, oldest first, each with its place in `delivered`
    /// (sequences restart when a camera is reopened; this does not).
    ring: VecDeque<(u64, Arc<Frame>)>,
    ring_frames: usize,
    health: CameraHealth,
}

impl FeedState {
    fn push(&mut self, frame: Arc<Frame>) {
        self.delivered += 1;
        while self.ring.len() >= self.ring_frames {
            self.ring.pop_front();
        }
        self.ring.push_back((self.delivered, Arc::clone(&frame)));
        self.latest = Some(frame);
    }
}

struct Shared {
    state: Mutex<FeedState>,
    arrived: Condvar,
    stop: AtomicBool,
}

/// Why a burst could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BurstError {
    #[error("the camera delivered {got} of {wanted} frames in {waited_ms} ms ({health})")]
    Timeout {
        got: usize,
        wanted: usize,
        waited_ms: u64,
        health: String,
    },
    #[error("the camera has stopped: {0}")]
    Failed(String),
}

/// A running camera thread.
pub struct CameraFeed {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    description: String,
    clock: Arc<dyn Clock>,
}

impl CameraFeed {
    /// Starts pulling frames from `source` in a new thread.
    pub fn start(source: Box<dyn FrameSource>) -> std::io::Result<Self> {
        Self::start_source(source, FeedOptions::default())
    }

    /// [`CameraFeed::start`] with a ring size and clock of the caller's.
    pub fn start_source(
        source: Box<dyn FrameSource>,
        options: FeedOptions,
    ) -> std::io::Result<Self> {
        let mut source = Some(source);
        Self::start_with_options(
            "camera".to_string(),
            move || {
                source.take().ok_or_else(|| CaptureError::Unsupported {
                    device: "camera".into(),
                    reason: "the source was already used".into(),
                })
            },
            options,
        )
    }

    /// Starts a thread that opens the camera with `open` (again and again
    /// while it reports a retryable error such as "not found", so a camera
    /// plugged in later is picked up) and then pulls frames from it.
    pub fn start_with<F>(description: String, open: F) -> std::io::Result<Self>
    where
        F: FnMut() -> Result<Box<dyn FrameSource>, CaptureError> + Send + 'static,
    {
        Self::start_with_options(description, open, FeedOptions::default())
    }

    /// [`CameraFeed::start_with`] with a ring size and clock of the caller's.
    pub fn start_with_options<F>(
        description: String,
        open: F,
        options: FeedOptions,
    ) -> std::io::Result<Self>
    where
        F: FnMut() -> Result<Box<dyn FrameSource>, CaptureError> + Send + 'static,
    {
        let ring_frames = options.ring_frames.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(FeedState {
                latest: None,
                delivered: 0,
                ring: VecDeque::with_capacity(ring_frames),
                ring_frames,
                health: CameraHealth::Streaming,
            }),
            arrived: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("camera".into())
            .spawn(move || open_and_pull(open, &thread_shared))?;
        info!(camera = %description, "camera thread started");
        Ok(Self {
            shared,
            thread: Some(thread),
            description,
            clock: options.clock,
        })
    }

    /// The time on the clock the frames are stamped with: a press is
    /// placed among the frames by it.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Frames in the ring now, and the bytes of pixels they hold: what the
    /// ring costs in memory (a frame a capture still holds stays alive
    /// beyond it until the capture lets go).
    pub fn ring_usage(&self) -> (usize, usize) {
        let state = self.state();
        let bytes = state.ring.iter().map(|(_, f)| f.rgb.len()).sum();
        (state.ring.len(), bytes)
    }

    /// The ring's frames captured within `from..=to` (`from` `None`: no
    /// lower bound), oldest first, without waiting for any.
    pub fn recent(&self, from: Option<Instant>, to: Instant) -> Vec<Arc<Frame>> {
        self.state()
            .ring
            .iter()
            .filter(|(_, f)| from.is_none_or(|from| f.captured_at >= from) && f.captured_at <= to)
            .map(|(_, f)| Arc::clone(f))
            .collect()
    }

    /// The frames captured after `after` up to `until`, oldest first:
    /// waits until a frame captured later than `until` shows that none is
    /// still to come (that frame is returned alone when none came in
    /// between, so a slow camera still gives one), at most `timeout`.
    /// Frames already in the ring count, so it does not matter whether the
    /// caller asked before or after they arrived.
    pub fn frames_after(
        &self,
        after: Instant,
        until: Instant,
        timeout: Duration,
    ) -> Result<Vec<Arc<Frame>>, BurstError> {
        // A watchdog on real time: which frames are taken is decided by
        // their capture times alone.
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        let mut examined = 0u64;
        let mut state = self.state();
        loop {
            let mut past_window = None;
            for (index, frame) in state.ring.iter() {
                if *index <= examined {
                    continue;
                }
                examined = *index;
                if frame.captured_at <= after {
                    continue;
                }
                if frame.captured_at <= until {
                    frames.push(Arc::clone(frame));
                } else if past_window.is_none() {
                    past_window = Some(Arc::clone(frame));
                }
            }
            if let Some(late) = past_window {
                if frames.is_empty() {
                    frames.push(late);
                }
                return Ok(frames);
            }
            if let CameraHealth::Failed(reason) = &state.health {
                return Err(BurstError::Failed(reason.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                let health = timeout_reason(&state.health);
                return Err(BurstError::Timeout {
                    got: frames.len(),
                    wanted: frames.len() + 1,
                    waited_ms: timeout.as_millis() as u64,
                    health,
                });
            }
            state = self
                .shared
                .arrived
                .wait_timeout(state, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    fn state(&self) -> MutexGuard<'_, FeedState> {
        // A panic in the camera thread while holding the lock leaves plain
        // data behind; reading it is still sound.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn health(&self) -> CameraHealth {
        self.state().health.clone()
    }

    /// The most recent frame, for a live view.
    pub fn latest(&self) -> Option<Arc<Frame>> {
        self.state().latest.clone()
    }

    /// The next `count` frames delivered after this call, waiting at most
    /// `timeout` in all.
    pub fn burst(&self, count: usize, timeout: Duration) -> Result<Vec<Arc<Frame>>, BurstError> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::with_capacity(count);
        let mut state = self.state();
        let mut seen = state.delivered;
        while frames.len() < count {
            if let CameraHealth::Failed(reason) = &state.health {
                return Err(BurstError::Failed(reason.clone()));
            }
            if state.delivered > seen {
                seen = state.delivered;
                if let Some(frame) = &state.latest {
                    frames.push(Arc::clone(frame));
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                let health = timeout_reason(&state.health);
                return Err(BurstError::Timeout {
                    got: frames.len(),
                    wanted: count,
                    waited_ms: timeout.as_millis() as u64,
                    health,
                });
            }
            state = self
                .shared
                .arrived
                .wait_timeout(state, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        Ok(frames)
    }
}

impl Drop for CameraFeed {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The source returns within its own frame timeout or pacing.
            let _ = thread.join();
        }
    }
}

/// How long to wait between attempts to open an absent or busy camera.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

fn set_health(shared: &Shared, health: CameraHealth) {
    let mut state = shared
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    state.health = health;
    drop(state);
    shared.arrived.notify_all();
}

fn open_and_pull<F>(mut open: F, shared: &Shared)
where
    F: FnMut() -> Result<Box<dyn FrameSource>, CaptureError>,
{
    let mut logged: Option<String> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        match open() {
            Ok(mut source) => {
                info!(camera = %source.describe(), "camera opened");
                set_health(shared, CameraHealth::Streaming);
                pull_frames(source.as_mut(), shared);
                return;
            }
            Err(error) if error.is_retryable() => {
                let text = error.to_string();
                if logged.as_deref() != Some(text.as_str()) {
                    warn!(error = %text, "camera not available yet; retrying every second");
                    logged = Some(text.clone());
                }
                set_health(shared, CameraHealth::Interrupted(text));
                std::thread::sleep(REOPEN_INTERVAL);
            }
            Err(error) => {
                let text = error.to_string();
                tracing::error!(error = %text, "camera cannot be used; fix the configuration");
                set_health(shared, CameraHealth::Failed(text));
                return;
            }
        }
    }
}

fn pull_frames(source: &mut dyn FrameSource, shared: &Shared) {
    let mut last_problem: Option<String> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let outcome = source.next_frame();
        // Sources back off themselves while a camera is away; this floor
        // keeps a source that does not from spinning a core.
        let pause = matches!(&outcome, Err(e) if e.is_retryable()
            && !matches!(e, CaptureError::CorruptFrame { .. }));
        let mut state = shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match outcome {
            Ok(frame) => {
                state.push(Arc::new(frame));
                if state.health != CameraHealth::Streaming {
                    info!("camera streaming again");
                }
                state.health = CameraHealth::Streaming;
                last_problem = None;
            }
            Err(error) if error.is_retryable() => {
                let text = error.to_string();
                // One log line per kind of trouble, not one per frame.
                if last_problem.as_deref() != Some(text.as_str()) {
                    warn!(error = %text, "camera interrupted; retrying");
                    last_problem = Some(text.clone());
                }
                if !matches!(error, CaptureError::CorruptFrame { .. }) {
                    state.health = CameraHealth::Interrupted(text);
                }
            }
            Err(error) => {
                let text = error.to_string();
                tracing::error!(error = %text, "camera cannot be used; fix the configuration");
                state.health = CameraHealth::Failed(text);
                shared.arrived.notify_all();
                return;
            }
        }
        drop(state);
        shared.arrived.notify_all();
        if pause {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What a timed-out wait tells the clinician about the camera.
fn timeout_reason(health: &CameraHealth) -> String {
    match health {
        CameraHealth::Streaming => "no frame arrived".to_string(),
        CameraHealth::Interrupted(r) | CameraHealth::Failed(r) => r.clone(),
    }
}
