//! `dermascope adapter rollback` as a process: two trainings install two
//! adapters, the rollback puts the first back (atomically, through the
//! library's durable switch) and says which, a second one undoes it, and
//! with nothing kept it refuses and changes nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;

fn dermascope(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dermascope"))
        .args(args)
        .env("DERMASCOPE_MODEL_DIR", dermascope_testkit::bundle_dir())
        .env("RUST_LOG", "warn")
        .output()
        .expect("running dermascope")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The adapter id `dermascope adapter show` prints for `adapter`.
fn shown_id(adapter: &Path) -> String {
    let shown = dermascope(&["adapter", "show", "--adapter", path(adapter)]);
    let (out, err) = text(&shown);
    assert!(shown.status.success(), "{err}");
    let manifest: toml::Value = toml::from_str(&out).unwrap();
    manifest["adapter_id"].as_str().unwrap().to_owned()
}

struct Clinic {
    _dir: tempfile::TempDir,
    store: PathBuf,
    adapter: PathBuf,
}

impl Clinic {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (labels, _) = support::synthetic_library(dir.path(), 14, "RB");
        let store = dir.path().join("store");
        let ingested = dermascope(&[
            "ingest",
            "--images",
            path(&dir.path().join("images")),
            "--labels",
            path(&labels),
            "--store",
            path(&store),
            "--threads",
            "2",
        ]);
        assert!(ingested.status.success(), "{}", text(&ingested).1);
        let adapter = dir.path().join("adapter");
        Self {
            _dir: dir,
            store,
            adapter,
        }
    }

    /// Trains and installs an adapter; returns its id and the output.
    fn train(&self, seed: &str) -> (String, String) {
        let trained = dermascope(&[
            "adapter",
            "train",
            "--store",
            path(&self.store),
            "--adapter",
            path(&self.adapter),
            "--hidden",
            "32",
            "--adapter-seed",
            seed,
            "--json",
        ]);
        let (out, err) = text(&trained);
        assert!(trained.status.success(), "{out}\n{err}");
        let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        (report["adapter_id"].as_str().unwrap().to_owned(), out)
    }

    fn rollback(&self) -> Output {
        dermascope(&["adapter", "rollback", "--adapter", path(&self.adapter)])
    }
}

#[test]
fn rollback_restores_the_replaced_adapter_and_a_second_one_undoes_it() {
    let clinic = Clinic::new();

    // Nothing installed, nothing kept: refused, and nothing is created.
    let refused = clinic.rollback();
    let (_, err) = text(&refused);
    assert!(!refused.status.success());
    assert!(err.contains("nothing to roll back to"), "{err}");
    assert!(!clinic.adapter.exists());

    let (first, out) = clinic.train("1");
    assert!(!out.contains("is kept in"), "nothing was replaced: {out}");
    // One installed, none kept yet: still refused, the installed one stays.
    let refused = clinic.rollback();
    assert!(!refused.status.success());
    assert!(
        text(&refused).1.contains("nothing to roll back to"),
        "{}",
        text(&refused).1
    );
    assert_eq!(shown_id(&clinic.adapter), first);

    let (second, out) = clinic.train("2");
    assert_ne!(first, second, "another seed, another adapter");
    assert!(
        out.contains(&format!("the adapter it replaced ({first}) is kept in")),
        "{out}"
    );
    assert_eq!(shown_id(&clinic.adapter), second);

    let rolled = clinic.rollback();
    let (out, err) = text(&rolled);
    assert!(rolled.status.success(), "{err}");
    assert!(
        out.contains(&format!("restored adapter {first} (trained 20")),
        "{out}"
    );
    assert!(out.contains("UTC, "), "says when it was trained: {out}");
    assert!(
        out.contains(&format!("the adapter it replaced ({second}) is kept")),
        "{out}"
    );
    assert_eq!(shown_id(&clinic.adapter), first);
    // The store's tooling takes the restored adapter: the library is
    // indexed in its space (the store keeps one adapter's space, so the
    // switch recomputes it, as the daemon does at its next start).
    let indexed = dermascope(&[
        "adapter",
        "index",
        "--store",
        path(&clinic.store),
        "--adapter",
        path(&clinic.adapter),
    ]);
    let (out, err) = text(&indexed);
    assert!(indexed.status.success(), "{err}");
    assert!(
        out.contains(&format!("adapter space {first}: ")) && out.contains("42 cases searchable"),
        "{out}"
    );

    // A second rollback undoes the first.
    let again = clinic.rollback();
    assert!(again.status.success(), "{}", text(&again).1);
    assert!(
        text(&again)
            .0
            .contains(&format!("restored adapter {second}")),
        "{}",
        text(&again).0
    );
    assert_eq!(shown_id(&clinic.adapter), second);
}
