//! "Trouble becomes a screen" (ARCHITECTURE.md, Invariants) for what goes
//! wrong after the camera: a search the library refuses, and a confirmed
//! capture the case writer cannot store. The daemon runs on the host
//! stand-ins with the real encoder and a real store; each test checks the
//! screen it showed against the pixels of the error it should show.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dermascope_device::{InMemoryDisplay, TriggerEvent};
use dermascope_pipeline::{Analyzer, NoSupervisor};
use dermascope_quality::QualityThresholds;
use dermascope_store::{CaseFilter, CaseStore, ScoreKind, StoreIdentity};
use dermascope_ui::Screen;
use support::{
    body_of, body_pixels, encoder, host_daemon, keep_screen, lesion, reference_case, replay_feed,
    replay_of, Step, StepTrigger, BROWN, HEIGHT, WIDTH,
};

fn analyzer(encoder: dermascope_encoder::Encoder, store: Arc<CaseStore>) -> Arc<Analyzer> {
    Arc::new(Analyzer {
        encoder,
        adapter: None.into(),
        store,
        thresholds: QualityThresholds::default(),
        top_k: 5,
        raw_score: ScoreKind::Int8,
    })
}

#[test]
fn a_failed_search_is_shown_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let encoder = encoder();
    // A library whose embeddings have another dimension than the encoder's:
    // the index refuses every query the encoder makes.
    let store = Arc::new(
        CaseStore::open(
            dir.path().join("store"),
            StoreIdentity {
                model_id: encoder.model_id().to_string(),
                embedding_dim: 16,
            },
        )
        .unwrap(),
    );
    let refusal = store
        .search(
            &vec![0.1; encoder.dim()],
            5,
            &CaseFilter::any(),
            ScoreKind::Int8,
        )
        .unwrap_err()
        .to_string();
    let replay = dir.path().join("replay");
    replay_of(&replay, &lesion(3, BROWN));
    let display = InMemoryDisplay::new(WIDTH, HEIGHT);
    let presented = display.presented();
    let trigger = StepTrigger::new(
        vec![
            Step::Press(TriggerEvent::Capture),
            // Nothing was found, so there is nothing to confirm.
            Step::Press(TriggerEvent::Confirm {
                label: Some("mel".into()),
            }),
            Step::Press(TriggerEvent::Shutdown),
        ],
        presented.clone(),
    );
    let daemon = host_daemon(
        analyzer(encoder, Arc::clone(&store)),
        replay_feed(&replay),
        Box::new(trigger),
        display,
    );
    let summary = daemon
        .run(&AtomicBool::new(false), &NoSupervisor, None)
        .expect("a failed search must not stop the daemon");

    let screens: Vec<&str> = summary.screens.iter().map(String::as_str).collect();
    assert_eq!(screens, ["ready", "capturing", "error:Could not search"]);
    assert_eq!((summary.captures, summary.confirmed), (1, 0));
    assert_eq!(store.len().unwrap(), 0, "a failed search stores nothing");
    let shown = presented.last().unwrap();
    keep_screen("failed-search", &shown.rgb);
    let expected = Screen::Error {
        title: "Could not search".into(),
        what_to_fix: format!("Restart the device; if it repeats, call service. ({refusal})"),
    };
    assert!(
        body_of(&shown.rgb) == body_pixels(&expected),
        "the screen shown is not {expected:?}"
    );
}

/// Set in the child process that runs the full-disk case: the file-size
/// limit it sets holds for the whole process, so it must not share one with
/// other tests.
const CHILD_DIR: &str = "DERMASCOPE_TROUBLE_CHILD_DIR";
const CHILD_DONE: &str = "trouble child: claim checked";
const WRITE_TEST: &str = "a_failed_case_write_is_shown_with_what_to_do";

#[test]
fn a_failed_case_write_is_shown_with_what_to_do() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        failed_write_child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", WRITE_TEST, "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    // Watchdog only: the child loads the encoder, embeds seven photographs
    // and answers one capture, well under a minute even on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("watchdog: the full-disk child ran for 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(
        status.success() && out.contains(CHILD_DONE),
        "full-disk child failed ({status}):\n{out}\n{err}"
    );
}

fn failed_write_child(dir: &Path) {
    let encoder = encoder();
    let store_dir = dir.join("store");
    let store = Arc::new(
        CaseStore::open(
            &store_dir,
            StoreIdentity {
                model_id: encoder.model_id().to_string(),
                embedding_dim: encoder.dim(),
            },
        )
        .unwrap(),
    );
    let cases: Vec<_> = ["nv", "mel", "bkl", "nv", "mel", "df"]
        .iter()
        .enumerate()
        .map(|(i, code)| {
            reference_case(
                &format!("ref-{i}"),
                code,
                &lesion(20 + i as u32, BROWN),
                &encoder,
            )
        })
        .collect();
    store.insert_batch(&cases).unwrap();
    let replay = dir.join("replay");
    replay_of(&replay, &lesion(3, BROWN));
    // From here no file may grow: the store's next write fails with EFBIG,
    // as on a full disk.
    limit_file_size(largest_file(&store_dir));

    let display = InMemoryDisplay::new(WIDTH, HEIGHT);
    let presented = display.presented();
    let trigger = StepTrigger::new(
        vec![
            Step::Press(TriggerEvent::Capture),
            Step::Press(TriggerEvent::Confirm {
                label: Some("mel".into()),
            }),
            // "Saving" at once; then the case writer fails on its own
            // thread, and the loop must say so.
            Step::AwaitScreens("saving, then capture not saved", 2),
            Step::Press(TriggerEvent::Shutdown),
        ],
        presented.clone(),
    );
    let daemon = host_daemon(
        analyzer(encoder, Arc::clone(&store)),
        replay_feed(&replay),
        Box::new(trigger),
        display,
    );
    let summary = daemon
        .run(&AtomicBool::new(false), &NoSupervisor, None)
        .expect("a failed case write must not stop the daemon");
    let screens: Vec<&str> = summary.screens.iter().map(String::as_str).collect();
    assert_eq!(
        screens,
        [
            "ready",
            "capturing",
            "results:5",
            "ready:saving",
            "error:Capture not saved"
        ]
    );
    let shown = presented.last().unwrap();
    keep_screen("failed-write", &shown.rgb);
    let expected = Screen::Error {
        title: "Capture not saved".into(),
        what_to_fix: "The device's storage is full, so this capture was not kept; earlier \
                      cases are safe. Call service to free space."
            .into(),
    };
    assert!(
        body_of(&shown.rgb) == body_pixels(&expected),
        "the screen shown is not {expected:?}"
    );
    println!("{CHILD_DONE}");
    // sled would only fail again flushing on drop; the process ends here.
    std::mem::forget(store);
}

fn largest_file(dir: &Path) -> u64 {
    let mut largest = 0;
    let mut folders: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                folders.push(entry.path());
            } else {
                largest = largest.max(meta.len());
            }
        }
    }
    largest
}

fn limit_file_size(bytes: u64) {
    // SAFETY: plain libc calls with valid arguments; the default SIGXFSZ
    // action would kill the process instead of letting write() fail.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0, "setrlimit");
    }
}
