//! Bundle archives: `pack` is deterministic and round-trips to a bundle
//! that verifies; `unpack` refuses every hostile or damaged archive with a
//! typed error and leaves nothing behind.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{bundle, full, key, trusted_dir};
use dermascope_update::archive::{pack, unpack, ArchiveError, MAX_ENTRIES};
use dermascope_update::{verify_bundle, TrustedKeys, UpdateError};
use sha2::{Digest, Sha256};

fn sha256_of(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).unwrap()))
}

/// A signed bundle with every part, and the keys that trust it.
fn signed_bundle(root: &Path) -> (std::path::PathBuf, TrustedKeys) {
    let k = key(&root.join("keys"), "op");
    let dir = bundle(&root.join("bundle"), &full("enc-a", 1), 7, &k);
    let trusted = TrustedKeys::load(&trusted_dir(&root.join("trusted"), &[&k])).unwrap();
    (dir, trusted)
}

#[test]
fn pack_is_deterministic_and_round_trips_to_a_bundle_that_verifies() {
    let root = tempfile::tempdir().unwrap();
    let (dir, trusted) = signed_bundle(root.path());
    let first = root.path().join("a.tar");
    let info = pack(&dir, &first).unwrap();
    assert_eq!(info.sha256, sha256_of(&first), "reported sha256");
    assert_eq!(
        info.size,
        fs::metadata(&first).unwrap().len(),
        "reported size"
    );

    // The same bundle copied elsewhere with other mtimes and modes (as a
    // checkout or a USB copy would) must give the very same archive.
    let copy = root.path().join("copy");
    copy_tree(&dir, &copy);
    for entry in walk_all(&copy) {
        let meta = fs::metadata(&entry).unwrap();
        let mode = if meta.is_dir() { 0o700 } else { 0o600 };
        fs::set_permissions(&entry, fs::Permissions::from_mode(mode)).unwrap();
    }
    let second = root.path().join("b.tar");
    let info2 = pack(&copy, &second).unwrap();
    assert_eq!(info, info2);
    assert_eq!(fs::read(&first).unwrap(), fs::read(&second).unwrap());

    // Entries sorted, owned by root, mtime 0, 0644/0755, nothing else.
    let mut archive = tar::Archive::new(fs::File::open(&first).unwrap());
    let mut paths = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        assert_eq!(h.mtime().unwrap(), 0);
        assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
        let expected_mode = if h.entry_type().is_dir() {
            0o755
        } else {
            0o644
        };
        assert_eq!(h.mode().unwrap(), expected_mode);
        assert!(h.entry_type().is_dir() || h.entry_type().is_file());
        paths.push(String::from_utf8(entry.path_bytes().into_owned()).unwrap());
    }
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
    assert!(paths.contains(&"bundle.toml".to_owned()));
    assert!(paths.contains(&"bundle.toml.sig".to_owned()));
    assert!(paths.contains(&"encoder/".to_owned()));

    let out = root.path().join("unpacked");
    unpack(&first, &out).unwrap();
    let verified = verify_bundle(&out, &trusted, &BTreeSet::new()).unwrap();
    assert_eq!(verified.manifest.version, 7);
    for rel in ["encoder/encoder-int8.onnx", "adapter/adapter.onnx"] {
        assert_eq!(
            fs::read(out.join(rel)).unwrap(),
            fs::read(dir.join(rel)).unwrap()
        );
    }
}

