//! Camera payloads to RGB888: YUYV by hand, MJPEG and still images through
//! the `image` crate with a memory budget.

use std::io::Cursor;
use std::time::Instant;

use image::{ImageFormat, ImageReader, Limits};

use crate::capture::{CaptureError, Frame};

/// Largest side accepted from a camera frame or replayed photograph. A
/// header claiming more is refused before any pixel buffer is allocated.
pub const MAX_FRAME_SIDE: u32 = 8192;

/// Decoder allocation budget: an 8192x8192 RGBA image plus headroom.
const MAX_DECODE_BYTES: u64 = 8192 * 8192 * 4 + (16 << 20);

/// Converts one packed YUYV 4:2:2 picture to RGB888 with the BT.601
/// limited-range matrix (what V4L2 means by YUYV unless a driver says
/// otherwise).
///
/// `stride` is the driver's bytes per line (at least `width * 2`; drivers
/// pad rows). `width` must be even: two pixels share one U and one V sample.
/// A buffer shorter than `stride * height` (a truncated transfer) is a
/// [`CaptureError::CorruptFrame`] for `sequence`.
pub fn yuyv_to_rgb(
    yuyv: &[u8],
    width: u32,
    height: u32,
    stride: usize,
    sequence: u64,
) -> Result<Vec<u8>, CaptureError> {
    let corrupt = |reason: String| CaptureError::CorruptFrame { sequence, reason };
    if width == 0 || height == 0 || !width.is_multiple_of(2) {
        return Err(corrupt(format!(
            "YUYV frame of {width}x{height} (width must be even and non-zero)"
        )));
    }
    let row_bytes = width as usize * 2;
    let stride = if stride == 0 { row_bytes } else { stride };
    if stride < row_bytes {
        return Err(corrupt(format!(
            "YUYV stride {stride} shorter than a {width}-pixel row"
        )));
    }
    // The last row need not carry its padding.
    let needed = stride * (height as usize - 1) + row_bytes;
    if yuyv.len() < needed {
        return Err(corrupt(format!(
            "YUYV frame has {} bytes, {width}x{height} needs {needed}",
            yuyv.len()
        )));
    }
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for row in yuyv.chunks(stride).take(height as usize) {
        for quad in row[..row_bytes].chunks_exact(4) {
            let (y0, u, y1, v) = (quad[0], quad[1], quad[2], quad[3]);
            rgb.extend_from_slice(&bt601_limited(y0, u, v));
            rgb.extend_from_slice(&bt601_limited(y1, u, v));
        }
    }
    Ok(rgb)
}

/// BT.601 limited range (Y 16..235, Cb/Cr 16..240) in 8.8 fixed point, the
/// integer form given in the ITU recommendation and used by libv4lconvert.
fn bt601_limited(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = i32::from(y) - 16;
    let d = i32::from(u) - 128;
    let e = i32::from(v) - 128;
    let clamp = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [
        clamp(298 * c + 409 * e),
        clamp(298 * c - 100 * d - 208 * e),
        clamp(298 * c + 516 * d),
    ]
}

/// Decodes one MJPEG camera frame into a [`Frame`].
///
/// A frame without its end-of-image marker (cut short by the USB transfer)
/// or that the JPEG decoder rejects is a [`CaptureError::CorruptFrame`]:
/// showing a half-grey photograph would be worse than skipping it.
pub fn decode_mjpeg(
    jpeg: &[u8],
    sequence: u64,
    captured_at: Instant,
) -> Result<Frame, CaptureError> {
    // Some cameras pad the payload with zeros after EOI.
    let end = jpeg.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let payload = &jpeg[..end];
    if !payload.starts_with(&[0xFF, 0xD8]) {
        return Err(CaptureError::CorruptFrame {
            sequence,
            reason: "MJPEG frame does not start with a JPEG SOI marker".into(),
        });
    }
    if !payload.ends_with(&[0xFF, 0xD9]) {
        return Err(CaptureError::CorruptFrame {
            sequence,
            reason: "MJPEG frame has no end-of-image marker (truncated)".into(),
        });
    }
    decode_bounded(payload, ImageFormat::Jpeg, sequence, captured_at)
}

/// Decodes an encoded still image (JPEG or PNG) under the crate's memory
/// budget; any failure is a [`CaptureError::CorruptFrame`].
pub(crate) fn decode_bounded(
    encoded: &[u8],
    format: ImageFormat,
    sequence: u64,
    captured_at: Instant,
) -> Result<Frame, CaptureError> {
    let corrupt = |reason: String| CaptureError::CorruptFrame { sequence, reason };
    let mut reader = ImageReader::with_format(Cursor::new(encoded), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_FRAME_SIDE);
    limits.max_image_height = Some(MAX_FRAME_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| corrupt(format!("{format:?} decode failed: {e}")))?;
    let rgb = image.into_rgb8();
    let (width, height) = rgb.dimensions();
    Ok(Frame {
        width,
        height,
        rgb: rgb.into_raw(),
        sequence,
        captured_at,
    })
}
