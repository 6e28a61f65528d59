//! Writes: every one is planned as final rows under the writer lock, put in
//! the store's journal (see `journal`), then applied in one sled transaction
//! over the trees it touches that also bumps the write generation and logs
//! the ids for the index cache, then a flush and an fsync, the journal's
//! removal, and only then the in-memory index.
//!
//! An insert never replaces: a case id names one case across a fleet, so an
//! id that is stored already is refused, and a change to a stored case is an
//! explicit [`CaseStore::update`] that stores the next revision.

use std::collections::{HashMap, HashSet};

use sled::transaction::ConflictableTransactionError;
use sled::Transactional;
use tracing::{debug, warn};

use super::disk_sync::DiskSync;
use super::error::{io_error, storage, transaction, StoreError};
use super::journal::{self, Op};
use super::trees::Tree;
use super::{header, CaseStore, WriterState};
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

/// A case to write, encoded: the case, its embedding row, its original.
pub(super) type Encoded<'c> = (&'c Case, Vec<u8>, Option<Vec<u8>>);

/// What one write transaction did.
pub(super) struct Written {
    /// The cases as stored (revisions as assigned), in input order.
    pub(super) stored: Vec<Case>,
    /// Of `stored`, how many ids were new.
    pub(super) added: usize,
    /// Cases the transaction left alone ([`Mode::Pulled`] only).
    pub(super) skipped: usize,
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

    /// The one write path: validates, plans the rows under the writer lock,
    /// then the journal, one sled transaction over every tree it touches
    /// (plus `meta_entry`, a `meta` key and value stored in the same
    /// transaction), the flush, and only then the in-memory index.
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
        let (ops, written) = self.plan_cases(&encoded, mode, meta_entry, generation, &change)?;
        self.commit(&mut state, ops, generation, "writing cases")?;
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
        let key = id.as_str().as_bytes();
        let read = storage("reading the case to remove");
        let existed = self.trees.cases.contains_key(key).map_err(&read)?
            || self.trees.embeddings.contains_key(key).map_err(&read)?;
        let ops = vec![
            Op::remove(Tree::Cases, key),
            Op::remove(Tree::Embeddings, key),
            Op::remove(Tree::Outbox, key),
            Op::remove(Tree::Originals, key),
            Op::insert(
                Tree::Meta,
                header::KEY_GENERATION.as_bytes(),
                &generation.to_le_bytes(),
            ),
            Op::insert(Tree::Changes, &generation.to_be_bytes(), &change),
        ];
        self.commit(&mut state, ops, generation, "removing a case")?;
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