#[test]
fn a_long_path_survives_the_round_trip() {
    let root = tempfile::tempdir().unwrap();
    let k = key(&root.path().join("keys"), "op");
    let dir = root.path().join("bundle");
    common::write_contents(&dir, &full("enc-a", 2));
    let deep = format!("library/{}/{}", "d".repeat(150), "f".repeat(150));
    fs::create_dir_all(dir.join(&deep).parent().unwrap()).unwrap();
    fs::write(dir.join(&deep), b"deep").unwrap();
    dermascope_update::sign_bundle(
        &dir,
        &k.signing,
        &dermascope_update::SignOptions {
            version: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let tar = root.path().join("b.tar");
    pack(&dir, &tar).unwrap();
    let out = root.path().join("out");
    unpack(&tar, &out).unwrap();
    let trusted = TrustedKeys::load(&trusted_dir(&root.path().join("t"), &[&k])).unwrap();
    verify_bundle(&out, &trusted, &BTreeSet::new()).unwrap();
    assert_eq!(fs::read(out.join(&deep)).unwrap(), b"deep");
}

#[test]
fn pack_refuses_what_signing_would_not_ship() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _) = signed_bundle(root.path());
    let out = root.path().join("x.tar");

    std::os::unix::fs::symlink("/etc/passwd", dir.join("encoder/link")).unwrap();
    assert!(matches!(
        pack(&dir, &out),
        Err(UpdateError::NotRegular { path }) if path == "encoder/link"
    ));
    fs::remove_file(dir.join("encoder/link")).unwrap();

    fs::write(dir.join("notes.txt"), b"x").unwrap();
    assert!(matches!(
        pack(&dir, &out),
        Err(UpdateError::NotInManifest { path }) if path == "notes.txt"
    ));
    fs::remove_file(dir.join("notes.txt")).unwrap();

    fs::remove_file(dir.join("bundle.toml.sig")).unwrap();
    assert!(matches!(
        pack(&dir, &out),
        Err(UpdateError::MissingFile { path }) if path == "bundle.toml.sig"
    ));
    assert!(!out.exists(), "a refused pack leaves no archive");
    let leftovers: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

// --- hand-made hostile archives -------------------------------------------

/// One raw 512-byte header, written field by field so names the tar crate
/// would refuse to write (`..`, absolute) can be made.
fn header(name: &[u8], kind: u8, size: u64, link: &[u8]) -> [u8; 512] {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    *h.as_bytes()
}

/// An archive builder: raw entries, then the end marker.
#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn entry(mut self, name: &[u8], kind: u8, data: &[u8], link: &[u8]) -> Raw {
        self.0
            .extend_from_slice(&header(name, kind, data.len() as u64, link));
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }
    fn file(self, name: &str, data: &[u8]) -> Raw {
        self.entry(name.as_bytes(), b'0', data, b"")
    }
    /// A valid manifest and signature, so only the entry under test is bad.
    fn bundle_files(self) -> Raw {
        self.file("bundle.toml", b"format = 1\n")
            .file("bundle.toml.sig", b"sig\n")
    }
    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

