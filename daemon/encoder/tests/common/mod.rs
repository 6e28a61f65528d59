//! Locating the model bundle and the shared dermoscopy folder from a test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn workspace_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("Cargo.lock").exists() && !dir.join(".git").exists() {
        if !dir.pop() {
            return PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        }
    }
    dir
}

/// The default bundle. Tests that need it fail (not skip) when it is absent:
/// the test command builds it first, so absence is a real defect.
pub fn bundle_dir() -> PathBuf {
    let dir = std::env::var_os("DERMASCOPE_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/dist/sklesion-xception"));
    assert!(
        dir.join("manifest.toml").is_file(),
        "no encoder bundle at {}: run `models/build` (scripts/test does) first",
        dir.display()
    );
    dir
}

/// `../shared/data/derm` beside the checkout, or `$DERMASCOPE_DERM_DATA`.
/// `None` (and a loud SKIPPED line) where it is absent.
pub fn derm_data(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("DERMASCOPE_DERM_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data/derm"));
    if dir.join("labels.csv").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED {test}: dermoscopy data not found at {} (set DERMASCOPE_DERM_DATA)",
            dir.display()
        );
        None
    }
}

pub fn read_f32_le(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes.len() % 4, 0, "{} is not whole f32s", path.display());
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}
