//! The daemon's loop: wait for the button, capture, answer, show; confirm
//! captures into cases on a writer thread; stop cleanly on request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dermascope_device::{Display, Light, Trigger, TriggerError, TriggerEvent};
use dermascope_store::{
    now_ms, Case, CaseError, CaseId, CaseMetadata, CaseSource, CaseWrite, Diagnosis, SearchHit,
};
use dermascope_ui::{Canvas, RejectionView, Screen, StatusView, SyncState, Thumbnail};
use tracing::{debug, error, info, warn};

use crate::analysis::{Analysis, Analyzer, CapturedLesion, ChosenFrame, FrameOrigin, StageTimings};
use crate::feed::{BurstError, CameraFeed, CameraHealth};
use crate::fleet::FleetLink;
use crate::retrain::{install_in, RetrainOutcome, Retrainer};
use crate::updates::{DeviceUpdates, FleetAction, FoundBundle, Origin, UsbFinding};
use dermascope_update::UpdateError;

/// What the daemon tells its supervisor (systemd on the device). `Sync`:
/// an install keeps the watchdog fed from a thread of its own.
pub trait Supervisor: Sync {
    /// Start-up finished; `status` is one human-readable line.
    fn ready(&self, status: &str);
    /// Still alive (called at least every `LOOP_TICK`).
    fn alive(&self);
    /// Shutting down.
    fn stopping(&self);
}

/// For tests, benchmarks and a PC without systemd.
pub struct NoSupervisor;

impl Supervisor for NoSupervisor {
    fn ready(&self, _: &str) {}
    fn alive(&self) {}
    fn stopping(&self) {}
}

/// Longest the loop sleeps waiting for the button, so the watchdog, the
/// shutdown flag and the camera state are looked at this often.
pub const LOOP_TICK: Duration = Duration::from_millis(250);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the trigger failed: {0}; check the button wiring or the control socket")]
    Trigger(#[from] TriggerError),
    #[error("the display failed: {0}")]
    Display(String),
    #[error("cannot start the case writer thread: {0}")]
    Writer(std::io::Error),
}

/// The daemon's parts, already opened.
pub struct Daemon {
    pub analyzer: Arc<Analyzer>,
    pub feed: CameraFeed,
    pub trigger: Box<dyn Trigger>,
    pub light: Box<dyn Light>,
    pub display: Box<dyn Display>,
    /// Which frames a press chooses from.
    pub capture_mode: CaptureMode,
    /// Frames of a burst (`CaptureMode::Burst`).
    pub burst: usize,
    /// Longest wait for the camera's frames after a press.
    pub camera_timeout: Duration,
    /// 0: never refresh the live view.
    pub live_view: Duration,
    /// What every confirmed capture is stored with.
    pub cases: CaseSettings,
    /// A standing notice added to the ready screen's hint (an adapter that
    /// did not load, say).
    pub notice: Option<String>,
    /// Set once the store refused a write for a reason other than a full
    /// disk: confirmations are refused with a clear screen from then on.
    pub storage_failed: bool,
    /// The sync thread, when `[sync]` is configured; `None` is offline-only.
    pub fleet: Option<FleetLink>,
    /// Signed updates, when `[update]` is configured.
    pub updates: Option<DeviceUpdates>,
    /// Background retraining of the adapter (`[adapter] retrain_after`);
    /// `None` is off.
    pub retrainer: Option<Retrainer>,
}

/// Which frames a press chooses from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// `Daemon::burst` frames delivered after the press; the light ring is
    /// on for the burst only. Kept to compare against the ring.
    Burst,
    /// The frames the camera thread captured within `window` before the
    /// press (and after the light ring came on, as it stays on while the
    /// loop serves), else those of `follow_up` after it.
    Ring {
        window: Duration,
        follow_up: Duration,
    },
}

fn ms_since(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1000.0
}

/// `later - earlier` in milliseconds, negative when `earlier` is later.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(earlier.duration_since(later).as_secs_f64() * 1000.0),
    }
}

/// The screen for a press the camera gave no frames for.
fn camera_failed(error: BurstError, mut timings: StageTimings, started: Instant) -> Analysis {
    warn!(error = %error, "capture failed");
    let what_to_do = match error {
        BurstError::Failed(_) => {
            "The camera cannot be used. Check the cable, then restart the device."
        }
        BurstError::Timeout { .. } => RejectionView::CameraError.default_advice(),
    };
    timings.total_ms = ms_since(started);
    Analysis {
        screen: Screen::Rejected {
            reason: RejectionView::CameraError,
            what_to_do: what_to_do.to_string(),
        },
        timings,
        capture: None,
        shown: Vec::new(),
    }
}

/// How long an install's result stays on the panel before the daemon
/// starts again into the version that is current.
const UPDATE_RESULT_SHOWN: Duration = Duration::from_secs(3);

/// A results screen the clinician has not acted on holds back an install
/// this long (they may be about to confirm it).
const RESULTS_HOLD_INSTALL: Duration = Duration::from_secs(120);

/// Why the loop ended.
enum Stop {
    /// A shutdown, or `max_captures` answered.
    Done,
    /// A verified bundle is waiting: install it once everything is closed.
    Install(FoundBundle),
    /// The fleet's rollout was rolled back: switch back from `version`.
    Rollback { rollout_id: String, version: u64 },
}

/// What a confirmed capture is stored with.
#[derive(Clone, Debug)]
pub struct CaseSettings {
    /// This device's id, recorded on every case it creates.
    pub device_id: Option<String>,
    /// Keep the chosen frame as the case's original photograph (JPEG at
    /// the camera's resolution), so another encoder can re-embed it.
    pub keep_originals: bool,
}

