//! Moving a case library to another encoder.
//!
//! # Guarantees
//! - **The library switches in one atomic step.** Cases are re-embedded
//!   from their original photographs into a staging store beside the
//!   library (`<dir>.reembed`); only when every case is done are the two
//!   directories swapped with one `renameat2(RENAME_EXCHANGE)`, so the
//!   library's path holds the complete old store or the complete new one,
//!   never a mix, whenever the process dies.
//! - **Resumable.** Each batch is flushed before the next begins; a rerun
//!   after a kill skips the cases the staging store already holds.
//! - **Nothing is dropped silently.** A case without an original (or whose
//!   original no longer decodes) cannot be re-embedded: it is listed in the
//!   report, and the old store, with every case, is kept beside the library
//!   as `<dir>.previous-<old model id>` after the switch, never deleted.
//!
//! - **An install keeps one store per encoder.** [`store_for_encoder`]
//!   names the store an encoder uses (the library's path, or a sibling
//!   `<dir>.<model id>`), and [`reembed_into`] fills the new encoder's store
//!   from the old one's, resumably, without writing the old one or
//!   switching anything: the update installer's preparation step, so a
//!   rollback to the old encoder finds its store as it was left.
//!
//! # Limits
//! Adapter embeddings are not carried over: an adapter belongs to one
//! encoder, so a new one is trained (`dermascope adapter train`) after the
//! switch. The daemon must not hold the store open meanwhile (sled's lock
//! refuses a second opener with an error naming the store).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dermascope_encoder::{decode_rgb, DecodeBudget, Encoder};
use dermascope_store::{
    Case, CaseId, CaseStore, CaseWrite, OpenOptions, OriginalPhoto, Residency, StoreError,
    StoreIdentity,
};
use thiserror::Error;
use tracing::{info, warn};

/// Cases embedded between two flushes by default: a kill costs at most
/// this many.
pub const BATCH: usize = 16;

#[derive(Debug, Error)]
pub enum ReembedError {
    #[error("no case store at {path}: nothing to re-embed")]
    NoStore { path: PathBuf },
    #[error("case store at {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error(
        "switching {library} to the re-embedded store failed: {source}; the library is unchanged"
    )]
    Switch {
        library: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds the case store of encoder {found}, not of {wanted}")]
    StoreOfAnotherEncoder {
        path: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("{path} is both the source and the target of the re-embedding")]
    SameStore { path: PathBuf },
    #[error("an encoder model id must not be empty")]
    EmptyModelId,
    #[error(
        "the encoder model id {model_id:?} would name its store like a re-embedding's \
         staging or kept store; give the encoder another model id"
    )]
    ReservedModelId { model_id: String },
    #[error(
        "the library is switched to the new encoder, but keeping the old store as {previous} \
         failed: {source}; it is still at {staging}: move it there by hand"
    )]
    KeepPrevious {
        staging: PathBuf,
        previous: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReembedOutcome {
    /// The library already belonged to this encoder (an earlier run
    /// switched it); only left-overs were tidied.
    AlreadyCurrent,
    /// Every case with an original is re-embedded and the library switched.
    Switched,
    /// Stopped by the caller between two flushed batches; rerun to finish.
    Interrupted,
    /// `dry_run`: counted, nothing written.
    DryRun,
}

#[derive(Clone, Debug)]
pub struct ReembedReport {
    pub outcome: ReembedOutcome,
    pub from_model: String,
    pub to_model: String,
    /// Cases in the library when the run began.
    pub cases: usize,
    /// Re-embedded by this run.
    pub reembedded: usize,
    /// Found re-embedded by an earlier, interrupted run.
    pub resumed: usize,
    /// Cases kept only in the previous store: no original photograph.
    pub without_original: Vec<CaseId>,
    /// Cases kept only in the previous store: the original would not
    /// decode or embed, with the reason.
    pub unreadable: Vec<(CaseId, String)>,
    /// Where the old store is kept after the switch.
    pub previous: Option<PathBuf>,
    pub elapsed_s: f64,
}

/// Progress after each flushed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReembedProgress {
    pub done: usize,
    pub total: usize,
}

/// Options of a run.
#[derive(Clone, Copy, Debug)]
pub struct ReembedOptions {
    /// Count what would be re-embedded; write nothing.
    pub dry_run: bool,
    /// Cases per flushed batch ([`BATCH`]).
    pub batch: usize,
}

