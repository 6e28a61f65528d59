//! Test-only helpers shared by every test crate of the workspace.
//!
//! # Skips are counted, and refused where the data is known to be there
//!
//! libtest has no run-time skip: a test that returns early passes, and its
//! "SKIPPED" line is swallowed with the rest of a passing test's output. So
//! every skip goes through [`skip`], which
//!
//! - prints `SKIPPED <test>: <reason>` on stderr (seen with `--nocapture`),
//! - appends `<test>\t<need>\t<reason>` to the file named by
//!   `$DERMASCOPE_SKIP_LOG`, which `scripts/test` reads to subtract skips
//!   from libtest's passes and print them as skipped, and
//! - panics instead when `$DERMASCOPE_REQUIRE` lists the test's [`Need`]
//!   (comma-separated names, e.g. `derm,isic`): `scripts/test` sets it for
//!   each data folder it found beside the checkout, so a test that fails to
//!   find data CI does have fails rather than silently skipping.
//!
//! Architecture Invariant: a test that did not check its claim never counts
//! as passed in `scripts/test`'s closing line.
//!
//! # PostgreSQL
//!
//! [`postgres`] gives a test a fresh database on a PostgreSQL 18 + pgvector
//! server, [`postgres_private`] a server of its own to stop and start (see
//! the `postgres` module's docs; `scripts/pg` runs the servers).
//!
//! # Fuzzing
//!
//! [`fuzz`] is the harness behind every fuzz target (seed corpora under
//! `fuzz/corpus/`, proptest strategies, allocation limits, a hang watchdog).

pub mod fuzz;
mod postgres;

pub use postgres::{postgres, postgres_private, psql, Postgres, PrivateServer};

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a skipped test lacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `../shared/data/derm` (HAM10000 subset) or `$DERMASCOPE_DERM_DATA`.
    Derm,
    /// `../shared/data/isic-uda1` or `$DERMASCOPE_ISIC_DATA`.
    Isic,
    /// Hardware or an OS facility this machine lacks (or has, where a test
    /// checks the error for its absence).
    Hardware,
    /// A PostgreSQL 18 + pgvector server ([`postgres`]): `$DERMASCOPE_TEST_PG`
    /// or one `scripts/pg` runs.
    Postgres,
    /// Debian's `chromium`, run headless by the fleet status page's
    /// browser test (`scripts/setup` installs it).
    Chromium,
    /// Debian's `rauc` with D-Bus, debugfs and openssl, for the boot-slot
    /// test's real RAUC service (`scripts/setup` installs them).
    Rauc,
}

impl Need {
    pub fn name(self) -> &'static str {
        match self {
            Need::Derm => "derm",
            Need::Isic => "isic",
            Need::Hardware => "hardware",
            Need::Postgres => "postgres",
            Need::Chromium => "chromium",
            Need::Rauc => "rauc",
        }
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `$DERMASCOPE_REQUIRE` names `need`.
pub fn required(need: Need) -> bool {
    std::env::var("DERMASCOPE_REQUIRE")
        .map(|list| list.split(',').any(|n| n.trim() == need.name()))
        .unwrap_or(false)
}

/// Records that `test` did not run its claim because it lacks `need`.
/// Call it, then return from the test.
///
/// # Panics
/// When `$DERMASCOPE_REQUIRE` names `need`: the run promised that data.
pub fn skip(test: &str, need: Need, reason: &str) {
    if required(need) {
        panic!(
            "{test} would be skipped ({reason}), but DERMASCOPE_REQUIRE={} says this run has \
             {need}: the test looked in the wrong place, or the data or server is damaged",
            std::env::var("DERMASCOPE_REQUIRE").unwrap_or_default()
        );
    }
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("DERMASCOPE_SKIP_LOG") {
        // One short write per line with O_APPEND: lines from parallel tests
        // do not interleave.
        let line = format!("{test}\t{need}\t{}\n", reason.replace(['\n', '\t'], " "));
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(error) = written {
            panic!(
                "{test}: could not record the skip in {}: {error}",
                Path::new(&log).display()
            );
        }
    }
}

/// A [`std::process::Command`] for a program this build made (the test's
/// own executable, a `CARGO_BIN_EXE_*`), started through
/// `$DERMASCOPE_TEST_RUNNER` when that is set: whitespace-separated words
/// put before the program, like cargo's `target.<triple>.runner`.
/// `scripts/test-aarch64` sets it to `qemu-aarch64`, since without
/// binfmt_misc the kernel cannot exec an aarch64 program on an x86 host.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let runner = std::env::var("DERMASCOPE_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(first) => {
            let mut command = std::process::Command::new(first);
            command.args(words).arg(program);
            command
        }
        None => std::process::Command::new(program),
    }
}

/// The workspace root (the folder holding `Cargo.lock`), found from the
/// running test's package: cargo sets `CARGO_MANIFEST_DIR` when it runs a
/// test, which stays right even when this crate was compiled from another
/// checkout sharing the build directory.
pub fn workspace_root() -> PathBuf {
    let mut dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    while !dir.join("Cargo.lock").exists() {
        if !dir.pop() {
            panic!("no Cargo.lock above {}", env!("CARGO_MANIFEST_DIR"));
        }
    }
    dir
}

