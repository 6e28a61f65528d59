//! A bundle as one file, for the fleet service to store and a device to
//! download: an uncompressed tar of `bundle.toml`, `bundle.toml.sig` and
//! the part directories.
//!
//! [`pack`] is deterministic (entries sorted by path, mtime 0, uid/gid 0,
//! no user or group names, mode 0644 for files and 0755 for directories),
//! so one bundle always gives the same archive and the same sha256: the
//! service names an archive by that hash and a device checks its download
//! against it. Uncompressed because the ONNX weights inside do not compress
//! and a plain tar can be resumed and hashed as it streams.
//!
//! [`unpack`] trusts nothing in the archive: it takes only regular files
//! and directories at relative, normal paths under a part's directory (or
//! the manifest and its signature at the top), refuses links, devices,
//! FIFOs and duplicates, and caps the entry count and the bytes written
//! before writing them. It does not check the signature or the hashes: the
//! unpacked directory is verified afterwards exactly as any bundle
//! ([`crate::verify_bundle`] or [`crate::Installer::install`]).

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{io, UpdateError};
use crate::manifest::{
    Part, MANIFEST, MAX_FILES, MAX_FILE_BYTES, MAX_MANIFEST_BYTES, MAX_TOTAL_BYTES, SIGNATURE,
};

/// Most entries an archive may hold: every listed file, as many
/// directories, the manifest and its signature.
pub const MAX_ENTRIES: usize = 2 * MAX_FILES + 2;
/// The signature file is a few lines; anything larger is not one.
const MAX_SIGNATURE_BYTES: u64 = 4096;
/// What a regular file's content may add up to in one archive.
pub const MAX_CONTENT_BYTES: u64 = MAX_TOTAL_BYTES + MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES;
/// The largest archive a bundle within the manifest's caps can make: its
/// content, plus per entry its headers, long name and padding, plus the
/// end marker. A device refuses to download anything larger.
pub const MAX_ARCHIVE_BYTES: u64 =
    MAX_CONTENT_BYTES + MAX_ENTRIES as u64 * BLOCKS_PER_ENTRY * 512 + 2 * 512;
const MAX_PATH_BYTES: usize = 1024;
/// Blocks one entry may take: its header, a long-name header, the name's
/// blocks (with its NUL) and the data's last-block padding.
const BLOCKS_PER_ENTRY: u64 = 3 + (MAX_PATH_BYTES as u64 + 1).div_ceil(512);

/// The sha256 (lowercase hex) and size of an archive [`pack`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveInfo {
    pub sha256: String,
    pub size: u64,
}

