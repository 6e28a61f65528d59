//! Pages pulled from the fleet service: applied with their cursor in one
//! write, by revision, never over a capture and never into the outbox.

mod common;

use std::path::Path;

use common::{identity, make_case, MODEL};
use dermascope_store::{
    Case, CaseError, CaseFilter, CaseId, CaseSource, CaseStore, OpenOptions, PulledApplied,
    ScoreKind, StoreError,
};

const DIM: usize = 32;

fn open(dir: &Path, options: OpenOptions) -> CaseStore {
    // The previous handle's sled lock is released from a background thread.
    let mut last = None;
    for _ in 0..100 {
        match CaseStore::open_with(dir, identity(DIM), options) {
            Ok(store) => return store,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("open kept failing: {last:?}");
}

fn pulled(id: &str, source: CaseSource, revision: u64) -> Case {
    let mut case = make_case(id, DIM);
    case.source = source;
    case.revision = revision;
    case.device_id = Some("0193a3c0-0000-7000-8000-0000000000aa".into());
    // Notes never leave a device, so a pulled case has none.
    case.metadata.note = None;
    case
}

fn captured(id: &str) -> Case {
    let mut case = make_case(id, DIM);
    case.source = CaseSource::Captured;
    case
}

fn id(s: &str) -> CaseId {
    CaseId::new(s).unwrap()
}

fn applied(added: usize, updated: usize, skipped: usize) -> PulledApplied {
    PulledApplied {
        added,
        updated,
        skipped,
    }
}

/// The hit for the case's own embedding, restricted to one source: proves
/// the index holds it under that source.
fn indexed_as(store: &CaseStore, case: &Case, source: CaseSource) -> bool {
    let filter = CaseFilter::any().with_sources([source]);
    let hits = store
        .search(&case.embedding, 1, &filter, ScoreKind::F32)
        .unwrap();
    hits.first().is_some_and(|h| h.id == case.id)
}

#[test]
fn a_page_and_its_cursor_survive_a_reopen_together() {
    let dir = tempfile::tempdir().unwrap();
    let page1 = [
        pulled("fleet-1", CaseSource::Fleet, 1),
        pulled("ref-1", CaseSource::Reference, 1),
    ];
    let page2 = [pulled("fleet-2", CaseSource::Fleet, 3)];
    {
        let store = open(dir.path(), OpenOptions::default());
        assert_eq!(store.sync_cursor().unwrap(), None);
        assert_eq!(store.apply_pulled(&page1, "c1").unwrap(), applied(2, 0, 0));
        assert_eq!(store.sync_cursor().unwrap().as_deref(), Some("c1"));
    }
    {
        // Without writing the index cache at close: the next open must
        // replay the pulled page from the change log like any write.
        let store = open(
            dir.path(),
            OpenOptions {
                no_cache_on_close: true,
                ..OpenOptions::default()
            },
        );
        assert_eq!(store.apply_pulled(&page2, "c2").unwrap(), applied(1, 0, 0));
    }
    for round in 0..2 {
        // Round 0 replays the change log past the cache; round 1 reads the
        // cache written when round 0's store closed.
        let store = open(dir.path(), OpenOptions::default());
        assert_eq!(
            store.sync_cursor().unwrap().as_deref(),
            Some("c2"),
            "round {round}"
        );
        for case in page1.iter().chain(&page2) {
            assert_eq!(store.get(&case.id).unwrap().as_ref(), Some(case));
            assert!(indexed_as(&store, case, case.source), "round {round}");
        }
        assert_eq!(store.len().unwrap(), 3);
    }
}

#[test]
fn a_case_is_replaced_only_by_a_higher_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OpenOptions::default());
    let v2 = pulled("fleet-1", CaseSource::Fleet, 2);
    assert_eq!(
        store.apply_pulled(std::slice::from_ref(&v2), "c1").unwrap(),
        applied(1, 0, 0)
    );

    let mut older = pulled("fleet-1", CaseSource::Fleet, 1);
    older.diagnosis.code = "older".into();
    let mut same = v2.clone();
    same.diagnosis.code = "same".into();
    assert_eq!(
        store.apply_pulled(&[older, same], "c2").unwrap(),
        applied(0, 0, 2)
    );
    assert_eq!(store.get(&v2.id).unwrap().as_ref(), Some(&v2));

    let mut v3 = pulled("fleet-1", CaseSource::Fleet, 3);
    v3.diagnosis.code = "bcc".into();
    v3.embedding = make_case("another embedding", DIM).embedding;
    assert_eq!(
        store.apply_pulled(std::slice::from_ref(&v3), "c3").unwrap(),
        applied(0, 1, 0)
    );
    assert_eq!(store.get(&v3.id).unwrap().as_ref(), Some(&v3));
    // The index moved with the record: the new embedding finds it.
    assert!(indexed_as(&store, &v3, CaseSource::Fleet));
    assert_eq!(store.counts().unwrap().by_diagnosis.get("bcc"), Some(&1));
    assert_eq!(store.sync_cursor().unwrap().as_deref(), Some("c3"));
}

