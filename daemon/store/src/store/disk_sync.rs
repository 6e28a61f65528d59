//! The files sled writes but never fsyncs, made durable before a write is
//! acknowledged.
//!
//! sled 0.34.7 writes every log message larger than a quarter of a segment
//! (128 KiB at the default 512 KiB segment) to a file of its own,
//! `blobs/<lsn>`, with plain `write` calls: it fsyncs neither those files
//! nor the `blobs` directory, nor `conf`, nor the store directory (where it
//! renames its snapshots). Its flush reaches only the log file `db`. With
//! 2048-d embeddings a leaf of 16 rows is that large, and so is every
//! original photograph, so blobs are normal use. After a power cut a blob
//! whose bytes were still in the page cache is empty or absent; sled's
//! recovery stops reading the log at the first unreadable message (every
//! write after it is lost) and skips an absent one (a tree node is lost).
//!
//! So the store syncs what sled leaves behind: every flush fsyncs the blob
//! files it has not synced yet and then the `blobs` directory, and the
//! store directory when its entries changed (sled renames a snapshot into
//! it and removes the old one); opening syncs everything once, because a
//! writer killed earlier may have left files that are readable now only
//! from the page cache, and new writes would build on them. An fsync of a
//! file or directory with nothing new still flushes the drive's cache, so
//! nothing is fsynced that the listing shows unchanged, and a large store
//! is synced at open with one `syncfs`.
//!
//! A blob file is written once and never changed, but sled may be writing
//! one (a split done by a reader, a write outside the writer lock) while a
//! flush lists the directory. A blob is only remembered as synced once its
//! checksum (sled's own CRC-32 over the rest of the file) matches, i.e. it
//! was complete before it was fsynced; an incomplete one is synced again at
//! the next flush.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// sled's blob header: a CRC-32 (little-endian) over the rest of the file.
const BLOB_CRC_BYTES: usize = 4;

pub(super) struct DiskSync {
    dir: PathBuf,
    blobs: PathBuf,
    synced: Mutex<Synced>,
}

#[derive(Default)]
struct Synced {
    /// Blob files known to be complete and on stable storage, by name.
    blobs: HashSet<OsString>,
    /// The store directory's entries when it was last fsynced.
    dir: BTreeSet<OsString>,
}

/// What one sync of the blob directory did.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct BlobSync {
    /// Blob files fsynced.
    pub(super) fsynced: usize,
}

impl DiskSync {
    /// Makes `conf`, every blob file, `blobs/` and the store directory
    /// durable. Every blob found is remembered as synced, complete or not:
    /// nothing of this process writes yet, so an incomplete one is a
    /// crashed writer's leftover, which sled never reads.
    pub(super) fn open(dir: &Path) -> io::Result<Self> {
        let sync = Self {
            dir: dir.to_path_buf(),
            blobs: dir.join("blobs"),
            synced: Mutex::new(Synced::default()),
        };
        // Listed first: what appears later is not covered by the sync below.
        let blobs: HashSet<OsString> = names(&sync.blobs)?.into_iter().collect();
        let entries = names(&sync.dir)?;
        sync_everything(&sync.dir, &blobs)?;
        *sync.lock() = Synced {
            blobs,
            dir: entries,
        };
        Ok(sync)
    }

