//! Fuzzing on stable Rust, for every parser that reads outside input.
//!
//! cargo-fuzz needs a nightly compiler; proptest runs on stable, inside
//! `cargo test`, and shrinks a failing input to a small one. A fuzz target
//! is one test that feeds a parser through a [`Fuzzer`], property by
//! property:
//!
//! - [`mutants`]: the target's seed corpus (`fuzz/corpus/<target>/`, real
//!   inputs kept in the repository) under bit flips, boundary values,
//!   truncations, deletions, insertions, dictionary tokens and splices of
//!   other seeds;
//! - [`toml_mutants`]: TOML seeds edited as trees (keys removed or added,
//!   values replaced by other types or extreme values, values nested), so
//!   the checks behind the TOML syntax see inputs that get past it;
//! - whatever structure-aware strategy the target adds (round trips).
//!
//! Every input must come back as a value or a typed error. A panic fails the
//! property and proptest shrinks the input; so does a single allocation
//! larger than the [`Fuzzer`]'s limit (measured by [`TrackingAllocator`],
//! which the target's test binary installs), so a length field that claims
//! 4 GB must be refused before it is allocated. Two things cannot be shrunk
//! in-process and abort with the input printed: an allocation request over
//! 1 GiB (which would abort the process anyway, without saying which input
//! made it), and an input still running after [`WATCHDOG`] (a hang; the
//! watchdog is generous, inputs take milliseconds).
//!
//! A failure's seed is kept in
//! `fuzz/corpus/<target>/<property>.proptest-regressions` and replayed first
//! by every later run; each crash found also gets a regression test of its
//! own beside the target.
//!
//! `$DERMASCOPE_FUZZ_CASES` sets the inputs per property (default
//! [`DEFAULT_CASES`], a few seconds per target); each target prints
//! `fuzz <target>: N inputs, F failures` on stderr, past libtest's output
//! capture, so the figures are in every test log.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use proptest;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestError, TestRunner};

/// Inputs per property when `$DERMASCOPE_FUZZ_CASES` is unset.
pub const DEFAULT_CASES: u32 = 256;
/// Largest single allocation one input may cause, unless the target sets
/// its own: far above what any seed needs, far below a trusted garbage length.
pub const DEFAULT_ALLOCATION_LIMIT: usize = 64 << 20;
/// Watchdog, not a timing claim: an input still running this long is a hang.
pub const WATCHDOG: Duration = Duration::from_secs(60);
/// A request this large is reported by the watchdog rather than attempted.
const HARD_ALLOCATION_CAP: usize = 1 << 30;
const IDLE: u64 = u64::MAX;

/// Inputs per property: `$DERMASCOPE_FUZZ_CASES` or [`DEFAULT_CASES`].
///
/// # Panics
/// When the variable is set but is not a positive number: a typo must not
/// quietly shrink the run.
pub fn cases() -> u32 {
    match std::env::var("DERMASCOPE_FUZZ_CASES") {
        Err(_) => DEFAULT_CASES,
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => panic!("DERMASCOPE_FUZZ_CASES={text:?} is not a positive number of inputs"),
        },
    }
}

/// Writes a line on stderr itself: libtest captures `eprintln!`, and drops
/// what it captured when a watchdog aborts the process.
pub fn say(line: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(format!("{line}\n").as_bytes());
}

// ---------------------------------------------------------------- allocator

/// A `#[global_allocator]` for fuzz test binaries: the system allocator,
/// noting the largest single request made on each thread.
///
/// ```
/// #[global_allocator]
/// static ALLOCATOR: dermascope_testkit::fuzz::TrackingAllocator =
///     dermascope_testkit::fuzz::TrackingAllocator;
/// # fn main() {
/// #     // Panics when the binary lacks the allocator.
/// #     drop(dermascope_testkit::fuzz::Fuzzer::new("doc"));
/// # }
/// ```
pub struct TrackingAllocator;

