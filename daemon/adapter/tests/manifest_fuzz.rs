//! Fuzz target `adapter-manifest`: the adapter's `manifest.toml`, read by
//! `Adapter::load` from the installed adapter folder (the one public door to
//! the manifest reader; the folder here holds the manifest alone). Seeds are
//! in `fuzz/corpus/adapter-manifest/` (a trained adapter's among them); the
//! harness is `dermascope_testkit::fuzz`.
//!
//! Invariants: no input panics or allocates without bound; a manifest that
//! gets as far as reading its model file is a valid manifest (format 1, two
//! classes or more, a hidden size, a model file in the same folder); and
//! what `save` writes (TOML of an `AdapterManifest`) reads back equal.

use std::path::Path;

use dermascope_adapter::{Adapter, AdapterError, AdapterManifest, TrainingSummary, MANIFEST_FILE};
use dermascope_testkit::fuzz::proptest::prelude::*;
use dermascope_testkit::fuzz::{self, Fuzzer, TrackingAllocator};

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

const TARGET: &str = "adapter-manifest";
const ENCODER: &str = "sklesion-xception-gap2048-v1";
const DIM: usize = 2048;
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"[training]",
    b"=",
    b"\"",
    b"'''",
    b"{",
    b"}",
    b",",
    b"\n",
    b"nan",
    b"inf",
    b"-1",
    b"18446744073709551615",
    b"9223372036854775807",
    b"\"..\"",
    b"\"/etc/passwd\"",
    b"\"mel\"",
];
/// Keys the seeds may not spell, so edits can add them.
const KEYS: &[&str] = &["unknown_key", "model"];

fn load_text(dir: &Path, text: &str) -> Result<Adapter, AdapterError> {
    std::fs::write(dir.join(MANIFEST_FILE), text).unwrap();
    Adapter::load(dir, ENCODER, DIM)
}

/// A manifest the reader let through to its model file.
fn check_accepted(text: &str) -> Result<(), String> {
    let m: AdapterManifest = toml::from_str(text)
        .map_err(|e| format!("load went past a manifest that is not one: {e}"))?;
    let file = Path::new(&m.file);
    let broken = [
        ("format", m.format != 1),
        ("class list", m.classes.len() < 2),
        ("hidden size", m.hidden == 0),
        (
            "model file (not a name in the same folder)",
            m.file.is_empty()
                || file.is_absolute()
                || m.file.contains(['/', '\\'])
                || m.file.contains(".."),
        ),
    ];
    match broken.iter().find(|(_, broken)| *broken) {
        Some((what, _)) => Err(format!(
            "read the model file of a manifest with a bad {what}: {m:?}"
        )),
        None => Ok(()),
    }
}

fn check_text(dir: &Path, text: &str) -> Result<(), String> {
    match load_text(dir, text) {
        Ok(_) => Err("loaded an adapter from a folder without a model file".into()),
        // Refused for the manifest itself.
        Err(AdapterError::Manifest { .. }) => Ok(()),
        Err(AdapterError::EncoderMismatch { .. }) => {
            let m: AdapterManifest =
                toml::from_str(text).map_err(|e| format!("not a manifest: {e}"))?;
            if m.encoder_model_id == ENCODER && m.embedding_dim == DIM {
                return Err("an encoder mismatch for the encoder in use".into());
            }
            Ok(())
        }
        // Past the manifest's checks, at the (missing) model file.
        Err(AdapterError::Io { .. } | AdapterError::ChecksumMismatch { .. }) => {
            check_accepted(text)
        }
        Err(other) => Err(format!("refused with an unexpected error: {other}")),
    }
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9_.-]{1,24}",
        1 => any::<String>(),
    ]
}

fn arb_manifest() -> impl Strategy<Value = AdapterManifest> {
    let max = i64::MAX as u64;
    let training = (
        0..=max,
        (
            0..=max as usize,
            0..=max as usize,
            0..=max as usize,
            0..=max as usize,
        ),
        prop::num::f64::NORMAL | prop::num::f64::ZERO,
        prop::collection::vec(any::<String>(), 0..3),
        0..=max,
    )
        .prop_map(
            |(
                seed,
                (epochs_run, best_epoch, train_cases, validation_cases),
                acc,
                class_changes,
                wall_time_ms,
            )| {
                TrainingSummary {
                    seed,
                    epochs_run,
                    best_epoch,
                    train_cases,
                    validation_cases,
                    validation_balanced_accuracy: acc,
                    class_changes,
                    wall_time_ms,
                }
            },
        );
    (
        (arb_text(), arb_text(), 0..=max as usize, 0..=max as usize),
        (
            prop::collection::vec(arb_text(), 0..9),
            arb_text(),
            "[0-9a-f]{64}",
            0..=max,
        ),
        training,
    )
        .prop_map(
            |(
                (adapter_id, encoder_model_id, embedding_dim, hidden),
                (classes, file, sha256, created_at_ms),
                training,
            )| {
                AdapterManifest {
                    format: 1,
                    adapter_id,
                    encoder_model_id,
                    embedding_dim,
                    hidden,
                    classes,
                    file,
                    sha256,
                    created_at_ms,
                    training,
                    calibration: None,
                }
            },
        )
}

/// `save` writes `toml::to_string_pretty` of the manifest; `load` reads it
/// back with `toml::from_str`.
fn round_trip(dir: &Path, m: AdapterManifest) -> Result<(), String> {
    let text = toml::to_string_pretty(&m).map_err(|e| format!("writing failed: {e}"))?;
    let back: AdapterManifest =
        toml::from_str(&text).map_err(|e| format!("reading back failed: {e}"))?;
    if back != m {
        return Err(format!("read back {back:?}"));
    }
    check_text(dir, &text)
}

#[test]
fn the_seeds_are_manifests_this_build_reads() {
    let dir = tempfile::tempdir().unwrap();
    for seed in fuzz::seeds(TARGET) {
        let text = String::from_utf8(seed.bytes).unwrap();
        match load_text(dir.path(), &text) {
            // The model file is not there: everything before it passed.
            Err(AdapterError::Io { path, .. }) => {
                assert!(path.ends_with(toml::from_str::<AdapterManifest>(&text).unwrap().file))
            }
            other => panic!("seed {}: {other:?}", seed.name),
        }
    }
}

#[test]
fn fuzz_adapter_manifest() {
    let seeds = fuzz::seeds(TARGET);
    // Memory where the OS offers it: each input is a file rewritten.
    let dir = tempfile::Builder::new()
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let d = dir.path();
    let mut fuzzer = Fuzzer::new(TARGET);
    fuzzer.check("mutants", fuzz::mutants(seeds.clone(), TOKENS), |m| {
        check_text(d, &String::from_utf8_lossy(&m.bytes))
    });
    fuzzer.check("toml-edits", fuzz::toml_mutants(&seeds, KEYS), |m| {
        check_text(d, &m.text)
    });
    fuzzer.check("random-text", any::<String>(), |t| check_text(d, &t));
    fuzzer.check("round-trip", arb_manifest(), |m| round_trip(d, m));
    fuzzer.finish();
}