/// Unpacks `bytes` into a fresh `out`; checks nothing is left there or
/// beside it on error.
fn unpack_bytes(bytes: &[u8]) -> Result<(), UpdateError> {
    let root = tempfile::tempdir().unwrap();
    let tar = root.path().join("in.tar");
    fs::write(&tar, bytes).unwrap();
    let out = root.path().join("work/out");
    fs::create_dir(root.path().join("work")).unwrap();
    let result = unpack(&tar, &out);
    if result.is_err() {
        assert!(!out.exists(), "a refused archive leaves no directory");
        let beside: Vec<_> = fs::read_dir(root.path().join("work"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(beside.is_empty(), "written outside dest: {beside:?}");
    }
    result
}

fn archive_error(bytes: &[u8]) -> ArchiveError {
    match unpack_bytes(bytes) {
        Err(UpdateError::Archive(e)) => e,
        other => panic!("expected an archive error, got {other:?}"),
    }
}

#[test]
fn refuses_traversal_and_absolute_paths() {
    for name in [
        &b"../evil"[..],
        b"encoder/../../evil",
        b"encoder/../evil",
        b"/tmp/dermascope-evil",
        b"./encoder/x",
        b"encoder//x",
    ] {
        let bytes = Raw::default()
            .bundle_files()
            .entry(name, b'0', b"evil", b"")
            .finish();
        let e = archive_error(&bytes);
        assert!(
            matches!(e, ArchiveError::UnsafePath { .. }),
            "{:?}: {e:?}",
            String::from_utf8_lossy(name)
        );
    }
    assert!(!Path::new("/tmp/dermascope-evil").exists());
}

#[test]
fn refuses_a_traversal_hidden_in_a_gnu_long_name() {
    let long = format!("{}../../evil", "encoder/".repeat(20));
    let mut name = long.into_bytes();
    name.push(0);
    let bytes = Raw::default()
        .bundle_files()
        .entry(b"././@LongLink", b'L', &name, b"")
        .file("encoder/short", b"evil")
        .finish();
    assert!(matches!(
        archive_error(&bytes),
        ArchiveError::UnsafePath { .. }
    ));
}

#[test]
fn refuses_links_devices_and_fifos() {
    for (kind, what) in [
        (b'2', "symlink"),
        (b'1', "hard link"),
        (b'3', "character device"),
        (b'4', "block device"),
        (b'6', "FIFO"),
        (b'g', "pax header"),
    ] {
        let bytes = Raw::default()
            .bundle_files()
            .entry(b"encoder/x", kind, b"", b"/etc/passwd")
            .finish();
        match archive_error(&bytes) {
            ArchiveError::NotAllowed { path, kind } => {
                assert_eq!(kind, what);
                assert_eq!(path, "encoder/x");
            }
            e => panic!("{what}: {e:?}"),
        }
    }
}

#[test]
fn refuses_unexpected_duplicate_and_missing_entries() {
    let stray = Raw::default()
        .bundle_files()
        .file("notes.txt", b"x")
        .finish();
    assert!(matches!(
        archive_error(&stray),
        ArchiveError::Unexpected { path } if path == "notes.txt"
    ));

    // A second entry for a path: a later one must never replace what an
    // earlier one wrote.
    let twice = Raw::default()
        .bundle_files()
        .file("encoder/x", b"one")
        .file("encoder/x", b"two")
        .finish();
    assert!(matches!(
        archive_error(&twice),
        ArchiveError::Duplicate { path } if path == "encoder/x"
    ));

    let unsigned = Raw::default()
        .file("bundle.toml", b"format = 1\n")
        .file("encoder/x", b"x")
        .finish();
    assert!(matches!(
        archive_error(&unsigned),
        ArchiveError::Missing {
            path: "bundle.toml.sig"
        }
    ));
    // An empty file is a tar of nothing, not a bundle.
    assert!(matches!(archive_error(b""), ArchiveError::Missing { .. }));
}

#[test]
fn refuses_too_many_entries() {
    let mut raw = Raw::default().bundle_files();
    for i in 0..MAX_ENTRIES {
        raw = raw.entry(format!("library/d{i}/").as_bytes(), b'5', b"", b"");
    }
    assert!(matches!(
        archive_error(&raw.finish()),
        ArchiveError::TooManyEntries { limit } if limit == MAX_ENTRIES
    ));
}

#[test]
fn refuses_a_file_above_the_caps_before_reading_it() {
    // Only the header: the claim alone is refused, so no data is needed.
    let mut huge = Raw::default().bundle_files().finish();
    huge.truncate(huge.len() - 1024);
    huge.extend_from_slice(&header(
        b"encoder/huge",
        b'0',
        dermascope_update::manifest::MAX_FILE_BYTES + 1,
        b"",
    ));
    assert!(matches!(
        archive_error(&huge),
        ArchiveError::FileTooLarge { path, .. } if path == "encoder/huge"
    ));

    let big_manifest = Raw::default()
        .file("bundle.toml", &vec![b'#'; (1 << 20) + 1])
        .finish();
    assert!(matches!(
        archive_error(&big_manifest),
        ArchiveError::FileTooLarge { path, .. } if path == "bundle.toml"
    ));
}

#[test]
fn a_pax_size_record_is_capped_like_a_header_size() {
    // The header says 0 bytes; the PAX record before it says more than the
    // cap, and the data would be read with the PAX size.
    let claim = dermascope_update::manifest::MAX_FILE_BYTES + 1;
    let body = format!(" size={claim}\n");
    let mut len = body.len() + 2;
    if format!("{len}{body}").len() != len {
        len += 1;
    }
    let record = format!("{len}{body}");
    assert_eq!(record.len(), len);
    let bytes = Raw::default()
        .bundle_files()
        .entry(b"././@PaxHeader", b'x', record.as_bytes(), b"")
        .file("encoder/huge", b"")
        .finish();
    match archive_error(&bytes) {
        ArchiveError::FileTooLarge { path, size, .. } => {
            assert_eq!(path, "encoder/huge");
            assert_eq!(size, claim);
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn no_truncation_of_a_real_archive_unpacks_into_a_bundle_that_verifies() {
    let root = tempfile::tempdir().unwrap();
    let k = key(&root.path().join("keys"), "op");
    // Small files, so every block of the archive can be a cut point.
    let contents = common::Contents {
        encoder: Some(("enc-a".into(), 3000)),
        adapter: Some(("enc-a".into(), 700)),
        library: false,
        config: true,
        seed: 3,
    };
    let dir = bundle(&root.path().join("bundle"), &contents, 7, &k);
    let trusted = TrustedKeys::load(&trusted_dir(&root.path().join("t"), &[&k])).unwrap();
    let tar = root.path().join("b.tar");
    pack(&dir, &tar).unwrap();
    let bytes = fs::read(&tar).unwrap();
    let mut refused_by_unpack = 0;
    // Every block boundary and a point inside every block.
    let cuts: Vec<usize> = (0..bytes.len() / 512)
        .flat_map(|b| [b * 512, b * 512 + 100])
        .filter(|&c| c < bytes.len() - 1024)
        .collect();
    for &cut in &cuts {
        let out = root.path().join(format!("cut{cut}"));
        fs::write(&tar, &bytes[..cut]).unwrap();
        match unpack(&tar, &out) {
            Err(UpdateError::Archive(_)) => {
                refused_by_unpack += 1;
                assert!(!out.exists());
            }
            Err(e) => panic!("cut at {cut}: not an archive error: {e}"),
            // Cut exactly between entries, the tar looks complete: the
            // bundle check must then find what is missing.
            Ok(()) => assert!(
                verify_bundle(&out, &trusted, &BTreeSet::new()).is_err(),
                "cut at {cut} verified"
            ),
        }
    }
    assert!(refused_by_unpack > cuts.len() / 2, "{refused_by_unpack}");
    let truncated = {
        let mut b = bytes.clone();
        // Inside the data of the first large file: its header says more.
        let at = find(&bytes, b"encoder/encoder-fp32.onnx") + 512 + 1000;
        b.truncate(at);
        b
    };
    let e = archive_error(&truncated);
    assert!(
        matches!(&e, ArchiveError::Truncated { path, found: 1000, .. } if path == "encoder/encoder-fp32.onnx"),
        "{e:?}"
    );
}

#[test]
fn refuses_garbage() {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let garbage: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    assert!(matches!(
        archive_error(&garbage),
        ArchiveError::Unreadable { .. }
    ));
    // A header whose checksum does not match.
    let mut bad = Raw::default().bundle_files().finish();
    bad[0] ^= 0x20;
    assert!(matches!(
        archive_error(&bad),
        ArchiveError::Unreadable { .. }
    ));
}

#[test]
fn unpack_refuses_an_existing_destination_and_leaves_it_alone() {
    let root = tempfile::tempdir().unwrap();
    let (dir, _) = signed_bundle(root.path());
    let tar = root.path().join("b.tar");
    pack(&dir, &tar).unwrap();
    let out = root.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::File::create(out.join("keep"))
        .unwrap()
        .write_all(b"mine")
        .unwrap();
    assert!(matches!(
        unpack(&tar, &out),
        Err(UpdateError::Archive(ArchiveError::DestinationExists { .. }))
    ));
    assert_eq!(fs::read(out.join("keep")).unwrap(), b"mine");
}

/// The offset of the header naming `name`.
fn find(haystack: &[u8], name: &[u8]) -> usize {
    (0..haystack.len())
        .step_by(512)
        .find(|&at| haystack[at..].starts_with(name) && haystack[at + name.len()] == 0)
        .unwrap()
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn walk_all(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk_all(&path));
        }
        out.push(path);
    }
    out
}
