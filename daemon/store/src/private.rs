//! A store is patient data (thumbnails, originals, ages, sites, notes), so
//! it is the daemon user's alone, whatever the process umask.
//!
//! sled creates its own files (`conf`, `db`, `snap.*`, `blobs/`) with the
//! umask, so the store does not rely on their modes: it creates the store
//! directory itself, mode 0700, before sled opens it, and a file in a 0700
//! directory is out of other users' reach whatever its own mode. An
//! existing directory (made by an older build, by hand, by a service
//! manager) is tightened to 0700 when the store opens, and the files found
//! in it lose their group and other bits; the index caches are created
//! 0600. Elsewhere than Unix, modes do not exist and all this is a no-op.

use std::fs::{self, File};
use std::io;
use std::path::Path;

/// Creates `dir` and any missing parents, each new one mode 0700; one that
/// exists is left to [`tighten_all`].
pub(crate) fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Takes group and other bits off `dir` and everything in it, recursively
/// (symbolic links are left alone: their targets are not the store's).
pub(crate) fn tighten_all(dir: &Path) -> io::Result<()> {
    tighten(dir)?;
    tighten_contents(dir)
}

fn tighten_contents(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            continue;
        }
        let path = entry.path();
        tighten(&path)?;
        if kind.is_dir() {
            tighten_contents(&path)?;
        }
    }
    Ok(())
}

/// Creates (or replaces) `path` for writing, mode 0600.
pub(crate) fn create_file(path: &Path) -> io::Result<File> {
    // A file that exists keeps its mode when truncated: start afresh.
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

#[cfg(unix)]
fn tighten(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::symlink_metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7700))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn tighten(_: &Path) -> io::Result<()> {
    Ok(())
}
