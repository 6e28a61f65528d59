//! Fuzz target `encoder-manifest`: `EncoderManifest::parse`, which reads the
//! `manifest.toml` of whatever bundle sits in the model directory. Seeds are
//! in `fuzz/corpus/encoder-manifest/` (the built sklesion bundle's among
//! them); the harness is `dermascope_testkit::fuzz`.
//!
//! Invariants: no input panics or allocates without bound; an accepted
//! manifest keeps every promise the daemon relies on (checked here
//! independently of `validate`): format 1, a model id, an input size of
//! 8..=4096, positive finite scale and std, finite mean, a non-zero output,
//! and variants that name a plain file inside the bundle with a sha256.

use std::path::{Component, Path};

use dermascope_encoder::{EncoderError, EncoderManifest};
use dermascope_testkit::fuzz::{self, TrackingAllocator};

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

const TARGET: &str = "encoder-manifest";
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"[[variant]]",
    b"=",
    b"\"",
    b"'''",
    b"{",
    b"}",
    b",",
    b"\n",
    b"nan",
    b"inf",
    b"-0.0",
    b"1e999",
    b"9223372036854775808",
    b"\"..\"",
    b"\".\"",
    b"\"/etc/passwd\"",
    b"\"NHWC\"",
    b"\"BGR\"",
    b"\"bicubic\"",
    b"\"int8\"",
];
/// Keys the seeds may not spell, so edits can add them.
const KEYS: &[&str] = &["quantization", "calibration", "validation", "unknown_key"];

fn parse(text: &str) -> Result<EncoderManifest, EncoderError> {
    EncoderManifest::parse(text, Path::new("manifest.toml"))
}

fn plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    )
}

fn check_accepted(m: &EncoderManifest) -> Result<(), String> {
    let i = &m.input;
    let broken = [
        ("format", m.format != 1),
        ("model_id", m.model_id.trim().is_empty()),
        (
            "input size",
            !(8..=4096).contains(&i.height) || !(8..=4096).contains(&i.width),
        ),
        (
            "pixel_scale",
            !(i.pixel_scale.is_finite() && i.pixel_scale > 0.0),
        ),
        ("std", i.std.iter().any(|s| !(s.is_finite() && *s > 0.0))),
        ("mean", i.mean.iter().any(|v| !v.is_finite())),
        ("output.dim", m.output.dim == 0),
        ("variants", m.variants.is_empty()),
        (
            "variant file (not a plain file name inside the bundle)",
            m.variants.iter().any(|v| !plain_file_name(&v.file)),
        ),
        (
            "variant sha256",
            m.variants
                .iter()
                .any(|v| v.sha256.len() != 64 || !v.sha256.bytes().all(|b| b.is_ascii_hexdigit())),
        ),
    ];
    match broken.iter().find(|(_, broken)| *broken) {
        Some((what, _)) => Err(format!("accepted a manifest with a bad {what}: {m:?}")),
        None => Ok(()),
    }
}

fn check_text(text: &str) -> Result<(), String> {
    match parse(text) {
        Ok(manifest) => check_accepted(&manifest),
        Err(EncoderError::ManifestSyntax { .. } | EncoderError::ManifestInvalid { .. }) => Ok(()),
        Err(other) => Err(format!(
            "parsing text failed with a non-manifest error: {other}"
        )),
    }
}

#[test]
fn the_seeds_are_valid_manifests() {
    for seed in fuzz::seeds(TARGET) {
        let text = String::from_utf8(seed.bytes).unwrap();
        let manifest = parse(&text).unwrap_or_else(|e| panic!("seed {}: {e}", seed.name));
        check_accepted(&manifest).unwrap();
    }
}

#[test]
fn fuzz_encoder_manifest() {
    fuzz::fuzz_toml_text(TARGET, TOKENS, KEYS, check_text);
}

/// Found by `toml-edits`: `file = ".."` (and `"."`) passed the check that a
/// variant names a plain file inside the bundle, being one path component
/// each; the variant then named the folder above the bundle (or the bundle
/// itself). Only a normal component is a file name now.
#[test]
fn variant_files_that_name_a_folder_are_refused() {
    let seed =
        std::fs::read_to_string(fuzz::corpus_dir(TARGET).join("sklesion-xception.toml")).unwrap();
    for file in [
        "..",
        ".",
        "/etc/passwd",
        "sub/encoder.onnx",
        "../encoder.onnx",
        "",
    ] {
        let text = seed.replace("\"encoder-fp32.onnx\"", &format!("{file:?}"));
        assert_ne!(text, seed);
        match parse(&text) {
            Err(EncoderError::ManifestInvalid { message, .. }) => {
                assert!(message.contains("plain file name"), "{file:?}: {message}")
            }
            other => panic!("variant file {file:?} was not refused: {other:?}"),
        }
    }
}
