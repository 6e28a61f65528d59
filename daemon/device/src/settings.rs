//! What the hardware drivers are asked for: plain data, so the daemon's
//! configuration can be mapped onto it without naming a driver, and the
//! drivers (in `dermascope-device-linux`) can take it without knowing the
//! daemon's configuration.

use std::path::PathBuf;
use std::time::Duration;

#[cfg(doc)]
use crate::CaptureError;

/// What to ask the camera for.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraConfig {
    /// Device node, e.g. `/dev/video0`.
    pub device: PathBuf,
    /// Requested width in pixels (the driver may grant another).
    pub width: u32,
    /// Requested height in pixels.
    pub height: u32,
    /// Requested frames per second.
    pub fps: u32,
    /// How long to wait for one frame before reporting
    /// [`CaptureError::Timeout`].
    pub frame_timeout: Duration,
    /// Wait before the first reopen attempt after a disconnect.
    pub reopen_backoff_min: Duration,
    /// Ceiling of the doubling reopen backoff.
    pub reopen_backoff_max: Duration,
}

impl CameraConfig {
    /// 640x480 at 30 fps from `device`, 2 s frame timeout, reopen backoff
    /// from 100 ms doubling up to 2 s.
    pub fn new(device: impl Into<PathBuf>) -> Self {
        Self {
            device: device.into(),
            width: 640,
            height: 480,
            fps: 30,
            frame_timeout: Duration::from_secs(2),
            reopen_backoff_min: Duration::from_millis(100),
            reopen_backoff_max: Duration::from_secs(2),
        }
    }
}

/// Which pins the buttons are on (BCM numbering, not header positions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ButtonConfig {
    /// Button that takes a photograph; wired to ground, internal pull-up.
    pub capture_pin: u8,
    /// Optional second button that confirms the last capture.
    pub confirm_pin: Option<u8>,
    /// Presses closer together than this on one pin count once.
    pub debounce: Duration,
}

impl ButtonConfig {
    /// A capture button on `capture_pin`, no confirm button, 30 ms debounce
    /// (longer than typical tactile-switch bounce, shorter than a
    /// deliberate double press).
    pub fn new(capture_pin: u8) -> Self {
        Self {
            capture_pin,
            confirm_pin: None,
            debounce: Duration::from_millis(30),
        }
    }
}

/// Panel controller chip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelController {
    /// Sitronix ST7789 (240x240 and 240x320 IPS modules).
    St7789,
    /// Ilitek ILI9341 (320x240 TFT modules).
    Ili9341,
}

/// How the panel is wired and set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiPanelConfig {
    /// Controller chip.
    pub controller: PanelController,
    /// Visible width in pixels, after `madctl`'s rotation.
    pub width: u16,
    /// Visible height in pixels.
    pub height: u16,
    /// Column of the controller's memory where the visible area starts
    /// (240x240 ST7789 modules sit inside 240x320 memory).
    pub x_offset: u16,
    /// Row where the visible area starts.
    pub y_offset: u16,
    /// Memory access control byte: rotation/mirroring and RGB/BGR order.
    pub madctl: u8,
    /// IPS panels show inverted colours unless inversion is switched on.
    pub invert_colors: bool,
    /// SPI bus number (`/dev/spidev<bus>.<chip_select>`).
    pub spi_bus: u8,
    /// Chip-select line of that bus.
    pub chip_select: u8,
    /// SPI clock in hertz.
    pub clock_hz: u32,
    /// BCM pin driving the panel's D/C line (low = command).
    pub dc_pin: u8,
    /// BCM pin driving the panel's reset line, if wired.
    pub reset_pin: Option<u8>,
    /// BCM pin switching the backlight, if wired (set high on open).
    pub backlight_pin: Option<u8>,
}

impl SpiPanelConfig {
    /// A 240x240 ST7789 IPS module (Waveshare/Adafruit 1.3"-1.54" class) on
    /// SPI0 CE0, D/C on GPIO 25, reset on GPIO 27, backlight on GPIO 24.
    pub fn st7789_240x240() -> Self {
        Self {
            controller: PanelController::St7789,
            width: 240,
            height: 240,
            x_offset: 0,
            y_offset: 0,
            madctl: 0x00,
            invert_colors: true,
            spi_bus: 0,
            chip_select: 0,
            clock_hz: 40_000_000,
            dc_pin: 25,
            reset_pin: Some(27),
            backlight_pin: Some(24),
        }
    }

    /// A 320x240 ILI9341 module in landscape (row/column exchange, BGR
    /// panel) on SPI0 CE0, D/C on GPIO 25, reset on GPIO 27, backlight on
    /// GPIO 24.
    pub fn ili9341_320x240() -> Self {
        Self {
            controller: PanelController::Ili9341,
            width: 320,
            height: 240,
            madctl: 0x28,
            invert_colors: false,
            clock_hz: 32_000_000,
            ..Self::st7789_240x240()
        }
    }
}
