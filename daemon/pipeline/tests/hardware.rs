//! The configuration reaches the hardware drivers as the settings they
//! take, what the drivers return is what the daemon gets, and the host
//! kinds never ask the drivers for anything: checked with drivers that
//! record what they were asked for.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dermascope_device::{
    ButtonConfig, CameraConfig, CaptureError, Display, DisplayError, FrameSource, InMemoryDisplay,
    Light, LightError, LoggingLight, ScriptedTrigger, SpiPanelConfig, Trigger, TriggerError,
};
use dermascope_pipeline::hardware::{self, Drivers};
use dermascope_pipeline::{BurstError, Config};

#[derive(Debug, PartialEq)]
enum Asked {
    Camera(CameraConfig),
    Buttons(ButtonConfig),
    Light(u8),
    Framebuffer(PathBuf),
    Panel(SpiPanelConfig),
}

/// Records each request; the camera is refused (not retryable, so the
/// camera thread asks once), the rest are host stand-ins.
struct Recording(Mutex<Sender<Asked>>);

/// Recording drivers, and what they were asked for, in order.
fn recording() -> (Arc<dyn Drivers>, Receiver<Asked>) {
    let (sender, asked) = mpsc::channel();
    (Arc::new(Recording(Mutex::new(sender))), asked)
}

impl Recording {
    fn record(&self, asked: Asked) {
        self.0.lock().unwrap().send(asked).unwrap();
    }
}

/// The size of the display the recording drivers hand out, so a test can
/// tell it from any display the pipeline might make itself.
const RECORDED_DISPLAY: (u32, u32) = (7, 5);

impl Drivers for Recording {
    fn open_camera(&self, config: &CameraConfig) -> Result<Box<dyn FrameSource>, CaptureError> {
        self.record(Asked::Camera(config.clone()));
        Err(CaptureError::Unsupported {
            device: config.device.display().to_string(),
            reason: "recorded".into(),
        })
    }

    fn open_buttons(&self, config: &ButtonConfig) -> Result<Box<dyn Trigger>, TriggerError> {
        self.record(Asked::Buttons(config.clone()));
        Ok(Box::new(ScriptedTrigger::new([])))
    }

    fn open_light(&self, pin: u8) -> Result<Box<dyn Light>, LightError> {
        self.record(Asked::Light(pin));
        Ok(Box::new(LoggingLight::new()))
    }

    fn open_framebuffer(&self, device: &Path) -> Result<Box<dyn Display>, DisplayError> {
        self.record(Asked::Framebuffer(device.to_path_buf()));
        let (width, height) = RECORDED_DISPLAY;
        Ok(Box::new(InMemoryDisplay::new(width, height)))
    }

    fn open_spi_panel(&self, config: &SpiPanelConfig) -> Result<Box<dyn Display>, DisplayError> {
        self.record(Asked::Panel(config.clone()));
        let (width, height) = RECORDED_DISPLAY;
        Ok(Box::new(InMemoryDisplay::new(width, height)))
    }
}

fn parse(toml: &str) -> Config {
    Config::parse(toml, Path::new("test.toml")).unwrap()
}

#[test]
fn hardware_sections_reach_the_drivers_as_their_settings() {
    let config = parse(
        r#"
[camera]
source = "v4l2"
device = "/dev/video3"
width = 1280
height = 720
fps = 15

[trigger]
input = "gpio"
capture_pin = 5
confirm_pin = 6
debounce_ms = 45
led_pin = 12

[display]
output = "spi"
panel = "ili9341"
spi_bus = 1
chip_select = 1
dc_pin = 22
reset_pin = 23
backlight_pin = 18
"#,
    );
    let (drivers, asked) = recording();

    let display = hardware::open_display(&config, &drivers).unwrap();
    assert_eq!(display.size(), RECORDED_DISPLAY);
    assert_eq!(
        asked.try_recv().unwrap(),
        Asked::Panel(SpiPanelConfig {
            spi_bus: 1,
            chip_select: 1,
            dc_pin: 22,
            reset_pin: Some(23),
            backlight_pin: Some(18),
            ..SpiPanelConfig::ili9341_320x240()
        })
    );

    hardware::open_trigger(&config, &drivers).unwrap();
    assert_eq!(
        asked.try_recv().unwrap(),
        Asked::Buttons(ButtonConfig {
            capture_pin: 5,
            confirm_pin: Some(6),
            debounce: Duration::from_millis(45),
        })
    );

    hardware::open_light(&config, &drivers).unwrap();
    assert_eq!(asked.try_recv().unwrap(), Asked::Light(12));

    let feed = hardware::start_camera(&config, &drivers).unwrap();
    // The camera thread asks; the timeout is only a hang watchdog.
    let camera = asked.recv_timeout(Duration::from_secs(60)).unwrap();
    let mut expected = CameraConfig::new("/dev/video3");
    expected.width = 1280;
    expected.height = 720;
    expected.fps = 15;
    assert_eq!(camera, Asked::Camera(expected));
    drop(feed);

    let framebuffer = parse("[display]\noutput = \"framebuffer\"\nframebuffer = \"/dev/fb1\"\n");
    let display = hardware::open_display(&framebuffer, &drivers).unwrap();
    assert_eq!(display.size(), RECORDED_DISPLAY);
    assert_eq!(
        asked.try_recv().unwrap(),
        Asked::Framebuffer(PathBuf::from("/dev/fb1"))
    );
    assert!(asked.try_recv().is_err(), "nothing else was asked for");
}

#[test]
fn host_kinds_never_ask_the_drivers() {
    let dir = tempfile::tempdir().unwrap();
    let replay = dir.path().join("replay");
    std::fs::create_dir_all(&replay).unwrap();
    let config = parse(&format!(
        "[camera]\nsource = \"replay\"\nreplay_dir = {:?}\n\
         [trigger]\ninput = \"socket\"\nsocket = {:?}\n\
         [display]\noutput = \"png\"\npng_dir = {:?}\nwidth = 240\nheight = 240\n",
        replay,
        dir.path().join("control.sock"),
        dir.path().join("screens"),
    ));
    let (drivers, asked) = recording();
    let display = hardware::open_display(&config, &drivers).unwrap();
    assert_eq!(display.size(), (240, 240));
    hardware::open_trigger(&config, &drivers).unwrap();
    hardware::open_light(&config, &drivers).unwrap();
    let feed = hardware::start_camera(&config, &drivers).unwrap();
    // The empty replay folder stops the camera thread: proof that it opened
    // the replay source itself (the timeout is only a hang watchdog).
    match feed.burst(1, Duration::from_secs(60)) {
        Err(BurstError::Failed(reason)) => assert!(reason.contains("replay folder"), "{reason}"),
        other => panic!("expected the replay folder's error, got {other:?}"),
    }
    drop(feed);
    assert_eq!(asked.try_recv().ok(), None);
}
