//! Opening the configured drivers: the host stand-ins here, the real ones
//! through a [`Drivers`] the caller hands in (the binary's Linux drivers on
//! the device, [`NoHardware`] in a host build or a test). The loop only ever
//! sees the traits.
//!
//! Architecture Invariant: the pipeline names no driver crate; it maps its
//! configuration onto `dermascope-device`'s plain settings and asks
//! [`Drivers`] for the hardware, so it builds without v4l or rppal.

use std::sync::Arc;

use dermascope_device::{
    socket_group_id, ButtonConfig, CameraConfig, ControlSocketOptions, ControlSocketTrigger,
    Display, FrameSource, Light, LoggingLight, PanelController, PngSnapshotDisplay, ReplaySource,
    SpiPanelConfig, Trigger,
};
pub use dermascope_device::{Drivers, NoHardware};

use crate::config::{CameraKind, CaptureKind, Config, DisplayKind, PanelKind, TriggerKind};
use crate::feed::{CameraFeed, FeedOptions};

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
pub fn start_camera(
    config: &Config,
    drivers: &Arc<dyn Drivers>,
) -> Result<CameraFeed, HardwareError> {
    let camera = config.camera.clone();
    // A burst takes only frames that arrive after the press: keeping more
    // than the latest would only hold memory.
    let options = FeedOptions {
        ring_frames: match config.pipeline.capture {
            CaptureKind::Ring => config.pipeline.ring_frames as usize,
            CaptureKind::Burst => 1,
        },
        ..FeedOptions::default()
    };
    let feed = match camera.source {
        CameraKind::V4l2 => {
            let mut v4l2 = CameraConfig::new(camera.device.clone());
            v4l2.width = camera.width;
            v4l2.height = camera.height;
            v4l2.fps = camera.fps;
            let drivers = Arc::clone(drivers);
            CameraFeed::start_with_options(
                format!("V4L2 {}", camera.device.display()),
                move || drivers.open_camera(&v4l2),
                options,
            )
        }
        CameraKind::Replay => {
            let folder = camera.replay_dir.clone();
            let fps = camera.replay_fps;
            CameraFeed::start_with_options(
                format!("replay of {}", folder.display()),
                move || {
                    ReplaySource::open(folder.clone(), fps)
                        .map(|s| Box::new(s) as Box<dyn FrameSource>)
                },
                options,
            )
        }
    };
    feed.map_err(HardwareError::Thread)
}

pub fn open_trigger(
    config: &Config,
    drivers: &Arc<dyn Drivers>,
) -> Result<Box<dyn Trigger>, HardwareError> {
    let t = &config.trigger;
    match t.input {
        TriggerKind::Gpio => {
            let mut buttons = ButtonConfig::new(t.capture_pin);
            buttons.confirm_pin = t.confirm_pin;
            buttons.debounce = std::time::Duration::from_millis(t.debounce_ms);
            drivers
                .open_buttons(&buttons)
                .map_err(|source| HardwareError::Trigger {
                    key: "trigger.input",
                    value: "gpio".into(),
                    source,
                })
        }
        TriggerKind::Socket => {
            let mut options = ControlSocketOptions::default();
            if let Some(group) = &t.socket_group {
                let gid = socket_group_id(group).map_err(|source| HardwareError::Trigger {
                    key: "trigger.socket_group",
                    value: group.clone(),
                    source,
                })?;
                options.allowed_gid = Some(gid);
            }
            ControlSocketTrigger::bind_with(t.socket.clone(), options)
                .map(|s| Box::new(s) as Box<dyn Trigger>)
                .map_err(|source| HardwareError::Trigger {
                    key: "trigger.socket",
                    value: t.socket.display().to_string(),
                    source,
                })
        }
    }
}

pub fn open_light(
    config: &Config,
    drivers: &Arc<dyn Drivers>,
) -> Result<Box<dyn Light>, HardwareError> {
    match config.trigger.led_pin {
        Some(pin) => drivers
            .open_light(pin)
            .map_err(|source| HardwareError::Light { pin, source }),
        None => Ok(Box::new(LoggingLight::new())),
    }
}

pub fn open_display(
    config: &Config,
    drivers: &Arc<dyn Drivers>,
) -> Result<Box<dyn Display>, HardwareError> {
    let d = &config.display;
    match d.output {
        DisplayKind::Png => PngSnapshotDisplay::new(d.png_dir.clone(), d.width, d.height)
            .map(|p| Box::new(p) as Box<dyn Display>)
            .map_err(|source| HardwareError::Display {
                output: "png",
                source,
            }),
        DisplayKind::Framebuffer => {
            drivers
                .open_framebuffer(&d.framebuffer)
                .map_err(|source| HardwareError::Display {
                    output: "framebuffer",
                    source,
                })
        }
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
            drivers
                .open_spi_panel(&panel)
                .map_err(|source| HardwareError::Display {
                    output: "spi",
                    source,
                })
        }
    }
}
