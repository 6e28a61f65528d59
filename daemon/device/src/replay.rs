//! Host camera: photographs from a folder, played in a loop at a set rate,
//! so the pipeline runs on a PC exactly as it would on the device.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::ImageFormat;

use crate::capture::{CaptureError, Frame, FrameSource};
use crate::clock::{self, Clock};
use crate::decode::decode_bounded;

/// Plays the JPEG and PNG files of a folder as camera frames: in file-name
/// order, looping forever, no faster than the configured frame rate.
///
/// The file list is read once at construction. A file that cannot be read or
/// decoded yields [`CaptureError::CorruptFrame`] for its turn and the loop
/// moves on, as a real camera's bad frame would.
#[derive(Debug)]
pub struct ReplaySource {
    folder: PathBuf,
    images: Vec<PathBuf>,
    position: usize,
    sequence: u64,
    period: Duration,
    next_due: Instant,
    clock: Arc<dyn Clock>,
}

impl ReplaySource {
    /// Lists `folder`'s `.jpg`, `.jpeg` and `.png` files (case-insensitive,
    /// not recursive) and prepares to play them at `fps` frames per second.
    ///
    /// Fails with [`CaptureError::ReplayFolder`] if the folder is missing,
    /// unreadable or holds no such file, or if `fps` is not a positive
    /// finite number.
    pub fn open(folder: impl Into<PathBuf>, fps: f64) -> Result<Self, CaptureError> {
        let folder = folder.into();
        let refuse = |reason: String| CaptureError::ReplayFolder {
            folder: folder.clone(),
            reason,
        };
        if !(fps.is_finite() && fps > 0.0) {
            return Err(refuse(format!(
                "frame rate {fps} must be a positive number"
            )));
        }
        let entries = fs::read_dir(&folder).map_err(|e| refuse(format!("cannot list it: {e}")))?;
        let mut images = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| refuse(format!("cannot list it: {e}")))?
                .path();
            if path.is_file() && image_format(&path).is_some() {
                images.push(path);
            }
        }
        if images.is_empty() {
            return Err(refuse(
                "no .jpg, .jpeg or .png files in it: put the photographs to replay there".into(),
            ));
        }
        images.sort();
        tracing::info!(images = images.len(), fps, "replay camera ready");
        let clock = clock::monotonic();
        Ok(Self {
            folder,
            images,
            position: 0,
            sequence: 0,
            period: Duration::from_secs_f64(1.0 / fps),
            next_due: clock.now(),
            clock,
        })
    }

    /// Paces frames by `clock` instead of the monotonic clock; the first
    /// frame is due at once.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.next_due = clock.now();
        self.clock = clock;
        self
    }

    /// Number of images in one loop.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Always false: construction refuses an empty folder.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Sleeps until the next frame is due. Falling behind by more than a
    /// frame drops the backlog instead of bursting to catch up, as a camera
    /// would.
    fn pace(&mut self) -> Instant {
        let now = self.clock.now();
        let wait = self.next_due.saturating_duration_since(now);
        if !wait.is_zero() {
            self.clock.sleep(wait);
        }
        let now = self.clock.now();
        self.next_due += self.period;
        if self.next_due + self.period < now {
            self.next_due = now + self.period;
        }
        now
    }
}

impl FrameSource for ReplaySource {
    fn next_frame(&mut self) -> Result<Frame, CaptureError> {
        let captured_at = self.pace();
        let sequence = self.sequence;
        self.sequence += 1;
        let path = &self.images[self.position];
        self.position = (self.position + 1) % self.images.len();
        let format = image_format(path).unwrap_or(ImageFormat::Jpeg);
        let encoded = fs::read(path).map_err(|e| CaptureError::CorruptFrame {
            sequence,
            reason: format!("cannot read replay image: {e}"),
        })?;
        decode_bounded(&encoded, format, sequence, captured_at)
    }

    fn describe(&self) -> String {
        format!(
            "replay {} ({} images, {:.2} fps)",
            self.folder.display(),
            self.images.len(),
            1.0 / self.period.as_secs_f64()
        )
    }
}

fn image_format(path: &Path) -> Option<ImageFormat> {
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    match extension.as_str() {
        "jpg" | "jpeg" => Some(ImageFormat::Jpeg),
        "png" => Some(ImageFormat::Png),
        _ => None,
    }
}
