//! `dermascope update` end to end with the real encoder bundle: keygen,
//! sign, install (the real health check loads the encoder, embeds an image
//! and searches a real store), a failing health check switched back and
//! marked failed, status and rollback.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{dermascope_once as dermascope, encoder_part};

use dermascope_store::{CaseStore, StoreIdentity};

const MODEL_ID: &str = "sklesion-xception-gap2048-v1";

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

/// The model id of the second encoder: the same ONNX files under another
/// name, so changing encoders costs no second model build.
const OTHER_MODEL_ID: &str = "sklesion-xception-gap2048-v1-retrained";

/// An encoder part like `encoder_part`, but its manifest names `model_id`.
fn encoder_part_named(bundle: &Path, model_id: &str) {
    encoder_part(bundle);
    let manifest = bundle.join("encoder/manifest.toml");
    let text = fs::read_to_string(&manifest).unwrap();
    let from = format!("model_id = \"{MODEL_ID}\"");
    assert!(
        text.contains(&from),
        "the bundle's manifest names {MODEL_ID}"
    );
    // A hard link to the real manifest: replace it, never write through it.
    fs::remove_file(&manifest).unwrap();
    fs::write(
        &manifest,
        text.replace(&from, &format!("model_id = \"{model_id}\"")),
    )
    .unwrap();
}

fn photograph(seed: u32) -> image::RgbImage {
    let (cx, cy, r) = (100.0, 75.0, 30.0 + (seed % 7) as f32 * 4.0);
    let hue = [(60 + seed * 17 % 120) as u8, (30 + seed * 7 % 60) as u8, 40];
    image::RgbImage::from_fn(200, 150, |x, y| {
        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
        if d < r {
            image::Rgb(hue)
        } else {
            image::Rgb([225, 170 + (x % 9) as u8, 150 + (y % 7) as u8])
        }
    })
}

/// A store of MODEL_ID at `path` with `n` cases, the last `no_original`
/// of them without an original photograph.
fn store_with_cases(path: &Path, n: usize, no_original: usize) {
    use dermascope_store::{Case, CaseId, CaseMetadata, CaseSource, CaseWrite, Diagnosis};
    let store = CaseStore::open(
        path,
        StoreIdentity {
            model_id: MODEL_ID.into(),
            embedding_dim: 2048,
        },
    )
    .unwrap();
    let cases: Vec<Case> = (0..n)
        .map(|i| {
            let mut embedding = vec![0.0f32; 2048];
            embedding[i % 2048] = 1.0;
            Case {
                id: CaseId::generate(),
                embedding,
                diagnosis: Diagnosis::from_code(["nv", "mel", "bkl"][i % 3]).unwrap(),
                source: if i % 2 == 0 {
                    CaseSource::Captured
                } else {
                    CaseSource::Reference
                },
                metadata: CaseMetadata {
                    lesion_id: Some(format!("L{i}")),
                    ..CaseMetadata::default()
                },
                thumbnail_jpeg: vec![0xFF, 0xD8, 0xFF, 0xD9],
                model_id: MODEL_ID.into(),
                created_at_ms: 1_000 + i as u64,
                updated_at_ms: 1_000 + i as u64,
                label_confirmed: true,
                device_id: Some("device-a".into()),
                revision: 1,
            }
        })
        .collect();
    let originals: Vec<_> = (0..n)
        .map(|i| dermascope_library::original_from_rgb(&photograph(i as u32)).unwrap())
        .collect();
    let writes: Vec<CaseWrite<'_>> = cases
        .iter()
        .zip(&originals)
        .enumerate()
        .map(|(i, (case, original))| CaseWrite {
            case,
            original: (i < n - no_original).then_some(original),
        })
        .collect();
    store.insert_with_originals(&writes).unwrap();
}

/// Every case of the store at `path` (of `model_id`) with its original's
/// bytes, by id: what "the old store is untouched" compares.
fn snapshot(path: &Path, model_id: &str) -> Vec<(dermascope_store::Case, Option<Vec<u8>>)> {
    let store = CaseStore::open(
        path,
        StoreIdentity {
            model_id: model_id.into(),
            embedding_dim: 2048,
        },
    )
    .unwrap();
    let mut ids = store.ids().unwrap();
    ids.sort();
    ids.iter()
        .map(|id| {
            (
                store.get(id).unwrap().unwrap(),
                store.original(id).unwrap().map(|o| o.into_jpeg()),
            )
        })
        .collect()
}

