//! The fleet service over real HTTP on loopback against a real PostgreSQL:
//! credentials, the operator's commands, uploads and pulls, and every
//! refusal's code.

#[path = "support/fleet.rs"]
mod fleet;

use base64::Engine;
use dermascope_cloud::operator;
use dermascope_cloud_api::{
    codes, routes, DeviceInfo, Health, UploadOutcome, WireSource, MAX_ORIGINAL_BYTES,
    MAX_REQUEST_BYTES, MAX_THUMBNAIL_BYTES, MAX_UPLOAD_BATCH,
};
use fleet::*;
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_needs_no_credential_and_names_the_schema_version() {
    let Some((_db, service)) = fleet("health").await else {
        return;
    };
    let reply = reqwest::get(format!("{}{}", service.base_url(), routes::HEALTH))
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let health: Health = reply.json().await.unwrap();
    assert_eq!(health.status, "ok");
    assert_eq!(
        health.schema_version,
        dermascope_cloud::db::latest_migration()
    );
    assert!(health.schema_version >= 1);

    // Unknown routes and methods are JSON refusals too.
    let api = Api::new(&service, "x.y");
    api.send(api.client.get(format!("{}/v2/nothing", api.base)))
        .await
        .refusal(StatusCode::NOT_FOUND, codes::NOT_FOUND);
    api.send(api.client.delete(format!("{}{}", api.base, routes::CASES)))
        .await
        .refusal(StatusCode::METHOD_NOT_ALLOWED, codes::BAD_REQUEST);
    service.shutdown().await;
}

