//! Background retraining (`retrain.rs`) with the real case store and the
//! real adapter training, on small synthetic embeddings: it starts after N
//! confirmations, never makes its caller wait (a gate the test holds stands
//! in for a long training), installs a better adapter and keeps the old one,
//! refuses a worse one, and a kill mid-training leaves a loadable adapter.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dermascope_adapter::{Adapter, TrainingConfig};
use dermascope_library::{
    candidate_dir, previous_dir, rollback, LocalOptions, TrainingOptions, TrainingPlan,
};
use dermascope_pipeline::retrain::{RetrainOutcome, RetrainSettings, Retrainer, Stage};
use dermascope_store::{
    Case, CaseId, CaseMetadata, CaseSource, CaseStore, Diagnosis, StoreIdentity,
};

const DIM: usize = 16;
const ENCODER: &str = "test-encoder";
/// Hang watchdog only: nothing is timed.
const WATCHDOG: Duration = Duration::from_secs(120);

fn noise(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Class `mel` or `nv` on its axis; `local` cases come from another
/// "camera" that pushes each class towards the other's axis and adds its
/// own dimensions, so an adapter learns them only from local cases.
fn embedding(class: usize, local: bool, state: &mut u64) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIM).map(|_| 0.3 * noise(state)).collect();
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

fn case(id: &str, class: usize, source: CaseSource, state: &mut u64) -> Case {
    Case {
        id: CaseId::new(id).unwrap(),
        embedding: embedding(class, source != CaseSource::Reference, state),
        diagnosis: Diagnosis::from_code(["mel", "nv"][class]).unwrap(),
        source,
        metadata: CaseMetadata::default(),
        thumbnail_jpeg: vec![0xFF, 0xD8, 0xFF, 0xD9],
        model_id: ENCODER.into(),
        created_at_ms: 1,
        updated_at_ms: 1,
        label_confirmed: true,
        device_id: None,
        revision: 1,
    }
}

fn open(dir: &Path) -> Arc<CaseStore> {
    Arc::new(
        CaseStore::open(
            dir,
            StoreIdentity {
                model_id: ENCODER.into(),
                embedding_dim: DIM,
            },
        )
        .unwrap(),
    )
}

struct Clinic {
    root: tempfile::TempDir,
    store: Arc<CaseStore>,
    state: u64,
    captured: usize,
}

