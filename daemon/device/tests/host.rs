//! The host implementations. Nothing here needs a camera, GPIO or a screen;
//! the real drivers' tests are in `dermascope-device-linux`.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dermascope_device::{
    decode_mjpeg, yuyv_to_rgb, ButtonConfig, CameraConfig, CaptureError, ControlSocketTrigger,
    Display, DisplayError, Drivers, FrameSource, InMemoryDisplay, Light, LightError, LoggingLight,
    ManualClock, NoHardware, PngSnapshotDisplay, ReplaySource, ScriptedTrigger, SpiPanelConfig,
    Trigger, TriggerError, TriggerEvent,
};
use image::{ImageFormat, Rgb, RgbImage};

fn solid(width: u32, height: u32, colour: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(width, height, Rgb(colour))
}

fn encode(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .unwrap();
    bytes
}

/// A replay folder: a.png (red 4x2), b.jpg (grey 8x8), c.png (garbage),
/// notes.txt (not an image).
fn replay_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("a.png"),
        encode(&solid(4, 2, [255, 0, 0]), ImageFormat::Png),
    )
    .unwrap();
    fs::write(
        dir.path().join("b.jpg"),
        encode(&solid(8, 8, [128, 128, 128]), ImageFormat::Jpeg),
    )
    .unwrap();
    fs::write(
        dir.path().join("c.png"),
        b"\x89PNG\r\n\x1a\nthis is not a png",
    )
    .unwrap();
    fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    dir
}

#[test]
fn replay_loops_in_name_order_and_survives_a_corrupt_file() {
    let dir = replay_folder();
    let mut source = ReplaySource::open(dir.path(), 1000.0).unwrap();
    assert_eq!(source.len(), 3);
    assert!(source.describe().contains("3 images"));

    let first = source.next_frame().unwrap();
    assert_eq!((first.width, first.height, first.sequence), (4, 2, 0));
    assert_eq!(first.rgb.len(), 4 * 2 * 3);
    assert!(first.rgb.chunks(3).all(|p| p == [255, 0, 0]));

    let second = source.next_frame().unwrap();
    assert_eq!((second.width, second.height, second.sequence), (8, 8, 1));
    assert!(second.rgb.iter().all(|&v| v.abs_diff(128) <= 2));

    match source.next_frame() {
        Err(error @ CaptureError::CorruptFrame { sequence: 2, .. }) => {
            assert!(error.is_retryable())
        }
        other => panic!("expected a corrupt frame 2, got {other:?}"),
    }

    // Back to the start of the folder, sequence still counting.
    let again = source.next_frame().unwrap();
    assert_eq!((again.width, again.height, again.sequence), (4, 2, 3));
    assert_eq!(again.rgb, first.rgb);
}

#[test]
fn replay_paces_frames_at_the_set_rate() {
    let dir = replay_folder();
    let fps = 50.0;
    let period = Duration::from_secs_f64(1.0 / fps);
    let clock = ManualClock::new();
    let t0 = clock.start();
    let mut source = ReplaySource::open(dir.path(), fps)
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    let mut delivered = Vec::new();
    for _ in 0..6 {
        match source.next_frame() {
            Ok(frame) => delivered.push((frame.sequence, frame.captured_at)),
            Err(CaptureError::CorruptFrame { .. }) => {}
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(delivered.len(), 4);
    // Frame k is released exactly k periods after the first (the corrupt
    // c.png takes its turn too), and only by waiting for it.
    for (sequence, captured_at) in &delivered {
        assert_eq!(
            *captured_at - t0,
            period * *sequence as u32,
            "frame {sequence}"
        );
    }
    assert_eq!(clock.sleeps(), vec![period; 5]);

    // A consumer busy for ten periods gets the next frame at once, and the
    // one after a period later: the backlog is dropped, not burst out.
    clock.advance(period * 10);
    let late = clock.start() + clock.elapsed();
    let frame = source.next_frame().unwrap();
    assert_eq!((frame.sequence, frame.captured_at), (6, late));
    assert_eq!(clock.sleeps().len(), 5, "no wait when late");
    let frame = source.next_frame().unwrap();
    assert_eq!((frame.sequence, frame.captured_at), (7, late + period));
    assert_eq!(clock.sleeps()[5..], [period]);
}

#[test]
fn replay_refuses_missing_or_empty_folders_and_bad_rates() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("readme.txt"), "no images").unwrap();
    let empty = ReplaySource::open(dir.path(), 10.0).unwrap_err();
    assert!(matches!(empty, CaptureError::ReplayFolder { .. }));
    assert!(
        empty.to_string().contains("no .jpg, .jpeg or .png"),
        "{empty}"
    );
    assert!(!empty.is_retryable());

    let missing = ReplaySource::open(dir.path().join("absent"), 10.0).unwrap_err();
    assert!(matches!(missing, CaptureError::ReplayFolder { .. }));
    assert!(missing.to_string().contains("absent"), "{missing}");

    let images = replay_folder();
    for fps in [0.0, -1.0, f64::NAN] {
        assert!(ReplaySource::open(images.path(), fps).is_err());
    }
}

