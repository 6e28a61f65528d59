//! The device camera: V4L2 memory-mapped streaming through the `v4l` crate.
//!
//! Negotiation asks for the configured size and rate, prefers MJPEG (less
//! USB bandwidth, so full rate at high resolution) and falls back to YUYV,
//! and records what the driver actually granted.
//!
//! Errors while streaming are taken as the camera going away: the session
//! is torn down, [`CaptureError::Disconnected`] is returned, and the next
//! call reopens the device after a backoff that doubles on every failed
//! attempt, so a caller that simply loops on `next_frame` never spins.

use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use v4l::buffer::{Flags as BufferFlags, Type as BufferType};
use v4l::capability::Flags as CapabilityFlags;
use v4l::io::mmap::Stream as MmapStream;
use v4l::io::traits::{CaptureStream, Stream as _};
use v4l::video::capture::Parameters;
use v4l::video::Capture;
use v4l::{Device, Format, FourCC};

use dermascope_device::{
    decode_mjpeg, yuyv_to_rgb, CameraConfig, CaptureError, Clock, Frame, FrameSource,
};

/// Driver buffers: one being decoded, the rest filling, so a slow decode
/// does not make the driver drop frames immediately.
const BUFFER_COUNT: u32 = 4;

/// Pixel encodings this driver can turn into RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelEncoding {
    /// Motion JPEG: one JPEG per frame.
    Mjpeg,
    /// Packed YUV 4:2:2 (`YUYV`).
    Yuyv,
}

/// The format the driver granted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NegotiatedFormat {
    /// Encoding of the driver's buffers.
    pub encoding: PixelEncoding,
    /// Granted width in pixels.
    pub width: u32,
    /// Granted height in pixels.
    pub height: u32,
    /// Bytes per line of a YUYV buffer (0 for MJPEG).
    pub stride: u32,
    /// Granted frame rate, if the driver reports one.
    pub fps: Option<f64>,
}

impl fmt::Display for NegotiatedFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fourcc = match self.encoding {
            PixelEncoding::Mjpeg => "MJPG",
            PixelEncoding::Yuyv => "YUYV",
        };
        write!(f, "{fourcc} {}x{}", self.width, self.height)?;
        match self.fps {
            Some(fps) => write!(f, " {fps:.2}fps"),
            None => write!(f, " fps=unknown"),
        }
    }
}

/// A V4L2 camera streaming into memory-mapped driver buffers.
pub struct V4l2Source {
    config: CameraConfig,
    session: Option<Session>,
    /// Last format granted; kept across disconnects for `describe`.
    negotiated: Option<NegotiatedFormat>,
    sequence: u64,
    backoff: Duration,
    next_attempt: Instant,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for V4l2Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("V4l2Source")
            .field("device", &self.config.device)
            .field("negotiated", &self.negotiated)
            .field("streaming", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

impl V4l2Source {
    /// Opens the camera, negotiates the format and rate, and maps its
    /// buffers. Streaming starts on the first [`FrameSource::next_frame`].
    ///
    /// Fails with `NotFound` (no such device), `Busy` (another program
    /// streams from it), `Unsupported` (not a streaming capture device, or
    /// neither MJPEG nor YUYV) or `Io`.
    pub fn open(config: CameraConfig) -> Result<Self, CaptureError> {
        let session = Session::open(&config)?;
        Ok(Self {
            negotiated: Some(session.format),
            session: Some(session),
            ..Self::waiting_for(config)
        })
    }

    /// A source that opens the camera on the first
    /// [`FrameSource::next_frame`] and, while it is absent or busy, keeps
    /// trying on later calls with the reopen backoff: for a daemon that may
    /// start before the camera is plugged in or enumerated.
    pub fn waiting_for(config: CameraConfig) -> Self {
        let clock = dermascope_device::monotonic();
        Self {
            backoff: config.reopen_backoff_min,
            config,
            session: None,
            negotiated: None,
            sequence: 0,
            next_attempt: clock.now(),
            clock,
        }
    }

    /// Times the reopen backoff by `clock` instead of the monotonic clock
    /// (frame timestamps stay the real time of capture). A reopen is due
    /// at once.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.next_attempt = clock.now();
        self.clock = clock;
        self
    }

    /// The format the driver granted at the last successful (re)open, if
    /// there was one.
    pub fn negotiated(&self) -> Option<NegotiatedFormat> {
        self.negotiated
    }

    fn device_name(&self) -> String {
        self.config.device.display().to_string()
    }

    /// Waits out the backoff, then tries once to open the camera again.
    fn reopen(&mut self) -> Result<(), CaptureError> {
        let wait = self
            .next_attempt
            .saturating_duration_since(self.clock.now());
        if !wait.is_zero() {
            self.clock.sleep(wait);
        }
        match Session::open(&self.config) {
            Ok(session) => {
                tracing::info!(device = %self.device_name(), format = %session.format, "camera reopened");
                self.negotiated = Some(session.format);
                self.session = Some(session);
                self.backoff = self.config.reopen_backoff_min;
                Ok(())
            }
            Err(error) => {
                self.next_attempt = self.clock.now() + self.backoff;
                self.backoff = (self.backoff * 2).min(self.config.reopen_backoff_max);
                Err(error)
            }
        }
    }

    /// Drops the session and schedules a reopen after `delay`.
    fn close_session(&mut self, delay: Duration) {
        self.session = None;
        self.next_attempt = self.clock.now() + delay;
    }
}

impl FrameSource for V4l2Source {
    fn next_frame(&mut self) -> Result<Frame, CaptureError> {
        if self.session.is_none() {
            self.reopen()?;
        }
        let device = self.device_name();
        let Some(session) = self.session.as_mut() else {
            return Err(CaptureError::NotFound { device });
        };
        let sequence = self.sequence;
        let outcome = session.dequeue(sequence);
        match outcome {
            Dequeued::Frame(result) => {
                self.sequence += 1;
                result
            }
            Dequeued::Stalled(error) => {
                tracing::warn!(device = %device, %error, "no frame in time; restarting the stream");
                // The v4l stream cannot be resumed after a failed dequeue
                // (it would queue the same buffer twice), so restart it.
                self.close_session(Duration::ZERO);
                Err(CaptureError::Timeout {
                    device,
                    waited: self.config.frame_timeout,
                })
            }
            Dequeued::Lost(error) => {
                tracing::warn!(device = %device, %error, "camera lost while streaming");
                self.backoff = self.config.reopen_backoff_min;
                let delay = self.backoff;
                self.close_session(delay);
                Err(CaptureError::Disconnected {
                    device,
                    reason: error.to_string(),
                })
            }
        }
    }

