//! The background sync thread and its RAG worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dermascope_cloud_api::{
    codes, DeviceInfo, RagAnswer, RagRequest, UploadBatch, UploadReceipt, WireCase, MAX_PULL_PAGE,
    MAX_RAG_K, MAX_REQUEST_BYTES, MAX_THUMBNAIL_BYTES,
};
use dermascope_store::{now_ms, CaseSource, CaseStore, PendingUpload, StoreError};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tracing::{debug, info, warn};

use crate::client::Client;
use crate::config::SyncConfig;
use crate::convert::{from_wire, to_wire};
use crate::error::SyncError;
use crate::update::{self, DownloadProgress, ReadyUpdate, UpdateSettings, Updates};

/// First retry after a failure waits up to this long (full jitter); each
/// further failure doubles it, up to the configured interval.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Never retry sooner than this, however the jitter falls.
const BACKOFF_FLOOR: Duration = Duration::from_millis(100);
/// An upload request's cases stop being added past this many (estimated)
/// bytes, well inside the service's [`MAX_REQUEST_BYTES`]: small enough
/// that a request of originals fits `request_timeout_s` on a slow clinic
/// link (8 MiB at 1 MB/s is 8 s), large enough for a few originals.
const UPLOAD_BUDGET_BYTES: usize = MAX_REQUEST_BYTES / 6;
/// Most entries of a differential this device will show.
const MAX_DIFFERENTIAL: usize = 64;

/// What the status bar shows. Read with [`SyncHandle::status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncStatus {
    /// The last sync cycle reached the service and completed (uploads
    /// drained, pulls up to date). False before the first one ends.
    pub online: bool,
    /// A cycle is running now.
    pub syncing: bool,
    /// Captured cases (revisions) the service has not acknowledged yet, as
    /// counted at the last [`SyncHandle::nudge`] or sync step (counting
    /// walks the outbox, so it is not done on every `status` call).
    pub pending_uploads: usize,
    /// When the last cycle completed (ms since the Unix epoch).
    pub last_sync_ms: Option<u64>,
    /// Why the last cycle failed (or which cases the service refused),
    /// for a person: e.g. the service's `device_revoked` message.
    pub last_error: Option<String>,
    /// Cycles finished so far, successful or not: lets a caller wait for
    /// "the next cycle after X" without a clock.
    pub cycles: u64,
    /// The update archive being downloaded (kept while a cut download
    /// waits to resume); `None` without updates or when none is under way.
    pub download: Option<DownloadProgress>,
}

/// Starts the background sync; see [`Syncer::start`].
pub struct Syncer;

impl Syncer {
    /// Checks `config`, reads its credential and CA, and starts the sync
    /// thread (`dermascope-sync`) and the RAG worker (`dermascope-rag`).
    /// The first cycle starts at once. Fails without starting anything on
    /// a bad configuration or credential file; a service that cannot be
    /// reached is not an error here (the status says offline).
    ///
    /// Each cycle: `GET /v1/device` (who am I, does the service index this
    /// store's encoder, may originals leave), upload the outbox in batches
    /// of at most `batch` cases (`mark_uploaded` with what the receipt
    /// acknowledged), then pull pages from the stored cursor, each applied
    /// with its cursor in one store transaction, until `more` is false.
    /// Then it sleeps `interval_s`, or less after a failure (exponential
    /// backoff, full jitter, capped at the interval), or until
    /// [`SyncHandle::nudge`]. A refused credential (401/403) waits a whole
    /// interval and says why in [`SyncStatus::last_error`].
    pub fn start(config: SyncConfig, store: Arc<CaseStore>) -> Result<SyncHandle, SyncError> {
        Self::start_inner(config, store, None)
    }