#[test]
fn yuyv_converts_to_known_bt601_colours() {
    // Two pixels per YUYV quad: (Y0 U Y1 V). Reference values are the
    // BT.601 limited-range colour bars.
    let cases: [([u8; 4], [u8; 6]); 4] = [
        ([16, 128, 16, 128], [0, 0, 0, 0, 0, 0]),
        ([235, 128, 235, 128], [255, 255, 255, 255, 255, 255]),
        ([81, 90, 81, 240], [255, 0, 0, 255, 0, 0]),
        ([41, 240, 41, 110], [0, 0, 255, 0, 0, 255]),
    ];
    for (yuyv, rgb) in cases {
        assert_eq!(yuyv_to_rgb(&yuyv, 2, 1, 4, 0).unwrap(), rgb, "{yuyv:?}");
    }
    // Green bar (Y 145, Cb 54, Cr 34) lands within rounding of pure green.
    let green = yuyv_to_rgb(&[145, 54, 145, 34], 2, 1, 4, 0).unwrap();
    assert!(
        green[0] <= 1 && green[1] >= 254 && green[2] <= 1,
        "{green:?}"
    );
    // The two pixels of a quad share chroma but keep their own luma.
    assert_eq!(
        yuyv_to_rgb(&[16, 128, 235, 128], 2, 1, 4, 0).unwrap(),
        [0, 0, 0, 255, 255, 255]
    );
}

#[test]
fn yuyv_skips_row_padding_and_rejects_short_buffers() {
    // 2x2 with a 6-byte stride: the 2 padding bytes per row must be ignored.
    let padded = [16, 128, 16, 128, 99, 99, 235, 128, 235, 128];
    let rgb = yuyv_to_rgb(&padded, 2, 2, 6, 7).unwrap();
    assert_eq!(&rgb[..6], &[0; 6]);
    assert_eq!(&rgb[6..], &[255; 6]);

    match yuyv_to_rgb(&padded[..8], 2, 2, 6, 7) {
        Err(CaptureError::CorruptFrame { sequence: 7, .. }) => {}
        other => panic!("expected corrupt frame, got {other:?}"),
    }
    assert!(yuyv_to_rgb(&[0; 6], 3, 1, 6, 0).is_err(), "odd width");
}

#[test]
fn mjpeg_frames_decode_and_corrupt_ones_are_typed() {
    let now = Instant::now();
    let jpeg = encode(&solid(16, 8, [0, 0, 255]), ImageFormat::Jpeg);
    let frame = decode_mjpeg(&jpeg, 5, now).unwrap();
    assert_eq!((frame.width, frame.height, frame.sequence), (16, 8, 5));
    assert!(frame.rgb.chunks(3).all(|p| p[2] > 240 && p[0] < 16));

    // Zero padding after EOI, as some cameras send, is fine.
    let mut padded = jpeg.clone();
    padded.extend_from_slice(&[0; 64]);
    assert!(decode_mjpeg(&padded, 6, now).is_ok());

    let mut garbled = jpeg.clone();
    for byte in &mut garbled[2..jpeg.len() - 2] {
        *byte = 0xA5;
    }
    let truncated = &jpeg[..jpeg.len() / 2];
    for (what, bytes) in [
        ("garbled", &garbled[..]),
        ("truncated", truncated),
        ("empty", &[][..]),
        ("not jpeg", &b"hello"[..]),
    ] {
        match decode_mjpeg(bytes, 9, now) {
            Err(error @ CaptureError::CorruptFrame { sequence: 9, .. }) => {
                assert!(error.is_retryable())
            }
            other => panic!("{what}: expected CorruptFrame, got {other:?}"),
        }
    }
    // The next good frame still decodes.
    assert!(decode_mjpeg(&jpeg, 10, now).is_ok());
}