impl Default for CaseSettings {
    fn default() -> Self {
        Self {
            device_id: None,
            keep_originals: true,
        }
    }
}

/// What a run did, for logs and tests.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub captures: u64,
    pub rejected: u64,
    pub confirmed: u64,
    /// Confirmations the case writer reported flushed.
    pub saved: u64,
    /// Per-capture stage timings, oldest first (the last 1,000).
    pub timings: VecDeque<StageTimings>,
    /// What the screen showed, oldest first (the last 1,000), as
    /// [`screen_label`] names it: what tests and logs check.
    pub screens: VecDeque<String>,
    /// For each results screen, oldest first (the last 1,000), the cases it
    /// listed and their scores, best first.
    pub matches: VecDeque<Vec<SearchHit>>,
    /// For each answered capture, oldest first (the last 1,000), the id of
    /// the adapter that ran on it (`None`: similar cases without one).
    pub adapters: VecDeque<Option<String>>,
    /// Set when an update was installed (or attempted): the caller starts
    /// the daemon again, into whichever version is now current.
    pub restart: Option<String>,
}

/// What the ready screen says while a confirmed capture is being written.
const SAVING: &str = "Saving the case…";
/// How the ready screen starts once the writer reports a case flushed.
const SAVED: &str = "Case saved:";

/// A short name for a screen: `ready` (`ready:saving`, `ready:saved` while
/// and after a confirmation is written), `capturing`, `results:N`,
/// `rejected:<reason>`, `error:<title>`.
pub fn screen_label(screen: &Screen) -> String {
    match screen {
        Screen::Ready { hint, .. } if hint.starts_with(SAVING) => "ready:saving".into(),
        Screen::Ready { hint, .. } if hint.starts_with(SAVED) => "ready:saved".into(),
        Screen::Ready { .. } => "ready".into(),
        Screen::Capturing { .. } => "capturing".into(),
        Screen::Rejected { reason, .. } => format!("rejected:{reason:?}"),
        Screen::Results(view) if view.fleet.is_some() => {
            format!("results:{}+fleet", view.matches.len())
        }
        Screen::Results(view) => format!("results:{}", view.matches.len()),
        Screen::Updating { .. } => "updating".into(),
        Screen::Error { title, .. } => format!("error:{title}"),
    }
}

/// A confirmed capture on its way to the store.
struct PendingCase {
    case: Case,
    adapter_embedding: Option<Vec<f32>>,
    /// The adapter that computed `adapter_embedding`.
    adapter_id: Option<String>,
    /// Encoded as the original photograph by the writer, off the loop.
    frame: Option<Arc<dermascope_device::Frame>>,
}

/// Confirmations waiting for the writer at most. A flush takes tens of
/// milliseconds, so more than this means the storage is failing or very
/// slow: the clinician is told, instead of captures piling up in memory.
pub const CASE_QUEUE_BOUND: usize = 4;

/// What the case writer tells the loop about each confirmed capture.
#[derive(Debug)]
enum WriteOutcome {
    /// Flushed: it survives a crash from now on. `confirmed`: with the
    /// clinician's label (what a retraining counts).
    Saved {
        id: CaseId,
        diagnosis: String,
        confirmed: bool,
    },
    /// Not stored; earlier cases are safe. `storage_failed`: the store
    /// refuses writes from now on (sled after an I/O error), so no further
    /// confirmation is taken until the daemon restarts.
    NotSaved {
        id: CaseId,
        what_to_fix: String,
        storage_failed: bool,
    },
}

/// Why a confirmation was not handed to the writer.
enum SubmitError {
    Full,
    Stopped,
}

/// Confirmed captures go to disk here, so the loop never waits for a flush;
/// each outcome comes back to the loop, which shows it.
struct CaseWriter {
    queue: Option<SyncSender<PendingCase>>,
    outcomes: Receiver<WriteOutcome>,
    thread: Option<JoinHandle<()>>,
}

impl CaseWriter {
    fn start(analyzer: Arc<Analyzer>) -> std::io::Result<Self> {
        let (queue, cases) = mpsc::sync_channel(CASE_QUEUE_BOUND);
        let (report, outcomes) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("case-writer".into())
            .spawn(move || write_cases(&analyzer, cases, &report))?;
        Ok(Self {
            queue: Some(queue),
            outcomes,
            thread: Some(thread),
        })
    }

    /// The next outcome the writer reported, if any.
    fn next_outcome(&self) -> Option<WriteOutcome> {
        self.outcomes.try_recv().ok()
    }

    fn submit(&self, pending: PendingCase) -> Result<(), SubmitError> {
        let Some(queue) = &self.queue else {
            return Err(SubmitError::Stopped);
        };
        queue.try_send(pending).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Full,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }

    /// Waits until every submitted case is flushed; returns the outcomes
    /// the loop had not seen.
    fn finish(mut self) -> Vec<WriteOutcome> {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the case writer panicked");
            }
        }
        self.outcomes.try_iter().collect()
    }
}

fn write_cases(analyzer: &Analyzer, cases: Receiver<PendingCase>, report: &Sender<WriteOutcome>) {
    for pending in cases {
        // The loop is gone only when shutting down; the log has it then.
        let _ = report.send(write_case(analyzer, pending));
    }
}