/// Why an archive was refused. Whatever [`unpack`] wrote before it found
/// the problem is removed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive is not a readable tar (truncated, damaged or not a tar at all): {reason}; download or copy it again")]
    Unreadable { reason: String },
    #[error("the archive's entry {path:?} is unsafe: {reason}")]
    UnsafePath { path: String, reason: &'static str },
    #[error("the archive's entry {path:?} is a {kind}; a bundle archive holds regular files and directories only")]
    NotAllowed { path: String, kind: &'static str },
    #[error("the archive's entry {path:?} is not in a part's directory (encoder/, adapter/, library/, config/) nor bundle.toml or its .sig")]
    Unexpected { path: String },
    #[error("the archive holds {path:?} twice")]
    Duplicate { path: String },
    #[error("the archive holds more than {limit} entries")]
    TooManyEntries { limit: usize },
    #[error("the archive's file {path:?} claims {size} bytes; the limit is {limit}")]
    FileTooLarge { path: String, size: u64, limit: u64 },
    #[error("the archive's files add up to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the archive ends inside {path:?} ({found} of {expected} bytes): it is truncated; download or copy it again")]
    Truncated {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error("the archive has no {path}: it is not a bundle archive, or it is truncated")]
    Missing { path: &'static str },
    #[error("{path} exists already; unpack into a new directory")]
    DestinationExists { path: PathBuf },
}

/// Writes `bundle_dir`'s manifest, signature and part directories to
/// `out` as a deterministic tar (written beside `out` and renamed into
/// place, so `out` is either absent or complete). Refuses symlinks,
/// special files and anything else at the bundle's top level, as signing
/// does, so the archive holds exactly what was signed. Does not verify
/// the signature: the caller does that against its own trusted keys.
pub fn pack(bundle_dir: &Path, out: &Path) -> Result<ArchiveInfo, UpdateError> {
    let entries = collect(bundle_dir)?;
    let file_name = out.file_name().ok_or_else(|| UpdateError::BadBundleFile {
        path: out.to_path_buf(),
        reason: "not a file name".into(),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(".partial");
    let tmp = out.with_file_name(tmp_name);
    let result = write_archive(bundle_dir, &entries, &tmp).and_then(|info| {
        fs::rename(&tmp, out).map_err(io("rename into place", out))?;
        Ok(info)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// One entry of a bundle directory, by its `/`-separated relative path.
struct Entry {
    rel: String,
    dir: bool,
}

/// Every directory and file [`pack`] puts in the archive, sorted by path.
fn collect(bundle_dir: &Path) -> Result<Vec<Entry>, UpdateError> {
    for name in [MANIFEST, SIGNATURE] {
        let path = bundle_dir.join(name);
        let meta = fs::symlink_metadata(&path).map_err(|error| {
            if error.kind() == io::ErrorKind::NotFound {
                UpdateError::MissingFile { path: name.into() }
            } else {
                io("inspect", &path)(error)
            }
        })?;
        if !meta.file_type().is_file() {
            return Err(UpdateError::NotRegular { path: name.into() });
        }
    }
    let mut entries = vec![
        Entry {
            rel: MANIFEST.into(),
            dir: false,
        },
        Entry {
            rel: SIGNATURE.into(),
            dir: false,
        },
    ];
    let mut pending = vec![(bundle_dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = pending.pop() {
        for entry in fs::read_dir(&path).map_err(io("list", &path))? {
            let entry = entry.map_err(io("list", &path))?;
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| UpdateError::NotInManifest {
                path: format!("{rel}{}", name.to_string_lossy()),
            })?;
            let child = format!("{rel}{name}");
            if rel.is_empty() && (name == MANIFEST || name == SIGNATURE) {
                continue;
            }
            let kind = entry.file_type().map_err(io("inspect", entry.path()))?;
            if rel.is_empty() && !(kind.is_dir() && Part::from_dir(name).is_some()) {
                return Err(UpdateError::NotInManifest { path: child });
            }
            if kind.is_dir() {
                pending.push((entry.path(), format!("{child}/")));
                entries.push(Entry {
                    rel: child,
                    dir: true,
                });
            } else if kind.is_file() {
                entries.push(Entry {
                    rel: child,
                    dir: false,
                });
            } else {
                return Err(UpdateError::NotRegular { path: child });
            }
        }
    }
    entries.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(entries)
}

/// Counts and hashes what goes through it, so the archive is hashed as it
/// is written rather than read back.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_archive(
    bundle_dir: &Path,
    entries: &[Entry],
    tmp: &Path,
) -> Result<ArchiveInfo, UpdateError> {
    let file = fs::File::create(tmp).map_err(io("create", tmp))?;
    let writer = HashingWriter {
        inner: io::BufWriter::new(file),
        hasher: Sha256::new(),
        size: 0,
    };
    let mut builder = tar::Builder::new(writer);
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if entry.dir {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder
                .append_data(&mut header, format!("{}/", entry.rel), io::empty())
                .map_err(io("write", tmp))?;
        } else {
            let path = bundle_dir.join(&entry.rel);
            let file = fs::File::open(&path).map_err(io("open", &path))?;
            let size = file.metadata().map_err(io("inspect", &path))?.len();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(size);
            // The size in the header was taken before reading: a file that
            // grows or shrinks meanwhile must not give a corrupt archive.
            let mut exact = ExactReader {
                inner: file.take(size),
                left: size,
                path: &path,
            };
            builder
                .append_data(&mut header, &entry.rel, &mut exact)
                .map_err(|error| {
                    if exact.left > 0 {
                        UpdateError::ChangedDuringCopy {
                            path: entry.rel.clone(),
                        }
                    } else {
                        io("write", tmp)(error)
                    }
                })?;
        }
    }
    let mut writer = builder.into_inner().map_err(io("write", tmp))?;
    writer.flush().map_err(io("write", tmp))?;
    let file = writer
        .inner
        .into_inner()
        .map_err(|e| io("write", tmp)(e.into_error()))?;
    file.sync_all().map_err(io("sync", tmp))?;
    Ok(ArchiveInfo {
        sha256: hex::encode(writer.hasher.finalize()),
        size: writer.size,
    })
}

/// Yields exactly `left` bytes or fails: a file that shrank while being
/// packed would otherwise leave a short entry.
struct ExactReader<'a, R> {
    inner: R,
    left: u64,
    path: &'a Path,
}

impl<R: Read> Read for ExactReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was packed", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Unpacks `archive` into `dest`, which must not exist yet and is created.
/// On any error nothing is left at `dest`.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), UpdateError> {
    let file = fs::File::open(archive).map_err(io("open", archive))?;
    match fs::create_dir(dest) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            return Err(ArchiveError::DestinationExists {
                path: dest.to_path_buf(),
            }
            .into())
        }
        Err(error) => return Err(io("create", dest)(error)),
    }
    let result = unpack_into(io::BufReader::new(file), dest, Limits::BUNDLE);
    if result.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    result
}

fn unreadable(error: io::Error) -> UpdateError {
    ArchiveError::Unreadable {
        reason: error.to_string(),
    }
    .into()
}

/// The caps [`unpack`] enforces (smaller ones in the unit tests, which
/// cannot write gigabytes).
#[derive(Clone, Copy)]
struct Limits {
    entries: usize,
    content: u64,
}

impl Limits {
    const BUNDLE: Limits = Limits {
        entries: MAX_ENTRIES,
        content: MAX_CONTENT_BYTES,
    };
}

fn unpack_into(reader: impl Read, dest: &Path, limits: Limits) -> Result<(), UpdateError> {
    let mut archive = tar::Archive::new(reader);
    let mut seen = BTreeSet::new();
    let mut count = 0usize;
    let mut content: u64 = 0;
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        count += 1;
        if count > limits.entries {
            return Err(ArchiveError::TooManyEntries {
                limit: limits.entries,
            }
            .into());
        }
        let raw = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        let is_dir = kind.is_dir();
        let rel = check_entry_path(&raw, is_dir)?;
        if !kind.is_file() && !is_dir {
            return Err(ArchiveError::NotAllowed {
                path: rel,
                kind: kind_name(kind),
            }
            .into());
        }
        if !seen.insert(rel.clone()) {
            return Err(ArchiveError::Duplicate { path: rel }.into());
        }
        let target = dest.join(&rel);
        if is_dir {
            fs::create_dir_all(&target).map_err(io("create", &target))?;
            continue;
        }
        // The size the data is read with: a PAX `size` record overrides
        // the header's, so the header alone must not be what is capped.
        let size = entry.size();
        let limit = if rel == MANIFEST {
            MAX_MANIFEST_BYTES
        } else if rel == SIGNATURE {
            MAX_SIGNATURE_BYTES
        } else {
            MAX_FILE_BYTES
        };
        if size > limit {
            return Err(ArchiveError::FileTooLarge {
                path: rel,
                size,
                limit,
            }
            .into());
        }
        content = content.saturating_add(size);
        if content > limits.content {
            return Err(ArchiveError::TooLarge {
                limit: limits.content,
            }
            .into());
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io("create", parent))?;
        }
        // create_new: never writes through anything already there.
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(io("create", &target))?;
        let found = copy_entry(&mut entry, &mut out, &target)?;
        if found != size {
            return Err(ArchiveError::Truncated {
                path: rel,
                expected: size,
                found,
            }
            .into());
        }
    }
    for path in [MANIFEST, SIGNATURE] {
        if !seen.contains(path) {
            return Err(ArchiveError::Missing { path }.into());
        }
    }
    Ok(())
}

