//! The handheld's drivers behind `dermascope-device`'s traits, on Linux:
//!
//! | trait | driver |
//! |---|---|
//! | `FrameSource` | [`V4l2Source`]: V4L2 mmap streaming, MJPEG preferred, YUYV fallback ([`V4l2Source::open`] fails fast, [`V4l2Source::waiting_for`] waits for the camera) |
//! | `Trigger` | [`GpioButtons`]: debounced edge interrupts on a push button |
//! | `Light` | [`GpioLight`]: the LED ring on an output pin |
//! | `Display` | [`FramebufferDisplay`] (`/dev/fb0`) or [`SpiPanelDisplay`] (ST7789/ILI9341) |
//!
//! [`LinuxDrivers`] opens them through `dermascope_device::Drivers`, the
//! only way the daemon reaches them: the binary hands it to the pipeline,
//! which sees nothing but the traits.
//!
//! Every driver compiles on every Linux target (x86_64 and aarch64) and
//! fails at construction, with `dermascope-device`'s typed errors saying
//! what to fix, on a machine that lacks its hardware. The error model is
//! `dermascope-device`'s.
//!
//! Architecture Invariant: this is the only crate that depends on v4l or
//! rppal, it depends on no crate of ours but `dermascope-device`, and only
//! the binary depends on it (`daemon/testkit/tests/dependency_rules.rs`).

use std::path::Path;

use dermascope_device::{
    ButtonConfig, CameraConfig, CaptureError, Display, DisplayError, Drivers, FrameSource, Light,
    LightError, SpiPanelConfig, Trigger, TriggerError,
};

mod camera;
mod framebuffer;
mod gpio;
mod spi_panel;

pub use camera::{NegotiatedFormat, PixelEncoding, V4l2Source};
pub use framebuffer::FramebufferDisplay;
pub use gpio::{GpioButtons, GpioLight};
pub use spi_panel::SpiPanelDisplay;

/// The drivers above as a `dermascope_device::Drivers`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinuxDrivers;

impl Drivers for LinuxDrivers {
    fn open_camera(&self, config: &CameraConfig) -> Result<Box<dyn FrameSource>, CaptureError> {
        V4l2Source::open(config.clone()).map(|source| Box::new(source) as Box<dyn FrameSource>)
    }

    fn open_buttons(&self, config: &ButtonConfig) -> Result<Box<dyn Trigger>, TriggerError> {
        GpioButtons::open(config).map(|buttons| Box::new(buttons) as Box<dyn Trigger>)
    }

    fn open_light(&self, pin: u8) -> Result<Box<dyn Light>, LightError> {
        GpioLight::open(pin).map(|light| Box::new(light) as Box<dyn Light>)
    }

    fn open_framebuffer(&self, device: &Path) -> Result<Box<dyn Display>, DisplayError> {
        FramebufferDisplay::open(device).map(|display| Box::new(display) as Box<dyn Display>)
    }

    fn open_spi_panel(&self, config: &SpiPanelConfig) -> Result<Box<dyn Display>, DisplayError> {
        SpiPanelDisplay::open(config.clone()).map(|panel| Box::new(panel) as Box<dyn Display>)
    }
}
