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
use std::process::Stdio;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::{identity, make_case, Rng};
use dermascope_store::{Case, CaseFilter, CaseId, CaseSource, CaseStore, IndexSource, ScoreKind};

const DIM: usize = 128;
const ROLE: &str = "DERMASCOPE_STORE_CHILD";
const DIR: &str = "DERMASCOPE_STORE_DIR";
const RUN: &str = "DERMASCOPE_STORE_RUN";
/// Set: the writer stops between writes once it has acknowledged this many
/// cases, says `paused` and waits to be killed.
const STOP_AFTER_ACKS: &str = "DERMASCOPE_STORE_STOP_AFTER_ACKS";
const CRASH_RUNS: u64 = 27;
/// Fewer crash runs (at least 3: one per kind of kill point), for
/// scripts/test-aarch64, where each run is seconds under qemu.
const CRASH_RUNS_VARIABLE: &str = "DERMASCOPE_STORE_CRASH_RUNS";
/// The writer checkpoints the index cache every this many steps.
const CHECKPOINT_EVERY: u64 = 40;
/// The writer applies a page pulled from the fleet, with its cursor, every
/// this many steps.
const PULL_EVERY: u64 = 17;
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

/// The case a checker expects under `id`: pulled pages (ids with `-p`)
/// hold fleet copies of [`make_case`]'s case.
fn expected_case(id: &str) -> Case {
    let mut case = make_case(id, DIM);
    if id.contains("-p") {
        case.source = CaseSource::Fleet;
    }
    case
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
        // A pulled page and its cursor: one write, so a kill inside it
        // leaves both or neither.
        if i % PULL_EVERY == 0 {
            let n = 2 + (i / PULL_EVERY) % 5;
            let ids: Vec<String> = (0..n).map(|j| format!("r{run:02}-{i:05}-p{j}")).collect();
            let page: Vec<Case> = ids.iter().map(|id| expected_case(id)).collect();
            let cursor = format!("c-{run:02}-{i:05}");
            let op = report.start(&format!("pull {} {cursor}", ids.join(",")));
            if let Err(e) = store.apply_pulled(&page, &cursor) {
                eprintln!("pulled page failed: {e}");
                std::process::exit(4);
            }
            for id in ids {
                say(&format!("ack {id}"));
                acks += 1;
            }
            say(&format!("cursor {cursor}"));
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
    /// A pulled page's cursor.
    cursor: Option<String>,
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged and never the target of a removal.
    present: BTreeSet<String>,
    /// Acknowledged removals, and unacknowledged ones found to have landed.
    removed: BTreeSet<String>,
    /// Writes under way when a writer died: each lands whole or not at all.
    unsettled: Vec<InFlight>,
    /// The cursor of the last pulled page acknowledged (or found landed).
    cursor: Option<String>,
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
                let cursor = words.next().map(str::to_owned);
                if kind == "remove" {
                    // Unacknowledged removal: either outcome is allowed.
                    for id in &ids {
                        self.present.remove(id);
                    }
                }
                // A write that never said `done` failed (the full-disk
                // writer goes on after one): it too may have landed or not.
                if let Some(failed) = run.in_flight.replace(InFlight {
                    op,
                    kind,
                    ids,
                    cursor,
                }) {
                    self.unsettled.push(failed);
                }
            } else if let Some(id) = line.strip_prefix("ack ") {
                self.present.insert(id.to_owned());
                run.acks += 1;
            } else if let Some(cursor) = line.strip_prefix("cursor ") {
                self.cursor = Some(cursor.to_owned());
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
/// removals stayed removed; nothing else is there but the writes that were
/// under way, each whole or not at all; the two trees agree. Settles those
/// writes in the ledger by what the store holds.
fn verify(
    dir: &Path,
    ledger: &mut Ledger,
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
        let expected = expected_case(id);
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
        .map(|id| expected_case(id))
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
    // Only what was acknowledged, or under way, may be there.
    let on_disk: BTreeSet<String> = store
        .ids()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|id| id.to_string())
        .collect();
    let unsettled: BTreeSet<&String> = ledger.unsettled.iter().flat_map(|w| &w.ids).collect();
    if let Some(stray) = on_disk
        .iter()
        .find(|id| !ledger.present.contains(*id) && !unsettled.contains(id))
    {
        return Err(format!(
            "{stray} is stored, but was never acknowledged nor under way"
        ));
    }
    for write in std::mem::take(&mut ledger.unsettled) {
        let landed = write.ids.iter().filter(|id| on_disk.contains(*id)).count();
        match write.kind.as_str() {
            "remove" if landed == 0 => ledger.removed.extend(write.ids),
            "remove" => ledger.present.extend(write.ids),
            _ if landed == write.ids.len() => {
                if write.cursor.is_some() {
                    ledger.cursor = write.cursor;
                }
                ledger.present.extend(write.ids)
            }
            _ if landed == 0 => {}
            _ => {
                return Err(format!(
                    "write {} ({}) landed in part: {landed} of {:?}",
                    write.op, write.kind, write.ids
                ))
            }
        }
    }
    // A pulled page landed exactly when its cursor did.
    let cursor = store.sync_cursor().map_err(|e| e.to_string())?;
    if cursor != ledger.cursor {
        return Err(format!(
            "sync cursor {cursor:?} after the crash; the pages stored say {:?}",
            ledger.cursor
        ));
    }
    // The index (from cache, replay or scan) must hold exactly sled's cases.
    let indexed = store.len().map_err(|e| e.to_string())?;
    if on_disk.len() != indexed {
        return Err(format!(
            "index holds {indexed} cases, sled {} (opened via {source:?})",
            on_disk.len()
        ));
    }
    Ok((indexed, source))
}

/// Where a run's writer is killed, from what it reports.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// Stopped between writes once it acknowledged this many cases: the
    /// store must then hold exactly what was acknowledged.
    AfterAcks(usize),
    /// As the `nth` write of this kind (`insert`, `batch`, `remove`,
    /// `pull`: a pulled page and its cursor, `checkpoint`: a cache write)
    /// starts.
    Inside(&'static str, usize),
}

impl KillPoint {
    /// Per run, from the seeded `rng`: a third of each. Writes come in the
    /// ratio 6 inserts : 3 batches : 1 removal, a checkpoint every 40
    /// steps and a pulled page every 17; the ranges keep each run to a few
    /// hundred steps.
    fn pick(run: u64, rng: &mut Rng) -> Self {
        match run % 3 {
            0 => KillPoint::AfterAcks(20 + rng.below(800) as usize),
            1 => match rng.below(4) {
                0 => KillPoint::Inside("insert", 1 + rng.below(250) as usize),
                1 => KillPoint::Inside("batch", 1 + rng.below(120) as usize),
                2 => KillPoint::Inside("pull", 1 + rng.below(20) as usize),
                _ => KillPoint::Inside("remove", 1 + rng.below(40) as usize),
            },
            _ => KillPoint::Inside("checkpoint", 1 + rng.below(10) as usize),
        }
    }
}

/// Runs one writer until `point`, SIGKILLs it there and returns everything
/// it reported.
fn kill_writer_at(
    exe: &Path,
    dir: &Path,
    run: u64,
    point: KillPoint,
) -> Result<Vec<String>, String> {
    let mut command = dermascope_testkit::command(exe);
    command
        .env(ROLE, "ingest")
        .env(DIR, dir)
        .env(RUN, run.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let KillPoint::AfterAcks(n) = point {
        command.env(STOP_AFTER_ACKS, n.to_string());
    }
    let mut child = command.spawn().map_err(|e| e.to_string())?;
    // Held open until the kill: a paused writer waits on it.
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (lines, reported) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let mut seen_kind = 0;
    let reached = loop {
        let line = match reported.recv_timeout(SILENCE_WATCHDOG) {
            Ok(line) => line,
            Err(RecvTimeoutError::Disconnected) => break false,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "watchdog: the writer reported nothing for {SILENCE_WATCHDOG:?} (hung?); last: {:?}",
                    out.last()
                ));
            }
        };
        let at_point = match point {
            KillPoint::AfterAcks(_) => line == "paused",
            KillPoint::Inside(kind, nth) => {
                let starts = line
                    .strip_prefix("write ")
                    .and_then(|rest| rest.split(' ').nth(1))
                    == Some(kind);
                seen_kind += usize::from(starts);
                starts && seen_kind == nth
            }
        };
        out.push(line);
        if at_point {
            break true;
        }
    };
    // SIGKILL: no destructors, no final flush.
    let _ = child.kill();
    let status = child.wait().map_err(|e| e.to_string())?;
    drop(stdin);
    // The rest of what it said before it died.
    out.extend(reported.iter());
    let _ = reader.join();
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    if !reached || status.signal() != Some(libc::SIGKILL) {
        return Err(format!(
            "writer ended by itself ({status}) before its kill point {point:?}: {err}"
        ));
    }
    Ok(out)
}

