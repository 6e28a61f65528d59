//! Fuzz target `bundle-manifest`: `bundle.toml` (`Manifest::parse`) and
//! `bundle.toml.sig` (`SignatureFile::parse`), both read from a USB stick.
//! The manifest is parsed only after its signature verified, but a
//! trusted key may still sign a mistaken manifest, so its checks must hold
//! on their own. Seeds are in `fuzz/corpus/bundle-manifest/`; the harness is
//! `dermascope_testkit::fuzz`.
//!
//! Invariants: no input panics or allocates without bound; an accepted
//! manifest lists only safe paths (relative, no `.`/`..`/empty component,
//! inside a part it carries), hex hashes, bounded sizes, a file for every
//! carried part and an encoder for an adapter or library; and it reads back
//! equal after `to_toml`.

use dermascope_testkit::fuzz::{self, TrackingAllocator};
use dermascope_update::keys::SignatureFile;
use dermascope_update::manifest::{part_of, Manifest, MAX_FILE_BYTES};

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

const TARGET: &str = "bundle-manifest";
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"[[files]]",
    b"[needs]",
    b"=",
    b"\"",
    b"'''",
    b"\n",
    b"-1",
    b"18446744073709551615",
    b"\"..\"",
    b"\"adapter/../x\"",
    b"\"/etc/passwd\"",
    b"\"encoder\"",
    b"\"library\"",
    b"/",
    b"\\",
];
const KEYS: &[&str] = &["unknown_key", "downgrade", "revoke_keys"];

fn check_text(text: &str) -> Result<(), String> {
    let _ = SignatureFile::parse(text);
    let Ok(m) = Manifest::parse(text.as_bytes()) else {
        return Ok(());
    };
    for f in &m.files {
        let parts: Vec<&str> = f.path.split('/').collect();
        if f.path.starts_with('/')
            || f.path.contains('\\')
            || parts
                .iter()
                .any(|c| c.is_empty() || *c == "." || *c == "..")
            || parts.len() < 2
        {
            return Err(format!("accepted the unsafe path {:?}", f.path));
        }
        if !part_of(&f.path).is_some_and(|p| m.carries.contains(&p)) {
            return Err(format!("accepted {:?} outside the carried parts", f.path));
        }
        if f.sha256.len() != 64 || f.size > MAX_FILE_BYTES {
            return Err(format!("accepted the entry {f:?}"));
        }
    }
    for p in &m.carries {
        if !m.files.iter().any(|f| part_of(&f.path) == Some(*p)) {
            return Err(format!("accepted {p} without a file"));
        }
        if p.needs_encoder() && m.needs.encoder_model_id.is_none() {
            return Err(format!("accepted {p} without its encoder"));
        }
    }
    let text = m
        .to_toml()
        .map_err(|e| format!("writing back failed: {e}"))?;
    match Manifest::parse(text.as_bytes()) {
        Ok(back) if back == m => Ok(()),
        Ok(back) => Err(format!("read back {back:?}")),
        Err(e) => Err(format!("its own TOML is refused: {e}")),
    }
}

#[test]
fn the_seeds_are_manifests_this_build_reads() {
    for seed in fuzz::seeds(TARGET) {
        let m = Manifest::parse(&seed.bytes).unwrap_or_else(|e| panic!("seed {}: {e}", seed.name));
        check_text(&String::from_utf8(seed.bytes).unwrap())
            .unwrap_or_else(|e| panic!("seed {}: {e}", seed.name));
        assert!(!m.files.is_empty());
    }
}

#[test]
fn fuzz_bundle_manifest() {
    fuzz::fuzz_toml_text(TARGET, TOKENS, KEYS, check_text);
}