fn write_case(analyzer: &Analyzer, pending: PendingCase) -> WriteOutcome {
    let PendingCase {
        case,
        adapter_embedding,
        adapter_id,
        frame,
    } = pending;
    let id = case.id.clone();
    // A frame the store refuses as an original (over its caps) still
    // becomes a case: the case is what the clinician confirmed.
    let original = frame.and_then(|frame| {
        let photo = image::RgbImage::from_raw(frame.width, frame.height, frame.rgb.clone())?;
        dermascope_library::original_from_rgb(&photo)
            .inspect_err(
                |e| warn!(case = %id.log_tag(), error = %e, "original photograph not kept"),
            )
            .ok()
    });
    let write = CaseWrite {
        case: &case,
        original: original.as_ref(),
    };
    if let Err(e) = analyzer.store.insert_with_originals(&[write]) {
        error!(case = %id.log_tag(), error = %e, "capture could not be stored");
        let (what_to_fix, storage_failed) = if e.is_disk_full() {
            (
                "The device's storage is full, so this capture was not kept; earlier cases \
                 are safe. Call service to free space.",
                false,
            )
        } else {
            (
                "This capture was not kept; earlier cases are safe. Restart the device; if \
                 it repeats, call service.",
                true,
            )
        };
        return WriteOutcome::NotSaved {
            id,
            what_to_fix: what_to_fix.to_owned(),
            storage_failed,
        };
    }
    info!(case = %id.log_tag(), "capture stored as a case");
    if let Some(adapter) = analyzer.adapter.current() {
        // A retraining may have replaced the adapter that ran on the
        // capture: the row must be the searched space's.
        let vector = match (adapter_embedding, adapter_id) {
            (Some(vector), Some(ran)) if ran == adapter.adapter_id() => Ok(vector),
            _ => adapter.predict(&case.embedding).map(|out| out.embedding),
        };
        let stored = vector.map_err(|e| e.to_string()).and_then(|vector| {
            analyzer
                .store
                .put_adapter_embeddings(adapter.adapter_id(), &[(id.clone(), vector)])
                .map_err(|e| e.to_string())
        });
        if let Err(e) = stored {
            warn!(case = %id.log_tag(), error = %e, "adapter embedding not stored; recomputed at next start");
        }
    }
    WriteOutcome::Saved {
        id,
        diagnosis: case.diagnosis.display_name,
        confirmed: case.label_confirmed,
    }
}

impl Daemon {
    /// Runs until `shutdown` is set, a shutdown event arrives, or
    /// `max_captures` captures were answered (benchmarks and tests).
    pub fn run(
        mut self,
        shutdown: &AtomicBool,
        supervisor: &dyn Supervisor,
        max_captures: Option<u64>,
    ) -> Result<RunSummary, DaemonError> {
        let writer = CaseWriter::start(Arc::clone(&self.analyzer)).map_err(DaemonError::Writer)?;
        let mut summary = RunSummary::default();
        let screen = self.ready_screen(None);
        let first = self.show(&screen, &mut summary.screens);
        // Frames captured before a press are chosen from only in the
        // light of the ring, so it stays on while the loop serves.
        let lit_since = match self.capture_mode {
            CaptureMode::Burst => None,
            CaptureMode::Ring { .. } => {
                if let Err(e) = self.light.set(true) {
                    warn!(error = %e, "light ring did not switch on");
                }
                Some(self.feed.now())
            }
        };
        // Every way out of the loop goes through the flush below, errors too:
        // a confirmed case must not be lost because the screen failed.
        let outcome = match first {
            Err(e) => Err(e),
            Ok(()) => self.serve(
                shutdown,
                supervisor,
                max_captures,
                &writer,
                &mut summary,
                lit_since,
            ),
        };
        if lit_since.is_some() {
            if let Err(e) = self.light.set(false) {
                warn!(error = %e, "light ring did not switch off");
            }
        }
        // A training may be minutes from its end; the stop does not wait.
        if let Some(retrainer) = self.retrainer.take() {
            retrainer.abandon();
        }
        let status = self.status();
        supervisor.stopping();
        for outcome in writer.finish() {
            match outcome {
                WriteOutcome::Saved { .. } => summary.saved += 1,
                WriteOutcome::NotSaved { id, .. } => {
                    error!(case = %id.log_tag(), "a confirmation was not saved before the stop");
                }
            }
        }
        if let Some(fleet) = self.fleet.take() {
            fleet.stop();
        }
        match self.analyzer.store.checkpoint() {
            Ok(_) => info!("case store flushed"),
            Err(e) => warn!(error = %e, "index cache not written; the next start rescans"),
        }
        match outcome? {
            Stop::Done => {}
            // An install outlasts the watchdog (WatchdogSec=10 on the
            // device; re-embedding takes minutes): it is fed meanwhile, or
            // systemd would kill the install it is waiting for.
            Stop::Install(bundle) => {
                let restart = keeping_alive(supervisor, || {
                    self.install_closed(&bundle, &status, &mut summary)
                });
                summary.restart = Some(restart);
            }
            Stop::Rollback {
                rollout_id,
                version,
            } => {
                let restart = keeping_alive(supervisor, || {
                    self.roll_back_closed(&rollout_id, version, &status)
                });
                summary.restart = Some(restart);
            }
        }
        Ok(summary)
    }

