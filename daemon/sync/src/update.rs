//! The update channel: at every cycle the device reports what it runs
//! (`POST /v1/update`), sends the results its daemon queued, and acts on
//! the offer it gets back: an archive is downloaded (resumed with a
//! `Range` request after an interruption), checked against the offer's
//! size and sha256 and handed to the daemon; a rollback is handed over as
//! it is. Installing is the daemon's (`dermascope-update`): this module
//! never touches the installed versions.
//!
//! # Guarantees
//!
//! * The archive is written to `<download_dir>/<sha256>.part` and renamed
//!   to `<sha256>.tar` only once its size and sha256 match the offer, so a
//!   `.tar` is always whole. The archive's own signature, not the offer,
//!   is what the installer trusts.
//! * A cut download resumes from the byte it stopped at, in this cycle's
//!   retry or after a restart (the `.part` stays on disk).
//! * An archive above the manifest's caps ([`MAX_ARCHIVE_BYTES`]) or above
//!   the free space (less `keep_free_bytes`, which stays for captures) is
//!   refused before a byte is fetched, and reported `refused`.
//! * A damaged download (sha256 mismatch) is deleted and fetched again at
//!   most [`MAX_REFETCHES`] times, then reported `refused`: never a loop.
//! * Each offer is handed out once ([`crate::SyncHandle::take_update`]);
//!   once the daemon reported a result for it, it is never handed out
//!   again, and the result is sent at each cycle until the service
//!   acknowledges it, across restarts too: results not yet acknowledged
//!   are kept in `<download_dir>/update-results.json`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use dermascope_cloud_api::{
    DeviceReport, UpdateOffer, UpdateOutcome, UpdateResult, MAX_UPDATE_DETAIL,
};
use dermascope_store::CaseStore;
use dermascope_update::archive::MAX_ARCHIVE_BYTES;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::client::Client;
use crate::error::SyncError;

/// Fetches of a damaged archive after the first, before it is refused.
pub const MAX_REFETCHES: u32 = 3;
/// Space an update leaves free by default (captures need it more).
pub const DEFAULT_KEEP_FREE_BYTES: u64 = 64 << 20;
const CHUNK: usize = 64 * 1024;
/// The results not yet acknowledged, in the download directory.
pub const RESULTS_FILE: &str = "update-results.json";

/// What [`crate::Syncer::start_with_updates`] needs to take updates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateSettings {
    /// Where archives are downloaded (created when missing). Only files
    /// named `<sha256>.part` and `<sha256>.tar` are ever written or
    /// removed here.
    pub download_dir: PathBuf,
    /// The daemon's `MAJOR.MINOR.PATCH`, reported to the service.
    pub daemon_version: String,
    /// An archive that would leave less than this free on the download
    /// directory's file system is refused.
    pub keep_free_bytes: u64,
}

impl UpdateSettings {
    pub fn new(download_dir: impl Into<PathBuf>, daemon_version: impl Into<String>) -> Self {
        UpdateSettings {
            download_dir: download_dir.into(),
            daemon_version: daemon_version.into(),
            keep_free_bytes: DEFAULT_KEEP_FREE_BYTES,
        }
    }
}

/// An update the daemon should carry out, from
/// [`crate::SyncHandle::take_update`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadyUpdate {
    /// Verify and install this archive (unpack it with
    /// `dermascope_update::archive::unpack`), then report the outcome.
    Install {
        rollout_id: String,
        version: u64,
        /// `<download_dir>/<sha256>.tar`, whole and matching the offer.
        archive: PathBuf,
    },
    /// Switch back from `version` to the kept previous version (only if
    /// `version` is current), then report `rolled_back`.
    Rollback { rollout_id: String, version: u64 },
}

/// The download in progress, for the screen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DownloadProgress {
    pub version: u64,
    /// Bytes on disk so far.
    pub done: u64,
    pub total: u64,
}

/// Which offer a result answers: an install and a rollback of the same
/// rollout and version are different offers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct OfferKey {
    rollout_id: String,
    version: u64,
    rollback: bool,
}

