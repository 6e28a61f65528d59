//! Background retraining wired into the daemon's loop, on the host
//! stand-ins with the real encoder, store and training: confirmed captures
//! start it, captures are answered while the test holds the training at a
//! gate, the next capture after it runs the new adapter, the ready screen
//! says what happened, and a stop during it neither waits for it nor
//! changes the installed adapter.

mod support;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dermascope_adapter::{Adapter, TrainingConfig};
use dermascope_device::{InMemoryDisplay, PresentedScreens, Trigger, TriggerError, TriggerEvent};
use dermascope_library::{
    candidate_dir, previous_dir, LocalOptions, TrainingOptions, TrainingPlan,
};
use dermascope_pipeline::retrain::{Gate, RetrainSettings, Retrainer, Stage};
use dermascope_pipeline::{Analyzer, NoSupervisor, RunSummary};
use dermascope_quality::QualityThresholds;
use dermascope_store::{
    Case, CaseId, CaseMetadata, CaseSource, CaseStore, Diagnosis, ScoreKind, StoreIdentity,
};
use dermascope_ui::Screen;
use support::{body_of, body_pixels, encoder, host_daemon, lesion, replay_feed, replay_of, BROWN};

/// Hang watchdog only: nothing here is timed.
const WATCHDOG: Duration = Duration::from_secs(300);

