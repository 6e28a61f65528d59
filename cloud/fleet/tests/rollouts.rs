//! Staged rollouts against a real PostgreSQL and the real service over
//! loopback HTTP: devices report, post results and download the archive
//! exactly as `dermascope-sync` does; the operator's side is the library
//! `dermascope-fleet` calls.

mod support;

use dermascope_cloud::error::CloudError;
use dermascope_cloud::fleet::{self, Mode, NewRollout, RolloutStatus, StageSpec};
use dermascope_cloud_api::{codes, ErrorBody, UpdateOffer, UpdateOutcome};
use reqwest::StatusCode;
use support::*;

fn rollout(bundle: &str, clinic: &str, stages: Vec<StageSpec>, s: f32, e: f32) -> NewRollout {
    NewRollout {
        bundle: bundle.to_string(),
        clinic: clinic.to_string(),
        stages,
        success_threshold: s,
        error_threshold: e,
    }
}

fn devices_stage(devices: &[Device]) -> StageSpec {
    StageSpec::Devices {
        device_ids: devices.iter().map(|d| d.id.clone()).collect(),
    }
}

async fn status(f: &Fleet, id: &str) -> RolloutStatus {
    fleet::rollout_status(&f.pool, id).await.expect("status")
}

fn state_of(r: &RolloutStatus, d: &Device) -> String {
    r.devices
        .iter()
        .find(|x| x.device_id == d.id)
        .map(|x| x.state.clone())
        .unwrap_or_else(|| "not in the rollout".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_start_on_the_success_threshold_and_the_rollout_ends_done() {
    let Some(f) = fleet("fleet_stages_advance").await else {
        return;
    };
    let clinic = f.clinic("north").await;
    let d = f.devices(&clinic, 10).await;
    let bytes = archive_bytes(3000, 1);
    let bundle = f.publish(&bytes, 5).await;
    let created = fleet::create_rollout(
        &f.pool,
        &rollout(
            "5",
            "north",
            vec![
                devices_stage(&d[..2]),
                StageSpec::Percent { percent: 30 },
                StageSpec::Rest,
            ],
            0.5,
            0.5,
        ),
        Mode::Apply,
    )
    .await
    .expect("create");
    assert!(created.changed);
    let id = created.rollout.rollout_id.clone();
    let r = &created.rollout;
    assert_eq!((r.state.as_str(), r.current_stage), ("running", 0));
    assert_eq!(r.stages[0].assigned, 2);
    assert_eq!(r.stages[1].assigned, 0, "stage 1 waits for stage 0");

    // Stage 0's devices are offered this very archive; the others nothing.
    match d[0].report(Some(4), &[]).await {
        UpdateOffer::Install {
            rollout_id,
            bundle_id,
            version,
            archive_sha256,
            archive_size,
        } => {
            assert_eq!(rollout_id, id);
            assert_eq!(bundle_id, bundle.bundle_id);
            assert_eq!(version, 5);
            assert_eq!(archive_sha256, sha256_hex(&bytes));
            assert_eq!(archive_size, bytes.len() as u64);
        }
        other => panic!("stage 0 device offered {other:?}"),
    }
    for other in &d[2..] {
        assert_eq!(other.report(Some(4), &[]).await, UpdateOffer::None);
    }

    // One of two installed reaches 50%: stage 1 starts with 30% of 10.
    assert!(d[0].result(&id, 5, UpdateOutcome::Installed).await);
    assert!(
        !d[0].result(&id, 5, UpdateOutcome::Installed).await,
        "a repeated result is not recorded twice"
    );
    let r = status(&f, &id).await;
    assert_eq!(r.current_stage, 1);
    assert!(r.stages[0].finished_at.is_some());
    assert_eq!(r.stages[1].assigned, 3);
    assert!(r.stages[1].started_at.is_some());
    let stage1: Vec<&Device> = d
        .iter()
        .filter(|x| {
            r.devices
                .iter()
                .any(|y| y.device_id == x.id && y.stage == 1)
        })
        .collect();
    assert_eq!(stage1.len(), 3);
    assert!(stage1.iter().all(|x| x.id != d[0].id && x.id != d[1].id));
    // The slower device of stage 0 is still offered it.
    install_of(&d[1].report(Some(4), &[]).await, 5);

    // Installed by report (the result was lost): 1 of 3 stays below 50%,
    // 2 of 3 starts the last stage.
    assert_eq!(stage1[0].report(Some(5), &[]).await, UpdateOffer::None);
    let r = status(&f, &id).await;
    assert_eq!(
        (r.current_stage, r.stages[1].installed),
        (1, 1),
        "1 of 3 is below the threshold"
    );
    stage1[1].report(Some(5), &[]).await;
    let r = status(&f, &id).await;
    assert_eq!(r.current_stage, 2);
    assert_eq!(r.stages[2].assigned, 5, "rest: every device not yet in it");
    assert_eq!(r.devices.len(), 10);

    let rest: Vec<&Device> = d
        .iter()
        .filter(|x| {
            r.devices
                .iter()
                .any(|y| y.device_id == x.id && y.stage == 2)
        })
        .collect();
    for x in &rest[..2] {
        assert!(x.result(&id, 5, UpdateOutcome::Installed).await);
    }
    assert_eq!(status(&f, &id).await.state, "running", "2 of 5 < 50%");
    assert!(rest[2].result(&id, 5, UpdateOutcome::Installed).await);
    let r = status(&f, &id).await;
    assert_eq!(r.state, "done");
    assert!(r.stages.iter().all(|s| s.finished_at.is_some()));
    // A straggler of a done rollout still gets it; one that has it gets nothing.
    install_of(&rest[3].report(Some(4), &[]).await, 5);
    assert_eq!(rest[0].report(Some(5), &[]).await, UpdateOffer::None);
    f.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_pause_resume_continues_and_a_further_failure_pauses_again() {
    let Some(f) = fleet("fleet_pause_resume").await else {
        return;
    };
    let clinic = f.clinic("south").await;
    let d = f.devices(&clinic, 6).await;
    f.publish(&archive_bytes(1000, 2), 7).await;
    let created = fleet::create_rollout(
        &f.pool,
        &rollout(
            "7",
            "south",
            vec![devices_stage(&d[..4]), StageSpec::Rest],
            1.0,
            0.25,
        ),
        Mode::Apply,
    )
    .await
    .expect("create");
    let id = created.rollout.rollout_id.clone();

    // 1 of 4 failed reaches 25%.
    assert!(d[0].result(&id, 7, UpdateOutcome::Failed).await);
    let r = status(&f, &id).await;
    assert_eq!(r.state, "paused");
    let reason = r.paused_reason.clone().expect("a reason");
    assert!(
        reason.contains("1 of 4 devices of stage 0") && reason.contains("25%"),
        "{reason}"
    );
    assert_eq!(state_of(&r, &d[0]), "failed");
    assert_eq!(
        r.devices
            .iter()
            .find(|x| x.device_id == d[0].id)
            .and_then(|x| x.detail.clone())
            .as_deref(),
        Some("Failed on the test device")
    );
    // Paused: nobody is offered; the failed device never again.
    assert_eq!(d[1].report(Some(6), &[]).await, UpdateOffer::None);
    assert_eq!(d[0].report(Some(6), &[7]).await, UpdateOffer::None);

    let resumed = fleet::resume_rollout(&f.pool, &id, Mode::Apply)
        .await
        .unwrap();
    assert!(resumed.changed);
    assert_eq!(
        resumed.rollout.state, "running",
        "resume does not pause at once"
    );
    install_of(&d[1].report(Some(6), &[]).await, 7);
    assert_eq!(d[0].report(Some(6), &[7]).await, UpdateOffer::None);
    let again = fleet::resume_rollout(&f.pool, &id, Mode::Apply)
        .await
        .unwrap();
    assert!(!again.changed, "{}", again.message);
    assert!(again.message.contains("already"), "{}", again.message);

    // A further failure, reported as a failed version this time, pauses again.
    assert_eq!(d[1].report(Some(6), &[7]).await, UpdateOffer::None);
    let r = status(&f, &id).await;
    assert_eq!(state_of(&r, &d[1]), "failed");
    assert_eq!(r.state, "paused");
    assert!(
        r.paused_reason.as_deref().unwrap().contains("2 of 4"),
        "{:?}",
        r.paused_reason
    );

    // The operator's own pause, twice.
    fleet::resume_rollout(&f.pool, &id, Mode::Apply)
        .await
        .unwrap();
    let p = fleet::pause_rollout(&f.pool, &id, Mode::Apply)
        .await
        .unwrap();
    assert!(p.changed);
    assert_eq!(
        p.rollout.paused_reason.as_deref(),
        Some("paused by the operator")
    );
    let p = fleet::pause_rollout(&f.pool, &id, Mode::Apply)
        .await
        .unwrap();
    assert!(
        !p.changed && p.message.contains("paused already"),
        "{}",
        p.message
    );
    // Installs reported while paused count at the resume.
    fleet::resume_rollout(&f.pool, &id, Mode::Apply)
        .await
        .unwrap();
    assert!(d[2].result(&id, 7, UpdateOutcome::Installed).await);
    fleet::pause_rollout(&f.pool, &id, Mode::Apply)
        .await
        .unwrap();
    assert!(d[3].result(&id, 7, UpdateOutcome::Refused).await);
    assert_eq!(status(&f, &id).await.state, "paused");
    f.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_offers_the_way_back_until_every_installed_device_took_it() {
    let Some(f) = fleet("fleet_rollback").await else {
        return;
    };
    let clinic = f.clinic("east").await;
    let d = f.devices(&clinic, 4).await;
    f.publish(&archive_bytes(1000, 3), 9).await;
    let id = fleet::create_rollout(
        &f.pool,
        &rollout("9", "east", vec![StageSpec::Rest], 1.0, 1.0),
        Mode::Apply,
    )
    .await
    .unwrap()
    .rollout
    .rollout_id;
    assert!(d[0].result(&id, 9, UpdateOutcome::Installed).await);
    assert!(d[1].result(&id, 9, UpdateOutcome::Installed).await);
    assert_eq!(d[2].report(Some(9), &[]).await, UpdateOffer::None);

    let dry = fleet::rollback_rollout(&f.pool, &id, Mode::DryRun)
        .await
        .unwrap();
    assert!(dry.changed && dry.dry_run);
    assert_eq!(dry.rollout.state, "rolling_back");
    assert_eq!(
        status(&f, &id).await.state,
        "running",
        "a dry run wrote nothing"
    );

    let rb = fleet::rollback_rollout(&f.pool, &id, Mode::Apply)
        .await
        .unwrap();
    assert_eq!(rb.rollout.state, "rolling_back");
    assert_eq!(rb.rollout.stages[0].rollback_offered, 3);
    let back = UpdateOffer::Rollback {
        rollout_id: id.clone(),
        version: 9,
    };
    assert_eq!(d[0].report(Some(9), &[]).await, back);
    assert_eq!(
        d[3].report(Some(8), &[]).await,
        UpdateOffer::None,
        "not installed: nothing to undo, and no install either"
    );
    // Installed after all, while rolling back: it goes back too.
    assert_eq!(d[3].report(Some(9), &[]).await, back);

    assert!(d[0].result(&id, 9, UpdateOutcome::RolledBack).await);
    // The result was lost, but the report shows it runs another version.
    assert_eq!(d[1].report(Some(8), &[]).await, UpdateOffer::None);
    assert!(d[2].result(&id, 9, UpdateOutcome::RolledBack).await);
    let r = status(&f, &id).await;
    assert_eq!(r.state, "rolling_back", "d3 has not rolled back yet");
    assert!(d[3].result(&id, 9, UpdateOutcome::RolledBack).await);
    let r = status(&f, &id).await;
    assert_eq!(r.state, "rolled_back");
    assert_eq!(r.stages[0].rolled_back, 4);
    assert_eq!(d[0].report(Some(8), &[]).await, UpdateOffer::None);

    let again = fleet::rollback_rollout(&f.pool, &id, Mode::Apply)
        .await
        .unwrap();
    assert!(!again.changed && again.message.contains("rolled back already"));
    match fleet::pause_rollout(&f.pool, &id, Mode::Apply).await {
        Err(CloudError::Conflict(m)) => assert!(m.contains("cannot be paused"), "{m}"),
        other => panic!("pausing a rolled-back rollout: {other:?}"),
    }
    f.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_devices_reporting_at_once_are_each_counted() {
    let Some(f) = fleet("fleet_concurrent").await else {
        return;
    };
    let clinic = f.clinic("west").await;
    let d = f.devices(&clinic, 20).await;
    f.publish(&archive_bytes(1000, 4), 11).await;
    // Stage 0 needs all ten of its devices: a decision that read a count
    // before a concurrent install committed would leave it running.
    let id = fleet::create_rollout(
        &f.pool,
        &rollout(
            "11",
            "west",
            vec![devices_stage(&d[..10]), StageSpec::Rest],
            1.0,
            0.5,
        ),
        Mode::Apply,
    )
    .await
    .unwrap()
    .rollout
    .rollout_id;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(10));
    let tasks: Vec<_> = d[..10]
        .iter()
        .cloned()
        .map(|x| {
            let (id, barrier) = (id.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                x.result(&id, 11, UpdateOutcome::Installed).await
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap(), "each install is recorded once");
    }
    let r = status(&f, &id).await;
    assert_eq!(r.stages[0].installed, 10);
    assert_eq!(r.current_stage, 1, "the tenth install started stage 1");
    assert_eq!(r.stages[1].assigned, 10);

    // All twenty report at once: stage 1's six installed and four failed
    // (4 of 10 is under the 50% that pauses), stage 0's run it already.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let stage1: Vec<String> = r
        .devices
        .iter()
        .filter(|x| x.stage == 1)
        .map(|x| x.device_id.clone())
        .collect();
    let tasks: Vec<_> = d
        .iter()
        .cloned()
        .map(|x| {
            let barrier = barrier.clone();
            let position = stage1.iter().position(|s| *s == x.id);
            tokio::spawn(async move {
                barrier.wait().await;
                match position {
                    Some(p) if p >= 6 => x.report(Some(10), &[11]).await,
                    _ => x.report(Some(11), &[]).await,
                }
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), UpdateOffer::None);
    }
    let r = status(&f, &id).await;
    assert_eq!(r.stages[1].installed, 6);
    assert_eq!(r.stages[1].failed, 4);
    assert_eq!(
        r.state, "running",
        "6 of 10 < 100%: not done, 40% < 50%: not paused"
    );
    let installed = r.devices.iter().filter(|x| x.state == "installed").count();
    assert_eq!(installed, 16);
    f.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_resumes_by_range_to_the_same_sha256_and_only_for_its_devices() {
    let Some(f) = fleet("fleet_archive").await else {
        return;
    };
    let clinic = f.clinic("hill").await;
    let other_clinic = f.clinic("valley").await;
    let d = f.devices(&clinic, 2).await;
    let stranger = f.devices(&other_clinic, 1).await.remove(0);
    // Spans three stored chunks, the last one short.
    let bytes = archive_bytes(2 * (1 << 20) + 12_345, 5);
    let sha = sha256_hex(&bytes);
    let size = bytes.len() as u64;
    let bundle = f.publish(&bytes, 3).await;
    assert_eq!(bundle.archive_sha256, sha);
    assert_eq!(f.count("bundle_chunks").await, 3);
    let id = fleet::create_rollout(
        &f.pool,
        &rollout("3", "hill", vec![devices_stage(&d[..1])], 1.0, 1.0),
        Mode::Apply,
    )
    .await
    .unwrap()
    .rollout
    .rollout_id;
    let b = bundle.bundle_id.as_str();

    let whole = d[0].download(b, None).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.content_length, Some(size));
    assert_eq!(sha256_hex(&whole.body), sha);

    // Cut inside the second chunk, resumed from the byte it stopped at.
    let cut = (1 << 20) + 777;
    let first = d[0]
        .download(b, Some(&format!("bytes=0-{}", cut - 1)))
        .await;
    assert_eq!(first.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        first.content_range.as_deref(),
        Some(format!("bytes 0-{}/{size}", cut - 1).as_str())
    );
    assert_eq!(first.body.len() as u64, cut);
    let rest = d[0].download(b, Some(&format!("bytes={cut}-"))).await;
    assert_eq!(rest.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(rest.content_length, Some(size - cut));
    assert_eq!(
        rest.content_range.as_deref(),
        Some(format!("bytes {cut}-{}/{size}", size - 1).as_str())
    );
    let mut joined = first.body.clone();
    joined.extend_from_slice(&rest.body);
    assert_eq!(sha256_hex(&joined), sha, "resumed download is the archive");
    let middle = d[0].download(b, Some("bytes=1048570-1048585")).await;
    assert_eq!(middle.body, bytes[1_048_570..=1_048_585]);
    let tail = d[0].download(b, Some("bytes=-10")).await;
    assert_eq!(tail.body, bytes[bytes.len() - 10..]);

    // Past the end: 416 naming the size.
    let past = d[0].download(b, Some(&format!("bytes={size}-"))).await;
    assert_eq!(past.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        past.content_range.as_deref(),
        Some(format!("bytes */{size}").as_str())
    );
    let two = d[0].download(b, Some("bytes=0-1,5-9")).await;
    assert_eq!(two.status, StatusCode::RANGE_NOT_SATISFIABLE);

    // Not offered it (same clinic), another clinic's device, no such bundle.
    for (who, bundle_id) in [
        (&d[1], b.to_string()),
        (&stranger, b.to_string()),
        (&d[0], uuid::Uuid::now_v7().to_string()),
        (&d[0], "not-a-uuid".to_string()),
    ] {
        let got = who.download(&bundle_id, None).await;
        assert_eq!(
            got.status,
            StatusCode::NOT_FOUND,
            "{} {bundle_id}",
            who.name
        );
        let body: ErrorBody = serde_json::from_slice(&got.body).unwrap();
        assert_eq!(body.code, codes::NOT_FOUND);
    }
    // Another clinic's device can neither report into the rollout nor see it.
    let (status, body) = stranger.result_raw(&id, 3, UpdateOutcome::Installed).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let body: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert_eq!(body.code, codes::NOT_IN_ROLLOUT);
    assert_eq!(stranger.report(None, &[]).await, UpdateOffer::None);
    let (status, _) = d[0].result_raw(&id, 4, UpdateOutcome::Installed).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a result for another version"
    );

    // Once it refused the bundle, the device no longer gets the archive.
    assert!(d[0].result(&id, 3, UpdateOutcome::Refused).await);
    assert_eq!(d[0].download(b, None).await.status, StatusCode::NOT_FOUND);
    f.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_is_idempotent_and_a_dry_run_writes_nothing() {
    let Some(f) = fleet("fleet_idempotent").await else {
        return;
    };
    let clinic = f.clinic("lake").await;
    let d = f.devices(&clinic, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tar");
    std::fs::write(&path, archive_bytes(5000, 6)).unwrap();

    let before = f.snapshot().await;
    let dry = fleet::publish_bundle(&f.pool, &facts(2), &path, Mode::DryRun)
        .await
        .unwrap();
    assert!(dry.dry_run && !dry.already);
    assert_eq!(f.snapshot().await, before, "a dry publish wrote nothing");
    let first = fleet::publish_bundle(&f.pool, &facts(2), &path, Mode::Apply)
        .await
        .unwrap();
    assert!(!first.already);
    let second = fleet::publish_bundle(&f.pool, &facts(2), &path, Mode::Apply)
        .await
        .unwrap();
    assert!(second.already);
    assert_eq!(second.bundle, first.bundle);
    assert_eq!(f.count("bundles").await, 1);
    assert_eq!(
        fleet::list_bundles(&f.pool).await.unwrap(),
        vec![first.bundle.clone()]
    );

    let new = rollout(
        "2",
        "lake",
        vec![StageSpec::Percent { percent: 50 }, StageSpec::Rest],
        0.9,
        0.2,
    );
    let before = f.snapshot().await;
    let dry = fleet::create_rollout(&f.pool, &new, Mode::DryRun)
        .await
        .unwrap();
    assert!(dry.changed && dry.dry_run);
    assert_eq!(dry.rollout.stages[0].assigned, 2, "50% of 3, rounded up");
    assert_eq!(f.snapshot().await, before, "a dry create wrote nothing");
    assert_eq!(d[0].report(None, &[]).await, UpdateOffer::None);
    let created = fleet::create_rollout(&f.pool, &new, Mode::Apply)
        .await
        .unwrap();
    assert!(created.changed);
    let again = fleet::create_rollout(&f.pool, &new, Mode::Apply)
        .await
        .unwrap();
    assert!(!again.changed, "{}", again.message);
    assert_eq!(again.rollout.rollout_id, created.rollout.rollout_id);
    assert_eq!(f.count("rollouts").await, 1);
    let mut different = new.clone();
    different.error_threshold = 0.3;
    match fleet::create_rollout(&f.pool, &different, Mode::Apply).await {
        Err(CloudError::Conflict(m)) => assert!(m.contains("active rollout"), "{m}"),
        other => panic!("a second active rollout: {other:?}"),
    }
    let id = created.rollout.rollout_id.clone();
    let listed = fleet::list_rollouts(&f.pool, Some("lake")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].rollout_id, id);

    for (name, mode_run) in [("pause", 0), ("resume", 1), ("rollback", 2)] {
        let run = |mode| {
            let (pool, id) = (f.pool.clone(), id.clone());
            async move {
                match mode_run {
                    0 => fleet::pause_rollout(&pool, &id, mode).await,
                    1 => fleet::resume_rollout(&pool, &id, mode).await,
                    _ => fleet::rollback_rollout(&pool, &id, mode).await,
                }
                .unwrap()
            }
        };
        let before = f.snapshot().await;
        let dry = run(Mode::DryRun).await;
        assert!(dry.changed && dry.dry_run, "{name}");
        assert_eq!(f.snapshot().await, before, "a dry {name} wrote nothing");
        assert!(run(Mode::Apply).await.changed, "{name}");
        let before = f.snapshot().await;
        let twice = run(Mode::Apply).await;
        assert!(!twice.changed, "{name} twice: {}", twice.message);
        assert!(twice.message.contains("already"), "{}", twice.message);
        assert_eq!(f.snapshot().await, before, "{name} twice wrote nothing");
    }
    f.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rollout_is_refused_naming_what_to_fix_and_writes_nothing() {
    let Some(f) = fleet("fleet_bad_rollouts").await else {
        return;
    };
    let clinic = f.clinic("isle").await;
    let other = f.clinic("cape").await;
    let d = f.devices(&clinic, 2).await;
    let foreign = f.devices(&other, 1).await;
    let first = f.publish(&archive_bytes(100, 7), 4).await;
    // A signed downgrade may re-issue a version: then only the id is unambiguous.
    let second = f.publish(&archive_bytes(100, 8), 4).await;
    let before = f.snapshot().await;
    let invalid = |m: &str| m.to_string();
    for (new, expect) in [
        (
            rollout(
                &first.bundle_id,
                "isle",
                vec![StageSpec::Rest, StageSpec::Rest],
                0.9,
                0.2,
            ),
            invalid("must be the last stage"),
        ),
        (
            rollout(
                &first.bundle_id,
                "isle",
                vec![devices_stage(&foreign)],
                0.9,
                0.2,
            ),
            invalid("is not a device of this clinic"),
        ),
        (
            rollout(&first.bundle_id, "isle", vec![StageSpec::Rest], 0.0, 0.2),
            invalid("success threshold"),
        ),
        (
            rollout(&first.bundle_id, "isle", vec![StageSpec::Rest], 0.9, 1.5),
            invalid("error threshold"),
        ),
        (
            rollout(&first.bundle_id, "isle", vec![], 0.9, 0.2),
            invalid("1 to 100 stages"),
        ),
        (
            rollout("4", "isle", vec![StageSpec::Rest], 0.9, 0.2),
            invalid("name one by its id"),
        ),
        (
            rollout("99", "isle", vec![StageSpec::Rest], 0.9, 0.2),
            invalid("no published bundle has version 99"),
        ),
        (
            rollout(&first.bundle_id, "nowhere", vec![StageSpec::Rest], 0.9, 0.2),
            invalid("no clinic"),
        ),
    ] {
        let err = fleet::create_rollout(&f.pool, &new, Mode::Apply)
            .await
            .expect_err("refused");
        assert!(
            err.to_string().contains(&expect),
            "{err} (wanted {expect:?})"
        );
    }
    assert_eq!(f.snapshot().await, before, "nothing written by a refusal");

    // A done rollout cannot be rolled back while a newer one is active.
    let done = fleet::create_rollout(
        &f.pool,
        &rollout(&first.bundle_id, "isle", vec![StageSpec::Rest], 0.5, 0.5),
        Mode::Apply,
    )
    .await
    .unwrap()
    .rollout
    .rollout_id;
    assert!(d[0].result(&done, 4, UpdateOutcome::Installed).await);
    assert_eq!(status(&f, &done).await.state, "done");
    let newer = fleet::create_rollout(
        &f.pool,
        &rollout(&second.bundle_id, "isle", vec![StageSpec::Rest], 0.5, 0.5),
        Mode::Apply,
    )
    .await
    .unwrap()
    .rollout
    .rollout_id;
    match fleet::rollback_rollout(&f.pool, &done, Mode::Apply).await {
        Err(CloudError::Conflict(m)) => assert!(m.contains("another rollout"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The newest rollout is the one devices are answered from: the
    // straggler of the done one is offered the newer bundle, and a device
    // that runs version 4 counts as having it (versions, not archives,
    // are what a device reports).
    match d[1].report(None, &[]).await {
        UpdateOffer::Install {
            rollout_id,
            bundle_id,
            ..
        } => assert_eq!(
            (rollout_id, bundle_id),
            (newer.clone(), second.bundle_id.clone())
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(d[0].report(Some(4), &[]).await, UpdateOffer::None);
    assert_eq!(state_of(&status(&f, &newer).await, &d[0]), "installed");
    f.service.shutdown().await;
}