impl Default for ReembedOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            batch: BATCH,
        }
    }
}

/// The staging store beside `library`.
pub fn staging_dir(library: &Path) -> PathBuf {
    sibling(library, ".reembed")
}

fn sibling(library: &Path, suffix: &str) -> PathBuf {
    let mut name = library
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "cases".into());
    name.push(suffix);
    library.with_file_name(name)
}

/// A model id as part of a directory name.
fn path_safe(model_id: &str) -> String {
    model_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The case store the encoder `model_id` uses, given the device's store
/// path `base`: `base` itself when the store there was made for `model_id`
/// or there is none yet, else the sibling `<base>.<model id>` (made
/// path-safe). Each encoder thus keeps a store of its own, so switching to
/// a version with another encoder switches stores with it, and a rollback
/// finds the old encoder's store exactly as it was left.
///
/// Call it before opening the store: reading the identity opens sled,
/// which a running daemon's open store would refuse with its lock.
///
/// A sibling that holds another encoder's store (two model ids that are
/// the same once made path-safe) is refused rather than shared.
pub fn store_for_encoder(base: &Path, model_id: &str) -> Result<PathBuf, ReembedError> {
    if model_id.is_empty() {
        return Err(ReembedError::EmptyModelId);
    }
    let identity = |path: &Path| {
        CaseStore::identity_at(path).map_err(|source| ReembedError::Store {
            path: path.to_path_buf(),
            source,
        })
    };
    match identity(base)? {
        None => return Ok(base.to_path_buf()),
        Some(found) if found.model_id == model_id => return Ok(base.to_path_buf()),
        Some(_) => {}
    }
    let safe = path_safe(model_id);
    // `reembed` owns `<base>.reembed` and `<base>.previous-*`: a store there
    // would be taken for its staging or kept store.
    if safe == "reembed" || safe.starts_with("previous-") {
        return Err(ReembedError::ReservedModelId {
            model_id: model_id.to_owned(),
        });
    }
    let own = sibling(base, &format!(".{safe}"));
    match identity(&own)? {
        Some(found) if found.model_id != model_id => Err(ReembedError::StoreOfAnotherEncoder {
            path: own,
            found: found.model_id,
            wanted: model_id.to_owned(),
        }),
        _ => Ok(own),
    }
}

/// The stores an install must re-embed between: the cases in `source`
/// (another encoder's) belong in `target` (the new encoder's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carry {
    pub source: PathBuf,
    pub target: PathBuf,
}

/// Whether installing a version with the encoder `new_model`, over one
/// with `previous_model` (none on a first install, or a version without
/// an encoder), needs the cases re-embedded, and between which stores
/// (see [`store_for_encoder`]). The cases live in the previous encoder's
/// store; failing that (none there yet), in the store at `base` when it
/// was made for another encoder (a store older than the updates, or one
/// whose encoder no version names). `None`: the new encoder's store is
/// the one in use already, or there are no cases to carry.
pub fn stores_to_carry(
    base: &Path,
    previous_model: Option<&str>,
    new_model: &str,
) -> Result<Option<Carry>, ReembedError> {
    let target = store_for_encoder(base, new_model)?;
    let exists = |path: &Path| {
        CaseStore::identity_at(path)
            .map(|identity| identity.is_some())
            .map_err(|source| ReembedError::Store {
                path: path.to_path_buf(),
                source,
            })
    };
    let mut candidates = Vec::with_capacity(2);
    if let Some(previous) = previous_model.filter(|m| !m.is_empty() && *m != new_model) {
        candidates.push(store_for_encoder(base, previous)?);
    }
    // `target` is `base` exactly when `base` is new_model's or empty.
    if target != base {
        candidates.push(base.to_path_buf());
    }
    for source in candidates {
        if source != target && exists(&source)? {
            return Ok(Some(Carry { source, target }));
        }
    }
    Ok(None)
}

/// Where a [`reembed_into`] run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntoOutcome {
    /// The target holds every case of the source that has a readable
    /// original.
    Complete,
    /// Stopped by the caller between two flushed batches; rerun to finish.
    Interrupted,
    /// `dry_run`: counted, nothing written.
    DryRun,
}