thread_local! {
    // Const-initialised and without destructors, so the allocator may touch
    // them at any time (they never allocate or register a destructor).
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static WATCHED: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
}

fn note(size: usize) {
    let _ = PEAK.try_with(|peak| {
        if size > peak.get() {
            peak.set(size);
        }
    });
    if size > HARD_ALLOCATION_CAP {
        let watched = WATCHED.try_with(Cell::get).unwrap_or(std::ptr::null());
        if !watched.is_null() {
            // SAFETY: WATCHED points at the Shared of the Fuzzer running an
            // input on this thread, and is cleared before that Fuzzer can
            // drop it (see InputScope).
            let shared = unsafe { &*watched };
            shared.oversized.store(size, Ordering::SeqCst);
            // The watchdog prints the input and aborts; sleeping does not
            // allocate.
            loop {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn tracking_installed() -> bool {
    PEAK.with(|peak| peak.set(0));
    drop(std::hint::black_box(vec![0u8; 12_345]));
    PEAK.with(Cell::get) >= 12_345
}

// ------------------------------------------------------------------- runner

struct Shared {
    target: &'static str,
    property: Mutex<String>,
    input: Mutex<Option<Box<dyn fmt::Debug + Send>>>,
    /// Milliseconds since `epoch` when the current input started, or IDLE.
    started: AtomicU64,
    epoch: Instant,
    oversized: AtomicUsize,
    stop: AtomicBool,
}

impl Shared {
    fn die(&self, what: &str) -> ! {
        let property = self.property.lock().map(|p| p.clone()).unwrap_or_default();
        let input = match self.input.lock() {
            Ok(input) => format!("{:?}", input.as_ref().map(|i| i as &dyn fmt::Debug)),
            Err(_) => "<unavailable>".into(),
        };
        say(&format!(
            "fuzz {}/{property}: {what}\ninput: {input}",
            self.target
        ));
        std::process::abort()
    }
}

fn watchdog(shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        let oversized = shared.oversized.load(Ordering::SeqCst);
        if oversized != 0 {
            shared.die(&format!(
                "asked for an allocation of {oversized} bytes: a length read from the input \
                 was trusted before it was checked"
            ));
        }
        let started = shared.started.load(Ordering::SeqCst);
        let now = shared.epoch.elapsed().as_millis() as u64;
        if started != IDLE && now.saturating_sub(started) > WATCHDOG.as_millis() as u64 {
            shared.die(&format!(
                "still running after {} s (watchdog): the parser hangs on this input",
                WATCHDOG.as_secs()
            ));
        }
    }
}

/// Marks this thread as running one input of a Fuzzer; clears the mark
/// even when the input panics.
struct InputScope;

impl InputScope {
    fn enter(shared: &Arc<Shared>) -> Self {
        PEAK.with(|peak| peak.set(0));
        WATCHED.with(|w| w.set(Arc::as_ptr(shared)));
        shared
            .started
            .store(shared.epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
        InputScope
    }
}

impl Drop for InputScope {
    fn drop(&mut self) {
        WATCHED.with(|w| w.set(std::ptr::null()));
    }
}

/// Runs the properties of one fuzz target and counts the inputs tried.
pub struct Fuzzer {
    target: &'static str,
    cases: u32,
    allocation_limit: usize,
    inputs: Arc<AtomicU64>,
    failures: u32,
    shared: Arc<Shared>,
    watchdog: Option<JoinHandle<()>>,
}

impl Fuzzer {
    /// # Panics
    /// When the test binary lacks [`TrackingAllocator`]: allocation limits
    /// would go unchecked.
    pub fn new(target: &'static str) -> Self {
        assert!(
            tracking_installed(),
            "fuzz {target}: the test binary must install \
             dermascope_testkit::fuzz::TrackingAllocator as its #[global_allocator]"
        );
        let shared = Arc::new(Shared {
            target,
            property: Mutex::new(String::new()),
            input: Mutex::new(None),
            started: AtomicU64::new(IDLE),
            epoch: Instant::now(),
            oversized: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let watchdog = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("fuzz-watchdog-{target}"))
                .spawn(move || watchdog(shared))
                .expect("starting the fuzz watchdog thread")
        };
        Self {
            target,
            cases: cases(),
            allocation_limit: DEFAULT_ALLOCATION_LIMIT,
            inputs: Arc::new(AtomicU64::new(0)),
            failures: 0,
            shared,
            watchdog: Some(watchdog),
        }
    }

    /// Sets the largest single allocation one input may cause.
    pub fn allocation_limit(mut self, bytes: usize) -> Self {
        self.allocation_limit = bytes;
        self
    }

    /// Inputs tried so far (shrinking and replayed failures included).
    pub fn inputs(&self) -> u64 {
        self.inputs.load(Ordering::SeqCst)
    }

    /// Runs `test` on [`cases`] inputs from `strategy` (after any failures
    /// kept for `property`). `test` returns `Err` with a message when an
    /// invariant fails; a panic or an allocation over the limit fails too.
    ///
    /// # Panics
    /// With the shrunk input, when the property fails.
    pub fn check<S>(
        &mut self,
        property: &str,
        strategy: S,
        test: impl Fn(S::Value) -> Result<(), String>,
    ) where
        S: Strategy,
        S::Value: Clone + Send + 'static,
    {
        let kept = corpus_dir(self.target).join(format!("{property}.proptest-regressions"));
        // proptest takes the path as &'static str; a few per test run.
        let kept: &'static str = Box::leak(kept.to_string_lossy().into_owned().into_boxed_str());
        let config = Config {
            cases: self.cases,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(kept))),
            ..Config::default()
        };
        if let Ok(mut p) = self.shared.property.lock() {
            *p = property.to_string();
        }
        let shared = Arc::clone(&self.shared);
        let inputs = Arc::clone(&self.inputs);
        let limit = self.allocation_limit;
        let mut runner = TestRunner::new(config);
        let started = Instant::now();
        let before = self.inputs();
        let result = runner.run(&strategy, |value| {
            inputs.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut slot) = shared.input.lock() {
                *slot = Some(Box::new(value.clone()));
            }
            let (outcome, peak) = {
                let _scope = InputScope::enter(&shared);
                let outcome = test(value);
                (outcome, PEAK.with(Cell::get))
            };
            shared.started.store(IDLE, Ordering::SeqCst);
            outcome.map_err(TestCaseError::fail)?;
            if peak > limit {
                return Err(TestCaseError::fail(format!(
                    "one allocation of {peak} bytes (limit {limit}): a length read from the \
                     input was trusted before it was checked"
                )));
            }
            Ok(())
        });
        if std::env::var_os("DERMASCOPE_FUZZ_VERBOSE").is_some() {
            say(&format!(
                "fuzz {}/{property}: {} inputs in {:.2} s",
                self.target,
                self.inputs() - before,
                started.elapsed().as_secs_f64()
            ));
        }
        let failure = match result {
            Ok(()) => return,
            Err(TestError::Fail(reason, value)) => format!("{reason}\nminimal input: {value:?}"),
            Err(TestError::Abort(reason)) => format!("aborted: {reason}"),
        };
        self.failures += 1;
        self.report();
        panic!(
            "fuzz {}/{property}: {failure}\n(its seed is kept in {kept} and replayed first next time)",
            self.target
        );
    }

    fn report(&self) {
        say(&format!(
            "fuzz {}: {} inputs, {} failures",
            self.target,
            self.inputs(),
            self.failures
        ));
    }

    /// Prints the target's figure: `fuzz <target>: N inputs, 0 failures`.
    pub fn finish(self) {
        self.report();
    }
}

impl Drop for Fuzzer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
    }
}

