//! The device's sync against the real fleet service (in-process, on a real
//! PostgreSQL with pgvector), with faults injected by a loopback proxy.
//! Every wait is on a status change, a count or the proxy's log, under a
//! watchdog; nothing asserts on durations.

mod support;

use dermascope_cloud_api::{
    AnsweredBy, CasePage, RagRequest, UploadOutcome, UploadReceipt, WireSource, MAX_RESPONSE_BYTES,
};
use dermascope_store::{CaseFilter, CaseSource, CaseWrite, ScoreKind};
use dermascope_sync::{convert, SyncError};
use support::{
    next_cycle, original, wait_until, Action, Device, Fleet, MODEL, OTHER_MODEL, WATCHDOG,
};

#[test]
fn captures_reach_the_clinics_other_devices_and_no_other_clinic() {
    let Some(fleet) = Fleet::start("reach") else {
        return;
    };
    let a = fleet.clinic("Clinic A", false);
    let b = fleet.clinic("Clinic B", false);
    let (a1, a2, b1) = (
        fleet.device(&a, "a1"),
        fleet.device(&a, "a2"),
        fleet.device(&b, "b1"),
    );
    let d1 = Device::new(&a1);
    let cases = d1.capture(5, "a1");
    let s1 = d1.start(d1.config(&fleet.proxy.url()));
    wait_until("a1's outbox drained", || {
        let s = s1.status();
        s.pending_uploads == 0 && s.online
    });
    assert_eq!(
        fleet.count("SELECT count(*) FROM fleet_cases"),
        cases.len() as i64
    );
    // No note left the device.
    assert_eq!(
        fleet.count("SELECT count(*) FROM fleet_cases WHERE metadata::text LIKE '%private note%'"),
        0
    );

    let d2 = Device::new(&a2);
    let s2 = d2.start(d2.config(&fleet.proxy.url()));
    wait_until("a2 pulled a1's cases", || d2.count(CaseSource::Fleet) == 5);
    let status = next_cycle(&s2);
    assert!(status.online && status.last_error.is_none(), "{status:?}");
    assert_eq!(d2.store.len().unwrap(), 5, "nothing pulled twice");
    assert_eq!(status.pending_uploads, 0, "pulled cases are not uploaded");
    for case in &cases {
        let pulled = d2.store.get(&case.id).unwrap().expect("pulled");
        assert_eq!(pulled.source, CaseSource::Fleet);
        assert_eq!(pulled.device_id.as_deref(), Some(a1.device_id.as_str()));
        assert_eq!(pulled.revision, case.revision);
        assert_eq!(pulled.metadata.note, None);
        assert_eq!(pulled.metadata.lesion_id, case.metadata.lesion_id);
        let hits = d2
            .store
            .search(
                &case.embedding,
                1,
                &CaseFilter::any().with_sources([CaseSource::Fleet]),
                ScoreKind::F32,
            )
            .unwrap();
        assert_eq!(hits[0].id, case.id, "the index holds the pulled case");
    }

    let d3 = Device::new(&b1);
    let s3 = d3.start(d3.config(&fleet.proxy.url()));
    let status = next_cycle(&s3);
    assert!(status.online, "{status:?}");
    assert_eq!(d3.store.len().unwrap(), 0, "another clinic's cases");

    // And a device never pulls its own captures back.
    next_cycle(&s1);
    assert_eq!(d1.count(CaseSource::Fleet), 0);
    assert_eq!(d1.count(CaseSource::Captured), 5);
}

#[test]
fn originals_leave_only_where_the_clinic_allows() {
    let Some(fleet) = Fleet::start("originals") else {
        return;
    };
    for (name, allow) in [("open", true), ("closed", false)] {
        let clinic = fleet.clinic(name, allow);
        let device = Device::new(&fleet.device(&clinic, name));
        let case = support::captured_case(name, &device.device_id, MODEL);
        let photo = original(7);
        device
            .store
            .insert_with_originals(&[CaseWrite {
                case: &case,
                original: Some(&photo),
            }])
            .unwrap();
        let sync = device.start(device.config(&fleet.proxy.url()));
        wait_until("the capture uploaded", || {
            sync.status().pending_uploads == 0
        });
        let sql = format!(
            "SELECT count(*) FROM fleet_cases WHERE case_id = '{}' AND original_jpeg IS NOT NULL",
            case.id
        );
        assert_eq!(fleet.count(&sql), i64::from(allow), "{name}");
    }
}

