//! Retraining the adapter on the device, in the background, from the
//! reference library plus the clinic's own confirmed cases.
//!
//! # Guarantees
//! - **Capture never waits for it.** [`Retrainer::note_confirmed`] and
//!   [`Retrainer::poll`] return at once; the training runs in its own
//!   thread at the lowest CPU priority, one at a time.
//! - **A kill or power cut leaves the installed adapter.** The new adapter
//!   is written into [`candidate_dir`] beside the installed one, and only
//!   [`promote`] switches, by a durable manifest replacement
//!   (`dermascope-durable`); a leftover candidate is discarded at the next
//!   training.
//! - **Only a no-worse adapter replaces the installed one**: its balanced
//!   accuracy and melanoma recall on the held-out local cases (the whole
//!   validation split when none is held out) must not be lower than the
//!   installed adapter's on the same cases. The replaced one is kept in
//!   [`previous_dir`] for [`dermascope_library::rollback`].
//! - **The new space is ready before the switch.** The library's adapter
//!   embeddings for the new adapter are computed in the training thread;
//!   the loop only attaches them ([`install_in`]).
//!
//! - **The switch is whole.** The analyzer holds its adapter in an
//!   [`AdapterSlot`]; a capture takes the adapter once and runs it to the
//!   end, and [`install_in`] replaces it between captures.
//! - **A stop does not wait for it.** [`Retrainer::abandon`] tells the
//!   thread to stop before it promotes anything and leaves it; the
//!   installed adapter stays the old one.
//!
//! The count of confirmed local cases at the last training is kept in
//! `<adapter dir>.retrain.json`, so a restart neither forgets the cases
//! confirmed since nor retrains at once after a rejected candidate.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use dermascope_adapter::{Adapter, BATCH_ROWS};
use dermascope_library::{
    candidate_dir, confirmed_cases, previous_dir, promote, LocalOptions, TrainingOptions,
    TrainingPlan, ValidationFigures,
};
use dermascope_store::{CaseId, CaseSource, CaseStore};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::analysis::Analyzer;

/// How and when to retrain (the `[adapter]` section).
#[derive(Clone, Debug)]
pub struct RetrainSettings {
    /// Installed adapter's folder.
    pub dir: PathBuf,
    /// New confirmed local cases that start a training; 0 is off.
    pub retrain_after: usize,
    pub training: TrainingOptions,
    pub local: LocalOptions,
}

impl RetrainSettings {
    /// `[adapter]`'s retraining, `None` when `retrain_after` is 0; the
    /// training itself uses the defaults `dermascope adapter train` has.
    pub fn from_config(section: &crate::config::AdapterSection) -> Option<Self> {
        (section.retrain_after > 0).then(|| Self {
            dir: section.dir.clone(),
            retrain_after: section.retrain_after,
            training: TrainingOptions::default(),
            local: LocalOptions {
                weight: section.local_weight,
                ..LocalOptions::default()
            },
        })
    }
}

/// Where the training thread has got to, for a test's gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The thread has started; nothing is written yet.
    Started,
    /// The candidate is written and its adapter space computed; it is not
    /// yet compared with the installed adapter.
    Trained,
    /// The daemon stopped ([`Retrainer::abandon`]): the thread gives up
    /// without touching the installed adapter.
    Stopped,
}

/// A test's hook, called by the training thread at each [`Stage`]; it may
/// block (the thread waits, the loop does not).
pub type Gate = Arc<dyn Fn(Stage) + Send + Sync>;

/// What a finished training did.
pub enum RetrainOutcome {
    /// The new adapter is installed on disk; [`install_in`] puts it in use.
    Kept {
        adapter: Box<Adapter>,
        replaced: Option<String>,
        new: ValidationFigures,
        old: Option<ValidationFigures>,
        at_ms: u64,
    },
    /// The installed adapter stays: the candidate was worse on the same cases.
    Rejected {
        candidate: String,
        new: ValidationFigures,
        old: ValidationFigures,
        at_ms: u64,
    },
    /// Nothing changed; the message says why (also logged).
    Failed { message: String, at_ms: u64 },
}

impl RetrainOutcome {
    /// The ready screen's status line.
    pub fn status_line(&self) -> String {
        match self {
            RetrainOutcome::Kept { at_ms, .. } => {
                format!("Retrained {}: new adapter in use", clock(*at_ms))
            }
            RetrainOutcome::Rejected { at_ms, .. } => {
                format!("Retrained {}: kept the old adapter", clock(*at_ms))
            }
            RetrainOutcome::Failed { at_ms, .. } => {
                format!("Retraining {} failed (see the log)", clock(*at_ms))
            }
        }
    }
}