fn send(socket: &Path, lines: &str) -> Vec<String> {
    let mut client = UnixStream::connect(socket).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(lines.as_bytes()).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    BufReader::new(client).lines().map(Result::unwrap).collect()
}

#[test]
fn control_socket_turns_lines_into_events_and_rejects_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let mut trigger = ControlSocketTrigger::bind(&path).unwrap();
    let timeout = Duration::from_secs(10);

    let replies = send(&path, "capture\nconfirm mel\n\nselfie\nconfirm\n");
    assert_eq!(replies.len(), 4, "{replies:?}");
    assert_eq!(replies[0], "ok");
    assert_eq!(replies[1], "ok");
    assert!(
        replies[2].starts_with("error: unknown command 'selfie'"),
        "{replies:?}"
    );
    assert_eq!(replies[3], "ok");
    assert_eq!(trigger.wait(timeout).unwrap(), Some(TriggerEvent::Capture));
    assert_eq!(
        trigger.wait(timeout).unwrap(),
        Some(TriggerEvent::Confirm {
            label: Some("mel".into())
        })
    );
    assert_eq!(
        trigger.wait(timeout).unwrap(),
        Some(TriggerEvent::Confirm { label: None })
    );

    // A second client after the first, and a last line without a newline.
    assert_eq!(send(&path, "shutdown"), ["ok"]);
    assert_eq!(trigger.wait(timeout).unwrap(), Some(TriggerEvent::Shutdown));

    // An over-long line is refused without being buffered, and the
    // connection goes on with the next line.
    let flood = "x".repeat(10_000);
    let replies = send(&path, &format!("{flood}\ncapture\n"));
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert!(replies[0].starts_with("error: line longer"), "{replies:?}");
    assert_eq!(replies[1], "ok");
    assert_eq!(trigger.wait(timeout).unwrap(), Some(TriggerEvent::Capture));

    // Nothing pending: the wait times out empty.
    assert_eq!(trigger.wait(Duration::from_millis(10)).unwrap(), None);

    // The path is taken while the trigger lives...
    assert!(matches!(
        ControlSocketTrigger::bind(&path),
        Err(TriggerError::SocketInUse { .. })
    ));
    // ...and cleaned up when it is dropped.
    drop(trigger);
    assert!(!path.exists());
}

#[test]
fn control_socket_replaces_a_stale_socket_but_not_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut trigger = ControlSocketTrigger::bind(&stale).unwrap();
    assert_eq!(send(&stale, "capture\n"), ["ok"]);
    assert_eq!(
        trigger.wait(Duration::from_secs(10)).unwrap(),
        Some(TriggerEvent::Capture)
    );

    let regular = dir.path().join("notes.txt");
    fs::write(&regular, "keep me").unwrap();
    assert!(matches!(
        ControlSocketTrigger::bind(&regular),
        Err(TriggerError::Io { .. })
    ));
    assert_eq!(fs::read_to_string(&regular).unwrap(), "keep me");
}

#[test]
fn scripted_trigger_plays_its_events_then_idles() {
    let mut trigger = ScriptedTrigger::new([
        TriggerEvent::Capture,
        TriggerEvent::Confirm {
            label: Some("nv".into()),
        },
        TriggerEvent::Shutdown,
    ]);
    let tick = Duration::from_millis(1);
    assert_eq!(trigger.wait(tick).unwrap(), Some(TriggerEvent::Capture));
    assert_eq!(trigger.remaining(), 2);
    assert!(matches!(
        trigger.wait(tick).unwrap(),
        Some(TriggerEvent::Confirm { label: Some(l) }) if l == "nv"
    ));
    assert_eq!(trigger.wait(tick).unwrap(), Some(TriggerEvent::Shutdown));
    assert_eq!(trigger.wait(tick).unwrap(), None);
}

#[test]
fn logging_light_keeps_its_state() {
    let mut light = LoggingLight::new();
    assert!(!light.is_on());
    light.set(true).unwrap();
    assert!(light.is_on());
    light.set(false).unwrap();
    assert!(!light.is_on());
}

fn gradient(width: u32, height: u32) -> Vec<u8> {
    (0..width * height)
        .flat_map(|i| [(i % 256) as u8, (i / 256 % 256) as u8, 7])
        .collect()
}

