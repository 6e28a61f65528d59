//! The handheld and the fleet service end to end: two real `dermascope run`
//! processes of one clinic syncing with the real service (started in this
//! test process, over TLS with a CA the test makes, on a real PostgreSQL).
//! A capture confirmed on device A reaches the service, device B pulls it
//! into its own library, and A's next results screen gets the fleet's
//! answer, built from that case, in the background.
//!
//! Waits are on what the processes report (log lines, rows, stored cases)
//! under a watchdog that only stops a hung test; nothing asserts on time.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dermascope_cloud::config::ServiceConfig;
use dermascope_cloud::{db, operator, server};
use support::{daemon_config, pki, synthetic_library, HostDaemon};

/// Only stops a hung test; no claim depends on it.
const WATCHDOG: Duration = Duration::from_secs(120);

fn wait_for(what: &str, done: impl FnMut() -> bool) {
    assert!(waited(done), "watchdog: {what} never happened");
}

/// Whether `done` came true before the watchdog.
fn waited(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WATCHDOG;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// `dermascope run` with its stderr collected line by line as it comes.
struct Running {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    socket: PathBuf,
}

impl Running {
    fn start(config: &Path, socket: PathBuf, library: Option<&Path>) -> Running {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dermascope"));
        command.args(["run", "--config", config.to_str().unwrap()]);
        if let Some(library) = library {
            command.arg("--cases").arg(library);
        }
        let mut child = command
            .env("DERMASCOPE_MODEL_DIR", dermascope_testkit::bundle_dir())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let running = Running { child, log, socket };
        let socket = running.socket.clone();
        wait_for("the daemon's control socket", || socket.exists());
        running
    }

    /// Log lines that contain every one of `needles`.
    fn logged(&self, needles: &[&str]) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits for a line with every one of `needles`; on the watchdog, fails
    /// showing the daemon's log.
    fn wait_logged(&self, what: &str, needles: &[&str]) {
        if !waited(|| self.logged(needles) > 0) {
            let log = self.log.lock().unwrap().join("\n");
            panic!("watchdog: {what} never happened; the daemon's log:\n{log}");
        }
    }

    fn press(&self, command: &[&str]) {
        let mut args = vec!["press", "--socket", self.socket.to_str().unwrap()];
        args.extend_from_slice(command);
        let output = Command::new(env!("CARGO_BIN_EXE_dermascope"))
            .args(&args)
            .output()
            .unwrap();
        assert!(output.status.success(), "press {command:?}: {output:?}");
    }

    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        let log = self.log.lock().unwrap().join("\n");
        assert!(status.success(), "daemon failed: {log}");
        log
    }
}

