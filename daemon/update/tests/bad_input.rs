//! Every bad bundle is refused before anything on the device changes, and
//! the refusal says what is wrong. Each test installs a good version 1
//! first, snapshots the whole root, offers the bad bundle, and compares.

mod common;

use std::fs;
use std::path::Path;
use std::time::Instant;

use common::*;
use dermascope_update::{
    manifest::Part, verify_version, InstallOptions, NoPreparation, Recovery, SignOptions, Step,
    UpdateError,
};

struct Device {
    _tmp: tempfile::TempDir,
    base: std::path::PathBuf,
    root: std::path::PathBuf,
    keys: std::path::PathBuf,
    a: Key,
    b: Key,
}

/// A device trusting keys a and b, with version 1 (encoder enc-a, adapter,
/// library, config) installed and current.
fn device() -> Device {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    let a = key(&base.join("operator"), "a");
    let b = key(&base.join("operator"), "b");
    let keys = trusted_dir(&base.join("keys"), &[&a, &b]);
    let root = base.join("root");
    let v1 = bundle(&base.join("b1"), &full("enc-a", 1), 1, &a);
    install(&installer(&root, &keys), &v1, &FakeCheck::pass()).unwrap();
    Device {
        _tmp: tmp,
        base,
        root,
        keys,
        a,
        b,
    }
}

/// Offers `bundle` and returns the refusal; fails if the device changed.
fn refused(d: &Device, bundle: &Path) -> UpdateError {
    let before = snapshot(&d.root);
    let err = install(&installer(&d.root, &d.keys), bundle, &FakeCheck::pass())
        .expect_err("a bad bundle was installed");
    assert_eq!(
        snapshot(&d.root),
        before,
        "a refused bundle changed the device ({err})"
    );
    assert_eq!(
        installer(&d.root, &d.keys).current_version().unwrap(),
        Some(1)
    );
    err
}

#[test]
fn a_changed_manifest_fails_its_signature() {
    let d = device();
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &d.a);
    let m = b.join("bundle.toml");
    let text = fs::read_to_string(&m)
        .unwrap()
        .replace("version = 2", "version = 9");
    fs::write(&m, text).unwrap();
    assert!(matches!(refused(&d, &b), UpdateError::BadSignature { .. }));
}

#[test]
fn a_damaged_signature_is_refused() {
    let d = device();
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &d.a);
    let s = b.join("bundle.toml.sig");
    let text = fs::read_to_string(&s).unwrap();
    // Flip one hex digit of the signature (the last line's last digit).
    let pos = text.rfind('"').unwrap() - 1;
    let mut bytes = text.into_bytes();
    bytes[pos] = if bytes[pos] == b'0' { b'1' } else { b'0' };
    fs::write(&s, bytes).unwrap();
    assert!(matches!(refused(&d, &b), UpdateError::BadSignature { .. }));
}

#[test]
fn a_bundle_signed_by_an_unknown_key_is_refused() {
    let d = device();
    let stranger = key(&d.base.join("elsewhere"), "stranger");
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &stranger);
    match refused(&d, &b) {
        UpdateError::UnknownKey { key } => assert_eq!(key, stranger.id),
        other => panic!("expected UnknownKey, got {other}"),
    }
}

#[test]
fn a_revoked_key_is_never_trusted_again() {
    let d = device();
    // Key a revokes key b in version 2.
    let v2 = bundle_with(
        &d.base.join("b2"),
        &adapter_only("enc-a", 2),
        &d.a,
        SignOptions {
            version: 2,
            revoke_keys: vec![d.b.id.clone()],
            ..SignOptions::default()
        },
    );
    install(&installer(&d.root, &d.keys), &v2, &FakeCheck::pass()).unwrap();
    // b's public key is still in the keys directory, and a new installer
    // (a restart) reads the persisted revocation.
    let v3 = bundle(&d.base.join("b3"), &adapter_only("enc-a", 3), 3, &d.b);
    let before = snapshot(&d.root);
    let err = install(&installer(&d.root, &d.keys), &v3, &FakeCheck::pass()).unwrap_err();
    assert!(
        matches!(err, UpdateError::RevokedKey { ref key } if *key == d.b.id),
        "{err}"
    );
    assert_eq!(snapshot(&d.root), before);
    let status = installer(&d.root, &d.keys).status().unwrap();
    assert_eq!(status.revoked_keys, vec![d.b.id.clone()]);
}