    /// Closes everything but the panel and switches back from `version`.
    fn roll_back_closed(self, rollout_id: &str, version: u64, status: &StatusView) -> String {
        let Daemon {
            analyzer,
            mut display,
            updates,
            ..
        } = self;
        let Some(updates) = updates else {
            return "no updates configured".into();
        };
        drop(analyzer);
        present_plain(
            display.as_mut(),
            status,
            &Screen::Updating {
                title: format!("Undoing update {version}"),
                detail: "The fleet operator rolled this update back".into(),
                done: 0,
                total: 0,
            },
        );
        let (outcome, detail, words) = match updates.rollback() {
            Ok(back_to) => {
                info!(version, back_to, "rolled back for the fleet");
                (
                    dermascope_cloud_api::UpdateOutcome::RolledBack,
                    None,
                    format!("update {version} rolled back to {back_to}"),
                )
            }
            Err(e) => {
                warn!(error = %e, version, "the fleet's rollback could not be carried out");
                (
                    dermascope_cloud_api::UpdateOutcome::Refused,
                    Some(e.to_string()),
                    format!("update {version} not rolled back: {e}"),
                )
            }
        };
        updates.keep_result(&dermascope_cloud_api::UpdateResult {
            rollout_id: rollout_id.to_owned(),
            version,
            outcome,
            detail,
        });
        words
    }