    /// What a write of `encoded` stores, as rows, read under the writer lock
    /// from what sled holds (so the rows are final: see `journal`).
    /// The write's own rows follow: `meta_entry`, the generation, the
    /// change-log entry `change`.
    pub(super) fn plan_cases(
        &self,
        encoded: &[Encoded<'_>],
        mode: Mode,
        meta_entry: Option<(&str, &[u8])>,
        generation: u64,
        change: &[u8],
    ) -> Result<(Vec<Op>, Written), StoreError> {
        let read = storage("reading the cases a write replaces");
        // A page may carry one id twice: the second sees the first's record,
        // as it would inside one transaction.
        let mut planned: HashMap<&str, sled::IVec> = HashMap::new();
        let mut ops = Vec::with_capacity(encoded.len() * 4 + 3);
        let mut stored = Vec::with_capacity(encoded.len());
        let (mut added, mut skipped) = (0, 0);
        for &(input, ref row, ref original) in encoded {
            let key = input.id.as_str().as_bytes();
            let previous = match planned.get(input.id.as_str()) {
                Some(record) => Some(record.clone()),
                None => self.trees.cases.get(key).map_err(&read)?,
            };
            let mut case = input.clone();
            if previous.is_none() {
                added += 1;
            }
            let corrupt = |reason: String| StoreError::CorruptCase {
                id: case.id.to_string(),
                tree: Tree::Cases.name(),
                reason,
            };
            match (mode, previous) {
                (Mode::Insert, Some(_)) => {
                    return Err(StoreError::CaseExists {
                        id: case.id.to_string(),
                    })
                }
                (Mode::Insert, None) => {}
                (Mode::Update, None) => {
                    return Err(StoreError::NoSuchCase {
                        id: case.id.to_string(),
                    })
                }
                (Mode::Update, Some(previous)) => {
                    let previous = codec::decode_case(&previous).map_err(corrupt)?;
                    case.revision = previous.revision.saturating_add(1);
                    case.created_at_ms = previous.created_at_ms;
                    case.device_id = previous.device_id;
                }
                (Mode::Pulled, None) => {}
                (Mode::Pulled, Some(previous)) => {
                    // An undecodable record is left for the integrity check,
                    // not overwritten blind: it may be a capture of this device.
                    let keep = codec::decode_case(&previous).map_or(true, |p| {
                        p.source == CaseSource::Captured || p.revision >= case.revision
                    });
                    if keep {
                        skipped += 1;
                        continue;
                    }
                }
            }
            let record = codec::encode_case(&case).map_err(corrupt)?;
            ops.push(Op::insert(Tree::Cases, key, &record));
            ops.push(Op::insert(Tree::Embeddings, key, row));
            if let Some(original) = original {
                ops.push(Op::insert(Tree::Originals, key, original));
            }
            // A capture enters the outbox with the case itself, so no
            // acknowledged capture (or change to one) misses its upload.
            if mode != Mode::Pulled && case.source == CaseSource::Captured {
                ops.push(Op::insert(
                    Tree::Outbox,
                    key,
                    &codec::encode_outbox_revision(case.revision),
                ));
            }
            planned.insert(input.id.as_str(), sled::IVec::from(record));
            stored.push(case);
        }
        if let Some((key, value)) = meta_entry {
            ops.push(Op::insert(Tree::Meta, key.as_bytes(), value));
        }
        ops.push(Op::insert(
            Tree::Meta,
            header::KEY_GENERATION.as_bytes(),
            &generation.to_le_bytes(),
        ));
        ops.push(Op::insert(Tree::Changes, &generation.to_be_bytes(), change));
        Ok((
            ops,
            Written {
                stored,
                added,
                skipped,
            },
        ))
    }

    /// Makes `ops` (one write, generation `generation`) durable: the journal,
    /// one sled transaction, the flush, the journal's removal (see
    /// `journal`). Rows of an earlier write that failed after its journal
    /// was written go first, in the journal and in the transaction.
    fn commit(
        &self,
        state: &mut WriterState,
        ops: Vec<Op>,
        generation: u64,
        op: &'static str,
    ) -> Result<(), StoreError> {
        let result = self.commit_inner(&state.pending, &ops, op);
        // Whatever happened, this generation may be on disk now (in sled or
        // in the journal): the next write must use the next one.
        state.generation = generation;
        match result {
            Ok(()) => {
                state.pending.clear();
                Ok(())
            }
            // The journal never took this write's name: nothing of it can
            // replay or be on disk, so an error leaves no trace of it (rows
            // pending from before stay pending; their journal is still the
            // one on disk).
            Err(Failed::BeforeJournal(e)) => Err(e),
            Err(Failed::AfterJournal(e)) => {
                state.pending.extend(ops);
                state.index_matches_sled = false;
                Err(e)
            }
        }
    }

    fn commit_inner(&self, pending: &[Op], ops: &[Op], op: &'static str) -> Result<(), Failed> {
        let io = |e| io_error(op, e);
        journal::write_tmp(&self.path, pending.iter().chain(ops))
            .and_then(|()| journal::rename_tmp(&self.path))
            .map_err(|e| Failed::BeforeJournal(io(e)))?;
        self.commit_journaled(pending, ops, op)
            .map_err(Failed::AfterJournal)
    }

    /// The rest of [`Self::commit_inner`], once the journal holds the rows.
    fn commit_journaled(
        &self,
        pending: &[Op],
        ops: &[Op],
        op: &'static str,
    ) -> Result<(), StoreError> {
        let io = |e| io_error(op, e);
        self.disk.sync_store_dir_now().map_err(io)?;
        let trees = &self.trees;
        (
            &trees.cases,
            &trees.embeddings,
            &trees.meta,
            &trees.changes,
            &trees.outbox,
            &trees.originals,
        )
            .transaction(|(c, e, m, ch, o, orig)| {
                for row in pending.iter().chain(ops) {
                    let tree = match row.tree {
                        Tree::Cases => c,
                        Tree::Embeddings => e,
                        Tree::Meta => m,
                        Tree::Changes => ch,
                        Tree::Outbox => o,
                        Tree::Originals => orig,
                        // No write of this path touches the adapter space.
                        Tree::AdapterEmbeddings => {
                            return Err(ConflictableTransactionError::Abort(()))
                        }
                    };
                    match &row.value {
                        Some(value) => tree.insert(row.key.as_slice(), value.as_slice())?,
                        None => tree.remove(row.key.as_slice())?,
                    };
                }
                Ok(())
            })
            .map_err(transaction(op))?;
        self.flush(op)?;
        journal::remove(&self.path)
            .and_then(|()| self.disk.sync_store_dir_now())
            .map_err(io)
    }

    /// Makes everything written so far durable: see [`durable_flush`].
    pub(super) fn flush(&self, op: &'static str) -> Result<(), StoreError> {
        durable_flush(&self.db, &self.disk, &self.log_file, op)
    }
}

/// Where a commit failed: before the journal was renamed into place (the
/// write left nothing that can replay) or after (its rows may be on disk).
enum Failed {
    BeforeJournal(StoreError),
    AfterJournal(StoreError),
}

/// Makes everything sled has written durable: the blobs a write just made
/// (before sled's flush, which may remove the blobs they replace), sled's
/// log, any blob written meanwhile, the log file and directories.
pub(super) fn durable_flush(
    db: &sled::Db,
    disk: &DiskSync,
    log_file: &std::fs::File,
    op: &'static str,
) -> Result<(), StoreError> {
    let io = |e| io_error(op, e);
    let flushed = disk
        .sync_new_blobs()
        .map_err(io)
        .and_then(|_| db.flush().map_err(storage(op)))
        .and_then(|_| disk.sync_new_blobs().map_err(io))
        .and_then(|_| log_file.sync_all().map_err(io))
        .and_then(|_| disk.sync_store_dir().map(|_| ()).map_err(io));
    flushed.inspect_err(|err| {
        warn!(error = %err, "store flush failed; the write is not acknowledged");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::{CaseMetadata, Diagnosis};
    use crate::store::header::StoreIdentity;
    use crate::{CaseFilter, JournalRecovery, OpenOptions, ScoreKind};

    const DIM: usize = 8;

    fn identity() -> StoreIdentity {
        StoreIdentity {
            model_id: "journal-test-encoder".into(),
            embedding_dim: DIM,
        }
    }

    fn case(name: &str, axis: usize) -> Case {
        let mut embedding = vec![0.0; DIM];
        embedding[axis] = 1.0;
        Case {
            id: CaseId::new(name).unwrap(),
            embedding,
            diagnosis: Diagnosis::from_code("mel").unwrap(),
            source: CaseSource::Captured,
            metadata: CaseMetadata::default(),
            thumbnail_jpeg: vec![],
            model_id: identity().model_id,
            created_at_ms: 1,
            updated_at_ms: 1,
            label_confirmed: true,
            device_id: None,
            revision: 1,
        }
    }

    /// A JPEG large enough that sled keeps it as a blob of its own, as it
    /// does a real capture's original.
    fn photograph() -> OriginalPhoto {
        let pixels = image::RgbImage::from_fn(640, 480, |x, y| {
            image::Rgb([
                (x * 7 % 251) as u8,
                (y * 13 % 241) as u8,
                ((x ^ y) % 239) as u8,
            ])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 100)
            .encode_image(&pixels)
            .unwrap();
        assert!(jpeg.len() > 128 * 1024, "{} bytes", jpeg.len());
        OriginalPhoto::from_jpeg(jpeg).unwrap()
    }

    fn no_cache() -> OpenOptions {
        OpenOptions {
            no_cache_on_close: true,
            ..OpenOptions::default()
        }
    }

    /// The rows, and the journal, of inserting `case` with `photo` as the
    /// next write, without applying them.
    fn journalled_insert(store: &CaseStore, case: &Case, photo: &OriginalPhoto) -> Vec<Op> {
        let state = store.writer.lock().unwrap();
        let generation = state.generation + 1;
        let encoded = [(
            case,
            codec::encode_embedding(case),
            Some(codec::encode_original(photo.jpeg())),
        )];
        let change = codec::encode_change(&[case.id.as_str()]);
        let (ops, _) = store
            .plan_cases(&encoded, Mode::Insert, None, generation, &change)
            .unwrap();
        journal::write(&store.path, &ops).unwrap();
        ops
    }

    /// What sled recovers when a write's original reached the log but its
    /// blob file did not (seen after a power cut): every row but that one.
    /// The journal left by the cut makes the case whole at the next open.
    #[test]
    fn a_write_cut_without_its_original_is_made_whole_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (before, cut) = (case("acknowledged", 0), case("cut-mid-write", 1));
        let photo = photograph();
        {
            let store = CaseStore::open_with(dir.path(), identity(), no_cache()).unwrap();
            store.insert(&before).unwrap();
            let ops = journalled_insert(&store, &cut, &photo);
            for op in ops.iter().filter(|op| op.tree != Tree::Originals) {
                let value = op.value.as_deref().unwrap();
                store.trees.get(op.tree).insert(&op.key, value).unwrap();
            }
            store.flush("test").unwrap();
            // The torn state is real before the journal mends it.
            assert!(store.trees.cases.contains_key(cut.id.as_str()).unwrap());
            assert!(!store.has_original(&cut.id).unwrap());
        }
        let store = CaseStore::open(dir.path(), identity()).unwrap();
        assert!(matches!(
            store.open_report().journal,
            JournalRecovery::Replayed { rows } if rows >= 5
        ));
        assert_eq!(store.get(&cut.id).unwrap(), Some(cut.clone()));
        assert_eq!(store.original(&cut.id).unwrap(), Some(photo));
        assert_eq!(store.get(&before.id).unwrap(), Some(before));
        let hits = store
            .search(&cut.embedding, 1, &CaseFilter::default(), ScoreKind::F32)
            .unwrap();
        assert_eq!(hits[0].id, cut.id);
        assert_eq!(store.pending_uploads().unwrap().len(), 2);
        assert!(!journal::path(dir.path()).exists());
    }

    /// A write whose journal could not be written (here its temporary file
    /// cannot be created; on a device, a full disk) returns the error and
    /// leaves no trace: the next write does not carry its rows, and neither
    /// does the store after a reopen.
    #[test]
    fn a_write_refused_before_its_journal_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let (refused, next) = (case("refused", 0), case("next", 1));
        {
            let store = CaseStore::open_with(dir.path(), identity(), no_cache()).unwrap();
            let blocker = dir.path().join(journal::TMP_NAME);
            std::fs::create_dir(&blocker).unwrap();
            assert!(store.insert(&refused).is_err());
            std::fs::remove_dir(&blocker).unwrap();
            store.insert(&next).unwrap();
            assert_eq!(store.get(&refused.id).unwrap(), None);
            assert_eq!(store.get(&next.id).unwrap(), Some(next.clone()));
            assert_eq!(store.pending_uploads().unwrap().len(), 1);
        }
        let store = CaseStore::open(dir.path(), identity()).unwrap();
        assert_eq!(store.open_report().journal, JournalRecovery::None);
        assert_eq!(store.get(&refused.id).unwrap(), None);
        assert_eq!(store.get(&next.id).unwrap(), Some(next));
        assert_eq!(store.len().unwrap(), 1);
    }

    /// A cut while the journal itself was written: the transaction had not
    /// started, so the write is absent, and the torn journal is dropped.
    #[test]
    fn a_torn_journal_leaves_the_write_absent() {
        let dir = tempfile::tempdir().unwrap();
        let (before, cut) = (case("acknowledged", 0), case("cut-in-journal", 1));
        {
            let store = CaseStore::open_with(dir.path(), identity(), no_cache()).unwrap();
            store.insert(&before).unwrap();
            journalled_insert(&store, &cut, &photograph());
            let path = journal::path(dir.path());
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        }
        let store = CaseStore::open(dir.path(), identity()).unwrap();
        assert_eq!(store.open_report().journal, JournalRecovery::Torn);
        assert_eq!(store.get(&cut.id).unwrap(), None);
        assert_eq!(store.get(&before.id).unwrap(), Some(before));
        assert_eq!(store.len().unwrap(), 1);
        assert!(!journal::path(dir.path()).exists());
    }

    /// A cut after the flush but before the journal's removal: applying it
    /// again changes nothing.
    #[test]
    fn a_journal_of_a_write_that_landed_whole_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let landed = case("landed", 2);
        let photo = photograph();
        let journal_bytes;
        {
            let store = CaseStore::open_with(dir.path(), identity(), no_cache()).unwrap();
            let ops = journalled_insert(&store, &landed, &photo);
            journal_bytes = std::fs::read(journal::path(dir.path())).unwrap();
            store
                .insert_with_originals(&[CaseWrite {
                    case: &landed,
                    original: Some(&photo),
                }])
                .unwrap();
            // The write's own journal is gone once it is acknowledged.
            assert!(!journal::path(dir.path()).exists());
            assert_eq!(journal::decode(&journal_bytes), Some(ops));
            std::fs::write(journal::path(dir.path()), &journal_bytes).unwrap();
        }
        let store = CaseStore::open(dir.path(), identity()).unwrap();
        assert!(matches!(
            store.open_report().journal,
            JournalRecovery::Replayed { .. }
        ));
        assert_eq!(store.get(&landed.id).unwrap().as_ref(), Some(&landed));
        assert_eq!(store.original(&landed.id).unwrap(), Some(photo));
        assert_eq!(store.len().unwrap(), 1);
        assert!(!journal::path(dir.path()).exists());
    }
}
