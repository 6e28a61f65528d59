//! Where the drivers read the time and wait: replay pacing and the camera's
//! reopen backoff. The real monotonic clock by default; a test hands in a
//! [`ManualClock`] and checks the decisions exactly, without sleeping and
//! without depending on how loaded the machine is.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A monotonic time source that can also wait.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> Instant;
    /// Blocks the caller for `duration`.
    fn sleep(&self, duration: Duration);
}

/// [`Instant::now`] and [`std::thread::sleep`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// The clock every driver uses unless told otherwise.
pub fn monotonic() -> Arc<dyn Clock> {
    Arc::new(MonotonicClock)
}

/// A clock that moves only when told: [`ManualClock::advance`] moves it,
/// and a [`Clock::sleep`] on it returns at once, having moved it by the
/// time slept. Clones share one time. For tests and simulations: a loop
/// that waits on it never waits for real.
#[derive(Debug, Clone)]
pub struct ManualClock {
    start: Instant,
    state: Arc<Mutex<ManualState>>,
}

#[derive(Debug, Default)]
struct ManualState {
    elapsed: Duration,
    sleeps: Vec<Duration>,
}

impl ManualClock {
    /// A clock standing at an arbitrary instant, [`ManualClock::start`].
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            state: Arc::default(),
        }
    }

    /// Where the clock stood when it was made.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Time since [`ManualClock::start`].
    pub fn elapsed(&self) -> Duration {
        self.lock().elapsed
    }

    /// Moves the clock on by `duration`, as if the caller had been busy.
    pub fn advance(&self, duration: Duration) {
        self.lock().elapsed += duration;
    }

    /// Every sleep asked of this clock so far, oldest first.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.lock().sleeps.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ManualState> {
        // The state is two plain values: a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is still good to use.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.lock().elapsed
    }

    fn sleep(&self, duration: Duration) {
        let mut state = self.lock();
        state.elapsed += duration;
        state.sleeps.push(duration);
    }
}
