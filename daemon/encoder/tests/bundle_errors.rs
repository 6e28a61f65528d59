//! A broken or mismatched encoder bundle is refused with an error that says
//! what to do, before anything is embedded.

mod common;

use std::path::Path;

use dermascope_encoder::{Encoder, EncoderError, EncoderOptions, VariantChoice};
use sha2::{Digest, Sha256};

fn options(variant: &str) -> EncoderOptions {
    EncoderOptions {
        variant: VariantChoice::Named(variant.into()),
        // On an x86_64 CPU without VNNI int8 is slow: what is checked is its numerics, not its speed.
        allow_slow_int8: true,
        ..EncoderOptions::default()
    }
}

/// A copy of the real bundle's manifest (edited by `edit`) beside a link to
/// its fp32 graph, so each case costs no 80 MB copy.
fn bundle_with(edit: impl FnOnce(String) -> String) -> tempfile::TempDir {
    let real = common::bundle_dir();
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::fs::read_to_string(real.join("manifest.toml")).unwrap();
    std::fs::write(dir.path().join("manifest.toml"), edit(manifest)).unwrap();
    std::os::unix::fs::symlink(
        real.join("encoder-fp32.onnx"),
        dir.path().join("encoder-fp32.onnx"),
    )
    .unwrap();
    dir
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn fp32_sha(manifest: &str) -> String {
    let table: toml::Table = manifest.parse().unwrap();
    let variants = table["variant"].as_array().unwrap();
    let fp32 = variants
        .iter()
        .find(|v| v["name"].as_str() == Some("fp32"))
        .unwrap();
    fp32["sha256"].as_str().unwrap().to_string()
}

#[test]
fn missing_bundle_names_the_build_command() {
    let err =
        Encoder::load(Path::new("/nonexistent/bundle"), &EncoderOptions::default()).unwrap_err();
    assert!(matches!(err, EncoderError::BundleMissing { .. }), "{err}");
    assert!(err.to_string().contains("models/build"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = Encoder::load(empty.path(), &EncoderOptions::default()).unwrap_err();
    assert!(err.to_string().contains("models/build"), "{err}");
}

#[test]
fn missing_variant_file_names_the_build_command() {
    let dir = bundle_with(|m| m);
    let err = Encoder::load(dir.path(), &options("int8")).unwrap_err();
    assert!(
        matches!(err, EncoderError::VariantFileMissing { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("models/build"), "{err}");
}

#[test]
fn unknown_variant_lists_the_available_ones() {
    let dir = bundle_with(|m| m);
    let err = Encoder::load(dir.path(), &options("int4")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("int4") && text.contains("fp32"), "{text}");
}

#[test]
fn checksum_mismatch_is_refused() {
    let dir = bundle_with(|m| {
        let sha = fp32_sha(&m);
        m.replace(&sha, &"0".repeat(64))
    });
    let err = Encoder::load(dir.path(), &options("fp32")).unwrap_err();
    assert!(
        matches!(err, EncoderError::ChecksumMismatch { .. }),
        "{err}"
    );
}

#[test]
fn a_malformed_graph_with_a_matching_checksum_is_a_graph_error() {
    let garbage = b"this is not an ONNX protobuf, whatever its checksum says".to_vec();
    let dir = bundle_with(|m| {
        let sha = fp32_sha(&m);
        m.replace(&sha, &sha256_hex(&garbage))
    });
    let path = dir.path().join("encoder-fp32.onnx");
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, &garbage).unwrap();
    let err = Encoder::load(dir.path(), &options("fp32")).unwrap_err();
    assert!(matches!(err, EncoderError::Graph { .. }), "{err}");
}

#[test]
fn manifest_dim_that_disagrees_with_the_graph_is_refused() {
    let dir = bundle_with(|m| m.replace("dim = 2048", "dim = 1024"));
    let err = Encoder::load(dir.path(), &options("fp32")).unwrap_err();
    assert!(matches!(err, EncoderError::GraphMismatch { .. }), "{err}");
    assert!(err.to_string().contains("1024"), "{err}");
}

#[test]
fn manifest_input_name_that_the_graph_lacks_is_refused() {
    let dir = bundle_with(|m| m.replacen("name = \"image\"", "name = \"pixel_values\"", 1));
    let err = Encoder::load(dir.path(), &options("fp32")).unwrap_err();
    assert!(matches!(err, EncoderError::GraphMismatch { .. }), "{err}");
    assert!(err.to_string().contains("pixel_values"), "{err}");
}

#[test]
fn malformed_manifests_are_refused_with_the_file_named() {
    type ManifestEdit = fn(String) -> String;
    let cases: [(ManifestEdit, &str); 3] = [
        (|_m| "format = [".to_string(), "not valid TOML"),
        (|m| m.replace("format = 1", "format = 7"), "format 7"),
        (
            |m| m.replacen("height = 254", "height = 0", 1),
            "input size",
        ),
    ];
    for (edit, expect) in cases {
        let dir = bundle_with(edit);
        let err = Encoder::load(dir.path(), &options("fp32")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(expect) && text.contains("manifest.toml"),
            "{text}"
        );
    }
}

#[test]
fn a_loaded_encoder_embeds_to_unit_length() {
    let encoder = Encoder::load(&common::bundle_dir(), &options("fp32")).unwrap();
    let image = image::RgbImage::from_fn(200, 150, |x, y| {
        let d = ((x as i32 - 100).pow(2) + (y as i32 - 75).pow(2)) as f32;
        let shade = if d < 1600.0 { 80 } else { 200 };
        image::Rgb([
            shade,
            (shade as f32 * 0.8) as u8,
            (shade as f32 * 0.7) as u8,
        ])
    });
    let embedding = encoder.embed_rgb(&image).unwrap();
    let norm: f32 = embedding.values().iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    assert_eq!(embedding.values().len(), encoder.dim());
    // A second run is bit-identical: the pipeline holds no state between frames.
    assert_eq!(encoder.embed_rgb(&image).unwrap(), embedding);
}
