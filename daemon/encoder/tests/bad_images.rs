//! Bad photographs give a typed error, never a panic; odd-but-valid ones are converted.

use std::io::Cursor;

use dermascope_encoder::{decode_rgb, DecodeBudget, EncoderError};
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb};

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), format)
        .expect("encoding a test image");
    bytes
}

fn gradient(width: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    }))
}

#[test]
fn empty_file_is_not_an_image() {
    let err = decode_rgb(&[], DecodeBudget::default()).unwrap_err();
    assert!(matches!(err, EncoderError::NotAnImage { .. }), "{err}");
}

#[test]
fn text_file_is_not_an_image() {
    let err = decode_rgb(b"image,label\nISIC_1.jpg,nv\n", DecodeBudget::default()).unwrap_err();
    assert!(matches!(err, EncoderError::NotAnImage { .. }), "{err}");
    assert!(err.to_string().contains("not a JPEG or PNG"), "{err}");
}

#[test]
fn truncated_jpeg_is_a_clear_error() {
    let jpeg = encode(gradient(200, 150), ImageFormat::Jpeg);
    for keep in [2, 20, jpeg.len() / 3, jpeg.len() / 2, jpeg.len() - 1] {
        let err = decode_rgb(&jpeg[..keep], DecodeBudget::default()).unwrap_err();
        assert!(
            matches!(
                err,
                EncoderError::NotAnImage { .. } | EncoderError::CorruptImage { .. }
            ),
            "{keep} bytes: {err}"
        );
    }
    assert!(decode_rgb(&jpeg, DecodeBudget::default()).is_ok());
}

#[test]
fn truncated_png_is_a_clear_error() {
    let png = encode(gradient(200, 150), ImageFormat::Png);
    let err = decode_rgb(&png[..png.len() / 2], DecodeBudget::default()).unwrap_err();
    assert!(
        matches!(
            err,
            EncoderError::CorruptImage { .. } | EncoderError::NotAnImage { .. }
        ),
        "{err}"
    );
}

#[test]
fn one_pixel_image_is_refused_with_its_size() {
    let png = encode(gradient(1, 1), ImageFormat::Png);
    let err = decode_rgb(&png, DecodeBudget::default()).unwrap_err();
    assert!(
        matches!(
            err,
            EncoderError::ImageTooSmall {
                width: 1,
                height: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("1x1"), "{err}");
}

/// A PNG whose header claims a zero width: decoders must not be trusted to
/// refuse it, so we check it is refused either way.
#[test]
fn zero_size_png_is_refused() {
    let png = png_with_header_only(0, 150);
    let err = decode_rgb(&png, DecodeBudget::default()).unwrap_err();
    assert!(
        matches!(
            err,
            EncoderError::ImageTooSmall { .. }
                | EncoderError::NotAnImage { .. }
                | EncoderError::CorruptImage { .. }
        ),
        "{err}"
    );
}

#[test]
fn grayscale_png_is_converted_to_rgb() {
    let gray = DynamicImage::ImageLuma8(ImageBuffer::from_fn(64, 48, |x, _| Luma([(x * 4) as u8])));
    let rgb = decode_rgb(&encode(gray, ImageFormat::Png), DecodeBudget::default()).unwrap();
    assert_eq!((rgb.width(), rgb.height()), (64, 48));
    let pixel = rgb.get_pixel(10, 3).0;
    assert_eq!(pixel, [40, 40, 40]);
}

#[test]
fn sixteen_bit_png_is_converted_to_rgb8() {
    let deep = DynamicImage::ImageRgb16(ImageBuffer::from_fn(32, 32, |x, y| {
        Rgb([(x as u16) * 2048, (y as u16) * 2048, 65535])
    }));
    let rgb = decode_rgb(&encode(deep, ImageFormat::Png), DecodeBudget::default()).unwrap();
    assert_eq!(rgb.get_pixel(16, 8).0, [128, 64, 255]);
}

#[test]
fn huge_image_is_refused_before_allocation() {
    // 60000 x 60000 RGB would need 10 GiB; only the header exists.
    let png = png_with_header_only(60_000, 60_000);
    let err = decode_rgb(&png, DecodeBudget::default()).unwrap_err();
    assert!(
        matches!(err, EncoderError::ImageOverBudget { width: 60_000, .. }),
        "{err}"
    );
}

#[test]
fn budget_is_configurable() {
    let jpeg = encode(gradient(400, 300), ImageFormat::Jpeg);
    let tight = DecodeBudget { max_bytes: 100_000 };
    assert!(matches!(
        decode_rgb(&jpeg, tight).unwrap_err(),
        EncoderError::ImageOverBudget { .. }
    ));
    assert!(decode_rgb(&jpeg, DecodeBudget::default()).is_ok());
}

/// A PNG signature, an IHDR chunk and an empty IDAT chunk (CRCs correct): a
/// header that claims any size without the pixels to back it.
fn png_with_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(b"IHDR");
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    png.extend_from_slice(&0u32.to_be_bytes());
    png.extend_from_slice(b"IDAT");
    png.extend_from_slice(&crc32(b"IDAT").to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
