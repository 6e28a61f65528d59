//! The writer and checker of the power-cut test (`scripts/test-powercut`),
//! run inside the arm64 VM on an ext4 virtual disk whose qemu is killed.
//!
//! ```text
//! powercut --store DIR --boot B [--settled B:M:N,...] [--previous B:N,...] [--check-only]
//! ```
//!
//! Every boot's writes are a pure function of its number (`Plan`), so the
//! host only has to remember how far each boot got. `--previous B:N`: boot B
//! was cut after the host had read N acknowledgements from the console; the
//! store must hold the state after some prefix of B's writes that includes
//! the first N (each write whole or not at all), and this boot finds that
//! prefix M and reports it (several such boots, oldest first, when a cut
//! came before a boot finished its check). `--settled B:M:N`: an earlier
//! boot's prefix, as a later boot found it; all M writes must still be there
//! exactly, and the first N count as acknowledged.
//!
//! Then, unless `--check-only`, this boot writes its own plan until the host
//! cuts the power: single inserts (a third with an original photograph of
//! camera size), batches, removals of its own cases, and index cache
//! checkpoints. Embeddings are 2048-d, as the encoder's, so sled's leaves go
//! to blob files as in normal use.
//!
//! One fact per line on stdout:
//!
//! ```text
//! powercut opened in 812 ms via CacheReplayed { .. } journal None|Replayed { rows: 9 }|Torn
//! powercut open-failed <error>                            (exit 3)
//! powercut settled 4 17                                   (boot 4 kept its first 17 writes)
//! powercut lost <id> <why>                                (an acknowledged case, or removal, is not as acknowledged)
//! powercut check-failed <why>                             (anything else is wrong; exit 1 after the report)
//! powercut verified cases=412 acknowledged=380 removed=31 searched=64 blobs=23 lost=0
//! powercut ingest                                         (writing from here on)
//! write 7 insert|original|batch|remove|checkpoint
//! ack 7                                                   (write 7 returned Ok: acknowledged)
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::{identity, jpeg, make_case, Rng};
use dermascope_store::{
    CaseFilter, CaseId, CaseStore, CaseWrite, OriginalPhoto, ScoreKind, StoreError,
};

/// The encoder's dimension: a leaf of 16 rows is over sled's blob size.
const DIM: usize = 2048;
/// A checkpoint (index cache write) every this many writes.
const CHECKPOINT_EVERY: u64 = 15;
/// Watchdog, not a measurement: a writer the host has not cut by now has
/// lost its host; it stops rather than fill the disk.
const WRITER_WATCHDOG: Duration = Duration::from_secs(240);
/// How many of the previous boot's cases, and how many older ones, are
/// searched for by their embeddings.
const SEARCH_SAMPLE: usize = 32;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[derive(Clone, Debug)]
enum Op {
    Insert(String),
    /// An insert with an original photograph of this many bytes.
    WithOriginal(String, usize),
    Batch(Vec<String>),
    Remove(String),
    Checkpoint,
}

impl Op {
    /// The cases it adds (`true`) or removes (`false`).
    fn effects(&self) -> impl Iterator<Item = (&str, bool)> {
        let (ids, added): (&[String], bool) = match self {
            Op::Insert(id) | Op::WithOriginal(id, _) => (std::slice::from_ref(id), true),
            Op::Batch(ids) => (ids, true),
            Op::Remove(id) => (std::slice::from_ref(id), false),
            Op::Checkpoint => (&[], true),
        };
        ids.iter().map(move |id| (id.as_str(), added))
    }

    fn kind(&self) -> &'static str {
        match self {
            Op::Insert(_) => "insert",
            Op::WithOriginal(..) => "original",
            Op::Batch(_) => "batch",
            Op::Remove(_) => "remove",
            Op::Checkpoint => "checkpoint",
        }
    }
}

/// Boot `boot`'s writes, in order; the same for the writer and every checker.
struct Plan {
    boot: u64,
    n: u64,
    rng: Rng,
    live: Vec<String>,
}

impl Plan {
    fn new(boot: u64) -> Self {
        Self {
            boot,
            n: 0,
            rng: Rng(0x090E_3C07 ^ boot.wrapping_mul(0x9E37_79B9)),
            live: Vec::new(),
        }
    }

