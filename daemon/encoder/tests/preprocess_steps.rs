//! The `[preprocess]` steps on drawn images whose right answer is known:
//! Shades of Gray undoes a colour cast, the vignette and the lesion are found
//! where they were drawn, framing falls back to the whole image on plain
//! skin, test-time augmentation of a symmetric image changes nothing, and the
//! manifest and model id carry the preprocessing.

use std::path::Path;

use dermascope_encoder::manifest::{ChannelOrder, CropMode, InputSpec, ResizeFilter, TensorLayout};
use dermascope_encoder::preprocess_steps::{
    apply_gains, find_lesion, find_vignette, frame_region, prepare, shades_of_gray_gains,
    transform_tensor, LESION_MARGIN,
};
use dermascope_encoder::{
    ColourConstancy, Encoder, EncoderManifest, EncoderOptions, Framing, PreprocessSpec,
    VariantChoice,
};
use image::{Rgb, RgbImage};

/// Skin with a little texture, so no channel is flat.
fn skin(x: u32, y: u32) -> [f32; 3] {
    let t = ((x * 7 + y * 13) % 23) as f32 - 11.0;
    [205.0 + t, 160.0 + t, 140.0 + t]
}

fn draw(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [f32; 3]) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb(pixel(x, y).map(|v| v.round().clamp(0.0, 255.0) as u8))
    })
}

fn inside_disc(x: u32, y: u32, (cx, cy, r): (f32, f32, f32)) -> bool {
    (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) < r * r
}

fn p_mean(image: &RgbImage, channel: usize) -> f64 {
    let sum: f64 = image
        .pixels()
        .map(|p| f64::from(p.0[channel]).powi(6))
        .sum();
    (sum / (image.width() * image.height()) as f64).powf(1.0 / 6.0)
}

#[test]
fn shades_of_gray_restores_grey_under_a_colour_cast() {
    // Neutral grey texture seen under a warm light: red up, blue down.
    let grey = |x: u32, y: u32| 120.0 + ((x * 5 + y * 3) % 40) as f32;
    let cast = [1.25, 1.0, 0.7];
    let mut image = draw(200, 150, |x, y| cast.map(|c| c * grey(x, y)));
    let before: Vec<f64> = (0..3).map(|c| p_mean(&image, c)).collect();
    assert!(before[0] / before[2] > 1.6, "the cast is drawn: {before:?}");

    let gains = shades_of_gray_gains(&image, None);
    let mean_gain = gains.iter().sum::<f32>() / 3.0;
    assert!((mean_gain - 1.0).abs() < 1e-5, "gains average 1: {gains:?}");
    // The gains are the cast's inverse, up to one common factor.
    let ratio = |c: usize| gains[c] * cast[c];
    for c in 0..3 {
        assert!(
            (ratio(c) / ratio(1) - 1.0).abs() < 0.01,
            "gain {c} inverts the cast: {gains:?}"
        );
    }
    apply_gains(&mut image, gains);
    let after: Vec<f64> = (0..3).map(|c| p_mean(&image, c)).collect();
    for c in [0, 2] {
        assert!(
            (after[c] / after[1] - 1.0).abs() < 0.01,
            "channel {c} is back to grey: {after:?}"
        );
    }
    // A mid-grey pixel is neutral again.
    let p = image.get_pixel(10, 10).0;
    let spread = p.iter().max().unwrap() - p.iter().min().unwrap();
    assert!(spread <= 3, "pixel {p:?} is grey");
}

/// A 4:3 dermatoscope photograph: skin inside a circle, near black outside.
fn vignetted(lesion: Option<(f32, f32, f32)>) -> RgbImage {
    let field = (200.0, 150.0, 160.0);
    draw(400, 300, |x, y| {
        if !inside_disc(x, y, field) {
            [6.0, 5.0, 8.0]
        } else if lesion.is_some_and(|l| inside_disc(x, y, l)) {
            [95.0, 60.0, 45.0]
        } else {
            skin(x, y)
        }
    })
}

