//! The store's own write-ahead journal: what keeps an unacknowledged write
//! whole or absent across a power cut, where sled alone does not.
//!
//! sled 0.34.7 keeps a transaction atomic only for the messages inside its
//! log. A message over a quarter of a segment (an original photograph, a
//! leaf of 16 embedding rows) goes to a blob file of its own, and sled's
//! recovery *skips* a log record whose blob file is missing
//! (`LogRead::DanglingBlob` in its `pagecache/iterator.rs`) instead of
//! treating it as a tear. A cut that lands after a write's log record
//! reached the disk but before its blob did therefore recovers the rest of
//! that transaction without it: a case without its original photograph
//! (seen once in `scripts/test-powercut`, seed 22455). The store's flush
//! makes every blob durable before it acknowledges, so only unacknowledged
//! writes were exposed, but those must be whole or absent too.
//!
//! So every write puts its final rows in `journal` first: written to
//! `journal.tmp`, fsynced, renamed over `journal`, the directory fsynced.
//! Only then does the sled transaction run, then the flush; the journal is
//! removed, and the removal made durable, before the write is acknowledged.
//! The rows are final values, computed under the writer lock from the
//! state sled holds, so applying them twice is applying them once.
//!
//! At open, before anything reads the trees:
//! * a whole journal is applied again (every row, in order), flushed like
//!   a write, and removed: the write it holds is then whole, whatever part
//!   of it sled had recovered;
//! * a torn one (short, or its CRC-32 does not match) was cut while it was
//!   written, so the transaction had not started and sled holds nothing of
//!   that write: it is removed, and the write stays absent;
//! * a `journal.tmp` is always such a torn leftover and is removed.
//!
//! A write that failed after its journal was written (disk full, a failed
//! flush) leaves its rows pending: the next write's journal holds them
//! before its own, so that write's success also settles the failed one
//! (present after any reopen, as the error allowed), and its generation
//! is never reused.
//!
//! Limits: writes outside the journal are single-tree and may be lost or
//! repeated without harm (the outbox's upload acknowledgements, the change
//! log's pruning, the adapter space's rows, which are stamped and rebuilt
//! when stale). A journal holds a write's rows twice on disk until it is
//! removed: a capture writes its original photograph twice.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::trees::{Tree, Trees};
use crate::report::JournalRecovery;

const MAGIC: &[u8; 4] = b"DSJ1";
const NAME: &str = "journal";
pub(super) const TMP_NAME: &str = "journal.tmp";

/// One row of a write: `value` `None` removes the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Op {
    pub(crate) tree: Tree,
    pub(crate) key: Vec<u8>,
    pub(crate) value: Option<Vec<u8>>,
}

impl Op {
    pub(super) fn insert(tree: Tree, key: &[u8], value: &[u8]) -> Self {
        Self {
            tree,
            key: key.to_vec(),
            value: Some(value.to_vec()),
        }
    }

    pub(super) fn remove(tree: Tree, key: &[u8]) -> Self {
        Self {
            tree,
            key: key.to_vec(),
            value: None,
        }
    }
}

pub(super) fn path(dir: &Path) -> PathBuf {
    dir.join(NAME)
}

/// The journal's bytes: magic, op count, ops, then a CRC-32 of all before it.
pub(super) fn encode<'o>(ops: impl IntoIterator<Item = &'o Op>) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[0; 8]);
    let mut count: u64 = 0;
    for op in ops {
        count += 1;
        out.push(op.tree.code());
        put_bytes(&mut out, &op.key);
        match &op.value {
            Some(value) => {
                out.push(1);
                put_bytes(&mut out, value);
            }
            None => out.push(0),
        }
    }
    out[MAGIC.len()..MAGIC.len() + 8].copy_from_slice(&count.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The ops of a whole journal; `None` for anything torn or foreign.
pub(super) fn decode(bytes: &[u8]) -> Option<Vec<Op>> {
    let (body, crc) = bytes.split_last_chunk::<4>()?;
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return None;
    }
    let mut reader = Reader(body.strip_prefix(MAGIC.as_slice())?);
    let count = reader.u64()?;
    let mut ops = Vec::new();
    for _ in 0..count {
        let tree = Tree::from_code(reader.take(1)?[0])?;
        let key = reader.bytes()?.to_vec();
        let value = match reader.take(1)?[0] {
            0 => None,
            1 => Some(reader.bytes()?.to_vec()),
            _ => return None,
        };
        ops.push(Op { tree, key, value });
    }
    reader.0.is_empty().then_some(ops)
}

