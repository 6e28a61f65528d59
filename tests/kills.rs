//! Kill tests for every writer: `dermascope ingest`, `dermascope run` with
//! confirmations in flight, `dermascope adapter index` and `dermascope
//! adapter train` while it installs, each SIGKILLed at least [`KILLS`]
//! times.
//!
//! The real binary, the real encoder bundle, a real store in a temporary
//! folder and synthetic photographs drawn here. Each kill lands at a point
//! the child reported on its log (a flushed batch, a write sled says it
//! made, an install step, a saved capture), chosen by a seeded generator;
//! never after a wall-clock delay, so what is checked depends on what was
//! acknowledged, not on how fast the machine is. After every kill:
//!
//! - the store is opened from a copy, so the next start sees exactly what
//!   the kill left; it must open, with no corrupt entry;
//! - every acknowledged item is there and intact (byte for byte against an
//!   uninterrupted run, or against what the test sent, and found by search);
//!   nothing half-written is visible;
//! - the next start runs on what the kill left, and a last uninterrupted
//!   run finishes the work.
//!
//! `DERMASCOPE_KILL_SEED=<n>` replays a run; every test prints its seed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use dermascope_adapter::{Adapter, AdapterError};
use dermascope_store::{now_ms, Case, CaseFilter, CaseId, CaseSource, CaseStore, ScoreKind};

/// Kills per writer (the issue asks for at least 20).
const KILLS: usize = 20;
/// Watchdog on a test's loop, not a measurement: cycles that end without a
/// kill (the child finished first) are not counted, so a loop that keeps
/// missing its kill point must stop somewhere.
const MAX_CYCLES: usize = 4 * KILLS;
/// Watchdog, not a measurement: a child that logs nothing for this long has
/// hung (a healthy one logs every second or so).
const SILENCE_WATCHDOG: Duration = Duration::from_secs(120);
/// `dermascope ingest` flushes this many cases at a time
/// (`dermascope_library::ingest`'s batch).
const INGEST_BATCH: usize = 16;
/// `dermascope adapter index` flushes this many rows at a time
/// (`dermascope_library::adapter_space`'s batch).
const INDEX_BATCH: usize = 256;

// ---------------------------------------------------------------------------
// The child process and its reported points

/// Deterministic pseudo-random numbers (splitmix64): no random-number crate.
struct Rng(u64);

impl Rng {
    /// The seed of `test`: `$DERMASCOPE_KILL_SEED` (or a fixed default)
    /// mixed with the test's name, printed so that a failure can be replayed.
    fn for_test(test: &str) -> Self {
        let base = std::env::var("DERMASCOPE_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x12_5EED_u64);
        let seed = test.bytes().fold(base, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        eprintln!("{test}: DERMASCOPE_KILL_SEED={base} (this test's seed {seed:#x})");
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `dermascope` with the test bundle, logging `log` (a `RUST_LOG` filter)
/// without colour codes, which would split the words the tests look for.
fn dermascope(log: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dermascope"));
    command
        .env("DERMASCOPE_MODEL_DIR", dermascope_testkit::bundle_dir())
        .env("RUST_LOG", log)
        .env("NO_COLOR", "1");
    command
}

/// Runs `command` to its end (with the silence watchdog) and returns its
/// status and output lines.
fn run_to_end(command: &mut Command) -> (ExitStatus, Vec<String>) {
    let mut child = Child::spawn(command);
    while child.next_line().is_some() {}
    child.wait()
}

/// A child whose stdout and stderr are read line by line while it runs (at
/// debug level it writes more than a pipe holds).
struct Child {
    process: std::process::Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    what: String,
}

impl Child {
    fn spawn(command: &mut Command) -> Self {
        let what = format!("{command:?}");
        let mut process = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let (sender, lines) = mpsc::channel();
        fn forward(pipe: impl Read + Send + 'static, sender: mpsc::Sender<String>) {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        forward(process.stdout.take().unwrap(), sender.clone());
        forward(process.stderr.take().unwrap(), sender);
        Self {
            process,
            lines,
            seen: Vec::new(),
            what,
        }
    }

    /// The next line, or `None` once the child closed its output (exited).
    fn next_line(&mut self) -> Option<String> {
        match self.lines.recv_timeout(SILENCE_WATCHDOG) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                let _ = self.process.kill();
                panic!(
                    "watchdog: {} said nothing for {SILENCE_WATCHDOG:?}; it said:\n{}",
                    self.what,
                    self.seen.join("\n")
                );
            }
        }
    }

    /// Reads until a line satisfies `point`; false if the child ended first.
    fn reach(&mut self, mut point: impl FnMut(&str) -> bool) -> bool {
        while let Some(line) = self.next_line() {
            if point(&line) {
                return true;
            }
        }
        false
    }

    /// SIGKILL, then every line the child wrote before it died. `None` when
    /// it had exited by itself before the signal.
    fn kill(mut self) -> (Option<()>, Vec<String>) {
        let _ = self.process.kill();
        let (status, lines) = self.wait();
        let killed = status.signal() == Some(9);
        (killed.then_some(()), lines)
    }

    fn wait(mut self) -> (ExitStatus, Vec<String>) {
        while self.next_line().is_some() {}
        let status = self.process.wait().expect("waiting for the child");
        (status, self.seen)
    }
}

/// Sum of `key=N` over the lines containing `message`: what a writer
/// acknowledged (e.g. `cases written cases=16`).
fn acknowledged(lines: &[String], message: &str, key: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.contains(message))
        .filter_map(|l| field(l, key))
        .filter_map(|v| v.parse::<usize>().ok())
        .sum()
}

/// The value of `key=` in a tracing line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    Some(
        rest.split_whitespace()
            .next()
            .unwrap_or(rest)
            .trim_matches('"'),
    )
}

