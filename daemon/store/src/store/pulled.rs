//! Cases pulled from the fleet service, applied one page at a time together
//! with the cursor that continues after that page.
//!
//! A page and its cursor are one write of [`super::write`]'s path (one sled
//! transaction, the generation bump and change log, the flush, then the
//! index), so after any interruption the store holds either both or
//! neither, and the next pull resumes right after the last page applied.

use tracing::debug;

use super::error::{storage, StoreError};
use super::write::{CaseWrite, Mode};
use super::CaseStore;
use crate::case::{Case, CaseSource};
use crate::codec;

/// `meta` key of the fleet service's pull cursor.
pub(super) const KEY_SYNC_CURSOR: &str = "sync";

/// Longest cursor accepted. The service's are about 80 bytes; the cap keeps
/// a misbehaving service from growing the header without bound.
pub const MAX_SYNC_CURSOR_BYTES: usize = 1024;

/// What [`CaseStore::apply_pulled`] did with a page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PulledApplied {
    /// Ids the store did not hold.
    pub added: usize,
    /// Stored pulled cases replaced by a higher revision.
    pub updated: usize,
    /// Left alone: the stored revision is the same or newer, the stored
    /// case was captured on this device, or its record does not decode.
    pub skipped: usize,
}

impl CaseStore {
    /// Applies one page of cases pulled from the fleet service and stores
    /// `cursor` (the service's cursor after that page) in the same
    /// transaction; returns after the flush, like every write. A case is
    /// inserted when its id is absent and replaces a stored case only when
    /// its revision is higher and the stored one was not captured on this
    /// device (a device's own captures are its truth; the service never
    /// sends them back). Pulled cases never enter the outbox, and their
    /// `source` (fleet or reference) and `device_id` are kept as given.
    ///
    /// The whole page is refused, nothing written, when any case fails
    /// [`Case::validate`] against this store (another encoder's model id is
    /// [`StoreError::InvalidCase`] with [`crate::CaseError::ModelMismatch`]),
    /// is marked [`CaseSource::Captured`] ([`StoreError::PulledAsCaptured`]),
    /// or the cursor is empty, longer than [`MAX_SYNC_CURSOR_BYTES`] or
    /// holds a control character ([`StoreError::InvalidSyncCursor`]). A sync
    /// client filters a page's cases before calling. An empty page still
    /// stores its cursor.
    pub fn apply_pulled(&self, cases: &[Case], cursor: &str) -> Result<PulledApplied, StoreError> {
        let refuse = |reason: &str| {
            Err(StoreError::InvalidSyncCursor {
                reason: reason.to_owned(),
            })
        };
        if cursor.is_empty() {
            return refuse("empty");
        }
        if cursor.len() > MAX_SYNC_CURSOR_BYTES {
            return refuse("longer than 1024 bytes");
        }
        if cursor.chars().any(char::is_control) {
            return refuse("holds a control character");
        }
        if let Some(case) = cases.iter().find(|c| c.source == CaseSource::Captured) {
            return Err(StoreError::PulledAsCaptured {
                id: case.id.to_string(),
            });
        }
        let writes: Vec<CaseWrite<'_>> = cases.iter().map(CaseWrite::from).collect();
        let value = codec::encode_sync_cursor(cursor);
        let written = self.write_cases(&writes, Mode::Pulled, Some((KEY_SYNC_CURSOR, &value)))?;
        let applied = PulledApplied {
            added: written.added,
            updated: written.stored.len() - written.added,
            skipped: written.skipped,
        };
        debug!(
            added = applied.added,
            updated = applied.updated,
            skipped = applied.skipped,
            "pulled page applied"
        );
        Ok(applied)
    }

    /// The cursor stored with the last page [`CaseStore::apply_pulled`]
    /// applied; `None` before the first (pull from the start). A garbled
    /// value is [`StoreError::CorruptSyncCursor`]: the caller may pull from
    /// the start again, which is safe because pages apply by revision.
    pub fn sync_cursor(&self) -> Result<Option<String>, StoreError> {
        let Some(value) = self
            .trees
            .meta
            .get(KEY_SYNC_CURSOR)
            .map_err(storage("reading the sync cursor"))?
        else {
            return Ok(None);
        };
        codec::decode_sync_cursor(&value)
            .map(Some)
            .map_err(|reason| StoreError::CorruptSyncCursor { reason })
    }
}
