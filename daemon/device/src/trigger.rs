//! What the clinician presses, and the light that shows the lesion: the
//! traits, their events and errors, and the in-process implementations
//! (scripted trigger, logging light).

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

/// A request from the clinician.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerEvent {
    /// Take a photograph of the lesion now.
    Capture,
    /// Confirm the last capture as a case, optionally with its diagnosis
    /// label (e.g. `mel`).
    Confirm {
        /// Diagnosis label given with the confirmation, if any.
        label: Option<String>,
    },
    /// Stop the daemon cleanly.
    Shutdown,
}

/// The source of [`TriggerEvent`]s: a GPIO button on the device, a control
/// socket or a script on a PC.
pub trait Trigger: Send {
    /// Waits up to `timeout` for the next event; `Ok(None)` means none came.
    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, TriggerError>;
}

/// The illumination ring around the lens.
pub trait Light: Send {
    /// Switches the light on or off.
    fn set(&mut self, on: bool) -> Result<(), LightError>;
}

/// Why a trigger cannot deliver events.
///
/// None of these clear by waiting: `Unavailable`, `SocketInUse` and `UnknownGroup` need the
/// configuration changed, `Io` and `Closed` mean the trigger is gone and
/// must be rebuilt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TriggerError {
    /// The hardware is not there (not a Raspberry Pi, no GPIO access).
    #[error("trigger unavailable: {reason}")]
    Unavailable {
        /// What is missing and how to fix it.
        reason: String,
    },
    /// Another live process already listens on the control socket path.
    #[error("control socket {} is in use by another process; stop it or choose another path", path.display())]
    SocketInUse {
        /// Socket path as configured.
        path: PathBuf,
    },
    /// The group allowed on the control socket is not in `/etc/group`.
    #[error("group {name:?} is not in /etc/group; give its numeric gid instead")]
    UnknownGroup {
        /// The group name as configured.
        name: String,
    },
    /// Setting up or reading the trigger failed.
    #[error("trigger {what}: {source}")]
    Io {
        /// What was being done, with the path or pin concerned.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The trigger's background listener stopped; no more events can come.
    #[error("trigger closed: {reason}")]
    Closed {
        /// Why it stopped.
        reason: String,
    },
}

/// Why the light could not be switched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LightError {
    /// The hardware is not there (not a Raspberry Pi, no GPIO access).
    #[error("light unavailable: {reason}")]
    Unavailable {
        /// What is missing and how to fix it.
        reason: String,
    },
}

/// A trigger that replays a fixed list of events, one per `wait`, for tests
/// and benchmarks. Once the list is used up it behaves like an untouched
/// button: each `wait` sleeps for its timeout and returns `Ok(None)` (put a
/// [`TriggerEvent::Shutdown`] last to end a run).
#[derive(Debug, Clone)]
pub struct ScriptedTrigger {
    remaining: VecDeque<TriggerEvent>,
}

impl ScriptedTrigger {
    /// A trigger that yields `events` in order.
    pub fn new(events: impl IntoIterator<Item = TriggerEvent>) -> Self {
        Self {
            remaining: events.into_iter().collect(),
        }
    }

    /// Events not yet delivered.
    pub fn remaining(&self) -> usize {
        self.remaining.len()
    }
}

impl Trigger for ScriptedTrigger {
    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, TriggerError> {
        match self.remaining.pop_front() {
            Some(event) => Ok(Some(event)),
            None => {
                thread::sleep(timeout);
                Ok(None)
            }
        }
    }
}

/// A light for a PC: records and logs its state.
#[derive(Debug, Default, Clone)]
pub struct LoggingLight {
    on: bool,
}

impl LoggingLight {
    /// A light that starts off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the light is currently on.
    pub fn is_on(&self) -> bool {
        self.on
    }
}

impl Light for LoggingLight {
    fn set(&mut self, on: bool) -> Result<(), LightError> {
        if on != self.on {
            tracing::info!(on, "light switched");
        }
        self.on = on;
        Ok(())
    }
}
