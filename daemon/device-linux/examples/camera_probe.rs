//! Exercises the V4L2 driver against a real kernel camera (built for the
//! vivid virtual camera in a VM, works on any webcam).
//!
//! ```text
//! camera_probe --device /dev/video0 --frames N [--width 640 --height 480 --fps 30]
//!              [--disconnect-after K [--remove-command CMD --return-command CMD
//!                                     [--frames-after-return M]]]
//! ```
//!
//! With `--remove-command` and `--return-command` (shell commands run with
//! `sh -c`, e.g. `rmmod vivid` and `modprobe vivid` as root in the VM) the
//! unplug goes on into a replug: once the driver has reported the camera
//! gone, the probe lets go of vivid, runs the remove command (the device
//! node must then be absent), sees `not found` from the driver, runs the
//! return command and must get M frames again from the same source, through
//! the reopen-with-backoff in `next_frame` that the daemon's camera thread
//! relies on.
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
//! removed by 'rmmod vivid': /dev/video0 absent
//! error not found: <message>          (reopen attempts while it is gone)
//! returned by 'modprobe vivid'
//! frame 11 640x480 mean_luma=112.3   (the same source, streaming again)
//! result ok                           (exit 0)  |  result failed: <why>  (exit 1)
//! ```
//!
//! Exit codes: 0 the driver behaved as designed, 1 it did not, 2 bad usage.

use std::process::ExitCode;

use dermascope_device::{CameraConfig, CaptureError, Frame, FrameSource};
use dermascope_device_linux::V4l2Source;

/// Reopen attempts shown after the disconnect (each waits out the backoff).
const NOT_FOUND_ATTEMPTS: u32 = 3;

/// Calls after the disconnect request before giving up waiting for errors.
const MAX_CALLS_AFTER_DISCONNECT: u32 = 10;

/// Reopen attempts shown while the device is removed.
const REMOVED_NOT_FOUND_ATTEMPTS: u32 = 2;

struct Args {
    config: CameraConfig,
    frames: u64,
    disconnect_after: Option<u64>,
    replug: Option<Replug>,
}

/// How the camera leaves and comes back after the unplug.
struct Replug {
    remove_command: String,
    return_command: String,
    frames_after_return: u64,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            eprintln!(
                "usage: camera_probe --device /dev/video0 --frames N \
                 [--width 640 --height 480 --fps 30] [--disconnect-after K \
                 [--remove-command CMD --return-command CMD [--frames-after-return M]]]"
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
    capture(&mut camera, wanted)?;
    let Some(after) = args.disconnect_after else {
        return Ok(());
    };
    let unplugged = unplug(&mut camera, &device, after)?;
    let Some(replug) = &args.replug else {
        return Ok(());
    };

    // Letting go of the Disconnect handle makes vivid register its nodes
    // again; the driver holds no handle (it dropped its session when it
    // reported the disconnect), so the module can now be unloaded.
    drop(unplugged);
    run_command(&replug.remove_command)?;
    if device.exists() {
        return Err(format!(
            "{} is still there after {:?}",
            device.display(),
            replug.remove_command
        ));
    }
    println!(
        "removed by '{}': {} absent",
        replug.remove_command,
        device.display()
    );
    for _ in 0..REMOVED_NOT_FOUND_ATTEMPTS {
        match camera.next_frame() {
            Ok(frame) => {
                print_frame(&frame);
                return Err("a frame arrived while the camera was removed".into());
            }
            Err(error) => {
                print_error(&error);
                if !matches!(error, CaptureError::NotFound { .. }) {
                    return Err("unexpected error while the camera was removed".into());
                }
            }
        }
    }
    run_command(&replug.return_command)?;
    println!("returned by '{}'", replug.return_command);
    capture(&mut camera, replug.frames_after_return)
        .map_err(|why| format!("after the camera returned: {why}"))
}

/// Takes `wanted` frames, printing each and every retryable error on the
/// way (a reopen after a return may first see the node not yet usable).
fn capture(camera: &mut V4l2Source, wanted: u64) -> Result<(), String> {
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
    Ok(())
}

/// Pulls vivid's Disconnect control and waits for the driver to report the
/// camera disconnected, then not found on reopening. Returns the handle that
/// keeps vivid unplugged.
fn unplug(
    camera: &mut V4l2Source,
    device: &std::path::Path,
    after: u64,
) -> Result<v4l::Device, String> {
    // vivid re-creates its nodes as soon as the last handle on the device
    // closes, so the handle that pulled "Disconnect" stays open until the
    // driver has reported the camera gone.
    let unplugged = request_disconnect(device)?;
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
                            return Ok(unplugged);
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

/// Runs `command` with `sh -c` (its output goes to ours) and wants exit 0.
fn run_command(command: &str) -> Result<(), String> {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed ({status})"))
    }
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
    let mut remove_command = None;
    let mut return_command = None;
    let mut frames_after_return = None;
    while let Some(flag) = raw.next() {
        let mut value = || raw.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => device = Some(value()?),
            "--frames" => frames = Some(number(&flag, value()?)?),
            "--width" => width = number(&flag, value()?)?,
            "--height" => height = number(&flag, value()?)?,
            "--fps" => fps = number(&flag, value()?)?,
            "--disconnect-after" => disconnect_after = Some(number(&flag, value()?)?),
            "--remove-command" => remove_command = Some(value()?),
            "--return-command" => return_command = Some(value()?),
            "--frames-after-return" => frames_after_return = Some(number(&flag, value()?)?),
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
    let replug = match (remove_command, return_command) {
        (Some(remove_command), Some(return_command)) => {
            if disconnect_after.is_none() {
                return Err("--remove-command needs --disconnect-after".into());
            }
            Some(Replug {
                remove_command,
                return_command,
                frames_after_return: frames_after_return.unwrap_or(5),
            })
        }
        (None, None) if frames_after_return.is_none() => None,
        _ => {
            return Err(
                "--remove-command, --return-command and --frames-after-return go together".into(),
            )
        }
    };
    // The daemon's own reopen backoff (CameraConfig::new), so the probe
    // takes the path the camera thread takes.
    let mut config = CameraConfig::new(device);
    config.width = width;
    config.height = height;
    config.fps = fps;
    Ok(Args {
        config,
        frames,
        disconnect_after,
        replug,
    })
}

fn number<T: std::str::FromStr>(flag: &str, text: String) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{flag} needs a non-negative number, got {text:?}"))
}
