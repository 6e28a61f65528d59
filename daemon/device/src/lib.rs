//! The dermatoscope's hardware behind four small traits, so the capture
//! pipeline runs the same on the handheld and on a PC.
//!
//! | trait | on the device | on a PC (host) |
//! |---|---|---|
//! | [`FrameSource`] | [`V4l2Source`]: V4L2 mmap streaming, MJPEG preferred, YUYV fallback ([`V4l2Source::open`] fails fast, [`V4l2Source::waiting_for`] waits for the camera) | [`ReplaySource`]: a folder of JPEG/PNG photographs, looped at a set rate |
//! | [`Trigger`] | [`GpioButtons`]: debounced edge interrupts on a push button | [`ControlSocketTrigger`]: lines on a Unix socket; [`ScriptedTrigger`]: a fixed list |
//! | [`Light`] | [`GpioLight`]: the LED ring on an output pin | [`LoggingLight`]: logs its state |
//! | [`Display`] | [`FramebufferDisplay`] (`/dev/fb0`) or [`SpiPanelDisplay`] (ST7789/ILI9341) | [`PngSnapshotDisplay`]: PNG files; [`InMemoryDisplay`]: the last screen in memory |
//!
//! Replay pacing and the camera's reopen backoff read the time from a
//! [`Clock`]: the monotonic clock unless `with_clock` hands in another, such
//! as the [`ManualClock`] tests use to check them without sleeping.
//!
//! Every driver compiles on every Linux target (x86_64 and aarch64). Real
//! drivers fail at construction, with a typed error saying what to fix, on a
//! machine that lacks their hardware: [`TriggerError::Unavailable`] and
//! [`LightError::Unavailable`] off a Raspberry Pi,
//! [`DisplayError::Unavailable`] without SPI, [`DisplayError::NotFound`]
//! without a framebuffer, [`CaptureError::NotFound`] without a camera.
//!
//! # Boundaries
//!
//! Frames and screens are plain RGB888 buffers. This crate does not render
//! (the daemon draws screens itself and hands over pixels), judge image
//! quality, embed or store anything. It never logs pixel content, file names
//! of replayed photographs or confirmation labels.
//!
//! # Error model
//!
//! Each trait has its own error enum. What the caller should do:
//!
//! * **Retry** ([`CaptureError::is_retryable`]): `NotFound`, `Busy`,
//!   `Disconnected`, `CorruptFrame`, `Timeout`. A corrupt frame costs only
//!   that frame. After `Disconnected` the next
//!   [`FrameSource::next_frame`] reopens the camera itself, waiting a
//!   backoff that doubles per failed attempt (100 ms to 2 s by default)
//!   and returning `NotFound` or `Busy` until the camera is back, so a
//!   plain retry loop never spins.
//! * **Retry** ([`DisplayError::is_retryable`]): `Io`, a failed write.
//! * **Fix the setup**: everything else (`Unsupported`, `ReplayFolder`,
//!   `Io` at camera setup, `Unavailable`, `NotFound` for displays,
//!   `UnsupportedFormat`, `SocketInUse`). Messages name the device and the
//!   fix.
//! * **Bug in the caller**: [`DisplayError::BadScreen`] (buffer size does
//!   not match the stated size).

mod camera;
mod capture;
mod clock;
mod control_socket;
mod decode;
mod display;
mod framebuffer;
mod gpio;
mod png_display;
mod replay;
mod spi_panel;
mod trigger;

pub use camera::{CameraConfig, NegotiatedFormat, PixelEncoding, V4l2Source};
pub use capture::{CaptureError, Frame, FrameSource};
pub use clock::{Clock, ManualClock, MonotonicClock};
pub use control_socket::ControlSocketTrigger;
pub use decode::{decode_mjpeg, yuyv_to_rgb, MAX_FRAME_SIDE};
pub use display::{Display, DisplayError, InMemoryDisplay, PresentedScreens, Screen};
pub use framebuffer::FramebufferDisplay;
pub use gpio::{ButtonConfig, GpioButtons, GpioLight};
pub use png_display::PngSnapshotDisplay;
pub use replay::ReplaySource;
pub use spi_panel::{PanelController, SpiPanelConfig, SpiPanelDisplay};
pub use trigger::{
    Light, LightError, LoggingLight, ScriptedTrigger, Trigger, TriggerError, TriggerEvent,
};