#[test]
fn one_id_twice_in_a_page_keeps_the_higher_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OpenOptions::default());
    let v1 = pulled("fleet-1", CaseSource::Fleet, 1);
    let v4 = pulled("fleet-1", CaseSource::Fleet, 4);
    let v2 = pulled("fleet-1", CaseSource::Fleet, 2);
    assert_eq!(
        store.apply_pulled(&[v1, v4.clone(), v2], "c1").unwrap(),
        applied(1, 1, 1)
    );
    assert_eq!(store.get(&v4.id).unwrap().map(|c| c.revision), Some(4));
    assert_eq!(store.len().unwrap(), 1);
}

#[test]
fn a_capture_of_this_device_is_never_replaced_and_stays_pending() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OpenOptions::default());
    let mine = captured("mine");
    store.insert(&mine).unwrap();
    let mut theirs = pulled("mine", CaseSource::Fleet, 9);
    theirs.diagnosis.code = "mel".into();
    assert_eq!(
        store.apply_pulled(&[theirs], "c1").unwrap(),
        applied(0, 0, 1)
    );
    assert_eq!(store.get(&mine.id).unwrap().as_ref(), Some(&mine));
    assert!(indexed_as(&store, &mine, CaseSource::Captured));
    let pending = store.pending_uploads().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].id.as_str(), pending[0].revision), ("mine", 1));
}

#[test]
fn pulled_cases_never_enter_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OpenOptions::default());
    let page: Vec<Case> = (0..20)
        .map(|i| {
            let source = [CaseSource::Fleet, CaseSource::Reference][i % 2];
            pulled(&format!("p{i}"), source, 1 + i as u64 % 3)
        })
        .collect();
    assert_eq!(store.apply_pulled(&page, "c1").unwrap(), applied(20, 0, 0));
    let mut newer = page[0].clone();
    newer.revision += 1;
    assert_eq!(
        store.apply_pulled(&[newer], "c2").unwrap(),
        applied(0, 1, 0)
    );
    assert_eq!(store.pending_upload_count(), 0);
    assert!(store.pending_uploads().unwrap().is_empty());
}

#[test]
fn the_index_holds_pulled_cases_under_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OpenOptions::default());
    let fleet = pulled("fleet-1", CaseSource::Fleet, 1);
    let reference = pulled("ref-1", CaseSource::Reference, 1);
    store.insert(&captured("mine")).unwrap();
    store
        .apply_pulled(&[fleet.clone(), reference.clone()], "c1")
        .unwrap();
    let by_source = store.counts().unwrap().by_source;
    for source in CaseSource::ALL {
        assert_eq!(by_source.get(&source), Some(&1), "{source:?}");
    }
    assert!(indexed_as(&store, &fleet, CaseSource::Fleet));
    assert!(indexed_as(&store, &reference, CaseSource::Reference));
    assert!(!indexed_as(&store, &fleet, CaseSource::Reference));
    let stored = store.get(&fleet.id).unwrap().unwrap();
    assert_eq!(stored.device_id, fleet.device_id);
}