// ------------------------------------------------------------------- corpus

/// One real input kept in the repository.
#[derive(Clone, Debug)]
pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// `fuzz/corpus/<target>` in the workspace.
pub fn corpus_dir(target: &str) -> PathBuf {
    crate::workspace_root().join("fuzz/corpus").join(target)
}

/// Every seed file of `target` (the kept failures and README excepted),
/// by name.
///
/// # Panics
/// When there is none: the corpus is part of the repository.
pub fn seeds(target: &str) -> Vec<Seed> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading the fuzz corpus {}: {e}", dir.display()));
    let mut seeds: Vec<Seed> = entries
        .map(|entry| entry.expect("listing the fuzz corpus").path())
        .filter(|path| path.is_file())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.ends_with(".proptest-regressions") && name != "README.md"
        })
        .map(|path| Seed {
            name: path.file_name().unwrap().to_string_lossy().into_owned(),
            bytes: std::fs::read(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display())),
        })
        .collect();
    seeds.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

// ------------------------------------------------------------ byte mutants

/// A position, scaled to the length of what it points into at the time it
/// is used (so an edit stays meaningful after earlier edits changed the
/// length); shrinks towards the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At(pub u64);

impl At {
    /// An index into `0..len`.
    ///
    /// # Panics
    /// When `len` is 0.
    pub fn index(self, len: usize) -> usize {
        assert!(len > 0, "At::index into nothing");
        ((len as u128 * self.0 as u128) >> 64) as usize
    }

