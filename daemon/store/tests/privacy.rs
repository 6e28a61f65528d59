//! A store is the daemon user's alone, whatever the umask: the directory is
//! 0700 and no file in it grants anything to group or others.
//!
//! Its own test binary: the umask belongs to the whole process, and every
//! test here sets the same one (0022, the usual default, under which sled's
//! files come out 0644).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{identity, make_case};
use dermascope_store::CaseStore;

/// A handheld's embedding size, so sled's files have their usual shape.
const DIM: usize = 2048;

fn umask_0022() {
    // SAFETY: umask only swaps the process's mask; it cannot fail.
    unsafe {
        libc::umask(0o022);
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every file and folder under `dir`, depth first.
fn everything_in(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.extend(everything_in(&path));
        }
        all.push(path);
    }
    all
}

/// Files and folders that grant group or others anything, with their modes.
fn open_to_others(dir: &Path) -> Vec<String> {
    everything_in(dir)
        .into_iter()
        .filter(|p| mode(p) & 0o077 != 0)
        .map(|p| format!("{} {:o}", p.display(), mode(&p)))
        .collect()
}

fn fill(store: &CaseStore, prefix: &str) {
    let cases: Vec<_> = (0..64)
        .map(|i| make_case(&format!("{prefix}-{i}"), DIM))
        .collect();
    store.insert_batch(&cases).unwrap();
    store.checkpoint().unwrap();
}

#[test]
fn a_new_store_is_private_to_its_user_under_umask_0022() {
    umask_0022();
    let root = tempfile::tempdir().unwrap();
    // The parent is missing too, as `var/` is before a first start.
    let parent = root.path().join("var");
    let dir = parent.join("cases");
    let store = CaseStore::open(&dir, identity(DIM)).unwrap();
    fill(&store, "first");
    drop(store);

    assert_eq!(mode(&parent), 0o700, "the parent the store created");
    assert_eq!(mode(&dir), 0o700, "the store directory");
    let files = everything_in(&dir);
    let names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
        .collect();
    for expected in ["conf", "db", "index-f32.cache", "index-int8.cache"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    // Our own files are 0600 from their creation.
    for cache in ["index-f32.cache", "index-int8.cache"] {
        assert_eq!(mode(&dir.join(cache)), 0o600, "{cache}");
    }
    // sled's files present at open were tightened; any sled made after it
    // (snapshots, blobs) are behind the 0700 directory, and the next open
    // tightens them too: after it nothing in the store is open to others.
    let store = CaseStore::open(&dir, identity(DIM)).unwrap();
    let open = open_to_others(&dir);
    assert!(open.is_empty(), "open to others after a reopen: {open:?}");
    drop(store);
    println!("store files checked: {names:?}");
}

#[test]
fn a_store_made_world_readable_is_tightened_when_opened() {
    umask_0022();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cases");
    let store = CaseStore::open(&dir, identity(DIM)).unwrap();
    fill(&store, "old");
    drop(store);
    // As an older build (or `cp -r`, or a service manager) left it.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    for path in everything_in(&dir) {
        let open = if path.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(open)).unwrap();
    }
    assert!(!open_to_others(&dir).is_empty());

    let store = CaseStore::open(&dir, identity(DIM)).unwrap();
    assert_eq!(mode(&dir), 0o700);
    let open = open_to_others(&dir);
    assert!(open.is_empty(), "still open to others: {open:?}");
    // Owner bits are kept: the store still reads and writes.
    assert_eq!(store.len().unwrap(), 64);
    fill(&store, "new");
    assert_eq!(store.len().unwrap(), 128);
}
