//! Exercises the V4L2 driver against a real kernel camera (built for the
//! vivid virtual camera in a VM, works on any webcam).
//!
//! ```text
//! camera_probe --device /dev/video0 --frames N [--width 640 --height 480 --fps 30]
//!              [--disconnect-after K]
//! ```
//!
//! Output is one fact per line, stable for grep:
//!
//! ```text
//! device /dev/video0
//! format YUYV 640x480 30.00fps
//! frame 0 640x480 mean_luma=112.3
//! error corrupt: <message>            (a bad frame; capture goes on)
//! disconnect requested after 5 frames (vivid's "Disconnect" control)
//! error disconnected: <message>
//! error not found: <message>          (reopen attempts, with backoff)
//! result ok                           (exit 0)  |  result failed: <why>  (exit 1)
//! ```
//!
//! Exit codes: 0 the driver behaved as designed, 1 it did not, 2 bad usage.

use std::process::ExitCode;

use dermascope_device::{CameraConfig, CaptureError, Frame, FrameSource, V4l2Source};

/// Reopen attempts shown after the disconnect (each waits out the backoff).
const NOT_FOUND_ATTEMPTS: u32 = 3;

/// Calls after the disconnect request before giving up waiting for errors.
const MAX_CALLS_AFTER_DISCONNECT: u32 = 10;

struct Args {
    config: CameraConfig,
    frames: u64,
    disconnect_after: Option<u64>,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            eprintln!(
                "usage: camera_probe --device /dev/video0 --frames N \
                 [--width 640 --height 480 --fps 30] [--disconnect-after K]"
            );
            return ExitCode::from(2);
        }
    };
    match probe(&args) {
        Ok(()) => {
            println!("result ok");
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("result failed: {why}");
            ExitCode::from(1)
        }
    }
}

fn probe(args: &Args) -> Result<(), String> {
    let device = args.config.device.clone();
    println!("device {}", device.display());
    let mut camera = V4l2Source::open(args.config.clone()).map_err(|e| {
        print_error(&e);
        "could not open the camera".to_string()
    })?;
    if let Some(format) = camera.negotiated() {
        println!("format {format}");
    }

    let wanted = args.disconnect_after.unwrap_or(args.frames);
    let mut captured = 0u64;
    let mut attempts = 0u64;
    // Corrupt frames are allowed, but not an endless run of them.
    while captured < wanted {
        attempts += 1;
        if attempts > wanted * 2 + 10 {
            return Err(format!("only {captured} of {wanted} frames arrived"));
        }
        match camera.next_frame() {
            Ok(frame) => {
                print_frame(&frame);
                captured += 1;
            }
            Err(error) => {
                print_error(&error);
                if !error.is_retryable() {
                    return Err("capture failed with a permanent error".into());
                }
            }
        }
    }
    let Some(after) = args.disconnect_after else {
        return Ok(());
    };

    // vivid re-creates its nodes as soon as the last handle on the device
    // closes, so the handle that pulled "Disconnect" stays open until the
    // driver has reported the camera gone.
    let _unplugged = request_disconnect(&device)?;
    println!("disconnect requested after {after} frames");
    let mut disconnected = false;
    let mut not_found = 0;
    for _ in 0..MAX_CALLS_AFTER_DISCONNECT {
        match camera.next_frame() {
            // Frames the driver finished before the disconnect may still come.
            Ok(frame) if !disconnected => print_frame(&frame),
            Ok(frame) => {
                print_frame(&frame);
                return Err("a frame arrived after the camera was reported disconnected".into());
            }
            Err(error) => {
                print_error(&error);
                match error {
                    CaptureError::Disconnected { .. } if !disconnected => disconnected = true,
                    CaptureError::NotFound { .. } if disconnected => {
                        not_found += 1;
                        if not_found == NOT_FOUND_ATTEMPTS {
                            return Ok(());
                        }
                    }
                    _ => return Err("unexpected error after the disconnect".into()),
                }
            }
        }
    }
    Err(if disconnected {
        "reopen attempts did not report not found".into()
    } else {
        "the disconnect was never reported".into()
    })
}

fn print_frame(frame: &Frame) {
    println!(
        "frame {} {}x{} mean_luma={:.1}",
        frame.sequence,
        frame.width,
        frame.height,
        mean_luma(frame)
    );
}