#[test]
fn the_vignette_is_found_where_it_was_drawn_and_not_on_plain_skin() {
    let image = vignetted(None);
    let field = find_vignette(&image).expect("a vignette is found");
    let drawn = image
        .enumerate_pixels()
        .filter(|(x, y, _)| !inside_disc(*x, *y, (200.0, 150.0, 160.0)))
        .count() as f32
        / (400.0 * 300.0);
    assert!(
        (field.vignette_fraction() - drawn).abs() < 0.03,
        "vignette {} vs drawn {drawn}",
        field.vignette_fraction()
    );
    assert!(field.contains(200, 150), "the centre is in view");
    assert!(
        !field.contains(2, 2) && !field.contains(397, 297),
        "corners are not"
    );
    let (x, y, w, h) = field.bounds(400, 300);
    assert!(
        (30..=45).contains(&x) && (310..=340).contains(&w),
        "x {x} w {w}"
    );
    assert!(
        y == 0 && h == 300,
        "the circle touches top and bottom: y {y} h {h}"
    );

    let plain = draw(400, 300, skin);
    assert!(
        find_vignette(&plain).is_none(),
        "plain skin has no vignette"
    );
    // A dark lesion in the middle is not a vignette: it does not touch the edge.
    let dark_centre = draw(400, 300, |x, y| {
        if inside_disc(x, y, (200.0, 150.0, 60.0)) {
            [10.0, 8.0, 8.0]
        } else {
            skin(x, y)
        }
    });
    assert!(find_vignette(&dark_centre).is_none());
}

#[test]
fn the_vignette_stays_out_of_the_colour_statistics() {
    // Statistics taken on the border instead would be all blue.
    let field = (200.0, 150.0, 140.0);
    let image = draw(400, 300, |x, y| {
        if inside_disc(x, y, field) {
            [150.0, 150.0, 150.0]
        } else {
            [0.0, 0.0, 30.0]
        }
    });
    let fov = find_vignette(&image).expect("vignette");
    let gains = shades_of_gray_gains(&image, Some(&fov));
    assert!(
        gains.iter().all(|g| (g - 1.0).abs() < 0.01),
        "grey field of view: gains {gains:?}"
    );
    // With p = 6 a border this dark hardly counts even when included
    // (measured: 1e-5); the mask matters for brighter rims and for framing.
}

#[test]
fn framing_crops_to_a_drawn_lesion_with_the_margin() {
    // A lesion of radius 80 centred at (400, 150) in a 600x450 photograph.
    let image = draw(600, 450, |x, y| {
        if inside_disc(x, y, (400.0, 150.0, 80.0)) {
            [110.0, 70.0, 50.0]
        } else {
            skin(x, y)
        }
    });
    let (x, y, w, h) = find_lesion(&image, None).expect("the lesion is found");
    let near = |a: u32, b: u32| (a as i64 - b as i64).abs() <= 8;
    assert!(
        near(x, 320) && near(y, 70) && near(w, 160) && near(h, 160),
        "box {x},{y} {w}x{h}"
    );

    let spec = PreprocessSpec {
        frame: Framing::Lesion,
        ..PreprocessSpec::default()
    };
    let (framed, prepared) = prepare(&image, &spec).expect("framing copies");
    let (rx, ry, rw, rh) = prepared.region.expect("a region is framed");
    // 160 px plus the margin on both sides is 240 high, grown to 4:3.
    let side = 160.0 * (1.0 + 2.0 * LESION_MARGIN);
    assert!(
        (rh as f32 - side).abs() <= 12.0 && (rw as f32 - side * 4.0 / 3.0).abs() <= 16.0,
        "region {rw}x{rh}"
    );
    assert!(
        (rx as f32 + rw as f32 / 2.0 - 400.0).abs() <= 8.0,
        "centred on the lesion: x {rx} w {rw}"
    );
    assert!(
        (ry as f32 + rh as f32 / 2.0 - 150.0).abs() <= 8.0,
        "centred on the lesion: y {ry} h {rh}"
    );
    assert_eq!(framed.dimensions(), (rw, rh));
    assert_eq!(framed.get_pixel(400 - rx, 150 - ry).0, [110, 70, 50]);
}

#[test]
fn framing_falls_back_to_the_whole_image_without_a_lesion() {
    let plain = vignetted(None);
    assert!(find_lesion(&plain, find_vignette(&plain).as_ref()).is_none());
    let spec = PreprocessSpec {
        frame: Framing::Lesion,
        ..PreprocessSpec::default()
    };
    let (whole, prepared) = prepare(&plain, &spec).expect("a copy");
    assert_eq!(prepared.region, None);
    assert_eq!(whole, plain, "the whole image, unchanged");
    assert!(prepared.vignette_fraction > 0.05);
}