    pub fn get<T>(self, items: &[T]) -> &T {
        &items[self.index(items.len())]
    }
}

fn at() -> impl Strategy<Value = At> {
    any::<u64>().prop_map(At)
}

/// One edit of a seed.
#[derive(Clone, Debug)]
pub enum Mutation {
    FlipBit {
        at: At,
        bit: u8,
    },
    SetByte {
        at: At,
        value: u8,
    },
    /// Overwrites `width` bytes with a little-endian boundary value
    /// (0, 0x7f..., 0xff..., 4 GiB, ...): where a length field lives, this
    /// is what makes it lie.
    Boundary {
        at: At,
        width: u8,
        value: u64,
    },
    Truncate {
        at: At,
    },
    Delete {
        at: At,
        len: u16,
    },
    Insert {
        at: At,
        bytes: Vec<u8>,
    },
    /// Copies `len` bytes from `from` to `at` (repeats a row, a key, a bracket).
    Duplicate {
        from: At,
        len: u16,
        at: At,
    },
    /// Inserts `len` bytes of another seed.
    Splice {
        seed: At,
        from: At,
        len: u16,
        at: At,
    },
    /// Inserts one token of the target's dictionary.
    Token {
        token: At,
        at: At,
    },
}

/// A seed and the edits that made these bytes.
#[derive(Clone)]
pub struct Mutant {
    pub seed: String,
    pub mutations: Vec<Mutation>,
    pub bytes: Vec<u8>,
}

impl fmt::Debug for Mutant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 4096;
        let shown = &self.bytes[..self.bytes.len().min(SHOWN)];
        f.debug_struct("Mutant")
            .field("seed", &self.seed)
            .field("mutations", &self.mutations)
            .field("len", &self.bytes.len())
            .field(
                "bytes",
                &format_args!(
                    "b\"{}\"{}",
                    shown.escape_ascii(),
                    if self.bytes.len() > SHOWN { " ..." } else { "" }
                ),
            )
            .finish()
    }
}