struct Ready {
    key: OfferKey,
    update: ReadyUpdate,
    taken: bool,
}

#[derive(Default)]
struct State {
    /// `set_installed` was called: until then the device does not know
    /// what it runs, and a report saying "nothing" could settle a
    /// rollback it never carried out.
    known: bool,
    installed: Option<u64>,
    failed_versions: Vec<u64>,
    ready: Option<Ready>,
    /// Results not yet acknowledged, oldest first.
    results: VecDeque<UpdateResult>,
    /// Offers a result was queued for: never handed out again.
    answered: BTreeSet<OfferKey>,
    download: Option<DownloadProgress>,
    /// Damaged fetches per archive sha256.
    damaged: BTreeMap<String, u32>,
}

/// The update channel's state, shared by the sync thread and the handle.
#[derive(Default)]
pub(crate) struct Updates {
    state: Mutex<State>,
    /// Where the unacknowledged results are kept (none without updates).
    journal: Option<PathBuf>,
}

impl Updates {
    /// The channel's state, with the results an earlier run left
    /// unacknowledged. A journal that cannot be read is set aside with a
    /// warning, never a reason not to start: the report settles most
    /// results anyway.
    pub(crate) fn open(settings: &UpdateSettings) -> Updates {
        let journal = settings.download_dir.join(RESULTS_FILE);
        let mut state = State::default();
        match fs::read(&journal) {
            Ok(bytes) => match serde_json::from_slice::<Vec<UpdateResult>>(&bytes) {
                Ok(results) => {
                    for r in &results {
                        state.answered.insert(OfferKey {
                            rollout_id: r.rollout_id.clone(),
                            version: r.version,
                            rollback: r.outcome == UpdateOutcome::RolledBack,
                        });
                    }
                    if !results.is_empty() {
                        info!(
                            results = results.len(),
                            "update results from an earlier run queued"
                        );
                    }
                    state.results = results.into();
                }
                Err(e) => warn!(error = %e, "update results journal unreadable; set aside"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(error = %e, "update results journal unreadable; set aside"),
        }
        Updates {
            state: Mutex::new(state),
            journal: Some(journal),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the queue (called with the lock held, after each change):
    /// beside the journal, synced, renamed over it.
    fn persist(&self, s: &State) {
        let Some(journal) = &self.journal else {
            return;
        };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = journal.parent() {
                fs::create_dir_all(dir)?;
            }
            let tmp = journal.with_extension("json.tmp");
            let bytes = serde_json::to_vec(&s.results).map_err(std::io::Error::other)?;
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, journal)?;
            if let Some(dir) = journal.parent() {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        if let Err(e) = write() {
            // Still sent from memory; only a restart before then loses it.
            warn!(error = %e, "update results journal not written");
        }
    }

    pub(crate) fn download(&self) -> Option<DownloadProgress> {
        self.lock().download
    }

    pub(crate) fn set_installed(&self, bundle_version: Option<u64>, failed_versions: Vec<u64>) {
        let mut s = self.lock();
        s.known = true;
        s.installed = bundle_version;
        s.failed_versions = failed_versions;
    }

    pub(crate) fn take(&self) -> Option<ReadyUpdate> {
        let mut s = self.lock();
        let ready = s.ready.as_mut().filter(|r| !r.taken)?;
        ready.taken = true;
        Some(ready.update.clone())
    }

    /// Queues `result`; the offer it answers is never handed out again.
    pub(crate) fn report(&self, mut result: UpdateResult) {
        if let Some(detail) = &mut result.detail {
            if detail.chars().count() > MAX_UPDATE_DETAIL {
                *detail = detail.chars().take(MAX_UPDATE_DETAIL).collect();
            }
        }
        let mut s = self.lock();
        let matches =
            |r: &Ready| r.key.rollout_id == result.rollout_id && r.key.version == result.version;
        let key = match s.ready.take() {
            Some(ready) if matches(&ready) => {
                if let ReadyUpdate::Install { archive, .. } = &ready.update {
                    // Installed or refused: the archive has served.
                    if let Err(e) = fs::remove_file(archive) {
                        debug!(error = %e, "downloaded archive already gone");
                    }
                }
                ready.key
            }
            other => {
                s.ready = other;
                OfferKey {
                    rollout_id: result.rollout_id.clone(),
                    version: result.version,
                    rollback: result.outcome == UpdateOutcome::RolledBack,
                }
            }
        };
        s.answered.insert(key);
        s.results.push_back(result);
        self.persist(&s);
    }

    fn queue_refusal(&self, key: OfferKey, detail: String) {
        warn!(version = key.version, reason = %detail, "update refused");
        let mut s = self.lock();
        s.download = None;
        s.results.push_back(UpdateResult {
            rollout_id: key.rollout_id.clone(),
            version: key.version,
            outcome: UpdateOutcome::Refused,
            detail: Some(detail.chars().take(MAX_UPDATE_DETAIL).collect()),
        });
        s.answered.insert(key);
        self.persist(&s);
    }

    fn set_progress(&self, progress: Option<DownloadProgress>) {
        self.lock().download = progress;
    }
}

/// One cycle of the update channel: results, report, offer.
pub(crate) fn step(
    updates: &Updates,
    client: &Client,
    store: &CaseStore,
    settings: &UpdateSettings,
    stopping: &dyn Fn() -> bool,
) -> Result<(), SyncError> {
    send_results(updates, client)?;
    let report = {
        let s = updates.lock();
        if !s.known {
            debug!("no update report until the daemon says what it runs");
            return Ok(());
        }
        DeviceReport {
            daemon_version: settings.daemon_version.clone(),
            bundle_version: s.installed,
            encoder_model_id: store.identity().model_id.clone(),
            pending_uploads: store.pending_upload_count() as u64,
            failed_versions: s.failed_versions.clone(),
        }
    };
    let offer = client.report(&report)?;
    act(updates, client, settings, offer, stopping)?;
    // A refusal found while acting goes out in this cycle.
    send_results(updates, client)
}

/// Sends queued results oldest first; an acknowledged one (recorded or
/// not) is dropped, and so is one the service refuses for good (not in
/// that rollout, malformed): resending it would change nothing.
fn send_results(updates: &Updates, client: &Client) -> Result<(), SyncError> {
    loop {
        let Some(result) = updates.lock().results.front().cloned() else {
            return Ok(());
        };
        match client.update_result(&result) {
            Ok(ack) => {
                info!(version = result.version, outcome = ?result.outcome, recorded = ack.recorded, "update result acknowledged");
            }
            Err(e) if !e.is_transient() && !e.is_refused_credential() => {
                warn!(version = result.version, error = %e, "update result refused by the fleet service; dropped");
            }
            Err(e) => return Err(e),
        }
        let mut s = updates.lock();
        if s.results.front() == Some(&result) {
            s.results.pop_front();
            updates.persist(&s);
        }
    }
}

fn act(
    updates: &Updates,
    client: &Client,
    settings: &UpdateSettings,
    offer: UpdateOffer,
    stopping: &dyn Fn() -> bool,
) -> Result<(), SyncError> {
    let (key, install) = match offer {
        UpdateOffer::None => {
            let mut s = updates.lock();
            // Paused or withdrawn: what the daemon has not taken is
            // withdrawn too (a downloaded archive stays for a resume).
            if s.ready.as_ref().is_some_and(|r| !r.taken) {
                s.ready = None;
            }
            s.download = None;
            return Ok(());
        }
        UpdateOffer::Rollback {
            rollout_id,
            version,
        } => (
            OfferKey {
                rollout_id,
                version,
                rollback: true,
            },
            None,
        ),
        UpdateOffer::Install {
            rollout_id,
            bundle_id,
            version,
            archive_sha256,
            archive_size,
        } => (
            OfferKey {
                rollout_id,
                version,
                rollback: false,
            },
            Some((bundle_id, archive_sha256, archive_size)),
        ),
    };
    {
        let mut s = updates.lock();
        if s.answered.contains(&key) {
            return Ok(());
        }
        match &s.ready {
            Some(r) if r.key == key => return Ok(()),
            // The daemon is busy with another; this one waits.
            Some(r) if r.taken => return Ok(()),
            Some(_) => s.ready = None,
            None => {}
        }
        if install.is_some() && s.installed == Some(key.version) {
            // The report settles it.
            return Ok(());
        }
    }
    let update = match install {
        None => ReadyUpdate::Rollback {
            rollout_id: key.rollout_id.clone(),
            version: key.version,
        },
        Some((bundle_id, sha256, size)) => {
            let offer = Offer {
                bundle_id: &bundle_id,
                sha256: &sha256,
                size,
                version: key.version,
            };
            match download(updates, client, settings, &offer, stopping)? {
                Fetched::Whole(archive) => ReadyUpdate::Install {
                    rollout_id: key.rollout_id.clone(),
                    version: key.version,
                    archive,
                },
                Fetched::Refused(why) => {
                    updates.queue_refusal(key, why);
                    return Ok(());
                }
            }
        }
    };
    info!(
        version = key.version,
        rollback = key.rollback,
        "update ready for the daemon"
    );
    let mut s = updates.lock();
    s.download = None;
    s.ready = Some(Ready {
        key,
        update,
        taken: false,
    });
    Ok(())
}

struct Offer<'a> {
    bundle_id: &'a str,
    sha256: &'a str,
    size: u64,
    version: u64,
}

enum Fetched {
    Whole(PathBuf),
    Refused(String),
}

fn io_error(action: &str, path: &Path, e: std::io::Error) -> SyncError {
    SyncError::Download(format!("cannot {action} {}: {e}", path.display()))
}

/// The offer's archive, whole and checked, in the download directory.
fn download(
    updates: &Updates,
    client: &Client,
    settings: &UpdateSettings,
    offer: &Offer<'_>,
    stopping: &dyn Fn() -> bool,
) -> Result<Fetched, SyncError> {
    if !is_sha256_hex(offer.sha256) {
        return Ok(Fetched::Refused(format!(
            "the offer's archive sha256 {:?} is not 64 lowercase hex digits",
            offer.sha256
        )));
    }
    if offer.bundle_id.is_empty()
        || offer.bundle_id.len() > 64
        || !offer
            .bundle_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Ok(Fetched::Refused(
            "the offer's bundle id is not a plain id".into(),
        ));
    }
    if offer.size == 0 || offer.size > MAX_ARCHIVE_BYTES {
        return Ok(Fetched::Refused(format!(
            "the archive is {} bytes; a bundle archive is 1 to {MAX_ARCHIVE_BYTES} bytes",
            offer.size
        )));
    }
    let dir = &settings.download_dir;
    fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    let whole = dir.join(format!("{}.tar", offer.sha256));
    let part = dir.join(format!("{}.part", offer.sha256));
    remove_other_downloads(dir, offer.sha256);
    if whole.exists() {
        if matches_offer(&whole, offer)? {
            return Ok(Fetched::Whole(whole));
        }
        fs::remove_file(&whole).map_err(|e| io_error("remove", &whole, e))?;
    }
    loop {
        let mut have = match fs::metadata(&part) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_error("inspect", &part, e)),
        };
        if have > offer.size {
            fs::remove_file(&part).map_err(|e| io_error("remove", &part, e))?;
            have = 0;
        }
        if have < offer.size {
            let needed = offer.size - have;
            let free = fs2::available_space(dir).map_err(|e| io_error("measure", dir, e))?;
            if free < needed.saturating_add(settings.keep_free_bytes) {
                return Ok(Fetched::Refused(format!(
                    "the archive needs {needed} more bytes and {} must stay free; {free} are free",
                    settings.keep_free_bytes
                )));
            }
            fetch(updates, client, offer, &part, have, stopping)?;
        }
        if matches_offer(&part, offer)? {
            fs::rename(&part, &whole).map_err(|e| io_error("rename", &part, e))?;
            if let Ok(d) = fs::File::open(dir) {
                // The rename outlives a power cut (or the .part is kept).
                let _ = d.sync_all();
            }
            info!(
                version = offer.version,
                bytes = offer.size,
                "update archive downloaded"
            );
            return Ok(Fetched::Whole(whole));
        }
        fs::remove_file(&part).map_err(|e| io_error("remove", &part, e))?;
        let damaged = {
            let mut s = updates.lock();
            let n = s.damaged.entry(offer.sha256.to_owned()).or_default();
            *n += 1;
            *n
        };
        warn!(
            version = offer.version,
            damaged, "downloaded archive does not match its sha256; deleted"
        );
        if damaged > MAX_REFETCHES {
            return Ok(Fetched::Refused(format!(
                "the archive arrived damaged (sha256 mismatch) {damaged} times"
            )));
        }
    }
}