/// `HH:MM` UTC: the device has no time zone setting.
fn clock(at_ms: u64) -> String {
    let minutes = at_ms / 60_000;
    format!("{:02}:{:02} UTC", (minutes / 60) % 24, minutes % 60)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RetrainState {
    /// Confirmed local cases in the store when the last training started.
    local_cases_at_last_training: usize,
}

/// `<adapter dir>.retrain.json`.
pub fn state_path(dir: &Path) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "adapter".into());
    name.push(".retrain.json");
    dir.with_file_name(name)
}

fn read_state(dir: &Path) -> RetrainState {
    std::fs::read(state_path(dir))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn write_state(dir: &Path, state: &RetrainState) {
    let written = serde_json::to_vec(state)
        .map_err(std::io::Error::other)
        .and_then(|bytes| dermascope_durable::replace_durably(&state_path(dir), &bytes));
    if let Err(e) = written {
        warn!(error = %e, "retraining state not saved; the count restarts from the store");
    }
}

/// Local (captured or fleet) cases with a confirmed label, counted
/// without keeping their embeddings (a large library would not fit twice).
fn local_confirmed(store: &CaseStore) -> Result<usize, String> {
    let mut local = 0;
    for case in store.cases() {
        let case = case.map_err(|e| e.to_string())?;
        if case.label_confirmed && case.source != CaseSource::Reference {
            local += 1;
        }
    }
    Ok(local)
}

/// The adapter captures run, replaceable while the daemon serves. A
/// capture takes [`AdapterSlot::current`] once and runs that adapter to
/// its end, so none ever mixes two; the lock is held only to copy or swap
/// the pointer, never while an adapter runs.
#[derive(Default)]
pub struct AdapterSlot(RwLock<Option<Arc<Adapter>>>);

impl AdapterSlot {
    pub fn new(adapter: Option<Adapter>) -> Self {
        Self(RwLock::new(adapter.map(Arc::new)))
    }

    pub fn current(&self) -> Option<Arc<Adapter>> {
        // A panic elsewhere cannot leave a pointer half written.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn is_some(&self) -> bool {
        self.current().is_some()
    }

    /// Puts `adapter` in use from the next capture; returns the one it
    /// replaced.
    pub fn replace(&self, adapter: Adapter) -> Option<Arc<Adapter>> {
        let mut slot = self.0.write().unwrap_or_else(PoisonError::into_inner);
        slot.replace(Arc::new(adapter))
    }
}

impl From<Option<Adapter>> for AdapterSlot {
    fn from(adapter: Option<Adapter>) -> Self {
        Self::new(adapter)
    }
}

impl std::fmt::Debug for AdapterSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AdapterSlot").field(&self.current()).finish()
    }
}

/// Watches the confirmations and runs one background training at a time.
pub struct Retrainer {
    settings: RetrainSettings,
    store: Arc<CaseStore>,
    encoder_model_id: String,
    dim: usize,
    /// Confirmed local cases since the last training started.
    since: usize,
    /// Confirmed local cases in the store, counted at start and by
    /// [`Retrainer::note_confirmed`] (no store scan on the loop).
    local_total: usize,
    running: Option<(JoinHandle<()>, Receiver<RetrainOutcome>)>,
    /// Set by [`Retrainer::abandon`]; the running thread looks at it
    /// before each step that writes.
    stop: Arc<AtomicBool>,
    gate: Option<Gate>,
    /// What the ready screen says about the last training, until the next
    /// capture.
    shown: Option<String>,
}

impl Retrainer {
    /// Counts the local cases confirmed since the last training (from the
    /// store and the saved state).
    pub fn new(
        settings: RetrainSettings,
        store: Arc<CaseStore>,
        encoder_model_id: &str,
        dim: usize,
    ) -> Self {
        let (local_total, since) = if settings.retrain_after == 0 {
            (0, 0)
        } else {
            match local_confirmed(&store) {
                Ok(now) => (
                    now,
                    now.saturating_sub(read_state(&settings.dir).local_cases_at_last_training),
                ),
                Err(message) => {
                    warn!(%message, "confirmed cases not counted; counting from now");
                    (0, 0)
                }
            }
        };
        Self {
            settings,
            store,
            encoder_model_id: encoder_model_id.to_owned(),
            dim,
            since,
            local_total,
            running: None,
            stop: Arc::new(AtomicBool::new(false)),
            gate: None,
            shown: None,
        }
    }

    /// The line the ready screen shows about the last training.
    pub fn shown(&self) -> Option<&str> {
        self.shown.as_deref()
    }

    pub fn show(&mut self, line: String) {
        self.shown = Some(line);
    }

    /// A capture replaces the ready screen: the line has been seen.
    pub fn clear_shown(&mut self) {
        self.shown = None;
    }