struct Reader<'b>(&'b [u8]);

impl<'b> Reader<'b> {
    fn take(&mut self, n: usize) -> Option<&'b [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'b [u8]> {
        let len = usize::try_from(self.u64()?).ok()?;
        self.take(len)
    }
}

/// Writes `ops` as the journal of `dir`, replacing any earlier one only once
/// the new one is complete on disk. The caller fsyncs `dir` afterwards.
#[cfg(test)]
pub(super) fn write<'o>(dir: &Path, ops: impl IntoIterator<Item = &'o Op>) -> io::Result<()> {
    write_tmp(dir, ops)?;
    rename_tmp(dir)
}

/// The first half of a journal write: `ops` complete and fsynced under the
/// temporary name, which open never replays.
pub(super) fn write_tmp<'o>(dir: &Path, ops: impl IntoIterator<Item = &'o Op>) -> io::Result<()> {
    let mut file = create_private(&dir.join(TMP_NAME))?;
    file.write_all(&encode(ops))?;
    file.sync_all()
}

/// The second half: the complete journal takes the name open replays,
/// replacing any earlier one.
pub(super) fn rename_tmp(dir: &Path) -> io::Result<()> {
    std::fs::rename(dir.join(TMP_NAME), path(dir))
}

#[cfg(unix)]
fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> io::Result<File> {
    File::create(path)
}

/// Removes the journal (absent is fine). The caller fsyncs `dir` afterwards.
pub(super) fn remove(dir: &Path) -> io::Result<()> {
    for name in [NAME, TMP_NAME] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Reads the journal of `dir` and applies a whole one to `trees` (not yet
/// flushed: the caller flushes, then calls [`remove`] and fsyncs `dir`).
pub(super) fn replay(dir: &Path, trees: &Trees) -> Result<JournalRecovery, ReplayError> {
    let bytes = match std::fs::read(path(dir)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(if dir.join(TMP_NAME).exists() {
                JournalRecovery::Torn
            } else {
                JournalRecovery::None
            })
        }
        Err(e) => return Err(ReplayError::Io(e)),
    };
    let Some(ops) = decode(&bytes) else {
        return Ok(JournalRecovery::Torn);
    };
    for op in &ops {
        let tree = trees.get(op.tree);
        match &op.value {
            Some(value) => tree.insert(&op.key, value.as_slice()).map(|_| ()),
            None => tree.remove(&op.key).map(|_| ()),
        }
        .map_err(ReplayError::Sled)?;
    }
    Ok(JournalRecovery::Replayed { rows: ops.len() })
}

pub(super) enum ReplayError {
    Io(io::Error),
    Sled(sled::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Op> {
        vec![
            Op::insert(Tree::Cases, b"case-1", b"record"),
            Op::insert(Tree::Originals, b"case-1", &[7u8; 300_000]),
            Op::remove(Tree::Outbox, b"case-0"),
            Op::insert(Tree::Meta, b"generation", &9u64.to_le_bytes()),
            Op::insert(Tree::Changes, &9u64.to_be_bytes(), b""),
        ]
    }

    #[test]
    fn a_whole_journal_round_trips() {
        let ops = sample();
        assert_eq!(decode(&encode(&ops)), Some(ops));
        assert_eq!(decode(&encode(&[])), Some(vec![]));
    }

    /// A cut can leave any prefix of the file; none of them may pass for a
    /// journal, or a half-written write would be applied.
    #[test]
    fn every_torn_prefix_and_a_flipped_byte_are_refused() {
        let bytes = encode(&sample()[..1]);
        for len in 0..bytes.len() {
            assert_eq!(decode(&bytes[..len]), None, "prefix of {len} bytes");
        }
        for at in 0..bytes.len() {
            let mut garbled = bytes.clone();
            garbled[at] ^= 0x20;
            assert_eq!(decode(&garbled), None, "byte {at} flipped");
        }
    }

    #[test]
    fn write_replaces_and_remove_clears_both_names() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &sample()).unwrap();
        write(dir.path(), &sample()[..2]).unwrap();
        let read = decode(&std::fs::read(path(dir.path())).unwrap()).unwrap();
        assert_eq!(read, sample()[..2].to_vec());
        std::fs::write(dir.path().join(TMP_NAME), b"half").unwrap();
        remove(dir.path()).unwrap();
        assert!(!path(dir.path()).exists());
        assert!(!dir.path().join(TMP_NAME).exists());
        remove(dir.path()).unwrap();
    }
}