#[test]
fn framing_inside_a_vignette_finds_the_lesion_not_the_border() {
    let image = vignetted(Some((230.0, 160.0, 50.0)));
    let field = find_vignette(&image).expect("vignette");
    let (x, y, w, h) = find_lesion(&image, Some(&field)).expect("lesion");
    let near = |a: u32, b: u32| (a as i64 - b as i64).abs() <= 8;
    assert!(
        near(x, 180) && near(y, 110) && near(w, 100) && near(h, 100),
        "box {x},{y} {w}x{h}"
    );
    let region = frame_region((x, y, w, h), (400, 300), field.bounds(400, 300));
    let bounds = field.bounds(400, 300);
    assert!(region.0 >= bounds.0 && region.0 + region.2 <= bounds.0 + bounds.2);
}

fn square_input(side: u32, layout: TensorLayout) -> InputSpec {
    InputSpec {
        name: "image".into(),
        layout,
        height: side,
        width: side,
        channel_order: ChannelOrder::Rgb,
        resize: ResizeFilter::Bilinear,
        crop: CropMode::None,
        pixel_scale: 1.0,
        mean: [0.0; 3],
        std: [1.0; 3],
    }
}

#[test]
fn the_eight_views_are_the_symmetries_of_the_square() {
    for layout in [TensorLayout::Nchw, TensorLayout::Nhwc] {
        let input = square_input(5, layout);
        let tensor: Vec<f32> = (0..75).map(|v| v as f32).collect();
        let views: Vec<Vec<f32>> = (0..8)
            .map(|k| transform_tensor(&tensor, &input, k))
            .collect();
        assert_eq!(views[0], tensor);
        for i in 0..8 {
            for j in 0..i {
                assert_ne!(views[i], views[j], "views {i} and {j} differ ({layout:?})");
            }
        }
        // Mirrors undo themselves; a quarter turn four times is no turn.
        assert_eq!(transform_tensor(&views[1], &input, 1), tensor);
        let mut turned = tensor.clone();
        for _ in 0..4 {
            turned = transform_tensor(&turned, &input, 5);
        }
        assert_eq!(turned, tensor);
        assert_eq!(transform_tensor(&views[5], &input, 6), tensor);
    }
}

const MANIFEST: &str = r#"format = 1
model_id = "test-encoder"
license = "MIT"
[source]
registry = "pypi"
package = "test"
version = "1"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[input]
name = "image"
layout = "NCHW"
height = 8
width = WIDTH
channel_order = "RGB"
resize = "bilinear"
pixel_scale = 1.0
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
[output]
name = "embedding"
dim = 4
[[variant]]
name = "fp32"
file = "fp32.onnx"
precision = "fp32"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;

fn parse(width: u32, extra: &str) -> Result<EncoderManifest, String> {
    let text = MANIFEST.replace("WIDTH", &width.to_string()) + extra;
    EncoderManifest::parse(&text, Path::new("manifest.toml")).map_err(|e| e.to_string())
}

#[test]
fn the_preprocess_table_defaults_to_todays_behaviour() {
    let plain = parse(8, "").unwrap();
    assert_eq!(plain.preprocess, PreprocessSpec::default());
    assert_eq!(plain.preprocess.colour_constancy, ColourConstancy::None);
    assert_eq!(plain.preprocess.frame, Framing::Whole);
    assert_eq!(plain.preprocess.tta, 1);
    let empty = parse(8, "[preprocess]\n").unwrap();
    assert_eq!(empty.preprocess, PreprocessSpec::default());

    let full = parse(
        8,
        "[preprocess]\ncolour_constancy = \"shades-of-gray\"\nframe = \"lesion\"\ntta = 8\n",
    )
    .unwrap();
    assert_eq!(
        full.preprocess,
        PreprocessSpec {
            colour_constancy: ColourConstancy::ShadesOfGray,
            frame: Framing::Lesion,
            tta: 8
        }
    );
    let err = parse(8, "[preprocess]\ntta = 3\n").unwrap_err();
    assert!(err.contains("tta = 3"), "{err}");
    let err = parse(12, "[preprocess]\ntta = 8\n").unwrap_err();
    assert!(err.contains("square"), "{err}");
    assert!(
        parse(12, "[preprocess]\ntta = 4\n").is_ok(),
        "flips suit any input"
    );
    let err = parse(8, "[preprocess]\ncolour = \"none\"\n").unwrap_err();
    assert!(err.contains("colour"), "unknown keys are refused: {err}");
    let err = parse(8, "[preprocess]\nframe = \"centre\"\n").unwrap_err();
    assert!(err.contains("centre"), "{err}");
}

