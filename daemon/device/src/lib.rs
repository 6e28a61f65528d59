//! The dermatoscope's hardware behind four small traits, so the capture
//! pipeline runs the same on the handheld and on a PC.
//!
//! This crate holds the traits, their errors, the host stand-ins and the
//! settings the real drivers take; it names no hardware crate and builds
//! on any OS (the control socket on Unix only). The real drivers are in
//! `dermascope-device-linux`, reached through [`Drivers`]:
//!
//! | trait | on the device (`dermascope-device-linux`) | on a PC (host, here) |
//! |---|---|---|
//! | [`FrameSource`] | `V4l2Source`: V4L2 mmap streaming, MJPEG preferred, YUYV fallback | [`ReplaySource`]: a folder of JPEG/PNG photographs, looped at a set rate |
//! | [`Trigger`] | `GpioButtons`: debounced edge interrupts on a push button | [`ControlSocketTrigger`]: lines on a Unix socket; [`ScriptedTrigger`]: a fixed list |
//! | [`Light`] | `GpioLight`: the LED ring on an output pin | [`LoggingLight`]: logs its state |
//! | [`Display`] | `FramebufferDisplay` (`/dev/fb0`) or `SpiPanelDisplay` (ST7789/ILI9341) | [`PngSnapshotDisplay`]: PNG files; [`InMemoryDisplay`]: the last screen in memory |
//!
//! [`BootSlot`] is the A/B root filesystem the system booted from:
//! [`RaucSlot`] on the image (RAUC), [`NoSlots`] on a PC.
//!
//! [`Drivers`] opens the real devices from plain settings ([`CameraConfig`],
//! [`ButtonConfig`], [`SpiPanelConfig`]); [`NoHardware`] is the host's
//! stand-in for it, refusing every device with what to use instead.
//!
//! Replay pacing and the camera's reopen backoff read the time from a
//! [`Clock`]: the monotonic clock unless `with_clock` hands in another, such
//! as the [`ManualClock`] tests use to check them without sleeping.
//!
//! Real drivers fail at construction, with a typed error saying what to
//! fix, on a machine that lacks their hardware: [`TriggerError::Unavailable`]
//! and [`LightError::Unavailable`] off a Raspberry Pi,
//! [`DisplayError::Unavailable`] without SPI, [`DisplayError::NotFound`]
//! without a framebuffer, [`CaptureError::NotFound`] without a camera.
//!
//! Architecture Invariant: no dependency on a hardware crate (v4l, rppal,
//! libc); `daemon/testkit/tests/dependency_rules.rs` checks it.
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

mod boot_slot;
mod capture;
mod clock;
#[cfg(unix)]
mod control_socket;
mod decode;
mod display;
mod drivers;
mod png_display;
mod replay;
mod settings;
mod trigger;

pub use boot_slot::{BootSlot, BootSlotError, Marked, NoSlots, RaucSlot};
pub use capture::{CaptureError, Frame, FrameSource};
pub use clock::{monotonic, Clock, ManualClock, MonotonicClock};
#[cfg(unix)]
pub use control_socket::{socket_group_id, ControlSocketOptions, ControlSocketTrigger};
pub use decode::{decode_mjpeg, yuyv_to_rgb, MAX_FRAME_SIDE};
pub use display::{
    fit_screen_to, Display, DisplayError, InMemoryDisplay, PresentedScreens, Screen,
};
pub use drivers::{Drivers, NoHardware};
pub use png_display::PngSnapshotDisplay;
pub use replay::ReplaySource;
pub use settings::{ButtonConfig, CameraConfig, PanelController, SpiPanelConfig};
pub use trigger::{
    Light, LightError, LoggingLight, ScriptedTrigger, Trigger, TriggerError, TriggerEvent,
};
