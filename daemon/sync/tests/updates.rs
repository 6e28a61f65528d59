//! The device's update channel against the real fleet service (in-process,
//! on a real PostgreSQL) with a signed, packed bundle published and rolled
//! out exactly as the operator's tool does it, and faults injected by the
//! loopback proxy. Every wait is on a status, the proxy's log or a
//! database row, under a watchdog; nothing asserts on durations.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dermascope_cloud::fleet::{self, Bundle, BundleFacts, Mode, NewRollout, StageSpec};
use dermascope_cloud_api::{bundle_archive_route, routes, UpdateOutcome, UpdateResult};
use dermascope_sync::{ReadyUpdate, SyncHandle, Syncer, UpdateSettings};
use dermascope_update::archive::{pack, unpack};
use dermascope_update::keys::{generate, read_secret};
use dermascope_update::{sign_bundle, verify_bundle, SignOptions, TrustedKeys};
use support::{next_cycle, wait_until, Action, Device, Fleet};

/// Larger than the service's 1 MiB chunks, so a cut falls inside the
/// archive's second chunk and a resume starts in the middle of one.
const BLOB_BYTES: usize = 3 * 1024 * 1024 + 12_345;
const CUT_AT: usize = 1_500_000;

struct Setup {
    fleet: Fleet,
    device: Device,
    bundle: Bundle,
    rollout_id: String,
    /// The archive as the operator packed it.
    archive: Vec<u8>,
    /// The operator's public key, as a device's trusted-keys directory.
    trusted: PathBuf,
    work: tempfile::TempDir,
}

impl Setup {
    fn downloads(&self) -> PathBuf {
        self.device.dir.path().join("downloads")
    }

    fn settings(&self) -> UpdateSettings {
        let mut settings = UpdateSettings::new(self.downloads(), "0.1.0");
        // The test machine's disk is not the point, except where it is.
        settings.keep_free_bytes = 0;
        settings
    }

    fn start(&self, settings: UpdateSettings) -> SyncHandle {
        self.start_via(&self.fleet.proxy.url(), settings)
    }

    /// A device that runs no bundle yet, as the daemon tells its sync.
    fn start_via(&self, url: &str, settings: UpdateSettings) -> SyncHandle {
        let config = self.device.config(url);
        let sync = Syncer::start_with_updates(config, Arc::clone(&self.device.store), settings)
            .expect("start the sync with updates");
        sync.set_installed(None, vec![]);
        sync
    }

    /// The archive route as the proxy matches it.
    fn archive_route(&self) -> &'static str {
        Box::leak(bundle_archive_route(&self.bundle.bundle_id).into_boxed_str())
    }

    fn archive_gets(&self) -> Vec<support::proxy::Exchange> {
        let route = bundle_archive_route(&self.bundle.bundle_id);
        self.fleet
            .proxy
            .log()
            .into_iter()
            .filter(|e| e.is("GET", &route))
            .collect()
    }

    fn device_state(&self) -> (String, Option<String>) {
        self.fleet
            .rt
            .block_on(
                sqlx::query_as::<_, (String, Option<String>)>(
                    "SELECT state, detail FROM rollout_devices \
                     WHERE rollout_id = $1::uuid AND device_id = $2::uuid",
                )
                .bind(&self.rollout_id)
                .bind(&self.device.device_id)
                .fetch_one(&self.fleet.pool),
            )
            .expect("the device's rollout row")
    }

    fn wait_state(&self, state: &str) -> Option<String> {
        let mut detail = None;
        wait_until(&format!("the device's rollout row {state}"), || {
            let (now, d) = self.device_state();
            detail = d;
            now == state
        });
        detail
    }
}

