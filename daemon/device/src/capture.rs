//! The camera seen by the pipeline: a [`FrameSource`] hands out RGB frames
//! and says, through [`CaptureError`], whether asking again can help.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One camera picture, already converted to RGB.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// RGB888, row-major, `width * height * 3` bytes, no row padding.
    pub rgb: Vec<u8>,
    /// Position of this frame in the source's output, counting corrupt
    /// frames too, so a gap tells the caller frames were lost. Keeps
    /// increasing across reconnects of the same source.
    pub sequence: u64,
    /// When the frame left the source (after pacing, at dequeue).
    pub captured_at: Instant,
}

impl fmt::Debug for Frame {
    // The pixels are a patient's skin: never let `{:?}` dump them into a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("rgb_bytes", &self.rgb.len())
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

/// Anything that produces camera frames: the V4L2 camera on the device, a
/// folder of photographs on a PC.
pub trait FrameSource: Send {
    /// Blocks until the next frame is available (or the source's own pacing
    /// or backoff delay has passed) and returns it.
    ///
    /// Errors for which [`CaptureError::is_retryable`] is true leave the
    /// source usable: call `next_frame` again.
    fn next_frame(&mut self) -> Result<Frame, CaptureError>;

    /// One line for logs and status screens: what the source is and the
    /// format it delivers (never any pixel content).
    fn describe(&self) -> String;
}

/// Why a frame could not be had.
///
/// Retryable (see [`CaptureError::is_retryable`]): `NotFound`, `Busy`,
/// `Disconnected`, `CorruptFrame`, `Timeout`: the condition can clear by
/// itself (camera plugged back in, other process exits, next frame is fine).
/// The rest describe a configuration the caller has to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// No camera at that path (absent, unplugged, or its node is a removed
    /// device).
    #[error("camera {device} not found: check that it is connected and the device path is right")]
    NotFound {
        /// Device path as configured.
        device: String,
    },
    /// Another process holds the camera.
    #[error(
        "camera {device} is busy: another program is using it (find it with `fuser {device}`)"
    )]
    Busy {
        /// Device path as configured.
        device: String,
    },
    /// The camera went away while streaming; the next
    /// [`FrameSource::next_frame`] tries to reopen it after a backoff.
    #[error("camera {device} disconnected while streaming ({reason}); it will be reopened")]
    Disconnected {
        /// Device path as configured.
        device: String,
        /// The OS error that revealed it.
        reason: String,
    },
    /// This one frame could not be decoded; the next one may be fine.
    #[error("frame {sequence} is corrupt: {reason}")]
    CorruptFrame {
        /// Sequence number the frame would have had.
        sequence: u64,
        /// What was wrong with it.
        reason: String,
    },
    /// The camera delivered nothing in time; the stream is restarted on the
    /// next call.
    #[error("camera {device} delivered no frame within {waited:?}")]
    Timeout {
        /// Device path as configured.
        device: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The device exists but cannot be used as a camera by this driver.
    #[error("camera {device} cannot be used: {reason}")]
    Unsupported {
        /// Device path as configured.
        device: String,
        /// What it lacks.
        reason: String,
    },
    /// The replay folder is missing, unreadable or has no images.
    #[error("replay folder {}: {reason}", folder.display())]
    ReplayFolder {
        /// Folder as configured.
        folder: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other OS error while setting the camera up (e.g. permission).
    #[error("camera {device}: {operation} failed: {source}")]
    Io {
        /// Device path as configured.
        device: String,
        /// The step that failed, e.g. `open`, `set format`.
        operation: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl CaptureError {
    /// True when calling [`FrameSource::next_frame`] again may succeed
    /// without anyone changing the configuration.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CaptureError::NotFound { .. }
                | CaptureError::Busy { .. }
                | CaptureError::Disconnected { .. }
                | CaptureError::CorruptFrame { .. }
                | CaptureError::Timeout { .. }
        )
    }
}
