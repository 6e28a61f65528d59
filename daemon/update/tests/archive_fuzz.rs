//! Fuzz target `bundle-archive`: `archive::unpack`, which reads a tar a
//! device downloaded or an operator was handed, before any signature is
//! checked. Seeds are in `fuzz/corpus/bundle-archive/` (small bundle
//! archives: parts only, several parts, a GNU long name); the harness is
//! `dermascope_testkit::fuzz`.
//!
//! Invariants: no input panics, hangs or allocates by a length it read;
//! a refused archive leaves nothing at the destination; an accepted one
//! wrote only regular files and directories, under a part's directory or
//! as `bundle.toml`/`bundle.toml.sig`, and nothing beside the destination.

use std::fs;
use std::path::Path;

use dermascope_testkit::fuzz::{self, TrackingAllocator};
use dermascope_update::archive::unpack;
use dermascope_update::manifest::Part;

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

const TARGET: &str = "bundle-archive";
const TOKENS: &[&[u8]] = &[
    b"ustar  \0",
    b"ustar\x0000",
    b"././@LongLink",
    b"../",
    b"/etc/passwd",
    b"encoder/",
    b"bundle.toml",
    b"77777777777",
    b"00000001000",
    b"\0\0\0\0\0\0\0\0",
];

/// Every path under `dir`, relative, with whether it is a directory;
/// fails on anything that is neither a regular file nor a directory.
fn tree(dir: &Path, rel: &str, out: &mut Vec<(String, bool)>) -> Result<(), String> {
    for entry in fs::read_dir(dir).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = format!("{rel}{name}");
        let kind = entry.file_type().map_err(|e| e.to_string())?;
        if kind.is_dir() {
            out.push((path.clone(), true));
            tree(&entry.path(), &format!("{path}/"), out)?;
        } else if kind.is_file() {
            out.push((path, false));
        } else {
            return Err(format!("wrote {path:?}, neither a file nor a directory"));
        }
    }
    Ok(())
}

fn check(bytes: &[u8]) -> Result<(), String> {
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let input = root.path().join("in.tar");
    fs::write(&input, bytes).map_err(|e| e.to_string())?;
    let work = root.path().join("work");
    fs::create_dir(&work).map_err(|e| e.to_string())?;
    let dest = work.join("out");
    let result = unpack(&input, &dest);
    let beside: Vec<String> = fs::read_dir(&work)
        .map_err(|e| e.to_string())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    match result {
        Err(_) if beside.is_empty() => Ok(()),
        Err(e) => Err(format!("refused ({e}) but left {beside:?}")),
        Ok(()) => {
            if beside != ["out"] {
                return Err(format!("wrote beside the destination: {beside:?}"));
            }
            let mut found = Vec::new();
            tree(&dest, "", &mut found)?;
            for (path, is_dir) in found {
                let top = path.split('/').next().unwrap_or("");
                let allowed = if path.contains('/') || is_dir {
                    Part::from_dir(top).is_some()
                } else {
                    path == "bundle.toml" || path == "bundle.toml.sig"
                };
                if !allowed {
                    return Err(format!("accepted and wrote {path:?}"));
                }
            }
            Ok(())
        }
    }
}

#[test]
fn the_seeds_unpack() {
    let seeds = fuzz::seeds(TARGET);
    assert!(seeds.len() >= 3);
    for seed in seeds {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("in.tar");
        fs::write(&input, &seed.bytes).unwrap();
        unpack(&input, &root.path().join("out"))
            .unwrap_or_else(|e| panic!("seed {}: {e}", seed.name));
    }
}

#[test]
fn fuzz_bundle_archive() {
    let mut fuzzer = fuzz::Fuzzer::new(TARGET);
    fuzzer.check(
        "mutants",
        fuzz::mutants(fuzz::seeds(TARGET), TOKENS),
        |mutant| check(&mutant.bytes),
    );
    fuzzer.check("random", fuzz::random_bytes(4096), |bytes| check(&bytes));
    fuzzer.finish();
}
