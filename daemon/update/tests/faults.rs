//! An install killed or starved of disk at any point leaves the device
//! starting into the complete old version or the complete new one.
//!
//! Runs with its own `main` (harness = false): the same binary is
//! re-executed as an installing child (selected by `DERMASCOPE_UPDATE_CHILD`)
//! that reports each step of the install on stdout. The parent SIGKILLs it
//! as soon as it reads the step a seed picked, so the kill lands at or just
//! after that step (the child keeps running until the signal arrives),
//! never after a wall-clock delay. After each kill the parent checks what a
//! start would see: `current` names a version whose every file re-hashes to
//! its record (nothing extra, nothing missing), before and after
//! `recover()`, and the interrupted bundle can be installed afterwards.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::*;
use dermascope_update::{
    verify_version, HealthCheck, InstallOptions, InstalledVersion, NoPreparation, Recovery, Step,
};

const ROLE: &str = "DERMASCOPE_UPDATE_CHILD";
const ROOT: &str = "DERMASCOPE_UPDATE_ROOT";
const KEYS: &str = "DERMASCOPE_UPDATE_KEYS";
const BUNDLE: &str = "DERMASCOPE_UPDATE_BUNDLE";
/// Kills that must land (10 seeds x 3 phases at least).
const KILLS: usize = 30;
/// Watchdog on the loop, not a measurement: a run whose child finished
/// before its kill landed (a kill at `committed` can be late) is not
/// counted, so the loop runs more seeds, up to this many runs.
const MAX_RUNS: u64 = 3 * KILLS as u64;
/// Watchdog, not a measurement: a child silent this long has hung.
const SILENCE_WATCHDOG: Duration = Duration::from_secs(120);
/// The encoder files of version 2: large enough that a copy and its fsync
/// take a while, so kills land inside them.
const ENCODER_FILE: usize = 1 << 20;

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("install") => child(false),
        Ok("fsize") => child(true),
        _ => parent(),
    }
}

type TestFn = fn() -> Result<(), String>;

fn parent() {
    let tests: [(&str, TestFn); 2] = [
        (
            "sigkill_at_any_step_leaves_the_old_or_the_new_version_whole",
            kill_test,
        ),
        (
            "a_full_disk_while_unpacking_leaves_the_old_version_current",
            full_disk_test,
        ),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        match test() {
            Ok(()) => {
                passed += 1;
                println!(
                    "test {name} ... ok ({:.1} s)",
                    started.elapsed().as_secs_f64()
                )
            }
            Err(why) => {
                failed += 1;
                println!("test {name} ... FAILED: {why}");
            }
        }
    }
    println!();
    println!(
        "test result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 {
        std::process::exit(101);
    }
}

/// The child's health check: says it started, then re-hashes the version
/// (real work, so a kill can land inside it).
struct ReportingCheck;
impl HealthCheck for ReportingCheck {
    fn check(&self, version: &InstalledVersion) -> Result<(), String> {
        report("checking");
        verify_version(&version.dir).map_err(|e| e.to_string())?;
        Ok(())
    }
}

fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe means the parent is gone: stop rather than go on.
    if writeln!(out, "step {line}")
        .and_then(|_| out.flush())
        .is_err()
    {
        std::process::exit(3);
    }
}

fn child(limit_file_size: bool) {
    let var = |k| PathBuf::from(std::env::var_os(k).expect("the parent sets it"));
    if limit_file_size {
        // SAFETY: plain libc calls with valid arguments. SIGXFSZ ignored so
        // the write fails with EFBIG (as on a full disk) instead of killing.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: (ENCODER_FILE / 2) as libc::rlim_t,
                rlim_max: (ENCODER_FILE / 2) as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                println!("done setrlimit failed");
                std::process::exit(2);
            }
        }
    }
    let installer = installer(&var(ROOT), &var(KEYS));
    let progress = |s: Step| report(&s.to_string());
    let result = installer.install(
        &var(BUNDLE),
        &InstallOptions {
            retry_failed: false,
            prepare: &NoPreparation,
            health: &ReportingCheck,
            progress: &progress,
        },
    );
    match result {
        Ok(r) => println!("done ok {}", r.version),
        Err(e) => println!("done err {e}"),
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    keys: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
    a: Key,
}