#[test]
fn png_display_writes_numbered_and_latest_screens() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("screens");
    let mut display = PngSnapshotDisplay::new(&out, 320, 240).unwrap();
    assert_eq!(display.size(), (320, 240));

    let first = gradient(320, 240);
    display.present(320, 240, &first).unwrap();
    let second = vec![200u8; 320 * 240 * 3];
    display.present(320, 240, &second).unwrap();

    let read = |name: &str| image::open(out.join(name)).unwrap().into_rgb8();
    let screen1 = read("screen-1.png");
    assert_eq!(screen1.dimensions(), (320, 240));
    assert_eq!(screen1.into_raw(), first);
    assert_eq!(read("screen-2.png").into_raw(), second);
    assert_eq!(read("latest.png").into_raw(), second);

    // Only the three PNGs: no temporary files left behind.
    let mut names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["latest.png", "screen-1.png", "screen-2.png"]);

    // Screens show case thumbnails: the folder and every screen are the
    // daemon user's alone, whatever the umask (0022 in most test runs).
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out), 0o700);
    for name in &names {
        assert_eq!(mode(&out.join(name)), 0o600, "{name}");
    }
}

#[test]
fn png_display_fits_other_sizes_and_refuses_bad_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let mut display = PngSnapshotDisplay::new(dir.path(), 240, 240).unwrap();
    display
        .present(320, 240, &vec![255u8; 320 * 240 * 3])
        .unwrap();
    let latest = image::open(dir.path().join("latest.png"))
        .unwrap()
        .into_rgb8();
    assert_eq!(latest.dimensions(), (240, 240));
    // 320x240 scaled to 240x180, centred: black bands of 30 rows.
    assert_eq!(latest.get_pixel(120, 0).0, [0, 0, 0]);
    assert_eq!(latest.get_pixel(120, 120).0, [255, 255, 255]);
    assert_eq!(latest.get_pixel(120, 239).0, [0, 0, 0]);

    assert!(matches!(
        display.present(240, 240, &[0; 10]),
        Err(DisplayError::BadScreen { .. })
    ));
    assert!(!dir.path().join("screen-2.png").exists());
}

#[test]
fn in_memory_display_keeps_the_last_screen_behind_a_trait_object() {
    let memory = InMemoryDisplay::new(4, 2);
    let presented = memory.presented();
    let mut display: Box<dyn Display> = Box::new(memory);
    assert_eq!(presented.count(), 0);
    assert!(presented.last().is_none());
    display.present(4, 2, &gradient(4, 2)).unwrap();
    display.present(4, 2, &[9; 24]).unwrap();
    assert_eq!(presented.count(), 2);
    let last = presented.last().unwrap();
    assert_eq!((last.width, last.height), (4, 2));
    assert_eq!(last.rgb, vec![9; 24]);
}

#[test]
fn no_hardware_refuses_every_device_with_its_typed_error_and_the_stand_in_to_use() {
    let drivers: &dyn Drivers = &NoHardware;
    match drivers.open_camera(&CameraConfig::new("/dev/video0")) {
        Err(error @ CaptureError::Unsupported { .. }) => {
            // Not retryable: the camera thread must stop asking, not spin.
            assert!(!error.is_retryable());
            let message = error.to_string();
            assert!(message.contains("/dev/video0"), "{message}");
            assert!(message.contains("replay camera"), "{message}");
        }
        Err(other) => panic!("expected Unsupported, got {other:?}"),
        Ok(_) => panic!("NoHardware opened a camera"),
    }
    match drivers.open_buttons(&ButtonConfig::new(17)) {
        Err(TriggerError::Unavailable { reason }) => {
            assert!(reason.contains("control-socket"), "{reason}")
        }
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("NoHardware opened buttons"),
    }
    match drivers.open_light(18) {
        Err(LightError::Unavailable { reason }) => {
            assert!(reason.contains("pin 18"), "{reason}")
        }
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("NoHardware opened a light"),
    }
    match drivers.open_framebuffer(Path::new("/dev/fb7")) {
        Err(DisplayError::Unavailable { reason }) => {
            assert!(
                reason.contains("/dev/fb7") && reason.contains("PNG display"),
                "{reason}"
            )
        }
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("NoHardware opened a framebuffer"),
    }
    let panel = SpiPanelConfig {
        spi_bus: 1,
        chip_select: 2,
        ..SpiPanelConfig::st7789_240x240()
    };
    match drivers.open_spi_panel(&panel) {
        Err(DisplayError::Unavailable { reason }) => {
            assert!(
                reason.contains("/dev/spidev1.2") && reason.contains("PNG display"),
                "{reason}"
            )
        }
        Err(other) => panic!("expected Unavailable, got {other:?}"),
        Ok(_) => panic!("NoHardware opened an SPI panel"),
    }
}
