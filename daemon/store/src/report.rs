//! What opening a store found: shared by the store and its index cache,
//! which records corrupt rows so a cached open reports them as a scan would.

use std::time::Duration;

/// A value that could not be decoded when the store was opened; the case is
/// left out of the index and `get` reports it as corrupt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptEntry {
    pub id: String,
    pub tree: &'static str,
    pub reason: String,
}

/// Where `open` got the index from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexSource {
    /// The index cache was current.
    Cache { generation: u64 },
    /// The index cache was older than sled; the writes since were replayed
    /// by re-reading the cases they touched from sled.
    CacheReplayed {
        cache_generation: u64,
        writes_replayed: u64,
        cases_reread: usize,
    },
    /// Every embedding row was read from sled, for this reason.
    Scan { reason: String },
}

impl Default for IndexSource {
    fn default() -> Self {
        IndexSource::Scan {
            reason: String::new(),
        }
    }
}

/// What `open` did with the journal of a write that was cut before it was
/// acknowledged (see the crate's durability contract).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JournalRecovery {
    /// No journal: the last write was acknowledged, or none was made.
    #[default]
    None,
    /// The cut write's journal was whole: its rows were applied again, so
    /// the write is whole.
    Replayed { rows: usize },
    /// The journal was torn (cut while it was written): the write had not
    /// reached sled and stays absent.
    Torn,
}

/// What `open` found.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    pub cases_indexed: usize,
    pub corrupt: Vec<CorruptEntry>,
    pub elapsed: Duration,
    /// The part of `elapsed` sled's own open took (its recovery reads the
    /// log written since its last snapshot), against the rest: syncing,
    /// the journal, the header and the index. What a large library's open
    /// time is made of (`scripts/bench index`).
    pub sled_open: Duration,
    pub index_source: IndexSource,
    pub journal: JournalRecovery,
}