/// What a [`reembed_into`] run did.
#[derive(Clone, Debug)]
pub struct IntoReport {
    pub outcome: IntoOutcome,
    pub from_model: String,
    pub to_model: String,
    /// Cases in the source when the run began.
    pub cases: usize,
    /// Added to the target by this run (in a dry run: that it would add).
    pub reembedded: usize,
    /// Already in the target (an earlier, interrupted run, or an earlier
    /// install of this encoder).
    pub present: usize,
    /// Not in the target: no original photograph.
    pub without_original: Vec<CaseId>,
    /// Not in the target: the original would not decode or embed.
    pub unreadable: Vec<(CaseId, String)>,
    pub elapsed_s: f64,
}

/// Adds to the store at `target` (created for `encoder` if absent) every
/// case of the store at `source` it lacks, re-embedded with `encoder` from
/// its original photograph, in batches flushed one by one, so a run killed
/// at any point resumes where it stopped and never doubles a case.
///
/// Unlike [`reembed`] nothing is switched and `source` is never written:
/// it is opened to read (its index cache left as it was), so the encoder
/// it belongs to can go back to it untouched. A case is matched by id; a
/// case the target holds already is left as it is, even if the source has
/// a newer revision of it.
pub fn reembed_into(
    source: &Path,
    target: &Path,
    encoder: &Encoder,
    options: ReembedOptions,
    mut progress: impl FnMut(ReembedProgress) -> ControlFlow<()>,
) -> Result<IntoReport, ReembedError> {
    let started = Instant::now();
    let store_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReembedError::Store { path, source }
    };
    if source == target {
        return Err(ReembedError::SameStore {
            path: source.to_path_buf(),
        });
    }
    let from = CaseStore::identity_at(source)
        .map_err(store_error(source))?
        .ok_or_else(|| ReembedError::NoStore {
            path: source.to_path_buf(),
        })?;
    let to = StoreIdentity {
        model_id: encoder.model_id().to_owned(),
        embedding_dim: encoder.dim(),
    };
    let read_only = OpenOptions {
        residency: Residency::Int8,
        no_cache_on_close: true,
    };
    let old = CaseStore::open_with(source, from.clone(), read_only).map_err(store_error(source))?;
    let ids = old.ids().map_err(store_error(source))?;
    let mut report = IntoReport {
        outcome: IntoOutcome::Complete,
        from_model: from.model_id.clone(),
        to_model: to.model_id.clone(),
        cases: ids.len(),
        reembedded: 0,
        present: 0,
        without_original: Vec::new(),
        unreadable: Vec::new(),
        elapsed_s: 0.0,
    };
    if options.dry_run {
        let existing = match CaseStore::identity_at(target).map_err(store_error(target))? {
            Some(_) => Some(
                CaseStore::open_with(target, to.clone(), read_only).map_err(store_error(target))?,
            ),
            None => None,
        };
        for id in &ids {
            let present = match &existing {
                Some(store) => store.contains(id).map_err(store_error(target))?,
                None => false,
            };
            if present {
                report.present += 1;
            } else if old.has_original(id).map_err(store_error(source))? {
                report.reembedded += 1;
            } else {
                report.without_original.push(id.clone());
            }
        }
        report.outcome = IntoOutcome::DryRun;
        report.elapsed_s = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let new = CaseStore::open_with(
        target,
        to.clone(),
        OpenOptions {
            residency: Residency::Int8,
            ..OpenOptions::default()
        },
    )
    .map_err(store_error(target))?;
    info!(
        cases = ids.len(),
        from = %from.model_id,
        to = %to.model_id,
        "re-embedding the case library into the new encoder's store"
    );
    let filled = fill(&old, &new, &ids, encoder, options.batch, &mut progress)?;
    report.reembedded = filled.added;
    report.present = filled.present;
    report.without_original = filled.without_original;
    report.unreadable = filled.unreadable;
    if filled.interrupted {
        report.outcome = IntoOutcome::Interrupted;
    }
    report.elapsed_s = started.elapsed().as_secs_f64();
    info!(
        reembedded = report.reembedded,
        present = report.present,
        without_original = report.without_original.len(),
        unreadable = report.unreadable.len(),
        outcome = ?report.outcome,
        "re-embedding into the new encoder's store ended"
    );
    Ok(report)
}