    /// The daemon is stopping: a running training is told to stop before
    /// it changes the installed adapter, and is not waited for (it may be
    /// minutes from its end). What it has written so far is a candidate
    /// that the next training discards.
    pub fn abandon(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some((handle, _)) = self.running.take() {
            info!("the daemon stops during a retraining: it is abandoned, the installed adapter stays");
            // Detached: it ends at its next step, or with the process.
            drop(handle);
        }
    }

    /// Calls `gate` from the training thread at each [`Stage`] (tests).
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Confirmed local cases counted towards the next training.
    pub fn pending(&self) -> usize {
        self.since
    }

    /// One more local case is confirmed (and written). Starts a training
    /// when enough have accumulated and none is running; returns whether it
    /// started one.
    pub fn note_confirmed(&mut self) -> bool {
        if self.settings.retrain_after == 0 {
            return false;
        }
        self.since += 1;
        self.local_total += 1;
        if self.since < self.settings.retrain_after || self.running.is_some() {
            return false;
        }
        self.start();
        true
    }

    fn start(&mut self) {
        let (tx, rx) = mpsc::channel();
        let job = Job {
            settings: self.settings.clone(),
            store: Arc::clone(&self.store),
            encoder_model_id: self.encoder_model_id.clone(),
            dim: self.dim,
            gate: self.gate.clone(),
            stop: Arc::clone(&self.stop),
            local_total: self.local_total,
        };
        info!(
            new_cases = self.since,
            "retraining the adapter in the background"
        );
        self.since = 0;
        let spawned = std::thread::Builder::new()
            .name("retrain".into())
            .spawn(move || {
                lower_priority();
                let outcome = job.run();
                // The receiver is gone only when the daemon stopped.
                let _ = tx.send(outcome);
            });
        match spawned {
            Ok(handle) => self.running = Some((handle, rx)),
            Err(e) => warn!(error = %e, "the retraining thread could not start"),
        }
    }

    /// The finished training's outcome, once; `None` while it runs or when
    /// none ran.
    pub fn poll(&mut self) -> Option<RetrainOutcome> {
        let (_, rx) = self.running.as_ref()?;
        let outcome = match rx.try_recv() {
            Ok(outcome) => outcome,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => RetrainOutcome::Failed {
                message: "the retraining thread stopped without a result".into(),
                at_ms: now_ms(),
            },
        };
        if let Some((handle, _)) = self.running.take() {
            let _ = handle.join();
        }
        Some(outcome)
    }

    /// Waits for a running training (shutdown, tests); a kill instead
    /// leaves the installed adapter, see the module's docs.
    pub fn wait(&mut self) -> Option<RetrainOutcome> {
        let (handle, rx) = self.running.take()?;
        let outcome = rx.recv().ok();
        let _ = handle.join();
        outcome
    }
}

/// Puts a kept adapter in use: attaches its space (computed by the
/// training thread; only cases confirmed since are computed here) and
/// swaps it into `analyzer`'s slot. Called by the loop between captures,
/// so no capture searches the new space with the old adapter.
pub fn install_in(analyzer: &Analyzer, adapter: Adapter) -> Result<(), String> {
    dermascope_library::index_adapter_space(&analyzer.store, &adapter)
        .map_err(|e| e.to_string())?;
    analyzer.adapter.replace(adapter);
    Ok(())
}

/// The lowest CPU priority for this thread (Linux's nice is per thread);
/// the capture loop and the camera keep theirs.
fn lower_priority() {
    if let Err(e) = dermascope_library::training::lower_thread_priority() {
        warn!(error = %e, "retraining runs at normal priority");
    }
}

struct Job {
    settings: RetrainSettings,
    store: Arc<CaseStore>,
    encoder_model_id: String,
    dim: usize,
    gate: Option<Gate>,
    stop: Arc<AtomicBool>,
    /// The loop's count when it started this training: the baseline of the
    /// next one.
    local_total: usize,
}

/// The daemon stopped; the thread gave up.
const STOPPED: &str = "stopped with the daemon";

impl Job {
    fn pass(&self, stage: Stage) {
        if let Some(gate) = &self.gate {
            gate(stage);
        }
    }

    /// `Err` once the daemon asked the thread to stop.
    fn go_on(&self) -> Result<(), String> {
        if self.stop.load(Ordering::Relaxed) {
            self.pass(Stage::Stopped);
            return Err(STOPPED.into());
        }
        Ok(())
    }

