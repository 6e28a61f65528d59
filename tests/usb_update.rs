//! A clinic's USB stick: the running daemon finds a bundle in its watch
//! directory, refuses a tampered one with a screen and keeps capturing,
//! installs a good one (the real encoder, the real health check), starts
//! again into it, and takes a bundle that fails its check back out without
//! retrying it in a loop. Every confirmed case is still there at the end.

mod support;

use std::fs;
use std::path::Path;
use std::time::Duration;

use support::{
    daemon_config, dermascope_once as dermascope, encoder_part, s, synthetic_library, LoggedDaemon,
};

/// Generous: each start loads the encoder, each install copies ~100 MB
/// and the result stays on the panel for 3 s.
const WATCHDOG: Duration = Duration::from_secs(180);

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = dermascope(args);
    assert!(
        out.status.success(),
        "dermascope {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sign(bundle: &Path, key: &Path, version: u64) {
    sign_with(bundle, key, version, &[]);
}

fn sign_with(bundle: &Path, key: &Path, version: u64, extra: &[&str]) {
    let version = version.to_string();
    let mut args = vec![
        "update",
        "sign",
        s(bundle),
        "--key",
        s(key),
        "--version",
        &version,
    ];
    args.extend_from_slice(extra);
    let out = dermascope(&args);
    assert!(out.status.success(), "{out:?}");
}

/// Puts `bundle` on the "stick" as its only content.
fn plug(usb: &Path, bundle: &Path) {
    let _ = fs::remove_dir_all(usb);
    fs::create_dir_all(usb).unwrap();
    fs::rename(bundle, usb.join("dermascope-update")).unwrap();
}

fn current(root: &Path) -> serde_json::Value {
    ok_json(&["update", "status", "--root", s(root), "--json"])["current"].clone()
}