    fn describe(&self) -> String {
        match self.negotiated {
            Some(format) => format!("v4l2 {} {format}", self.config.device.display()),
            None => format!("v4l2 {} (not opened yet)", self.config.device.display()),
        }
    }
}

enum Dequeued {
    Frame(Result<Frame, CaptureError>),
    Stalled(io::Error),
    Lost(io::Error),
}

/// One open of the device: its handle and mapped buffers.
struct Session {
    /// `Option` only so `Drop` can take it out and stop it carefully.
    stream: Option<MmapStream<'static>>,
    // Kept so the device node stays open as long as the session lives.
    _device: Device,
    format: NegotiatedFormat,
    device_name: String,
}

impl Session {
    fn open(config: &CameraConfig) -> Result<Self, CaptureError> {
        let device_name = config.device.display().to_string();
        let io_error = |operation: &'static str| {
            let device_name = device_name.clone();
            move |source: io::Error| classify_setup_error(&device_name, operation, source)
        };
        // v4l turns the path into a C string with unwrap().
        if config.device.as_os_str().as_bytes().contains(&0) {
            return Err(CaptureError::NotFound {
                device: device_name,
            });
        }
        let device = Device::with_path(&config.device).map_err(io_error("open"))?;
        let caps = device
            .query_caps()
            .map_err(|e| unsupported(&device_name, format!("not a V4L2 device ({e})")))?;
        if !caps.capabilities.contains(CapabilityFlags::VIDEO_CAPTURE)
            || !caps.capabilities.contains(CapabilityFlags::STREAMING)
        {
            return Err(unsupported(
                &device_name,
                "not a streaming video capture node (try another /dev/videoN)".into(),
            ));
        }
        let offered: Vec<FourCC> = device
            .enum_formats()
            .map_err(io_error("list formats"))?
            .into_iter()
            .map(|description| description.fourcc)
            .collect();
        let mut negotiated = None;
        for encoding in [PixelEncoding::Mjpeg, PixelEncoding::Yuyv] {
            let Some(&fourcc) = offered.iter().find(|&&f| encoding_of(f) == Some(encoding)) else {
                continue;
            };
            let asked = Format::new(config.width, config.height, fourcc);
            let granted = device.set_format(&asked).map_err(io_error("set format"))?;
            if encoding_of(granted.fourcc) == Some(encoding) {
                negotiated = Some((encoding, granted));
                break;
            }
        }
        let Some((encoding, granted)) = negotiated else {
            let offered: Vec<String> = offered
                .iter()
                .map(|f| String::from_utf8_lossy(&f.repr).into_owned())
                .collect();
            return Err(unsupported(
                &device_name,
                format!(
                    "offers neither MJPEG nor YUYV (only {})",
                    offered.join(", ")
                ),
            ));
        };
        let fps = match device.set_params(&Parameters::with_fps(config.fps.max(1))) {
            Ok(params) => fps_of(&params),
            Err(error) => {
                // Fixed-rate cameras refuse S_PARM; the rate they run at is
                // still worth reporting.
                tracing::debug!(device = %device_name, %error, "frame rate not settable");
                device.params().ok().and_then(|params| fps_of(&params))
            }
        };
        let format = NegotiatedFormat {
            encoding,
            width: granted.width,
            height: granted.height,
            stride: match encoding {
                PixelEncoding::Mjpeg => 0,
                PixelEncoding::Yuyv => granted.stride,
            },
            fps,
        };
        let mut stream = MmapStream::with_buffers(&device, BufferType::VideoCapture, BUFFER_COUNT)
            .map_err(io_error("map buffers"))?;
        stream.set_timeout(config.frame_timeout);
        tracing::info!(device = %device_name, format = %format, "camera opened");
        Ok(Self {
            stream: Some(stream),
            _device: device,
            format,
            device_name,
        })
    }