#[test]
fn a_batch_whose_answer_was_lost_is_answered_already_stored_on_retry() {
    let Some(fleet) = Fleet::start("lost_answer") else {
        return;
    };
    let clinic = fleet.clinic("A", false);
    let device = Device::new(&fleet.device(&clinic, "a1"));
    device.capture(3, "lost");
    // The service commits the batch; the device never hears the receipt.
    fleet
        .proxy
        .fault("POST", "/v1/cases", Action::DropAnswer, 1);
    let sync = device.start(device.config(&fleet.proxy.url()));
    wait_until("the outbox drained", || sync.status().pending_uploads == 0);

    let uploads: Vec<_> = fleet
        .proxy
        .log()
        .into_iter()
        .filter(|e| e.is("POST", "/v1/cases"))
        .collect();
    assert_eq!(uploads.len(), 2, "{uploads:?}");
    assert!(uploads[0].fault.is_some());
    let outcomes = |body: &[u8]| -> Vec<UploadOutcome> {
        let receipt: UploadReceipt = serde_json::from_slice(body).expect("a receipt");
        receipt.results.iter().map(|r| r.outcome).collect()
    };
    assert_eq!(outcomes(&uploads[0].body), [UploadOutcome::Stored; 3]);
    assert_eq!(
        outcomes(&uploads[1].body),
        [UploadOutcome::AlreadyStored; 3]
    );
    assert_eq!(fleet.count("SELECT count(*) FROM fleet_cases"), 3);
    assert_eq!(fleet.count("SELECT count(*) FROM case_revisions"), 3);
    let status = next_cycle(&sync);
    assert!(status.online && status.last_error.is_none(), "{status:?}");
}

#[test]
fn server_errors_and_a_stalled_request_are_retried_until_acknowledged() {
    let Some(fleet) = Fleet::start("errors") else {
        return;
    };
    let clinic = fleet.clinic("A", false);
    let device = Device::new(&fleet.device(&clinic, "a1"));
    device.capture(2, "errors");
    let internal = r#"{"code":"internal","message":"injected failure"}"#;
    fleet
        .proxy
        .fault("GET", "/v1/device", Action::json(500, internal), 2);
    fleet.proxy.fault("POST", "/v1/cases", Action::Hold, 1);
    let sync = device.start(device.config(&fleet.proxy.url()));

    // Two cycles failed on the 500s; the third is stuck in the upload.
    fleet.proxy.wait_held(1);
    let status = sync.status();
    assert!(!status.online, "{status:?}");
    let error = status.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("500") && error.contains("injected failure"),
        "{error}"
    );
    assert_eq!(status.pending_uploads, 2);

    // The device gives up on the stalled request (request_timeout_s) and
    // retries it; the proxy then lets requests through.
    wait_until("the outbox drained", || sync.status().pending_uploads == 0);
    fleet.proxy.release();
    let log = fleet.proxy.log();
    let uploads: Vec<_> = log.iter().filter(|e| e.is("POST", "/v1/cases")).collect();
    assert!(uploads[0].fault.is_some() && uploads[0].status.is_none());
    assert_eq!(uploads.last().and_then(|e| e.status), Some(200));
    assert_eq!(fleet.count("SELECT count(*) FROM fleet_cases"), 2);
    let status = next_cycle(&sync);
    assert!(status.online && status.last_error.is_none(), "{status:?}");
}