/// The default encoder bundle (or `$DERMASCOPE_MODEL_DIR`). Tests that need
/// it fail, not skip, when it is absent: the test command builds it first,
/// so absence is a real defect.
pub fn bundle_dir() -> PathBuf {
    let dir = std::env::var_os("DERMASCOPE_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/dist/sklesion-xception"));
    assert!(
        dir.join("manifest.toml").is_file(),
        "no encoder bundle at {}: run `models/build` (scripts/test does) first",
        dir.display()
    );
    dir
}

/// The MedImageInsight bundle CI builds (`models/medimageinsight/build
/// --random ci`: random weights in the published topology at CI size), or
/// `$DERMASCOPE_MII_DIR`. Like [`bundle_dir`], absence fails: the test
/// command builds it first. Its int8 variant exists only where the
/// dermoscopy data was there to calibrate it.
pub fn medimageinsight_bundle_dir() -> PathBuf {
    let dir = std::env::var_os("DERMASCOPE_MII_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/dist/medimageinsight-ci"));
    assert!(
        dir.join("manifest.toml").is_file(),
        "no MedImageInsight bundle at {}: run `models/medimageinsight/build --random ci` \
         (scripts/test does) first",
        dir.display()
    );
    dir
}

fn data_dir(variable: &str, default: &str) -> PathBuf {
    std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(default))
}

/// `../shared/data/derm` (or `$DERMASCOPE_DERM_DATA`) when it holds
/// `labels.csv` and `images/`; otherwise a counted [`skip`] and `None`.
pub fn derm_data(test: &str) -> Option<PathBuf> {
    let dir = data_dir("DERMASCOPE_DERM_DATA", "../shared/data/derm");
    if dir.join("labels.csv").is_file() && dir.join("images").is_dir() {
        Some(dir)
    } else {
        skip(
            test,
            Need::Derm,
            &format!(
                "dermoscopy data not found at {} (set DERMASCOPE_DERM_DATA)",
                dir.display()
            ),
        );
        None
    }
}

/// `../shared/data/isic-uda1` (or `$DERMASCOPE_ISIC_DATA`) when it holds
/// `labels.csv`; otherwise a counted [`skip`] and `None`.
pub fn isic_data(test: &str) -> Option<PathBuf> {
    let dir = data_dir("DERMASCOPE_ISIC_DATA", "../shared/data/isic-uda1");
    if dir.join("labels.csv").is_file() {
        Some(dir)
    } else {
        skip(
            test,
            Need::Isic,
            &format!(
                "second-atlas data not found at {} (set DERMASCOPE_ISIC_DATA)",
                dir.display()
            ),
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held by every test that sets environment variables or may skip:
    /// both are process-wide (a skip would land in the other test's log).
    pub(crate) fn environment() -> std::sync::MutexGuard<'static, ()> {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[test]
    fn a_named_runner_comes_before_the_program() {
        let _environment = environment();
        let before = std::env::var_os("DERMASCOPE_TEST_RUNNER");
        std::env::set_var("DERMASCOPE_TEST_RUNNER", " echo  runner-word ");
        let through = command("the-program").arg("an-argument").output();
        std::env::remove_var("DERMASCOPE_TEST_RUNNER");
        let direct = command("echo").arg("plain").output();
        if let Some(value) = before {
            std::env::set_var("DERMASCOPE_TEST_RUNNER", value);
        }
        let text = |out: std::io::Result<std::process::Output>| {
            String::from_utf8(out.expect("running echo").stdout).expect("utf-8")
        };
        assert_eq!(text(through), "runner-word the-program an-argument\n");
        assert_eq!(text(direct), "plain\n");
    }

    // Environment variables are process-wide: one test holds every case
    // that sets them, so parallel tests never see each other's values.
    #[test]
    fn skips_are_logged_and_refused_where_required() {
        let _environment = environment();
        let dir = std::env::temp_dir().join(format!("testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.tsv");
        std::env::set_var("DERMASCOPE_SKIP_LOG", &log);
        std::env::remove_var("DERMASCOPE_REQUIRE");
        skip("a_test", Need::Derm, "no data\there");
        skip("b_test", Need::Hardware, "not a Pi");
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            text,
            "a_test\tderm\tno data here\nb_test\thardware\tnot a Pi\n"
        );

        std::env::set_var("DERMASCOPE_REQUIRE", "isic, derm");
        assert!(required(Need::Derm) && required(Need::Isic));
        assert!(!required(Need::Hardware));
        let refused = std::panic::catch_unwind(|| skip("c_test", Need::Derm, "gone"));
        assert!(refused.is_err());
        skip("d_test", Need::Hardware, "still fine");
        let lines = std::fs::read_to_string(&log).unwrap().lines().count();
        assert_eq!(lines, 3, "the refused skip must not be logged");

        std::env::set_var("DERMASCOPE_DERM_DATA", dir.join("absent"));
        let refused = std::panic::catch_unwind(|| derm_data("e_test"));
        assert!(refused.is_err(), "required data that is absent fails");
        std::env::remove_var("DERMASCOPE_REQUIRE");
        assert_eq!(derm_data("f_test"), None);

        std::env::remove_var("DERMASCOPE_SKIP_LOG");
        std::env::remove_var("DERMASCOPE_DERM_DATA");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
