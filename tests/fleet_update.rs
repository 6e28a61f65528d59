//! A fleet rollout reaches a real device: the operator publishes signed
//! bundles to the real service (PostgreSQL, TLS) and rolls them out; the
//! running daemon learns of each through its sync channel, downloads the
//! archive, verifies and installs it with the real health check, starts
//! again into it and reports; the operator's rollback takes the device
//! back to the version before. Every confirmed case survives.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use dermascope_cloud::config::ServiceConfig;
use dermascope_cloud::fleet::{self, BundleFacts, Mode, NewRollout, StageSpec};
use dermascope_cloud::{db, operator, server};
use support::{
    daemon_config, dermascope_once as dermascope, encoder_part, pki, s, synthetic_library,
    LoggedDaemon,
};

/// Generous: each start loads the encoder; an install copies ~100 MB.
const WATCHDOG: Duration = Duration::from_secs(240);

/// Signs `bundle` as `version` and packs it, as `dermascope-fleet bundle
/// build` does; returns the archive and the facts the service stores.
fn build(bundle: &Path, key: &Path, version: u64, out: &Path) -> BundleFacts {
    let signed = dermascope(&[
        "update",
        "sign",
        s(bundle),
        "--key",
        s(key),
        "--version",
        &version.to_string(),
        "--json",
    ]);
    assert!(signed.status.success(), "{signed:?}");
    let signed: serde_json::Value = serde_json::from_slice(&signed.stdout).unwrap();
    dermascope_update::archive::pack(bundle, out).unwrap();
    let manifest = fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    let parsed = dermascope_update::Manifest::parse(manifest.as_bytes()).unwrap();
    BundleFacts {
        version,
        downgrade: false,
        carries: parsed.carries.iter().map(|p| p.to_string()).collect(),
        encoder_model_id: parsed.needs.encoder_model_id.clone(),
        signed_by: signed["key"].as_str().unwrap().to_owned(),
        manifest,
    }
}

fn config_bundle(dir: &Path, config: &str) {
    fs::create_dir_all(dir.join("config")).unwrap();
    fs::write(dir.join("config/dermascope.toml"), config).unwrap();
}

fn current(root: &Path) -> serde_json::Value {
    let out = dermascope(&["update", "status", "--root", s(root), "--json"]);
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status["current"].clone()
}