static BOUNDARIES: [(u8, u64); 16] = [
    (1, 0),
    (1, 0x7f),
    (1, 0x80),
    (1, 0xff),
    (2, 0x7fff),
    (2, 0xffff),
    (4, 0),
    (4, 0x7fff_ffff),
    (4, 0xffff_ffff),
    (4, 0x4000_0000),
    (8, 0),
    (8, 0x1_0000_0000),
    (8, 0x7fff_ffff_ffff_ffff),
    (8, u64::MAX),
    (8, u64::MAX - 0xff),
    (8, 1 << 40),
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (at(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (at(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        3 => (at(), prop::sample::select(&BOUNDARIES[..]))
            .prop_map(|(at, (width, value))| Mutation::Boundary { at, width, value }),
        1 => at().prop_map(|at| Mutation::Truncate { at }),
        1 => (at(), 1u16..512).prop_map(|(at, len)| Mutation::Delete { at, len }),
        2 => (at(), prop::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (at(), 1u16..2048, at())
            .prop_map(|(from, len, at)| Mutation::Duplicate { from, len, at }),
        1 => (at(), at(), 1u16..2048, at())
            .prop_map(|(seed, from, len, at)| Mutation::Splice { seed, from, len, at }),
        2 => (at(), at()).prop_map(|(token, at)| Mutation::Token { token, at }),
    ]
}

/// Applies `mutations` to `seed`, in order (`seeds` for splices,
/// `dictionary` for tokens).
pub fn apply(seed: &[u8], mutations: &[Mutation], seeds: &[Seed], dictionary: &[&[u8]]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in mutations {
        let len = b.len();
        // Where an insertion may go: 0..=len.
        let gap = |i: &At| i.index(len + 1);
        match m {
            Mutation::FlipBit { at, bit } if len > 0 => b[at.index(len)] ^= 1 << (bit % 8),
            Mutation::SetByte { at, value } if len > 0 => b[at.index(len)] = *value,
            Mutation::Boundary { at, width, value } if len > 0 => {
                let start = at.index(len);
                let bytes = value.to_le_bytes();
                let end = (start + *width as usize).min(len);
                b[start..end].copy_from_slice(&bytes[..end - start]);
            }
            Mutation::Truncate { at } => b.truncate(at.index(len + 1)),
            Mutation::Delete { at, len: n } if len > 0 => {
                let start = at.index(len);
                let end = (start + *n as usize).min(len);
                b.drain(start..end);
            }
            Mutation::Insert { at, bytes } => {
                let at = gap(at);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Duplicate { from, len: n, at } if len > 0 => {
                let start = from.index(len);
                let piece = b[start..(start + *n as usize).min(len)].to_vec();
                let at = gap(at);
                b.splice(at..at, piece);
            }
            Mutation::Splice {
                seed,
                from,
                len: n,
                at,
            } if !seeds.is_empty() => {
                let other = &seed.get(seeds).bytes;
                if !other.is_empty() {
                    let start = from.index(other.len());
                    let piece = &other[start..(start + *n as usize).min(other.len())];
                    let at = gap(at);
                    b.splice(at..at, piece.iter().copied());
                }
            }
            Mutation::Token { token, at } if !dictionary.is_empty() => {
                let token = token.get(dictionary);
                let at = gap(at);
                b.splice(at..at, token.iter().copied());
            }
            _ => {}
        }
    }
    b
}

/// `seeds` under one to eight [`Mutation`]s each; `dictionary` holds the
/// target's tokens (keywords, delimiters, magic numbers).
pub fn mutants(
    seeds: Vec<Seed>,
    dictionary: &'static [&'static [u8]],
) -> impl Strategy<Value = Mutant> {
    assert!(!seeds.is_empty(), "mutants need at least one seed");
    let seeds = Arc::new(seeds);
    (0..seeds.len(), prop::collection::vec(mutation(), 1..=8)).prop_map(move |(i, mutations)| {
        Mutant {
            seed: seeds[i].name.clone(),
            bytes: apply(&seeds[i].bytes, &mutations, &seeds, dictionary),
            mutations,
        }
    })
}

/// Bytes with no structure at all, up to `max` of them.
pub fn random_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=max)
}

/// The three properties every fuzz target of a TOML file checks, on the
/// target's seeds: byte mutants (with `tokens`), TOML edits (with `keys`
/// among the keys they may add), and random text; `check_text` sees each
/// input as text.
pub fn fuzz_toml_text(
    target: &'static str,
    tokens: &'static [&'static [u8]],
    keys: &'static [&'static str],
    check_text: impl Fn(&str) -> Result<(), String>,
) {
    let seeds = seeds(target);
    let mut fuzzer = Fuzzer::new(target);
    fuzzer.check("mutants", mutants(seeds.clone(), tokens), |m| {
        check_text(&String::from_utf8_lossy(&m.bytes))
    });
    fuzzer.check("toml-edits", toml_mutants(&seeds, keys), |m| {
        check_text(&m.text)
    });
    fuzzer.check("random-text", any::<String>(), |t| check_text(&t));
    fuzzer.finish();
}