/// Removes earlier offers' downloads: the directory holds one archive.
fn remove_other_downloads(dir: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((stem, ext)) = name.rsplit_once('.') else {
            continue;
        };
        if (ext == "part" || ext == "tar") && is_sha256_hex(stem) && stem != keep {
            match fs::remove_file(entry.path()) {
                Ok(()) => debug!(file = name, "earlier download removed"),
                Err(e) => warn!(file = name, error = %e, "earlier download not removed"),
            }
        }
    }
}

/// Appends the archive from byte `have` to `part`, until it is whole.
fn fetch(
    updates: &Updates,
    client: &Client,
    offer: &Offer<'_>,
    part: &Path,
    have: u64,
    stopping: &dyn Fn() -> bool,
) -> Result<(), SyncError> {
    let progress = |done| {
        updates.set_progress(Some(DownloadProgress {
            version: offer.version,
            done,
            total: offer.size,
        }))
    };
    progress(have);
    let mut answer = client.archive(offer.bundle_id, have)?;
    if let Some(total) = answer.total {
        if total != offer.size {
            return Err(SyncError::BadResponse(format!(
                "the archive is {total} bytes; the offer said {}",
                offer.size
            )));
        }
    }
    if let Some(length) = answer.length {
        if answer.start.checked_add(length) != Some(offer.size) {
            return Err(SyncError::BadResponse(format!(
                "an archive answer of {length} bytes from byte {} does not end at the {} offered",
                answer.start, offer.size
            )));
        }
    }
    let mut file = if answer.start == have && have > 0 {
        fs::OpenOptions::new()
            .append(true)
            .open(part)
            .map_err(|e| io_error("open", part, e))?
    } else if answer.start == 0 {
        // A whole answer to a ranged request starts over.
        fs::File::create(part).map_err(|e| io_error("create", part, e))?
    } else {
        return Err(SyncError::BadResponse(format!(
            "asked for the archive from byte {have}, got it from {}",
            answer.start
        )));
    };
    let mut done = answer.start;
    debug!(version = offer.version, from = done, "archive download");
    let mut buf = vec![0u8; CHUNK];
    loop {
        if stopping() {
            let _ = file.sync_data();
            return Err(SyncError::Stopped);
        }
        let n = match answer.response.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = file.sync_data();
                return Err(if e.kind() == std::io::ErrorKind::TimedOut {
                    SyncError::Timeout(format!("reading the archive at byte {done}: {e}"))
                } else {
                    SyncError::Unreachable(format!("reading the archive at byte {done}: {e}"))
                });
            }
        };
        if done + n as u64 > offer.size {
            return Err(SyncError::BadResponse(format!(
                "the archive runs past the {} bytes offered",
                offer.size
            )));
        }
        file.write_all(&buf[..n])
            .map_err(|e| io_error("write", part, e))?;
        done += n as u64;
        progress(done);
    }
    file.sync_data().map_err(|e| io_error("sync", part, e))?;
    if done < offer.size {
        return Err(SyncError::Unreachable(format!(
            "the archive download ended at byte {done} of {}; it resumes from there",
            offer.size
        )));
    }
    Ok(())
}