    /// Fsyncs each blob file not synced yet, then `blobs/` if there was one.
    /// One by one, not with `syncfs`: that would also wait for whatever
    /// other programs left dirty on the file system.
    pub(super) fn sync_new_blobs(&self) -> io::Result<BlobSync> {
        let mut synced = self.lock();
        let synced = &mut synced.blobs;
        let mut present = HashSet::with_capacity(synced.len() + 8);
        let mut new = Vec::new();
        for entry in std::fs::read_dir(&self.blobs)? {
            let entry = entry?;
            let name = entry.file_name();
            if synced.contains(&name) {
                present.insert(name);
                continue;
            }
            let path = entry.path();
            // Checked before the sync: only bytes written by then are
            // certainly covered by it.
            match blob_is_complete(&path) {
                Ok(complete) => new.push((name, path, complete)),
                // Removed by sled since the listing: nothing to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let mut done = BlobSync::default();
        for (name, path, complete) in new {
            if fsync_if_present(&path)? {
                done.fsynced += 1;
                if complete {
                    present.insert(name);
                }
            }
        }
        if done.fsynced > 0 {
            sync_dir(&self.blobs)?;
        }
        // Names sled has removed are dropped with the old set.
        *synced = present;
        Ok(done)
    }

    /// Fsyncs the store directory if its entries changed since it was last
    /// fsynced, so a snapshot sled renamed into place (every million
    /// operations, and at close) is not lost while the old one is gone.
    /// `Ok(true)`: it was fsynced.
    pub(super) fn sync_store_dir(&self) -> io::Result<bool> {
        let mut synced = self.lock();
        // Listed before the fsync: an entry made meanwhile shows as a change
        // next time.
        let entries = names(&self.dir)?;
        if entries == synced.dir {
            return Ok(false);
        }
        sync_dir(&self.dir)?;
        synced.dir = entries;
        Ok(true)
    }

    /// Fsyncs the store directory whatever its listing shows: a rename over
    /// an existing name (the journal's) changes no name, but must be durable.
    pub(super) fn sync_store_dir_now(&self) -> io::Result<()> {
        let mut synced = self.lock();
        let entries = names(&self.dir)?;
        sync_dir(&self.dir)?;
        synced.dir = entries;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Synced> {
        // Only a cache of names: after a panic elsewhere it still holds
        // names that were synced, so it stays usable.
        self.synced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `Ok(false)` if the file is gone (sled removed it meanwhile).
fn fsync_if_present(path: &Path) -> io::Result<bool> {
    match File::open(path) {
        Ok(file) => file.sync_all().map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether sled's CRC-32 at the head of the blob matches the rest of it.
fn blob_is_complete(path: &Path) -> io::Result<bool> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let Some((crc, rest)) = bytes.split_first_chunk::<BLOB_CRC_BYTES>() else {
        return Ok(false);
    };
    Ok(u32::from_le_bytes(*crc) == crc32fast::hash(rest))
}

/// Above this many blobs, opening syncs with one `syncfs` rather than one
/// fsync per file: every fsync flushes the drive's cache, even of a file
/// with nothing to write, while `syncfs` writes back every dirty file of
/// the file system (other programs' too) and flushes once. Write-back
/// errors reach `syncfs` since Linux 5.8.
const SYNCFS_ABOVE_BLOBS: usize = 64;

#[cfg(target_os = "linux")]
fn sync_file_system(path: &Path) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let handle = File::open(path)?;
    // SAFETY: syncfs only reads the descriptor, which `handle` keeps open
    // for the duration of the call.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } == 0 {
        Ok(true)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `Ok(false)`: there is no `syncfs` here.
#[cfg(not(target_os = "linux"))]
fn sync_file_system(_path: &Path) -> io::Result<bool> {
    Ok(false)
}

/// `conf`, `db`, the blobs and both directories.
fn sync_everything(dir: &Path, blobs: &HashSet<OsString>) -> io::Result<()> {
    if blobs.len() > SYNCFS_ABOVE_BLOBS && sync_file_system(dir)? {
        return Ok(());
    }
    fsync_if_present(&dir.join("conf"))?;
    fsync_if_present(&dir.join("db"))?;
    let blob_dir = dir.join("blobs");
    for name in blobs {
        fsync_if_present(&blob_dir.join(name))?;
    }
    sync_dir(&blob_dir)?;
    sync_dir(dir)
}

fn names(dir: &Path) -> io::Result<BTreeSet<OsString>> {
    std::fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(payload: &[u8]) -> Vec<u8> {
        let mut bytes = crc32fast::hash(payload).to_le_bytes().to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn a_complete_blob_is_remembered_and_an_incomplete_one_synced_again() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(dir.path().join("conf"), b"segment_size: 524288\n").unwrap();
        std::fs::write(blobs.join("10"), blob(b"\x05old node")).unwrap();
        let sync = DiskSync::open(dir.path()).unwrap();
        assert_eq!(sync.sync_new_blobs().unwrap().fsynced, 0);

        let whole = blob(b"\x05a node of many rows");
        std::fs::write(blobs.join("20"), &whole).unwrap();
        // Being written: the header is there, not all of the rest.
        std::fs::write(blobs.join("30"), &whole[..9]).unwrap();
        assert_eq!(sync.sync_new_blobs().unwrap().fsynced, 2);
        assert_eq!(sync.sync_new_blobs().unwrap().fsynced, 1, "30 again");

        std::fs::write(blobs.join("30"), &whole).unwrap();
        assert_eq!(sync.sync_new_blobs().unwrap().fsynced, 1);
        assert_eq!(sync.sync_new_blobs().unwrap().fsynced, 0);

        std::fs::remove_file(blobs.join("20")).unwrap();
        assert_eq!(sync.sync_new_blobs().unwrap().fsynced, 0);
        assert!(!sync.lock().blobs.contains(&OsString::from("20")));
    }

    #[test]
    fn the_store_directory_is_fsynced_when_its_entries_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("conf"), b"segment_size: 524288\n").unwrap();
        let sync = DiskSync::open(dir.path()).unwrap();
        assert!(!sync.sync_store_dir().unwrap());
        std::fs::write(dir.path().join("snap.0000000000000001.generating"), b"s").unwrap();
        assert!(sync.sync_store_dir().unwrap());
        assert!(!sync.sync_store_dir().unwrap());
        std::fs::rename(
            dir.path().join("snap.0000000000000001.generating"),
            dir.path().join("snap.0000000000000001"),
        )
        .unwrap();
        assert!(sync.sync_store_dir().unwrap());
    }
}