    /// Closes everything but the panel, installs `bundle`, shows the
    /// result. The store must be closed first: a new encoder's version is
    /// prepared from it and its health check opens it.
    fn install_closed(
        self,
        bundle: &FoundBundle,
        status: &StatusView,
        summary: &mut RunSummary,
    ) -> String {
        let Daemon {
            analyzer,
            feed,
            trigger,
            light,
            mut display,
            updates,
            ..
        } = self;
        drop((feed, trigger, light));
        let Some(updates) = updates else {
            return "no updates configured".into();
        };
        // The case writer and the sync thread are gone; anything still
        // holding the store means it cannot close, and the install waits
        // for the next start (which finds the same bundle).
        match Arc::try_unwrap(analyzer) {
            Ok(analyzer) => drop(analyzer),
            Err(_) => {
                warn!("the case store is still in use; the update is installed at the next start");
                return "store busy; install deferred to the next start".into();
            }
        }
        let mut draw = |screen: &Screen, log: &mut VecDeque<String>| {
            if log.len() == 1000 {
                log.pop_front();
            }
            log.push_back(screen_label(screen));
            debug!(screen = %screen_label(screen), "screen shown");
            present_plain(display.as_mut(), status, screen);
        };
        let mut last_drawn: Option<Instant> = None;
        let result = updates.install(&bundle.dir, |screen| {
            // Copying a large encoder reports every file: draw at most
            // four times a second.
            if last_drawn.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
                draw(&screen, &mut summary.screens);
                last_drawn = Some(Instant::now());
            }
        });
        if let Some(outcome) = DeviceUpdates::outcome_of(bundle, &result) {
            updates.keep_result(&outcome);
        }
        match &result {
            // Marked failed by the installer, or nothing to retry.
            Ok(_) | Err(UpdateError::HealthCheck { .. } | UpdateError::Busy { .. }) => {}
            Err(e) => updates.record_stopped(bundle.version, &e.to_string()),
        }
        if let Origin::Fleet { archive, .. } = &bundle.origin {
            // Installed or refused, it is never installed from again: a
            // failed one is marked failed, a refused one would be again.
            let _ = std::fs::remove_file(archive);
        }
        updates.tidy();
        let (screen, outcome) = match result {
            Ok(version) => {
                info!(version, "update installed; starting it");
                (
                    Screen::Updating {
                        title: format!("Update {version} installed"),
                        detail: "Starting the new version".into(),
                        done: 1,
                        total: 1,
                    },
                    format!("update {version} installed"),
                )
            }
            Err(e) => {
                warn!(error = %e, "the update was not installed");
                (
                    Screen::Error {
                        title: "Update not installed".into(),
                        what_to_fix: format!(
                            "{e}. The device keeps the version it had; its cases are safe."
                        ),
                    },
                    format!("update {} not installed: {e}", bundle.version),
                )
            }
        };
        draw(&screen, &mut summary.screens);
        std::thread::sleep(UPDATE_RESULT_SHOWN);
        outcome
    }

    /// The loop proper, from the first screen to a stop.
    fn serve(
        &mut self,
        shutdown: &AtomicBool,
        supervisor: &dyn Supervisor,
        max_captures: Option<u64>,
        writer: &CaseWriter,
        summary: &mut RunSummary,
        lit_since: Option<Instant>,
    ) -> Result<Stop, DaemonError> {
        supervisor.ready(&format!(
            "ready: {} cases, camera {}",
            self.analyzer.store.len().unwrap_or(0),
            self.feed.describe()
        ));
        let mut last_capture: Option<CapturedLesion> = None;
        // Confirmed captures the writer has not answered for yet, kept so a
        // capture the storage refused (full) can be confirmed again.
        let mut saving: Vec<(CaseId, CapturedLesion)> = Vec::new();
        let mut camera_shown = CameraHealth::Streaming;
        let mut last_live = Instant::now();
        // The screen on the panel now, so that a changed sync status or a
        // fleet answer can be drawn onto it, and the status it was drawn
        // with.
        let mut on_panel: Option<Screen> = None;
        let mut drawn_status = self.status();
        let mut results_since: Option<Instant> = None;
        loop {
            supervisor.alive();
            while let Some(outcome) = writer.next_outcome() {
                let screen = self.settle(outcome, &mut saving, &mut last_capture, summary);
                self.show(&screen, &mut summary.screens)?;
                on_panel = Some(screen);
            }
            if let Some(screen) = self.retrain_update(on_panel.as_ref()) {
                self.show(&screen, &mut summary.screens)?;
                on_panel = Some(screen);
            }
            if let Some(redraw) = self.fleet_update(&mut on_panel, summary.captures, &drawn_status)
            {
                self.show(&redraw, &mut summary.screens)?;
                on_panel = Some(redraw);
            }
            // Offline-only devices skip this: the outbox count walks sled.
            if self.fleet.is_some() {
                drawn_status = self.status();
            }
            if shutdown.load(Ordering::Relaxed) {
                info!("shutdown requested");
                return Ok(Stop::Done);
            }
            if max_captures.is_some_and(|max| summary.captures >= max) {
                return Ok(Stop::Done);
            }
            // An install waits for confirmed cases to be written, for a
            // clinician looking at results to act on them, and for a
            // retraining (it holds the store the install must close).
            let results_open = matches!(on_panel, Some(Screen::Results(_)))
                && results_since.is_some_and(|t| t.elapsed() < RESULTS_HOLD_INSTALL);
            let retraining = self.retrainer.as_ref().is_some_and(Retrainer::is_running);
            if saving.is_empty() && !results_open && !retraining {
                let usb = self
                    .updates
                    .as_mut()
                    .and_then(|updates| updates.look_at_usb(Instant::now()));
                match usb {
                    Some(UsbFinding::Install(bundle)) => return Ok(Stop::Install(bundle)),
                    Some(UsbFinding::Refused { reason }) => {
                        let screen = Screen::Error {
                            title: "Update not installed".into(),
                            what_to_fix: format!(
                                "The bundle on the USB stick was refused: {reason}. The device \
                                 is unchanged."
                            ),
                        };
                        self.show(&screen, &mut summary.screens)?;
                        on_panel = Some(screen);
                    }
                    None => {}
                }
                if let (Some(updates), Some(fleet)) = (self.updates.as_ref(), self.fleet.as_ref()) {
                    if let Some(ready) = fleet.take_update() {
                        match updates.take_fleet_update(ready, fleet) {
                            FleetAction::Install(bundle) => return Ok(Stop::Install(bundle)),
                            FleetAction::Rollback {
                                rollout_id,
                                version,
                            } => {
                                return Ok(Stop::Rollback {
                                    rollout_id,
                                    version,
                                })
                            }
                            FleetAction::Reported => {}
                        }
                    }
                }
            }
            let event = match self.trigger.wait(LOOP_TICK) {
                Ok(event) => event,
                Err(e) => return Err(DaemonError::Trigger(e)),
            };
            match event {
                Some(TriggerEvent::Capture) => {
                    if let Some(retrainer) = self.retrainer.as_mut() {
                        retrainer.clear_shown();
                    }
                    let Analysis {
                        screen,
                        timings,
                        capture,
                        shown,
                    } = match self.capture_mode {
                        CaptureMode::Burst => self.capture(&mut summary.screens),
                        CaptureMode::Ring { window, follow_up } => self.capture_from_ring(
                            window,
                            follow_up,
                            lit_since,
                            &mut summary.screens,
                        ),
                    };
                    if matches!(screen, Screen::Results(_)) {
                        if summary.matches.len() == 1000 {
                            summary.matches.pop_front();
                        }
                        summary.matches.push_back(shown);
                    }
                    summary.captures += 1;
                    if capture.is_none() {
                        summary.rejected += 1;
                    }
                    if summary.timings.len() == 1000 {
                        summary.timings.pop_front();
                    }
                    let mut timings = timings;
                    let drawn = self.show_timed(&screen, &mut timings, &mut summary.screens);
                    timings.total_ms += timings.render_ms.unwrap_or_default()
                        + timings.present_ms.unwrap_or_default();
                    let adapter = capture.as_ref().and_then(|c| c.adapter_id.clone());
                    info!(
                        total_ms = timings.total_ms,
                        encoder_ms = timings.encoder_ms,
                        search_ms = timings.search_ms,
                        adapter = adapter.as_deref().unwrap_or("none"),
                        "capture answered"
                    );
                    if capture.is_some() {
                        if summary.adapters.len() == 1000 {
                            summary.adapters.pop_front();
                        }
                        summary.adapters.push_back(adapter);
                    }
                    summary.timings.push_back(timings);
                    if let (Some(fleet), Some(lesion), Screen::Results(_)) =
                        (self.fleet.as_mut(), capture.as_ref(), &screen)
                    {
                        fleet.ask(
                            summary.captures,
                            self.analyzer.encoder.model_id(),
                            &lesion.embedding,
                            &lesion.thumbnail_jpeg,
                            &lesion.frame,
                        );
                    }
                    if matches!(screen, Screen::Results(_)) {
                        results_since = Some(Instant::now());
                    }
                    on_panel = Some(screen);
                    last_capture = capture;
                    drawn?;
                }
                Some(TriggerEvent::Confirm { label }) => {
                    self.confirm(label, &mut last_capture, &mut saving, writer, summary)?;
                }
                Some(TriggerEvent::Shutdown) => {
                    info!("shutdown event");
                    return Ok(Stop::Done);
                }
                None => {
                    let health = self.feed.health();
                    if health != camera_shown {
                        let screen = self.ready_screen(Some(&health));
                        self.show(&screen, &mut summary.screens)?;
                        on_panel = Some(screen);
                        camera_shown = health;
                    } else if !self.live_view.is_zero()
                        && last_live.elapsed() >= self.live_view
                        && health == CameraHealth::Streaming
                    {
                        last_live = Instant::now();
                        let screen = self.ready_screen(None);
                        self.show(&screen, &mut summary.screens)?;
                        on_panel = Some(screen);
                    }
                }
            }
        }
    }

    fn capture(&mut self, log: &mut VecDeque<String>) -> Analysis {
        let started = Instant::now();
        let mut timings = StageTimings::default();
        if let Err(e) = self.light.set(true) {
            warn!(error = %e, "light ring did not switch on");
        }
        let burst_len = u32::try_from(self.burst).unwrap_or(u32::MAX);
        // The clinician sees that the device is busy and must hold still.
        let _ = self.show(
            &Screen::Capturing {
                frames_taken: 0,
                burst_len,
            },
            log,
        );
        let frames = self.feed.burst(self.burst, self.camera_timeout);
        if let Err(e) = self.light.set(false) {
            warn!(error = %e, "light ring did not switch off");
        }
        timings.burst_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        let frames = match frames {
            Ok(frames) => frames,
            Err(e) => return camera_failed(e, timings, started),
        };
        let mut analysis = self.analyzer.analyse(&frames, &mut timings);
        analysis.timings.total_ms = started.elapsed().as_secs_f64() * 1000.0;
        if let Some(capture) = &analysis.capture {
            analysis.timings.frame = Some(ChosenFrame {
                origin: FrameOrigin::Burst,
                sequence: capture.frame.sequence,
                age_ms: 0.0,
            });
        }
        analysis
    }

    /// A press answered from the ring: the sharpest acceptable frame
    /// captured within `window` before the press (and since the light came
    /// on), else the sharpest of those captured within `follow_up` after it.
    fn capture_from_ring(
        &mut self,
        window: Duration,
        follow_up: Duration,
        lit_since: Option<Instant>,
        log: &mut VecDeque<String>,
    ) -> Analysis {
        let started = Instant::now();
        let pressed = self.feed.now();
        let mut timings = StageTimings::default();
        let oldest = pressed.checked_sub(window).max(lit_since);
        let recent = self.feed.recent(oldest, pressed);
        timings.burst_ms = Some(ms_since(started));
        let judged = Instant::now();
        let verdict = self.analyzer.judge(&recent);
        timings.quality_ms = Some(ms_since(judged));
        let (frames, origin, best) = match verdict {
            Ok(best) => (recent, FrameOrigin::Ring, best),
            Err(reason) => {
                debug!(
                    frames = recent.len(),
                    ?reason,
                    "no recent frame passed; taking the next ones"
                );
                // Only now does the clinician have to hold still.
                let _ = self.show(
                    &Screen::Capturing {
                        frames_taken: 0,
                        burst_len: 1,
                    },
                    log,
                );
                let waited = Instant::now();
                let next =
                    self.feed
                        .frames_after(pressed, pressed + follow_up, self.camera_timeout);
                timings.burst_ms = timings.burst_ms.map(|b| b + ms_since(waited));
                let next = match next {
                    Ok(next) => next,
                    Err(e) => return camera_failed(e, timings, started),
                };
                let judged = Instant::now();
                let verdict = self.analyzer.judge(&next);
                timings.quality_ms = timings.quality_ms.map(|q| q + ms_since(judged));
                match verdict {
                    Ok(best) => (next, FrameOrigin::FollowUp, best),
                    Err(reason) => {
                        let mut analysis = Analyzer::refused(reason, &timings);
                        analysis.timings.total_ms = ms_since(started);
                        return analysis;
                    }
                }
            }
        };
        let frame = &frames[best];
        timings.frame = Some(ChosenFrame {
            origin,
            sequence: frame.sequence,
            age_ms: signed_ms(pressed, frame.captured_at),
        });
        let mut analysis = self.analyzer.analyse_frame(frame, &mut timings);
        analysis.timings.total_ms = ms_since(started);
        analysis
    }

    /// A confirmation of the last capture: handed to the case writer
    /// ("saving" at once), or refused with a screen saying why.
    fn confirm(
        &mut self,
        label: Option<String>,
        last_capture: &mut Option<CapturedLesion>,
        saving: &mut Vec<(CaseId, CapturedLesion)>,
        writer: &CaseWriter,
        summary: &mut RunSummary,
    ) -> Result<(), DaemonError> {
        match last_capture.take() {
            Some(capture) => {
                match case_from_capture(
                    &capture,
                    label.as_deref(),
                    self.analyzer.encoder.model_id(),
                    self.cases.device_id.as_deref(),
                ) {
                    Ok(_) if self.storage_failed => {
                        *last_capture = Some(capture);
                        let screen = Screen::Error {
                            title: "Cases cannot be saved".into(),
                            what_to_fix: "The case library failed; earlier cases are \
                                      safe. Restart the device; if it repeats, \
                                      call service."
                                .into(),
                        };
                        self.show(&screen, &mut summary.screens)?;
                    }
                    Ok(case) => {
                        let id = case.id.clone();
                        let submitted = writer.submit(PendingCase {
                            case,
                            adapter_embedding: capture.adapter_embedding.clone(),
                            adapter_id: capture.adapter_id.clone(),
                            frame: self
                                .cases
                                .keep_originals
                                .then(|| Arc::clone(&capture.frame)),
                        });
                        let screen = match submitted {
                            Ok(()) => {
                                summary.confirmed += 1;
                                saving.push((id, capture));
                                // "Saved" only once the writer says
                                // the case is flushed.
                                self.ready_with(SAVING)
                            }
                            Err(SubmitError::Full) => {
                                warn!("case queue full; confirmation refused");
                                *last_capture = Some(capture);
                                Screen::Error {
                                    title: "Still saving".into(),
                                    what_to_fix: "Earlier cases are still being saved. \
                                              Wait a moment and confirm again."
                                        .into(),
                                }
                            }
                            Err(SubmitError::Stopped) => {
                                error!("the case writer has stopped");
                                self.storage_failed = true;
                                *last_capture = Some(capture);
                                Screen::Error {
                                    title: "Cases cannot be saved".into(),
                                    what_to_fix: "Restart the device; earlier cases are \
                                              safe."
                                        .into(),
                                }
                            }
                        };
                        self.show(&screen, &mut summary.screens)?;
                    }
                    Err(refused) => {
                        warn!(error = %refused, "confirmation refused");
                        *last_capture = Some(capture);
                        let screen = Screen::Error {
                            title: "Label not recognised".into(),
                            what_to_fix: refused.to_string(),
                        };
                        self.show(&screen, &mut summary.screens)?;
                    }
                }
            }
            None => debug!("confirm without a capture to confirm"),
        }
        Ok(())
    }

    /// The screen for what the writer reported about one confirmation.
    fn settle(
        &mut self,
        outcome: WriteOutcome,
        saving: &mut Vec<(CaseId, CapturedLesion)>,
        last_capture: &mut Option<CapturedLesion>,
        summary: &mut RunSummary,
    ) -> Screen {
        let take = |saving: &mut Vec<(CaseId, CapturedLesion)>, id: &CaseId| {
            saving
                .iter()
                .position(|(pending, _)| pending == id)
                .map(|i| saving.remove(i).1)
        };
        match outcome {
            WriteOutcome::Saved {
                id,
                diagnosis,
                confirmed,
            } => {
                take(saving, &id);
                summary.saved += 1;
                if let Some(fleet) = &self.fleet {
                    fleet.nudge();
                }
                // Counted once written: a training reads the store.
                if let Some(retrainer) = self.retrainer.as_mut().filter(|_| confirmed) {
                    retrainer.note_confirmed();
                }
                self.ready_with(&format!("{SAVED} {diagnosis}."))
            }
            WriteOutcome::NotSaved {
                id,
                what_to_fix,
                storage_failed,
            } => {
                if storage_failed {
                    self.storage_failed = true;
                }
                // Unless a newer capture replaced it, the refused one can
                // be confirmed again once space is freed.
                if let Some(capture) = take(saving, &id) {
                    if last_capture.is_none() && !storage_failed {
                        *last_capture = Some(capture);
                    }
                }
                Screen::Error {
                    title: "Capture not saved".into(),
                    what_to_fix,
                }
            }
        }
    }

    /// The ready screen with `message` before the usual hint.
    fn ready_with(&self, message: &str) -> Screen {
        match self.ready_screen(None) {
            Screen::Ready { live, hint } => Screen::Ready {
                live,
                hint: format!("{message} {hint}"),
            },
            other => other,
        }
    }

    fn ready_screen(&self, health: Option<&CameraHealth>) -> Screen {
        match health {
            Some(CameraHealth::Interrupted(reason)) => Screen::Error {
                title: "Camera not available".into(),
                what_to_fix: format!(
                    "{reason}. Check the camera cable; it is retried every second."
                ),
            },
            Some(CameraHealth::Failed(reason)) => Screen::Error {
                title: "Camera cannot be used".into(),
                what_to_fix: format!("{reason}. Restart the device; if it repeats, call service."),
            },
            _ => Screen::Ready {
                live: if self.live_view.is_zero() {
                    None
                } else {
                    self.feed.latest().and_then(|frame| live_thumbnail(&frame))
                },
                hint: {
                    // The retraining's line replaces the usual words, so
                    // it fits the two lines the hint has.
                    let what = match self.retrainer.as_ref().and_then(Retrainer::shown) {
                        Some(line) => format!("{line}. Press to capture."),
                        None => "Place the scope on the lesion and press the button.".into(),
                    };
                    match &self.notice {
                        Some(notice) => format!("{notice} {what}"),
                        None => what,
                    }
                },
            },
        }
    }

    fn status(&self) -> StatusView {
        let store = &self.analyzer.store;
        let (sync, last_sync_minutes) = match &self.fleet {
            Some(fleet) => {
                let (state, minutes, _) = fleet.status(now_ms());
                (state, minutes)
            }
            // Offline-only: captured cases wait in the store's outbox.
            None => (SyncState::Offline, None),
        };
        StatusView {
            sync,
            pending_uploads: u32::try_from(store.pending_upload_count()).unwrap_or(u32::MAX),
            cases_in_library: store
                .len()
                .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
            clock: None,
            last_sync_minutes,
        }
    }

    /// A finished retraining: a kept adapter goes into use for the next
    /// capture, the log says what happened (no patient data: figures and
    /// adapter ids), and the ready screen, if shown, is drawn again with
    /// the outcome's line.
    fn retrain_update(&mut self, on_panel: Option<&Screen>) -> Option<Screen> {
        let outcome = self.retrainer.as_mut()?.poll()?;
        let mut line = outcome.status_line();
        match outcome {
            RetrainOutcome::Kept {
                adapter,
                replaced,
                new,
                old,
                at_ms,
            } => {
                let id = adapter.adapter_id().to_owned();
                match install_in(&self.analyzer, *adapter) {
                    Ok(()) => info!(
                        adapter = %id,
                        replaced = replaced.as_deref().unwrap_or("none"),
                        balanced_accuracy = new.balanced_accuracy,
                        old_balanced_accuracy = old.as_ref().map(|o| o.balanced_accuracy),
                        "retraining ended: the new adapter is kept and used from the next capture"
                    ),
                    Err(message) => {
                        warn!(
                            adapter = %id,
                            %message,
                            "retraining ended: the new adapter is installed but not in use until the next start"
                        );
                        line = RetrainOutcome::Failed { message, at_ms }.status_line();
                    }
                }
            }
            RetrainOutcome::Rejected { candidate, .. } => info!(
                candidate = %candidate,
                "retraining ended: the candidate was worse on the local cases; the installed adapter stays"
            ),
            RetrainOutcome::Failed { message, .. } => {
                warn!(%message, "retraining ended without a new adapter")
            }
        }
        self.retrainer.as_mut()?.show(line);
        matches!(on_panel, Some(Screen::Ready { .. }) | None).then(|| self.ready_screen(None))
    }

    /// The screen to draw again, if the fleet link changed what it shows:
    /// its answer for the results on the panel arrived, or the status bar
    /// (online, pending uploads, sync age) moved on. Without a fleet link
    /// nothing here ever redraws, so an offline device draws exactly as
    /// before.
    fn fleet_update(
        &mut self,
        on_panel: &mut Option<Screen>,
        capture: u64,
        drawn_status: &StatusView,
    ) -> Option<Screen> {
        let fleet = self.fleet.as_mut()?;
        if let Some(Screen::Results(view)) = on_panel.as_ref() {
            if let Some(answer) = fleet.answer_for(capture) {
                let mut view = view.clone();
                view.fleet = Some(answer);
                return Some(Screen::Results(view));
            }
        }
        let screen = on_panel.as_ref()?;
        // The capturing screen is transient; never redraw over a burst.
        if matches!(screen, Screen::Capturing { .. }) {
            return None;
        }
        (self.status() != *drawn_status).then(|| screen.clone())
    }

    fn show(&mut self, screen: &Screen, log: &mut VecDeque<String>) -> Result<(), DaemonError> {
        let mut timings = StageTimings::default();
        self.show_timed(screen, &mut timings, log)
    }

    fn show_timed(
        &mut self,
        screen: &Screen,
        timings: &mut StageTimings,
        log: &mut VecDeque<String>,
    ) -> Result<(), DaemonError> {
        if log.len() == 1000 {
            log.pop_front();
        }
        log.push_back(screen_label(screen));
        debug!(screen = %screen_label(screen), "screen shown");
        let started = Instant::now();
        let (width, height) = self.display.size();
        let mut canvas = Canvas::new(width, height)
            .map_err(|e| DaemonError::Display(format!("cannot draw at {width}x{height}: {e}")))?;
        let status = self.status();
        if let Err(e) = dermascope_ui::render(&mut canvas, &status, screen) {
            return Err(DaemonError::Display(format!("drawing failed: {e:?}")));
        }
        timings.render_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        let presented = self.display.present(width, height, canvas.pixels());
        timings.present_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        match presented {
            Ok(()) => Ok(()),
            Err(e) if e.is_retryable() => {
                // One lost screen is not worth stopping the device for.
                warn!(error = %e, "screen not shown");
                Ok(())
            }
            Err(e) => Err(DaemonError::Display(e.to_string())),
        }
    }
}