fn crash_test() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut rng = Rng(20_240_611);
    let mut ledger = Ledger::default();
    let (mut inside_kills, mut landed_inside) = (0, 0);
    let runs = match std::env::var(CRASH_RUNS_VARIABLE) {
        Ok(n) => n
            .parse::<u64>()
            .map_err(|e| format!("{CRASH_RUNS_VARIABLE}={n:?}: {e}"))?
            .clamp(3, CRASH_RUNS),
        Err(_) => CRASH_RUNS,
    };
    for run in 0..runs {
        let point = KillPoint::pick(run, &mut rng);
        let out =
            kill_writer_at(&exe, dir.path(), run, point).map_err(|e| format!("run {run}: {e}"))?;
        let report = ledger.read(out.iter().map(String::as_str));
        if let KillPoint::Inside(..) = point {
            inside_kills += 1;
            landed_inside += usize::from(report.in_flight.is_some());
        }
        let mut search_ids: Vec<String> = out
            .iter()
            .filter_map(|l| l.strip_prefix("ack ").map(str::to_owned))
            .collect();
        let older: Vec<&String> = ledger.present.iter().collect();
        for _ in 0..64.min(older.len()) {
            search_ids.push(older[rng.below(older.len() as u64) as usize].clone());
        }
        let context = |e: String| format!("run {run} (killed at {point:?}): {e}");
        let (total, source) = verify(dir.path(), &mut ledger, &search_ids).map_err(context)?;
        // The cache is written atomically: a crash, even in a cache write,
        // never costs it, so a reopen never has to scan every row.
        if let IndexSource::Scan { reason } = &source {
            return Err(context(format!(
                "the index was rebuilt by a scan: {reason}"
            )));
        }
        if let KillPoint::AfterAcks(n) = point {
            // Nothing was under way: the store holds exactly the
            // acknowledged cases, and the reopen replays exactly the
            // writes since the last checkpoint onto the cache.
            if !report.paused || report.acks < n || report.in_flight.is_some() {
                return Err(context(format!("not paused after {n} acks: {report:?}")));
            }
            if total != ledger.present.len() {
                return Err(context(format!(
                    "{total} cases stored, {} acknowledged",
                    ledger.present.len()
                )));
            }
            match source {
                IndexSource::CacheReplayed {
                    writes_replayed, ..
                } if writes_replayed == report.writes_since_checkpoint => {}
                other => {
                    return Err(context(format!(
                        "expected the cache plus {} replayed writes, got {other:?}",
                        report.writes_since_checkpoint
                    )))
                }
            }
        }
        let under_way = match &report.in_flight {
            Some(w) => format!("inside write {} ({})", w.op, w.kind),
            None => "between writes".to_owned(),
        };
        println!(
            "crash run {run:2}: kill at {point:?} landed {under_way}, {:4} new acks, {} acknowledged live cases verified, {total} in store, index via {source:?}",
            report.acks,
            ledger.present.len()
        );
    }
    // Not asserted: whether a kill beats the write it was aimed at depends
    // on scheduling; every run's claims hold either way.
    println!(
        "crash: {landed_inside} of {inside_kills} kills aimed inside a write landed before it was acknowledged"
    );
    if ledger.present.len() < 100 {
        return Err(format!(
            "too few acks ({}); the test proved little",
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
    let mut report = Reporter { op: 0 };
    for i in 0..100_000 {
        let id = format!("full-{i:06}");
        let op = report.start(&format!("insert {id}"));
        match store.insert(&make_case(&id, DIM)) {
            Ok(()) => {
                say(&format!("ack {id}"));
                report.done(op);
            }
            Err(e) => {
                say(&format!("error disk_full={} {e}", e.is_disk_full()));
                let op = report.start("insert after-error");
                let again = store.insert(&make_case("after-error", DIM));
                if again.is_ok() {
                    say("ack after-error");
                    report.done(op);
                }
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
    let mut child = dermascope_testkit::command(&exe)
        .env(ROLE, "fsize")
        .env(DIR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    // Watchdog, not a measurement: the writer stops by itself at the first
    // failed write, in well under a second.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("watchdog: the full-disk writer hung after the write error".into());
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
    let acks = ledger.read(out.lines()).acks;
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
    let (total, _) = verify(dir.path(), &mut ledger, &all)?;
    println!(
        "full disk: reopened, {} acknowledged cases verified, {total} in store",
        ledger.present.len()
    );
    Ok(())
}