fn matches_offer(path: &Path, offer: &Offer<'_>) -> Result<bool, SyncError> {
    let mut file = fs::File::open(path).map_err(|e| io_error("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| io_error("read", path, e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok(total == offer.size && hex::encode(hasher.finalize()) == offer.sha256)
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(rollout: &str, version: u64, outcome: UpdateOutcome) -> UpdateResult {
        UpdateResult {
            rollout_id: rollout.into(),
            version,
            outcome,
            detail: None,
        }
    }

    fn ready(updates: &Updates, rollout: &str, version: u64, rollback: bool) {
        let key = OfferKey {
            rollout_id: rollout.into(),
            version,
            rollback,
        };
        let update = if rollback {
            ReadyUpdate::Rollback {
                rollout_id: rollout.into(),
                version,
            }
        } else {
            ReadyUpdate::Install {
                rollout_id: rollout.into(),
                version,
                archive: PathBuf::from("/nonexistent/x.tar"),
            }
        };
        updates.lock().ready = Some(Ready {
            key,
            update,
            taken: false,
        });
    }

    #[test]
    fn an_update_is_handed_out_once_and_never_after_its_result() {
        let updates = Updates::default();
        ready(&updates, "r1", 5, false);
        assert!(matches!(
            updates.take(),
            Some(ReadyUpdate::Install { version: 5, .. })
        ));
        assert_eq!(updates.take(), None, "handed out twice");
        updates.report(result("r1", 5, UpdateOutcome::Installed));
        let s = updates.lock();
        assert!(s.ready.is_none());
        assert_eq!(s.results.len(), 1);
        assert!(s.answered.contains(&OfferKey {
            rollout_id: "r1".into(),
            version: 5,
            rollback: false
        }));
        // The rollback of the same rollout and version is another offer.
        assert!(!s.answered.contains(&OfferKey {
            rollout_id: "r1".into(),
            version: 5,
            rollback: true
        }));
    }

    #[test]
    fn unacknowledged_results_outlive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let settings = UpdateSettings::new(dir.path().join("downloads"), "0.1.0");
        let updates = Updates::open(&settings);
        ready(&updates, "r1", 5, false);
        assert!(updates.take().is_some());
        updates.report(result("r1", 5, UpdateOutcome::Refused));
        drop(updates);

        let again = Updates::open(&settings);
        {
            let s = again.lock();
            assert_eq!(s.results.len(), 1);
            assert_eq!(s.results[0].outcome, UpdateOutcome::Refused);
            assert!(s.answered.contains(&OfferKey {
                rollout_id: "r1".into(),
                version: 5,
                rollback: false
            }));
        }
        // Acknowledged: gone from the journal too.
        {
            let mut s = again.lock();
            s.results.pop_front();
            again.persist(&s);
        }
        assert!(Updates::open(&settings).lock().results.is_empty());

        // A damaged journal is set aside, not a reason not to start.
        fs::write(
            dir.path().join("downloads").join(RESULTS_FILE),
            b"{not json",
        )
        .unwrap();
        assert!(Updates::open(&settings).lock().results.is_empty());
    }

    #[test]
    fn a_detail_is_capped() {
        let updates = Updates::default();
        let mut r = result("r", 1, UpdateOutcome::Failed);
        r.detail = Some("x".repeat(MAX_UPDATE_DETAIL * 2));
        updates.report(r);
        let s = updates.lock();
        assert_eq!(
            s.results[0].detail.as_ref().unwrap().chars().count(),
            MAX_UPDATE_DETAIL
        );
    }

    #[test]
    fn only_earlier_downloads_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let keep = "a".repeat(64);
        let old = "b".repeat(64);
        for name in [
            format!("{keep}.part"),
            format!("{old}.part"),
            format!("{old}.tar"),
            "notes.tar".into(),
            format!("{old}.txt"),
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_other_downloads(dir.path(), &keep);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                format!("{keep}.part"),
                format!("{old}.txt"),
                "notes.tar".into()
            ]
        );
    }
}
