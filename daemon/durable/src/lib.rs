//! Replacing a file in one step.
//!
//! # Guarantees
//! - [`replace`]: a reader of `path` sees the old content or the new, never
//!   a part (a temporary file in the same directory, then `rename`).
//! - [`replace_durably`]: also, once it returns `Ok`, the new content
//!   survives a crash or power cut: the temporary file is fsynced before
//!   the rename and the directory after it.
//! - A failure leaves `path` as it was and removes the temporary file.
//!
//! # Limits
//! The temporary file is `.<name>.tmp` beside the target, so one writer per
//! path at a time; two concurrent writers of one path race for it.
//!
//! Architecture Invariant: std only, so any crate (the hardware traits,
//! the store, the adapter) can use it without a dependency on another.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` atomically (not durably: a screen shot).
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_then_rename(path, bytes, false)
}

/// Replaces `path` with `bytes` atomically and durably (a manifest, an id).
pub fn replace_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_then_rename(path, bytes, true)
}

/// Makes a rename or creation inside `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn write_then_rename(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name to write"))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(".tmp");
    let temporary = path.with_file_name(temporary_name);
    let written = (|| {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        drop(file);
        fs::rename(&temporary, path)?;
        if durable {
            sync_dir(&parent_dir(path))?;
        }
        Ok(())
    })();
    if written.is_err() {
        // Best effort: a leftover temporary is never read, only overwritten.
        let _ = fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.toml");
        replace_durably(&path, b"first").unwrap();
        replace(&path, b"second, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["manifest.toml"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        replace_durably(&path, b"old").unwrap();
        // A directory where the temporary file would go makes the write fail.
        fs::create_dir(dir.path().join(".id.tmp")).unwrap();
        assert!(replace_durably(&path, b"new").is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert!(replace(Path::new("/"), b"x").is_err());
    }
}
