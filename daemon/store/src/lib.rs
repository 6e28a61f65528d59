//! The case library: confirmed lesion cases on disk, and an exact SIMD flat
//! index that finds the ones most similar to a new photograph's embedding.
//!
//! # On disk (sled, kept behind [`CaseStore`])
//!
//! One sled database with six trees:
//!
//! * `meta`: the format version, the encoder identity (model id and
//!   embedding dimension), the write generation (bumped by every write,
//!   in the write's own transaction) and, once the device has pulled from
//!   the fleet service, `sync`: the cursor after the last page applied
//!   (checksummed like every value). Opening with another encoder or format fails with
//!   [`StoreError::ModelMismatch`] / [`StoreError::FormatMismatch`], whose
//!   message says how to re-embed; embeddings of two models are never mixed.
//! * `cases`: case id -> everything except the embedding (diagnosis, source,
//!   metadata, thumbnail JPEG, model id, timestamps), postcard-encoded.
//! * `embeddings`: case id -> the filter fields (diagnosis code, source,
//!   site, confirmed flag) followed by the raw little-endian f32 embedding.
//!   A scan at open reads only this tree, so it never decodes thumbnails.
//! * `changes`: write generation -> ids that write touched, so a stale index
//!   cache can be brought up to date; pruned once a cache covers it.
//! * `adapter_embeddings`: case id -> the installed adapter's embedding of
//!   that case, stamped with the adapter id and the checksum of the
//!   `embeddings` row it came from, so a new adapter or a replaced case
//!   makes it stale (see [`CaseStore::attach_adapter_space`]).
//! * `outbox`: ids of captured cases not yet uploaded to the fleet service,
//!   written in the same transaction as the case.
//!
//! # Cases from the fleet
//!
//! [`CaseStore::apply_pulled`] writes one page pulled from the fleet
//! service and the cursor that follows it in one transaction (then the
//! flush, then the index, like every write), so a reopen after any crash
//! shows both or neither (the SIGKILL test in `tests/durability.rs` kills
//! writers inside pulled pages too, and checks this) and
//! [`CaseStore::sync_cursor`] resumes right after the last page applied. Pulled cases keep their source (fleet or
//! reference), join the index, never enter the outbox, replace a stored
//! case only with a higher revision, and never replace a case captured on
//! this device. A page holding a case of another encoder is refused whole.
//!
//! Next to them, `index-f32.cache` / `index-int8.cache` hold the in-memory
//! index's rows as one contiguous, checksummed file each, labelled with the
//! generation they were written at (after a scan at open, by
//! [`CaseStore::checkpoint`], and when the store is dropped). Opening reads
//! the cache of the resident copy in one sequential pass, then replays the
//! writes sled has beyond it; a missing, garbled, foreign or too-new cache
//! (or a gap in the change log) falls back to a scan of `embeddings`. sled
//! stays the source of truth: the cache can only make open faster.
//!
//! Every value starts with a layout version byte and a CRC-32, so garbled
//! bytes are reported as [`StoreError::CorruptCase`] for that case (and the
//! case is left out of the index) while the rest of the store opens.
//!
//! # Durability contract
//!
//! A write is *acknowledged* when `insert`, `insert_batch` or `remove`
//! returns `Ok`, and that happens only after both trees were updated in one
//! sled transaction, `sled::Db::flush` succeeded and we fsynced sled's log
//! file ourselves (sled 0.34.7's flush only calls `sync_file_range` on Linux,
//! which does not flush the drive cache or the file's metadata), and every
//! file sled wrote beside it: sled puts each log message over 128 KiB (a
//! leaf of 16 rows of 2048-d embeddings, an original photograph) in a file
//! of its own under `blobs/` and fsyncs none of them, nor the directories;
//! the store fsyncs each new blob and `blobs/` in every flush (and the store
//! directory when its entries changed), and everything once at open (see
//! `store/disk_sync.rs`).
//! A write that is cut before it is acknowledged is whole or absent after
//! the next open, never torn: sled alone does not promise it, since its
//! recovery skips a log record whose blob file never reached the disk (a
//! cut once left a case without its original photograph that way). Every
//! write first puts its final rows in the store's own journal (`journal`
//! beside sled's files, fsynced with the directory); open applies a whole
//! journal again and drops a torn one (see `store/journal.rs`; its tests
//! build the torn state and check both).
//! An acknowledged case survives a process kill and a power cut: the crash
//! test in `tests/durability.rs` kills a writer at random moments, and
//! `scripts/test-powercut` kills the arm64 VM a writer runs in (its page
//! cache lost with it) at random moments during ingest; both check exactly
//! this. A write that returns an error (e.g. [`StoreError::DiskFull`]) is not
//! acknowledged. If it failed before its journal was in place (the journal
//! file could not be written or renamed, as on a disk already full) it left
//! no trace: it is absent now and after a reopen (a test in
//! `store/write.rs`). If it failed later it may or may not be present after
//! a reopen (its rows stay pending, and go with the next write), and the
//! store should be reopened before further writes. The in-memory index is updated
//! only after the flush, so a search never returns an unacknowledged case.
//!
//! # Privacy on disk
//!
//! A store is the daemon user's alone, whatever the process umask. The
//! store creates its directory (and any missing parent) mode 0700 before
//! sled opens it, so every file in it, sled's included (sled makes its own
//! with the umask), is out of other users' reach; an existing store
//! directory is tightened to 0700 at every open, and the files found in it
//! lose their group and other bits (a file sled adds later is covered by
//! the directory, and tightened at the next open). The index caches are
//! created 0600. `tests/privacy.rs` opens a store under umask 0022 and
//! checks the mode of the directory and of every file in it. Logs and
//! error messages name a case by [`CaseId::log_tag`], never by its id (the
//! errors' `id` fields keep it for the caller), and [`CaseMetadata`]'s
//! `Debug` hides the free-text note and the lesion id.
//!
//! # The index
//!
//! [`FlatIndex`] holds every embedding in one contiguous row-major f32
//! buffer and/or an int8 copy quantized with one step per row (max |x| of
//! the row / 127), as chosen by [`Residency`] at open (`CaseStore::open`
//! keeps both; a handheld daemon should keep only int8, see [`Residency`]).
//! Search is exact brute force by
//! inner product with simsimd's runtime-dispatched kernels (AVX2/AVX-512/
//! NEON/SVE), over either copy ([`ScoreKind`]), keeping the top `k` in a
//! small heap; large scans are split across cores. [`CaseFilter`] restricts
//! results by diagnosis codes, source, anatomical site and confirmed labels.
//! `search_batch` scores several queries per pass over the buffer.
//!
//! # The coarse pass (large libraries)
//!
//! Beside the f32/int8 rows the index always keeps one sign bit per
//! dimension of every row (256 bytes a row at dim 2048: 1/8 of the int8
//! copy), taken against a centre vector: the mean of the rows, recomputed at
//! each doubling of the index up to 65,536 rows and then kept (the
//! encoder's embeddings are non-negative, so signs against zero would be
//! nearly all ones). The bits are written with the rows into both index
//! cache files (cache format 2) and follow every insert, update and removal
//! exactly as the other copies do. A [`SearchStrategy::Coarse`] search ranks
//! every row by the Hamming distance of its bits to the query's (simsimd's
//! binary kernels), then scores its nearest `candidates` rows exactly, in the
//! requested [`ScoreKind`], and returns the same [`SearchHit`]s an exact
//! search returns.
//!
//! Guarantees and limits:
//! * [`SearchStrategy::Auto`] (the default) is exact up to
//!   [`COARSE_ABOVE`] cases and coarse with [`DEFAULT_CANDIDATES`] beyond,
//!   decided at each search from the current size;
//!   [`CaseStore::set_search_strategy`] (or `FlatIndex::search_with` per
//!   query) overrides it either way.
//! * Exact stays exact. Coarse scores are exact for the rows it returns,
//!   it never returns a removed or filtered-out case, and it is exact
//!   whenever at most `candidates` rows pass the filter; but it can miss a
//!   true neighbour whose bits are far from the query's. Its recall@10
//!   against exact f32 is measured (`scripts/bench index`,
//!   `docs/benchmarks.md`) and held to a floor on synthetic clustered data
//!   by the tests, not guaranteed for every query.
//! * A filter is applied in the coarse pass, so a narrow filter leaves fewer
//!   than `candidates` rows and costs nothing in recall; the scan of the
//!   bits still reads every row.
//! * The centre is not recomputed above 65,536 rows: a library whose
//!   embeddings drift far from its first 65,536 (another encoder means
//!   another store anyway) recalls less until `FlatIndex::recentre`.
//! * A cache of format 1 (written before the bits) is refused by its format
//!   and the index rebuilt from sled at open (one scan), then rewritten.

mod cache;
mod case;
mod codec;
#[cfg(test)]
mod fuzz_targets;
pub mod index;
mod private;
mod report;
mod store;

pub use case::{
    now_ms, Case, CaseError, CaseId, CaseMetadata, CaseSource, Diagnosis, OriginalPhoto, Sex,
    MAX_CASE_ID_BYTES, MAX_DEVICE_ID_BYTES, MAX_DIAGNOSIS_CODE_BYTES, MAX_ORIGINAL_BYTES,
    MAX_ORIGINAL_PIXELS, MAX_SITE_BYTES,
};
pub use index::{
    CaseFilter, CaseTags, FlatIndex, IndexError, Residency, ScoreKind, SearchHit, SearchStrategy,
    COARSE_ABOVE, DEFAULT_CANDIDATES,
};
pub use report::{CorruptEntry, IndexSource, JournalRecovery, OpenReport};
pub use store::{
    AdapterSpaceStatus, CaseCounts, CaseStore, CaseWrite, OpenOptions, PendingUpload,
    PulledApplied, StoreError, StoreIdentity, FORMAT_VERSION, MAX_SYNC_CURSOR_BYTES,
};