    /// [`Syncer::start`] with the update channel: each cycle then also
    /// sends the results queued with [`SyncHandle::report_update`], posts
    /// a [`dermascope_cloud_api::DeviceReport`] (what
    /// [`SyncHandle::set_installed`] last said, the store's encoder and
    /// outbox) and acts on the offer: an archive is downloaded into
    /// `settings.download_dir` (resumed after a cut, checked against the
    /// offer's size and sha256) and a rollback passed on, both for
    /// [`SyncHandle::take_update`]. The update step runs even when the
    /// service does not index the store's encoder, so a device can always
    /// be updated out of that state.
    pub fn start_with_updates(
        config: SyncConfig,
        store: Arc<CaseStore>,
        settings: UpdateSettings,
    ) -> Result<SyncHandle, SyncError> {
        if settings.daemon_version.trim().is_empty() {
            return Err(SyncError::Config {
                key: "daemon_version",
                message: "is empty: pass the daemon's MAJOR.MINOR.PATCH".into(),
            });
        }
        Self::start_inner(config, store, Some(settings))
    }

    fn start_inner(
        config: SyncConfig,
        store: Arc<CaseStore>,
        settings: Option<UpdateSettings>,
    ) -> Result<SyncHandle, SyncError> {
        let client = Client::new(&config)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(LoopState::default()),
            wake: Condvar::new(),
            device: Mutex::new(None),
            pending: AtomicUsize::new(store.pending_upload_count()),
            updates: settings.as_ref().map(Updates::open).unwrap_or_default(),
        });
        let spawn_error = |e: std::io::Error| SyncError::Thread(e.to_string());
        let (rag_tx, rag_rx) = mpsc::channel::<RagJob>();
        let rag_thread = {
            let client = client.clone();
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("dermascope-rag".into())
                .spawn(move || rag_worker(&rag_rx, &client, &shared))
                .map_err(spawn_error)?
        };
        let thread = {
            let shared = Arc::clone(&shared);
            let store = Arc::clone(&store);
            let config = config.clone();
            std::thread::Builder::new()
                .name("dermascope-sync".into())
                .spawn(move || run(&shared, &client, &store, &config, settings.as_ref()))
                .map_err(spawn_error)?
        };
        info!(
            interval_s = config.interval_s,
            batch = config.batch,
            "fleet sync started"
        );
        Ok(SyncHandle {
            shared,
            store,
            thread: Some(thread),
            rag_tx: Some(rag_tx),
            rag_thread: Some(rag_thread),
        })
    }
}

/// The running sync. Share it (it is `Send + Sync`); dropping it stops
/// the sync like [`SyncHandle::stop`].
pub struct SyncHandle {
    shared: Arc<Shared>,
    store: Arc<CaseStore>,
    thread: Option<JoinHandle<()>>,
    rag_tx: Option<Sender<RagJob>>,
    rag_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SyncHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncHandle")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl SyncHandle {
    /// A snapshot of the sync's state; cheap (no disk or network), fine to
    /// call every frame.
    pub fn status(&self) -> SyncStatus {
        let s = self.shared.lock();
        SyncStatus {
            online: s.online,
            syncing: s.syncing,
            pending_uploads: self.shared.pending.load(Ordering::Relaxed),
            last_sync_ms: s.last_sync_ms,
            last_error: s.last_error.clone(),
            cycles: s.cycles,
            download: self.shared.updates.download(),
        }
    }

    /// What the daemon runs now, for the next report (sent at once): the
    /// `current` bundle version (`None` when it runs none) and the
    /// versions it marked failed. Call it at start and after every
    /// install, rollback or recovery. No report is sent before the first
    /// call, so no update is offered either.
    pub fn set_installed(&self, bundle_version: Option<u64>, failed_versions: Vec<u64>) {
        self.shared
            .updates
            .set_installed(bundle_version, failed_versions);
        self.shared.lock().nudged = true;
        self.shared.wake.notify_all();
    }

    /// An update ready to carry out, each handed out once (and never again
    /// after a result for it was queued). Cheap; poll it from the daemon's
    /// loop. Always `None` without [`Syncer::start_with_updates`].
    pub fn take_update(&self) -> Option<ReadyUpdate> {
        self.shared.updates.take()
    }