/// A signed bundle carrying a configuration and a large blob, packed,
/// published and rolled out to every device of one clinic with one device.
fn setup(test: &str) -> Option<Setup> {
    let fleet = Fleet::start(test)?;
    let clinic = fleet.clinic("Clinic U", false);
    let device = Device::new(&fleet.device(&clinic, "u1"));
    let work = tempfile::tempdir().expect("work dir");
    let keys = work.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    let verifying = generate(&keys.join("op.key"), &keys.join("op.pub")).expect("a key pair");
    let signing = read_secret(&keys.join("op.key")).unwrap();
    let trusted = work.path().join("trusted");
    fs::create_dir_all(&trusted).unwrap();
    fs::copy(keys.join("op.pub"), trusted.join("op.pub")).unwrap();

    let dir = work.path().join("bundle");
    fs::create_dir_all(dir.join("config")).unwrap();
    fs::write(dir.join("config/dermascope.toml"), "[camera]\n").unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let blob: Vec<u8> = (0..BLOB_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(dir.join("config/blob.bin"), &blob).unwrap();
    let manifest = sign_bundle(
        &dir,
        &signing,
        &SignOptions {
            version: 2,
            ..SignOptions::default()
        },
    )
    .expect("sign the bundle");
    let tar = work.path().join("bundle.tar");
    let info = pack(&dir, &tar).expect("pack the bundle");
    let facts = BundleFacts {
        version: manifest.version,
        downgrade: false,
        carries: vec!["config".into()],
        encoder_model_id: None,
        signed_by: hex::encode(verifying.as_bytes()),
        manifest: fs::read_to_string(dir.join("bundle.toml")).unwrap(),
    };
    let published = fleet
        .rt
        .block_on(fleet::publish_bundle(
            &fleet.pool,
            &facts,
            &tar,
            Mode::Apply,
        ))
        .expect("publish the bundle");
    assert_eq!(published.bundle.archive_sha256, info.sha256);
    let rollout = fleet
        .rt
        .block_on(fleet::create_rollout(
            &fleet.pool,
            &NewRollout {
                bundle: published.bundle.bundle_id.clone(),
                clinic: "Clinic U".into(),
                stages: vec![StageSpec::Rest],
                success_threshold: 1.0,
                error_threshold: 1.0,
            },
            Mode::Apply,
        ))
        .expect("create the rollout");
    Some(Setup {
        archive: fs::read(&tar).unwrap(),
        fleet,
        device,
        bundle: published.bundle,
        rollout_id: rollout.rollout.rollout_id,
        trusted,
        work,
    })
}

fn wait_ready(sync: &SyncHandle) -> ReadyUpdate {
    let mut ready = None;
    wait_until("an update ready for the daemon", || {
        ready = sync.take_update();
        ready.is_some()
    });
    ready.expect("just taken")
}

/// The downloads (`.part`, `.tar`) in `dir`, not the results journal.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".part") || n.ends_with(".tar"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_cut_download_resumes_from_the_byte_it_stopped_at_and_installs() {
    let Some(s) = setup("update_resume") else {
        return;
    };
    s.fleet
        .proxy
        .fault("GET", s.archive_route(), Action::Cut(CUT_AT), 1);
    let sync = s.start(s.settings());
    let ready = wait_ready(&sync);
    let archive = match &ready {
        ReadyUpdate::Install {
            rollout_id,
            version,
            archive,
        } => {
            assert_eq!(rollout_id, &s.rollout_id);
            assert_eq!(*version, 2);
            archive.clone()
        }
        other => panic!("{other:?}"),
    };

    // The service saw a whole request, cut after CUT_AT bytes, then one
    // asking from exactly that byte, answered 206.
    let gets = s.archive_gets();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].header("range"), None);
    assert!(gets[0].fault.as_deref().unwrap_or("").starts_with("Cut"));
    assert_eq!(
        gets[1].header("range"),
        Some(format!("bytes={CUT_AT}-").as_str())
    );
    assert_eq!(gets[1].status, Some(206));
    assert_eq!(gets[1].body.len(), s.archive.len() - CUT_AT);

    // Whole, byte for byte, under its sha256; nothing partial left.
    assert_eq!(fs::read(&archive).unwrap(), s.archive);
    assert_eq!(
        archive.file_name().unwrap().to_str().unwrap(),
        format!("{}.tar", s.bundle.archive_sha256)
    );
    assert_eq!(
        files_in(&s.downloads()),
        vec![format!("{}.tar", s.bundle.archive_sha256)]
    );
    assert_eq!(sync.status().download, None, "no download under way");
    // And it is the operator's bundle: it unpacks and verifies.
    let unpacked = s.work.path().join("unpacked");
    unpack(&archive, &unpacked).expect("unpack the download");
    let trusted = TrustedKeys::load(&s.trusted).unwrap();
    let verified = verify_bundle(&unpacked, &trusted, &BTreeSet::new()).expect("verify");
    assert_eq!(verified.manifest.version, 2);

    // Handed out once only, and the result settles the rollout.
    next_cycle(&sync);
    assert_eq!(sync.take_update(), None, "handed out twice");
    sync.report_update(UpdateResult {
        rollout_id: s.rollout_id.clone(),
        version: 2,
        outcome: UpdateOutcome::Installed,
        detail: None,
    });
    s.wait_state("installed");
    assert!(!archive.exists(), "the archive is deleted once it served");
    next_cycle(&sync);
    assert_eq!(sync.take_update(), None);
    assert_eq!(s.archive_gets().len(), 2, "fetched again after installing");

    // The daemon now runs it; the operator rolls back: the device is
    // handed the rollback, once.
    sync.set_installed(Some(2), vec![]);
    next_cycle(&sync);
    s.fleet
        .rt
        .block_on(fleet::rollback_rollout(
            &s.fleet.pool,
            &s.rollout_id,
            Mode::Apply,
        ))
        .expect("roll back");
    let ready = wait_ready(&sync);
    assert_eq!(
        ready,
        ReadyUpdate::Rollback {
            rollout_id: s.rollout_id.clone(),
            version: 2
        }
    );
    sync.report_update(UpdateResult {
        rollout_id: s.rollout_id.clone(),
        version: 2,
        outcome: UpdateOutcome::RolledBack,
        detail: None,
    });
    s.wait_state("rolled_back");
    next_cycle(&sync);
    assert_eq!(sync.take_update(), None);
}

