//! Replacing a file in one step.
//!
//! # Guarantees
//! - [`replace`]: a reader of `path` sees the old content or the new, never
//!   a part (a temporary file in the same directory, then `rename`).
//! - [`replace_durably`]: also, once it returns `Ok`, the new content
//!   survives a crash or power cut: the temporary file is fsynced before
//!   the rename and the directory after it.
//! - A failure leaves `path` as it was and removes the temporary file.
//! - Private: on Unix the new file is mode 0600 and [`create_private_dir_all`]
//!   makes directories 0700, whatever the process umask (it can only take
//!   bits away), because what the daemon writes (screens with case
//!   thumbnails, adapters trained on a clinic's cases, the device id) is
//!   the clinic's, not every local user's.
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

/// Creates `dir` and any missing parents, each new one mode 0700 on Unix.
/// Directories that exist already keep their mode.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates (or truncates) `path` for writing, mode 0600 on Unix when it is
/// created.
fn create_private_file(path: &Path) -> io::Result<File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
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
        // A temporary left by a killed writer keeps its old mode when
        // truncated: start from a new file.
        match fs::remove_file(&temporary) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = create_private_file(&temporary)?;
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

    #[cfg(unix)]
    #[test]
    fn files_and_folders_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let nested = dir.path().join("var/screens");
        create_private_dir_all(&nested).unwrap();
        assert_eq!(mode(&dir.path().join("var")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        // An existing folder is not changed.
        fs::set_permissions(&nested, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir_all(&nested).unwrap();
        assert_eq!(mode(&nested), 0o755);
        // The process umask here is whatever the test runner has (0022 on
        // most machines); a file replacing a world-readable one, and one
        // replacing a leftover world-readable temporary, are both 0600.
        let path = nested.join("latest.png");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let leftover = nested.join(".latest.png.tmp");
        fs::write(&leftover, b"half").unwrap();
        fs::set_permissions(&leftover, fs::Permissions::from_mode(0o666)).unwrap();
        replace(&path, b"new").unwrap();
        assert_eq!(mode(&path), 0o600);
        replace_durably(&nested.join("device-id"), b"id").unwrap();
        assert_eq!(mode(&nested.join("device-id")), 0o600);
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