    /// Queues the outcome of a [`ReadyUpdate`] (or any result for a
    /// rollout); it is sent at the next cycle (started now) and at each
    /// one after until the service acknowledges it. An install's archive
    /// is deleted here: it has served. `detail` is cut to
    /// [`dermascope_cloud_api::MAX_UPDATE_DETAIL`] characters and must
    /// hold no patient data.
    pub fn report_update(&self, result: dermascope_cloud_api::UpdateResult) {
        self.shared.updates.report(result);
        self.shared.lock().nudged = true;
        self.shared.wake.notify_all();
    }

    /// Starts the next cycle now (e.g. after a capture) instead of at the
    /// end of the interval or backoff; a nudge during a cycle starts
    /// another right after it. Never blocks on the network.
    pub fn nudge(&self) {
        self.shared.count_pending(&self.store);
        self.shared.lock().nudged = true;
        self.shared.wake.notify_all();
    }

    /// Asks the fleet service for a differential in the background and
    /// returns at once; the answer (or why there is none) arrives on the
    /// receiver. One request is in flight at a time; requests queued
    /// behind it are superseded by the newest ([`SyncError::Superseded`]).
    /// The photograph is sent only when the clinic allows originals to
    /// leave (otherwise it is dropped here and the thumbnail stands in);
    /// `k` is clamped to 1..=`MAX_RAG_K`.
    pub fn request_rag(&self, request: RagRequest) -> Receiver<Result<RagAnswer, SyncError>> {
        let (reply, answer) = mpsc::channel();
        let job = RagJob { request, reply };
        match &self.rag_tx {
            Some(tx) => {
                if let Err(mpsc::SendError(job)) = tx.send(job) {
                    let _ = job.reply.send(Err(SyncError::Stopped));
                }
            }
            None => {
                let _ = job.reply.send(Err(SyncError::Stopped));
            }
        }
        answer
    }

    /// Stops the sync and waits for its threads: at once between requests,
    /// otherwise when the request in flight ends (at most the configured
    /// `request_timeout_s`). Nothing acknowledged is lost by stopping at
    /// any point: the outbox and cursor are only moved after the service
    /// answered and the store flushed.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        // The worker ends when its queue closes.
        self.rag_tx = None;
        for thread in [self.thread.take(), self.rag_thread.take()]
            .into_iter()
            .flatten()
        {
            if thread.join().is_err() {
                warn!("a sync thread panicked");
            }
        }
    }
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Shared {
    state: Mutex<LoopState>,
    wake: Condvar,
    /// The last `GET /v1/device` answer (for the RAG worker's photo rule).
    device: Mutex<Option<DeviceInfo>>,
    /// The outbox's size when last counted.
    pending: AtomicUsize,
    updates: Updates,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, LoopState> {
        // A panic elsewhere leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count_pending(&self, store: &CaseStore) {
        self.pending
            .store(store.pending_upload_count(), Ordering::Relaxed);
    }

    fn stopping(&self) -> bool {
        self.lock().stop
    }

    fn device(&self) -> Option<DeviceInfo> {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_device(&self, info: DeviceInfo) {
        *self.device.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
    }
}

#[derive(Default)]
struct LoopState {
    stop: bool,
    nudged: bool,
    online: bool,
    syncing: bool,
    last_sync_ms: Option<u64>,
    last_error: Option<String>,
    cycles: u64,
}

struct RagJob {
    request: RagRequest,
    reply: Sender<Result<RagAnswer, SyncError>>,
}

/// What one cycle did.
#[derive(Default)]
struct Cycle {
    uploaded: usize,
    pulled: usize,
    /// Cases the service refused one by one (left in the outbox), with the
    /// last reason.
    refused: usize,
    refusal: Option<String>,
}

fn run(
    shared: &Shared,
    client: &Client,
    store: &CaseStore,
    config: &SyncConfig,
    settings: Option<&UpdateSettings>,
) {
    let interval = config.interval();
    let mut failures: u32 = 0;
    let seed = now_ms() ^ u64::from(std::process::id()).rotate_left(32);
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        {
            let mut s = shared.lock();
            if s.stop {
                break;
            }
            s.syncing = true;
            s.nudged = false;
        }
        shared.count_pending(store);
        let result = cycle(shared, client, store, config, settings);
        shared.count_pending(store);
        let wait = {
            let mut s = shared.lock();
            s.syncing = false;
            s.cycles += 1;
            match result {
                Ok(done) => {
                    failures = 0;
                    s.online = true;
                    s.last_sync_ms = Some(now_ms());
                    s.last_error = done.refusal.map(|why| {
                        format!(
                            "{} case(s) refused by the fleet service, kept for retry: {why}",
                            done.refused
                        )
                    });
                    if done.uploaded + done.pulled + done.refused > 0 {
                        info!(
                            uploaded = done.uploaded,
                            pulled = done.pulled,
                            refused = done.refused,
                            "fleet sync done"
                        );
                    }
                    interval
                }
                Err(SyncError::Stopped) => break,
                Err(e) => {
                    let message = e.to_string();
                    // Days offline are normal for a handheld: a failure is
                    // logged as a warning when it changes, not every retry.
                    let repeated = s.last_error.as_deref() == Some(message.as_str());
                    s.online = false;
                    s.last_error = Some(message);
                    if e.is_transient() {
                        failures = failures.saturating_add(1);
                        let wait = backoff(failures, interval, &mut rng);
                        let retry_ms = wait.as_millis() as u64;
                        if repeated {
                            debug!(error = %e, failures, retry_ms, "fleet sync failed again");
                        } else {
                            warn!(error = %e, failures, retry_ms, "fleet sync failed");
                        }
                        wait
                    } else {
                        // A refused credential, an encoder the service does
                        // not index, a store failure: retrying sooner
                        // changes nothing until someone acts.
                        failures = 0;
                        if repeated {
                            debug!(error = %e, "fleet sync still refused");
                        } else {
                            warn!(error = %e, "fleet sync refused; next try after the interval");
                        }
                        interval
                    }
                }
            }
        };
        sleep(shared, wait);
    }
    shared.lock().syncing = false;
    debug!("fleet sync stopped");
}