/// Copies an entry's data, telling a read failure of the archive (its
/// end, or garbage) from a write failure at the destination (a full disk).
fn copy_entry(
    entry: &mut impl Read,
    out: &mut fs::File,
    target: &Path,
) -> Result<u64, UpdateError> {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(unreadable(error)),
        };
        out.write_all(&buf[..n]).map_err(io("write", target))?;
        total += n as u64;
    }
}

/// The entry's path as a checked, `/`-separated relative path (without a
/// directory's trailing `/`), or why it is refused.
fn check_entry_path(raw: &[u8], is_dir: bool) -> Result<String, UpdateError> {
    let lossy = String::from_utf8_lossy(raw).into_owned();
    let unsafe_path = |reason| -> UpdateError {
        ArchiveError::UnsafePath {
            path: lossy.clone(),
            reason,
        }
        .into()
    };
    let path = std::str::from_utf8(raw).map_err(|_| unsafe_path("not UTF-8"))?;
    if path.len() > MAX_PATH_BYTES {
        return Err(unsafe_path("longer than 1024 bytes"));
    }
    if path.starts_with('/') {
        return Err(unsafe_path("absolute"));
    }
    if path.contains('\\') || path.contains('\0') {
        return Err(unsafe_path("contains a backslash or NUL"));
    }
    let path = if is_dir {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    };
    let components: Vec<&str> = path.split('/').collect();
    for c in &components {
        match *c {
            "" => return Err(unsafe_path("has an empty component")),
            "." | ".." => return Err(unsafe_path("has a . or .. component")),
            _ => {}
        }
    }
    let top_file = !is_dir && (path == MANIFEST || path == SIGNATURE);
    let in_part = Part::from_dir(components[0]).is_some() && (is_dir || components.len() >= 2);
    if !top_file && !in_part {
        return Err(ArchiveError::Unexpected {
            path: path.to_owned(),
        }
        .into());
    }
    Ok(path.to_owned())
}