    fn run(self) -> RetrainOutcome {
        self.pass(Stage::Started);
        let at_ms = now_ms();
        match self.train_and_decide(at_ms) {
            Ok(outcome) => outcome,
            Err(message) if message == STOPPED => {
                info!("retraining stopped with the daemon; the installed adapter stays");
                RetrainOutcome::Failed { message, at_ms }
            }
            Err(message) => {
                warn!(%message, "retraining failed; the installed adapter stays");
                RetrainOutcome::Failed { message, at_ms }
            }
        }
    }

    fn train_and_decide(&self, at_ms: u64) -> Result<RetrainOutcome, String> {
        self.go_on()?;
        let dir = &self.settings.dir;
        let candidate = candidate_dir(dir);
        if candidate.exists() {
            std::fs::remove_dir_all(&candidate)
                .map_err(|e| format!("removing the old candidate {}: {e}", candidate.display()))?;
        }
        write_state(
            dir,
            &RetrainState {
                local_cases_at_last_training: self.local_total,
            },
        );
        let cases = confirmed_cases(&self.store).map_err(|e| e.to_string())?;
        let plan = TrainingPlan::with_local(
            &cases.examples,
            &cases.local,
            &self.settings.training,
            &self.settings.local,
        )
        .map_err(|e| e.to_string())?;
        let mut compared_on = plan.local_validation_cases();
        if compared_on.is_empty() {
            compared_on = plan.validation_examples();
        }
        let (new_adapter, report) = plan.install(&candidate).map_err(|e| e.to_string())?;
        let new = ValidationFigures::of(&new_adapter, &compared_on).map_err(|e| e.to_string())?;
        compute_space(&self.store, &new_adapter)?;
        self.pass(Stage::Trained);
        self.go_on()?;

        let old_adapter = if dir.join(dermascope_adapter::MANIFEST_FILE).is_file() {
            match Adapter::load(dir, &self.encoder_model_id, self.dim) {
                Ok(adapter) => Some(adapter),
                Err(e) => {
                    warn!(error = %e, "the installed adapter does not load; replacing it");
                    None
                }
            }
        } else {
            None
        };
        let old = match &old_adapter {
            Some(adapter) => {
                Some(ValidationFigures::of(adapter, &compared_on).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let keep = old.as_ref().is_none_or(|old| new.no_worse_than(old));
        info!(
            candidate = report.adapter_id,
            installed = old_adapter.as_ref().map(|a| a.adapter_id()),
            compared_on = compared_on.len(),
            new_balanced_accuracy = new.balanced_accuracy,
            new_melanoma_recall = new.melanoma_recall,
            old_balanced_accuracy = old.as_ref().map(|o| o.balanced_accuracy),
            old_melanoma_recall = old.as_ref().and_then(|o| o.melanoma_recall),
            keep,
            "adapter retrained"
        );
        if let Some(old) = old.as_ref().filter(|_| !keep) {
            let _ = std::fs::remove_dir_all(&candidate);
            return Ok(RetrainOutcome::Rejected {
                candidate: report.adapter_id,
                new,
                old: old.clone(),
                at_ms,
            });
        }
        self.go_on()?;
        promote(&candidate, dir).map_err(|e| e.to_string())?;
        let adapter = Adapter::load(dir, &self.encoder_model_id, self.dim)
            .map_err(|e| format!("loading the promoted adapter: {e}"))?;
        info!(
            adapter = adapter.adapter_id(),
            previous = %previous_dir(dir).display(),
            "new adapter installed; the old one is kept for rollback"
        );
        Ok(RetrainOutcome::Kept {
            adapter: Box::new(adapter),
            replaced: old_adapter.map(|a| a.adapter_id().to_owned()),
            new,
            old,
            at_ms,
        })
    }
}

/// The library's embeddings in `adapter`'s space, stored (not attached),
/// so that the switch in the loop only has to load them.
fn compute_space(store: &CaseStore, adapter: &Adapter) -> Result<(), String> {
    let mut batch: Vec<(CaseId, Vec<f32>)> = Vec::with_capacity(BATCH_ROWS);
    let flush = |batch: &mut Vec<(CaseId, Vec<f32>)>| -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let outputs = adapter
            .predict_many(&batch.iter().map(|(_, e)| e.as_slice()).collect::<Vec<_>>())
            .map_err(|e| e.to_string())?;
        let rows: Vec<(CaseId, Vec<f32>)> = batch
            .drain(..)
            .zip(outputs)
            .map(|((id, _), out)| (id, out.embedding))
            .collect();
        store
            .put_adapter_embeddings(adapter.adapter_id(), &rows)
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    for case in store.cases() {
        let case = case.map_err(|e| e.to_string())?;
        batch.push((case.id, case.embedding));
        if batch.len() == BATCH_ROWS {
            flush(&mut batch)?;
        }
    }
    flush(&mut batch)
}