#[test]
fn a_service_restarted_mid_pull_is_resumed_from_the_cursor() {
    let Some(mut fleet) = Fleet::start("restart") else {
        return;
    };
    let clinic = fleet.clinic("A", false);
    let uploader = Device::new(&fleet.device(&clinic, "a1"));
    // Three pages of the service's 256.
    let cases = uploader.capture(600, "restart");
    let s1 = uploader.start(uploader.config(&fleet.proxy.url()));
    wait_until("600 uploads", || s1.status().pending_uploads == 0);
    s1.stop();

    let puller = Device::new(&fleet.device(&clinic, "a2"));
    // The second page request never reaches the service.
    fleet
        .proxy
        .fault_after("GET", "/v1/cases", 1, Action::Hold, 1);
    let s2 = puller.start(puller.config(&fleet.proxy.url()));
    fleet.proxy.wait_held(1);
    let after_page_1 = puller
        .store
        .sync_cursor()
        .unwrap()
        .expect("page 1's cursor");
    assert_eq!(puller.count(CaseSource::Fleet), 256);

    fleet.restart();
    fleet.proxy.release();
    wait_until("every case pulled", || {
        puller.count(CaseSource::Fleet) == cases.len()
    });
    let status = next_cycle(&s2);
    assert!(status.online, "{status:?}");
    assert_eq!(
        puller.store.len().unwrap(),
        cases.len(),
        "exact, no duplicates"
    );
    for case in cases.iter().step_by(37) {
        assert!(puller.store.contains(&case.id).unwrap());
    }
    // The first pull that reached the new instance continued after page 1.
    let pulls: Vec<_> = fleet
        .proxy
        .log()
        .into_iter()
        .filter(|e| e.is("GET", "/v1/cases"))
        .collect();
    let resumed = pulls
        .iter()
        .skip_while(|e| e.fault.is_none())
        .nth(1)
        .expect("a pull after the restart");
    assert!(
        resumed
            .request_line
            .contains(&format!("cursor={after_page_1}")),
        "{} does not continue from {after_page_1}",
        resumed.request_line
    );
}

#[test]
fn a_revoked_device_is_told_why_and_keeps_its_outbox() {
    let Some(fleet) = Fleet::start("revoked") else {
        return;
    };
    let clinic = fleet.clinic("A", false);
    let registered = fleet.device(&clinic, "a1");
    let device = Device::new(&registered);
    device.capture(1, "before");
    let sync = device.start(device.config(&fleet.proxy.url()));
    wait_until("the first capture uploaded", || {
        let s = sync.status();
        s.pending_uploads == 0 && s.online
    });
    fleet.revoke(&registered.device_id);
    device.capture(2, "after");
    sync.nudge();
    wait_until("the refusal in the status", || {
        sync.status()
            .last_error
            .is_some_and(|e| e.contains("device_revoked"))
    });
    let status = sync.status();
    assert!(!status.online, "{status:?}");
    assert_eq!(status.pending_uploads, 2, "nothing cleared");
    assert_eq!(fleet.count("SELECT count(*) FROM fleet_cases"), 1);
}

#[test]
fn a_service_whose_certificate_another_ca_signed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = |name: &str| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
    };
    let (fleet_ca, other_ca) = (ca("fleet CA"), ca("another CA"));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &*fleet_ca)
        .unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("cert.pem"), cert.pem()).unwrap();
    support::write_private(&path("key.pem"), &key.serialize_pem());
    std::fs::write(path("fleet-ca.pem"), fleet_ca.pem()).unwrap();
    std::fs::write(path("other-ca.pem"), other_ca.pem()).unwrap();
    let tls = dermascope_cloud::server::TlsFiles {
        cert: path("cert.pem"),
        key: path("key.pem"),
    };
    let Some(fleet) = Fleet::start_with_tls("wrong_ca", Some(tls)) else {
        return;
    };
    let url = fleet.direct_url();
    assert!(url.starts_with("https://"), "{url}");
    let clinic = fleet.clinic("A", false);
    let device = Device::new(&fleet.device(&clinic, "a1"));
    device.capture(1, "tls");
    let config = |ca: &str| {
        let mut c = device.config(&url);
        c.allow_plain_http_for_tests = false;
        c.ca = Some(path(ca));
        c
    };

    let sync = device.start(config("other-ca.pem"));
    let status = next_cycle(&sync);
    assert!(!status.online, "{status:?}");
    let error = status.last_error.clone().unwrap_or_default();
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    assert_eq!(status.pending_uploads, 1);
    assert_eq!(fleet.count("SELECT count(*) FROM fleet_cases"), 0);
    sync.stop();

    let sync = device.start(config("fleet-ca.pem"));
    wait_until("the upload over TLS", || {
        let s = sync.status();
        s.pending_uploads == 0 && s.online
    });
    assert_eq!(fleet.count("SELECT count(*) FROM fleet_cases"), 1);
}