// ------------------------------------------------------------- TOML mutants

/// One edit of a TOML tree; `at` picks one of the tree's nodes (the root
/// table included), in document order.
#[derive(Clone, Debug)]
pub enum TomlEdit {
    Remove {
        at: At,
    },
    Replace {
        at: At,
        value: toml::Value,
    },
    /// Adds `key = value` to the table at (or above) the node.
    Insert {
        at: At,
        key: String,
        value: toml::Value,
    },
    /// Wraps the node in `depth` arrays.
    Nest {
        at: At,
        depth: u8,
    },
    /// Replaces a string, integer, float or boolean by another of its type
    /// (the one given here for that type), so the document still fits its
    /// schema and the checks behind it run.
    Tweak {
        at: At,
        string: String,
        integer: i64,
        float: f64,
    },
}

/// A TOML seed after some [`TomlEdit`]s, as text.
#[derive(Clone)]
pub struct TomlMutant {
    pub seed: String,
    pub edits: Vec<TomlEdit>,
    pub text: String,
}

impl fmt::Debug for TomlMutant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TomlMutant")
            .field("seed", &self.seed)
            .field("edits", &self.edits)
            .field("text", &self.text)
            .finish()
    }
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Item(usize),
}

fn node_paths(value: &toml::Value, path: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(path.clone());
    match value {
        toml::Value::Table(table) => {
            for (key, child) in table {
                path.push(Step::Key(key.clone()));
                node_paths(child, path, out);
                path.pop();
            }
        }
        toml::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                path.push(Step::Item(i));
                node_paths(child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(mut value: &'a mut toml::Value, path: &[Step]) -> Option<&'a mut toml::Value> {
    for step in path {
        value = match (value, step) {
            (toml::Value::Table(t), Step::Key(k)) => t.get_mut(k)?,
            (toml::Value::Array(a), Step::Item(i)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(value)
}

fn edit(root: &mut toml::Value, edit: &TomlEdit) {
    let mut paths = Vec::new();
    node_paths(root, &mut Vec::new(), &mut paths);
    let at = match edit {
        TomlEdit::Remove { at }
        | TomlEdit::Replace { at, .. }
        | TomlEdit::Insert { at, .. }
        | TomlEdit::Nest { at, .. }
        | TomlEdit::Tweak { at, .. } => at.get(&paths).clone(),
    };
    match edit {
        TomlEdit::Remove { .. } => {
            let Some((last, parent)) = at.split_last() else {
                return;
            };
            match (node_mut(root, parent), last) {
                (Some(toml::Value::Table(t)), Step::Key(k)) => {
                    t.remove(k);
                }
                (Some(toml::Value::Array(a)), Step::Item(i)) if *i < a.len() => {
                    a.remove(*i);
                }
                _ => {}
            }
        }
        TomlEdit::Replace { value, .. } => {
            // The document itself must stay a table.
            if let (false, Some(node)) = (at.is_empty(), node_mut(root, &at)) {
                *node = value.clone();
            }
        }
        TomlEdit::Insert { key, value, .. } => {
            let mut path = at;
            loop {
                match node_mut(root, &path) {
                    Some(toml::Value::Table(t)) => {
                        t.insert(key.clone(), value.clone());
                        return;
                    }
                    Some(toml::Value::Array(a)) => {
                        a.push(value.clone());
                        return;
                    }
                    _ if path.pop().is_some() => {}
                    _ => return,
                }
            }
        }
        TomlEdit::Tweak {
            string,
            integer,
            float,
            ..
        } => {
            if let Some(node) = node_mut(root, &at) {
                match node {
                    toml::Value::String(s) => *s = string.clone(),
                    toml::Value::Integer(i) => *i = *integer,
                    toml::Value::Float(f) => *f = *float,
                    toml::Value::Boolean(b) => *b = !*b,
                    _ => {}
                }
            }
        }
        TomlEdit::Nest { depth, .. } => {
            if let (false, Some(node)) = (at.is_empty(), node_mut(root, &at)) {
                for _ in 0..*depth {
                    *node = toml::Value::Array(vec![node.clone()]);
                }
            }
        }
    }
}

fn strings_in(value: &toml::Value, keys: &mut BTreeSet<String>, strings: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                keys.insert(k.clone());
                strings_in(v, keys, strings);
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| strings_in(v, keys, strings)),
        toml::Value::String(s) => {
            strings.insert(s.clone());
        }
        _ => {}
    }
}

type Leaves = (
    BoxedStrategy<String>,
    BoxedStrategy<i64>,
    BoxedStrategy<f64>,
);

fn toml_leaves(strings: Vec<String>) -> Leaves {
    let text = prop_oneof![
        3 => prop::sample::select(strings),
        1 => any::<String>(),
        1 => prop::sample::select(vec![
            String::new(),
            " ".into(),
            "..".into(),
            ".".into(),
            "../../etc/passwd".into(),
            "/etc/passwd".into(),
            "a/b".into(),
            "x".repeat(5000),
            "\u{0}\u{7}\u{1b}[2J".into(),
            "\u{feff}\u{202e}".into(),
        ]),
    ];
    let integer = prop_oneof![
        2 => -3i64..300,
        1 => any::<i64>(),
        2 => prop::sample::select(vec![
            i64::MIN,
            -1,
            0,
            1,
            255,
            256,
            65_535,
            65_536,
            i64::from(u32::MAX),
            1 << 32,
            i64::MAX,
        ]),
    ];
    let float = prop_oneof![
        2 => -2.0f64..300.0,
        1 => any::<f64>(),
        2 => prop::sample::select(vec![
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            0.0,
            1e308,
            f64::MIN_POSITIVE,
            5e-324,
            1e-9,
        ]),
    ];
    (text.boxed(), integer.boxed(), float.boxed())
}

fn toml_value((text, integer, float): Leaves) -> BoxedStrategy<toml::Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(toml::Value::Boolean),
        integer.prop_map(toml::Value::Integer),
        float.prop_map(toml::Value::Float),
        text.prop_map(toml::Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// `seeds` (valid TOML) under one to four [`TomlEdit`]s each. Keys and
/// string values are drawn mostly from those the seeds use, and from
/// `extra_keys`, so edits reach the checks behind the syntax.
///
/// # Panics
/// When a seed is not TOML.
pub fn toml_mutants(
    seeds: &[Seed],
    extra_keys: &'static [&'static str],
) -> impl Strategy<Value = TomlMutant> {
    let mut keys: BTreeSet<String> = extra_keys.iter().map(|k| k.to_string()).collect();
    let mut strings = BTreeSet::new();
    let trees: Vec<(String, toml::Value)> = seeds
        .iter()
        .map(|seed| {
            let text = std::str::from_utf8(&seed.bytes)
                .unwrap_or_else(|_| panic!("seed {} is not UTF-8", seed.name));
            let table: toml::Table = toml::from_str(text)
                .unwrap_or_else(|e| panic!("seed {} is not TOML: {e}", seed.name));
            let value = toml::Value::Table(table);
            strings_in(&value, &mut keys, &mut strings);
            (seed.name.clone(), value)
        })
        .collect();
    strings.insert("x".into());
    let keys: Vec<String> = keys.into_iter().collect();
    let strings: Vec<String> = strings.into_iter().collect();
    let key = prop_oneof![4 => prop::sample::select(keys), 1 => "[a-z_]{1,12}"];
    let leaves = toml_leaves(strings);
    let value = toml_value(leaves.clone());
    let (text, integer, float) = leaves;
    // Mostly edits that keep the schema, so that most mutants reach the
    // checks behind the TOML syntax and the types.
    let one = prop_oneof![
        1 => at().prop_map(|at| TomlEdit::Remove { at }),
        2 => (at(), value.clone()).prop_map(|(at, value)| TomlEdit::Replace { at, value }),
        1 => (at(), key, value)
            .prop_map(|(at, key, value)| TomlEdit::Insert { at, key, value }),
        1 => (at(), 1u8..4).prop_map(|(at, depth)| TomlEdit::Nest { at, depth }),
        8 => (at(), text, integer, float).prop_map(|(at, string, integer, float)| {
            TomlEdit::Tweak { at, string, integer, float }
        }),
    ];
    let trees = Arc::new(trees);
    (0..trees.len(), prop::collection::vec(one, 1..=4)).prop_map(move |(i, edits)| {
        let (name, tree) = &trees[i];
        let mut tree = tree.clone();
        for e in &edits {
            edit(&mut tree, e);
        }
        // A tree TOML cannot spell (rare) is tried as the seed itself.
        let text = toml::to_string(&tree)
            .or_else(|_| toml::to_string(&trees[i].1))
            .unwrap_or_default();
        TomlMutant {
            seed: name.clone(),
            edits,
            text,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_edit_where_they_say() {
        let half = At(1 << 63);
        let start = At(0);
        let seed = b"abcdefgh";
        assert_eq!(
            apply(seed, &[Mutation::Truncate { at: half }], &[], &[]),
            b"abcd"
        );
        assert_eq!(
            apply(seed, &[Mutation::FlipBit { at: start, bit: 0 }], &[], &[]),
            b"`bcdefgh"
        );
        assert_eq!(
            apply(
                seed,
                &[Mutation::Boundary {
                    at: half,
                    width: 8,
                    value: u64::MAX
                }],
                &[],
                &[]
            ),
            b"abcd\xff\xff\xff\xff"
        );
        assert_eq!(
            apply(
                seed,
                &[Mutation::Token {
                    token: start,
                    at: start
                }],
                &[],
                &[b"<>"]
            ),
            b"<>abcdefgh"
        );
        assert_eq!(
            apply(b"", &[Mutation::Delete { at: start, len: 3 }], &[], &[]),
            b""
        );
    }

    #[test]
    fn toml_edits_keep_a_table_at_the_root() {
        let mut tree = toml::Value::Table(toml::from_str("a = 1\n[b]\nc = \"x\"\n").unwrap());
        edit(
            &mut tree,
            &TomlEdit::Replace {
                at: At(0),
                value: toml::Value::Integer(3),
            },
        );
        assert!(tree.is_table(), "the root is never replaced");
        // Nodes in order: root, a, b, b.c; the last is b.c.
        edit(
            &mut tree,
            &TomlEdit::Nest {
                at: At(u64::MAX),
                depth: 2,
            },
        );
        assert_eq!(
            tree["b"]["c"],
            toml::Value::Array(vec![toml::Value::Array(vec!["x".into()])])
        );
        edit(
            &mut tree,
            &TomlEdit::Remove {
                at: At((1 << 62) + 1),
            },
        );
        assert!(tree.get("a").is_none(), "{tree:?}");
    }
}
