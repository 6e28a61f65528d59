//! MedImageInsight as the device's encoder, end to end with the real binary:
//! the daemon selects it by configuration alone, and `dermascope reembed`
//! moves a library of the default encoder onto it from the originals it kept.
//!
//! The bundle is the one CI builds (`models/medimageinsight/build --random
//! ci`): the published topology at CI size with random weights. Its
//! embeddings have no clinical meaning; what these tests show is that
//! nothing in the daemon is tied to the default encoder's 254 px and 2048
//! dimensions.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{daemon_config, dermascope_once, s, synthetic_library, LoggedDaemon};

/// Watchdog for each wait: loading both encoders and embedding a small
/// library at start-up takes seconds; this only stops a hung daemon from
/// hanging the suite.
const WATCHDOG: Duration = Duration::from_secs(600);

fn mii() -> std::path::PathBuf {
    dermascope_testkit::medimageinsight_bundle_dir()
}

fn manifest_dim(bundle: &Path) -> usize {
    let text = std::fs::read_to_string(bundle.join("manifest.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    manifest["output"]["dim"].as_integer().unwrap() as usize
}

fn model_id(bundle: &Path) -> String {
    let text = std::fs::read_to_string(bundle.join("manifest.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    manifest["model_id"].as_str().unwrap().to_owned()
}

fn run_ok(args: &[&str]) -> String {
    let output = dermascope_once(args);
    assert!(
        output.status.success(),
        "dermascope {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_daemon_runs_medimageinsight_by_configuration_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let bundle = mii();
    let model = model_id(&bundle);
    assert_eq!(manifest_dim(&bundle), 1024, "the CI bundle's projection");
    let (_, ids) = synthetic_library(&t.join("library"), 2, "ref");
    let host = daemon_config(t, &t.join("cases"));
    let config = std::fs::read_to_string(&host.config).unwrap();
    std::fs::write(
        &host.config,
        format!("{config}[encoder]\nbundle = {bundle:?}\n"),
    )
    .unwrap();

    let mut daemon = LoggedDaemon::start(
        support::dermascope()
            .args(["run", "--config", s(&host.config), "--cases"])
            .arg(t.join("library")),
        &host.socket,
        WATCHDOG,
    );
    daemon.wait_for(&format!("model=\"{model}\""), 1);
    daemon.press_until_ok(&["capture"]);
    daemon.wait_for("screen=results:", 1);
    assert_eq!(daemon.press(&["confirm", "nv"]), "ok");
    daemon.wait_for("screen=ready:saved", 1);
    let log = daemon.stop();
    assert!(
        !log.contains("sklesion-xception"),
        "the default encoder was loaded although the configuration names another:\n{log}"
    );

    // The store the daemon made holds the library and the confirmed
    // capture, embedded by MedImageInsight: the default encoder is refused
    // on it, and MedImageInsight's own search finds a library case.
    let store = t.join("cases");
    let counts = run_ok(&["cases", "--store", s(&store), "--bundle", s(&bundle)]);
    let expected = format!("{} cases in {} (model {})", ids.len() + 1, s(&store), model);
    assert!(counts.contains(&expected), "{counts}");
    let default = dermascope_testkit::bundle_dir();
    let refused = dermascope_once(&["cases", "--store", s(&store), "--bundle", s(&default)]);
    assert!(
        !refused.status.success(),
        "the default encoder opened a MedImageInsight store"
    );
}

#[test]
fn reembed_moves_a_default_encoder_library_onto_medimageinsight() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let bundle = mii();
    let default = dermascope_testkit::bundle_dir();
    let (labels, _) = synthetic_library(t, 2, "SYN");
    let store = t.join("store");
    run_ok(&[
        "ingest",
        "--images",
        s(&t.join("images")),
        "--labels",
        s(&labels),
        "--store",
        s(&store),
        "--bundle",
        s(&default),
        "--keep-originals",
    ]);

    let moved = run_ok(&[
        "reembed",
        "--store",
        s(&store),
        "--bundle",
        s(&bundle),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(moved.trim()).unwrap();
    assert_eq!(report["outcome"], "switched", "{report}");
    assert_eq!(report["reembedded"], 6, "{report}");
    assert_eq!(
        report["from_model"],
        model_id(&default).as_str(),
        "{report}"
    );

    // Each photograph's own case comes first under the new encoder, at a
    // similarity of 1: the original re-embedded is the query re-embedded.
    let query = t.join("images/SYN_1001.jpg");
    let found = run_ok(&[
        "search",
        s(&query),
        "-k",
        "1",
        "--store",
        s(&store),
        "--bundle",
        s(&bundle),
    ]);
    assert!(
        found.contains("SYN_1001") && found.contains("1.000"),
        "{found}"
    );

    // Its embeddings are MedImageInsight's width.
    let embedded = run_ok(&["embed", "--json", "--bundle", s(&bundle), s(&query)]);
    let line: serde_json::Value = serde_json::from_str(embedded.trim()).unwrap();
    assert_eq!(line["model_id"], model_id(&bundle).as_str());
    assert_eq!(
        line["embedding"].as_array().unwrap().len(),
        manifest_dim(&bundle)
    );
}