fn cli(db: &Db, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dermascope-cloud"))
        .args(args)
        .arg("--json")
        .env("DERMASCOPE_CLOUD_DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run dermascope-cloud");
    assert!(
        out.status.success(),
        "dermascope-cloud {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn cli_fails(db: &Db, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dermascope-cloud"))
        .args(args)
        .env("DERMASCOPE_CLOUD_DATABASE_URL", &db.url)
        .output()
        .expect("run dermascope-cloud");
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_print_json_and_a_revoked_device_is_refused_at_its_next_request() {
    let Some(db) = database("operator_cli").await else {
        return;
    };
    let schema = cli(&db, &["migrate"]);
    assert!(schema["schema_version"].as_i64().unwrap() >= 1);

    let clinic = cli(
        &db,
        &["clinic", "add", "Clinique Nord", "--allow-originals"],
    );
    assert_eq!(clinic["name"], "Clinique Nord");
    assert_eq!(clinic["allow_originals"], true);
    let clinic_id = clinic["clinic_id"].as_str().unwrap().to_string();
    cli(&db, &["clinic", "add", "Clinic South"]);
    let clinics = cli(&db, &["clinic", "list"]);
    assert_eq!(clinics.as_array().unwrap().len(), 2);
    let dup = cli_fails(&db, &["clinic", "add", "Clinic South"]);
    assert!(dup.contains("exists"), "{dup}");

    let model = cli(&db, &["model", "add", MODEL, "--dim", &DIM.to_string()]);
    assert_eq!(
        (model["model_id"].as_str(), model["dim"].as_u64()),
        (Some(MODEL), Some(DIM as u64))
    );
    let models = cli(&db, &["model", "list"]);
    assert_eq!(models[0]["model_id"], MODEL);
    // The partial HNSW indexes exist on both tables, over this model only.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE indexdef LIKE '%hnsw%' ORDER BY tablename",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(indexes.len(), 2, "{indexes:?}");
    for def in &indexes {
        assert!(
            def.contains(&format!("halfvec({DIM})")) && def.contains("halfvec_ip_ops"),
            "{def}"
        );
        assert!(def.contains(&format!("model_id = '{MODEL}'")), "{def}");
    }
    let bad = cli_fails(
        &db,
        &["model", "add", "x'; drop table models; --", "--dim", "4"],
    );
    assert!(bad.contains("model id"), "{bad}");
    let clash = cli_fails(&db, &["model", "add", MODEL, "--dim", "3"]);
    assert!(clash.contains("dimension"), "{clash}");

    // By name and by id.
    let added = cli(
        &db,
        &[
            "device",
            "add",
            "--clinic",
            "Clinique Nord",
            "--name",
            "scope-1",
        ],
    );
    let added2 = cli(
        &db,
        &["device", "add", "--clinic", &clinic_id, "--name", "scope-2"],
    );
    let credential = added["credential"].as_str().unwrap().to_string();
    let device_id = added["device_id"].as_str().unwrap().to_string();
    assert!(credential.starts_with(&format!("{device_id}.")));
    let secret = credential.split_once('.').unwrap().1;
    assert_eq!(secret.len(), 64, "32 random bytes as hex");
    // Stored only as an argon2id hash with the production parameters.
    let hash: String =
        sqlx::query_scalar("SELECT credential_hash FROM devices WHERE device_id = $1::uuid")
            .bind(&device_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        hash.starts_with("$argon2id$") && hash.contains("m=19456,t=2,p=1"),
        "{hash}"
    );
    assert!(!hash.contains(secret));
    let listed = cli(&db, &["device", "list", "--clinic", "Clinique Nord"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(
        listed.to_string().find(secret).is_none(),
        "list never shows a secret"
    );
    assert_eq!(
        cli(&db, &["device", "list", "--clinic", "Clinic South"]),
        serde_json::json!([])
    );
    let unknown = cli_fails(
        &db,
        &["device", "add", "--clinic", "Nowhere", "--name", "x"],
    );
    assert!(unknown.contains("no clinic"), "{unknown}");

    let service = start(&db).await;
    let api = Api::new(&service, &credential);
    let reply = api.device().await;
    assert_eq!(reply.status, StatusCode::OK);
    let info: DeviceInfo = reply.json();
    assert_eq!(info.device_id, device_id);
    assert_eq!(info.clinic_id, clinic_id);
    assert_eq!(info.clinic_name, "Clinique Nord");
    assert!(info.allow_originals);
    assert_eq!(info.models.len(), 1);
    let listed = cli(&db, &["device", "list"]);
    let me = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device_id.as_str())
        .unwrap();
    assert!(
        me["last_seen_at"].is_string(),
        "a request marks the device seen: {me}"
    );

    let revoked = cli(&db, &["device", "revoke", &device_id]);
    assert_eq!(revoked["already"], false);
    let again = cli(&db, &["device", "revoke", &device_id]);
    assert_eq!(
        (again["already"].clone(), again["revoked_at"].clone()),
        (true.into(), revoked["revoked_at"].clone())
    );
    // The secret verified a moment ago (and is cached): refused anyway.
    api.device()
        .await
        .refusal(StatusCode::UNAUTHORIZED, codes::REVOKED);
    api.pull(MODEL, None, None)
        .await
        .refusal(StatusCode::UNAUTHORIZED, codes::REVOKED);
    // The other device of the clinic is unaffected.
    let other = Api::new(&service, added2["credential"].as_str().unwrap());
    assert_eq!(other.device().await.status, StatusCode::OK);
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_malformed_or_wrong_credential_is_refused_saying_why() {
    let Some((db, service)) = fleet("wrong_credential").await else {
        return;
    };
    let clinic = clinic(&db, "c", false).await;
    let dev = device(&db, &clinic, "d").await;
    let good = Api::new(&service, &dev.credential);
    assert_eq!(good.device().await.status, StatusCode::OK);

    let plain = reqwest::Client::new();
    let reply = plain
        .get(format!("{}{}", service.base_url(), routes::DEVICE))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);
    let body: dermascope_cloud_api::ErrorBody = reply.json().await.unwrap();
    assert_eq!(body.code, codes::UNAUTHENTICATED);
    assert!(body.message.contains("no credential"), "{}", body.message);

    let (device_id, secret) = dev.credential.split_once('.').unwrap();
    let mut flipped = secret.as_bytes().to_vec();
    flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
    let wrong_secret = format!("{device_id}.{}", String::from_utf8(flipped).unwrap());
    let unknown_device = format!("{}.{secret}", uuid::Uuid::now_v7());
    for credential in [
        wrong_secret.as_str(),
        unknown_device.as_str(),
        "not-a-uuid.secret",
        "nodot",
        device_id,
    ] {
        let api = Api::new(&service, credential);
        api.device()
            .await
            .refusal(StatusCode::UNAUTHORIZED, codes::UNAUTHENTICATED);
        api.upload(&[case("c1", 1, 1)])
            .await
            .refusal(StatusCode::UNAUTHORIZED, codes::UNAUTHENTICATED);
    }
    // Not Bearer.
    let reply = plain
        .get(format!("{}{}", service.base_url(), routes::DEVICE))
        .header(
            "Authorization",
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("a:b")
            ),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(rows(&db.pool).await, (0, 0));
    // The right one still works after the wrong ones.
    assert_eq!(good.device().await.status, StatusCode::OK);
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_is_stored_once_and_answered_already_stored() {
    let Some((db, service)) = fleet("retried_batch").await else {
        return;
    };
    let clinic = clinic(&db, "c", false).await;
    let api = Api::new(&service, &device(&db, &clinic, "d").await.credential);
    let batch: Vec<_> = (0..5).map(|i| case(&format!("case-{i}"), 1, i)).collect();
    assert_eq!(api.upload_ok(&batch).await, vec![UploadOutcome::Stored; 5]);
    let seqs = || async {
        sqlx::query_scalar::<_, i64>("SELECT change_seq FROM fleet_cases ORDER BY case_id")
            .fetch_all(&db.pool)
            .await
            .unwrap()
    };
    let before = seqs().await;
    assert_eq!(rows(&db.pool).await, (5, 5));
    assert_eq!(
        api.upload_ok(&batch).await,
        vec![UploadOutcome::AlreadyStored; 5]
    );
    assert_eq!(rows(&db.pool).await, (5, 5));
    assert_eq!(
        seqs().await,
        before,
        "a retry writes nothing, so no change is announced"
    );
    // A batch mixing a retried case and a new one.
    let mixed = vec![batch[0].clone(), case("case-new", 1, 9)];
    assert_eq!(
        api.upload_ok(&mixed).await,
        vec![UploadOutcome::AlreadyStored, UploadOutcome::Stored]
    );
    assert_eq!(rows(&db.pool).await, (6, 6));
    // What was stored is what was sent, photographs and metadata included.
    let (thumb, meta, device): (Vec<u8>, serde_json::Value, uuid::Uuid) = sqlx::query_as(
        "SELECT thumbnail_jpeg, metadata, device_id FROM fleet_cases WHERE case_id = 'case-3'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(thumb, batch[3].thumbnail_jpeg);
    assert_eq!(meta["anatomical_site"], "back");
    assert_eq!(
        device.to_string(),
        api.credential.split_once('.').unwrap().0
    );
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_revision_never_overwrites_a_newer_one() {
    let Some((db, service)) = fleet("older_revision").await else {
        return;
    };
    let clinic = clinic(&db, "c", false).await;
    let up = Api::new(&service, &device(&db, &clinic, "up").await.credential);
    let down = Api::new(&service, &device(&db, &clinic, "down").await.credential);

    let mut v2 = case("lesion-case", 2, 1);
    v2.diagnosis.name = "second look".into();
    let mut v1 = case("lesion-case", 1, 1);
    v1.diagnosis.name = "first look".into();
    assert_eq!(
        up.upload_ok(&[v2.clone()]).await,
        vec![UploadOutcome::Stored]
    );
    // The older one arrives late (a retry from before the change).
    assert_eq!(
        up.upload_ok(&[v1.clone()]).await,
        vec![UploadOutcome::Superseded]
    );
    assert_eq!(
        up.upload_ok(&[v1]).await,
        vec![UploadOutcome::AlreadyStored]
    );
    let (cases, cursor) = down.pull_all(MODEL, None, 10).await;
    assert_eq!(cases.len(), 1);
    assert_eq!(
        (cases[0].revision, cases[0].diagnosis.name.as_str()),
        (2, "second look")
    );

    // A newer one replaces it and comes again after the cursor.
    let mut v3 = case("lesion-case", 3, 1);
    v3.diagnosis.name = "confirmed".into();
    // Both in one batch, older last: still the newest wins.
    let mut v2b = v2.clone();
    v2b.revision = 2;
    assert_eq!(
        up.upload_ok(&[v3, v2b]).await,
        vec![UploadOutcome::Stored, UploadOutcome::AlreadyStored]
    );
    let (after, _) = down.pull_all(MODEL, Some(&cursor), 10).await;
    assert_eq!(after.len(), 1);
    assert_eq!(
        (after[0].revision, after[0].diagnosis.name.as_str()),
        (3, "confirmed")
    );
    assert_eq!(rows(&db.pool).await, (1, 3));
    service.shutdown().await;
}

fn reference(id: &str, seed: u32) -> dermascope_cloud_api::WireCase {
    case(id, 1, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_page_by_cursor_reference_first_and_resume_where_they_stopped() {
    let Some((db, service)) = fleet("pull_paging").await else {
        return;
    };
    let clinic = clinic(&db, "c", false).await;
    let up = Api::new(&service, &device(&db, &clinic, "up").await.credential);
    let down = Api::new(&service, &device(&db, &clinic, "down").await.credential);

    let refs: Vec<_> = (0..3)
        .map(|i| reference(&format!("ref-{i}"), 100 + i))
        .collect();
    let report = operator::import_reference(&db.pool, &refs).await.unwrap();
    assert_eq!(report.stored, 3);
    let fleet_cases: Vec<_> = (0..10).map(|i| case(&format!("f-{i:02}"), 1, i)).collect();
    up.upload_ok(&fleet_cases[..6]).await;
    up.upload_ok(&fleet_cases[6..]).await;

    let p1 = down.pull_ok(MODEL, None, Some(4)).await;
    let ids = |p: &dermascope_cloud_api::CasePage| {
        p.cases.iter().map(|c| c.id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&p1), ["ref-0", "ref-1", "ref-2", "f-00"]);
    assert!(p1.more);
    assert_eq!(p1.cases[0].source, Some(WireSource::Reference));
    assert_eq!(p1.cases[0].device_id, None);
    assert_eq!(p1.cases[3].source, Some(WireSource::Fleet));
    assert_eq!(
        p1.cases[3].device_id.as_deref(),
        up.credential.split_once('.').map(|p| p.0)
    );
    // The bytes that went up come down.
    assert_eq!(p1.cases[3].thumbnail_jpeg, fleet_cases[0].thumbnail_jpeg);
    assert_eq!(p1.cases[3].metadata, fleet_cases[0].metadata);
    for (a, b) in p1.cases[3].embedding.iter().zip(&fleet_cases[0].embedding) {
        assert!(
            (a - b).abs() < 1e-3,
            "halfvec keeps the embedding to f16 precision"
        );
    }
    let p2 = down.pull_ok(MODEL, Some(&p1.cursor), Some(4)).await;
    assert_eq!(ids(&p2), ["f-01", "f-02", "f-03", "f-04"]);
    // Interrupted before applying p2: asking again from p1's cursor gives p2 again.
    let p2_again = down.pull_ok(MODEL, Some(&p1.cursor), Some(4)).await;
    assert_eq!(ids(&p2_again), ids(&p2));
    assert_eq!(p2_again.cursor, p2.cursor);
    let (rest, end) = down.pull_all(MODEL, Some(&p2.cursor), 4).await;
    assert_eq!(
        rest.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["f-05", "f-06", "f-07", "f-08", "f-09"]
    );
    // At the end: an empty page, same cursor.
    let tail = down.pull_ok(MODEL, Some(&end), Some(4)).await;
    assert!(tail.cases.is_empty() && !tail.more);
    assert_eq!(tail.cursor, end);
    // New changes of both kinds after the end come next.
    up.upload_ok(&[case("f-10", 1, 10)]).await;
    operator::import_reference(&db.pool, &[reference("ref-3", 103)])
        .await
        .unwrap();
    let next = down.pull_ok(MODEL, Some(&end), None).await;
    assert_eq!(ids(&next), ["ref-3", "f-10"]);
    assert!(!next.more);

    // Limits: above the page size is refused, the default is the page size.
    down.pull(MODEL, None, Some(dermascope_cloud_api::MAX_PULL_PAGE + 1))
        .await
        .refusal(StatusCode::BAD_REQUEST, codes::BAD_REQUEST);
    down.pull(MODEL, None, Some(0))
        .await
        .refusal(StatusCode::BAD_REQUEST, codes::BAD_REQUEST);
    down.pull("no-such-model", None, None)
        .await
        .refusal(StatusCode::BAD_REQUEST, codes::UNKNOWN_MODEL);
    let all = down.pull_ok(MODEL, None, None).await;
    assert_eq!(all.cases.len(), 15);
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_shows_neither_own_cases_nor_another_clinics_nor_another_encoders() {
    let Some((db, service)) = fleet("pull_scope").await else {
        return;
    };
    let north = clinic(&db, "north", false).await;
    let south = clinic(&db, "south", false).await;
    let a = Api::new(&service, &device(&db, &north, "a").await.credential);
    let b = Api::new(&service, &device(&db, &north, "b").await.credential);
    let c = Api::new(&service, &device(&db, &south, "c").await.credential);
    a.upload_ok(&[case("a-1", 1, 1), case("a-2", 1, 2)]).await;
    a.upload_ok(&[case_of("a-other", 1, 3, OTHER_MODEL, OTHER_DIM)])
        .await;
    b.upload_ok(&[case("b-1", 1, 4)]).await;
    c.upload_ok(&[case("c-1", 1, 5)]).await;
    operator::import_reference(&db.pool, &[reference("ref-1", 6)])
        .await
        .unwrap();

    let ids = |cases: Vec<dermascope_cloud_api::WireCase>| {
        let mut ids: Vec<String> = cases.into_iter().map(|c| c.id).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(a.pull_all(MODEL, None, 2).await.0), ["b-1", "ref-1"]);
    assert_eq!(
        ids(b.pull_all(MODEL, None, 2).await.0),
        ["a-1", "a-2", "ref-1"]
    );
    assert_eq!(ids(c.pull_all(MODEL, None, 2).await.0), ["ref-1"]);
    assert_eq!(ids(b.pull_all(OTHER_MODEL, None, 2).await.0), ["a-other"]);
    assert!(a.pull_all(OTHER_MODEL, None, 2).await.0.is_empty());
    // Originals never come down in a pull.
    assert!(b
        .pull_all(MODEL, None, 10)
        .await
        .0
        .iter()
        .all(|c| c.original_jpeg.is_none()));
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clinics_cursor_or_a_made_up_one_is_refused() {
    let Some((db, service)) = fleet("bad_cursor").await else {
        return;
    };
    let north = clinic(&db, "north", false).await;
    let south = clinic(&db, "south", false).await;
    let a = Api::new(&service, &device(&db, &north, "a").await.credential);
    let c = Api::new(&service, &device(&db, &south, "c").await.credential);
    a.upload_ok(&[case("a-1", 1, 1)]).await;
    let theirs = c.pull_ok(MODEL, None, None).await.cursor;
    let body = a
        .pull(MODEL, Some(&theirs), None)
        .await
        .refusal(StatusCode::FORBIDDEN, codes::BAD_CURSOR);
    assert!(body.message.contains("another clinic"), "{}", body.message);
    // A cursor naming the other clinic with doctored numbers: still theirs.
    let doctored = format!("v1.{south}.0.0");
    a.pull(MODEL, Some(&doctored), None)
        .await
        .refusal(StatusCode::FORBIDDEN, codes::BAD_CURSOR);
    for junk in ["v9.x", "v1.a.b.c", "🙂"] {
        a.pull(MODEL, Some(junk), None)
            .await
            .refusal(StatusCode::BAD_REQUEST, codes::BAD_CURSOR);
    }
    service.shutdown().await;
}

/// Each bad case, sent at index 1 after a good one: refused with its code,
/// the message naming index 1, and nothing of the batch written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_upload_is_refused_with_its_code_and_nothing_is_written() {
    let Some((db, service)) = fleet("bad_uploads").await else {
        return;
    };
    let strict = clinic(&db, "strict", false).await;
    let open = clinic(&db, "open", true).await;
    let api = Api::new(&service, &device(&db, &strict, "s").await.credential);
    let open_api = Api::new(&service, &device(&db, &open, "o").await.credential);
    let good = case("good", 1, 1);

    type Mutate = fn(&mut dermascope_cloud_api::WireCase);
    let cases: Vec<(&str, Mutate, StatusCode, &str)> = vec![
        (
            "wrong dimension",
            |c| c.embedding.push(0.0),
            StatusCode::BAD_REQUEST,
            codes::BAD_EMBEDDING,
        ),
        (
            "embedding of the other encoder's size",
            |c| c.embedding.truncate(OTHER_DIM),
            StatusCode::BAD_REQUEST,
            codes::BAD_EMBEDDING,
        ),
        (
            "beyond halfvec",
            |c| c.embedding[3] = 70000.0,
            StatusCode::BAD_REQUEST,
            codes::BAD_EMBEDDING,
        ),
        (
            "unknown model",
            |c| c.model_id = "enc-zzz".into(),
            StatusCode::BAD_REQUEST,
            codes::UNKNOWN_MODEL,
        ),
        (
            "thumbnail not a JPEG",
            |c| c.thumbnail_jpeg = b"\x89PNG\r\n\x1a\n....".to_vec(),
            StatusCode::BAD_REQUEST,
            codes::BAD_PHOTO,
        ),
        (
            "thumbnail a truncated JPEG",
            |c| c.thumbnail_jpeg.truncate(4),
            StatusCode::BAD_REQUEST,
            codes::BAD_PHOTO,
        ),
        (
            "thumbnail too large",
            |c| c.thumbnail_jpeg.resize(MAX_THUMBNAIL_BYTES + 1, 0),
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::TOO_LARGE,
        ),
        (
            "original where the clinic keeps them",
            |c| c.original_jpeg = Some(jpeg(2)),
            StatusCode::FORBIDDEN,
            codes::ORIGINALS_NOT_ALLOWED,
        ),
        (
            "empty id",
            |c| c.id.clear(),
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST,
        ),
        (
            "revision 0",
            |c| c.revision = 0,
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST,
        ),
        (
            "bad sex",
            |c| c.metadata.sex = Some("x".into()),
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST,
        ),
    ];
    for (what, mutate, status, code) in cases {
        let mut bad = case("bad", 1, 2);
        mutate(&mut bad);
        let body = api.upload(&[good.clone(), bad]).await.refusal(status, code);
        assert!(body.message.contains("case 1 "), "{what}: {}", body.message);
        assert!(
            !body.message.contains("good") && !body.message.contains("\"bad\""),
            "{what}: no ids in messages"
        );
        assert_eq!(rows(&db.pool).await, (0, 0), "{what}: nothing written");
    }

    // A too-large original where originals are allowed; a fitting one is kept.
    let mut big = case("big", 1, 3);
    let mut photo = jpeg(3);
    photo.resize(MAX_ORIGINAL_BYTES + 1, 0);
    big.original_jpeg = Some(photo);
    open_api
        .upload(&[good.clone(), big])
        .await
        .refusal(StatusCode::PAYLOAD_TOO_LARGE, codes::TOO_LARGE);
    assert_eq!(rows(&db.pool).await, (0, 0));
    let mut fits = case("fits", 1, 3);
    fits.original_jpeg = Some(jpeg(30));
    open_api.upload_ok(&[fits.clone()]).await;
    let stored: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT original_jpeg FROM fleet_cases WHERE case_id = 'fits'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored, fits.original_jpeg);
    sqlx::query("DELETE FROM fleet_cases")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM case_revisions")
        .execute(&db.pool)
        .await
        .unwrap();

    // Values JSON carries but f32 cannot: infinity and a null.
    let mut body = serde_json::to_value(dermascope_cloud_api::UploadBatch {
        cases: vec![good.clone(), case("bad", 1, 2)],
    })
    .unwrap();
    body["cases"][1]["embedding"][0] = serde_json::from_str("1e39").unwrap();
    let reply = api.upload_raw(serde_json::to_vec(&body).unwrap()).await;
    let refusal = reply.refusal(StatusCode::BAD_REQUEST, codes::BAD_EMBEDDING);
    assert!(
        refusal.message.contains("not a finite"),
        "{}",
        refusal.message
    );
    body["cases"][1]["embedding"][0] = serde_json::Value::Null;
    api.upload_raw(serde_json::to_vec(&body).unwrap())
        .await
        .refusal(StatusCode::UNPROCESSABLE_ENTITY, codes::BAD_REQUEST);

    // Too many cases in one batch.
    let many: Vec<_> = (0..=MAX_UPLOAD_BATCH as u32)
        .map(|i| case(&format!("m{i}"), 1, i))
        .collect();
    let body = api
        .upload(&many)
        .await
        .refusal(StatusCode::PAYLOAD_TOO_LARGE, codes::TOO_LARGE);
    assert!(
        body.message.contains(&MAX_UPLOAD_BATCH.to_string()),
        "{}",
        body.message
    );

    // Not JSON, the wrong shape, and a body over the limit: JSON refusals.
    api.upload_raw(b"{not json".to_vec())
        .await
        .refusal(StatusCode::BAD_REQUEST, codes::BAD_REQUEST);
    api.upload_raw(br#"{"cases": 3}"#.to_vec())
        .await
        .refusal(StatusCode::UNPROCESSABLE_ENTITY, codes::BAD_REQUEST);
    let mut huge = br#"{"cases": [], "pad": ""#.to_vec();
    huge.resize(MAX_REQUEST_BYTES + 1024, b'x');
    huge.extend_from_slice(br#""}"#);
    api.upload_raw(huge)
        .await
        .refusal(StatusCode::PAYLOAD_TOO_LARGE, codes::TOO_LARGE);
    assert_eq!(rows(&db.pool).await, (0, 0));

    // A case id another device of the clinic uploaded.
    let other = Api::new(&service, &device(&db, &strict, "s2").await.credential);
    other.upload_ok(&[case("theirs", 1, 5)]).await;
    let body = api
        .upload(&[good.clone(), case("theirs", 2, 5)])
        .await
        .refusal(StatusCode::FORBIDDEN, codes::FORBIDDEN);
    assert!(body.message.contains("case 1 "), "{}", body.message);
    assert_eq!(rows(&db.pool).await, (1, 1), "only the other device's case");
    // The same id in another clinic is another case.
    open_api.upload_ok(&[case("theirs", 1, 5)]).await;
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_cloud_toml_answers_logs_no_patient_data_and_stops_on_sigterm() {
    use std::io::BufRead;
    let Some(db) = database("serve_command").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cloud.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\ndatabase_url_env = \"FLEET_TEST_DB\"\n[database]\nmax_connections = 4\n",
    )
    .unwrap();
    dermascope_cloud::db::migrate(&db.pool).await.unwrap();
    operator::add_model(&db.pool, MODEL, DIM).await.unwrap();
    let clinic = clinic(&db, "c", false).await;
    let up = device(&db, &clinic, "up").await;
    let down = device(&db, &clinic, "down").await;
    let log = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dermascope-cloud"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("FLEET_TEST_DB", &db.url)
        .env_remove("DERMASCOPE_CLOUD_DATABASE_URL")
        // Everything, sqlx's statements and hyper's included.
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });
    let line = tokio::time::timeout(WATCHDOG, line)
        .await
        .expect("watchdog: serve prints its address")
        .unwrap()
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    let health: Health = reqwest::get(format!("{base}{}", routes::HEALTH))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health.status, "ok");
    // Patient data through every route: stored, pulled, refused.
    let mut private = case("case-0190c0de-unique", 1, 3);
    private.diagnosis.name = "Dx-name-unique-7f3a".into();
    private.metadata.anatomical_site = Some("site-unique-42".into());
    let up_api = Api {
        base: base.clone(),
        credential: up.credential.clone(),
        client: reqwest::Client::new(),
    };
    up_api.upload_ok(std::slice::from_ref(&private)).await;
    let mut refused = private.clone();
    refused.id = "case-refused-unique".into();
    refused.embedding.push(1.0);
    let bad = up_api.upload(&[refused]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let down_api = Api {
        credential: down.credential.clone(),
        ..up_api.clone()
    };
    assert_eq!(down_api.pull_ok(MODEL, None, None).await.cases.len(), 1);
    Api {
        credential: format!("{}.wrong", down.device_id),
        ..up_api.clone()
    }
    .device()
    .await
    .refusal(StatusCode::UNAUTHORIZED, codes::UNAUTHENTICATED);

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(WATCHDOG, tokio::task::spawn_blocking(move || child.wait()))
        .await
        .expect("watchdog: serve stops on SIGTERM")
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("upload committed"),
        "debug logging was on: {logged}"
    );
    let thumbnail = base64::engine::general_purpose::STANDARD.encode(&private.thumbnail_jpeg);
    for secret in [
        "case-0190c0de-unique",
        "case-refused-unique",
        "Dx-name-unique-7f3a",
        "site-unique-42",
        &thumbnail[..40],
        up.credential.split_once('.').unwrap().1,
        down.credential.split_once('.').unwrap().1,
    ] {
        assert!(!logged.contains(secret), "the log holds {secret:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_large_thumbnails_stops_short_of_the_devices_response_limit() {
    let Some((db, service)) = fleet("page_bytes").await else {
        return;
    };
    let clinic = clinic(&db, "c", false).await;
    let up = Api::new(&service, &device(&db, &clinic, "up").await.credential);
    let down = Api::new(&service, &device(&db, &clinic, "down").await.credential);
    // Near the thumbnail limit (a real JPEG header, padded): a full page of
    // these would be well over MAX_RESPONSE_BYTES once base64-encoded.
    let big = |i: u32| {
        let mut c = case(&format!("big-{i:03}"), 1, i);
        c.thumbnail_jpeg.resize(MAX_THUMBNAIL_BYTES - 1024, 0);
        c
    };
    let total = 120u32;
    for chunk in (0..total).collect::<Vec<_>>().chunks(40) {
        let cases: Vec<_> = chunk.iter().map(|i| big(*i)).collect();
        up.upload_ok(&cases).await;
    }
    let first = down.pull(MODEL, None, None).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        first.body.len() < dermascope_cloud_api::MAX_RESPONSE_BYTES,
        "{} bytes",
        first.body.len()
    );
    let page: dermascope_cloud_api::CasePage = first.json();
    assert!(page.more, "cut short by size, so more follows");
    assert!(!page.cases.is_empty() && page.cases.len() < total as usize);
    let (rest, _) = down.pull_all(MODEL, Some(&page.cursor), 256).await;
    assert_eq!(
        page.cases.len() + rest.len(),
        total as usize,
        "nothing skipped"
    );
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_import_reads_json_lines_with_the_upload_revision_rules() {
    let Some((db, service)) = fleet("reference_import").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("library.jsonl");
    let lines = |cases: &[dermascope_cloud_api::WireCase]| {
        cases
            .iter()
            .map(|c| serde_json::to_string(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut v2 = case("isic-1", 2, 1);
    v2.diagnosis.name = "newer".into();
    std::fs::write(&file, lines(&[case("isic-0", 1, 0), v2.clone()])).unwrap();
    let path = file.to_str().unwrap();
    let report = cli(&db, &["reference", "import", path]);
    assert_eq!(
        report,
        serde_json::json!({"stored": 2, "already_stored": 0, "superseded": 0})
    );
    let report = cli(&db, &["reference", "import", path]);
    assert_eq!(
        report,
        serde_json::json!({"stored": 0, "already_stored": 2, "superseded": 0})
    );
    std::fs::write(&file, lines(&[case("isic-1", 1, 1), case("isic-2", 1, 2)])).unwrap();
    let report = cli(&db, &["reference", "import", path]);
    assert_eq!(
        report,
        serde_json::json!({"stored": 1, "already_stored": 0, "superseded": 1})
    );

    // A bad line is named by its number; a bad case by its index; nothing
    // of that file is written.
    std::fs::write(
        &file,
        format!("{}\n{{oops\n", lines(&[case("isic-9", 1, 9)])),
    )
    .unwrap();
    let err = cli_fails(&db, &["reference", "import", path]);
    assert!(err.contains("line 2"), "{err}");
    let mut wrong = case("isic-8", 1, 8);
    wrong.embedding.pop();
    std::fs::write(&file, lines(&[case("isic-7", 1, 7), wrong])).unwrap();
    let err = cli_fails(&db, &["reference", "import", path]);
    assert!(
        err.contains("case 1") && err.contains("bad_embedding"),
        "{err}"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM reference_cases").await,
        3
    );

    let clinic = clinic(&db, "c", false).await;
    let api = Api::new(&service, &device(&db, &clinic, "d").await.credential);
    let (cases, _) = api.pull_all(MODEL, None, 10).await;
    let got: Vec<_> = cases
        .iter()
        .map(|c| (c.id.as_str(), c.revision, c.source))
        .collect();
    assert_eq!(
        got,
        [
            ("isic-0", 1, Some(WireSource::Reference)),
            ("isic-1", 2, Some(WireSource::Reference)),
            ("isic-2", 1, Some(WireSource::Reference)),
        ]
    );
    assert_eq!(cases[1].diagnosis.name, "newer");
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rag_is_routed_authenticated_and_refuses_bad_bodies_as_json() {
    use dermascope_cloud_api::{AnsweredBy, RagAnswer, RagRequest};
    let Some((db, service)) = fleet("rag_route").await else {
        return;
    };
    let clinic = clinic(&db, "c", false).await;
    let up = Api::new(&service, &device(&db, &clinic, "up").await.credential);
    let asker = Api::new(&service, &device(&db, &clinic, "asker").await.credential);
    let stored = case("seen", 1, 4);
    up.upload_ok(std::slice::from_ref(&stored)).await;
    let request = RagRequest {
        model_id: MODEL.into(),
        embedding: stored.embedding.clone(),
        k: 3,
        photo_jpeg: None,
        thumbnail_jpeg: Some(jpeg(99)),
    };
    let url = format!("{}{}", asker.base, routes::RAG);
    let reply = asker.send(asker.client.post(&url).json(&request)).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let answer: RagAnswer = reply.json();
    // No model configured for this service: retrieval answers, and says so.
    assert_eq!(answer.answered_by, AnsweredBy::Retrieval);
    assert!(answer.fallback_reason.is_some());
    assert_eq!(answer.cases.first().map(|c| c.id.as_str()), Some("seen"));

    let anonymous = Api::new(&service, "");
    anonymous
        .send(anonymous.client.post(&url).json(&request))
        .await
        .refusal(StatusCode::UNAUTHORIZED, codes::UNAUTHENTICATED);
    asker
        .send(
            asker
                .client
                .post(&url)
                .header("Content-Type", "application/json")
                .body("{\"model_id\": 1}"),
        )
        .await
        .refusal(StatusCode::UNPROCESSABLE_ENTITY, codes::BAD_REQUEST);
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_is_written_at_most_once_a_minute() {
    let Some((db, service)) = fleet("last_seen").await else {
        return;
    };
    let clinic = clinic(&db, "c", false).await;
    let dev = device(&db, &clinic, "d").await;
    let api = Api::new(&service, &dev.credential);
    let seen = || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT (last_seen_at - created_at)::text FROM devices WHERE device_id = $1::uuid",
        )
        .bind(&dev.device_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert_eq!(seen().await, None, "never seen before its first request");
    assert_eq!(api.device().await.status, StatusCode::OK);
    let first = seen().await.expect("seen after its first request");
    assert_eq!(api.device().await.status, StatusCode::OK);
    assert_eq!(
        seen().await.as_ref(),
        Some(&first),
        "not written again within the minute"
    );
    // Two minutes ago, as far as the database knows: the next request writes.
    sqlx::query(
        "UPDATE devices SET last_seen_at = now() - interval '2 minutes' WHERE device_id = $1::uuid",
    )
    .bind(&dev.device_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let stale = seen().await;
    assert_eq!(api.device().await.status, StatusCode::OK);
    assert_ne!(seen().await, stale, "written again after a minute");
    service.shutdown().await;
}