/// A root trusting a fresh key, version 1 (the real encoder) installed
/// over `cases`, and version 2 (the other encoder) signed: what both
/// encoder-change tests start from. Returns (root, bundle 2).
fn installed_v1_and_signed_v2(t: &Path, cases: &Path) -> (PathBuf, PathBuf) {
    let secret = t.join("op/a.key");
    ok(&["update", "keygen", "--secret", s(&secret), "--json"]);
    let root = t.join("root");
    fs::create_dir_all(root.join("keys")).unwrap();
    fs::copy(t.join("op/a.pub"), root.join("keys/a.pub")).unwrap();
    let b1 = t.join("b1");
    encoder_part(&b1);
    let b2 = t.join("b2");
    encoder_part_named(&b2, OTHER_MODEL_ID);
    for (bundle, version) in [(&b1, "1"), (&b2, "2")] {
        ok(&[
            "update",
            "sign",
            s(bundle),
            "--key",
            s(&secret),
            "--version",
            version,
            "--json",
        ]);
    }
    let done = ok(&[
        "update",
        "install",
        s(&b1),
        "--root",
        s(&root),
        "--store",
        s(cases),
        "--json",
    ]);
    assert_eq!(done["installed"], 1);
    assert_eq!(
        done["reembed"],
        serde_json::Value::Null,
        "the store is this encoder's already"
    );
    (root, b2)
}

#[test]
fn an_encoder_change_reembeds_into_a_store_of_its_own_and_a_rollback_finds_the_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cases = t.join("cases");
    store_with_cases(&cases, 20, 3);
    let (root, b2) = installed_v1_and_signed_v2(t, &cases);
    let before = snapshot(&cases, MODEL_ID);

    let done = ok(&[
        "update",
        "install",
        s(&b2),
        "--root",
        s(&root),
        "--store",
        s(&cases),
        "--json",
    ]);
    assert_eq!(done["installed"], 2);
    let reembed = &done["reembed"];
    assert_eq!(reembed["from_model"], MODEL_ID);
    assert_eq!(reembed["to_model"], OTHER_MODEL_ID);
    assert_eq!(
        (
            &reembed["cases"],
            &reembed["reembedded"],
            &reembed["without_original"]
        ),
        (&20.into(), &17.into(), &3.into())
    );
    let status = ok(&["update", "status", "--root", s(&root), "--verify", "--json"]);
    assert_eq!(status["current"], 2);
    assert_eq!(status["encoder_model_id"], OTHER_MODEL_ID);

    // The new encoder's store beside the old one: every case that has an
    // original, embedded by the new version's encoder from that original.
    let new_store = dermascope_library::store_for_encoder(&cases, OTHER_MODEL_ID).unwrap();
    assert_eq!(new_store, t.join(format!("cases.{OTHER_MODEL_ID}")));
    let encoder = dermascope_encoder::Encoder::load(
        &root.join("current/encoder"),
        &dermascope_encoder::EncoderOptions {
            variant: dermascope_encoder::VariantChoice::from_name(None),
            ..dermascope_encoder::EncoderOptions::default()
        },
    )
    .unwrap();
    let reembedded = snapshot(&new_store, OTHER_MODEL_ID);
    assert_eq!(reembedded.len(), 17);
    for ((new, original), (old, _)) in reembedded
        .iter()
        .zip(before.iter().filter(|(_, original)| original.is_some()))
    {
        assert_eq!(new.id, old.id);
        assert_eq!(new.model_id, OTHER_MODEL_ID);
        assert_eq!(
            (&new.diagnosis, &new.metadata),
            (&old.diagnosis, &old.metadata)
        );
        let photo = dermascope_encoder::decode_rgb(
            original.as_deref().expect("the original is carried over"),
            dermascope_encoder::DecodeBudget::default(),
        )
        .unwrap();
        assert_eq!(
            new.embedding,
            encoder.embed_rgb(&photo).unwrap().into_values()
        );
    }
    // The old encoder's store is exactly as it was.
    assert_eq!(snapshot(&cases, MODEL_ID), before);

    // A rollback goes back to the old encoder, whose store is the base,
    // untouched; the new encoder's store stays for a later install.
    let back = ok(&["update", "rollback", "--root", s(&root), "--json"]);
    assert_eq!(back["current"], 1);
    assert_eq!(
        dermascope_library::store_for_encoder(&cases, MODEL_ID).unwrap(),
        cases
    );
    assert_eq!(snapshot(&cases, MODEL_ID), before);
    assert_eq!(snapshot(&new_store, OTHER_MODEL_ID).len(), 17);
}