fn kind_name(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "FIFO",
        tar::EntryType::Continuous => "contiguous file",
        tar::EntryType::GNUSparse => "sparse file",
        tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => "pax header",
        _ => "special entry",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_entry(builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, path, data).unwrap();
    }

    #[test]
    fn content_and_entry_caps_count_across_entries() {
        let mut builder = tar::Builder::new(Vec::new());
        file_entry(&mut builder, MANIFEST, b"1234");
        file_entry(&mut builder, SIGNATURE, b"1234");
        file_entry(&mut builder, "encoder/a", &[7; 600]);
        file_entry(&mut builder, "encoder/b", &[7; 600]);
        let tar = builder.into_inner().unwrap();
        let run = |limits| {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("out");
            fs::create_dir(&dest).unwrap();
            unpack_into(&tar[..], &dest, limits)
        };
        // Each file is under the cap; together they are not.
        let small = Limits {
            entries: 10,
            content: 1000,
        };
        assert!(matches!(
            run(small),
            Err(UpdateError::Archive(ArchiveError::TooLarge { limit: 1000 }))
        ));
        let few = Limits {
            entries: 3,
            content: 1 << 20,
        };
        assert!(matches!(
            run(few),
            Err(UpdateError::Archive(ArchiveError::TooManyEntries {
                limit: 3
            }))
        ));
        let enough = Limits {
            entries: 4,
            content: 1208,
        };
        run(enough).unwrap();
    }

    #[test]
    fn entry_paths() {
        assert_eq!(
            check_entry_path(b"encoder/", true).unwrap(),
            "encoder".to_owned()
        );
        assert_eq!(
            check_entry_path(b"encoder/model.onnx", false).unwrap(),
            "encoder/model.onnx".to_owned()
        );
        assert_eq!(check_entry_path(b"bundle.toml", false).unwrap(), MANIFEST);
        for (bad, is_dir) in [
            (&b"../x"[..], false),
            (b"/etc/passwd", false),
            (b"encoder/../../x", false),
            (b"encoder/./x", false),
            (b"encoder//x", false),
            (b"encoder\\x", false),
            (b"encoder", false),
            (b"bundle.toml", true),
            (b"notes.txt", false),
            (b"other/x", false),
            (b"encoder/\xff", false),
        ] {
            assert!(
                check_entry_path(bad, is_dir).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