    fn next_op(&mut self) -> Op {
        self.n += 1;
        let id = format!("b{:03}-{:04}", self.boot, self.n);
        if self.n.is_multiple_of(CHECKPOINT_EVERY) {
            return Op::Checkpoint;
        }
        let op = match self.rng.below(10) {
            0..=2 => Op::Insert(id),
            3..=4 => Op::WithOriginal(id, 150_000 + self.rng.below(350_000) as usize),
            5..=8 => Op::Batch(
                (0..2 + self.rng.below(7))
                    .map(|j| format!("{id}-{j}"))
                    .collect(),
            ),
            _ if !self.live.is_empty() => {
                let at = self.rng.below(self.live.len() as u64) as usize;
                Op::Remove(self.live.swap_remove(at))
            }
            _ => Op::Insert(id),
        };
        match &op {
            Op::Insert(id) | Op::WithOriginal(id, _) => self.live.push(id.clone()),
            Op::Batch(ids) => self.live.extend(ids.iter().cloned()),
            Op::Remove(_) | Op::Checkpoint => {}
        }
        op
    }
}

/// The boot whose plan made case `id` (`b004-0017-2` -> 4).
fn plan_of(id: &str) -> Option<u64> {
    id.strip_prefix('b')?.split('-').next()?.parse().ok()
}

/// The write of its boot's plan that made case `id` (`b004-0017-2` -> 17).
fn op_of(id: &str) -> Option<u64> {
    id.split('-').nth(1)?.parse().ok()
}

/// A camera-sized original: a real (small) JPEG, then bytes that are a pure
/// function of the id. The store keeps the bytes and reads only the header.
fn original_of(id: &str, len: usize, head: &[u8]) -> OriginalPhoto {
    let mut seed = 0x0081_91A1_u64;
    for b in id.bytes() {
        seed = seed.rotate_left(7) ^ u64::from(b);
    }
    let mut rng = Rng(seed);
    let mut bytes = head.to_vec();
    bytes.extend((head.len()..len).map(|_| rng.next_u64() as u8));
    OriginalPhoto::from_jpeg(bytes).expect("a JPEG header followed by padding is accepted")
}

/// What the store must hold of the boots checked.
#[derive(Default)]
struct Expected {
    /// Live case id -> length of its original, if it has one.
    live: BTreeMap<String, Option<usize>>,
    /// Cases whose removal landed.
    removed: BTreeSet<String>,
    /// Of `live` and `removed`, those that were acknowledged (not only landed).
    acknowledged: BTreeSet<String>,
    /// Touched by writes whose outcome is unknown (after a failed check).
    excused: BTreeSet<String>,
}

impl Expected {
    fn apply(&mut self, op: &Op, acknowledged: bool) {
        let mut ack = |id: &String| {
            if acknowledged {
                self.acknowledged.insert(id.clone());
            }
        };
        match op {
            Op::Insert(id) => {
                ack(id);
                self.live.insert(id.clone(), None);
            }
            Op::WithOriginal(id, len) => {
                ack(id);
                self.live.insert(id.clone(), Some(*len));
            }
            Op::Batch(ids) => {
                for id in ids {
                    ack(id);
                    self.live.insert(id.clone(), None);
                }
            }
            Op::Remove(id) => {
                ack(id);
                self.live.remove(id);
                self.removed.insert(id.clone());
            }
            Op::Checkpoint => {}
        }
    }
}

struct Args {
    store: String,
    boot: u64,
    settled: Vec<(u64, u64, u64)>,
    previous: Vec<(u64, u64)>,
    check_only: bool,
}