/// `dermascope update install` of the encoder-changing bundle, SIGKILLed
/// as soon as its stderr shows `at` (a line the install prints when it
/// reaches that point: the kill lands while it works on what follows).
/// Returns the stderr it printed.
fn install_killed_at(root: &Path, bundle: &Path, cases: &Path, at: &str) -> String {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dermascope"))
        .args(["--log", "warn", "update", "install", s(bundle)])
        .args(["--root", s(root), "--store", s(cases)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dermascope");
    let mut printed = String::new();
    let mut killed = false;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if !killed && line == at {
            child.kill().unwrap();
            killed = true;
        }
    }
    let status = child.wait().unwrap();
    assert!(killed, "the install never printed {at:?}:\n{printed}");
    assert_eq!(status.signal(), Some(9), "{printed}");
    assert!(
        !printed.contains("update: switched"),
        "the kill at {at:?} landed only after the switch:\n{printed}"
    );
    printed
}

#[test]
fn sigkill_during_the_reembedding_leaves_the_old_version_and_store_and_a_rerun_completes() {
    // Three flushed batches of 16 (the library's default batch).
    const CASES: usize = 48;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cases = t.join("cases");
    store_with_cases(&cases, CASES, 0);
    let (root, b2) = installed_v1_and_signed_v2(t, &cases);
    let before = snapshot(&cases, MODEL_ID);
    let new_store = t.join(format!("cases.{OTHER_MODEL_ID}"));

    // Killed before the re-embedding starts, then after each of the first
    // two flushed batches: each time the old version is current with its
    // store whole, and the new store holds whole batches only, at least
    // the ones reported flushed.
    for (at, flushed) in [
        ("update: staged".to_owned(), 0),
        (format!("update: re-embedded 16/{CASES} cases"), 16),
        (format!("update: re-embedded 32/{CASES} cases"), 32),
    ] {
        install_killed_at(&root, &b2, &cases, &at);
        let status = ok(&["update", "status", "--root", s(&root), "--verify", "--json"]);
        assert_eq!(status["current"], 1, "after a kill at {at:?}");
        assert_eq!(status["interrupted_install"], serde_json::Value::Null);
        assert_eq!(status["failed"], serde_json::json!([]));
        assert_eq!(snapshot(&cases, MODEL_ID), before, "after a kill at {at:?}");
        let partial = if new_store.exists() {
            snapshot(&new_store, OTHER_MODEL_ID)
        } else {
            Vec::new()
        };
        assert!(
            partial.len() >= flushed && partial.len() % 16 == 0 && partial.len() < CASES,
            "{} cases in the new store after a kill at {at:?}",
            partial.len()
        );
        for (case, original) in &partial {
            assert!(before.iter().any(|(old, _)| old.id == case.id));
            assert!(original.is_some());
        }
    }

    // The rerun resumes from the flushed batches and completes.
    let done = ok(&[
        "update",
        "install",
        s(&b2),
        "--root",
        s(&root),
        "--store",
        s(&cases),
        "--json",
    ]);
    assert_eq!(done["installed"], 2);
    let present = done["reembed"]["present"].as_u64().unwrap() as usize;
    assert!(present >= 32, "the rerun found {present} cases re-embedded");
    assert_eq!(
        done["reembed"]["reembedded"].as_u64().unwrap() as usize,
        CASES - present
    );
    let status = ok(&["update", "status", "--root", s(&root), "--verify", "--json"]);
    assert_eq!(status["current"], 2);
    let mut ids: Vec<_> = snapshot(&new_store, OTHER_MODEL_ID)
        .into_iter()
        .map(|(case, _)| case.id)
        .collect();
    ids.dedup();
    let expected: Vec<_> = before.iter().map(|(case, _)| case.id.clone()).collect();
    assert_eq!(ids, expected, "every case once in the new store");
    assert_eq!(snapshot(&cases, MODEL_ID), before);
}