/// sled logs each write of its log buffers (during a flush) from here.
fn sled_wrote(line: &str) -> bool {
    line.contains("sled::pagecache::iobuf") && line.contains("wrote lsns")
}

/// Reads until the kill point: the `writes_after`-th write sled reports
/// after the `anchors`-th line `is_anchor` accepts (that line itself when
/// `writes_after` is 0). False if the child ended first.
fn reach_point(
    child: &mut Child,
    anchors: usize,
    is_anchor: impl Fn(&str) -> bool,
    writes_after: usize,
) -> bool {
    let (mut seen, mut writes) = (0, 0);
    child.reach(|line| {
        if seen < anchors {
            seen += usize::from(is_anchor(line));
            seen == anchors && writes_after == 0
        } else {
            writes += usize::from(sled_wrote(line));
            writes == writes_after
        }
    })
}

// ---------------------------------------------------------------------------
// Stores, libraries and copies

/// Copies `from` into a fresh `to`: the killed store is checked on a copy,
/// so that opening it (which writes an index cache) does not change what
/// the next start sees.
fn copy_dir(from: &Path, to: &Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).unwrap();
    }
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Opens `store` (which must exist) and panics with `context` if it does
/// not open or holds a corrupt entry.
fn open_store(store: &Path, context: &str) -> CaseStore {
    let identity = CaseStore::identity_at(store)
        .unwrap_or_else(|e| panic!("{context}: reading the store's identity: {e}"))
        .unwrap_or_else(|| panic!("{context}: no store at {}", store.display()));
    let opened = CaseStore::open(store, identity)
        .unwrap_or_else(|e| panic!("{context}: the store does not open: {e}"));
    let corrupt = opened.check_integrity().unwrap();
    assert!(corrupt.is_empty(), "{context}: corrupt entries {corrupt:?}");
    opened
}

/// A copy of `store` as the kill left it, opened; `None` if the kill came
/// before the store was created.
fn open_killed_copy(store: &Path, scratch: &Path, context: &str) -> Option<CaseStore> {
    if !store.join("conf").exists() {
        return None;
    }
    copy_dir(store, scratch);
    Some(open_store(scratch, context))
}

fn all_cases(store: &CaseStore) -> BTreeMap<String, Case> {
    store
        .cases()
        .map(|c| {
            let c = c.unwrap();
            (c.id.to_string(), c)
        })
        .collect()
}

/// The case is found by its own embedding at similarity 1: it is in the
/// index, not only in sled. (Not necessarily first: the replay camera
/// shows the same few frames, so captures can share an embedding.)
fn assert_searchable(store: &CaseStore, case: &Case, context: &str) {
    let everything = store.len().unwrap();
    let hits = store
        .search(
            &case.embedding,
            everything,
            &CaseFilter::default(),
            ScoreKind::F32,
        )
        .unwrap();
    assert!(
        hits.iter().any(|h| h.id == case.id && h.score > 0.999),
        "{context}: case {} is stored but search does not find it at similarity 1",
        case.id
    );
}

/// The shared synthetic library, with this file's `KILL_` names.
fn synthetic_library(dir: &Path, per_class: u32) -> (PathBuf, Vec<String>) {
    support::synthetic_library(dir, per_class, "KILL")
}

