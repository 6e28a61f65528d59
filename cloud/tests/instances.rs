//! The service as a fleet runs it: two stateless instances on one database,
//! an instance killed mid-upload and replaced, and TLS with a generated CA.

#[path = "support/fleet.rs"]
mod fleet;

use std::collections::BTreeMap;
use std::time::Duration;

use dermascope_cloud::db::CLINIC_LOCK_SPACE;
use dermascope_cloud::server::{self, ServiceConfig, TlsFiles};
use dermascope_cloud_api::{bearer, codes, routes, UploadBatch, UploadOutcome, WireCase};
use fleet::*;
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_serve_the_same_devices() {
    let Some(db) = database("two_instances").await else {
        return;
    };
    // Started together on an empty database: the migration runs once.
    let (one, two) = tokio::join!(
        server::start(ServiceConfig::for_database(&db.url)),
        server::start(ServiceConfig::for_database(&db.url)),
    );
    let (one, two) = (one.expect("instance one"), two.expect("instance two"));
    dermascope_cloud::operator::add_model(&db.pool, MODEL, DIM)
        .await
        .unwrap();
    let clinic = clinic(&db, "c", false).await;
    let a_dev = device(&db, &clinic, "a").await;
    let a1 = Api::new(&one, &a_dev.credential);
    let a2 = a1.via(&two);
    let b1 = Api::new(&one, &device(&db, &clinic, "b").await.credential);
    let b2 = b1.via(&two);

    // One device, alternating instances: upload via one, pull via the other.
    a1.upload_ok(&[case("x", 1, 1), case("y", 1, 2)]).await;
    let (seen, cursor) = b2.pull_all(MODEL, None, 10).await;
    assert_eq!(seen.len(), 2);
    assert_eq!(
        a2.upload_ok(&[case("x", 3, 3)]).await,
        [UploadOutcome::Stored]
    );
    assert_eq!(
        a1.upload_ok(&[case("x", 3, 3)]).await,
        [UploadOutcome::AlreadyStored]
    );
    assert_eq!(
        a1.upload_ok(&[case("x", 2, 2)]).await,
        [UploadOutcome::Superseded]
    );
    let (after, cursor) = b1.pull_all(MODEL, Some(&cursor), 10).await;
    assert_eq!(
        after
            .iter()
            .map(|c| (c.id.as_str(), c.revision))
            .collect::<Vec<_>>(),
        [("x", 3)]
    );
    // A cursor from one instance is good at the other.
    assert!(b2
        .pull_ok(MODEL, Some(&cursor), None)
        .await
        .cases
        .is_empty());

    // Two devices uploading at once through the two instances: every case
    // once, and a pull from the start sees each exactly once, in a cursor
    // order that later pulls cannot skip.
    let c_dev = device(&db, &clinic, "c").await;
    let c1 = Api::new(&one, &c_dev.credential);
    let batch = |p: &str| {
        (0..32)
            .map(|i| case(&format!("{p}-{i}"), 1, i))
            .collect::<Vec<_>>()
    };
    let (batch_a, batch_b) = (batch("a"), batch("b"));
    let (ra, rb) = tokio::join!(a1.upload_ok(&batch_a), b2.upload_ok(&batch_b));
    assert!(ra.iter().chain(&rb).all(|o| *o == UploadOutcome::Stored));
    let (all, _) = c1.pull_all(MODEL, None, 7).await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for c in &all {
        *counts.entry(c.id.clone()).or_default() += 1;
    }
    assert_eq!(counts.len(), 2 + 64);
    assert!(counts.values().all(|n| *n == 1), "no case twice");

    // Revoked through the operator's command: both instances had this
    // device's secret verified (cached) and both refuse it now.
    assert_eq!(a1.device().await.status, StatusCode::OK);
    assert_eq!(a2.device().await.status, StatusCode::OK);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dermascope-cloud"))
        .args(["device", "revoke", &a_dev.device_id, "--json"])
        .env("DERMASCOPE_CLOUD_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a1.device()
        .await
        .refusal(StatusCode::UNAUTHORIZED, codes::REVOKED);
    a2.upload(&[case("z", 1, 9)])
        .await
        .refusal(StatusCode::UNAUTHORIZED, codes::REVOKED);
    assert_eq!(b1.device().await.status, StatusCode::OK);
    assert_eq!(b2.device().await.status, StatusCode::OK);
    one.shutdown().await;
    two.shutdown().await;
}

/// Waits (watchdog-bounded) until a backend waits on an advisory lock.
async fn until_an_upload_waits_on_the_clinic_lock(db: &Db) {
    for _ in 0..6000 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("watchdog: the upload never reached the clinic's lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_upload_loses_and_duplicates_nothing() {
    let Some((db, first)) = fleet("killed_mid_upload").await else {
        return;
    };
    let clinic_id = clinic(&db, "c", false).await;
    let up_dev = device(&db, &clinic_id, "up").await;
    let up = Api::new(&first, &up_dev.credential);
    let batch1: Vec<WireCase> = (0..8).map(|i| case(&format!("one-{i}"), 1, i)).collect();
    let batch2: Vec<WireCase> = (0..8)
        .map(|i| case(&format!("two-{i}"), 1, 10 + i))
        .collect();
    up.upload_ok(&batch1).await;

    // Hold the clinic's lock so batch 2 is certainly inside its
    // transaction, uncommitted, when the instance dies.
    let mut holder = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
        .bind(CLINIC_LOCK_SPACE)
        .bind(&clinic_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let in_flight = {
        let client = up.client.clone();
        let url = format!("{}{}", up.base, routes::CASES);
        let auth = bearer(&up.credential);
        let body = serde_json::to_vec(&UploadBatch {
            cases: batch2.clone(),
        })
        .unwrap();
        tokio::spawn(async move {
            let response = client
                .post(url)
                .header("Authorization", auth)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await?;
            response.error_for_status()?.bytes().await
        })
    };
    until_an_upload_waits_on_the_clinic_lock(&db).await;
    first.kill().await;
    let outcome = tokio::time::timeout(WATCHDOG, in_flight)
        .await
        .expect("watchdog: the cut upload ends")
        .unwrap();
    assert!(outcome.is_err(), "the cut upload was not acknowledged");
    sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
        .bind(CLINIC_LOCK_SPACE)
        .bind(&clinic_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);
    assert_eq!(
        rows(&db.pool).await,
        (8, 8),
        "the cut batch left nothing behind"
    );

    // A new instance; the device retries what it has not had acknowledged,
    // and (as a device may) the acknowledged batch too.
    let second = start(&db).await;
    let up = up.via(&second);
    assert_eq!(up.upload_ok(&batch2).await, vec![UploadOutcome::Stored; 8]);
    assert_eq!(
        up.upload_ok(&batch1).await,
        vec![UploadOutcome::AlreadyStored; 8]
    );
    assert_eq!(rows(&db.pool).await, (16, 16));
    let down = Api::new(&second, &device(&db, &clinic_id, "down").await.credential);
    let (all, _) = down.pull_all(MODEL, None, 5).await;
    let mut ids: Vec<String> = all.into_iter().map(|c| c.id).collect();
    ids.sort();
    let mut expected: Vec<String> = batch1.iter().chain(&batch2).map(|c| c.id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected, "every case once");
    second.shutdown().await;
}

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

fn ca() -> (rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Dermascope test CA");
    let issuer =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let pem = issuer.pem();
    (issuer, pem)
}

/// A CA and a server certificate it signed for `names`, as PEM files.
fn pki(names: &[&str]) -> Pki {
    let (issuer, ca_pem) = ca();
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    Pki { dir, ca_pem }
}

fn client_trusting(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .timeout(WATCHDOG)
        .build()
        .unwrap()
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_trusting_the_named_ca_connects_and_one_trusting_another_is_refused() {
    let Some(db) = database("tls").await else {
        return;
    };
    let pki = pki(&["localhost", "127.0.0.1"]);
    let config = ServiceConfig {
        tls: Some(TlsFiles {
            cert: pki.dir.path().join("cert.pem"),
            key: pki.dir.path().join("key.pem"),
        }),
        ..ServiceConfig::for_database(&db.url)
    };
    let service = server::start(config).await.expect("TLS service starts");
    assert!(service.base_url().starts_with("https://127.0.0.1:"));
    let clinic = clinic(&db, "c", false).await;
    let dev = device(&db, &clinic, "d").await;

    let trusting = client_trusting(&pki.ca_pem);
    let health = trusting
        .get(format!("{}{}", service.base_url(), routes::HEALTH))
        .send()
        .await
        .expect("the named CA's server is trusted");
    assert_eq!(health.status(), StatusCode::OK);
    let by_name = format!(
        "https://localhost:{}{}",
        service.addr().port(),
        routes::DEVICE
    );
    let me = trusting
        .get(by_name)
        .header("Authorization", bearer(&dev.credential))
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);

    let (_other_ca, other_pem) = ca();
    let err = client_trusting(&other_pem)
        .get(format!("{}{}", service.base_url(), routes::HEALTH))
        .header("Authorization", bearer(&dev.credential))
        .send()
        .await
        .expect_err("a server whose certificate another CA signed is refused");
    let text = chain(&err);
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // Plain HTTP to the TLS port gets no answer from the service.
    let plain = reqwest::Client::builder()
        .timeout(WATCHDOG)
        .build()
        .unwrap();
    let attempt = plain
        .get(format!(
            "http://127.0.0.1:{}{}",
            service.addr().port(),
            routes::HEALTH
        ))
        .send()
        .await;
    assert!(attempt.map(|r| !r.status().is_success()).unwrap_or(true));
    service.shutdown().await;

    // The right CA but a certificate for another name: refused too.
    let wrong_name = pki_signed_by_same_ca_for_other_name();
    let service = server::start(ServiceConfig {
        tls: Some(TlsFiles {
            cert: wrong_name.dir.path().join("cert.pem"),
            key: wrong_name.dir.path().join("key.pem"),
        }),
        ..ServiceConfig::for_database(&db.url)
    })
    .await
    .unwrap();
    let err = client_trusting(&wrong_name.ca_pem)
        .get(format!("{}{}", service.base_url(), routes::HEALTH))
        .send()
        .await
        .expect_err("a certificate for another name is refused");
    assert!(
        chain(&err).to_lowercase().contains("certificate"),
        "{}",
        chain(&err)
    );
    service.shutdown().await;

    // Missing or broken PEM files are refused at start, saying which.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("cert.pem"), "not a certificate").unwrap();
    std::fs::write(broken.path().join("key.pem"), "not a key").unwrap();
    let err = server::start(ServiceConfig {
        tls: Some(TlsFiles {
            cert: broken.path().join("cert.pem"),
            key: broken.path().join("key.pem"),
        }),
        ..ServiceConfig::for_database(&db.url)
    })
    .await
    .err()
    .expect("broken PEM refused");
    assert!(err.to_string().contains("cert.pem"), "{err}");
}

fn pki_signed_by_same_ca_for_other_name() -> Pki {
    pki(&["service.other.example"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stopped_and_started_refuses_with_503_meanwhile_and_loses_nothing() {
    let Some(server) = tokio::task::spawn_blocking(|| {
        dermascope_testkit::postgres_private("database_stopped_and_started")
    })
    .await
    .unwrap() else {
        return;
    };
    let db = on(server.url()).await;
    let mut config = ServiceConfig::for_database(server.url());
    // Requests wait this long for a connection before the 503.
    config.database.acquire_timeout_ms = 1_000;
    let service = server::start(config).await.expect("service starts");
    dermascope_cloud::operator::add_model(&db.pool, MODEL, DIM)
        .await
        .unwrap();
    let clinic = clinic(&db, "c", false).await;
    let up = Api::new(&service, &device(&db, &clinic, "up").await.credential);
    let down = Api::new(&service, &device(&db, &clinic, "down").await.credential);
    let batch1: Vec<WireCase> = (0..4).map(|i| case(&format!("one-{i}"), 1, i)).collect();
    let batch2: Vec<WireCase> = (0..4)
        .map(|i| case(&format!("two-{i}"), 1, 10 + i))
        .collect();
    up.upload_ok(&batch1).await;
    let (_, cursor) = down.pull_all(MODEL, None, 10).await;
    db.pool.close().await;

    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap();
    let health = reqwest::Client::new()
        .get(format!("{}{}", service.base_url(), routes::HEALTH))
        .timeout(WATCHDOG)
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: dermascope_cloud_api::ErrorBody = health.json().await.unwrap();
    assert_eq!(body.code, codes::UNAVAILABLE);
    assert!(
        !body.message.to_lowercase().contains("select"),
        "no SQL: {}",
        body.message
    );
    let refused = up
        .upload(&batch2)
        .await
        .refusal(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE);
    assert!(refused.message.contains("retry"), "{}", refused.message);
    down.pull(MODEL, Some(&cursor), None)
        .await
        .refusal(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE);

    let server = tokio::task::spawn_blocking(move || {
        server.start();
        server
    })
    .await
    .unwrap();
    // The same instance, no restart: its pool replaces the dead connections.
    assert_eq!(up.upload_ok(&batch2).await, vec![UploadOutcome::Stored; 4]);
    assert_eq!(
        up.upload_ok(&batch1).await,
        vec![UploadOutcome::AlreadyStored; 4]
    );
    let (after, _) = down.pull_all(MODEL, Some(&cursor), 10).await;
    let mut ids: Vec<String> = after.into_iter().map(|c| c.id).collect();
    ids.sort();
    assert_eq!(ids, batch2.iter().map(|c| c.id.clone()).collect::<Vec<_>>());
    let db = on(server.url()).await;
    assert_eq!(rows(&db.pool).await, (8, 8));
    db.pool.close().await;
    service.shutdown().await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_finishes_the_upload_in_flight_and_a_new_instance_takes_over() {
    let Some((db, first)) = fleet("graceful_shutdown").await else {
        return;
    };
    let clinic_id = clinic(&db, "c", false).await;
    let up = Api::new(&first, &device(&db, &clinic_id, "up").await.credential);
    let batch: Vec<WireCase> = (0..8).map(|i| case(&format!("c-{i}"), 1, i)).collect();

    let mut holder = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
        .bind(CLINIC_LOCK_SPACE)
        .bind(&clinic_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let in_flight = {
        let up = up.clone();
        let batch = batch.clone();
        tokio::spawn(async move { up.upload(&batch).await })
    };
    until_an_upload_waits_on_the_clinic_lock(&db).await;
    let base = first.base_url();
    let stopping = tokio::spawn(first.shutdown());
    // Shutdown has begun once a new connection is no longer served.
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut refused = false;
    for _ in 0..3000 {
        if probe
            .get(format!("{base}{}", routes::HEALTH))
            .send()
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "watchdog: the stopping instance kept accepting");
    sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
        .bind(CLINIC_LOCK_SPACE)
        .bind(&clinic_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);
    let reply = tokio::time::timeout(WATCHDOG, in_flight)
        .await
        .expect("watchdog: the upload in flight ends")
        .unwrap();
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the request in flight was finished and acknowledged"
    );
    let receipt: dermascope_cloud_api::UploadReceipt = reply.json();
    assert!(receipt
        .results
        .iter()
        .all(|r| r.outcome == UploadOutcome::Stored));
    tokio::time::timeout(WATCHDOG, stopping)
        .await
        .expect("watchdog: shutdown ends")
        .unwrap();

    let second = start(&db).await;
    let up = up.via(&second);
    // A device that lost the acknowledgement retries: nothing twice.
    assert_eq!(
        up.upload_ok(&batch).await,
        vec![UploadOutcome::AlreadyStored; 8]
    );
    assert_eq!(rows(&db.pool).await, (8, 8));
    second.shutdown().await;
}
