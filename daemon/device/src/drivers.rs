//! How the daemon gets at the hardware without naming a driver crate: it
//! asks a [`Drivers`] for each device its configuration names. The Linux
//! drivers (`dermascope-device-linux`) implement it; [`NoHardware`] stands
//! in where there are none, so a host build assembles the same way and a
//! configuration that names hardware fails with what to use instead.

use std::path::Path;

use crate::capture::{CaptureError, FrameSource};
use crate::display::{Display, DisplayError};
use crate::settings::{ButtonConfig, CameraConfig, SpiPanelConfig};
use crate::trigger::{Light, LightError, Trigger, TriggerError};

/// Opens the real devices. Each method fails, as the driver itself would,
/// with the typed error of its trait: retryable camera errors (absent,
/// busy) stay retryable, so a caller may call [`Drivers::open_camera`]
/// again until the camera is there.
///
/// `Send + Sync` so one set of drivers can be shared with the camera
/// thread, which reopens the camera by itself.
pub trait Drivers: Send + Sync {
    /// Opens the camera now (a V4L2 node on Linux), failing fast when it is
    /// absent or busy. Once open, the source reopens itself after a
    /// disconnect.
    fn open_camera(&self, config: &CameraConfig) -> Result<Box<dyn FrameSource>, CaptureError>;

    /// Claims the buttons' pins and arms their interrupts.
    fn open_buttons(&self, config: &ButtonConfig) -> Result<Box<dyn Trigger>, TriggerError>;

    /// Claims the light ring's output pin (BCM numbering), initially off.
    fn open_light(&self, pin: u8) -> Result<Box<dyn Light>, LightError>;

    /// Opens a framebuffer device such as `/dev/fb0`.
    fn open_framebuffer(&self, device: &Path) -> Result<Box<dyn Display>, DisplayError>;

    /// Opens and initialises an SPI panel.
    fn open_spi_panel(&self, config: &SpiPanelConfig) -> Result<Box<dyn Display>, DisplayError>;
}

/// Where the real drivers live, for the messages of [`NoHardware`].
const NOT_IN_THIS_BUILD: &str =
    "this build has no hardware drivers (they are in dermascope-device-linux, for Linux)";

/// The drivers of a build without hardware support: every device fails at
/// construction with the same typed error a driver gives on a machine
/// without that hardware (`Unsupported` for the camera, `Unavailable` for
/// the rest), saying which host stand-in to use instead.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHardware;

impl Drivers for NoHardware {
    fn open_camera(&self, config: &CameraConfig) -> Result<Box<dyn FrameSource>, CaptureError> {
        Err(CaptureError::Unsupported {
            device: config.device.display().to_string(),
            reason: format!("{NOT_IN_THIS_BUILD}: use the replay camera on a PC"),
        })
    }

    fn open_buttons(&self, _config: &ButtonConfig) -> Result<Box<dyn Trigger>, TriggerError> {
        Err(TriggerError::Unavailable {
            reason: format!(
                "GPIO buttons: {NOT_IN_THIS_BUILD}: use the control-socket trigger on a PC"
            ),
        })
    }

    fn open_light(&self, pin: u8) -> Result<Box<dyn Light>, LightError> {
        Err(LightError::Unavailable {
            reason: format!("GPIO pin {pin}: {NOT_IN_THIS_BUILD}: use the logging light on a PC"),
        })
    }

    fn open_framebuffer(&self, device: &Path) -> Result<Box<dyn Display>, DisplayError> {
        Err(DisplayError::Unavailable {
            reason: format!(
                "framebuffer {}: {NOT_IN_THIS_BUILD}: use the PNG display on a PC",
                device.display()
            ),
        })
    }

    fn open_spi_panel(&self, config: &SpiPanelConfig) -> Result<Box<dyn Display>, DisplayError> {
        Err(DisplayError::Unavailable {
            reason: format!(
                "SPI panel on /dev/spidev{}.{}: {NOT_IN_THIS_BUILD}: use the PNG display on a PC",
                config.spi_bus, config.chip_select
            ),
        })
    }
}