#[test]
fn the_override_syntax_parses_and_refuses() {
    let spec = PreprocessSpec::parse_list("shades-of-gray,lesion,tta4").unwrap();
    assert_eq!(
        spec,
        PreprocessSpec {
            colour_constancy: ColourConstancy::ShadesOfGray,
            frame: Framing::Lesion,
            tta: 4
        }
    );
    assert_eq!(spec.describe(), "shades-of-gray,lesion,tta4");
    assert_eq!(PreprocessSpec::parse_list(&spec.describe()).unwrap(), spec);
    assert_eq!(
        PreprocessSpec::parse_list("none").unwrap(),
        PreprocessSpec::default()
    );
    assert_eq!(PreprocessSpec::parse_list("sog").unwrap().tta, 1);
    for bad in ["tta3", "lesion,whole", "grey", "tta4,tta2"] {
        assert!(PreprocessSpec::parse_list(bad).is_err(), "{bad} is refused");
    }
}

#[test]
fn the_model_id_changes_with_the_preprocessing() {
    let base = "sklesion-xception-gap2048-v1";
    assert_eq!(
        PreprocessSpec::default().model_id(base),
        base,
        "old stores stay valid"
    );
    let specs = [
        "shades-of-gray",
        "lesion",
        "tta2",
        "tta4",
        "tta8",
        "shades-of-gray,lesion",
        "shades-of-gray,lesion,tta4",
    ];
    let mut ids: Vec<String> = specs
        .iter()
        .map(|s| PreprocessSpec::parse_list(s).unwrap().model_id(base))
        .collect();
    assert!(ids.iter().all(|id| id.starts_with(base) && id != base));
    ids.push(base.to_string());
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "every preprocessing has its own id");
}

/// A lesion that is a disc centred on a square photograph: every flip and
/// quarter turn leaves it as it is.
fn symmetric_photograph() -> RgbImage {
    draw(240, 240, |x, y| {
        let d = ((x as f32 - 119.5).powi(2) + (y as f32 - 119.5).powi(2)).sqrt();
        let ring = (d / 12.0).floor() as u32 % 3;
        if d < 70.0 {
            [90.0 + 20.0 * ring as f32, 60.0, 45.0]
        } else {
            [205.0, 160.0 - 5.0 * ring as f32, 140.0]
        }
    })
}

fn encoder(spec: &str) -> Encoder {
    let options = EncoderOptions {
        variant: VariantChoice::Named("int8".into()),
        // On an x86_64 CPU without VNNI int8 is slow: what is checked is its numerics, not its speed.
        allow_slow_int8: true,
        threads: 1,
        preprocess: Some(PreprocessSpec::parse_list(spec).unwrap()),
        ..EncoderOptions::default()
    };
    Encoder::load(&dermascope_testkit::bundle_dir(), &options).unwrap()
}

#[test]
fn test_time_augmentation_of_a_symmetric_image_equals_none_and_the_id_says_which() {
    let plain = encoder("none");
    let tta = encoder("tta8");
    assert_eq!(plain.model_id(), plain.manifest().model_id);
    assert_eq!(
        tta.model_id(),
        format!("{}+tta8", plain.manifest().model_id)
    );
    assert_eq!(tta.preprocess_spec().tta, 8);

    let symmetric = symmetric_photograph();
    let once = plain.embed_rgb(&symmetric).unwrap();
    let averaged = tta.embed_rgb(&symmetric).unwrap();
    let cosine = once.cosine(&averaged);
    assert!(cosine > 0.99999, "symmetric: cosine {cosine}");

    // The same lesion off-centre: its mirror images are other photographs,
    // so the average moves.
    let off_centre = draw(240, 240, |x, y| {
        if inside_disc(x, y, (70.0, 90.0, 45.0)) || inside_disc(x, y, (160.0, 180.0, 20.0)) {
            [90.0, 60.0, 45.0]
        } else {
            skin(x, y)
        }
    });
    let once = plain.embed_rgb(&off_centre).unwrap();
    let averaged = tta.embed_rgb(&off_centre).unwrap();
    let cosine = once.cosine(&averaged);
    assert!(cosine < 0.9999, "asymmetric: cosine {cosine}");
    let norm: f32 = averaged.values().iter().map(|v| v * v).sum();
    assert!((norm - 1.0).abs() < 1e-4, "re-normalised: {norm}");
}
