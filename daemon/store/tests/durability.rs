//! Durability of acknowledged writes, proven with real processes.
//!
//! Runs with its own `main` (harness = false): the same binary is re-executed
//! as a writer child (selected by `DERMASCOPE_STORE_CHILD`) that the parent
//! SIGKILLs, or that hits a file-size limit (EFBIG, as on a full disk).
//!
//! The child reports what it does, one line at a time: `write <op> <kind>
//! [ids]` as a write or cache write starts, `ack <id>` / `rm <id>` for what
//! it acknowledged, `done <op>` when the call returned. The parent kills it
//! at points it picks from those reports (never after a wall-clock delay),
//! so what is checked depends on what was acknowledged, not on how fast the
//! machine is.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::{identity, make_case, Rng};
use dermascope_store::{CaseFilter, CaseId, CaseStore, IndexSource, ScoreKind};

const DIM: usize = 128;
const ROLE: &str = "DERMASCOPE_STORE_CHILD";
const DIR: &str = "DERMASCOPE_STORE_DIR";
const RUN: &str = "DERMASCOPE_STORE_RUN";
/// Set: the writer stops between writes once it has acknowledged this many
/// cases, says `paused` and waits to be killed.
const STOP_AFTER_ACKS: &str = "DERMASCOPE_STORE_STOP_AFTER_ACKS";
const CRASH_RUNS: u64 = 27;
/// The writer checkpoints the index cache every this many steps.
const CHECKPOINT_EVERY: u64 = 40;
/// Watchdog, not a measurement: a writer that reports nothing for this long
/// has hung (a healthy one reports every few milliseconds).
const SILENCE_WATCHDOG: Duration = Duration::from_secs(60);
/// Watchdog, not a measurement: a writer the parent has not killed by now
/// has lost its parent; it exits rather than write forever.
const CHILD_WATCHDOG: Duration = Duration::from_secs(300);

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("ingest") => child_ingest(),
        Ok("fsize") => child_fsize(),
        _ => parent(),
    }
}

type TestFn = fn() -> Result<(), String>;

