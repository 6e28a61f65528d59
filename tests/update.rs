//! `dermascope update` end to end with the real encoder bundle: keygen,
//! sign, install (the real health check loads the encoder, embeds an image
//! and searches a real store), a failing health check switched back and
//! marked failed, status and rollback.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dermascope_store::{CaseStore, StoreIdentity};

const MODEL_ID: &str = "sklesion-xception-gap2048-v1";

fn dermascope(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dermascope"))
        .args(["--log", "warn"])
        .args(args)
        .output()
        .expect("run dermascope")
}

fn ok(args: &[&str]) -> serde_json::Value {
    let out = dermascope(args);
    assert!(
        out.status.success(),
        "dermascope {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim().lines().last().unwrap_or("null"))
        .unwrap_or_else(|e| panic!("dermascope {args:?} printed no JSON ({e}): {stdout}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An encoder part holding the real bundle's files (hard links where the
/// filesystem allows: the files are ~100 MB and never written).
fn encoder_part(bundle: &Path) {
    let src = dermascope_testkit::bundle_dir();
    let dst = bundle.join("encoder");
    fs::create_dir_all(&dst).unwrap();
    for name in ["manifest.toml", "encoder-fp32.onnx", "encoder-int8.onnx"] {
        if fs::hard_link(src.join(name), dst.join(name)).is_err() {
            fs::copy(src.join(name), dst.join(name)).unwrap();
        }
    }
}

fn config_part(bundle: &Path, text: &str) {
    fs::create_dir_all(bundle.join("config")).unwrap();
    fs::write(bundle.join("config/dermascope.toml"), text).unwrap();
}

fn store(path: &Path, model_id: &str) -> PathBuf {
    CaseStore::open(
        path,
        StoreIdentity {
            model_id: model_id.into(),
            embedding_dim: 2048,
        },
    )
    .unwrap();
    path.to_path_buf()
}

#[test]
fn install_check_fail_back_and_roll_back_with_the_real_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let secret = t.join("op/a.key");
    let keygen = ok(&["update", "keygen", "--secret", s(&secret), "--json"]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let root = t.join("root");
    fs::create_dir_all(root.join("keys")).unwrap();
    fs::copy(t.join("op/a.pub"), root.join("keys/a.pub")).unwrap();
    let good_store = store(&t.join("cases"), MODEL_ID);

    // Version 1: the encoder and a config.
    let b1 = t.join("b1");
    encoder_part(&b1);
    config_part(&b1, "# v1\n");
    let signed = ok(&[
        "update",
        "sign",
        s(&b1),
        "--key",
        s(&secret),
        "--version",
        "1",
        "--json",
    ]);
    assert_eq!(signed["key"], keygen["key"]);
    let dry = ok(&[
        "update",
        "install",
        s(&b1),
        "--root",
        s(&root),
        "--dry-run",
        "--json",
    ]);
    assert_eq!(dry["from"], serde_json::Value::Null);
    assert!(!root.join("current").exists(), "a dry run installed");
    let done = ok(&[
        "update",
        "install",
        s(&b1),
        "--root",
        s(&root),
        "--store",
        s(&good_store),
        "--json",
    ]);
    assert_eq!(done["installed"], 1);

    // Version 2: a config and an adapter for this encoder whose model is
    // not ONNX (signed all the same: a build mistake): the real health
    // check refuses it, the device goes back to 1.
    let b2 = t.join("b2");
    config_part(&b2, "# v2\n");
    fs::create_dir_all(b2.join("adapter")).unwrap();
    fs::write(
        b2.join("adapter/manifest.toml"),
        format!("encoder_model_id = \"{MODEL_ID}\"\n"),
    )
    .unwrap();
    fs::write(b2.join("adapter/adapter.onnx"), b"not an onnx model").unwrap();
    ok(&[
        "update",
        "sign",
        s(&b2),
        "--key",
        s(&secret),
        "--version",
        "2",
        "--json",
    ]);
    let out = dermascope(&[
        "update",
        "install",
        s(&b2),
        "--root",
        s(&root),
        "--store",
        s(&good_store),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("failed its health check"), "{stderr}");
    assert!(stderr.contains("the adapter does not load"), "{stderr}");
    assert!(stderr.contains("version 1 is current again"), "{stderr}");
    let status = ok(&["update", "status", "--root", s(&root), "--verify", "--json"]);
    assert_eq!(status["current"], 1);
    assert_eq!(status["failed"][0]["version"], 2);
    // Never retried automatically, even against a good store.
    let out = dermascope(&[
        "update",
        "install",
        s(&b2),
        "--root",
        s(&root),
        "--store",
        s(&good_store),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not retried automatically"));

    // Version 3: an encoder whose manifest was edited before signing (a
    // build mistake the signature cannot catch): the encoder refuses to
    // load its files, the health check fails.
    let b3 = t.join("b3");
    encoder_part(&b3);
    let manifest = b3.join("encoder/manifest.toml");
    let text = fs::read_to_string(&manifest).unwrap();
    fs::remove_file(&manifest).unwrap();
    // Change one digit of every variant's sha256 (not the [source]
    // package's), so whichever variant this CPU picks no longer matches.
    let variants = text.find("[[variant]]").unwrap();
    let mut bytes = text.clone().into_bytes();
    for (at, _) in text
        .match_indices("sha256 = \"")
        .filter(|(at, _)| *at > variants)
    {
        let idx = at + 10;
        bytes[idx] = if bytes[idx] == b'a' { b'b' } else { b'a' };
    }
    fs::write(&manifest, bytes).unwrap();
    ok(&[
        "update",
        "sign",
        s(&b3),
        "--key",
        s(&secret),
        "--version",
        "3",
        "--json",
    ]);
    let out = dermascope(&[
        "update",
        "install",
        s(&b3),
        "--root",
        s(&root),
        "--store",
        s(&good_store),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("the encoder does not load"),
        "{stderr}"
    );

    // Version 4: a good config; then a rollback returns to 1.
    let b4 = t.join("b4");
    config_part(&b4, "# v4\n");
    ok(&[
        "update",
        "sign",
        s(&b4),
        "--key",
        s(&secret),
        "--version",
        "4",
        "--json",
    ]);
    let done = ok(&[
        "update",
        "install",
        s(&b4),
        "--root",
        s(&root),
        "--store",
        s(&good_store),
        "--json",
    ]);
    assert_eq!(done["installed"], 4);
    assert_eq!(
        fs::read_to_string(root.join("current/config/dermascope.toml")).unwrap(),
        "# v4\n"
    );
    let back = ok(&["update", "rollback", "--root", s(&root), "--json"]);
    assert_eq!(back["current"], 1);
    let status = ok(&["update", "status", "--root", s(&root), "--verify", "--json"]);
    assert_eq!(status["current"], 1);
    assert_eq!(status["floor"], 4);
}