#[test]
fn a_case_of_another_encoder_refuses_the_whole_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OpenOptions::default());
    store
        .apply_pulled(&[pulled("first", CaseSource::Fleet, 1)], "c1")
        .unwrap();
    let good = pulled("good", CaseSource::Fleet, 1);
    let mut foreign = pulled("foreign", CaseSource::Fleet, 1);
    foreign.model_id = format!("not-{MODEL}");
    let err = store
        .apply_pulled(&[good.clone(), foreign], "c2")
        .unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::InvalidCase {
                source: CaseError::ModelMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
    let mut wrong_dim = pulled("short", CaseSource::Fleet, 1);
    wrong_dim.embedding.pop();
    assert!(matches!(
        store.apply_pulled(&[good.clone(), wrong_dim], "c2"),
        Err(StoreError::InvalidCase {
            source: CaseError::DimMismatch { .. },
            ..
        })
    ));
    assert!(!store.contains(&good.id).unwrap());
    assert_eq!(store.sync_cursor().unwrap().as_deref(), Some("c1"));
    assert_eq!(store.len().unwrap(), 1);
}

#[test]
fn a_page_claiming_a_capture_or_a_bad_cursor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), OpenOptions::default());
    let good = pulled("good", CaseSource::Fleet, 1);
    let err = store
        .apply_pulled(&[good.clone(), captured("claims-mine")], "c1")
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::PulledAsCaptured { id } if id == "claims-mine"),
        "{err}"
    );
    assert!(
        !err.to_string().contains("claims-mine"),
        "ids are not logged: {err}"
    );
    let long = "x".repeat(dermascope_store::MAX_SYNC_CURSOR_BYTES + 1);
    for cursor in ["", "a\nb", long.as_str()] {
        assert!(matches!(
            store.apply_pulled(std::slice::from_ref(&good), cursor),
            Err(StoreError::InvalidSyncCursor { .. })
        ));
    }
    assert!(!store.contains(&good.id).unwrap());
    assert_eq!(store.sync_cursor().unwrap(), None);
}

#[test]
fn an_empty_page_still_moves_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), OpenOptions::default());
        assert_eq!(
            store.apply_pulled(&[], "v1.a.0.0").unwrap(),
            applied(0, 0, 0)
        );
    }
    let store = open(dir.path(), OpenOptions::default());
    assert_eq!(store.sync_cursor().unwrap().as_deref(), Some("v1.a.0.0"));
}

#[test]
fn a_garbled_cursor_is_reported_and_the_next_page_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), OpenOptions::default());
        store
            .apply_pulled(&[pulled("fleet-1", CaseSource::Fleet, 1)], "c1")
            .unwrap();
    }
    {
        let db = raw_sled(dir.path());
        let meta = db.open_tree("meta").unwrap();
        let mut value = meta.get("sync").unwrap().expect("cursor stored").to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x55;
        meta.insert("sync", value).unwrap();
        db.flush().unwrap();
    }
    let store = open(dir.path(), OpenOptions::default());
    let err = store.sync_cursor().unwrap_err();
    assert!(
        matches!(&err, StoreError::CorruptSyncCursor { .. }),
        "{err}"
    );
    assert!(store.get(&id("fleet-1")).unwrap().is_some());
    store.apply_pulled(&[], "c2").unwrap();
    assert_eq!(store.sync_cursor().unwrap().as_deref(), Some("c2"));
}

/// sled releases its file lock from a background thread shortly after the
/// last handle is dropped, so an immediate re-open can briefly fail.
fn raw_sled(path: &Path) -> sled::Db {
    let mut last = None;
    for _ in 0..100 {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("sled::open kept failing: {last:?}");
}
