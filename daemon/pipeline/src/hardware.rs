//! Opening the configured drivers: the real ones on the device, the host
//! stand-ins on a PC. The loop only ever sees the traits.

use dermascope_device::{
    ButtonConfig, CameraConfig, ControlSocketTrigger, Display, FrameSource, FramebufferDisplay,
    GpioButtons, GpioLight, Light, LoggingLight, PanelController, PngSnapshotDisplay, ReplaySource,
    SpiPanelConfig, SpiPanelDisplay, Trigger, V4l2Source,
};

use crate::config::{CameraKind, Config, DisplayKind, PanelKind, TriggerKind};
use crate::feed::CameraFeed;

/// A driver that could not be opened, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum HardwareError {
    #[error("trigger ({key} = {value:?}): {source}. On a PC set [trigger] input = \"socket\".")]
    Trigger {
        key: &'static str,
        value: String,
        source: dermascope_device::TriggerError,
    },
    #[error(
        "light ring (trigger.led_pin = {pin}): {source}. Remove led_pin if the ring is always on."
    )]
    Light {
        pin: u8,
        source: dermascope_device::LightError,
    },
    #[error("display ([display] output = {output:?}): {source}. On a PC set [display] output = \"png\".")]
    Display {
        output: &'static str,
        source: dermascope_device::DisplayError,
    },
    #[error("camera thread: {0}")]
    Thread(std::io::Error),
}

/// Starts the camera thread for the configured source. An absent or busy
/// camera is not an error here: the thread keeps trying and the screen says so.
pub fn start_camera(config: &Config) -> Result<CameraFeed, HardwareError> {
    let camera = config.camera.clone();
    let feed = match camera.source {
        CameraKind::V4l2 => {
            let mut v4l2 = CameraConfig::new(camera.device.clone());
            v4l2.width = camera.width;
            v4l2.height = camera.height;
            v4l2.fps = camera.fps;
            CameraFeed::start_with(format!("V4L2 {}", camera.device.display()), move || {
                V4l2Source::open(v4l2.clone()).map(|s| Box::new(s) as Box<dyn FrameSource>)
            })
        }
        CameraKind::Replay => {
            let folder = camera.replay_dir.clone();
            let fps = camera.replay_fps;
            CameraFeed::start_with(format!("replay of {}", folder.display()), move || {
                ReplaySource::open(folder.clone(), fps).map(|s| Box::new(s) as Box<dyn FrameSource>)
            })
        }
    };
    feed.map_err(HardwareError::Thread)
}

pub fn open_trigger(config: &Config) -> Result<Box<dyn Trigger>, HardwareError> {
    let t = &config.trigger;
    match t.input {
        TriggerKind::Gpio => {
            let mut buttons = ButtonConfig::new(t.capture_pin);
            buttons.confirm_pin = t.confirm_pin;
            buttons.debounce = std::time::Duration::from_millis(t.debounce_ms);
            GpioButtons::open(&buttons)
                .map(|b| Box::new(b) as Box<dyn Trigger>)
                .map_err(|source| HardwareError::Trigger {
                    key: "trigger.input",
                    value: "gpio".into(),
                    source,
                })
        }
        TriggerKind::Socket => ControlSocketTrigger::bind(t.socket.clone())
            .map(|s| Box::new(s) as Box<dyn Trigger>)
            .map_err(|source| HardwareError::Trigger {
                key: "trigger.socket",
                value: t.socket.display().to_string(),
                source,
            }),
    }
}

pub fn open_light(config: &Config) -> Result<Box<dyn Light>, HardwareError> {
    match config.trigger.led_pin {
        Some(pin) => GpioLight::open(pin)
            .map(|l| Box::new(l) as Box<dyn Light>)
            .map_err(|source| HardwareError::Light { pin, source }),
        None => Ok(Box::new(LoggingLight::new())),
    }
}

pub fn open_display(config: &Config) -> Result<Box<dyn Display>, HardwareError> {
    let d = &config.display;
    match d.output {
        DisplayKind::Png => PngSnapshotDisplay::new(d.png_dir.clone(), d.width, d.height)
            .map(|p| Box::new(p) as Box<dyn Display>)
            .map_err(|source| HardwareError::Display {
                output: "png",
                source,
            }),
        DisplayKind::Framebuffer => FramebufferDisplay::open(d.framebuffer.clone())
            .map(|f| Box::new(f) as Box<dyn Display>)
            .map_err(|source| HardwareError::Display {
                output: "framebuffer",
                source,
            }),
        DisplayKind::Spi => {
            let mut panel = match d.panel {
                PanelKind::St7789 => SpiPanelConfig::st7789_240x240(),
                PanelKind::Ili9341 => SpiPanelConfig::ili9341_320x240(),
            };
            panel.controller = match d.panel {
                PanelKind::St7789 => PanelController::St7789,
                PanelKind::Ili9341 => PanelController::Ili9341,
            };
            panel.spi_bus = d.spi_bus;
            panel.chip_select = d.chip_select;
            panel.dc_pin = d.dc_pin;
            panel.reset_pin = d.reset_pin;
            panel.backlight_pin = d.backlight_pin;
            SpiPanelDisplay::open(panel)
                .map(|p| Box::new(p) as Box<dyn Display>)
                .map_err(|source| HardwareError::Display {
                    output: "spi",
                    source,
                })
        }
    }
}