    fn dequeue(&mut self, sequence: u64) -> Dequeued {
        let Some(stream) = self.stream.as_mut() else {
            return Dequeued::Lost(io::Error::from_raw_os_error(libc::ENODEV));
        };
        let (buffer, meta) = match CaptureStream::next(stream) {
            Ok(dequeued) => dequeued,
            Err(error) => {
                return match error.kind() {
                    io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::Interrupted => Dequeued::Stalled(error),
                    _ => Dequeued::Lost(error),
                }
            }
        };
        let captured_at = Instant::now();
        if meta.flags.contains(BufferFlags::ERROR) {
            return Dequeued::Frame(Err(CaptureError::CorruptFrame {
                sequence,
                reason: "driver flagged the buffer as corrupted".into(),
            }));
        }
        let used = (meta.bytesused as usize).min(buffer.len());
        let payload = &buffer[..used];
        let format = self.format;
        Dequeued::Frame(match format.encoding {
            PixelEncoding::Mjpeg => decode_mjpeg(payload, sequence, captured_at),
            PixelEncoding::Yuyv => yuyv_to_rgb(
                payload,
                format.width,
                format.height,
                format.stride as usize,
                sequence,
            )
            .map(|rgb| Frame {
                width: format.width,
                height: format.height,
                rgb,
                sequence,
                captured_at,
            }),
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        // v4l 0.14 panics in its Drop when STREAMOFF or freeing the buffers
        // fails with anything but ENODEV. Stop here first: if that fails
        // otherwise, leak the mappings rather than abort the daemon.
        match stream.stop() {
            Ok(()) => drop(stream),
            Err(error) if error.raw_os_error() == Some(libc::ENODEV) => drop(stream),
            Err(error) => {
                tracing::warn!(device = %self.device_name, %error, "could not stop the stream; leaking its buffers");
                std::mem::forget(stream);
            }
        }
    }
}

fn encoding_of(fourcc: FourCC) -> Option<PixelEncoding> {
    match &fourcc.repr {
        b"MJPG" | b"JPEG" => Some(PixelEncoding::Mjpeg),
        b"YUYV" => Some(PixelEncoding::Yuyv),
        _ => None,
    }
}

fn fps_of(params: &Parameters) -> Option<f64> {
    let interval = params.interval;
    (interval.numerator > 0 && interval.denominator > 0)
        .then(|| f64::from(interval.denominator) / f64::from(interval.numerator))
}

fn unsupported(device: &str, reason: String) -> CaptureError {
    CaptureError::Unsupported {
        device: device.to_string(),
        reason,
    }
}

/// Maps an OS error from opening or configuring the device to the
/// retryable kinds the pipeline acts on.
fn classify_setup_error(device: &str, operation: &'static str, source: io::Error) -> CaptureError {
    let device = device.to_string();
    match source.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
            CaptureError::NotFound { device }
        }
        Some(libc::EBUSY) => CaptureError::Busy { device },
        _ => CaptureError::Io {
            device,
            operation,
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_are_classified_by_errno() {
        let classify = |errno| {
            classify_setup_error("/dev/video9", "open", io::Error::from_raw_os_error(errno))
        };
        assert!(matches!(
            classify(libc::ENOENT),
            CaptureError::NotFound { .. }
        ));
        assert!(matches!(
            classify(libc::ENODEV),
            CaptureError::NotFound { .. }
        ));
        assert!(matches!(classify(libc::EBUSY), CaptureError::Busy { .. }));
        let denied = classify(libc::EACCES);
        assert!(matches!(
            denied,
            CaptureError::Io {
                operation: "open",
                ..
            }
        ));
        assert!(!denied.is_retryable());
    }

    #[test]
    fn fourccs_map_to_encodings() {
        assert_eq!(
            encoding_of(FourCC::new(b"MJPG")),
            Some(PixelEncoding::Mjpeg)
        );
        assert_eq!(
            encoding_of(FourCC::new(b"JPEG")),
            Some(PixelEncoding::Mjpeg)
        );
        assert_eq!(encoding_of(FourCC::new(b"YUYV")), Some(PixelEncoding::Yuyv));
        assert_eq!(encoding_of(FourCC::new(b"NV12")), None);
    }

    #[test]
    fn negotiated_format_prints_greppable_line() {
        let format = NegotiatedFormat {
            encoding: PixelEncoding::Yuyv,
            width: 640,
            height: 480,
            stride: 1280,
            fps: Some(30.0),
        };
        assert_eq!(format.to_string(), "YUYV 640x480 30.00fps");
    }
}