#[test]
fn malformed_and_oversized_answers_are_refused_without_touching_the_store() {
    let Some(fleet) = Fleet::start("malformed") else {
        return;
    };
    let clinic = fleet.clinic("A", false);
    let uploader = Device::new(&fleet.device(&clinic, "a1"));
    uploader.capture(3, "malformed");
    let s1 = uploader.start(uploader.config(&fleet.proxy.url()));
    wait_until("uploads", || s1.status().pending_uploads == 0);
    s1.stop();

    let device = Device::new(&fleet.device(&clinic, "a2"));
    let proxy = &fleet.proxy;
    proxy.fault(
        "GET",
        "/v1/cases",
        Action::json(200, r#"{"cases": [{"id": "#),
        1,
    );
    proxy.fault(
        "GET",
        "/v1/cases",
        Action::announce(MAX_RESPONSE_BYTES as u64 + 1),
        1,
    );
    proxy.fault(
        "GET",
        "/v1/cases",
        Action::Flood(MAX_RESPONSE_BYTES + (1 << 20)),
        1,
    );
    proxy.fault("GET", "/v1/cases", Action::Hold, 1);
    let sync = device.start(device.config(&proxy.url()));
    proxy.wait_held(1);
    let status = sync.status();
    let error = status.last_error.clone().unwrap_or_default();
    assert!(error.contains("answer refused"), "{error}");
    assert!(!status.online);
    assert_eq!(device.store.len().unwrap(), 0);
    assert_eq!(device.store.sync_cursor().unwrap(), None);
    let faulted = proxy
        .log()
        .iter()
        .filter(|e| e.is("GET", "/v1/cases") && e.fault.is_some())
        .count();
    assert_eq!(faulted, 4);

    proxy.release();
    wait_until("the real pages", || device.count(CaseSource::Fleet) == 3);
}

#[test]
fn bad_cases_in_a_page_are_skipped_and_a_foreign_cursor_restarts_the_pull() {
    let Some(fleet) = Fleet::start("bad_page") else {
        return;
    };
    let clinic = fleet.clinic("A", false);
    let uploader = Device::new(&fleet.device(&clinic, "a1"));
    let cases = uploader.capture(1, "bad-page");
    let s1 = uploader.start(uploader.config(&fleet.proxy.url()));
    wait_until("upload", || s1.status().pending_uploads == 0);
    s1.stop();

    let good = {
        let mut w = convert::to_wire(&cases[0], None);
        w.source = Some(WireSource::Fleet);
        w.device_id = Some(uploader.device_id.clone());
        w
    };
    let mut wrong_dim = good.clone();
    wrong_dim.id = "wrong-dim".into();
    wrong_dim.embedding.push(0.0);
    let mut other_model = good.clone();
    other_model.id = "other-model".into();
    other_model.model_id = OTHER_MODEL.into();
    let mut no_source = good.clone();
    no_source.id = "no-source".into();
    no_source.source = None;
    let page = CasePage {
        cases: vec![wrong_dim, good, other_model, no_source],
        cursor: "v1.injected".into(),
        more: false,
    };
    let page = serde_json::to_string(&page).unwrap();
    let device = Device::new(&fleet.device(&clinic, "a2"));
    fleet
        .proxy
        .fault("GET", "/v1/cases", Action::json(200, &page), 1);
    fleet.proxy.fault("GET", "/v1/cases", Action::Hold, 1);
    let sync = device.start(device.config(&fleet.proxy.url()));
    fleet.proxy.wait_held(1);
    assert_eq!(device.store.len().unwrap(), 1, "only the good case");
    assert!(device.store.contains(&cases[0].id).unwrap());
    assert_eq!(
        device.store.sync_cursor().unwrap().as_deref(),
        Some("v1.injected")
    );

    // The service refuses a cursor it never handed out; the device pulls
    // from the start and ends with the service's cursor.
    fleet.proxy.release();
    wait_until("the service's cursor", || {
        device
            .store
            .sync_cursor()
            .unwrap()
            .is_some_and(|c| c != "v1.injected")
    });
    let status = next_cycle(&sync);
    assert!(status.online, "{status:?}");
    assert_eq!(device.store.len().unwrap(), 1);
}

#[test]
fn cases_of_another_encoder_are_never_pulled() {
    let Some(fleet) = Fleet::start("other_encoder") else {
        return;
    };
    let clinic = fleet.clinic("A", false);
    let other = Device::with_model(&fleet.device(&clinic, "other"), OTHER_MODEL);
    other.capture(4, "other-encoder");
    let same = Device::new(&fleet.device(&clinic, "same"));
    let mine = same.capture(2, "same-encoder");
    for device in [&other, &same] {
        let sync = device.start(device.config(&fleet.proxy.url()));
        wait_until("uploads", || sync.status().pending_uploads == 0);
    }
    assert_eq!(fleet.count("SELECT count(*) FROM fleet_cases"), 6);

    let puller = Device::new(&fleet.device(&clinic, "puller"));
    let sync = puller.start(puller.config(&fleet.proxy.url()));
    wait_until("the same encoder's cases", || {
        puller.count(CaseSource::Fleet) == 2
    });
    let status = next_cycle(&sync);
    assert!(status.online, "{status:?}");
    assert_eq!(puller.store.len().unwrap(), 2);
    for case in &mine {
        assert!(puller.store.contains(&case.id).unwrap());
    }
}

#[test]
fn rag_answers_arrive_in_the_background_and_a_newer_request_supersedes() {
    let Some(fleet) = Fleet::start("rag") else {
        return;
    };
    let clinic = fleet.clinic("A", false);
    let uploader = Device::new(&fleet.device(&clinic, "a1"));
    let cases = uploader.capture(4, "rag");
    let s1 = uploader.start(uploader.config(&fleet.proxy.url()));
    wait_until("uploads", || s1.status().pending_uploads == 0);
    s1.stop();

    let device = Device::new(&fleet.device(&clinic, "a2"));
    let sync = device.start(device.config(&fleet.proxy.url()));
    let request = |k| RagRequest {
        model_id: MODEL.into(),
        embedding: cases[0].embedding.clone(),
        k,
        photo_jpeg: Some(support::jpeg(1, 32)),
        thumbnail_jpeg: Some(cases[0].thumbnail_jpeg.clone()),
    };
    let answer = sync
        .request_rag(request(3))
        .recv_timeout(WATCHDOG)
        .expect("watchdog: an answer")
        .expect("the service answers");
    assert_eq!(
        answer.answered_by,
        AnsweredBy::Retrieval,
        "no model configured"
    );
    assert_eq!(
        answer.cases.first().map(|c| c.id.as_str()),
        Some(cases[0].id.as_str())
    );
    assert!(answer.cases.len() <= 3);
    // The clinic does not allow originals: the photo stayed on the device.
    let sent = fleet.proxy.log();
    let sent = sent
        .iter()
        .find(|e| e.is("POST", "/v1/rag"))
        .expect("a RAG request");
    let sent: serde_json::Value = serde_json::from_slice(&sent.request).unwrap();
    assert!(sent.get("photo_jpeg").is_none(), "{sent}");
    assert!(sent.get("thumbnail_jpeg").is_some());

    fleet.proxy.fault("POST", "/v1/rag", Action::Hold, 1);
    let first = sync.request_rag(request(2));
    fleet.proxy.wait_held(1);
    let second = sync.request_rag(request(2));
    let third = sync.request_rag(request(2));
    fleet.proxy.release();
    let first = first.recv_timeout(WATCHDOG).expect("watchdog: first");
    assert!(
        matches!(
            first,
            Err(SyncError::Unreachable(_) | SyncError::Timeout(_))
        ),
        "{first:?}"
    );
    let second = second.recv_timeout(WATCHDOG).expect("watchdog: second");
    assert!(matches!(second, Err(SyncError::Superseded)), "{second:?}");
    let third = third.recv_timeout(WATCHDOG).expect("watchdog: third");
    assert!(third.is_ok(), "{third:?}");
}

#[test]
fn a_nudge_and_a_stop_cut_the_interval_short() {
    let Some(fleet) = Fleet::start("nudge_stop") else {
        return;
    };
    let clinic = fleet.clinic("A", false);
    let device = Device::new(&fleet.device(&clinic, "a1"));
    let mut config = device.config(&fleet.proxy.url());
    // Far beyond the watchdog: only a nudge or a stop can end the sleep.
    config.interval_s = 86_400;
    let sync = device.start(config);
    let first = next_cycle(&sync);
    assert!(first.online, "{first:?}");
    // A capture, then a nudge: uploaded without waiting out the interval.
    device.capture(1, "nudged");
    sync.nudge();
    wait_until("the nudged upload", || sync.status().pending_uploads == 0);

    let (stopped, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        sync.stop();
        let _ = stopped.send(());
    });
    done.recv_timeout(WATCHDOG)
        .expect("watchdog: stop() did not end the interval's sleep");
}
