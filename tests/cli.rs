//! End-to-end: the real `dermascope` binary, the real encoder bundle and a
//! real sled store in a temporary folder.
//!
//! The photographs here are synthetic lesions drawn by the test itself, so
//! these tests never depend on `../shared/data/derm`; the evaluation test
//! that does is a counted skip where it is absent (`dermascope_testkit`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod support;

use support::{daemon_config, HostDaemon};

/// The shared synthetic library, with this file's `SYN_` names.
fn synthetic_library(dir: &Path, per_class: u32) -> PathBuf {
    support::synthetic_library(dir, per_class, "SYN").0
}

fn bundle() -> PathBuf {
    dermascope_testkit::bundle_dir()
}

fn dermascope(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dermascope"))
        .args(args)
        .env("DERMASCOPE_MODEL_DIR", bundle())
        .env("RUST_LOG", "warn")
        .output()
        .expect("running dermascope")
}

/// `dermascope ingest` of `labels` (photographs in `images`) into `store`.
fn ingest(images: &Path, labels: &Path, store: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "ingest",
        "--images",
        images.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    dermascope(&args)
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The default bundle's graph under another model id in `dir/other-bundle`:
/// it stands for any other encoder. Both variants are linked, since which
/// one runs by default depends on this CPU.
fn other_encoder(dir: &Path) -> PathBuf {
    let other = dir.join("other-bundle");
    std::fs::create_dir(&other).unwrap();
    let manifest = std::fs::read_to_string(bundle().join("manifest.toml")).unwrap();
    std::fs::write(
        other.join("manifest.toml"),
        manifest.replace("model_id = \"", "model_id = \"other-"),
    )
    .unwrap();
    for file in ["encoder-fp32.onnx", "encoder-int8.onnx"] {
        std::os::unix::fs::symlink(bundle().join(file), other.join(file)).unwrap();
    }
    other
}

#[test]
fn ingest_reports_bad_rows_keeps_the_rest_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let labels = synthetic_library(dir.path(), 4);
    let images = dir.path().join("images");
    // A truncated JPEG, a missing file, an unknown label, a duplicate, a bad age.
    let whole = std::fs::read(images.join("SYN_0000.jpg")).unwrap();
    std::fs::write(images.join("SYN_cut.jpg"), &whole[..whole.len() / 2]).unwrap();
    let mut csv = std::fs::read_to_string(&labels).unwrap();
    csv.push_str("SYN_cut.jpg,nv,Lc,histo,40,male,back\n");
    csv.push_str("SYN_gone.jpg,nv,Lg,histo,40,male,back\n");
    csv.push_str("SYN_0001.jpg,melanoma?,L9,histo,40,male,back\n");
    csv.push_str("SYN_0002.jpg,nv,L02,histo,40,male,back\n");
    csv.push_str("SYN_odd.jpg,nv,Lo,histo,forty,male,back\n");
    std::fs::write(&labels, csv).unwrap();
    let store = dir.path().join("store");
    let first = ingest(&images, &labels, &store, &["--threads", "2"]);
    let (out, err) = text(&first);
    assert!(first.status.success(), "{out}\n{err}");
    assert!(
        out.contains("ingested 12, already stored 0, rejected 5"),
        "{out}"
    );
    for reason in [
        "truncated",
        "not found",
        "unknown label",
        "duplicate case id",
        "not a number",
    ] {
        assert!(err.contains(reason), "no {reason:?} in:\n{err}");
    }
    assert!(err.contains("rejected line 14 (SYN_cut.jpg)"), "{err}");

    let second = ingest(&images, &labels, &store, &["--threads", "2"]);
    let (out, _) = text(&second);
    assert!(
        out.contains("ingested 0, already stored 12, rejected 5"),
        "{out}"
    );

    let cases = dermascope(&["cases", "--store", store.to_str().unwrap()]);
    let (out, err) = text(&cases);
    assert!(cases.status.success(), "{err}");
    assert!(out.contains("12 cases"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("mel") && l.trim_end().ends_with('4')),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("reference") && l.trim_end().ends_with("12")),
        "{out}"
    );
}