/// `dermascope ingest` of `labels` into `store`, uninterrupted.
fn ingest_all(dir: &Path, labels: &Path, store: &Path) {
    let (status, lines) = run_to_end(dermascope("warn").args(ingest_args(dir, labels, store)));
    assert!(status.success(), "ingest failed:\n{}", lines.join("\n"));
}

fn ingest_args(dir: &Path, labels: &Path, store: &Path) -> Vec<String> {
    [
        "ingest",
        "--images",
        dir.join("images").to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--threads",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

/// Adds `clones` cases to `store`, each a stored case's photograph and
/// label with its embedding moved in a random direction (cosine about 0.9
/// to the original) and a lesion of its own: the adapter writers work on
/// embeddings, and a library this size would take minutes to embed.
fn add_clones(store: &Path, clones: usize, rng: &mut Rng) {
    let store = open_store(store, "adding clones");
    let originals: Vec<Case> = all_cases(&store).into_values().collect();
    let made: Vec<Case> = (0..clones)
        .map(|i| {
            let base = &originals[i % originals.len()];
            let direction: Vec<f32> = base.embedding.iter().map(|_| rng.unit()).collect();
            let norm = direction.iter().map(|v| v * v).sum::<f32>().sqrt();
            let mut embedding: Vec<f32> = base
                .embedding
                .iter()
                .zip(&direction)
                .map(|(e, d)| e + 0.5 * d / norm)
                .collect();
            let norm = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
            embedding.iter_mut().for_each(|v| *v /= norm);
            let mut case = base.clone();
            case.id = CaseId::new(format!("{}_c{i:04}", base.id)).unwrap();
            case.embedding = embedding;
            case.metadata.lesion_id = Some(format!("LC{i}"));
            case
        })
        .collect();
    for chunk in made.chunks(200) {
        store.insert_batch(chunk).unwrap();
    }
}

/// What a test counts; printed at its end (`--nocapture` shows it).
#[derive(Default)]
struct Tally {
    runs: usize,
    kills: usize,
    /// Items acknowledged before a kill, each found intact after it.
    acknowledged: usize,
    /// Items in flight at a kill (not acknowledged) that were kept anyway.
    unacknowledged_kept: usize,
    /// Items in flight at a kill that were not kept: allowed, nobody was
    /// told they were saved.
    unacknowledged_dropped: usize,
    /// Kills per kind of point.
    points: BTreeMap<String, usize>,
}

impl Tally {
    fn run(&mut self) {
        self.runs += 1;
        assert!(
            self.runs <= MAX_CYCLES,
            "watchdog: {} runs for {} kills",
            self.runs,
            self.kills
        );
    }

    fn killed(&mut self, killed: bool, point: &str) {
        if killed {
            self.kills += 1;
            *self.points.entry(point.to_string()).or_default() += 1;
        }
    }

    fn print(&self, test: &str, started: Instant) {
        eprintln!(
            "{test}: {} kills in {} runs; {} acknowledged items, all found intact, 0 lost; \
             in flight at the kills: {} kept, {} not kept; {:.1} s; kill points: {:?}",
            self.kills,
            self.runs,
            self.acknowledged,
            self.unacknowledged_kept,
            self.unacknowledged_dropped,
            started.elapsed().as_secs_f64(),
            self.points
        );
    }
}

// ---------------------------------------------------------------------------
// dermascope ingest

/// Ingest is killed during a batch's embedding, inside its flush and right
/// after its acknowledgement. Every case of an acknowledged batch is there,
/// byte for byte as an uninterrupted ingest stores it, and searchable; the
/// stored cases are always the batches in file order, whole (one batch is
/// a transaction); the rerun finishes the rest with no case twice.
#[test]
fn ingest_killed_keeps_every_flushed_batch_and_the_rerun_finishes_without_duplicates() {
    let test = "ingest_killed";
    let started = Instant::now();
    let mut rng = Rng::for_test(test);
    let dir = tempfile::tempdir().unwrap();
    // 42 photographs: batches of 16, 16 and 10.
    let (labels, order) = synthetic_library(dir.path(), 14);
    let reference_dir = dir.path().join("reference");
    ingest_all(dir.path(), &labels, &reference_dir);
    let reference = all_cases(&open_store(&reference_dir, "the uninterrupted ingest"));
    assert_eq!(reference.len(), order.len());

    let store = dir.path().join("store");
    let scratch = dir.path().join("killed-copy");
    let log = "warn,dermascope_store=debug,dermascope_library=info,sled::pagecache::iobuf=debug";
    let mut stored: BTreeSet<String> = BTreeSet::new();
    let mut tally = Tally::default();
    while tally.kills < KILLS {
        tally.run();
        if stored.len() == order.len() {
            // Finished: start a new library, so kills also land in its creation.
            std::fs::remove_dir_all(&store).unwrap();
            stored.clear();
        }
        let todo: Vec<&String> = order.iter().filter(|id| !stored.contains(*id)).collect();
        // Flushed batches to wait for (at most one: each costs a batch of
        // embedding), then how many of sled's writes after that: 0 kills
        // right there (as the store opened, or right after the ack); sled
        // writes a batch in two, so 2 and 3 land inside its flush.
        let acks_first = rng.below(if todo.len() > INGEST_BATCH { 2 } else { 1 });
        let writes_then = rng.below(4);
        let point = format!("after {acks_first} acks and {writes_then} sled writes");
        let mut child =
            Child::spawn(dermascope(log).args(ingest_args(dir.path(), &labels, &store)));
        let anchor = |l: &str| l.contains("case store opened") || l.contains("cases written");
        let reached = reach_point(&mut child, 1 + acks_first, anchor, writes_then);
        let (killed, lines) = if reached {
            child.kill()
        } else {
            let (status, lines) = child.wait();
            assert!(status.success(), "ingest failed:\n{}", lines.join("\n"));
            (None, lines)
        };
        tally.killed(killed.is_some(), &point);
        let context = format!("ingest killed {point}");
        let acked = acknowledged(&lines, "cases written", "cases");
        let in_flight = (todo.len() - acked).min(INGEST_BATCH);

        let Some(copy) = open_killed_copy(&store, &scratch, &context) else {
            assert_eq!(acked, 0, "{context}: acknowledged cases but no store");
            continue;
        };
        let now = all_cases(&copy);
        let missing: Vec<&String> = stored.iter().filter(|id| !now.contains_key(*id)).collect();
        assert!(missing.is_empty(), "{context}: lost {missing:?}");
        let new: BTreeSet<&String> = now.keys().filter(|id| !stored.contains(*id)).collect();
        // Whole batches in file order: the acknowledged ones, perhaps with
        // the next, flushed just before the kill and not yet logged.
        let next = (acked + INGEST_BATCH).min(todo.len());
        let prefix = |n: usize| todo[..n].iter().copied().collect::<BTreeSet<&String>>();
        assert!(
            new == prefix(acked) || new == prefix(next),
            "{context}: {acked} acknowledged, but the new cases are {new:?}"
        );
        for (id, case) in &now {
            let expected = &reference[id];
            let same = Case {
                created_at_ms: expected.created_at_ms,
                updated_at_ms: expected.updated_at_ms,
                ..case.clone()
            };
            assert!(
                same == *expected,
                "{context}: case {id} differs from the reference"
            );
            assert_searchable(&copy, case, &context);
        }
        assert_eq!(
            copy.len().unwrap(),
            now.len(),
            "{context}: index and sled disagree"
        );
        if killed.is_some() {
            tally.acknowledged += acked;
            let kept = new.len() - acked;
            tally.unacknowledged_kept += kept;
            tally.unacknowledged_dropped += in_flight - kept;
        }
        stored = now.into_keys().collect();
    }

    // The rerun finishes what the kills left, adding none twice.
    let (status, lines) =
        run_to_end(dermascope("warn").args(ingest_args(dir.path(), &labels, &store)));
    let out = lines.join("\n");
    assert!(status.success(), "{out}");
    let summary = format!(
        "ingested {}, already stored {}, rejected 0; the store now holds {} cases",
        order.len() - stored.len(),
        stored.len(),
        order.len()
    );
    assert!(out.contains(&summary), "expected {summary:?} in:\n{out}");
    let finished = open_store(&store, "after the last rerun");
    let cases = all_cases(&finished);
    assert_eq!(
        cases.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    assert_eq!(finished.len().unwrap(), order.len());
    tally.print(test, started);
}

// ---------------------------------------------------------------------------
// dermascope run

/// The daemon says a confirmation is saved.
///
/// Today that is the case writer's log line, printed once the store
/// acknowledged the case (flushed): `capture stored as a case case=<tag>`,
/// with the case's log tag ([`CaseId::log_tag`]). When the screen says
/// "saved" only after the flush (issue 12, item 2), this is the one place
/// to switch the test to what the clinician sees.
fn saved_confirmation(line: &str) -> Option<String> {
    if line.contains("capture stored as a case") {
        field(line, "case").map(str::to_owned)
    } else {
        None
    }
}

fn press(socket: &Path, command: &[&str]) -> bool {
    let output = dermascope("warn")
        .args(["press", "--socket", socket.to_str().unwrap()])
        .args(command)
        .output()
        .expect("running dermascope press");
    output.status.success()
}

/// The daemon is killed with confirmations queued behind the one being
/// saved: after some saved confirmations, or as a capture is answered.
/// Every confirmation answered "saved" is in the store with its label,
/// intact and searchable; a case no confirmation asked for never appears;
/// what was there before is unchanged; and the next start works on what
/// the kill left, up to a clean SIGTERM at the end.
#[test]
fn run_killed_with_confirmations_in_flight_keeps_every_saved_capture() {
    let test = "run_killed";
    let started = Instant::now();
    let mut rng = Rng::for_test(test);
    let dir = tempfile::tempdir().unwrap();
    let (labels, _) = synthetic_library(dir.path(), 4);
    let store = dir.path().join("cases");
    ingest_all(dir.path(), &labels, &store);
    let support::HostDaemon { config, socket, .. } = support::daemon_config(dir.path(), &store);
    let daemon = || {
        let mut command = dermascope("info");
        command.args(["run", "--config", config.to_str().unwrap()]);
        Child::spawn(&mut command)
    };
    let ready = |line: &str| line.contains("control socket listening");
    let scratch = dir.path().join("killed-copy");
    let codes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"];
    // Everything the store held after the last kill, captures and
    // references: none of it may change.
    let mut known = all_cases(&open_store(&store, "the reference library"));
    let mut tally = Tally::default();
    while tally.kills < KILLS {
        tally.run();
        let mut child = daemon();
        assert!(
            child.reach(ready),
            "the daemon did not start on what the last kill left:\n{}",
            child.seen.join("\n")
        );
        let planned: Vec<&str> = (0..1 + rng.below(5))
            .map(|_| codes[rng.below(codes.len())])
            .collect();
        // The kill lands at the p-th of the 2n answers and saves, never the
        // last, so at least one confirmation is in flight.
        let events = 2 * planned.len();
        let kill_at = 1 + rng.below(events - 1);
        let point =
            format!("at event {kill_at} of {events} (captures answered and confirmations saved)");
        let presses = {
            let socket = socket.clone();
            let planned: Vec<String> = planned.iter().map(|s| s.to_string()).collect();
            // Sent as fast as the daemon takes them: they queue up behind
            // the capture being analysed and the case being written.
            std::thread::spawn(move || {
                let mut answered = Vec::new();
                for label in planned {
                    if !(press(&socket, &["capture"]) && press(&socket, &["confirm", &label])) {
                        break;
                    }
                    answered.push(label);
                }
                answered
            })
        };
        let (mut seen, mut kind) = (0, "");
        let reached = child.reach(|line| {
            if saved_confirmation(line).is_some() {
                (seen, kind) = (seen + 1, "as a confirmation was saved");
            } else if line.contains("capture answered") {
                (seen, kind) = (seen + 1, "as a capture was answered");
            }
            seen == kill_at
        });
        assert!(
            reached,
            "the daemon stopped by itself:\n{}",
            child.seen.join("\n")
        );
        let (killed, lines) = child.kill();
        tally.killed(killed.is_some(), kind);
        let answered_ok = presses.join().unwrap();
        let context = format!("daemon killed {point}");
        let saved_tags: Vec<String> = lines.iter().filter_map(|l| saved_confirmation(l)).collect();

        let copy = open_killed_copy(&store, &scratch, &context).unwrap();
        let now = all_cases(&copy);
        for (id, before) in &known {
            assert!(
                now.get(id) == Some(before),
                "{context}: case {id} lost or changed"
            );
        }
        // UUIDv7 ids sort in the order the captures were confirmed.
        let new: Vec<&Case> = now
            .values()
            .filter(|c| !known.contains_key(c.id.as_str()))
            .collect();
        assert!(
            new.len() >= saved_tags.len() && new.len() <= answered_ok.len(),
            "{context}: {} confirmations answered, {} saved, but {} new cases",
            answered_ok.len(),
            saved_tags.len(),
            new.len()
        );
        for (i, case) in new.iter().enumerate() {
            if let Some(tag) = saved_tags.get(i) {
                assert_eq!(
                    &case.id.log_tag(),
                    tag,
                    "{context}: saved case {i} is not the {i}th new case"
                );
            }
            assert_eq!(case.source, CaseSource::Captured, "{context}");
            assert_eq!(
                case.diagnosis.code, answered_ok[i],
                "{context}: label of capture {i}"
            );
            assert!(case.label_confirmed, "{context}");
            assert_eq!(
                case.embedding.len(),
                copy.identity().embedding_dim,
                "{context}"
            );
            image::load_from_memory(&case.thumbnail_jpeg)
                .unwrap_or_else(|e| panic!("{context}: thumbnail of case {i}: {e}"));
            assert_searchable(&copy, case, &context);
        }
        tally.acknowledged += saved_tags.len();
        tally.unacknowledged_kept += new.len() - saved_tags.len();
        tally.unacknowledged_dropped += answered_ok.len() - new.len();
        known = now;
    }

    // The next start after the last kill takes a capture and stops cleanly.
    let mut child = daemon();
    assert!(child.reach(ready), "{}", child.seen.join("\n"));
    assert!(press(&socket, &["capture"]) && press(&socket, &["confirm", "nv"]));
    assert!(
        child.reach(|l| saved_confirmation(l).is_some()),
        "{}",
        child.seen.join("\n")
    );
    let pid = child.process.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, lines) = child.wait();
    assert!(status.success(), "{}", lines.join("\n"));
    let finished = all_cases(&open_store(&store, "after the clean stop"));
    for (id, before) in &known {
        assert!(
            finished.get(id) == Some(before),
            "case {id} lost or changed at the end"
        );
    }
    assert_eq!(finished.len(), known.len() + 1);
    tally.print(test, started);
}

// ---------------------------------------------------------------------------
// dermascope adapter index and adapter train

/// The store of the adapter tests: 12 photographs embedded, `clones` more
/// cases made from them, and two adapters trained on it (`a` last indexed).
struct AdapterFixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: PathBuf,
}

impl AdapterFixture {
    fn new(clones: usize, rng: &mut Rng) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let (labels, _) = synthetic_library(&root, 4);
        let store = root.join("store");
        ingest_all(&root, &labels, &store);
        add_clones(&store, clones, rng);
        Self {
            _dir: dir,
            root,
            store,
        }
    }

    fn train_args(&self, adapter: &Path, seed: u64) -> Vec<String> {
        [
            "adapter",
            "train",
            "--store",
            self.store.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--hidden",
            "8",
            "--epochs",
            "2",
            "--min-cases",
            "3",
            "--adapter-seed",
            &seed.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    fn train(&self, adapter: &Path, seed: u64) {
        let (status, lines) = run_to_end(dermascope("warn").args(self.train_args(adapter, seed)));
        assert!(
            status.success(),
            "adapter train failed:\n{}",
            lines.join("\n")
        );
    }

    fn load(&self, adapter: &Path) -> Result<Adapter, AdapterError> {
        let identity = CaseStore::identity_at(&self.store).unwrap().unwrap();
        Adapter::load(adapter, &identity.model_id, identity.embedding_dim)
    }
}

/// Which cases have a fresh row of `adapter` in `store`, each checked to be
/// the adapter's output for the case (found at similarity 1 by search).
fn fresh_adapter_rows(store: &CaseStore, adapter: &Adapter, context: &str) -> usize {
    let status = store
        .attach_adapter_space(adapter.adapter_id(), adapter.hidden())
        .unwrap();
    let missing: BTreeSet<CaseId> = status.missing.iter().cloned().collect();
    let cases: Vec<Case> = all_cases(store).into_values().collect();
    let outputs = adapter
        .predict_many(
            &cases
                .iter()
                .map(|c| c.embedding.as_slice())
                .collect::<Vec<_>>(),
        )
        .unwrap();
    for (case, output) in cases.iter().zip(outputs) {
        if missing.contains(&case.id) {
            continue;
        }
        // All of them: in 8 dimensions many cases can score as high.
        let hits = store
            .search_adapter_space(&output.embedding, cases.len(), &CaseFilter::default())
            .unwrap();
        assert!(
            hits.iter().any(|h| h.id == case.id && h.score > 0.999),
            "{context}: the adapter row of {} is not the adapter's output",
            case.id
        );
    }
    assert_eq!(status.indexed + missing.len(), cases.len(), "{context}");
    status.indexed
}

/// `adapter index` is killed after the space is attached, inside a batch's
/// flush and after a batch is acknowledged, resuming each time on what the
/// kill left; when one adapter's space is complete the other is indexed.
/// Every acknowledged row is there and is the adapter's output for its
/// case; the store always opens; the last run computes exactly what is left.
#[test]
fn adapter_index_killed_keeps_every_flushed_row_and_resumes() {
    let test = "adapter_index_killed";
    let started = Instant::now();
    let mut rng = Rng::for_test(test);
    // 12 + 600 cases: batches of 256, 256 and 100.
    let fixture = AdapterFixture::new(600, &mut rng);
    let adapters = [
        fixture.root.join("adapter-a"),
        fixture.root.join("adapter-b"),
    ];
    fixture.train(&adapters[0], 1);
    fixture.train(&adapters[1], 2);
    let loaded = adapters.each_ref().map(|dir| fixture.load(dir).unwrap());
    let scratch = fixture.root.join("killed-copy");
    let total = open_store(&fixture.store, "the fixture").len().unwrap();
    // Training b indexed the store in b's space: a starts from nothing.
    let (mut current, mut fresh) = (0, 0);
    let log = "warn,dermascope_store=debug,sled::pagecache::iobuf=debug";
    let index_args = |adapter: &Path| {
        [
            "adapter",
            "index",
            "--store",
            fixture.store.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ]
        .map(String::from)
    };
    let mut tally = Tally::default();
    while tally.kills < KILLS {
        tally.run();
        if fresh == total {
            current = 1 - current;
            fresh = 0;
        }
        let batches = (total - fresh).div_ceil(INDEX_BATCH);
        let acks_first = rng.below(batches);
        let writes_then = rng.below(3);
        let point = format!("after {acks_first} acks and {writes_then} sled writes");
        let mut child = Child::spawn(dermascope(log).args(index_args(&adapters[current])));
        let anchor = |l: &str| {
            l.contains("adapter space attached") || l.contains("adapter embeddings written")
        };
        let reached = reach_point(&mut child, 1 + acks_first, anchor, writes_then);
        let (killed, lines) = if reached {
            child.kill()
        } else {
            let (status, lines) = child.wait();
            assert!(
                status.success(),
                "adapter index failed:\n{}",
                lines.join("\n")
            );
            (None, lines)
        };
        tally.killed(killed.is_some(), &point);
        let context = format!("adapter index killed {point}");
        let acked = acknowledged(&lines, "adapter embeddings written", "rows");
        let copy = open_killed_copy(&fixture.store, &scratch, &context).unwrap();
        assert_eq!(copy.len().unwrap(), total, "{context}: cases lost");
        let now = fresh_adapter_rows(&copy, &loaded[current], &context);
        assert!(
            now >= fresh + acked && now <= (fresh + acked + INDEX_BATCH).min(total),
            "{context}: {fresh} rows before, {acked} acknowledged, {now} after"
        );
        if killed.is_some() {
            tally.acknowledged += acked;
            let in_flight = (total - fresh - acked).min(INDEX_BATCH);
            let kept = now - fresh - acked;
            tally.unacknowledged_kept += kept;
            tally.unacknowledged_dropped += in_flight - kept;
        }
        fresh = now;
    }

    let (status, lines) = run_to_end(dermascope("warn").args(index_args(&adapters[current])));
    let out = lines.join("\n");
    assert!(status.success(), "{out}");
    let expected = format!(
        "{} case embeddings computed, {total} cases searchable",
        total - fresh
    );
    assert!(out.contains(&expected), "expected {expected:?} in:\n{out}");
    let store = open_store(&fixture.store, "after the last run");
    assert_eq!(
        fresh_adapter_rows(&store, &loaded[current], "after the last run"),
        total
    );
    tally.print(test, started);
}

/// The install steps `dermascope_adapter::save` logs, then what `adapter
/// train` does after it: the kill points of the train test.
const TRAIN_POINTS: [&str; 8] = [
    "step=\"model written\"",
    "step=\"model in place\"",
    "step=\"manifest written\"",
    "step=\"manifest in place\"",
    "step=\"old models removed\"",
    "installed in",
    "adapter space attached",
    "adapter embeddings written",
];

/// Whether the install had committed: the manifest naming the new model
/// is in place (logged), or the command said so.
fn install_committed(lines: &[String]) -> bool {
    lines
        .iter()
        .any(|l| l.contains(TRAIN_POINTS[3]) || l.starts_with("installed in"))
}

/// `adapter train` is killed at each step of its install and after it.
/// The folder always holds an adapter that loads and runs (the old one
/// until the new manifest is in place, the new one from then on; before
/// the atomic install, a kill between the model's rename and the
/// manifest's left a checksum mismatch), at most one model file besides
/// the installed one, and a report that parses; the next train works on
/// it, and the last one leaves only its own files.
#[test]
fn adapter_train_killed_while_installing_leaves_the_old_or_the_new_adapter() {
    let test = "adapter_train_killed";
    let started = Instant::now();
    let mut rng = Rng::for_test(test);
    // 12 + 48 cases, 20 per diagnosis.
    let fixture = AdapterFixture::new(48, &mut rng);
    let adapter = fixture.root.join("adapter");
    let scratch = fixture.root.join("killed-copy");
    let log = "warn,dermascope_adapter=debug,dermascope_store=debug";
    // The installed adapter's id and creation time, once there is one.
    let mut installed: Option<(String, u64)> = None;
    let mut tally = Tally::default();
    while tally.kills < KILLS {
        tally.run();
        // Few seeds, so that an adapter is sometimes installed over itself.
        let seed = 1 + rng.below(3) as u64;
        let target = TRAIN_POINTS[rng.below(TRAIN_POINTS.len())];
        let point = format!("at {target} (seed {seed})");
        let cycle_started = now_ms();
        let mut child = Child::spawn(dermascope(log).args(fixture.train_args(&adapter, seed)));
        let reached = child.reach(|line| line.contains(target));
        let (killed, lines) = if reached {
            child.kill()
        } else {
            let (status, lines) = child.wait();
            assert!(
                status.success(),
                "adapter train failed:\n{}",
                lines.join("\n")
            );
            (None, lines)
        };
        tally.killed(killed.is_some(), target);
        let context = format!("adapter train killed {point}");
        let committed = install_committed(&lines);

        let is_new = |a: &Adapter| {
            a.manifest().created_at_ms >= cycle_started && a.manifest().training.seed == seed
        };
        match fixture.load(&adapter) {
            Ok(loaded) => {
                let same_as_before = installed.as_ref().is_some_and(|(id, at)| {
                    loaded.adapter_id() == id && loaded.manifest().created_at_ms == *at
                });
                assert!(
                    if committed {
                        is_new(&loaded)
                    } else {
                        same_as_before || is_new(&loaded)
                    },
                    "{context}: the installed adapter is {:?}, neither the old {installed:?} nor \
                     the new one (committed: {committed})",
                    loaded.manifest()
                );
                let output = loaded.predict(&vec![0.02; loaded.manifest().embedding_dim]);
                assert!(
                    output.is_ok(),
                    "{context}: the adapter does not run: {output:?}"
                );
                installed = Some((
                    loaded.adapter_id().to_string(),
                    loaded.manifest().created_at_ms,
                ));
                if killed.is_some() {
                    match (committed, is_new(&loaded)) {
                        (true, _) => tally.acknowledged += 1,
                        (false, true) => tally.unacknowledged_kept += 1,
                        (false, false) => tally.unacknowledged_dropped += 1,
                    }
                }
            }
            Err(AdapterError::Missing { .. }) if installed.is_none() && !committed => {
                tally.unacknowledged_dropped += 1;
            }
            Err(e) => panic!("{context}: no adapter loads: {e}"),
        }
        let names: Vec<String> = std::fs::read_dir(&adapter)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        let models = names.iter().filter(|n| n.ends_with(".onnx")).count();
        assert!(models <= 2, "{context}: model files pile up: {names:?}");
        for report in ["report.json", "report.txt"] {
            if let Ok(text) = std::fs::read_to_string(adapter.join(report)) {
                assert!(!text.is_empty(), "{context}: {report} is empty");
                if report.ends_with(".json") {
                    serde_json::from_str::<serde_json::Value>(&text)
                        .unwrap_or_else(|e| panic!("{context}: {report} is torn: {e}"));
                }
            }
        }
        // Training opened the store and may have been writing its space.
        drop(open_killed_copy(&fixture.store, &scratch, &context).unwrap());
    }

    // The next train installs cleanly over what the kills left and tidies it.
    let (status, lines) = run_to_end(dermascope("warn").args(fixture.train_args(&adapter, 9)));
    let out = lines.join("\n");
    assert!(status.success(), "{out}");
    let loaded = fixture.load(&adapter).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&adapter)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected = vec![
        loaded.manifest().file.clone(),
        "manifest.toml".to_string(),
        "report.json".into(),
        "report.txt".into(),
    ];
    expected.sort();
    assert_eq!(names, expected);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(saved["adapter_id"], loaded.adapter_id());
    // The daemon's way of loading it (and what `adapter index` does first).
    let (status, lines) = run_to_end(dermascope("warn").args([
        "adapter",
        "index",
        "--store",
        fixture.store.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ]));
    let out = lines.join("\n");
    assert!(status.success(), "{out}");
    assert!(out.contains("0 case embeddings computed"), "{out}");
    tally.print(test, started);
}