/// Full jitter: uniform in [0, min(cap, base * 2^(failures-1))].
fn backoff(failures: u32, cap: Duration, rng: &mut StdRng) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let ceiling = BACKOFF_BASE.saturating_mul(1 << exp).min(cap);
    let ms = rng.random_range(0..=ceiling.as_millis() as u64);
    Duration::from_millis(ms).max(BACKOFF_FLOOR.min(ceiling))
}

/// Waits until `wait` passed, or a nudge or stop arrives.
fn sleep(shared: &Shared, wait: Duration) {
    let deadline = Instant::now() + wait;
    let mut s = shared.lock();
    while !s.stop && !s.nudged {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        s = shared
            .wake
            .wait_timeout(s, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn cycle(
    shared: &Shared,
    client: &Client,
    store: &CaseStore,
    config: &SyncConfig,
    settings: Option<&UpdateSettings>,
) -> Result<Cycle, SyncError> {
    let cases = sync_cases(shared, client, store, config);
    if matches!(cases, Err(SyncError::Stopped)) {
        return cases;
    }
    // After the cases (captures go up first), and whatever became of them
    // short of a refused credential: a store of an encoder the service
    // does not index must not keep the device from its next update.
    let updated = match settings {
        Some(settings) if !cases.as_ref().is_err_and(SyncError::is_refused_credential) => {
            update::step(&shared.updates, client, store, settings, &|| {
                shared.stopping()
            })
        }
        _ => Ok(()),
    };
    let done = cases?;
    updated?;
    Ok(done)
}

fn sync_cases(
    shared: &Shared,
    client: &Client,
    store: &CaseStore,
    config: &SyncConfig,
) -> Result<Cycle, SyncError> {
    let info = client.device()?;
    let identity = store.identity();
    match info.models.iter().find(|m| m.model_id == identity.model_id) {
        Some(m) if m.dim == identity.embedding_dim => {}
        found => {
            return Err(SyncError::NotIndexed(match found {
                Some(m) => format!(
                    "the fleet service indexes encoder {:?} with dimension {}, this store's \
                     is {}",
                    m.model_id, m.dim, identity.embedding_dim
                ),
                None => format!(
                    "the fleet service does not index encoder {:?}: the operator adds it \
                     with `dermascope-cloud model add`",
                    identity.model_id
                ),
            }))
        }
    }
    let allow_originals = info.allow_originals;
    shared.set_device(info);
    let mut done = Cycle::default();
    upload_outbox(shared, client, store, config, allow_originals, &mut done)?;
    done.pulled = pull(shared, client, store)?;
    Ok(done)
}

/// One case ready to go up, with the revision it acknowledges.
struct Outgoing {
    ack: PendingUpload,
    wire: WireCase,
}

fn upload_outbox(
    shared: &Shared,
    client: &Client,
    store: &CaseStore,
    config: &SyncConfig,
    allow_originals: bool,
    done: &mut Cycle,
) -> Result<(), SyncError> {
    let pending = store.pending_uploads()?;
    let mut batch: Vec<Outgoing> = Vec::new();
    let mut bytes = 0;
    for entry in pending {
        if shared.stopping() {
            return Err(SyncError::Stopped);
        }
        let tag = entry.id.log_tag();
        let case = match store.get(&entry.id) {
            Ok(Some(case)) => case,
            // Removed since the outbox was read: its entry went with it.
            Ok(None) => continue,
            Err(e) => {
                warn!(case = %tag, error = %e, "outbox case unreadable; left pending");
                continue;
            }
        };
        if case.source != CaseSource::Captured {
            continue;
        }
        if case.thumbnail_jpeg.len() > MAX_THUMBNAIL_BYTES {
            warn!(case = %tag, bytes = case.thumbnail_jpeg.len(), "thumbnail over the service's cap; left pending");
            continue;
        }
        let original = if allow_originals {
            match store.original(&case.id) {
                Ok(photo) => photo.map(|p| p.into_jpeg()),
                Err(e) => {
                    warn!(case = %tag, error = %e, "original unreadable; uploading without it");
                    None
                }
            }
        } else {
            None
        };
        let wire = to_wire(&case, original);
        let size = estimated_bytes(&wire);
        if !batch.is_empty() && (batch.len() >= config.batch || bytes + size > UPLOAD_BUDGET_BYTES)
        {
            send_batch(shared, client, store, std::mem::take(&mut batch), done)?;
            bytes = 0;
        }
        bytes += size;
        batch.push(Outgoing {
            ack: PendingUpload {
                id: case.id.clone(),
                revision: case.revision,
            },
            wire,
        });
    }
    if !batch.is_empty() {
        send_batch(shared, client, store, batch, done)?;
    }
    Ok(())
}

/// JSON size of a case, roughly: base64 photographs and decimal floats.
fn estimated_bytes(wire: &WireCase) -> usize {
    let photos = wire.thumbnail_jpeg.len() + wire.original_jpeg.as_ref().map_or(0, Vec::len);
    photos / 3 * 4 + wire.embedding.len() * 16 + 2048
}

/// Uploads one batch and clears what the receipt acknowledged. A batch the
/// service refuses for its content (the whole batch is refused when one
/// case is bad) is retried case by case, so one bad case does not hold
/// back the others; the bad one stays in the outbox.
fn send_batch(
    shared: &Shared,
    client: &Client,
    store: &CaseStore,
    batch: Vec<Outgoing>,
    done: &mut Cycle,
) -> Result<(), SyncError> {
    match upload(client, store, &batch) {
        Ok(cleared) => {
            done.uploaded += cleared;
            shared.count_pending(store);
            Ok(())
        }
        Err(e) if is_content_refusal(&e) && batch.len() > 1 => {
            debug!(cases = batch.len(), error = %e, "batch refused; sending its cases one by one");
            for one in batch {
                send_batch(shared, client, store, vec![one], done)?;
            }
            Ok(())
        }
        Err(e) if is_content_refusal(&e) => {
            let mut one = batch;
            if e.code() == Some(codes::ORIGINALS_NOT_ALLOWED) && one[0].wire.original_jpeg.is_some()
            {
                // The clinic changed its mind since `GET /v1/device`.
                one[0].wire.original_jpeg = None;
                return send_batch(shared, client, store, one, done);
            }
            warn!(case = %one[0].ack.id.log_tag(), error = %e, "case refused by the fleet service; left pending");
            done.refused += 1;
            done.refusal = Some(e.to_string());
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn upload(client: &Client, store: &CaseStore, batch: &[Outgoing]) -> Result<usize, SyncError> {
    let request = UploadBatch {
        cases: batch.iter().map(|o| o.wire.clone()).collect(),
    };
    let receipt = client.upload(&request)?;
    let acks = acknowledged(batch, &receipt)?;
    Ok(store.mark_uploaded(&acks)?)
}

/// The receipt must answer every case sent, in order; anything else is
/// not trusted to clear the outbox. Whatever the outcome, the service holds
/// the sent revision or a newer one, so the sent revision is cleared.
fn acknowledged(
    batch: &[Outgoing],
    receipt: &UploadReceipt,
) -> Result<Vec<PendingUpload>, SyncError> {
    if receipt.results.len() != batch.len() {
        return Err(SyncError::BadResponse(format!(
            "an upload receipt of {} results for {} cases",
            receipt.results.len(),
            batch.len()
        )));
    }
    batch
        .iter()
        .zip(&receipt.results)
        .enumerate()
        .map(|(i, (sent, result))| {
            if result.id == sent.ack.id.as_str() && result.revision == sent.ack.revision {
                Ok(sent.ack.clone())
            } else {
                Err(SyncError::BadResponse(format!(
                    "upload receipt result {i} is not the case sent at that place"
                )))
            }
        })
        .collect()
}

fn is_content_refusal(e: &SyncError) -> bool {
    match e {
        SyncError::Service { status, code, .. } => {
            matches!(status, 400 | 413 | 422)
                && [
                    codes::BAD_REQUEST,
                    codes::TOO_LARGE,
                    codes::BAD_EMBEDDING,
                    codes::UNKNOWN_MODEL,
                    codes::BAD_PHOTO,
                    codes::ORIGINALS_NOT_ALLOWED,
                ]
                .contains(&code.as_str())
        }
        _ => false,
    }
}

/// Pulls pages from the stored cursor until the service says there are no
/// more; each page goes into the store with its cursor in one transaction.
fn pull(shared: &Shared, client: &Client, store: &CaseStore) -> Result<usize, SyncError> {
    let identity = store.identity().clone();
    let mut cursor = match store.sync_cursor() {
        Ok(cursor) => cursor,
        Err(e @ StoreError::CorruptSyncCursor { .. }) => {
            warn!(error = %e, "pulling from the start");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let mut restarted = false;
    let mut stored = 0;
    loop {
        if shared.stopping() {
            return Err(SyncError::Stopped);
        }
        let page = match client.pull(&identity.model_id, cursor.as_deref(), MAX_PULL_PAGE) {
            // A cursor of another clinic (the device was moved): the new
            // clinic's cases start from the beginning.
            Err(e) if e.code() == Some(codes::BAD_CURSOR) && cursor.is_some() && !restarted => {
                warn!(error = %e, "stored cursor refused; pulling from the start");
                cursor = None;
                restarted = true;
                continue;
            }
            page => page?,
        };
        if page.cursor.is_empty() {
            return Err(SyncError::BadResponse(
                "a pull page without a cursor".into(),
            ));
        }
        if page.more && cursor.as_deref() == Some(page.cursor.as_str()) {
            return Err(SyncError::BadResponse(
                "a pull page says more follow but its cursor did not move".into(),
            ));
        }
        let received = page.cases.len();
        let mut cases = Vec::with_capacity(received);
        for (index, wire) in page.cases.into_iter().enumerate() {
            match from_wire(wire, &identity) {
                Ok(case) => cases.push(case),
                Err(why) => warn!(index, reason = %why, "pulled case skipped, not stored"),
            }
        }
        let applied = store.apply_pulled(&cases, &page.cursor)?;
        debug!(
            received,
            added = applied.added,
            updated = applied.updated,
            skipped = applied.skipped,
            "pull page applied"
        );
        stored += applied.added + applied.updated;
        cursor = Some(page.cursor);
        if !page.more {
            return Ok(stored);
        }
    }
}

fn rag_worker(jobs: &Receiver<RagJob>, client: &Client, shared: &Shared) {
    while let Ok(mut job) = jobs.recv() {
        while let Ok(newer) = jobs.try_recv() {
            let _ = job.reply.send(Err(SyncError::Superseded));
            job = newer;
        }
        let result = answer(client, shared, job.request);
        // The caller may have stopped waiting; that is its choice.
        let _ = job.reply.send(result);
    }
}

fn answer(
    client: &Client,
    shared: &Shared,
    mut request: RagRequest,
) -> Result<RagAnswer, SyncError> {
    let allow_originals = match shared.device() {
        Some(info) => info.allow_originals,
        None => {
            let info = client.device()?;
            let allow = info.allow_originals;
            shared.set_device(info);
            allow
        }
    };
    if !allow_originals {
        request.photo_jpeg = None;
    }
    request.k = request.k.clamp(1, MAX_RAG_K);
    let answer = client.rag(&request)?;
    if answer.cases.len() > request.k || answer.differential.len() > MAX_DIFFERENTIAL {
        return Err(SyncError::BadResponse(format!(
            "a RAG answer with {} cases (asked for {}) and {} diagnoses",
            answer.cases.len(),
            request.k,
            answer.differential.len()
        )));
    }
    if answer.cases.iter().any(|c| !c.similarity.is_finite()) {
        return Err(SyncError::BadResponse(
            "a RAG answer with a similarity that is not a number".into(),
        ));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_under_a_doubling_ceiling_capped_at_the_interval() {
        let mut rng = StdRng::seed_from_u64(7);
        let cap = Duration::from_secs(60);
        for failures in 1..40 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1 << (failures - 1).min(30))
                .min(cap);
            for _ in 0..50 {
                let wait = backoff(failures, cap, &mut rng);
                assert!(
                    wait <= ceiling && wait >= BACKOFF_FLOOR,
                    "{failures}: {wait:?}"
                );
            }
        }
        // Jitter: not every draw is the same.
        let draws: std::collections::BTreeSet<_> =
            (0..50).map(|_| backoff(8, cap, &mut rng)).collect();
        assert!(draws.len() > 10, "{draws:?}");
    }

    #[test]
    fn a_receipt_clears_only_the_cases_it_answers_in_order() {
        use dermascope_cloud_api::{UploadOutcome, UploadResult};
        let case = |id: &str, revision| Outgoing {
            ack: PendingUpload {
                id: dermascope_store::CaseId::new(id).unwrap(),
                revision,
            },
            wire: serde_json::from_value(serde_json::json!({
                "id": id, "revision": revision, "model_id": "m", "embedding": [1.0],
                "diagnosis": {"code": "nv", "name": "n"}, "label_confirmed": true,
                "created_at_ms": 0, "updated_at_ms": 0, "thumbnail_jpeg": ""
            }))
            .unwrap(),
        };
        let batch = [case("a", 1), case("b", 3)];
        let result = |id: &str, revision| UploadResult {
            id: id.into(),
            revision,
            outcome: UploadOutcome::AlreadyStored,
        };
        let good = UploadReceipt {
            results: vec![result("a", 1), result("b", 3)],
        };
        assert_eq!(acknowledged(&batch, &good).unwrap().len(), 2);
        for bad in [
            vec![result("a", 1)],
            vec![result("b", 3), result("a", 1)],
            vec![result("a", 1), result("b", 4)],
        ] {
            let receipt = UploadReceipt { results: bad };
            assert!(matches!(
                acknowledged(&batch, &receipt),
                Err(SyncError::BadResponse(_))
            ));
        }
    }
}