/// `B:N,...` (or `B:M:N,...`) as lists of numbers.
fn parse_list(text: &str, fields: usize) -> Result<Vec<Vec<u64>>, String> {
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|item| {
            let numbers: Vec<u64> = item
                .split(':')
                .map(|n| n.parse().map_err(|_| format!("bad number in {item:?}")))
                .collect::<Result<_, _>>()?;
            if numbers.len() == fields {
                Ok(numbers)
            } else {
                Err(format!("{item:?} does not have {fields} fields"))
            }
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        store: String::new(),
        boot: 0,
        settled: Vec::new(),
        previous: Vec::new(),
        check_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--store" => args.store = value()?,
            "--boot" => args.boot = value()?.parse().map_err(|_| "bad --boot")?,
            "--settled" => {
                args.settled = parse_list(&value()?, 3)?
                    .iter()
                    .map(|v| (v[0], v[1], v[2]))
                    .collect()
            }
            "--previous" => {
                args.previous = parse_list(&value()?, 2)?
                    .iter()
                    .map(|v| (v[0], v[1]))
                    .collect()
            }
            "--check-only" => args.check_only = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.store.is_empty() {
        return Err("--store is required".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(why) => {
            eprintln!("powercut: {why}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let store = match CaseStore::open(&args.store, identity(DIM)) {
        Ok(store) => store,
        Err(e) => {
            say(&format!("powercut open-failed {e}"));
            return ExitCode::from(3);
        }
    };
    say(&format!(
        "powercut opened in {} ms via {:?} journal {:?}",
        started.elapsed().as_millis(),
        store.open_report().index_source,
        store.open_report().journal
    ));
    let head = jpeg(64, 48);
    match check(&store, &args, &head) {
        Ok(true) => {}
        Ok(false) => return ExitCode::from(1),
        Err(e) => {
            say(&format!("powercut check-failed {e}"));
            return ExitCode::from(1);
        }
    }
    if args.check_only {
        return ExitCode::SUCCESS;
    }
    say("powercut ingest");
    match ingest(&store, args.boot, &head) {
        Ok(()) => {
            eprintln!("powercut: watchdog: not cut within {WRITER_WATCHDOG:?}");
            ExitCode::from(6)
        }
        Err(e) => {
            say(&format!("powercut write-failed {e}"));
            ExitCode::from(4)
        }
    }
}

/// Checks the store against every earlier boot; `Ok(false)`: a check failed
/// (reported line by line).
fn check(store: &CaseStore, args: &Args, head: &[u8]) -> Result<bool, StoreError> {
    let mut ok = true;
    let mut fail = |why: String| {
        say(&format!("powercut check-failed {why}"));
        ok = false;
    };
    let on_disk: BTreeSet<String> = store.ids()?.iter().map(|id| id.to_string()).collect();
    let mut expected = Expected::default();
    for &(boot, m, acked) in &args.settled {
        let mut plan = Plan::new(boot);
        for n in 1..=m {
            expected.apply(&plan.next_op(), n <= acked);
        }
    }
    let mut searched_ids: Vec<String> = Vec::new();
    for &(boot, acked) in &args.previous {
        let mut plan = Plan::new(boot);
        let theirs: BTreeSet<&str> = on_disk
            .iter()
            .map(String::as_str)
            .filter(|id| plan_of(id) == Some(boot))
            .collect();
        // Removals may follow the last insert that landed: look a little past it.
        let bound = theirs
            .iter()
            .filter_map(|id| op_of(id))
            .max()
            .unwrap_or(0)
            .max(acked)
            + 64;
        let ops: Vec<Op> = (0..bound).map(|_| plan.next_op()).collect();
        // The first prefix of at least the acknowledged writes whose state is
        // what the store holds of this boot, tracked as the size of the
        // difference between the two sets.
        let mut live: BTreeSet<&str> = BTreeSet::new();
        let mut diff = theirs.len() as i64;
        let mut landed = None;
        for (i, op) in ops.iter().enumerate() {
            let n = i as u64;
            if n >= acked && diff == 0 {
                landed = Some(n);
                break;
            }
            for (id, added) in op.effects() {
                let stored = theirs.contains(id);
                if added {
                    live.insert(id);
                } else {
                    live.remove(id);
                }
                diff += if added == stored { -1 } else { 1 };
            }
        }
        if landed.is_none() && diff == 0 {
            landed = Some(bound);
        }
        match landed {
            Some(m) => {
                for (i, op) in ops.iter().take(m as usize).enumerate() {
                    expected.apply(op, (i as u64) < acked);
                }
                say(&format!("powercut settled {boot} {m}"));
            }
            None => {
                fail(format!(
                    "boot {boot}'s cases are the state after none of its first {acked} to {bound} writes"
                ));
                // Still count what is missing of the acknowledged writes,
                // except what a later write may have removed.
                for op in ops.iter().take(acked as usize) {
                    expected.apply(op, true);
                }
                for op in ops.iter().skip(acked as usize) {
                    expected
                        .excused
                        .extend(op.effects().map(|(id, _)| id.to_owned()));
                }
            }
        }
        for op in ops.iter().take(acked as usize) {
            match op {
                Op::Insert(id) | Op::WithOriginal(id, _) => searched_ids.push(id.clone()),
                Op::Batch(ids) => searched_ids.extend(ids.iter().cloned()),
                Op::Remove(_) | Op::Checkpoint => {}
            }
        }
    }

    let mut lost = 0;
    for (id, original) in &expected.live {
        if expected.excused.contains(id) {
            continue;
        }
        let acked = expected.acknowledged.contains(id);
        let why = match store.get(&CaseId::new(id.clone()).expect("plan ids are valid"))? {
            None => Some("missing".to_owned()),
            Some(got) if got != make_case(id, DIM) => Some("differs from what was written".into()),
            Some(_) => {
                let want = original.map(|len| original_of(id, len, head));
                let got = store.original(&CaseId::new(id.clone()).expect("valid"))?;
                match (got, want) {
                    (None, None) => None,
                    (Some(g), Some(w)) if g.jpeg() == w.jpeg() => None,
                    (None, Some(_)) => Some("its original photograph is missing".into()),
                    _ => Some("its original photograph differs".into()),
                }
            }
        };
        if let Some(why) = why {
            if acked {
                lost += 1;
                say(&format!("powercut lost {id} {why}"));
            } else {
                fail(format!("{id} (landed, not acknowledged) is {why}"));
            }
        }
    }
    for id in &expected.removed {
        if on_disk.contains(id) && !expected.excused.contains(id) {
            lost += 1;
            say(&format!("powercut lost {id} its removal was undone"));
        }
    }
    if let Some(stray) = on_disk
        .iter()
        .find(|id| !expected.live.contains_key(*id) && !expected.excused.contains(*id))
    {
        fail(format!(
            "{stray} is stored but is not in any checked prefix of writes"
        ));
    }
    if !store.open_report().corrupt.is_empty() {
        fail(format!("corrupt rows: {:?}", store.open_report().corrupt));
    }
    let problems = store.check_integrity()?;
    if !problems.is_empty() {
        fail(format!("trees disagree: {problems:?}"));
    }
    let indexed = store.len()?;
    if indexed != on_disk.len() {
        fail(format!(
            "index holds {indexed} cases, sled {}",
            on_disk.len()
        ));
    }

    // By search: the previous boot's cases, and a sample of the older ones.
    let older: Vec<&String> = expected
        .live
        .keys()
        .filter(|id| !searched_ids.contains(id))
        .collect();
    let mut rng = Rng(args.boot ^ 0x5EA);
    searched_ids.retain(|id| expected.live.contains_key(id) && on_disk.contains(id));
    // Each query scans every row, under emulation: bound the work.
    searched_ids.truncate(SEARCH_SAMPLE);
    for _ in 0..SEARCH_SAMPLE.min(older.len()) {
        let id = older[rng.below(older.len() as u64) as usize];
        if on_disk.contains(id) {
            searched_ids.push(id.clone());
        }
    }
    let cases: Vec<_> = searched_ids.iter().map(|id| make_case(id, DIM)).collect();
    for chunk in cases.chunks(32) {
        let queries: Vec<&[f32]> = chunk.iter().map(|c| c.embedding.as_slice()).collect();
        for kind in [ScoreKind::F32, ScoreKind::Int8] {
            let results = store.search_batch(&queries, 1, &CaseFilter::any(), kind)?;
            for (case, hits) in chunk.iter().zip(results) {
                match hits.first() {
                    Some(h) if h.id == case.id && (h.score - 1.0).abs() < 0.02 => {}
                    other => fail(format!(
                        "{} not found first by its own embedding ({kind:?}): {other:?}",
                        case.id
                    )),
                }
            }
        }
    }
    // sled's files of their own: the ones the power cut is about.
    let blobs = std::fs::read_dir(store.path().join("blobs")).map_or(0, |d| d.count());
    say(&format!(
        "powercut verified cases={} acknowledged={} removed={} searched={} blobs={blobs} lost={lost}",
        expected.live.len(),
        expected.acknowledged.len(),
        expected.removed.len(),
        cases.len(),
    ));
    Ok(ok && lost == 0)
}

/// Writes boot `boot`'s plan until the power goes (or the watchdog).
fn ingest(store: &CaseStore, boot: u64, head: &[u8]) -> Result<(), StoreError> {
    let mut plan = Plan::new(boot);
    let watchdog = Instant::now() + WRITER_WATCHDOG;
    while Instant::now() < watchdog {
        let op = plan.next_op();
        say(&format!("write {} {}", plan.n, op.kind()));
        match &op {
            Op::Insert(id) => store.insert(&make_case(id, DIM))?,
            Op::WithOriginal(id, len) => {
                let case = make_case(id, DIM);
                let original = original_of(id, *len, head);
                store.insert_with_originals(&[CaseWrite {
                    case: &case,
                    original: Some(&original),
                }])?;
            }
            Op::Batch(ids) => {
                let cases: Vec<_> = ids.iter().map(|id| make_case(id, DIM)).collect();
                store.insert_batch(&cases)?;
            }
            Op::Remove(id) => {
                store.remove(&CaseId::new(id.clone()).expect("plan ids are valid"))?;
            }
            Op::Checkpoint => {
                store.checkpoint()?;
            }
        }
        say(&format!("ack {}", plan.n));
    }
    Ok(())
}