#[test]
fn a_restarted_sync_resumes_the_part_left_on_disk() {
    let Some(s) = setup("update_restart") else {
        return;
    };
    s.fleet
        .proxy
        .fault("GET", s.archive_route(), Action::Cut(CUT_AT), 1);
    // Hold every later archive request, so the first sync stops with
    // exactly the cut part on disk.
    s.fleet
        .proxy
        .fault_after("GET", s.archive_route(), 0, Action::Hold, usize::MAX);
    let first = s.start(s.settings());
    s.fleet.proxy.wait_held(1);
    let part = s
        .downloads()
        .join(format!("{}.part", s.bundle.archive_sha256));
    assert_eq!(fs::metadata(&part).unwrap().len(), CUT_AT as u64);
    let progress = first.status().download.expect("a download under way");
    assert_eq!(
        (progress.version, progress.done, progress.total),
        (2, CUT_AT as u64, s.archive.len() as u64)
    );
    s.fleet.proxy.release();
    first.stop();

    // A new sync (the daemon restarted), through a proxy without faults.
    let clean = support::Proxy::start(
        s.fleet
            .direct_url()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("the service's address"),
    );
    let second = s.start_via(&clean.url(), s.settings());
    let ready = wait_ready(&second);
    let route = bundle_archive_route(&s.bundle.bundle_id);
    let gets: Vec<_> = clean
        .log()
        .into_iter()
        .filter(|e| e.is("GET", &route))
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(
        gets[0].header("range"),
        Some(format!("bytes={CUT_AT}-").as_str())
    );
    assert_eq!(gets[0].status, Some(206));
    match ready {
        ReadyUpdate::Install { archive, .. } => assert_eq!(fs::read(archive).unwrap(), s.archive),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_damaged_archive_is_fetched_again_then_accepted() {
    let Some(s) = setup("update_damaged_once") else {
        return;
    };
    s.fleet
        .proxy
        .fault("GET", s.archive_route(), Action::Corrupt, 2);
    let sync = s.start(s.settings());
    let ready = wait_ready(&sync);
    let gets = s.archive_gets();
    assert_eq!(gets.len(), 3, "two damaged fetches and a good one");
    // A damaged download is deleted, not resumed: every fetch is whole.
    assert!(gets.iter().all(|g| g.header("range").is_none()), "{gets:?}");
    match ready {
        ReadyUpdate::Install { archive, .. } => assert_eq!(fs::read(archive).unwrap(), s.archive),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.device_state().0, "offered", "nothing reported yet");
}

#[test]
fn an_archive_damaged_every_time_is_refused_after_three_refetches_and_never_again() {
    let Some(s) = setup("update_damaged") else {
        return;
    };
    s.fleet
        .proxy
        .fault("GET", s.archive_route(), Action::Corrupt, usize::MAX);
    let sync = s.start(s.settings());
    let detail = s.wait_state("refused").unwrap_or_default();
    assert!(detail.contains("damaged"), "{detail}");
    assert_eq!(
        s.archive_gets().len(),
        1 + dermascope_sync::MAX_REFETCHES as usize
    );
    assert!(
        files_in(&s.downloads()).is_empty(),
        "a damaged download is deleted"
    );
    next_cycle(&sync);
    next_cycle(&sync);
    assert_eq!(sync.take_update(), None);
    assert_eq!(
        s.archive_gets().len(),
        1 + dermascope_sync::MAX_REFETCHES as usize,
        "fetched again after it was refused"
    );
}

#[test]
fn an_archive_above_the_free_space_is_refused_before_a_byte_is_fetched() {
    let Some(s) = setup("update_no_space") else {
        return;
    };
    let mut settings = s.settings();
    // More than any disk has free: the real free space is measured.
    settings.keep_free_bytes = u64::MAX / 4;
    let sync = s.start(settings);
    let detail = s.wait_state("refused").unwrap_or_default();
    assert!(detail.contains("free"), "{detail}");
    assert!(s.archive_gets().is_empty(), "fetched despite no space");
    assert!(files_in(&s.downloads()).is_empty());
    assert_eq!(sync.take_update(), None);
    assert_eq!(sync.status().download, None);
}

#[test]
fn an_archive_above_the_bundle_caps_is_refused_before_a_byte_is_fetched() {
    let Some(s) = setup("update_too_large") else {
        return;
    };
    // What a confused or hostile service could offer.
    let huge = dermascope_update::archive::MAX_ARCHIVE_BYTES + 1;
    s.fleet
        .rt
        .block_on(
            sqlx::query("UPDATE bundles SET archive_size = $1 WHERE bundle_id = $2::uuid")
                .bind(huge as i64)
                .bind(&s.bundle.bundle_id)
                .execute(&s.fleet.pool),
        )
        .unwrap();
    let sync = s.start(s.settings());
    let detail = s.wait_state("refused").unwrap_or_default();
    assert!(detail.contains(&huge.to_string()), "{detail}");
    assert!(s.archive_gets().is_empty());
    assert_eq!(sync.take_update(), None);
}

#[test]
fn a_result_is_sent_again_until_the_service_acknowledges_it() {
    let Some(s) = setup("update_result_retry") else {
        return;
    };
    let sync = s.start(s.settings());
    let ready = wait_ready(&sync);
    assert!(matches!(ready, ReadyUpdate::Install { .. }));
    // Two refusals, then an answer lost on the way back (the service
    // recorded it; the device cannot know).
    let proxy = &s.fleet.proxy;
    proxy.fault(
        "POST",
        routes::UPDATE_RESULT,
        Action::json(503, r#"{"code":"unavailable","message":"try later"}"#),
        2,
    );
    // Faults apply in the order given: this one once the first is spent.
    proxy.fault("POST", routes::UPDATE_RESULT, Action::DropAnswer, 1);
    // The device does not call set_installed here, so only the result can
    // move its row.
    sync.report_update(UpdateResult {
        rollout_id: s.rollout_id.clone(),
        version: 2,
        outcome: UpdateOutcome::Installed,
        detail: Some("installed and health-checked".into()),
    });
    let results = || -> Vec<support::proxy::Exchange> {
        proxy
            .log()
            .into_iter()
            .filter(|e| e.is("POST", routes::UPDATE_RESULT))
            .collect()
    };
    proxy.wait_log("an acknowledged result", |log| {
        log.iter().any(|e| {
            e.is("POST", routes::UPDATE_RESULT) && e.fault.is_none() && e.status == Some(200)
        })
    });
    let sent = results();
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert!(sent[..3].iter().all(|e| e.fault.is_some()));
    let bodies: BTreeSet<&[u8]> = sent.iter().map(|e| e.request.as_slice()).collect();
    assert_eq!(bodies.len(), 1, "every attempt sends the same result");
    let ack: serde_json::Value = serde_json::from_slice(&sent[3].body).unwrap();
    assert_eq!(ack["recorded"], false, "the lost answer had recorded it");
    assert_eq!(
        s.wait_state("installed").as_deref(),
        Some("installed and health-checked")
    );
    next_cycle(&sync);
    next_cycle(&sync);
    assert_eq!(results().len(), 4, "sent again after it was acknowledged");
    assert_eq!(sync.take_update(), None);
}

#[test]
fn a_result_not_yet_acknowledged_is_sent_by_the_next_run() {
    let Some(s) = setup("update_result_restart") else {
        return;
    };
    let proxy = &s.fleet.proxy;
    proxy.fault(
        "POST",
        routes::UPDATE_RESULT,
        Action::json(503, r#"{"code":"unavailable","message":"try later"}"#),
        usize::MAX,
    );
    let first = s.start(s.settings());
    let _ = wait_ready(&first);
    first.report_update(UpdateResult {
        rollout_id: s.rollout_id.clone(),
        version: 2,
        outcome: UpdateOutcome::Installed,
        detail: None,
    });
    proxy.wait_log("a result refused", |log| {
        log.iter().any(|e| e.is("POST", routes::UPDATE_RESULT))
    });
    first.stop();
    assert_eq!(s.device_state().0, "offered");

    // The daemon restarts; the service is reachable again.
    let clean = support::Proxy::start(
        s.fleet
            .direct_url()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("the service's address"),
    );
    let second = s.start_via(&clean.url(), s.settings());
    s.wait_state("installed");
    next_cycle(&second);
    let sent: Vec<_> = clean
        .log()
        .into_iter()
        .filter(|e| e.is("POST", routes::UPDATE_RESULT))
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].status, Some(200));
    let journal = fs::read(s.downloads().join(dermascope_sync::update::RESULTS_FILE)).unwrap();
    assert_eq!(
        journal, b"[]",
        "an acknowledged result stays in the journal"
    );
}

/// The daemon's health check, reduced to what the sync test needs: the
/// version it is asked about is complete.
struct Complete;

impl dermascope_update::HealthCheck for Complete {
    fn check(&self, version: &dermascope_update::InstalledVersion) -> Result<(), String> {
        dermascope_update::verify_version(&version.dir)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The device's whole side, as the daemon drives it: version 1 from a
/// stick, version 2 from the fleet (download cut once), installed by the
/// real installer from the unpacked archive, reported; then the operator's
/// rollback carried out by the installer and reported.
#[test]
fn a_device_installs_the_rollouts_bundle_and_rolls_it_back() {
    let Some(s) = setup("update_end_to_end") else {
        return;
    };
    let keys = TrustedKeys::load(&s.trusted).unwrap();
    let installer =
        dermascope_update::Installer::new(s.device.dir.path().join("updates"), keys, "0.1.0");
    let install = |bundle: &Path| {
        installer.install(
            bundle,
            &dermascope_update::InstallOptions {
                retry_failed: false,
                prepare: &dermascope_update::NoPreparation,
                health: &Complete,
                progress: &|_| {},
            },
        )
    };
    let v1 = s.work.path().join("v1");
    fs::create_dir_all(v1.join("config")).unwrap();
    fs::write(v1.join("config/dermascope.toml"), "# version 1\n").unwrap();
    let signing = read_secret(&s.work.path().join("keys/op.key")).unwrap();
    sign_bundle(
        &v1,
        &signing,
        &SignOptions {
            version: 1,
            ..SignOptions::default()
        },
    )
    .unwrap();
    install(&v1).expect("install version 1 from the stick");

    s.fleet
        .proxy
        .fault("GET", s.archive_route(), Action::Cut(CUT_AT), 1);
    let sync = s.start(s.settings());
    let installed = |sync: &SyncHandle| {
        let status = installer.status().unwrap();
        sync.set_installed(
            installer.current_version().unwrap(),
            status.failed.iter().map(|f| f.version).collect(),
        );
    };
    installed(&sync);
    let (rollout_id, version, archive) = match wait_ready(&sync) {
        ReadyUpdate::Install {
            rollout_id,
            version,
            archive,
        } => (rollout_id, version, archive),
        other => panic!("{other:?}"),
    };
    let unpacked = s.work.path().join("unpacked");
    unpack(&archive, &unpacked).expect("unpack");
    let report = install(&unpacked).expect("install version 2");
    assert_eq!(report.version, 2);
    sync.report_update(UpdateResult {
        rollout_id: rollout_id.clone(),
        version,
        outcome: UpdateOutcome::Installed,
        detail: None,
    });
    installed(&sync);
    s.wait_state("installed");
    let status = |s: &Setup| {
        s.fleet
            .rt
            .block_on(fleet::rollout_status(&s.fleet.pool, &s.rollout_id))
            .unwrap()
    };
    assert_eq!(status(&s).state, "done");

    s.fleet
        .rt
        .block_on(fleet::rollback_rollout(
            &s.fleet.pool,
            &s.rollout_id,
            Mode::Apply,
        ))
        .unwrap();
    match wait_ready(&sync) {
        ReadyUpdate::Rollback { version: 2, .. } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(installer.current_version().unwrap(), Some(2));
    assert_eq!(installer.rollback().expect("roll back"), 1);
    sync.report_update(UpdateResult {
        rollout_id,
        version: 2,
        outcome: UpdateOutcome::RolledBack,
        detail: None,
    });
    installed(&sync);
    s.wait_state("rolled_back");
    wait_until("the rollout rolled back", || {
        status(&s).state == "rolled_back"
    });
    assert_eq!(installer.current_version().unwrap(), Some(1));
    next_cycle(&sync);
    assert_eq!(sync.take_update(), None);
}

#[test]
fn the_report_carries_what_the_daemon_runs_and_settles_the_rollout() {
    let Some(s) = setup("update_report") else {
        return;
    };
    s.device.capture(2, "pending");
    let sync = s.start(s.settings());
    let _ = wait_ready(&sync);
    // Installed, but the result is lost: the next report settles it.
    sync.set_installed(Some(2), vec![1]);
    s.wait_state("installed");
    let reports: Vec<serde_json::Value> = s
        .fleet
        .proxy
        .log()
        .into_iter()
        .filter(|e| e.is("POST", routes::UPDATE))
        .map(|e| serde_json::from_slice(&e.request).unwrap())
        .collect();
    // The proxy logs a request when its answer is sent, so under a slow
    // runner (qemu) an earlier report can be logged after a later one: take
    // the report made after the install, not the last one logged.
    let last = reports
        .iter()
        .rev()
        .find(|r| r.get("bundle_version").is_some_and(|v| !v.is_null()))
        .unwrap_or_else(|| panic!("no report carries a bundle version: {reports:?}"));
    assert_eq!(last["daemon_version"], "0.1.0");
    assert_eq!(last["bundle_version"], 2);
    assert_eq!(last["failed_versions"], serde_json::json!([1]));
    assert_eq!(last["encoder_model_id"], support::MODEL);
    assert!(
        reports.iter().any(|r| r.get("bundle_version").is_none()),
        "the report before the install carries no bundle version: {reports:?}"
    );
    assert_eq!(
        s.fleet.count(&format!(
            "SELECT count(*) FROM devices WHERE device_id = '{}' AND bundle_version = 2 \
             AND daemon_version = '0.1.0'",
            s.device.device_id
        )),
        1
    );
    next_cycle(&sync);
    assert_eq!(sync.take_update(), None);
}