fn noise(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Class `mel` (0) or `nv` (1) on its axis; the clinic's own cases come
/// from another "camera" that pushes each class towards the other's axis
/// and adds dimensions of its own, so an adapter trained on the reference
/// cases alone gets them wrong and one trained with them does not (the
/// noise is scaled so its norm is the same at any dimension).
fn embedding(class: usize, local: bool, dim: usize, state: &mut u64) -> Vec<f32> {
    let scale = 0.3 * (16.0 / dim as f32).sqrt();
    let mut v: Vec<f32> = (0..dim).map(|_| scale * noise(state)).collect();
    if local {
        v[4 + class] += 1.0;
        v[1 - class] += 0.6;
    } else {
        v[class] += 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

struct Clinic {
    root: tempfile::TempDir,
    store: Arc<CaseStore>,
    model_id: String,
    dim: usize,
    thumbnail: Vec<u8>,
    state: u64,
}

impl Clinic {
    /// A store of 80 reference cases in the encoder's identity, and an
    /// adapter trained on them alone installed and indexed.
    fn new(encoder: &dermascope_encoder::Encoder) -> (Self, Adapter) {
        let root = tempfile::tempdir().unwrap();
        let store = Arc::new(
            CaseStore::open(
                root.path().join("store"),
                StoreIdentity {
                    model_id: encoder.model_id().to_string(),
                    embedding_dim: encoder.dim(),
                },
            )
            .unwrap(),
        );
        let mut thumbnail = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut thumbnail)
            .encode_image(&image::imageops::thumbnail(&lesion(3, BROWN), 96, 72))
            .unwrap();
        let mut clinic = Self {
            root,
            store,
            model_id: encoder.model_id().to_string(),
            dim: encoder.dim(),
            thumbnail,
            state: 17,
        };
        let references: Vec<Case> = (0..80)
            .map(|i| clinic.case(&format!("ref-{i}"), i % 2, CaseSource::Reference))
            .collect();
        clinic.store.insert_batch(&references).unwrap();
        let cases = dermascope_library::confirmed_cases(&clinic.store).unwrap();
        let plan = TrainingPlan::new(&cases.examples, &training()).unwrap();
        let (adapter, _) = plan.install(&clinic.adapter_dir()).unwrap();
        dermascope_library::index_adapter_space(&clinic.store, &adapter).unwrap();
        (clinic, adapter)
    }

    fn case(&mut self, id: &str, class: usize, source: CaseSource) -> Case {
        Case {
            id: CaseId::new(id).unwrap(),
            embedding: embedding(
                class,
                source != CaseSource::Reference,
                self.dim,
                &mut self.state,
            ),
            diagnosis: Diagnosis::from_code(["mel", "nv"][class]).unwrap(),
            source,
            metadata: CaseMetadata::default(),
            thumbnail_jpeg: self.thumbnail.clone(),
            model_id: self.model_id.clone(),
            created_at_ms: 1,
            updated_at_ms: 1,
            label_confirmed: true,
            device_id: None,
            revision: 1,
        }
    }

    /// Cases the clinic confirmed before this daemon started counting
    /// (another start's, counted at an earlier training): they are trained
    /// on, and do not count towards `retrain_after`.
    fn earlier_local_cases(&mut self, n: usize) {
        let cases: Vec<Case> = (0..n)
            .map(|i| self.case(&format!("earlier-{i}"), i % 2, CaseSource::Captured))
            .collect();
        self.store.insert_batch(&cases).unwrap();
    }

    fn adapter_dir(&self) -> std::path::PathBuf {
        self.root.path().join("adapter")
    }

    fn installed(&self) -> String {
        Adapter::load(&self.adapter_dir(), &self.model_id, self.dim)
            .unwrap()
            .adapter_id()
            .to_owned()
    }

    fn retrainer(&self, retrain_after: usize, gate: Gate) -> Retrainer {
        let settings = RetrainSettings {
            dir: self.adapter_dir(),
            retrain_after,
            training: training(),
            local: LocalOptions {
                weight: 3.0,
                validation_fraction: 0.3,
            },
        };
        Retrainer::new(settings, Arc::clone(&self.store), &self.model_id, self.dim).with_gate(gate)
    }
}

fn training() -> TrainingOptions {
    TrainingOptions {
        config: TrainingConfig {
            hidden: 8,
            max_epochs: 10,
            learning_rate: 3e-3,
            batch_size: 16,
            min_cases_per_class: 5,
            ..TrainingConfig::default()
        },
        validation_fraction: 0.25,
    }
}

/// What the training thread told the test through the gate.
struct GateEvents {
    /// The thread is at `Stage::Started`, waiting to be let through.
    reached: Mutex<mpsc::Receiver<()>>,
    open: Mutex<mpsc::Sender<()>>,
    /// Set when the thread left the gate, and whether the test opened it
    /// (else the watchdog did).
    left: Arc<Mutex<Option<bool>>>,
    /// The later stages the thread passed: `Trained` (it went on) or
    /// `Stopped` (it gave up because the daemon stopped).
    later: Mutex<mpsc::Receiver<Stage>>,
}

/// A gate that holds the training at its start until the test opens it.
fn held_gate() -> (Gate, Arc<GateEvents>) {
    let (reached_tx, reached_rx) = mpsc::channel();
    let (open_tx, open_rx) = mpsc::channel::<()>();
    let (later_tx, later_rx) = mpsc::channel();
    let left = Arc::new(Mutex::new(None));
    let thread_side = (
        Mutex::new(reached_tx),
        Mutex::new(open_rx),
        Mutex::new(later_tx),
        Arc::clone(&left),
    );
    let gate: Gate = Arc::new(move |stage| {
        let (reached, open, later, left) = &thread_side;
        match stage {
            Stage::Started => {
                let _ = reached.lock().unwrap().send(());
                let opened = open.lock().unwrap().recv_timeout(WATCHDOG).is_ok();
                *left.lock().unwrap() = Some(opened);
            }
            Stage::Trained | Stage::Stopped => {
                let _ = later.lock().unwrap().send(stage);
            }
        }
    });
    let events = GateEvents {
        reached: Mutex::new(reached_rx),
        open: Mutex::new(open_tx),
        left,
        later: Mutex::new(later_rx),
    };
    (gate, Arc::new(events))
}

type Check = Box<dyn FnMut(&PresentedScreens) -> bool + Send>;

/// One step of the button's script.
enum Step {
    Press(TriggerEvent),
    /// Wait for this many screens after the last press.
    Screens(&'static str, u64),
    /// Wait until the check holds (looked at on every tick of the loop).
    Until(&'static str, Check),
}

/// A scripted button that waits for what the daemon and the training
/// thread do, never for a guessed time.
struct Script {
    steps: VecDeque<Step>,
    presented: PresentedScreens,
    shown_at_last_press: u64,
    waiting_since: Option<Instant>,
}

impl Script {
    fn new(steps: Vec<Step>, presented: PresentedScreens) -> Self {
        Self {
            steps: steps.into(),
            shown_at_last_press: presented.count(),
            presented,
            waiting_since: None,
        }
    }
}

impl Trigger for Script {
    fn wait(&mut self, timeout: Duration) -> Result<Option<TriggerEvent>, TriggerError> {
        loop {
            let (what, done) = match self.steps.front_mut() {
                None => {
                    std::thread::sleep(timeout);
                    return Ok(None);
                }
                Some(Step::Press(_)) => {
                    let Some(Step::Press(event)) = self.steps.pop_front() else {
                        unreachable!()
                    };
                    self.shown_at_last_press = self.presented.count();
                    return Ok(Some(event));
                }
                Some(Step::Screens(what, n)) => (
                    *what,
                    self.presented.count() >= self.shown_at_last_press + *n,
                ),
                Some(Step::Until(what, check)) => (*what, check(&self.presented)),
            };
            if done {
                self.steps.pop_front();
                self.waiting_since = None;
                continue;
            }
            let since = *self.waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() > WATCHDOG {
                return Err(TriggerError::Closed {
                    reason: format!("watchdog: still waiting for {what}"),
                });
            }
            // Back to the loop, which polls the writer and the retraining.
            std::thread::sleep(timeout.min(Duration::from_millis(10)));
            return Ok(None);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The ready screen's body with the retraining's line for each minute
/// from `since_ms` to now (the outcome is stamped when training starts).
fn ready_with_outcome(since_ms: u64, words: &str) -> Vec<Vec<u8>> {
    (since_ms / 60_000..=now_ms() / 60_000)
        .map(|minute| {
            let hint = format!(
                "Retrained {:02}:{:02} UTC: {words}. Press to capture.",
                (minute / 60) % 24,
                minute % 60
            );
            body_pixels(&Screen::Ready { live: None, hint })
        })
        .collect()
}

fn capture_and_confirm() -> Vec<Step> {
    vec![
        Step::Press(TriggerEvent::Capture),
        Step::Screens("capturing, then results", 2),
        Step::Press(TriggerEvent::Confirm {
            label: Some("mel".into()),
        }),
        Step::Screens("saving, then saved", 2),
    ]
}

fn run(
    clinic: &Clinic,
    adapter: Adapter,
    retrainer: Retrainer,
    steps: Vec<Step>,
    presented_display: InMemoryDisplay,
    replay: &Path,
) -> RunSummary {
    let analyzer = Arc::new(Analyzer {
        encoder: encoder(),
        adapter: Some(adapter).into(),
        store: Arc::clone(&clinic.store),
        thresholds: QualityThresholds::default(),
        top_k: 5,
        raw_score: ScoreKind::Int8,
    });
    let presented = presented_display.presented();
    let mut daemon = host_daemon(
        analyzer,
        replay_feed(replay),
        Box::new(Script::new(steps, presented)),
        presented_display,
    );
    daemon.retrainer = Some(retrainer);
    daemon
        .run(&AtomicBool::new(false), &NoSupervisor, None)
        .expect("the daemon ran its script")
}

/// Two confirmations start the training; the test holds it at its start
/// while a third capture is answered and confirmed; once let through, the
/// kept adapter is used by the next capture and the ready screen says so.
#[test]
fn confirmed_captures_retrain_in_the_background_and_the_next_capture_uses_the_new_adapter() {
    let encoder = encoder();
    let (mut clinic, old) = Clinic::new(&encoder);
    let old_id = old.adapter_id().to_owned();
    let (gate, events) = held_gate();
    let retrainer = clinic.retrainer(2, gate);
    clinic.earlier_local_cases(48);
    let replay = clinic.root.path().join("replay");
    replay_of(&replay, &lesion(0, BROWN));

    let released_at = Arc::new(AtomicU64::new(0));
    let mut steps = capture_and_confirm();
    steps.extend(capture_and_confirm());
    let reached = Arc::clone(&events);
    steps.push(Step::Until(
        "the training to start after the second confirmation",
        Box::new(move |_| reached.reached.lock().unwrap().try_recv().is_ok()),
    ));
    // Held at the gate: this capture must be answered all the same, with
    // the old adapter.
    steps.extend(capture_and_confirm());
    let (open, released) = (Arc::clone(&events), Arc::clone(&released_at));
    steps.push(Step::Until(
        "the gate to open",
        Box::new(move |_| {
            released.store(now_ms(), Ordering::SeqCst);
            open.open.lock().unwrap().send(()).is_ok()
        }),
    ));
    let since = Arc::clone(&released_at);
    steps.push(Step::Until(
        "the ready screen saying the new adapter is in use",
        Box::new(move |presented| {
            presented.last().is_some_and(|screen| {
                let body = body_of(&screen.rgb);
                ready_with_outcome(since.load(Ordering::SeqCst), "new adapter in use")
                    .contains(&body)
            })
        }),
    ));
    steps.push(Step::Press(TriggerEvent::Capture));
    steps.push(Step::Screens("capturing, then results", 2));
    steps.push(Step::Press(TriggerEvent::Shutdown));

    let display = InMemoryDisplay::new(support::WIDTH, support::HEIGHT);
    let summary = run(&clinic, old, retrainer, steps, display, &replay);

    assert_eq!(
        *events.left.lock().unwrap(),
        Some(true),
        "the test opened the gate"
    );
    let new_id = clinic.installed();
    assert_ne!(new_id, old_id, "a new adapter is installed");
    let ran: Vec<Option<&str>> = summary.adapters.iter().map(Option::as_deref).collect();
    assert_eq!(
        ran,
        [
            Some(old_id.as_str()),
            Some(old_id.as_str()),
            // Answered while the training was held.
            Some(old_id.as_str()),
            Some(new_id.as_str()),
        ],
        "the adapter each capture ran"
    );
    assert_eq!(summary.saved, 3);
    assert_eq!(clinic.store.len().unwrap(), 80 + 48 + 3);
    // The old adapter is kept for rollback; no candidate is left.
    let kept = Adapter::load(
        &previous_dir(&clinic.adapter_dir()),
        &clinic.model_id,
        clinic.dim,
    )
    .unwrap();
    assert_eq!(kept.adapter_id(), old_id);
    assert!(!candidate_dir(&clinic.adapter_dir()).exists());
    // The case confirmed during the training is searchable in the new
    // adapter's space (computed by the thread, or at the switch).
    let status = clinic
        .store
        .attach_adapter_space(&new_id, kept.hidden())
        .unwrap();
    assert!(
        status.missing.is_empty(),
        "{} cases missing from the new space",
        status.missing.len()
    );
}

/// A shutdown while the training is held: the daemon stops without
/// waiting for it, and the thread, once let go, gives up without touching
/// the installed adapter.
#[test]
fn a_stop_during_retraining_does_not_wait_and_keeps_the_installed_adapter() {
    let encoder = encoder();
    let (mut clinic, old) = Clinic::new(&encoder);
    let old_id = old.adapter_id().to_owned();
    let (gate, events) = held_gate();
    let retrainer = clinic.retrainer(1, gate);
    clinic.earlier_local_cases(48);
    let replay = clinic.root.path().join("replay");
    replay_of(&replay, &lesion(0, BROWN));

    let mut steps = capture_and_confirm();
    let reached = Arc::clone(&events);
    steps.push(Step::Until(
        "the training to start",
        Box::new(move |_| reached.reached.lock().unwrap().try_recv().is_ok()),
    ));
    steps.push(Step::Press(TriggerEvent::Shutdown));
    let display = InMemoryDisplay::new(support::WIDTH, support::HEIGHT);
    let summary = run(&clinic, old, retrainer, steps, display, &replay);

    // Still held: the stop did not wait for the training (had it waited,
    // only the gate's watchdog would have let the thread go on).
    assert_eq!(
        *events.left.lock().unwrap(),
        None,
        "the stop waited for the training"
    );
    assert_eq!(summary.saved, 1);
    events.open.lock().unwrap().send(()).unwrap();
    let next = events
        .later
        .lock()
        .unwrap()
        .recv_timeout(WATCHDOG)
        .expect("the training thread went on (watchdog)");
    assert_eq!(
        next,
        Stage::Stopped,
        "the thread gave up after the stop instead of training"
    );
    assert_eq!(clinic.installed(), old_id);
    assert!(!previous_dir(&clinic.adapter_dir()).exists());
}