#[test]
fn a_bundle_may_not_revoke_every_trusted_key() {
    let d = device();
    let b = bundle_with(
        &d.base.join("b2"),
        &adapter_only("enc-a", 2),
        &d.a,
        SignOptions {
            version: 2,
            revoke_keys: vec![d.a.id.clone(), d.b.id.clone()],
            ..SignOptions::default()
        },
    );
    assert!(matches!(refused(&d, &b), UpdateError::RevokesEveryKey));
}

#[test]
fn a_changed_file_is_refused() {
    let d = device();
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &d.a);
    let f = b.join("adapter/adapter.onnx");
    let mut data = fs::read(&f).unwrap();
    data[100] ^= 1;
    fs::write(&f, data).unwrap();
    assert!(
        matches!(refused(&d, &b), UpdateError::ChangedFile { ref path } if path == "adapter/adapter.onnx")
    );
}

#[test]
fn a_missing_file_is_refused() {
    let d = device();
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &d.a);
    fs::remove_file(b.join("adapter/adapter.onnx")).unwrap();
    assert!(matches!(refused(&d, &b), UpdateError::MissingFile { .. }));
}

#[test]
fn a_file_not_in_the_manifest_is_refused() {
    let d = device();
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &d.a);
    fs::write(b.join("adapter/extra.onnx"), b"smuggled").unwrap();
    assert!(
        matches!(refused(&d, &b), UpdateError::NotInManifest { ref path } if path == "adapter/extra.onnx")
    );
    // Also at the top level, beside the manifest.
    fs::remove_file(b.join("adapter/extra.onnx")).unwrap();
    fs::write(b.join("run-me.sh"), b"#!/bin/sh").unwrap();
    assert!(matches!(refused(&d, &b), UpdateError::NotInManifest { .. }));
}

#[test]
fn a_truncated_file_is_refused_and_an_extended_one_too() {
    let d = device();
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &d.a);
    let f = b.join("adapter/adapter.onnx");
    let data = fs::read(&f).unwrap();
    fs::write(&f, &data[..data.len() / 2]).unwrap();
    match refused(&d, &b) {
        UpdateError::Truncated {
            expected, found, ..
        } => assert_eq!(
            (expected, found),
            (data.len() as u64, data.len() as u64 / 2)
        ),
        other => panic!("expected Truncated, got {other}"),
    }
    let mut longer = data.clone();
    longer.extend_from_slice(&[0; 10]);
    fs::write(&f, longer).unwrap();
    assert!(matches!(refused(&d, &b), UpdateError::Oversize { .. }));
}

#[test]
fn a_symlink_in_the_bundle_is_refused() {
    let d = device();
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &d.a);
    // Replace a listed file with a link to identical bytes elsewhere: the
    // hashes would match; the link itself is what is refused.
    let f = b.join("adapter/adapter.onnx");
    let outside = d.base.join("outside.onnx");
    fs::rename(&f, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &f).unwrap();
    assert!(matches!(refused(&d, &b), UpdateError::NotRegular { .. }));
}

#[test]
fn a_signed_manifest_with_path_traversal_is_refused() {
    let d = device();
    let b = d.base.join("b2");
    write_contents(&b, &adapter_only("enc-a", 2));
    // Hand-written (sign_bundle would never list such a path), then signed
    // with a trusted key: the signature is fine, the path is not.
    for evil in ["adapter/../../root/current", "/etc/passwd", "adapter/./x"] {
        let text = format!(
            "format = 1\nversion = 2\ncarries = [\"adapter\"]\n[needs]\nencoder_model_id = \"enc-a\"\n[[files]]\npath = \"{evil}\"\nsize = 1\nsha256 = \"{}\"\n",
            "0".repeat(64)
        );
        fs::write(b.join("bundle.toml"), &text).unwrap();
        let sig = dermascope_update::keys::SignatureFile::sign(&d.a.signing, text.as_bytes());
        fs::write(b.join("bundle.toml.sig"), sig.to_toml()).unwrap();
        let err = refused(&d, &b);
        assert!(
            matches!(
                err,
                UpdateError::Manifest(
                    dermascope_update::manifest::ManifestError::UnsafePath { .. }
                )
            ),
            "{evil}: {err}"
        );
    }
}