#[test]
fn search_finds_the_same_photograph_first_and_filters_apply() {
    let dir = tempfile::tempdir().unwrap();
    let labels = synthetic_library(dir.path(), 3);
    let images = dir.path().join("images");
    let store = dir.path().join("store");
    let ingested = ingest(&images, &labels, &store, &[]);
    assert!(ingested.status.success(), "{:?}", text(&ingested));

    let query = images.join("SYN_1001.jpg");
    let search = dermascope(&[
        "search",
        query.to_str().unwrap(),
        "-k",
        "3",
        "--store",
        store.to_str().unwrap(),
    ]);
    let (out, err) = text(&search);
    assert!(search.status.success(), "{err}");
    let first = out.lines().nth(1).unwrap_or_default();
    assert!(
        first.contains("SYN_1001") && first.contains("Melanoma"),
        "{out}"
    );
    assert!(
        first.contains("1.000"),
        "self-similarity should print as 1.000: {out}"
    );
    assert_eq!(out.lines().count(), 4, "{out}");

    let filtered = dermascope(&[
        "search",
        query.to_str().unwrap(),
        "-k",
        "5",
        "--diagnosis",
        "vasc",
        "--int8",
        "--store",
        store.to_str().unwrap(),
    ]);
    let (out, _) = text(&filtered);
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(rows.iter().all(|r| r.contains("vasc")), "{out}");
}

/// Issue 18, part 0: on an x86_64 CPU without an int8 dot product a named
/// int8 is refused with what to do, unless allowed; the default still runs
/// (fp32). tract's own probe is what the encoder asks, so `TRACT_CPU_ISA`
/// makes this machine such a CPU (it is a no-op on one that already is).
#[cfg(target_arch = "x86_64")]
#[test]
fn int8_without_a_dot_product_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_library(dir.path(), 1);
    let image = std::fs::read_dir(dir.path().join("images"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|e| e == "jpg"))
        .expect("a synthetic photograph");
    let embed = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dermascope"))
            .args(["embed", image.to_str().unwrap()])
            .args(extra)
            .env("DERMASCOPE_MODEL_DIR", bundle())
            .env("TRACT_CPU_ISA", "-avx512vnni,-avxvnni")
            .env("RUST_LOG", "warn")
            .output()
            .expect("running dermascope")
    };
    let refused = embed(&["--variant", "int8"]);
    let (out, err) = text(&refused);
    assert!(!refused.status.success(), "{out}");
    assert!(
        err.contains("no int8 dot-product instructions") && err.contains("--allow-slow-int8"),
        "{err}"
    );
    let allowed = embed(&["--variant", "int8", "--allow-slow-int8"]);
    let (out, err) = text(&allowed);
    assert!(allowed.status.success(), "{err}");
    assert!(out.contains("(int8)"), "{out}");
    let default = embed(&[]);
    let (out, err) = text(&default);
    assert!(default.status.success(), "{err}");
    assert!(out.contains("(fp32)"), "{out}");
}

#[test]
fn labels_files_the_ingest_cannot_read_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let no_label = dir.path().join("no-label.csv");
    std::fs::write(&no_label, "image,diagnosis\nA.jpg,nv\n").unwrap();
    let utf16 = dir.path().join("utf16.csv");
    let mut bytes = vec![0xff, 0xfe];
    for unit in "image,label\nA.jpg,nv\n".encode_utf16() {
        bytes.extend_from_slice(&unit.to_le_bytes());
    }
    std::fs::write(&utf16, bytes).unwrap();
    for (file, expect) in [(&no_label, "lacks the column(s) label"), (&utf16, "UTF-16")] {
        let output = ingest(dir.path(), file, &store, &[]);
        let (_, err) = text(&output);
        assert!(!output.status.success());
        assert!(err.contains(expect), "{err}");
    }
}