/// Runs `work` while a thread tells `supervisor` every second that the
/// daemon is alive.
fn keeping_alive<T>(supervisor: &dyn Supervisor, work: impl FnOnce() -> T) -> T {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                supervisor.alive();
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        let result = work();
        done.store(true, Ordering::Relaxed);
        result
    })
}

/// Draws `screen` with a fixed status bar, for when the daemon's parts
/// are closed (an install); a failure only leaves the log.
fn present_plain(display: &mut dyn Display, status: &StatusView, screen: &Screen) {
    let (width, height) = display.size();
    let Ok(mut canvas) = Canvas::new(width, height) else {
        return;
    };
    if dermascope_ui::render(&mut canvas, status, screen).is_ok() {
        if let Err(e) = display.present(width, height, canvas.pixels()) {
            warn!(error = %e, "an update screen was not shown");
        }
    }
}

fn live_thumbnail(frame: &dermascope_device::Frame) -> Option<Thumbnail> {
    let image = image::RgbImage::from_raw(frame.width, frame.height, frame.rgb.clone())?;
    let small = image::imageops::thumbnail(&image, 160, 120);
    let (w, h) = small.dimensions();
    Thumbnail::new(w, h, small.into_raw()).ok()
}

/// Why a confirmation did not become a case.
#[derive(Debug, thiserror::Error)]
enum ConfirmError {
    #[error("no label given and no suggestion to keep")]
    NoLabel,
    #[error(transparent)]
    Label(#[from] CaseError),
}

/// A confirmed capture as a case: the clinician's label when given
/// (confirmed), else the suggestion (unconfirmed, for later review).
fn case_from_capture(
    capture: &CapturedLesion,
    label: Option<&str>,
    model_id: &str,
    device_id: Option<&str>,
) -> Result<Case, ConfirmError> {
    let now = now_ms();
    let (code, confirmed) = match label {
        Some(label) => (label.to_ascii_lowercase(), true),
        None => (
            capture
                .suggested_code
                .clone()
                .ok_or(ConfirmError::NoLabel)?,
            false,
        ),
    };
    let diagnosis = Diagnosis::from_code(&code)?;
    // A UUIDv7, not the clock alone: two devices capturing in the same
    // millisecond, or one whose clock stepped back, must not collide.
    Ok(Case {
        id: CaseId::generate(),
        embedding: capture.embedding.clone(),
        diagnosis,
        source: CaseSource::Captured,
        metadata: CaseMetadata::default(),
        thumbnail_jpeg: capture.thumbnail_jpeg.clone(),
        model_id: model_id.to_string(),
        created_at_ms: now,
        updated_at_ms: now,
        label_confirmed: confirmed,
        device_id: device_id.map(str::to_owned),
        revision: 1,
    })
}