impl Clinic {
    /// A store with 80 reference cases.
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let store = open(&root.path().join("store"));
        let mut state = 17;
        let cases: Vec<Case> = (0..80)
            .map(|i| {
                case(
                    &format!("ref-{i}"),
                    i % 2,
                    CaseSource::Reference,
                    &mut state,
                )
            })
            .collect();
        store.insert_batch(&cases).unwrap();
        Self {
            root,
            store,
            state,
            captured: 0,
        }
    }

    fn adapter_dir(&self) -> PathBuf {
        self.root.path().join("adapter")
    }

    /// One confirmed capture, as the case writer stores it.
    fn confirm(&mut self) {
        let i = self.captured;
        self.captured += 1;
        let c = case(
            &format!("cap-{i}"),
            i % 2,
            CaseSource::Captured,
            &mut self.state,
        );
        self.store.insert_batch(&[c]).unwrap();
    }

    fn confirm_many(&mut self, n: usize) {
        for _ in 0..n {
            self.confirm();
        }
    }

    fn settings(&self, retrain_after: usize) -> RetrainSettings {
        RetrainSettings {
            dir: self.adapter_dir(),
            retrain_after,
            training: training(),
            local: LocalOptions {
                weight: 3.0,
                validation_fraction: 0.3,
            },
        }
    }

    fn retrainer(&self, settings: RetrainSettings) -> Retrainer {
        Retrainer::new(settings, Arc::clone(&self.store), ENCODER, DIM)
    }

    /// Installs an adapter trained on the store's cases as they are now,
    /// the way `dermascope adapter train` would (`local` = with the local
    /// cases flagged and weighted, else all as reference cases).
    fn install_adapter(&self, options: &TrainingOptions, with_local: bool) -> String {
        let cases = dermascope_library::confirmed_cases(&self.store).unwrap();
        let local = if with_local {
            cases.local.clone()
        } else {
            vec![false; cases.examples.len()]
        };
        let examples: Vec<_> = if with_local {
            cases.examples.clone()
        } else {
            cases
                .examples
                .iter()
                .zip(&cases.local)
                .filter(|(_, &l)| !l)
                .map(|(e, _)| e.clone())
                .collect()
        };
        let local: Vec<bool> = local.into_iter().take(examples.len()).collect();
        let plan =
            TrainingPlan::with_local(&examples, &local, options, &self.settings(1).local).unwrap();
        let (adapter, _) = plan.install(&self.adapter_dir()).unwrap();
        adapter.adapter_id().to_owned()
    }

    fn installed(&self) -> String {
        Adapter::load(&self.adapter_dir(), ENCODER, DIM)
            .unwrap()
            .adapter_id()
            .to_owned()
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

/// Runs the retrainer's confirmations until one starts a training.
fn confirm_until_started(clinic: &mut Clinic, retrainer: &mut Retrainer, n: usize) {
    for i in 1..=n {
        clinic.confirm();
        let started = retrainer.note_confirmed();
        assert_eq!(started, i == n, "confirmation {i} of {n}");
    }
}

/// A gate the test opens: the training thread waits at `stage` until the
/// test sends on the returned sender, and says when it got there.
fn gate_at(
    stage: Stage,
) -> (
    dermascope_pipeline::retrain::Gate,
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
) {
    let (reached_tx, reached_rx) = mpsc::channel();
    let (open_tx, open_rx) = mpsc::channel::<()>();
    let open_rx = Mutex::new(open_rx);
    let reached_tx = Mutex::new(reached_tx);
    let gate: dermascope_pipeline::retrain::Gate = Arc::new(move |at| {
        if at == stage {
            let _ = reached_tx.lock().unwrap().send(());
            let _ = open_rx.lock().unwrap().recv_timeout(WATCHDOG);
        }
    });
    (gate, reached_rx, open_tx)
}

#[test]
fn retraining_starts_after_n_confirmations_and_never_makes_capture_wait() {
    let mut clinic = Clinic::new();
    let (gate, reached, open) = gate_at(Stage::Started);
    let mut retrainer = clinic.retrainer(clinic.settings(6)).with_gate(gate);
    confirm_until_started(&mut clinic, &mut retrainer, 6);
    assert!(retrainer.is_running());
    reached
        .recv_timeout(WATCHDOG)
        .expect("training thread started (watchdog)");

    // The training is held at the gate: the loop's calls return at once,
    // captures keep being confirmed and stored, and no second training
    // starts however many accumulate.
    for _ in 0..8 {
        assert!(retrainer.poll().is_none());
        clinic.confirm();
        assert!(!retrainer.note_confirmed(), "one training at a time");
    }
    assert_eq!(retrainer.pending(), 8);
    assert_eq!(clinic.store.len().unwrap(), 80 + 14);

    open.send(()).unwrap();
    let outcome = retrainer.wait().expect("an outcome");
    let RetrainOutcome::Kept {
        adapter, replaced, ..
    } = &outcome
    else {
        panic!("no adapter was installed, so the first one is kept");
    };
    assert_eq!(replaced, &None);
    assert_eq!(clinic.installed(), adapter.adapter_id());
    assert!(outcome.status_line().contains("new adapter in use"));
    assert!(!retrainer.is_running());

    // The count survives a restart: 8 were confirmed after the training
    // started, so at 12 a new daemon starts the next one after 4 more.
    let mut restarted = clinic.retrainer(clinic.settings(12));
    assert_eq!(restarted.pending(), 8);
    confirm_until_started(&mut clinic, &mut restarted, 4);
    assert!(restarted.wait().is_some());
}

#[test]
fn a_better_adapter_is_installed_its_space_computed_and_the_old_one_kept() {
    let mut clinic = Clinic::new();
    clinic.confirm_many(50);
    // Trained before the clinic's cases counted: poor on their "camera".
    let old = clinic.install_adapter(&training(), false);
    let mut retrainer = clinic.retrainer(clinic.settings(1));
    confirm_until_started(&mut clinic, &mut retrainer, 1);
    let outcome = retrainer.wait().expect("an outcome");
    let RetrainOutcome::Kept {
        adapter,
        replaced,
        new,
        old: old_figures,
        ..
    } = outcome
    else {
        panic!("the adapter trained on local cases was not kept");
    };
    let old_figures = old_figures.expect("compared with the installed adapter");
    assert!(
        new.balanced_accuracy > old_figures.balanced_accuracy,
        "{new:?} vs {old_figures:?}"
    );
    assert_eq!(replaced.as_deref(), Some(old.as_str()));
    assert_eq!(clinic.installed(), adapter.adapter_id());
    assert!(!candidate_dir(&clinic.adapter_dir()).exists());
    let kept = Adapter::load(&previous_dir(&clinic.adapter_dir()), ENCODER, DIM).unwrap();
    assert_eq!(kept.adapter_id(), old);

    // The training thread computed the new space: attaching it finds
    // every case already embedded.
    let status = clinic
        .store
        .attach_adapter_space(adapter.adapter_id(), adapter.hidden())
        .unwrap();
    assert!(
        status.missing.is_empty(),
        "{} missing",
        status.missing.len()
    );
    assert_eq!(status.indexed, clinic.store.len().unwrap());

    rollback(&clinic.adapter_dir()).unwrap();
    assert_eq!(clinic.installed(), old);
}

#[test]
fn a_worse_adapter_is_not_installed() {
    let mut clinic = Clinic::new();
    clinic.confirm_many(50);
    let old = clinic.install_adapter(&training(), true);
    // One epoch at a learning rate that barely moves the weights: a
    // candidate worse on the local cases than the installed adapter.
    let mut settings = clinic.settings(1);
    settings.training.config.max_epochs = 1;
    settings.training.config.learning_rate = 1e-7;
    let mut retrainer = clinic.retrainer(settings);
    confirm_until_started(&mut clinic, &mut retrainer, 1);
    let outcome = retrainer.wait().expect("an outcome");
    let RetrainOutcome::Rejected {
        new, old: figures, ..
    } = &outcome
    else {
        panic!("the worse adapter was installed");
    };
    assert!(!new.no_worse_than(figures), "{new:?} vs {figures:?}");
    assert!(outcome.status_line().contains("kept the old adapter"));
    assert_eq!(clinic.installed(), old);
    assert!(!candidate_dir(&clinic.adapter_dir()).exists());
    assert!(!previous_dir(&clinic.adapter_dir()).exists());
}

#[test]
fn zero_turns_retraining_off() {
    let mut clinic = Clinic::new();
    let mut retrainer = clinic.retrainer(clinic.settings(0));
    for _ in 0..30 {
        clinic.confirm();
        assert!(!retrainer.note_confirmed());
    }
    assert!(!retrainer.is_running());
}

/// Set by the kill test for the child process it kills.
const CHILD_ENV: &str = "DERMASCOPE_RETRAIN_KILL_CHILD";

/// Not a test of its own: the process the kill test runs and kills. It
/// trains, and stops at the gate after the candidate is written, where
/// it says so by creating `ready` and waits to be killed.
#[test]
fn kill_test_child() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let root = PathBuf::from(root);
    let store = open(&root.join("store"));
    let ready = root.join("ready");
    let gate: dermascope_pipeline::retrain::Gate = Arc::new(move |stage| {
        if stage == Stage::Trained {
            std::fs::write(&ready, b"").unwrap();
            std::thread::sleep(WATCHDOG);
        }
    });
    let settings = RetrainSettings {
        dir: root.join("adapter"),
        retrain_after: 1,
        training: training(),
        local: LocalOptions::default(),
    };
    let mut retrainer = Retrainer::new(settings, store, ENCODER, DIM).with_gate(gate);
    retrainer.note_confirmed();
    retrainer.wait();
    panic!("the child was not killed at the gate");
}

