//! The capture pipeline of the handheld: button → best sharp frame of
//! those just captured → encoder → adapter → top-k similar cases → screen.
//!
//! It runs on the hardware traits of `dermascope-device` and never knows
//! whether it drives a real camera, button and panel or the host stand-ins
//! (replay folder, control socket, PNG files).
//!
//! Threads and what they may wait on:
//!
//! * **camera** ([`CameraFeed`]): dequeues frames continuously and keeps the
//!   last few in a ring; it never waits on anything else. An absent camera is retried
//!   every second while the screen says so.
//! * **loop** ([`Daemon::run`]): waits on the trigger (at most
//!   [`LOOP_TICK`], so the watchdog and the shutdown flag are served), the
//!   camera's next frames, the encoder and the in-memory index. It never
//!   waits on a disk flush of a confirmed case, nor on the network.
//! * **case writer**: stores confirmed captures (flush + fsync) behind the
//!   loop's back; shutdown waits for it.

pub mod analysis;
pub mod assembly;
pub mod boot;
pub mod config;
mod daemon;
mod feed;
mod fleet;
pub mod hardware;
pub mod identity;
pub mod retrain;
pub mod updates;

pub use analysis::{Analysis, Analyzer, CapturedLesion, ChosenFrame, FrameOrigin, StageTimings};
pub use assembly::{encoder_options, ReferenceCases, StartError, StartOptions, StartReport};
pub use config::{CaptureKind, Config, ConfigError, KeepOriginals};
pub use daemon::{
    screen_label, CaptureMode, CaseSettings, Daemon, DaemonError, NoSupervisor, RunSummary,
    Supervisor, LOOP_TICK,
};
pub use feed::{BurstError, CameraFeed, CameraHealth, FeedOptions, DEFAULT_RING_FRAMES};
pub use fleet::{fleet_view, FleetLink};
pub use retrain::{AdapterSlot, RetrainOutcome, Retrainer};
pub use updates::{start_from_installed, DeviceUpdates, StartedVersion};

// The daemon's assembly brings the adapter space up to date at start; the
// work itself belongs to the case library.
pub use dermascope_library::{index_adapter_space, AdapterSpaceError};
pub use identity::{device_id, DeviceIdError};