#[test]
fn a_store_of_another_encoder_is_refused_with_how_to_reembed() {
    let dir = tempfile::tempdir().unwrap();
    let labels = synthetic_library(dir.path(), 1);
    let images = dir.path().join("images");
    let store = dir.path().join("store");
    // --bundle overrides the DERMASCOPE_MODEL_DIR that `dermascope` sets.
    let ingest_with = |bundle: &Path| {
        ingest(
            &images,
            &labels,
            &store,
            &["--bundle", bundle.to_str().unwrap()],
        )
    };
    assert!(ingest_with(&bundle()).status.success());
    let other = other_encoder(dir.path());
    let refused = ingest_with(&other);
    let (_, err) = text(&refused);
    assert!(!refused.status.success());
    assert!(
        err.contains("was embedded by model") && err.contains("dermascope ingest"),
        "{err}"
    );
    assert!(err.contains("dermascope reembed --store"), "{err}");
}

/// The way out the mismatch error names: `dermascope reembed` moves a
/// library ingested with its originals to another encoder, after which the
/// new encoder's commands work on it and the old store is kept beside it.
#[test]
fn reembed_moves_a_library_to_another_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let labels = synthetic_library(dir.path(), 2);
    let images = dir.path().join("images");
    let store = dir.path().join("store");
    let other = other_encoder(dir.path());
    let other_arg = ["--bundle", other.to_str().unwrap()];
    let mut extra = vec!["--keep-originals"];
    extra.extend_from_slice(&other_arg);
    let ingested = ingest(&images, &labels, &store, &extra);
    assert!(ingested.status.success(), "{:?}", text(&ingested));
    let store_arg = store.to_str().unwrap();

    let dry = dermascope(&["reembed", "--store", store_arg, "--dry-run"]);
    let (out, err) = text(&dry);
    assert!(dry.status.success(), "{err}");
    assert!(out.contains("6 would be re-embedded"), "{out}");

    let moved = dermascope(&["reembed", "--store", store_arg, "--json"]);
    let (out, err) = text(&moved);
    assert!(moved.status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["outcome"], "switched", "{report}");
    assert_eq!(report["reembedded"], 6, "{report}");
    assert!(report["from_model"].as_str().unwrap().starts_with("other-"));
    let previous = report["previous"].as_str().unwrap();
    assert!(Path::new(previous).join("conf").is_file(), "{previous}");

    // The default encoder now finds the same photograph first.
    let query = images.join("SYN_1001.jpg");
    let search = dermascope(&[
        "search",
        query.to_str().unwrap(),
        "-k",
        "1",
        "--store",
        store_arg,
    ]);
    let (out, err) = text(&search);
    assert!(search.status.success(), "{err}");
    assert!(out.contains("SYN_1001") && out.contains("1.000"), "{out}");
    let again = dermascope(&["reembed", "--store", store_arg]);
    assert!(
        text(&again).0.contains("nothing to do"),
        "{:?}",
        text(&again)
    );
}

