//! The camera runs in its own thread and never waits for anyone: it keeps
//! dequeuing (a V4L2 queue that is not drained stalls), and a capture takes
//! the next frames it delivers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dermascope_device::{CaptureError, Frame, FrameSource};
use tracing::{info, warn};

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
    health: CameraHealth,
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
}

impl CameraFeed {
    /// Starts pulling frames from `source` in a new thread.
    pub fn start(source: Box<dyn FrameSource>) -> std::io::Result<Self> {
        let mut source = Some(source);
        Self::start_with("camera".to_string(), move || {
            source.take().ok_or_else(|| CaptureError::Unsupported {
                device: "camera".into(),
                reason: "the source was already used".into(),
            })
        })
    }

    /// Starts a thread that opens the camera with `open` (again and again
    /// while it reports a retryable error such as "not found", so a camera
    /// plugged in later is picked up) and then pulls frames from it.
    pub fn start_with<F>(description: String, open: F) -> std::io::Result<Self>
    where
        F: FnMut() -> Result<Box<dyn FrameSource>, CaptureError> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(FeedState {
                latest: None,
                delivered: 0,
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
        })
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
                let health = match &state.health {
                    CameraHealth::Streaming => "no frame arrived".to_string(),
                    CameraHealth::Interrupted(r) | CameraHealth::Failed(r) => r.clone(),
                };
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
                state.latest = Some(Arc::new(frame));
                state.delivered += 1;
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
