//! From photograph bytes or a camera frame to the encoder's input tensor.
//!
//! The steps mirror the bundle's build exactly (stretch, centre-crop or pad to
//! the input size as the manifest's `crop` says, resize with its filter,
//! scale, per-channel normalise), because the int8 calibration ranges are
//! only valid for inputs prepared the same way.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{ImageReader, Limits, RgbImage};

use crate::manifest::{ChannelOrder, CropMode, InputSpec, ResizeFilter, TensorLayout};
use crate::EncoderError;

/// Smallest side we accept: anything smaller cannot show a lesion, and is far
/// more likely a broken thumbnail or a placeholder than a photograph.
pub const MIN_IMAGE_SIDE: u32 = 16;

/// How much memory decoding one image may use.
///
/// A dermatoscope photographs at a few megapixels; a 100-megapixel file (or a
/// JPEG header that claims one) is refused before its pixels are allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeBudget {
    pub max_bytes: u64,
}

impl Default for DecodeBudget {
    fn default() -> Self {
        DecodeBudget {
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Decodes JPEG or PNG bytes into 8-bit RGB, converting grayscale, alpha and
/// 16-bit images instead of refusing them.
pub fn decode_rgb(bytes: &[u8], budget: DecodeBudget) -> Result<RgbImage, EncoderError> {
    if bytes.is_empty() {
        return Err(EncoderError::NotAnImage {
            reason: "the file is empty".into(),
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| EncoderError::NotAnImage {
            reason: e.to_string(),
        })?;
    if reader.format().is_none() {
        return Err(EncoderError::NotAnImage {
            reason: "not a JPEG or PNG file (unrecognised signature)".into(),
        });
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) && !has_jpeg_end_marker(bytes) {
        // zune-jpeg decodes a cut-off scan as grey rows without complaint; a
        // half-grey lesion would embed as a confident, wrong match.
        return Err(EncoderError::CorruptImage {
            reason: "JPEG is truncated (no end-of-image marker)".into(),
        });
    }
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| EncoderError::NotAnImage {
            reason: e.to_string(),
        })?;
    check_size(width, height)?;
    // The decoded image, plus the RGB8 copy made when converting from 16-bit
    // or grayscale, must both fit.
    let needed = u64::from(width) * u64::from(height) * 3 * 2;
    if needed > budget.max_bytes {
        return Err(EncoderError::ImageOverBudget {
            width,
            height,
            budget_mib: budget.max_bytes / (1024 * 1024),
        });
    }

    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| EncoderError::NotAnImage {
            reason: e.to_string(),
        })?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(budget.max_bytes);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => EncoderError::ImageOverBudget {
            width,
            height,
            budget_mib: budget.max_bytes / (1024 * 1024),
        },
        other => EncoderError::CorruptImage {
            reason: other.to_string(),
        },
    })?;
    Ok(decoded.to_rgb8())
}

/// JPEG files end with the EOI marker `FF D9`; some cameras pad after it.
fn has_jpeg_end_marker(bytes: &[u8]) -> bool {
    let trimmed = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(&bytes[..0], |last| &bytes[..=last]);
    trimmed.ends_with(&[0xff, 0xd9])
}

pub(crate) fn check_size(width: u32, height: u32) -> Result<(), EncoderError> {
    if width < MIN_IMAGE_SIDE || height < MIN_IMAGE_SIDE {
        return Err(EncoderError::ImageTooSmall {
            width,
            height,
            min_side: MIN_IMAGE_SIDE,
        });
    }
    Ok(())
}

/// Builds the normalised input tensor (batch of one) described by `input`.
pub fn image_to_tensor(image: &RgbImage, input: &InputSpec) -> Result<Vec<f32>, EncoderError> {
    check_size(image.width(), image.height())?;
    let filter = match input.resize {
        ResizeFilter::Bilinear => FilterType::Triangle,
        // Keys' cubic with a = -0.5, Pillow's BICUBIC kernel (image calls it
        // Catmull-Rom); both widen it by the scale factor when shrinking.
        ResizeFilter::Bicubic => FilterType::CatmullRom,
        ResizeFilter::Nearest => FilterType::Nearest,
    };
    let fit = Fit::of(image.width(), image.height(), input);
    let region;
    let source = if fit.crop == (0, 0, image.width(), image.height()) {
        image
    } else {
        let (x, y, w, h) = fit.crop;
        region = image::imageops::crop_imm(image, x, y, w, h).to_image();
        &region
    };
    let resized;
    let sized = if (source.width(), source.height()) == (fit.size.0, fit.size.1) {
        source
    } else {
        resized = image::imageops::resize(source, fit.size.0, fit.size.1, filter);
        &resized
    };

    let (width, height) = (input.width as usize, input.height as usize);
    let plane = width * height;
    // Padding stays 0.0: the mean colour, normalised.
    let mut tensor = vec![0f32; plane * 3];
    // Folding scale, mean and std into one multiply-add per value keeps this
    // off the capture path's profile.
    let mut gain = [0f32; 3];
    let mut offset = [0f32; 3];
    for c in 0..3 {
        gain[c] = input.pixel_scale / input.std[c];
        offset[c] = -input.mean[c] / input.std[c];
    }
    let order: [usize; 3] = match input.channel_order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    let (left, top) = (fit.offset.0 as usize, fit.offset.1 as usize);
    for (x, y, pixel) in sized.enumerate_pixels() {
        let i = (top + y as usize) * width + left + x as usize;
        for (slot, &source_channel) in order.iter().enumerate() {
            let value = f32::from(pixel.0[source_channel]) * gain[slot] + offset[slot];
            let index = match input.layout {
                TensorLayout::Nchw => slot * plane + i,
                TensorLayout::Nhwc => i * 3 + slot,
            };
            tensor[index] = value;
        }
    }
    Ok(tensor)
}

/// Where an image goes in the input: which part of it is read (x, y, w, h),
/// the size it is resized to, and where that lands in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fit {
    crop: (u32, u32, u32, u32),
    size: (u32, u32),
    offset: (u32, u32),
}

impl Fit {
    fn of(width: u32, height: u32, input: &InputSpec) -> Fit {
        let (iw, ih) = (input.width, input.height);
        let whole = (0, 0, width, height);
        // Sides are at most 4096 (manifest) and 65535 (decoders): u64 holds
        // every product exactly, so the rounding is the same on every CPU.
        let (w, h, iw64, ih64) = (
            u64::from(width),
            u64::from(height),
            u64::from(iw),
            u64::from(ih),
        );
        let round_div = |a: u64, b: u64| ((2 * a + b) / (2 * b)) as u32;
        match input.crop {
            CropMode::None => Fit {
                crop: whole,
                size: (iw, ih),
                offset: (0, 0),
            },
            CropMode::Center => {
                // Wider than the input: keep the full height, cut the sides.
                let crop = if w * ih64 > h * iw64 {
                    let cw = round_div(h * iw64, ih64).clamp(1, width);
                    ((width - cw) / 2, 0, cw, height)
                } else {
                    let ch = round_div(w * ih64, iw64).clamp(1, height);
                    (0, (height - ch) / 2, width, ch)
                };
                Fit {
                    crop,
                    size: (iw, ih),
                    offset: (0, 0),
                }
            }
            CropMode::Pad => {
                let size = if w * ih64 > h * iw64 {
                    (iw, round_div(h * iw64, w).clamp(1, ih))
                } else {
                    (round_div(w * ih64, h).clamp(1, iw), ih)
                };
                Fit {
                    crop: whole,
                    size,
                    offset: ((iw - size.0) / 2, (ih - size.1) / 2),
                }
            }
        }
    }
}