#[test]
fn a_kill_mid_training_leaves_the_installed_adapter_loadable() {
    let mut clinic = Clinic::new();
    clinic.confirm_many(40);
    let old = clinic.install_adapter(&training(), false);
    let root = clinic.root.path().to_path_buf();
    // The child opens the store: sled allows one process at a time.
    let Clinic {
        root: keep, store, ..
    } = clinic;
    drop(store);

    // Through the test runner: under qemu-user the kernel cannot exec an
    // aarch64 program itself.
    let mut child = dermascope_testkit::command(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "kill_test_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &root)
        .spawn()
        .unwrap();
    let ready = root.join("ready");
    let waited = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            waited.elapsed() < WATCHDOG,
            "watchdog: the child never reached the gate"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the child stopped before the gate: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // Killed with a complete candidate beside it: the installed adapter is
    // the old one and loads.
    let dir = root.join("adapter");
    assert!(candidate_dir(&dir).exists());
    assert_eq!(Adapter::load(&dir, ENCODER, DIM).unwrap().adapter_id(), old);

    // The next training discards the leftover and finishes.
    let store = open(&root.join("store"));
    let mut retrainer = Retrainer::new(
        RetrainSettings {
            dir: dir.clone(),
            retrain_after: 1,
            training: training(),
            local: LocalOptions::default(),
        },
        store,
        ENCODER,
        DIM,
    );
    retrainer.note_confirmed();
    assert!(retrainer.wait().is_some());
    assert!(!candidate_dir(&dir).exists());
    assert!(Adapter::load(&dir, ENCODER, DIM).is_ok());
    drop(keep);
}
