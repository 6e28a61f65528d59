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

/// What `open` found.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    pub cases_indexed: usize,
    pub corrupt: Vec<CorruptEntry>,
    pub elapsed: Duration,
    pub index_source: IndexSource,
}