/// Version 1: encoder enc-a, adapter, library, config. Version 2: a new
/// encoder (enc-b, 2 x 1 MiB) and adapter; the config is carried forward
/// by hard link and the enc-a library dropped.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    let a = key(&base.join("op"), "a");
    let keys = trusted_dir(&base.join("keys"), &[&a]);
    let v1 = bundle(&base.join("b1"), &full("enc-a", 1), 1, &a);
    let v2 = bundle(
        &base.join("b2"),
        &Contents {
            encoder: Some(("enc-b".into(), ENCODER_FILE)),
            adapter: Some(("enc-b".into(), 64 * 1024)),
            seed: 2,
            ..Contents::default()
        },
        2,
        &a,
    );
    Setup {
        _tmp: tmp,
        base,
        keys,
        v1,
        v2,
        a,
    }
}

/// A device root with version 1 installed.
fn device(s: &Setup, name: &str) -> PathBuf {
    let root = s.base.join(name);
    install(&installer(&root, &s.keys), &s.v1, &FakeCheck::pass()).unwrap();
    root
}

fn spawn(role: &str, root: &Path, s: &Setup) -> Result<std::process::Child, String> {
    dermascope_testkit::command(std::env::current_exe().map_err(|e| e.to_string())?)
        .env(ROLE, role)
        .env(ROOT, root)
        .env(KEYS, &s.keys)
        .env(BUNDLE, &s.v2)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn the child: {e}"))
}