fn parent() {
    let tests: [(&str, TestFn); 2] = [
        ("acknowledged_cases_survive_sigkill", crash_test),
        (
            "full_disk_is_a_typed_error_and_loses_nothing_acknowledged",
            full_disk_test,
        ),
    ];
    let mut failed = 0;
    for (name, test) in tests {
        let started = Instant::now();
        match test() {
            Ok(()) => println!(
                "test {name} ... ok ({:.1} s)",
                started.elapsed().as_secs_f64()
            ),
            Err(why) => {
                failed += 1;
                println!("test {name} ... FAILED: {why}");
            }
        }
    }
    println!();
    println!(
        "durability: {} passed, {failed} failed",
        tests.len() - failed
    );
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

fn env_or_die(key: &str) -> String {
    match std::env::var(key) {
        Ok(v) => v,
        Err(_) => {
            eprintln!("child needs {key}");
            std::process::exit(2)
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // If the parent is gone there is nobody to tell; the writes go on.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Numbers the writes and reports them: `write` before the call, `done`
/// after it returned Ok (and after its `ack`/`rm` lines).
struct Reporter {
    op: u64,
}

impl Reporter {
    fn start(&mut self, what: &str) -> u64 {
        self.op += 1;
        say(&format!("write {} {what}", self.op));
        self.op
    }

    fn done(&self, op: u64) {
        say(&format!("done {op}"));
    }
}

/// Writes until killed: single inserts, batches, removals and cache
/// checkpoints. An `ack` or `rm` line is printed only after the call
/// returned Ok, i.e. after the acknowledgement.
fn child_ingest() {
    let dir = env_or_die(DIR);
    let run: u64 = env_or_die(RUN).parse().unwrap_or(0);
    let stop_after: Option<usize> = std::env::var(STOP_AFTER_ACKS)
        .ok()
        .and_then(|n| n.parse().ok());
    let store = match CaseStore::open(&dir, identity(DIM)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("child could not open the store: {e}");
            std::process::exit(3);
        }
    };
    say("open");
    let mut rng = Rng(0xBAD_5EED ^ run);
    let mut mine: Vec<String> = Vec::new();
    let mut report = Reporter { op: 0 };
    let mut acks = 0;
    let watchdog = Instant::now() + CHILD_WATCHDOG;
    let mut i = 0;
    while Instant::now() < watchdog {
        i += 1;
        // Some kills must land while the index cache is being written.
        if i % CHECKPOINT_EVERY == 0 {
            let op = report.start("checkpoint");
            if let Err(e) = store.checkpoint() {
                eprintln!("checkpoint failed: {e}");
                std::process::exit(4);
            }
            report.done(op);
        }
        let roll = rng.below(10);
        if roll < 6 {
            let id = format!("r{run:02}-{i:05}");
            let op = report.start(&format!("insert {id}"));
            if let Err(e) = store.insert(&make_case(&id, DIM)) {
                eprintln!("insert failed: {e}");
                std::process::exit(4);
            }
            say(&format!("ack {id}"));
            report.done(op);
            acks += 1;
            mine.push(id);
        } else if roll < 9 {
            let n = 2 + rng.below(6);
            let batch: Vec<_> = (0..n)
                .map(|j| make_case(&format!("r{run:02}-{i:05}-b{j}"), DIM))
                .collect();
            let ids: Vec<String> = batch.iter().map(|c| c.id.to_string()).collect();
            let op = report.start(&format!("batch {}", ids.join(",")));
            if let Err(e) = store.insert_batch(&batch) {
                eprintln!("batch insert failed: {e}");
                std::process::exit(4);
            }
            for id in ids {
                say(&format!("ack {id}"));
                acks += 1;
                mine.push(id);
            }
            report.done(op);
        } else if !mine.is_empty() {
            let victim = mine.swap_remove(rng.below(mine.len() as u64) as usize);
            let op = report.start(&format!("remove {victim}"));
            let id = CaseId::new(victim.clone()).unwrap_or_else(|_| std::process::exit(5));
            if let Err(e) = store.remove(&id) {
                eprintln!("remove failed: {e}");
                std::process::exit(4);
            }
            say(&format!("rm {victim}"));
            report.done(op);
        }
        if stop_after.is_some_and(|n| acks >= n) {
            say("paused");
            // Blocks until the parent kills us; end of input means it died.
            let _ = std::io::stdin().read(&mut [0u8; 1]);
            std::process::exit(7);
        }
    }
    eprintln!("watchdog: not killed within {CHILD_WATCHDOG:?}");
    std::process::exit(6);
}

/// A write whose call had started but not returned when the writer died.
#[derive(Debug, Clone)]
struct InFlight {
    op: u64,
    kind: String,
    ids: Vec<String>,
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged and never the target of a removal.
    present: BTreeSet<String>,
    /// Acknowledged removals, and unacknowledged ones found to have landed.
    removed: BTreeSet<String>,
    /// Writes under way when a writer died: each lands whole or not at all.
    unsettled: Vec<InFlight>,
}

/// What one writer's report says about its run.
#[derive(Debug, Default)]
struct RunReport {
    acks: usize,
    /// The write or cache write under way when the writer died.
    in_flight: Option<InFlight>,
    /// Writes acknowledged since the writer opened the store or last
    /// finished a checkpoint: what a reopen must replay onto the cache.
    writes_since_checkpoint: u64,
    paused: bool,
}

impl Ledger {
    fn read<'a>(&mut self, lines: impl IntoIterator<Item = &'a str>) -> RunReport {
        let mut run = RunReport::default();
        for line in lines {
            if line == "open" {
                run.writes_since_checkpoint = 0;
            } else if line == "paused" {
                run.paused = true;
            } else if let Some(rest) = line.strip_prefix("write ") {
                let mut words = rest.split(' ');
                let op = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let kind = words.next().unwrap_or("").to_owned();
                let ids: Vec<String> = words
                    .next()
                    .map(|ids| ids.split(',').map(str::to_owned).collect())
                    .unwrap_or_default();
                if kind == "remove" {
                    // Unacknowledged removal: either outcome is allowed.
                    for id in &ids {
                        self.present.remove(id);
                    }
                }
                // A write that never said `done` failed (the full-disk
                // writer goes on after one): it too may have landed or not.
                if let Some(failed) = run.in_flight.replace(InFlight { op, kind, ids }) {
                    self.unsettled.push(failed);
                }
            } else if let Some(id) = line.strip_prefix("ack ") {
                self.present.insert(id.to_owned());
                run.acks += 1;
            } else if let Some(id) = line.strip_prefix("rm ") {
                self.removed.insert(id.to_owned());
            } else if let Some(op) = line.strip_prefix("done ") {
                let op: u64 = op.parse().unwrap_or(0);
                if let Some(done) = run.in_flight.take_if(|w| w.op == op) {
                    if done.kind == "checkpoint" {
                        run.writes_since_checkpoint = 0;
                    } else {
                        run.writes_since_checkpoint += 1;
                    }
                }
            }
        }
        if let Some(w) = &run.in_flight {
            if w.kind != "checkpoint" {
                self.unsettled.push(w.clone());
            }
        }
        run
    }
}

/// Every acknowledged case is there and byte-identical; the ones in
/// `search_ids` are also found first by their own embedding (checking all
/// of them after every run would make the test quadratic); acknowledged
/// removals stayed removed; the two trees agree.
fn verify(
    dir: &Path,
    ledger: &Ledger,
    search_ids: &[String],
) -> Result<(usize, IndexSource), String> {
    let store = CaseStore::open(dir, identity(DIM)).map_err(|e| format!("reopen failed: {e}"))?;
    let source = store.open_report().index_source.clone();
    if !store.open_report().corrupt.is_empty() {
        return Err(format!(
            "corrupt rows after crash: {:?}",
            store.open_report().corrupt
        ));
    }
    for id in &ledger.present {
        let expected = make_case(id, DIM);
        let got = store
            .get(&expected.id)
            .map_err(|e| format!("{id}: {e}"))?
            .ok_or_else(|| format!("acknowledged case {id} is missing"))?;
        if got != expected {
            return Err(format!(
                "acknowledged case {id} differs from what was written"
            ));
        }
    }
    let searched: Vec<_> = search_ids
        .iter()
        .filter(|id| ledger.present.contains(*id))
        .map(|id| make_case(id, DIM))
        .collect();
    for chunk in searched.chunks(64) {
        let queries: Vec<&[f32]> = chunk.iter().map(|c| c.embedding.as_slice()).collect();
        for kind in [ScoreKind::F32, ScoreKind::Int8] {
            let results = store
                .search_batch(&queries, 1, &CaseFilter::any(), kind)
                .map_err(|e| e.to_string())?;
            for (case, hits) in chunk.iter().zip(results) {
                match hits.first() {
                    Some(h) if h.id == case.id && (h.score - 1.0).abs() < 0.02 => {}
                    other => {
                        return Err(format!(
                            "{} not found first by its embedding ({kind:?}): {other:?}",
                            case.id
                        ))
                    }
                }
            }
        }
    }
    for id in &ledger.removed {
        let id = CaseId::new(id.clone()).map_err(|e| e.to_string())?;
        if store.contains(&id).map_err(|e| e.to_string())? {
            return Err(format!("acknowledged removal of {id} was undone"));
        }
    }
    let problems = store.check_integrity().map_err(|e| e.to_string())?;
    if !problems.is_empty() {
        return Err(format!(
            "trees disagree after crash (non-atomic write?): {problems:?}"
        ));
    }
    // The index (from cache, replay or scan) must hold exactly sled's cases.
    let on_disk = store.ids().map_err(|e| e.to_string())?.len();
    let indexed = store.len().map_err(|e| e.to_string())?;
    if on_disk != indexed {
        return Err(format!(
            "index holds {indexed} cases, sled {on_disk} (opened via {source:?})"
        ));
    }
    Ok((indexed, source))
}

fn crash_test() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut rng = Rng(20_240_611);
    let mut ledger = Ledger::default();
    let mut killed_while_writing = 0;
    let mut replayed_opens = 0;
    for run in 0..CRASH_RUNS {
        let delay = Duration::from_millis(5 + rng.below(250));
        let mut child = Command::new(&exe)
            .env(ROLE, "ingest")
            .env(DIR, dir.path())
            .env(RUN, run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        std::thread::sleep(delay);
        let exited_early = child.try_wait().map_err(|e| e.to_string())?;
        // SIGKILL: no destructors, no final flush.
        let _ = child.kill();
        let status = child.wait().map_err(|e| e.to_string())?;
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut s) = child.stdout.take() {
            s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        }
        if let Some(mut s) = child.stderr.take() {
            s.read_to_string(&mut err).map_err(|e| e.to_string())?;
        }
        if let Some(code) = exited_early {
            return Err(format!(
                "run {run}: writer exited by itself ({code}): {err}"
            ));
        }
        let acks = ledger.read(&out);
        if out.starts_with("open") {
            killed_while_writing += 1;
        }
        let mut search_ids: Vec<String> = out
            .lines()
            .filter_map(|l| l.strip_prefix("ack ").map(str::to_owned))
            .collect();
        let older: Vec<&String> = ledger.present.iter().collect();
        for _ in 0..64.min(older.len()) {
            search_ids.push(older[rng.below(older.len() as u64) as usize].clone());
        }
        let (total, source) = verify(dir.path(), &ledger, &search_ids)
            .map_err(|e| format!("run {run} (killed after {delay:?}, status {status}): {e}"))?;
        if matches!(source, IndexSource::CacheReplayed { .. }) {
            replayed_opens += 1;
        }
        println!(
            "crash run {run:2}: killed after {:3} ms, {acks:3} new acks, {} acknowledged live cases verified, {total} in store, index via {source:?}",
            delay.as_millis(),
            ledger.present.len()
        );
    }
    if replayed_opens < CRASH_RUNS / 4 {
        return Err(format!(
            "only {replayed_opens} reopens replayed a stale index cache; the test proved little"
        ));
    }
    if killed_while_writing < CRASH_RUNS / 2 || ledger.present.len() < 100 {
        return Err(format!(
            "too few kills landed during writes ({killed_while_writing}) or too few acks ({}); the test proved little",
            ledger.present.len()
        ));
    }
    Ok(())
}

/// Opens the store, then caps file size just above what sled's files use
/// now, so the log soon cannot grow: writes fail with EFBIG like on a full disk.
fn child_fsize() {
    let dir = env_or_die(DIR);
    let store = match CaseStore::open(&dir, identity(DIM)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("child could not open the store: {e}");
            std::process::exit(3);
        }
    };
    let largest = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let limit = largest + (1 << 20);
    // SAFETY: plain libc calls with valid arguments; the default SIGXFSZ
    // action would kill us instead of letting write() return EFBIG.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let lim = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
            eprintln!("setrlimit failed");
            std::process::exit(3);
        }
    }
    say(&format!("limit {limit}"));
    for i in 0..100_000 {
        let id = format!("full-{i:06}");
        match store.insert(&make_case(&id, DIM)) {
            Ok(()) => say(&format!("ack {id}")),
            Err(e) => {
                say(&format!("error disk_full={} {e}", e.is_disk_full()));
                let again = store.insert(&make_case("after-error", DIM));
                say(&format!("after-error insert ok={}", again.is_ok()));
                // Skip destructors: sled's drop-time flush would only fail again.
                std::process::exit(0);
            }
        }
    }
    say("never failed");
    std::process::exit(0);
}

