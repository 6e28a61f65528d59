//! A case's pictures: the 96 px thumbnail shown on screen and the original
//! photograph kept for re-embedding and for a vision-language model.

use dermascope_store::{CaseError, OriginalPhoto};
use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;

/// Side of the thumbnails drawn on screen and stored with every case.
pub const THUMBNAIL_SIDE: u32 = 96;

/// JPEG quality of thumbnails: 96 px at 80 is about 3 KB.
const THUMBNAIL_QUALITY: u8 = 80;
/// JPEG quality of kept originals: high enough that re-embedding a stored
/// original gives the embedding of the frame itself (tested in the pipeline).
const ORIGINAL_QUALITY: u8 = 92;

/// The one thumbnail of a photograph, as stored and as drawn: at most
/// [`THUMBNAIL_SIDE`] on its longer side, in the photograph's aspect (a
/// lesion's shape is clinical information; the screens letterbox it).
pub fn thumbnail(photo: &RgbImage) -> RgbImage {
    let (width, height) = photo.dimensions();
    let longer = width.max(height).max(1);
    let scale = |side: u32| {
        ((u64::from(side) * u64::from(THUMBNAIL_SIDE) + u64::from(longer) / 2) / u64::from(longer))
            .max(1) as u32
    };
    image::imageops::thumbnail(photo, scale(width), scale(height))
}

/// [`thumbnail`] as the JPEG stored with a case.
pub fn thumbnail_jpeg(photo: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let small = thumbnail(photo);
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, THUMBNAIL_QUALITY).encode_image(&small)?;
    Ok(jpeg)
}

/// A camera frame as the original photograph of a capture, at the camera's
/// resolution. Refused (typed) when over the store's caps.
pub fn original_from_rgb(frame: &RgbImage) -> Result<OriginalPhoto, CaseError> {
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, ORIGINAL_QUALITY)
        .encode_image(frame)
        .map_err(|e| CaseError::OriginalNotJpeg {
            reason: e.to_string(),
        })?;
    OriginalPhoto::from_jpeg(jpeg)
}

/// A reference photograph as its original: a JPEG is kept byte for byte
/// (re-encoding would lose detail), anything else (PNG) is encoded as JPEG.
pub fn original_from_bytes(bytes: &[u8], decoded: &RgbImage) -> Result<OriginalPhoto, CaseError> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        OriginalPhoto::from_jpeg(bytes.to_vec())
    } else {
        original_from_rgb(decoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        })
    }

    #[test]
    fn thumbnails_fit_the_side_and_keep_the_aspect() {
        let jpeg = thumbnail_jpeg(&gradient(200, 150)).unwrap();
        let back = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((back.width(), back.height()), (96, 72));
    }

    #[test]
    fn originals_keep_the_resolution_and_jpegs_their_bytes() {
        let frame = gradient(640, 480);
        let original = original_from_rgb(&frame).unwrap();
        assert_eq!((original.width(), original.height()), (640, 480));
        let kept = original_from_bytes(original.jpeg(), &frame).unwrap();
        assert_eq!(kept.jpeg(), original.jpeg());
        let mut png = Vec::new();
        frame
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let from_png = original_from_bytes(&png, &frame).unwrap();
        assert!(from_png.jpeg().starts_with(&[0xFF, 0xD8]));
    }

    #[test]
    fn a_frame_over_the_pixel_cap_is_refused() {
        let frame = RgbImage::new(4100, 3100);
        assert!(matches!(
            original_from_rgb(&frame),
            Err(CaseError::OriginalTooLarge { .. })
        ));
    }
}