fn lines(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// What a start sees: `current` names a complete version (re-hashed).
fn complete_current(root: &Path) -> Result<u64, String> {
    let version = dermascope_update::current_version_at(root)
        .map_err(|e| e.to_string())?
        .ok_or("no current version")?;
    let record = verify_version(&root.join("current")).map_err(|e| format!("{e}"))?;
    if record.version != version {
        return Err(format!(
            "current names version {version} but holds {}",
            record.version
        ));
    }
    if version != 1 && version != 2 {
        return Err(format!("current is version {version}"));
    }
    Ok(version)
}

#[derive(Default, Debug)]
struct Tally {
    runs: usize,
    killed: usize,
    finished_first: usize,
    old_before_recovery: usize,
    new_before_recovery: usize,
    abandoned: usize,
    rolled_back: usize,
    old_after: usize,
    new_after: usize,
}

fn kill_test() -> Result<(), String> {
    let s = setup();
    let switch_steps = ["staged", "prepared", "trial recorded", "switched"];
    let check_steps = ["checking", "health check passed", "committed"];
    let mut tally = Tally::default();
    let mut run: u64 = 0;
    while tally.killed < KILLS && run < MAX_RUNS {
        let (seed, phase) = (run / 3, run % 3);
        run += 1;
        let mut rng = seed * 7919 + phase * 104_729 + 17;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // 6 files land in version 2: 3 encoder, 2 adapter, 1 config.
        let target = match phase {
            0 => format!("step copied {}/", 1 + next() % 6),
            1 => format!("step {}", switch_steps[(next() % 4) as usize]),
            _ => format!("step {}", check_steps[(next() % 3) as usize]),
        };
        let root = device(&s, &format!("kill-{seed}-{phase}"));
        one_kill(&s, &root, &target, &mut tally)
            .map_err(|e| format!("seed {seed} phase {phase} ({target}): {e}"))?;
    }
    println!(
        "figures: {} runs, {} killed at their step ({} finished before the kill); before recovery: {} old, {} new; recovery: {} abandoned before the switch, {} switched back (interrupted check); a start then runs: {} old, {} new; every one re-hashed whole",
        tally.runs,
        tally.killed,
        tally.finished_first,
        tally.old_before_recovery,
        tally.new_before_recovery,
        tally.abandoned,
        tally.rolled_back,
        tally.old_after,
        tally.new_after
    );
    if tally.killed < KILLS {
        return Err(format!("only {} kills landed", tally.killed));
    }
    Ok(())
}

fn one_kill(s: &Setup, root: &Path, target: &str, tally: &mut Tally) -> Result<(), String> {
    let mut child = spawn("install", root, s)?;
    let rx = lines(&mut child);
    let mut killed = false;
    loop {
        match rx.recv_timeout(SILENCE_WATCHDOG) {
            Ok(line) if line.starts_with(target) => {
                child.kill().map_err(|e| format!("kill: {e}"))?;
                killed = true;
                break;
            }
            Ok(line) if line.starts_with("done") => {
                if !line.starts_with("done ok") {
                    return Err(format!("the install failed on its own: {line}"));
                }
                break;
            }
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                return Err("watchdog: the child went silent".into());
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(format!("the child ended without reaching {target:?}"))
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    tally.runs += 1;
    if killed && status.signal() == Some(libc::SIGKILL) {
        tally.killed += 1;
    } else {
        tally.finished_first += 1;
    }
    match complete_current(root)? {
        1 => tally.old_before_recovery += 1,
        _ => tally.new_before_recovery += 1,
    }
    let i = installer(root, &s.keys);
    let recovery = i.recover().map_err(|e| format!("recover: {e}"))?;
    let after = complete_current(root)?;
    let st = i.status().map_err(|e| e.to_string())?;
    if st.trial_pending.is_some() {
        return Err("a trial is still pending after recovery".into());
    }
    match recovery {
        None => {}
        Some(Recovery::Abandoned { .. }) => tally.abandoned += 1,
        Some(Recovery::RolledBack { back_to, .. }) => {
            tally.rolled_back += 1;
            if back_to != Some(1) || after != 1 {
                return Err(format!("rolled back to {back_to:?}, current {after}"));
            }
            if !st.failed.iter().any(|f| f.version == 2) {
                return Err("an interrupted check did not mark the bundle failed".into());
            }
        }
    }
    match after {
        1 => tally.old_after += 1,
        _ => {
            tally.new_after += 1;
            if st.floor != 2 || st.previous != Some(1) {
                return Err(format!(
                    "version 2 is current but uncommitted (floor {}, previous {:?})",
                    st.floor, st.previous
                ));
            }
        }
    }
    // And the device can take the update afterwards (by hand if the
    // interrupted check marked it failed).
    if after == 1 {
        i.install(
            &s.v2,
            &InstallOptions {
                retry_failed: true,
                prepare: &NoPreparation,
                health: &FakeCheck::pass(),
                progress: &|_: Step| {},
            },
        )
        .map_err(|e| format!("installing again after the kill: {e}"))?;
        if complete_current(root)? != 2 {
            return Err("the retried install did not make version 2 current".into());
        }
    }
    let _ = &s.a;
    Ok(())
}

fn full_disk_test() -> Result<(), String> {
    let s = setup();
    let root = device(&s, "fsize");
    let before = snapshot(&root);
    let mut child = spawn("fsize", &root, &s)?;
    let rx = lines(&mut child);
    let done = loop {
        match rx.recv_timeout(SILENCE_WATCHDOG) {
            Ok(line) if line.starts_with("done") => break line,
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                return Err("watchdog: the child went silent".into());
            }
            Err(RecvTimeoutError::Disconnected) => return Err("the child ended silently".into()),
        }
    };
    child.wait().map_err(|e| e.to_string())?;
    println!(
        "figure: install under a {} KiB file-size limit: {done}",
        ENCODER_FILE / 2048
    );
    if !done.starts_with("done err") || !done.contains("File too large") {
        return Err(format!("expected a file-too-large error, got {done:?}"));
    }
    if complete_current(&root)? != 1 {
        return Err("the old version is not current".into());
    }
    // Nothing left behind: the staging directory was removed at once.
    if snapshot(&root) != before {
        return Err("the failed install left files behind".into());
    }
    Ok(())
}
