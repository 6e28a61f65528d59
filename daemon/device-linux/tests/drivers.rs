//! The Linux drivers on a machine without their hardware: each fails at
//! construction with the typed error and fix `dermascope-device` promises,
//! and the camera's reopen backoff holds without a camera. A real camera is
//! checked by `examples/camera_probe` under `scripts/test-vm` (vivid).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dermascope_device::{
    ButtonConfig, CameraConfig, CaptureError, DisplayError, FrameSource, LightError, ManualClock,
    SpiPanelConfig, TriggerError,
};
use dermascope_device_linux::{
    FramebufferDisplay, GpioButtons, GpioLight, SpiPanelDisplay, V4l2Source,
};

fn absent_path(prefix: &str) -> PathBuf {
    (40..1000)
        .map(|n| PathBuf::from(format!("{prefix}{n}")))
        .find(|path| !path.exists())
        .unwrap()
}

#[test]
fn v4l2_open_of_a_missing_camera_is_not_found() {
    let device = absent_path("/dev/video");
    match V4l2Source::open(CameraConfig::new(&device)) {
        Err(error @ CaptureError::NotFound { .. }) => {
            assert!(error.is_retryable());
            assert!(error.to_string().contains(&device.display().to_string()));
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[test]
fn v4l2_source_waiting_for_an_absent_camera_backs_off_between_attempts() {
    let mut config = CameraConfig::new(absent_path("/dev/video"));
    config.reopen_backoff_min = Duration::from_millis(20);
    config.reopen_backoff_max = Duration::from_millis(40);
    let clock = ManualClock::new();
    let mut camera = V4l2Source::waiting_for(config).with_clock(Arc::new(clock.clone()));
    assert!(camera.negotiated().is_none());
    assert!(camera.describe().contains("not opened yet"));
    let ms = Duration::from_millis;
    // Each attempt happens after the wait before it: the first at once,
    // then 20, 40 and 40 ms (doubling, capped), so a caller looping on
    // next_frame cannot spin.
    let mut attempts = Vec::new();
    for _ in 0..4 {
        assert!(matches!(
            camera.next_frame(),
            Err(CaptureError::NotFound { .. })
        ));
        attempts.push(clock.elapsed());
    }
    assert_eq!(attempts, [ms(0), ms(20), ms(60), ms(100)]);
    assert_eq!(clock.sleeps(), [ms(20), ms(40), ms(40)]);
    // A caller that was away longer than the backoff is not made to wait.
    clock.advance(ms(500));
    assert!(camera.next_frame().is_err());
    assert_eq!(clock.sleeps().len(), 3);
    assert_eq!(clock.elapsed(), ms(600));
    // Nor is one that comes back part-way: it waits only the rest.
    clock.advance(ms(15));
    assert!(camera.next_frame().is_err());
    assert_eq!(clock.sleeps()[3..], [ms(25)]);
}

#[test]
fn v4l2_open_of_something_that_is_not_a_camera_is_unsupported() {
    let file = tempfile::NamedTempFile::new().unwrap();
    match V4l2Source::open(CameraConfig::new(file.path())) {
        Err(error @ CaptureError::Unsupported { .. }) => assert!(!error.is_retryable()),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

fn is_raspberry_pi() -> bool {
    fs::read_to_string("/proc/device-tree/model").is_ok_and(|model| model.contains("Raspberry Pi"))
}

#[test]
fn gpio_off_a_raspberry_pi_is_unavailable_with_a_fix() {
    if is_raspberry_pi() {
        dermascope_testkit::skip(
            "gpio_off_a_raspberry_pi_is_unavailable_with_a_fix",
            dermascope_testkit::Need::Hardware,
            "this is a Raspberry Pi, GPIO may really be there",
        );
        return;
    }
    match GpioButtons::open(&ButtonConfig::new(17)) {
        Err(TriggerError::Unavailable { reason }) => {
            assert!(reason.contains("Raspberry Pi"), "{reason}");
            assert!(reason.contains("control-socket"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(matches!(
        GpioLight::open(18),
        Err(LightError::Unavailable { .. })
    ));
}

#[test]
fn spi_panel_without_spi_is_unavailable() {
    if Path::new("/dev/spidev0.0").exists() {
        dermascope_testkit::skip(
            "spi_panel_without_spi_is_unavailable",
            dermascope_testkit::Need::Hardware,
            "this machine has /dev/spidev0.0",
        );
        return;
    }
    match SpiPanelDisplay::open(SpiPanelConfig::st7789_240x240()) {
        Err(DisplayError::Unavailable { reason }) => {
            assert!(reason.contains("dtparam=spi=on"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn framebuffer_open_explains_missing_and_wrong_devices() {
    let device = absent_path("/dev/fb");
    match FramebufferDisplay::open(&device) {
        Err(DisplayError::NotFound {
            device: reported,
            fix,
        }) => {
            assert_eq!(reported, device);
            assert!(fix.contains("overlay"), "{fix}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    match FramebufferDisplay::open(file.path()) {
        Err(error @ DisplayError::UnsupportedFormat { .. }) => {
            assert!(error.to_string().contains("not a framebuffer"), "{error}");
            assert!(!error.is_retryable());
        }
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
}