/// Re-embeds the library at `library` with `encoder` and switches it over
/// (see the module's guarantees). `progress` is called after each flushed
/// batch; returning `ControlFlow::Break` stops the run there, resumable.
pub fn reembed(
    library: &Path,
    encoder: &Encoder,
    options: ReembedOptions,
    mut progress: impl FnMut(ReembedProgress) -> ControlFlow<()>,
) -> Result<ReembedReport, ReembedError> {
    let started = Instant::now();
    let target = StoreIdentity {
        model_id: encoder.model_id().to_owned(),
        embedding_dim: encoder.dim(),
    };
    let store_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReembedError::Store { path, source }
    };
    let current = CaseStore::identity_at(library)
        .map_err(store_error(library))?
        .ok_or_else(|| ReembedError::NoStore {
            path: library.to_path_buf(),
        })?;
    let staging = staging_dir(library);
    let mut report = ReembedReport {
        outcome: ReembedOutcome::AlreadyCurrent,
        from_model: current.model_id.clone(),
        to_model: target.model_id.clone(),
        cases: 0,
        reembedded: 0,
        resumed: 0,
        without_original: Vec::new(),
        unreadable: Vec::new(),
        previous: None,
        elapsed_s: 0.0,
    };
    // A staging store of another encoder is either an earlier switch's old
    // store (killed before it was renamed) or an abandoned run: both are
    // kept, as a previous store, never deleted.
    if let Some(staged) = CaseStore::identity_at(&staging).map_err(store_error(&staging))? {
        if staged != target && !options.dry_run {
            report.previous = Some(keep_previous(&staging, library, &staged.model_id)?);
        }
    }
    if current == target {
        report.elapsed_s = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    let old = CaseStore::open_with(
        library,
        current.clone(),
        OpenOptions {
            residency: Residency::Int8,
            no_cache_on_close: true,
        },
    )
    .map_err(store_error(library))?;
    let ids = old.ids().map_err(store_error(library))?;
    report.cases = ids.len();
    if options.dry_run {
        for id in &ids {
            if !old.has_original(id).map_err(store_error(library))? {
                report.without_original.push(id.clone());
            }
        }
        report.outcome = ReembedOutcome::DryRun;
        report.elapsed_s = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let staged = CaseStore::open_with(
        &staging,
        target.clone(),
        OpenOptions {
            residency: Residency::Int8,
            ..OpenOptions::default()
        },
    )
    .map_err(store_error(&staging))?;
    info!(
        cases = ids.len(),
        from = %current.model_id,
        to = %target.model_id,
        "re-embedding the case library"
    );
    let filled = fill(&old, &staged, &ids, encoder, options.batch, &mut progress)?;
    report.resumed = filled.present;
    report.without_original = filled.without_original;
    report.unreadable = filled.unreadable;
    if filled.interrupted {
        report.outcome = ReembedOutcome::Interrupted;
        report.elapsed_s = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    report.reembedded = filled.added;
    drop(old);
    drop(staged);
    switch(library, &staging)?;
    report.previous = Some(keep_previous(&staging, library, &current.model_id)?);
    report.outcome = ReembedOutcome::Switched;
    report.elapsed_s = started.elapsed().as_secs_f64();
    info!(
        reembedded = report.reembedded,
        resumed = report.resumed,
        without_original = report.without_original.len(),
        unreadable = report.unreadable.len(),
        "case library switched to the new encoder"
    );
    Ok(report)
}

/// What [`fill`] found and did.
struct Filled {
    /// Already in the target.
    present: usize,
    /// Added by this run.
    added: usize,
    without_original: Vec<CaseId>,
    unreadable: Vec<(CaseId, String)>,
    interrupted: bool,
}

/// Adds to `target` every case of `ids` (from `source`) it lacks,
/// re-embedded from its original, flushing every `batch` cases and asking
/// `progress` after each flush whether to go on.
fn fill(
    source: &CaseStore,
    target: &CaseStore,
    ids: &[CaseId],
    encoder: &Encoder,
    batch: usize,
    progress: &mut dyn FnMut(ReembedProgress) -> ControlFlow<()>,
) -> Result<Filled, ReembedError> {
    let source_error = |source_err| ReembedError::Store {
        path: source.path().to_path_buf(),
        source: source_err,
    };
    let target_error = |source_err| ReembedError::Store {
        path: target.path().to_path_buf(),
        source: source_err,
    };
    let batch_size = batch.max(1);
    let mut filled = Filled {
        present: 0,
        added: 0,
        without_original: Vec::new(),
        unreadable: Vec::new(),
        interrupted: false,
    };
    let mut pending: Vec<(Case, OriginalPhoto)> = Vec::with_capacity(batch_size);
    let mut done = 0;
    for id in ids {
        done += 1;
        if target.contains(id).map_err(target_error)? {
            filled.present += 1;
        } else {
            match reembed_case(source, id, encoder).map_err(source_error)? {
                Embedded::Case(case, original) => pending.push((*case, original)),
                Embedded::NoOriginal => filled.without_original.push(id.clone()),
                Embedded::Unreadable(reason) => {
                    warn!(case = %id.log_tag(), %reason, "original not re-embedded");
                    filled.unreadable.push((id.clone(), reason));
                }
                Embedded::Gone => {}
            }
        }
        if pending.len() == batch_size || done == ids.len() {
            filled.added += pending.len();
            flush(target, &mut pending).map_err(target_error)?;
            info!(done, total = ids.len(), "re-embedding: batch flushed");
            if progress(ReembedProgress {
                done,
                total: ids.len(),
            })
            .is_break()
            {
                filled.interrupted = true;
                return Ok(filled);
            }
        }
    }
    Ok(filled)
}

enum Embedded {
    Case(Box<Case>, OriginalPhoto),
    NoOriginal,
    Unreadable(String),
    /// Removed between listing and reading.
    Gone,
}

fn reembed_case(old: &CaseStore, id: &CaseId, encoder: &Encoder) -> Result<Embedded, StoreError> {
    let Some(original) = old.original(id)? else {
        return Ok(Embedded::NoOriginal);
    };
    let Some(mut case) = old.get(id)? else {
        return Ok(Embedded::Gone);
    };
    let embedding = decode_rgb(original.jpeg(), DecodeBudget::default())
        .and_then(|photo| encoder.embed_rgb(&photo));
    match embedding {
        Ok(embedding) => {
            case.embedding = embedding.into_values();
            case.model_id = encoder.model_id().to_owned();
            Ok(Embedded::Case(Box::new(case), original))
        }
        Err(e) => Ok(Embedded::Unreadable(e.to_string())),
    }
}

fn flush(staged: &CaseStore, batch: &mut Vec<(Case, OriginalPhoto)>) -> Result<(), StoreError> {
    let writes: Vec<CaseWrite<'_>> = batch
        .iter()
        .map(|(case, original)| CaseWrite {
            case,
            original: Some(original),
        })
        .collect();
    staged.insert_with_originals(&writes)?;
    batch.clear();
    Ok(())
}

/// Swaps the library and the staging store in one step, then makes the
/// swap durable by syncing their directory.
fn switch(library: &Path, staging: &Path) -> Result<(), ReembedError> {
    let failed = |source| ReembedError::Switch {
        library: library.to_path_buf(),
        source,
    };
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        library,
        rustix::fs::CWD,
        staging,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(|e| failed(e.into()))?;
    sync_parent(library).map_err(failed)
}

/// Renames the old store (now at `staging`) to a free
/// `<library>.previous-<model>` name.
fn keep_previous(staging: &Path, library: &Path, model_id: &str) -> Result<PathBuf, ReembedError> {
    let base = format!(".previous-{}", path_safe(model_id));
    let mut previous = sibling(library, &base);
    let mut n = 2;
    while previous.exists() {
        previous = sibling(library, &format!("{base}-{n}"));
        n += 1;
    }
    std::fs::rename(staging, &previous)
        .and_then(|()| sync_parent(library))
        .map_err(|source| ReembedError::KeepPrevious {
            staging: staging.to_path_buf(),
            previous: previous.clone(),
            source,
        })?;
    Ok(previous)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    dermascope_durable::sync_dir(&dermascope_durable::parent_dir(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_store(path: &Path, model_id: &str) {
        CaseStore::open(
            path,
            StoreIdentity {
                model_id: model_id.to_owned(),
                embedding_dim: 4,
            },
        )
        .unwrap();
    }

    #[test]
    fn no_store_yet_means_the_base_for_any_encoder() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("cases");
        assert_eq!(store_for_encoder(&base, "enc-a").unwrap(), base);
        // Looking must not create a store there.
        assert_eq!(CaseStore::identity_at(&base).unwrap(), None);
    }

    #[test]
    fn the_base_is_kept_by_its_own_encoder_and_another_gets_a_sibling() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("cases");
        make_store(&base, "enc-a");
        assert_eq!(store_for_encoder(&base, "enc-a").unwrap(), base);
        let b = store_for_encoder(&base, "enc-b").unwrap();
        assert_eq!(b, dir.path().join("cases.enc-b"));
        // Once the sibling exists it is still that encoder's, and the base
        // still the first encoder's (the rollback case).
        make_store(&b, "enc-b");
        assert_eq!(store_for_encoder(&base, "enc-b").unwrap(), b);
        assert_eq!(store_for_encoder(&base, "enc-a").unwrap(), base);
    }

    #[test]
    fn a_model_id_is_made_path_safe() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("cases");
        make_store(&base, "enc-a");
        let path = store_for_encoder(&base, "org/model:v2 int8").unwrap();
        assert_eq!(path, dir.path().join("cases.org_model_v2_int8"));
        assert_eq!(path.parent(), Some(dir.path()));
    }

    #[test]
    fn a_sibling_of_another_encoder_is_refused_not_shared() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("cases");
        make_store(&base, "enc-a");
        // "org/m" and "org:m" are the same once path-safe.
        make_store(&dir.path().join("cases.org_m"), "org/m");
        match store_for_encoder(&base, "org:m") {
            Err(ReembedError::StoreOfAnotherEncoder { found, wanted, .. }) => {
                assert_eq!(found, "org/m");
                assert_eq!(wanted, "org:m");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn an_encoder_change_carries_from_the_previous_encoders_store() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("cases");
        // No store at all: nothing to carry.
        assert_eq!(
            stores_to_carry(&base, Some("enc-a"), "enc-b").unwrap(),
            None
        );
        make_store(&base, "enc-a");
        let to_b = Carry {
            source: base.clone(),
            target: dir.path().join("cases.enc-b"),
        };
        assert_eq!(
            stores_to_carry(&base, Some("enc-a"), "enc-b").unwrap(),
            Some(to_b.clone())
        );
        // The same encoder again, or a version of the store's own encoder.
        assert_eq!(
            stores_to_carry(&base, Some("enc-a"), "enc-a").unwrap(),
            None
        );
        assert_eq!(stores_to_carry(&base, None, "enc-a").unwrap(), None);
        // A first install (or a previous version naming the same encoder)
        // over a store of another encoder still carries it over.
        assert_eq!(
            stores_to_carry(&base, None, "enc-b").unwrap(),
            Some(to_b.clone())
        );
        assert_eq!(
            stores_to_carry(&base, Some("enc-b"), "enc-b").unwrap(),
            Some(to_b)
        );
        // From b's sibling store to c's, once b is in use.
        make_store(&dir.path().join("cases.enc-b"), "enc-b");
        assert_eq!(
            stores_to_carry(&base, Some("enc-b"), "enc-c").unwrap(),
            Some(Carry {
                source: dir.path().join("cases.enc-b"),
                target: dir.path().join("cases.enc-c"),
            })
        );
        // A new version back on a: what was captured under b is carried
        // into a's store (the base), which keeps what it had.
        assert_eq!(
            stores_to_carry(&base, Some("enc-b"), "enc-a").unwrap(),
            Some(Carry {
                source: dir.path().join("cases.enc-b"),
                target: base.clone(),
            })
        );
    }

    #[test]
    fn an_empty_model_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            store_for_encoder(&dir.path().join("cases"), ""),
            Err(ReembedError::EmptyModelId)
        ));
    }

    #[test]
    fn a_model_id_naming_reembeds_own_siblings_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("cases");
        make_store(&base, "enc-a");
        for model_id in ["reembed", "previous-enc-a", "previous-org/m"] {
            assert!(
                matches!(
                    store_for_encoder(&base, model_id),
                    Err(ReembedError::ReservedModelId { .. })
                ),
                "{model_id}"
            );
        }
        // Only a sibling needs the name: the base's own encoder is fine.
        make_store(&dir.path().join("other"), "reembed");
        assert_eq!(
            store_for_encoder(&dir.path().join("other"), "reembed").unwrap(),
            dir.path().join("other")
        );
    }
}