#[test]
fn a_downgrade_is_refused_unless_signed_as_one() {
    let d = device();
    let v5 = bundle(&d.base.join("b5"), &adapter_only("enc-a", 5), 5, &d.a);
    install(&installer(&d.root, &d.keys), &v5, &FakeCheck::pass()).unwrap();
    let v3 = bundle(&d.base.join("b3"), &adapter_only("enc-a", 3), 3, &d.a);
    let before = snapshot(&d.root);
    let err = install(&installer(&d.root, &d.keys), &v3, &FakeCheck::pass()).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::Downgrade {
                version: 3,
                floor: 5
            }
        ),
        "{err}"
    );
    assert_eq!(snapshot(&d.root), before);
    // The same version again, with other contents: not newer.
    let v5b = bundle(&d.base.join("b5b"), &adapter_only("enc-a", 55), 5, &d.a);
    assert!(matches!(
        install(&installer(&d.root, &d.keys), &v5b, &FakeCheck::pass()).unwrap_err(),
        UpdateError::NotNewer { .. }
    ));
    // The identical bundle again: a no-op, not an error (idempotent).
    let again = install(&installer(&d.root, &d.keys), &v5, &FakeCheck::pass()).unwrap();
    assert!(again.plan.already_installed);
    assert_eq!(snapshot(&d.root), before);

    let down = bundle_with(
        &d.base.join("b3d"),
        &adapter_only("enc-a", 33),
        &d.a,
        SignOptions {
            version: 3,
            downgrade: true,
            ..SignOptions::default()
        },
    );
    install(&installer(&d.root, &d.keys), &down, &FakeCheck::pass()).unwrap();
    let i = installer(&d.root, &d.keys);
    assert_eq!(i.current_version().unwrap(), Some(3));
    // The floor stays at the highest version ever installed: the old
    // version 4 bundle cannot be replayed after the downgrade.
    assert_eq!(i.status().unwrap().floor, 5);
    let v4 = bundle(&d.base.join("b4"), &adapter_only("enc-a", 4), 4, &d.a);
    assert!(matches!(
        install(&i, &v4, &FakeCheck::pass()).unwrap_err(),
        UpdateError::Downgrade {
            version: 4,
            floor: 5
        }
    ));
}

#[test]
fn an_adapter_or_library_for_another_encoder_is_refused() {
    let d = device();
    let adapter = bundle(&d.base.join("b2"), &adapter_only("enc-b", 2), 2, &d.a);
    match refused(&d, &adapter) {
        UpdateError::EncoderMismatch {
            part,
            needs,
            installed,
        } => assert_eq!(
            (part, needs.as_str(), installed.as_str()),
            (Part::Adapter, "enc-b", "enc-a")
        ),
        other => panic!("expected EncoderMismatch, got {other}"),
    }
    let library = bundle_with(
        &d.base.join("b3"),
        &Contents {
            library: true,
            seed: 3,
            ..Contents::default()
        },
        &d.a,
        SignOptions {
            version: 3,
            encoder_model_id: Some("enc-b".into()),
            ..SignOptions::default()
        },
    );
    assert!(matches!(
        refused(&d, &library),
        UpdateError::EncoderMismatch {
            part: Part::Library,
            ..
        }
    ));
    // A `needs` that lies about the adapter's encoder is caught by the
    // adapter's own manifest.
    let lying = bundle_with(
        &d.base.join("b4"),
        &adapter_only("enc-b", 4),
        &d.a,
        SignOptions {
            version: 4,
            encoder_model_id: Some("enc-a".into()),
            ..SignOptions::default()
        },
    );
    assert!(matches!(
        refused(&d, &lying),
        UpdateError::EncoderMismatch { .. }
    ));
}

#[test]
fn a_bundle_for_a_newer_daemon_is_refused() {
    let d = device();
    let b = bundle_with(
        &d.base.join("b2"),
        &adapter_only("enc-a", 2),
        &d.a,
        SignOptions {
            version: 2,
            min_daemon_version: Some("0.2.0".into()),
            ..SignOptions::default()
        },
    );
    assert!(matches!(refused(&d, &b), UpdateError::DaemonTooOld { .. }));
}

