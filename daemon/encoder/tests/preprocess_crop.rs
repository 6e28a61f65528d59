//! The manifest's `[input] crop` modes on small images whose tensors can be
//! written down by hand: which pixels land where, and what the padding is.

use std::path::Path;

use dermascope_encoder::manifest::{
    ChannelOrder, CropMode, InputSpec, Precision, ResizeFilter, TensorLayout,
};
use dermascope_encoder::{image_to_tensor, EncoderManifest};
use image::{Rgb, RgbImage};

/// A 1:1 input of `side` pixels whose normalisation is the identity on
/// 0..255 except for red, which is shifted by 10 so that "normalises to 0"
/// is told apart from "black".
fn input(side: u32, crop: CropMode) -> InputSpec {
    InputSpec {
        name: "image".into(),
        layout: TensorLayout::Nchw,
        height: side,
        width: side,
        channel_order: ChannelOrder::Rgb,
        resize: ResizeFilter::Nearest,
        crop,
        pixel_scale: 1.0,
        mean: [10.0, 0.0, 0.0],
        std: [1.0, 1.0, 1.0],
    }
}

/// A `width` x `height` image whose red is the column and green the row, in
/// steps of `block` pixels, so a nearest-neighbour shrink by `block` is exact.
fn coordinates(width: u32, height: u32, block: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x / block) as u8 * 3, (y / block) as u8 * 3, 200])
    })
}

fn at(tensor: &[f32], side: u32, channel: usize, x: u32, y: u32) -> f32 {
    let plane = (side * side) as usize;
    tensor[channel * plane + (y * side + x) as usize]
}

#[test]
fn none_stretches_the_whole_image() {
    // 32x16 into 16x16: columns halve, rows stay.
    let side = 16;
    let image = RgbImage::from_fn(32, 16, |x, y| Rgb([(x / 2) as u8 * 3, y as u8 * 3, 200]));
    let tensor = image_to_tensor(&image, &input(side, CropMode::None)).unwrap();
    for y in 0..side {
        for x in 0..side {
            assert_eq!(
                at(&tensor, side, 0, x, y),
                (x * 3) as f32 - 10.0,
                "red at {x},{y}"
            );
            assert_eq!(
                at(&tensor, side, 1, x, y),
                (y * 3) as f32,
                "green at {x},{y}"
            );
            assert_eq!(at(&tensor, side, 2, x, y), 200.0);
        }
    }
}

#[test]
fn center_cuts_the_sides_of_a_wide_image() {
    // 32x16 into 16x16: the centred 16x16 region, columns 8..24, untouched.
    let side = 16;
    let image = coordinates(32, 16, 1);
    let tensor = image_to_tensor(&image, &input(side, CropMode::Center)).unwrap();
    for y in 0..side {
        for x in 0..side {
            assert_eq!(
                at(&tensor, side, 0, x, y),
                ((x + 8) * 3) as f32 - 10.0,
                "red at {x},{y}"
            );
            assert_eq!(
                at(&tensor, side, 1, x, y),
                (y * 3) as f32,
                "green at {x},{y}"
            );
        }
    }
}

#[test]
fn center_cuts_top_and_bottom_of_a_tall_image_then_resizes() {
    // 32x64 into 16x16: the centred 32x32 region (rows 16..48), shrunk by 2.
    let side = 16;
    let image = coordinates(32, 64, 2);
    let tensor = image_to_tensor(&image, &input(side, CropMode::Center)).unwrap();
    for y in 0..side {
        for x in 0..side {
            assert_eq!(
                at(&tensor, side, 0, x, y),
                (x * 3) as f32 - 10.0,
                "red at {x},{y}"
            );
            assert_eq!(
                at(&tensor, side, 1, x, y),
                ((y + 8) * 3) as f32,
                "green at {x},{y}"
            );
        }
    }
}

#[test]
fn pad_letterboxes_with_values_that_normalise_to_zero() {
    // 32x16 into 32x32: no resize, the image in rows 8..24, zeros around it
    // in every channel (red's mean is 10: black would be -10).
    let side = 32;
    let image = coordinates(32, 16, 1);
    let tensor = image_to_tensor(&image, &input(side, CropMode::Pad)).unwrap();
    for y in 0..side {
        for x in 0..side {
            let inside = (8..24).contains(&y);
            let expected = if inside {
                [(x * 3) as f32 - 10.0, ((y - 8) * 3) as f32, 200.0]
            } else {
                [0.0; 3]
            };
            for (c, value) in expected.into_iter().enumerate() {
                assert_eq!(at(&tensor, side, c, x, y), value, "channel {c} at {x},{y}");
            }
        }
    }
}

#[test]
fn pad_shrinks_a_tall_image_to_fit_and_centres_it() {
    // 32x64 into 16x16: shrunk by 4 to 8x16, in columns 4..12.
    let side = 16;
    let image = coordinates(32, 64, 4);
    let tensor = image_to_tensor(&image, &input(side, CropMode::Pad)).unwrap();
    for y in 0..side {
        for x in 0..side {
            let expected = if (4..12).contains(&x) {
                [((x - 4) * 3) as f32 - 10.0, (y * 3) as f32, 200.0]
            } else {
                [0.0; 3]
            };
            for (c, value) in expected.into_iter().enumerate() {
                assert_eq!(at(&tensor, side, c, x, y), value, "channel {c} at {x},{y}");
            }
        }
    }
}

#[test]
fn an_image_of_the_input_aspect_is_the_same_in_every_mode() {
    let side = 16;
    let image = coordinates(32, 32, 2);
    let stretched = image_to_tensor(&image, &input(side, CropMode::None)).unwrap();
    for crop in [CropMode::Center, CropMode::Pad] {
        assert_eq!(
            image_to_tensor(&image, &input(side, crop)).unwrap(),
            stretched,
            "{crop:?}"
        );
    }
}

fn manifest(input_extra: &str, precision: &str) -> Result<EncoderManifest, String> {
    let digest = "0".repeat(64);
    let text = format!(
        r#"format = 1
model_id = "medimageinsight-random-ci-00000000"
license = "MIT (random weights generated by Dermascope; no clinical meaning)"
[source]
registry = "generated"
package = "medimageinsight-random"
version = "ci"
sha256 = "{digest}"
[input]
name = "image"
layout = "NCHW"
height = 480
width = 480
channel_order = "RGB"
resize = "bicubic"
{input_extra}
pixel_scale = 0.003921569
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[output]
name = "embedding"
dim = 1024
[[variant]]
name = "{precision}"
file = "encoder-{precision}.onnx"
precision = "{precision}"
sha256 = "{digest}"
"#
    );
    EncoderManifest::parse(&text, Path::new("manifest.toml")).map_err(|e| e.to_string())
}

#[test]
fn the_manifest_reads_crop_and_fp16() {
    assert_eq!(
        manifest("", "fp32").unwrap().input.crop,
        CropMode::None,
        "absent = stretch"
    );
    for (text, crop) in [
        ("none", CropMode::None),
        ("center", CropMode::Center),
        ("pad", CropMode::Pad),
    ] {
        let m = manifest(&format!("crop = \"{text}\""), "fp32").unwrap();
        assert_eq!(m.input.crop, crop);
    }
    let err = manifest("crop = \"zoom\"", "fp32").unwrap_err();
    assert!(err.contains("zoom") && err.contains("center"), "{err}");
    let fp16 = manifest("", "fp16").unwrap();
    assert_eq!(fp16.variants[0].precision, Precision::Fp16);
    let err = manifest("", "bf16").unwrap_err();
    assert!(err.contains("bf16") && err.contains("fp16"), "{err}");
}