/// A host daemon's configuration with a `[sync]` section for `credential`.
fn device(dir: &Path, url: &str, ca: &Path, credential: &str) -> HostDaemon {
    std::fs::create_dir_all(dir).unwrap();
    let host = daemon_config(dir, &dir.join("cases"));
    let credential_file = dir.join("fleet.credential");
    std::fs::write(&credential_file, credential).unwrap();
    std::fs::set_permissions(&credential_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut text = std::fs::read_to_string(&host.config).unwrap();
    text.push_str(&format!(
        "[sync]\nurl = {url:?}\nca = {ca:?}\ncredential_file = {credential_file:?}\n\
         interval_s = 2\n"
    ));
    std::fs::write(&host.config, text).unwrap();
    host
}

fn model() -> (String, usize) {
    let manifest: toml::Value = toml::from_str(
        &std::fs::read_to_string(dermascope_testkit::bundle_dir().join("manifest.toml")).unwrap(),
    )
    .unwrap();
    (
        manifest["model_id"].as_str().unwrap().to_owned(),
        manifest["output"]["dim"].as_integer().unwrap() as usize,
    )
}

#[test]
fn a_confirmed_capture_reaches_the_clinic_and_the_next_answer_uses_it() {
    let Some(pg) = dermascope_testkit::postgres("fleet_end_to_end") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (ca, tls) = pki(dir.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = ServiceConfig::for_database(&pg.url);
    config.tls = Some(tls);
    let service = runtime.block_on(server::start(config)).unwrap();
    let url = service.base_url();
    assert!(url.starts_with("https://"), "{url}");
    let pool = runtime
        .block_on(db::connect(&pg.url, &Default::default()))
        .unwrap();
    let (model_id, dim) = model();
    let (a, b) = runtime.block_on(async {
        operator::add_clinic(&pool, "Hill clinic", false)
            .await
            .unwrap();
        operator::add_model(&pool, &model_id, dim).await.unwrap();
        (
            operator::add_device(&pool, "Hill clinic", "scope A")
                .await
                .unwrap(),
            operator::add_device(&pool, "Hill clinic", "scope B")
                .await
                .unwrap(),
        )
    });
    let fleet_cases = || -> i64 {
        runtime
            .block_on(sqlx::query_scalar("SELECT count(*) FROM fleet_cases").fetch_one(&pool))
            .unwrap()
    };

    // Device A has a small reference library of its own; the fleet has
    // nothing yet.
    let library = dir.path().join("library");
    std::fs::create_dir_all(&library).unwrap();
    let (labels, _) = synthetic_library(&library, 2, "REF");
    assert_eq!(labels, library.join("labels.csv"));
    let host_a = device(&dir.path().join("a"), &url, &ca, &a.credential);
    let device_a = Running::start(&host_a.config, host_a.socket.clone(), Some(&library));
    device_a.wait_logged("A's sync thread", &["fleet sync started"]);

    // A capture, confirmed by the clinician: uploaded once saved.
    device_a.press(&["capture"]);
    device_a.wait_logged("A's first results", &["capture answered"]);
    device_a.press(&["confirm", "mel"]);
    wait_for("the case on the service", || fleet_cases() == 1);

    // The next capture of the same lesion: the fleet's answer is built from
    // the confirmed case (no model is configured, so it is the cases' vote)
    // and reaches A's results screen. (The first capture's answer, from an
    // empty fleet, may or may not have been shown before the confirmation
    // replaced that screen.)
    device_a.press(&["capture"]);
    device_a.wait_logged(
        "the fleet's answer, from the confirmed case, on A",
        &["fleet answer arrived", "answered_by=Retrieval", "cases=1"],
    );
    device_a.stop();
    assert_eq!(fleet_cases(), 1, "uploaded exactly once");

    // The operator makes A's reference library the fleet's: exported from
    // A's store, imported into the service.
    let exported = dir.path().join("reference.jsonl");
    let export = Command::new(env!("CARGO_BIN_EXE_dermascope"))
        .args([
            "cases",
            "--store",
            dir.path().join("a/cases").to_str().unwrap(),
        ])
        .arg("--export-reference")
        .arg(&exported)
        .env("DERMASCOPE_MODEL_DIR", dermascope_testkit::bundle_dir())
        .output()
        .unwrap();
    assert!(export.status.success(), "{export:?}");
    let reference: Vec<dermascope_cloud_api::WireCase> = std::fs::read_to_string(&exported)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(reference.len(), 6, "the 6 reference cases, not the capture");
    runtime
        .block_on(operator::import_reference(&pool, &reference))
        .unwrap();

    // Device B, of the same clinic, with no library of its own, pulls the
    // fleet's reference library and the case, each with its source.
    let host_b = device(&dir.path().join("b"), &url, &ca, &b.credential);
    let device_b = Running::start(&host_b.config, host_b.socket.clone(), None);
    let store_b = dir.path().join("b").join("cases");
    device_b.wait_logged("B's pull", &["fleet sync done", "pulled=7"]);
    device_b.stop();
    let cases = Command::new(env!("CARGO_BIN_EXE_dermascope"))
        .args(["cases", "--store", store_b.to_str().unwrap()])
        .env("DERMASCOPE_MODEL_DIR", dermascope_testkit::bundle_dir())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&cases.stdout);
    assert!(cases.status.success(), "{cases:?}");
    let fleet_row = out
        .lines()
        .find(|l| l.starts_with("fleet"))
        .unwrap_or_else(|| panic!("no fleet cases on B: {out}"));
    assert!(fleet_row.trim_end().ends_with(" 1"), "{out}");
    let reference_row = out
        .lines()
        .find(|l| l.starts_with("reference"))
        .unwrap_or_else(|| panic!("no reference cases on B: {out}"));
    assert!(reference_row.trim_end().ends_with(" 6"), "{out}");
    assert!(out.contains("mel"), "{out}");

    runtime.block_on(service.shutdown());
}