#[test]
fn a_usb_stick_bundle_is_refused_installed_or_taken_back_and_the_device_keeps_capturing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let key = t.join("operator/a.key");
    ok_json(&["update", "keygen", "--secret", s(&key), "--json"]);
    let root = t.join("update");
    fs::create_dir_all(root.join("keys")).unwrap();
    fs::copy(t.join("operator/a.pub"), root.join("keys/a.pub")).unwrap();
    let usb = t.join("usb");
    fs::create_dir_all(&usb).unwrap();
    let (_, library_ids) = synthetic_library(&t.join("library"), 2, "ref");
    let host = daemon_config(t, &t.join("cases"));
    let base_config = fs::read_to_string(&host.config).unwrap();
    let with_update = format!(
        "{base_config}[update]\nroot = {root:?}\nwatch_dir = {usb:?}\nwatch_interval_s = 1\n"
    );
    fs::write(&host.config, &with_update).unwrap();

    let mut daemon = LoggedDaemon::start(
        support::dermascope()
            .args(["run", "--config", s(&host.config), "--cases"])
            .arg(t.join("library")),
        &host.socket,
        WATCHDOG,
    );

    // A confirmed case before any update: it must survive all of them.
    daemon.press_until_ok(&["capture"]);
    assert_eq!(daemon.press(&["confirm", "nv"]), "ok");
    daemon.wait_for("screen=ready:saved", 1);

    // 1. A tampered bundle: refused on the screen, nothing installed, and
    //    the device still captures.
    let tampered = t.join("tampered");
    encoder_part(&tampered);
    fs::create_dir_all(tampered.join("config")).unwrap();
    fs::write(tampered.join("config/dermascope.toml"), &with_update).unwrap();
    sign(&tampered, &key, 1);
    fs::write(
        tampered.join("config/dermascope.toml"),
        format!("{with_update}# changed after signing\n"),
    )
    .unwrap();
    plug(&usb, &tampered);
    daemon.wait_for("screen=error:Update not installed", 1);
    assert_eq!(current(&root), serde_json::Value::Null);
    assert_eq!(daemon.press(&["capture"]), "ok");
    daemon.wait_for("screen=results:", 2);
    // Confirmed, so the results screen (which holds an install back while
    // a clinician may still act on it) gives way to the ready screen.
    assert_eq!(daemon.press(&["confirm", "mel"]), "ok");
    daemon.wait_for("screen=ready:saved", 2);

    // 2. A good bundle (the encoder and a configuration showing 3 cases
    //    instead of 5): installed, health-checked, and the daemon starts
    //    again into it without being told to.
    let good = t.join("good");
    encoder_part(&good);
    fs::create_dir_all(good.join("config")).unwrap();
    fs::write(
        good.join("config/dermascope.toml"),
        format!("{with_update}[pipeline]\ntop_k = 3\n"),
    )
    .unwrap();
    sign(&good, &key, 1);
    plug(&usb, &good);
    daemon.wait_for("update 1 installed; starting again", 1);
    daemon.wait_for("running the installed version", 1);
    assert_eq!(current(&root), 1);
    assert!(daemon.count("screen=updating") >= 2, "no progress screens");
    // The new start reads the stick again and finds it installed: no loop.
    daemon.press_until_ok(&["capture"]);
    daemon.wait_for("screen=results:3", 1);
    assert_eq!(daemon.press(&["confirm", "vasc"]), "ok");
    daemon.wait_for("screen=ready:saved", 3);

    // 2b. A reference-library snapshot (3 cases exported from another
    //     store, embedded by the same encoder): installed, and its cases
    //     are in the library after the start.
    let (snap_labels, snap_ids) = synthetic_library(&t.join("snap"), 1, "snap");
    let scratch = t.join("snap-store");
    let ingest = support::dermascope()
        .args(["--log", "warn", "ingest", "--store", s(&scratch)])
        .args([
            "--images",
            s(&t.join("snap/images")),
            "--labels",
            s(&snap_labels),
        ])
        .output()
        .unwrap();
    assert!(ingest.status.success(), "{ingest:?}");
    let library = t.join("library-bundle");
    fs::create_dir_all(library.join("library")).unwrap();
    let export = support::dermascope()
        .args([
            "--log",
            "warn",
            "cases",
            "--store",
            s(&scratch),
            "--export-reference",
        ])
        .arg(library.join("library/cases.jsonl"))
        .output()
        .unwrap();
    assert!(export.status.success(), "{export:?}");
    // A snapshot belongs to one encoder's embedding space: the bundle says
    // which.
    sign_with(
        &library,
        &key,
        2,
        &["--encoder-model-id", "sklesion-xception-gap2048-v1"],
    );
    plug(&usb, &library);
    daemon.wait_for("update 2 installed; starting again", 1);
    daemon.wait_for("reference library of the installed update added added=3", 1);
    assert_eq!(current(&root), 2);
    daemon.press_until_ok(&["capture"]);
    daemon.wait_for("screen=results:3", 2);
    assert_eq!(daemon.press(&["confirm", "nv"]), "ok");
    daemon.wait_for("screen=ready:saved", 4);

    // 3. A bundle whose configuration the daemon cannot run: it fails the
    //    health check, is switched back and marked failed, and the stick
    //    left in is not installed again after the restart.
    let broken = t.join("broken");
    fs::create_dir_all(broken.join("config")).unwrap();
    fs::write(
        broken.join("config/dermascope.toml"),
        format!("{with_update}[pipeline]\nburst = 99\n"),
    )
    .unwrap();
    sign(&broken, &key, 3);
    plug(&usb, &broken);
    daemon.wait_for("update 3 not installed", 1);
    daemon.wait_for("running the installed version", 3);
    daemon.wait_for("failed before", 1);
    assert_eq!(current(&root), 2);
    daemon.press_until_ok(&["capture"]);
    daemon.wait_for("screen=results:3", 3);
    let log = daemon.stop();
    assert_eq!(
        log.matches("update 3 not installed").count(),
        1,
        "a failed bundle was installed again"
    );
    // The restart after the failed bundle runs version 2 again without
    // parsing its snapshot a second time.
    assert_eq!(
        log.matches("reference library of the installed update added")
            .count(),
        1,
        "the snapshot was added at every start"
    );

    // Every case is still there: the references, the snapshot's and the
    // four confirmed captures.
    let identity = dermascope_store::CaseStore::identity_at(t.join("cases"))
        .unwrap()
        .unwrap();
    let store = dermascope_store::CaseStore::open(t.join("cases"), identity).unwrap();
    assert_eq!(store.len().unwrap(), library_ids.len() + snap_ids.len() + 4);
}
