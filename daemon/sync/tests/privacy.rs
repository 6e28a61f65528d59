//! What the device logs while it syncs never names a case or a patient:
//! no case id, lesion id or note, no credential; cases appear by
//! `CaseId::log_tag` or their index in a page.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use dermascope_cloud_api::{CasePage, WireSource};
use dermascope_store::CaseSource;
use dermascope_sync::convert;
use support::{next_cycle, wait_until, Action, Device, Fleet};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn sync_logs_name_no_case_and_no_credential() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "dermascope_sync=trace,dermascope_store=trace,reqwest=trace",
        ))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let Some(fleet) = Fleet::start("privacy") else {
        return;
    };
    let clinic = fleet.clinic("A", false);
    let registered = fleet.device(&clinic, "a1");
    let uploader = Device::new(&registered);
    let cases = uploader.capture(3, "privacy");
    let s1 = uploader.start(uploader.config(&fleet.proxy.url()));
    wait_until("uploads", || s1.status().pending_uploads == 0);
    s1.stop();

    // A page with a case that must be refused (and so is logged).
    let mut bad = convert::to_wire(&cases[0], None);
    bad.source = Some(WireSource::Fleet);
    bad.device_id = Some(uploader.device_id.clone());
    bad.id = "Jane_Doe_2024_left_arm".into();
    bad.embedding.push(0.5);
    let page = CasePage {
        cases: vec![bad],
        cursor: "v1.injected".into(),
        more: false,
    };
    fleet.proxy.fault(
        "GET",
        "/v1/cases",
        Action::json(200, &serde_json::to_string(&page).unwrap()),
        1,
    );
    let puller_registration = fleet.device(&clinic, "a2");
    let puller = Device::new(&puller_registration);
    let s2 = puller.start(puller.config(&fleet.proxy.url()));
    wait_until("the real pull after the injected page", || {
        puller.count(CaseSource::Fleet) == 3
    });
    next_cycle(&s2);
    s2.stop();

    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("pulled case skipped"),
        "the refusal was logged: {text}"
    );
    let secret = |credential: &str| credential.split_once('.').unwrap().1.to_owned();
    let mut forbidden = vec![
        "Jane_Doe".to_owned(),
        secret(&registered.credential),
        secret(&puller_registration.credential),
    ];
    for case in &cases {
        forbidden.push(case.id.to_string());
        forbidden.extend(case.metadata.note.clone());
        forbidden.extend(case.metadata.lesion_id.clone());
    }
    for word in forbidden {
        assert!(!text.contains(&word), "{word:?} is in the logs");
    }
}