fn full_disk_test() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut ledger = Ledger::default();
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).map_err(|e| e.to_string())?;
        let before: Vec<_> = (0..50)
            .map(|i| make_case(&format!("pre-{i:03}"), DIM))
            .collect();
        store.insert_batch(&before).map_err(|e| e.to_string())?;
        ledger
            .present
            .extend(before.iter().map(|c| c.id.to_string()));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(&exe)
        .env(ROLE, "fsize")
        .env(DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("full-disk writer hung after the write error".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut err).map_err(|e| e.to_string())?;
    }
    let acks = ledger.read(&out);
    let error_line = out
        .lines()
        .find(|l| l.starts_with("error "))
        .ok_or_else(|| {
            format!(
                "writer never saw an error (status {status}); stdout tail: {:?}; stderr: {err}",
                out.lines().last()
            )
        })?;
    println!("full disk: {acks} cases acknowledged under the limit, then: {error_line}");
    if let Some(after) = out.lines().find(|l| l.starts_with("after-error")) {
        println!("full disk: {after}");
    }
    if !error_line.starts_with("error disk_full=true") {
        return Err(format!(
            "write failure was not reported as DiskFull: {error_line}"
        ));
    }
    if acks == 0 {
        return Err("limit too tight: no case was acknowledged before the error".into());
    }
    let all: Vec<String> = ledger.present.iter().cloned().collect();
    let (total, _) = verify(dir.path(), &ledger, &all)?;
    println!(
        "full disk: reopened, {} acknowledged cases verified, {total} in store",
        ledger.present.len()
    );
    Ok(())
}