#[test]
fn a_failed_health_check_switches_back_and_is_never_retried_automatically() {
    let d = device();
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &d.a);
    let failing = FakeCheck::failing("the adapter did not load");
    let err = install(&installer(&d.root, &d.keys), &b, &failing).unwrap_err();
    assert!(
        matches!(err, UpdateError::HealthCheck { version: 2, .. }),
        "{err}"
    );
    assert_eq!(*failing.calls.borrow(), 1);
    let i = installer(&d.root, &d.keys);
    assert_eq!(i.current_version().unwrap(), Some(1));
    verify_version(&d.root.join("current")).unwrap();
    let status = i.status().unwrap();
    assert_eq!(status.failed.len(), 1);
    assert_eq!(status.failed[0].reason, "the adapter did not load");
    assert!(
        !d.root.join("versions/2").exists(),
        "the failed version was kept"
    );
    // Offered again (the daemon finding it on the stick at every start):
    // refused without running anything.
    let check = FakeCheck::pass();
    let before = snapshot(&d.root);
    let again = install(&i, &b, &check).unwrap_err();
    assert!(
        matches!(again, UpdateError::AlreadyFailed { version: 2, .. }),
        "{again}"
    );
    assert_eq!(*check.calls.borrow(), 0);
    assert_eq!(snapshot(&d.root), before);
    // An operator's explicit retry runs it.
    i.install(
        &b,
        &InstallOptions {
            retry_failed: true,
            prepare: &NoPreparation,
            health: &check,
            progress: &|_: Step| {},
        },
    )
    .unwrap();
    assert_eq!(i.current_version().unwrap(), Some(2));
}

#[test]
fn a_failed_first_install_leaves_no_current() {
    let tmp = tempfile::tempdir().unwrap();
    let a = key(&tmp.path().join("op"), "a");
    let keys = trusted_dir(&tmp.path().join("keys"), &[&a]);
    let root = tmp.path().join("root");
    let b = bundle(&tmp.path().join("b1"), &full("enc-a", 1), 1, &a);
    let i = installer(&root, &keys);
    assert!(install(&i, &b, &FakeCheck::failing("no")).is_err());
    assert_eq!(i.current_version().unwrap(), None);
    assert!(fs::symlink_metadata(root.join("current")).is_err());
}

#[test]
fn adapter_only_keeps_the_encoder_and_rollback_returns_to_the_previous() {
    let d = device();
    let v1_encoder = fs::read(d.root.join("versions/1/encoder/encoder-fp32.onnx")).unwrap();
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &d.a);
    let i = installer(&d.root, &d.keys);
    let started = Instant::now();
    let report = install(&i, &b, &FakeCheck::pass()).unwrap();
    // A figure for the report, not an assertion.
    println!(
        "figure: adapter-only install (16 KiB adapter, 128 KiB encoder kept by hard link, health check re-hashing the version): {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        report.plan.carried_forward,
        vec![Part::Encoder, Part::Library, Part::Config]
    );
    let record = verify_version(&d.root.join("current")).unwrap();
    assert_eq!(record.version, 2);
    assert_eq!(record.part(Part::Encoder).unwrap().from_version, 1);
    assert_eq!(record.part(Part::Adapter).unwrap().from_version, 2);
    assert_eq!(
        fs::read(d.root.join("current/encoder/encoder-fp32.onnx")).unwrap(),
        v1_encoder
    );
    assert_eq!(i.status().unwrap().previous, Some(1));
    assert_eq!(i.rollback().unwrap(), 1);
    assert_eq!(i.current_version().unwrap(), Some(1));
    verify_version(&d.root.join("current")).unwrap();
    // Rolling back again returns to 2: both are kept.
    assert_eq!(i.rollback().unwrap(), 2);
}

#[test]
fn an_encoder_change_drops_the_adapter_made_for_the_old_one() {
    let d = device();
    let b = bundle(
        &d.base.join("b2"),
        &Contents {
            encoder: Some(("enc-b".into(), 32 * 1024)),
            seed: 2,
            ..Contents::default()
        },
        2,
        &d.a,
    );
    let report = install(&installer(&d.root, &d.keys), &b, &FakeCheck::pass()).unwrap();
    assert_eq!(report.plan.dropped, vec![Part::Adapter, Part::Library]);
    let record = verify_version(&d.root.join("current")).unwrap();
    assert_eq!(record.encoder_model_id.as_deref(), Some("enc-b"));
    assert!(record.part(Part::Adapter).is_none());
    assert!(record.part(Part::Config).is_some());
}

#[test]
fn a_dry_run_plans_without_writing() {
    let d = device();
    let b = bundle(&d.base.join("b2"), &adapter_only("enc-a", 2), 2, &d.a);
    let before = snapshot(&d.root);
    let plan = installer(&d.root, &d.keys).plan(&b).unwrap();
    assert_eq!(plan.from, Some(1));
    assert!(!plan.already_installed);
    assert_eq!(snapshot(&d.root), before);
    // A clean start finds nothing to recover.
    assert_eq!(
        installer(&d.root, &d.keys).recover().unwrap(),
        None::<Recovery>
    );
}