fn print_error(error: &CaptureError) {
    let kind = match error {
        CaptureError::NotFound { .. } => "not found",
        CaptureError::Busy { .. } => "busy",
        CaptureError::Disconnected { .. } => "disconnected",
        CaptureError::CorruptFrame { .. } => "corrupt",
        CaptureError::Timeout { .. } => "timeout",
        CaptureError::Unsupported { .. } => "unsupported",
        _ => "io",
    };
    println!("error {kind}: {error}");
}

/// BT.601 luma averaged over the frame: enough to see that pixels arrive
/// and change (vivid's test pattern is not flat).
fn mean_luma(frame: &Frame) -> f64 {
    let pixels = frame.rgb.len() / 3;
    if pixels == 0 {
        return 0.0;
    }
    let sum: f64 = frame
        .rgb
        .chunks_exact(3)
        .map(|p| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
        .sum();
    sum / pixels as f64
}

/// Presses vivid's "Disconnect" button control through a second handle on
/// the device (the driver keeps the first one) and returns that handle:
/// while it is open, vivid keeps the camera unplugged.
fn request_disconnect(device: &std::path::Path) -> Result<v4l::Device, String> {
    let handle = v4l::Device::with_path(device)
        .map_err(|e| format!("cannot open {} to disconnect it: {e}", device.display()))?;
    let id = find_control(&handle, "Disconnect")?
        .ok_or("the device has no \"Disconnect\" control (is it vivid?)")?;
    handle
        .set_control(v4l::Control {
            id,
            value: v4l::control::Value::None,
        })
        .map_err(|e| format!("setting the Disconnect control failed: {e}"))?;
    Ok(handle)
}

/// Finds a control id by its name with VIDIOC_QUERY_EXT_CTRL.
///
/// Walks the controls itself instead of calling `Device::query_controls`:
/// v4l 0.14 unwraps the control type there and panics on types newer than
/// it (vivid registers test controls of every type the kernel has).
fn find_control(device: &v4l::Device, name: &str) -> Result<Option<u32>, String> {
    use v4l::v4l_sys::{
        v4l2_query_ext_ctrl, V4L2_CTRL_FLAG_NEXT_COMPOUND, V4L2_CTRL_FLAG_NEXT_CTRL,
    };
    let fd = device.handle().fd();
    // SAFETY: v4l2_query_ext_ctrl is plain old data; all-zero is valid.
    let mut query: v4l2_query_ext_ctrl = unsafe { std::mem::zeroed() };
    loop {
        query.id |= V4L2_CTRL_FLAG_NEXT_CTRL | V4L2_CTRL_FLAG_NEXT_COMPOUND;
        // SAFETY: `query` is a live v4l2_query_ext_ctrl, the type this
        // ioctl reads and fills.
        let result = unsafe {
            v4l::v4l2::ioctl(
                fd,
                v4l::v4l2::vidioc::VIDIOC_QUERY_EXT_CTRL,
                &mut query as *mut _ as *mut std::os::raw::c_void,
            )
        };
        match result {
            Ok(()) => {
                let control_name: Vec<u8> = query
                    .name
                    .iter()
                    // c_char is i8 on x86_64 and u8 on aarch64.
                    .map(|&c| c.to_ne_bytes()[0])
                    .take_while(|&c| c != 0)
                    .collect();
                if control_name.eq_ignore_ascii_case(name.as_bytes()) {
                    return Ok(Some(query.id));
                }
            }
            // EINVAL marks the end of the list.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(format!("listing controls failed: {e}")),
        }
    }
}

fn parse_args(mut raw: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut device = None;
    let mut frames = None;
    let mut width = 640;
    let mut height = 480;
    let mut fps = 30;
    let mut disconnect_after = None;
    while let Some(flag) = raw.next() {
        let mut value = || raw.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => device = Some(value()?),
            "--frames" => frames = Some(number(&flag, value()?)?),
            "--width" => width = number(&flag, value()?)?,
            "--height" => height = number(&flag, value()?)?,
            "--fps" => fps = number(&flag, value()?)?,
            "--disconnect-after" => disconnect_after = Some(number(&flag, value()?)?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let device = device.ok_or("--device is required")?;
    let frames = frames.ok_or("--frames is required")?;
    if let Some(after) = disconnect_after {
        if after > frames {
            return Err(format!(
                "--disconnect-after {after} exceeds --frames {frames}"
            ));
        }
    }
    let mut config = CameraConfig::new(device);
    config.width = width;
    config.height = height;
    config.fps = fps;
    Ok(Args {
        config,
        frames,
        disconnect_after,
    })
}

fn number<T: std::str::FromStr>(flag: &str, text: String) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{flag} needs a non-negative number, got {text:?}"))
}