#[test]
fn a_rollout_installs_on_a_running_device_and_its_rollback_takes_it_back() {
    let Some(pg) = dermascope_testkit::postgres("fleet_update_end_to_end") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (ca, tls) = pki(t);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = ServiceConfig::for_database(&pg.url);
    config.tls = Some(tls);
    let service = runtime.block_on(server::start(config)).unwrap();
    let pool = runtime
        .block_on(db::connect(&pg.url, &Default::default()))
        .unwrap();
    let manifest: toml::Value = toml::from_str(
        &fs::read_to_string(dermascope_testkit::bundle_dir().join("manifest.toml")).unwrap(),
    )
    .unwrap();
    let device = runtime.block_on(async {
        operator::add_clinic(&pool, "Hill clinic", false)
            .await
            .unwrap();
        operator::add_model(
            &pool,
            manifest["model_id"].as_str().unwrap(),
            manifest["output"]["dim"].as_integer().unwrap() as usize,
        )
        .await
        .unwrap();
        operator::add_device(&pool, "Hill clinic", "scope A")
            .await
            .unwrap()
    });

    // The operator's key; the device trusts its public half.
    let key = t.join("operator/a.key");
    assert!(dermascope(&["update", "keygen", "--secret", s(&key)])
        .status
        .success());
    let root = t.join("update");
    fs::create_dir_all(root.join("keys")).unwrap();
    fs::copy(t.join("operator/a.pub"), root.join("keys/a.pub")).unwrap();

    let host = daemon_config(t, &t.join("cases"));
    let credential = t.join("fleet.credential");
    fs::write(&credential, &device.credential).unwrap();
    fs::set_permissions(&credential, fs::Permissions::from_mode(0o600)).unwrap();
    let device_config = format!(
        "{}[sync]\nurl = {:?}\nca = {ca:?}\ncredential_file = {credential:?}\ninterval_s = 1\n\
         [update]\nroot = {root:?}\n",
        fs::read_to_string(&host.config).unwrap(),
        service.base_url(),
    );
    fs::write(&host.config, &device_config).unwrap();
    let (_, library_ids) = synthetic_library(&t.join("library"), 2, "ref");

    // Version 1: the encoder and a configuration that shows 3 cases.
    let b1 = t.join("b1");
    encoder_part(&b1);
    config_bundle(&b1, &format!("{device_config}[pipeline]\ntop_k = 3\n"));
    let facts1 = build(&b1, &key, 1, &t.join("v1.tar"));
    // Version 2: only the configuration, showing 4.
    let b2 = t.join("b2");
    config_bundle(&b2, &format!("{device_config}[pipeline]\ntop_k = 4\n"));
    let facts2 = build(&b2, &key, 2, &t.join("v2.tar"));

    let mut daemon = LoggedDaemon::start(
        support::dermascope()
            .env("RUST_LOG", "info,dermascope_pipeline=debug")
            .args(["run", "--config", s(&host.config), "--cases"])
            .arg(t.join("library")),
        &host.socket,
        WATCHDOG,
    );
    daemon.press_until_ok(&["capture"]);
    daemon.press_until_ok(&["confirm", "nv"]);
    daemon.wait_for("screen=ready:saved", 1);

    let rollout = |facts: &BundleFacts, archive: &str| {
        runtime.block_on(async {
            let published = fleet::publish_bundle(&pool, facts, &t.join(archive), Mode::Apply)
                .await
                .unwrap();
            fleet::create_rollout(
                &pool,
                &NewRollout {
                    bundle: published.bundle.bundle_id.clone(),
                    clinic: "Hill clinic".into(),
                    stages: vec![StageSpec::Rest],
                    success_threshold: 1.0,
                    error_threshold: 0.5,
                },
                Mode::Apply,
            )
            .await
            .unwrap()
            .rollout
            .rollout_id
        })
    };
    let status_of = |id: &str| runtime.block_on(fleet::rollout_status(&pool, id)).unwrap();
    let settle = |id: &str, state: &str| {
        let deadline = Instant::now() + WATCHDOG;
        loop {
            let status = status_of(id);
            if status.state == state {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "watchdog: rollout never {state}: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // 1. Roll out version 1: downloaded, installed, started into, reported.
    let first = rollout(&facts1, "v1.tar");
    daemon.wait_for("update 1 installed; starting again", 1);
    let done = settle(&first, "done");
    assert_eq!(done.devices[0].state, "installed", "{done:?}");
    assert_eq!(current(&root), 1);
    daemon.press_until_ok(&["capture"]);
    daemon.wait_for("screen=results:3", 1);
    daemon.press_until_ok(&["confirm", "mel"]);
    daemon.wait_for("screen=ready:saved", 2);

    // 2. Version 2 on top, then the operator rolls it back: the device
    //    switches back to version 1 and says so.
    let second = rollout(&facts2, "v2.tar");
    daemon.wait_for("update 2 installed; starting again", 1);
    settle(&second, "done");
    assert_eq!(current(&root), 2);
    runtime
        .block_on(fleet::rollback_rollout(&pool, &second, Mode::Apply))
        .unwrap();
    daemon.wait_for("update 2 rolled back to 1", 1);
    let rolled = settle(&second, "rolled_back");
    assert_eq!(rolled.devices[0].state, "rolled_back", "{rolled:?}");
    assert_eq!(current(&root), 1);
    daemon.press_until_ok(&["capture"]);
    daemon.wait_for("screen=results:3", 2);
    let log = daemon.stop();
    // No bundle was downloaded or installed twice.
    assert_eq!(log.matches("update 1 installed").count(), 1, "{log}");
    assert_eq!(log.matches("update 2 installed").count(), 1, "{log}");

    let identity = dermascope_store::CaseStore::identity_at(t.join("cases"))
        .unwrap()
        .unwrap();
    let store = dermascope_store::CaseStore::open(t.join("cases"), identity).unwrap();
    assert_eq!(store.len().unwrap(), library_ids.len() + 2);
    runtime.block_on(service.shutdown());
}
