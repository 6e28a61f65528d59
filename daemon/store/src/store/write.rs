//! Writes: every one is a sled transaction over the trees it touches that
//! also bumps the write generation and logs the ids for the index cache,
//! then a flush and an fsync, and only then the in-memory index.
//!
//! An insert never replaces: a case id names one case across a fleet, so an
//! id that is stored already is refused, and a change to a stored case is an
//! explicit [`CaseStore::update`] that stores the next revision.

use std::collections::HashSet;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tracing::{debug, warn};

use super::error::{io_error, storage, transaction, StoreError};
use super::trees::Tree;
use super::{header, CaseStore};
use crate::case::{Case, CaseId, CaseSource, OriginalPhoto};
use crate::codec;

/// One case to write and, optionally, the photograph it was made from.
#[derive(Clone, Copy, Debug)]
pub struct CaseWrite<'a> {
    pub case: &'a Case,
    /// `None` keeps whatever original is stored (none, for a new case).
    pub original: Option<&'a OriginalPhoto>,
}

impl<'a> From<&'a Case> for CaseWrite<'a> {
    fn from(case: &'a Case) -> Self {
        Self {
            case,
            original: None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Every id must be new.
    Insert,
    /// Every id must be stored; each case is stored as its next revision.
    Update,
    /// Cases from the fleet service (see `pulled`): a case is stored when
    /// its id is absent or the stored one is an older revision that was not
    /// captured here; any other case is skipped. Never enters the outbox.
    Pulled,
}

/// What one write transaction did.
pub(super) struct Written {
    /// The cases as stored (revisions as assigned), in input order.
    pub(super) stored: Vec<Case>,
    /// Of `stored`, how many ids were new.
    pub(super) added: usize,
    /// Cases the transaction left alone ([`Mode::Pulled`] only).
    pub(super) skipped: usize,
}

/// Why a write transaction gave up without writing.
enum Refusal {
    Exists(String),
    Missing(String),
    Corrupt(String, String),
}

impl CaseStore {
    /// Adds one new case. Returns only after the case is flushed to disk:
    /// `Ok` means it survives a crash from then on. An id that is stored
    /// already is refused with [`StoreError::CaseExists`]; use
    /// [`CaseStore::update`] to change a case.
    pub fn insert(&self, case: &Case) -> Result<(), StoreError> {
        self.insert_batch(std::slice::from_ref(case))
    }

    /// Adds several new cases atomically, with one flush. Every case is
    /// validated first, and if any id is stored already (or repeats within
    /// the batch), nothing is written.
    pub fn insert_batch(&self, cases: &[Case]) -> Result<(), StoreError> {
        let writes: Vec<CaseWrite<'_>> = cases.iter().map(CaseWrite::from).collect();
        self.write_cases(&writes, Mode::Insert, None).map(|_| ())
    }

    /// [`CaseStore::insert_batch`], keeping each case's original photograph
    /// where one is given, in the same transaction.
    pub fn insert_with_originals(&self, writes: &[CaseWrite<'_>]) -> Result<(), StoreError> {
        self.write_cases(writes, Mode::Insert, None).map(|_| ())
    }

    /// Stores a changed case (re-labelled, confirmed, re-embedded) as the
    /// next revision of the stored one and returns that revision. The
    /// case's own `revision`, `created_at_ms` and `device_id` are ignored:
    /// the stored ones are kept and the revision bumped, so concurrent
    /// writers cannot move a case backwards. A captured case re-enters the
    /// outbox at its new revision. Refused with [`StoreError::NoSuchCase`]
    /// when the id is not stored.
    pub fn update(&self, write: CaseWrite<'_>) -> Result<u64, StoreError> {
        let written = self.write_cases(&[write], Mode::Update, None)?;
        Ok(written.stored.first().map_or(1, |c| c.revision))
    }

    /// The one write path: validates, then one sled transaction over every
    /// tree it touches (plus `meta_entry`, a `meta` key and value stored in
    /// the same transaction), then the flush, then the in-memory index.
    pub(super) fn write_cases(
        &self,
        writes: &[CaseWrite<'_>],
        mode: Mode,
        meta_entry: Option<(&str, &[u8])>,
    ) -> Result<Written, StoreError> {
        if writes.is_empty() && meta_entry.is_none() {
            return Ok(Written {
                stored: Vec::new(),
                added: 0,
                skipped: 0,
            });
        }
        let mut seen = HashSet::with_capacity(writes.len());
        let mut encoded = Vec::with_capacity(writes.len());
        for write in writes {
            let case = write.case;
            case.validate(&self.identity.model_id, self.identity.embedding_dim)
                .map_err(|source| StoreError::InvalidCase {
                    id: case.id.to_string(),
                    source,
                })?;
            // A page may carry one id twice; the transaction then keeps the
            // higher revision like it would across pages.
            if mode != Mode::Pulled && !seen.insert(case.id.as_str()) {
                return Err(StoreError::DuplicateInBatch {
                    id: case.id.to_string(),
                });
            }
            let original = write.original.map(|o| codec::encode_original(o.jpeg()));
            encoded.push((case, codec::encode_embedding(case), original));
        }
        let ids: Vec<&str> = writes.iter().map(|w| w.case.id.as_str()).collect();
        let change = codec::encode_change(&ids);
        let mut state = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let generation = state.generation + 1;
        let trees = &self.trees;
        let written = (
            &trees.cases,
            &trees.embeddings,
            &trees.meta,
            &trees.changes,
            &trees.outbox,
            &trees.originals,
        )
            .transaction(|(c, e, m, ch, o, orig)| {
                let abort = |r| Err(ConflictableTransactionError::Abort(r));
                let mut stored = Vec::with_capacity(encoded.len());
                let (mut added, mut skipped) = (0, 0);
                for (case, row, original) in &encoded {
                    let key = case.id.as_str().as_bytes();
                    let previous = c.get(key)?;
                    let mut case = (*case).clone();
                    if previous.is_none() {
                        added += 1;
                    }
                    match (mode, previous) {
                        (Mode::Insert, Some(_)) => {
                            return abort(Refusal::Exists(case.id.to_string()))
                        }
                        (Mode::Insert, None) => {}
                        (Mode::Update, None) => {
                            return abort(Refusal::Missing(case.id.to_string()))
                        }
                        (Mode::Update, Some(previous)) => {
                            let previous = match codec::decode_case(&previous) {
                                Ok(previous) => previous,
                                Err(why) => {
                                    return abort(Refusal::Corrupt(case.id.to_string(), why))
                                }
                            };
                            case.revision = previous.revision.saturating_add(1);
                            case.created_at_ms = previous.created_at_ms;
                            case.device_id = previous.device_id;
                        }
                        (Mode::Pulled, None) => {}
                        (Mode::Pulled, Some(previous)) => {
                            // An undecodable record is left for the
                            // integrity check, not overwritten blind: it
                            // may be a capture of this device.
                            let keep = codec::decode_case(&previous).map_or(true, |p| {
                                p.source == CaseSource::Captured || p.revision >= case.revision
                            });
                            if keep {
                                skipped += 1;
                                continue;
                            }
                        }
                    }
                    let record = match codec::encode_case(&case) {
                        Ok(record) => record,
                        Err(why) => return abort(Refusal::Corrupt(case.id.to_string(), why)),
                    };
                    c.insert(key, record)?;
                    e.insert(key, row.as_slice())?;
                    if let Some(original) = original {
                        orig.insert(key, original.as_slice())?;
                    }
                    // A capture enters the outbox with the case itself, so no
                    // acknowledged capture (or change to one) misses its upload.
                    if mode != Mode::Pulled && case.source == CaseSource::Captured {
                        o.insert(key, &codec::encode_outbox_revision(case.revision))?;
                    }
                    stored.push(case);
                }
                if let Some((key, value)) = meta_entry {
                    m.insert(key, value)?;
                }
                m.insert(header::KEY_GENERATION, &generation.to_le_bytes())?;
                ch.insert(&generation.to_be_bytes(), change.as_slice())?;
                Ok(Written {
                    stored,
                    added,
                    skipped,
                })
            })
            .map_err(|e| match e {
                TransactionError::Abort(Refusal::Exists(id)) => StoreError::CaseExists { id },
                TransactionError::Abort(Refusal::Missing(id)) => StoreError::NoSuchCase { id },
                TransactionError::Abort(Refusal::Corrupt(id, reason)) => StoreError::CorruptCase {
                    id,
                    tree: Tree::Cases.name(),
                    reason,
                },
                TransactionError::Storage(e) => storage("writing cases")(e),
            })?;
        // Committed in sled's memory: even if the flush fails, sled may
        // persist it, so the next write must use the next generation.
        state.generation = generation;
        if let Err(e) = self.flush("flushing written cases") {
            state.index_matches_sled = false;
            return Err(e);
        }
        // Only now may searches see the cases: a hit is always a durable case.
        let stored_cases = &written.stored;
        let mut index = self.write_index()?;
        for case in stored_cases {
            if let Err(e) = index.upsert(case.id.clone(), &case.embedding, &codec::tags_of(case)) {
                state.index_matches_sled = false;
                return Err(e.into());
            }
            state.corrupt.remove(case.id.as_str());
        }
        drop(index);
        self.forget_adapter_embeddings(stored_cases.iter().map(|c| &c.id))?;
        debug!(
            cases = stored_cases.len(),
            skipped = written.skipped,
            generation,
            "cases written"
        );
        Ok(written)
    }

    /// Deletes a case; `Ok(false)` if it was not there. Flushed before returning.
    pub fn remove(&self, id: &CaseId) -> Result<bool, StoreError> {
        let change = codec::encode_change(&[id.as_str()]);
        let mut state = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let generation = state.generation + 1;
        let existed = (
            &self.trees.cases,
            &self.trees.embeddings,
            &self.trees.meta,
            &self.trees.changes,
            &self.trees.outbox,
            &self.trees.originals,
        )
            .transaction(|(c, e, m, ch, o, orig)| {
                let had_case = c.remove(id.as_str().as_bytes())?.is_some();
                let had_row = e.remove(id.as_str().as_bytes())?.is_some();
                o.remove(id.as_str().as_bytes())?;
                orig.remove(id.as_str().as_bytes())?;
                m.insert(header::KEY_GENERATION, &generation.to_le_bytes())?;
                ch.insert(&generation.to_be_bytes(), change.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(had_case || had_row)
            })
            .map_err(transaction("removing a case"))?;
        state.generation = generation;
        if let Err(e) = self.flush("flushing a removal") {
            state.index_matches_sled = false;
            return Err(e);
        }
        self.write_index()?.remove(id);
        state.corrupt.remove(id.as_str());
        self.forget_adapter_embeddings(std::iter::once(id))?;
        // Not part of the transaction: an orphaned adapter row is harmless
        // and dropped when an adapter space is next attached.
        if let Err(e) = self.trees.adapter_rows.remove(id.as_str().as_bytes()) {
            warn!(error = %e, "could not drop a removed case's adapter embedding");
        }
        Ok(existed)
    }

    /// Makes everything written so far durable: the blobs the write just
    /// made (before sled's flush, which may remove the blobs they replace),
    /// sled's log, any blob written meanwhile, the log file and directories.
    pub(super) fn flush(&self, op: &'static str) -> Result<(), StoreError> {
        let io = |e| io_error(op, e);
        let flushed = self
            .disk
            .sync_new_blobs()
            .map_err(io)
            .and_then(|_| self.db.flush().map_err(storage(op)))
            .and_then(|_| self.disk.sync_new_blobs().map_err(io))
            .and_then(|_| self.log_file.sync_all().map_err(io))
            .and_then(|_| self.disk.sync_store_dir().map(|_| ()).map_err(io));
        flushed.inspect_err(|err| {
            warn!(error = %err, "store flush failed; the write is not acknowledged");
        })
    }
}