#[test]
fn evaluation_of_every_method_on_real_dermoscopy() {
    let Some(derm) = dermascope_testkit::derm_data("evaluation_of_every_method_on_real_dermoscopy")
    else {
        return;
    };
    // A small, fixed slice keeps the test quick: every 20th row.
    let dir = tempfile::tempdir().unwrap();
    let all = std::fs::read_to_string(derm.join("labels.csv")).unwrap();
    let mut lines = all.lines();
    let mut subset = format!("{}\n", lines.next().unwrap());
    for line in lines.step_by(20) {
        subset.push_str(line);
        subset.push('\n');
    }
    let labels = dir.path().join("labels.csv");
    std::fs::write(&labels, subset).unwrap();
    let output = dermascope(&[
        "eval",
        "--images",
        derm.join("images").to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--store",
        dir.path().join("store").to_str().unwrap(),
        "--threads",
        "2",
        // A 5% slice has only a handful of the rare diagnoses.
        "--min-cases",
        "3",
        "--small-classes",
        "exclude",
        "--json",
    ]);
    let (out, err) = text(&output);
    assert!(output.status.success(), "{err}");
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let queries = json["queries"].as_u64().unwrap();
    let references = json["references"].as_u64().unwrap();
    assert!(queries >= 30 && references >= 120, "{json}");
    let p1 = json["retrieval"][0]["precision_at"]["1"].as_f64().unwrap();
    // This slice (every 20th row, split seed 1: 42 queries, 167 references)
    // is not the full data's 0.855: raw p@1 is 28/42 = 0.667 with the int8
    // encoder (the default on CPUs with int8 dot products) and 27/42 = 0.643
    // with fp32 (the default elsewhere), the same on every run. One query is
    // 0.024. The variants' embeddings differ by cosine 0.998 and that flips
    // one query; kernels of one variant on other CPUs differ far less (float
    // order, about 1e-6). The bound passes 26/42 and fails 25/42: one query
    // under fp32's figure. Chance over seven classes is about 0.2.
    assert!(p1 > 0.6, "precision@1 {p1}\n{out}");
    let methods = json["methods"].as_array().unwrap();
    // raw and adapter-space kNN (k=1; 5 and 10 majority and weighted), the
    // adapter itself, and adapter + kNN.
    assert_eq!(methods.len(), 12, "{json}");
    let adapter = methods
        .iter()
        .find(|m| m["method"] == "adapter prediction")
        .unwrap();
    // The full data's 0.890 is not this slice's: at the default adapter seed
    // (7) it reaches 0.871 (int8 encoder) and 0.824 (fp32), the same on every
    // run; seeds 1, 2, 3, 5 and 11 give 0.781 to 0.879 over both variants,
    // which is what a legitimate change to training's randomness moves it by.
    // Balanced accuracy averages seven recalls over supports of 1 to 12 here,
    // so one query moves it by 0.012 to 0.143: the bound sits under the
    // lowest of those twelve runs, by less than one akiec query (0.048), and
    // a miss on a single-query class (df, vasc; never missed in those runs)
    // fails it.
    let balanced_accuracy = adapter["balanced_accuracy"].as_f64().unwrap();
    assert!(
        balanced_accuracy > 0.75,
        "adapter balanced accuracy {balanced_accuracy}\n{out}"
    );
    assert!(adapter["expected_calibration_error"].as_f64().is_some());
    let attributes: Vec<&str> = json["breakdowns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["attribute"].as_str().unwrap())
        .collect();
    for attribute in ["sex", "age", "site"] {
        assert!(attributes.contains(&attribute), "no {attribute} breakdown");
    }
    eprintln!("{out}");
}

#[test]
fn adapter_trains_on_stored_cases_is_used_by_search_and_refuses_bad_labels() {
    let dir = tempfile::tempdir().unwrap();
    let labels = synthetic_library(dir.path(), 14);
    let images = dir.path().join("images");
    let store = dir.path().join("store");
    let adapter = dir.path().join("adapter");
    let ingested = ingest(&images, &labels, &store, &["--threads", "2"]);
    assert!(ingested.status.success(), "{}", text(&ingested).1);

    let train = |extra: &[&str]| {
        let mut args = vec![
            "adapter",
            "train",
            "--store",
            store.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--hidden",
            "32",
            "--json",
        ];
        args.extend_from_slice(extra);
        dermascope(&args)
    };
    // 14 cases per diagnosis, below a minimum of 20: refused with counts.
    let trained = train(&["--min-cases", "20"]);
    let (out, err) = text(&trained);
    assert!(!trained.status.success(), "{out}");
    assert!(
        err.contains("fewer than 20 cases")
            && err.contains("mel: 14")
            && err.contains("--small-classes"),
        "{err}"
    );

    let trained = train(&[]);
    let (out, err) = text(&trained);
    assert!(trained.status.success(), "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(report["classes"], serde_json::json!(["mel", "nv", "vasc"]));
    let validation = &report["validation"];
    assert!(
        validation["balanced_accuracy"].as_f64().unwrap() > 0.6,
        "{out}"
    );
    assert!(validation["expected_calibration_error"].as_f64().is_some());
    assert_eq!(validation["confusion"].as_array().unwrap().len(), 3);
    assert!(
        out.contains("adapter space: 42 case embeddings computed"),
        "{out}"
    );
    // The model file is named by its content (`<adapter id>.onnx`).
    let model_file = format!("{}.onnx", report["adapter_id"].as_str().unwrap());
    for file in ["manifest.toml", &model_file, "report.json", "report.txt"] {
        assert!(adapter.join(file).is_file(), "{file} missing");
    }

    // Indexing again has nothing left to do.
    let indexed = dermascope(&[
        "adapter",
        "index",
        "--store",
        store.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ]);
    let (out, err) = text(&indexed);
    assert!(indexed.status.success(), "{err}");
    assert!(out.contains("0 case embeddings computed"), "{out}");

    // Search uses the adapter's space and shows its prediction.
    let found = dermascope(&[
        "search",
        images.join("SYN_1003.jpg").to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "-k",
        "3",
    ]);
    let (out, err) = text(&found);
    assert!(found.status.success(), "{err}");
    assert!(out.contains("not a diagnosis"), "{out}");
    assert!(out.contains("SYN_1003"), "{out}");

    // A label outside the known diagnoses stops training with the line.
    let mut csv = std::fs::read_to_string(&labels).unwrap();
    csv.push_str("SYN_0001.jpg,melanoma?,L77,histo,40,male,back\n");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, csv).unwrap();
    let refused = dermascope(&[
        "adapter",
        "train",
        "--images",
        images.to_str().unwrap(),
        "--labels",
        bad.to_str().unwrap(),
        "--adapter",
        dir.path().join("other").to_str().unwrap(),
        "--store",
        dir.path().join("cache").to_str().unwrap(),
    ]);
    let (_, err) = text(&refused);
    assert!(!refused.status.success());
    assert!(
        err.contains("line 44") && err.contains("not a known diagnosis"),
        "{err}"
    );
}

/// `dermascope run` as a process: reference cases added at start, the
/// control socket pressed by `dermascope press`, screens written as PNGs,
/// SIGTERM answered with a clean, flushed stop.
#[test]
fn the_daemon_answers_a_press_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("library");
    std::fs::create_dir_all(&library).unwrap();
    let labels = synthetic_library(&library, 4);
    std::fs::rename(&labels, library.join("labels.csv")).unwrap();
    let HostDaemon {
        config,
        socket,
        screens,
    } = daemon_config(dir.path(), &dir.path().join("cases"));
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_dermascope"))
        .args(["run", "--config", config.to_str().unwrap(), "--cases"])
        .arg(&library)
        .env("DERMASCOPE_MODEL_DIR", bundle())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Ready once the control socket exists (the library is embedded first).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "daemon never became ready"
        );
        assert!(daemon.try_wait().unwrap().is_none(), "daemon exited early");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let press = |command: &[&str]| {
        let mut args = vec!["press", "--socket", socket.to_str().unwrap()];
        args.extend_from_slice(command);
        dermascope(&args)
    };
    let pressed = press(&["capture"]);
    assert!(pressed.status.success(), "{:?}", text(&pressed));
    assert_eq!(text(&pressed).0.trim(), "ok");
    let unknown = press(&["levitate"]);
    assert!(!unknown.status.success());
    // The results screen lands in latest.png; then confirm and stop.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let shown = std::fs::read_dir(&screens).map_or(0, |d| d.count());
        // ready, results (+ latest.png); "capturing" only when no frame of
        // the camera thread's ring passed the gate. A confirm pressed early
        // still follows the capture: presses are taken in order.
        if shown >= 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no results screen");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(press(&["confirm", "mel"]).status.success());
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SIGTERM, as systemd stops the service.
    let pid = daemon.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let output = daemon.wait_with_output().unwrap();
    let (_, err) = text(&output);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("stopped: 1 captures"), "{err}");
    assert!(err.contains("1 confirmed"), "{err}");
    let latest = image::open(screens.join("latest.png")).unwrap();
    assert_eq!((latest.width(), latest.height()), (320, 240));
    // The confirmed capture was flushed before exit: a new process sees it.
    let cases = dermascope(&[
        "cases",
        "--store",
        dir.path().join("cases").to_str().unwrap(),
    ]);
    let (out, _) = text(&cases);
    assert!(
        out.contains("captured") && out.contains("13 cases"),
        "{out}"
    );
}
