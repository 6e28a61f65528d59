mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{identity, make_case, MODEL};
use dermascope_store::{
    CaseError, CaseFilter, CaseId, CaseSource, CaseStore, CaseWrite, IndexError, IndexSource,
    OpenOptions, OriginalPhoto, PendingUpload, Residency, ScoreKind, StoreError, StoreIdentity,
    FORMAT_VERSION,
};

const DIM: usize = 48;

/// sled releases its file lock from a background thread shortly after the
/// last handle is dropped, so an immediate re-open can briefly fail.
fn raw_sled(path: &std::path::Path) -> sled::Db {
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

const F32_CACHE: &str = "index-f32.cache";
const INT8_CACHE: &str = "index-int8.cache";

fn remove_caches(dir: &Path) {
    for name in [F32_CACHE, INT8_CACHE] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
            _ => {}
        }
    }
}

fn reopen(dir: &Path) -> CaseStore {
    reopen_with(dir, OpenOptions::default())
}

fn reopen_with(dir: &Path, options: OpenOptions) -> CaseStore {
    // The previous handle's sled lock is released from a background thread.
    let mut last = None;
    for _ in 0..100 {
        match CaseStore::open_with(dir, identity(DIM), options) {
            Ok(store) => return store,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("reopen kept failing: {last:?}");
}

/// Every expected case is its own nearest neighbour with both kinds, and
/// the store holds nothing else.
fn assert_serves_exactly(store: &CaseStore, expected: &[dermascope_store::Case]) {
    assert_eq!(store.len().unwrap(), expected.len());
    for case in expected {
        for kind in [ScoreKind::F32, ScoreKind::Int8] {
            let hits = store
                .search(&case.embedding, 1, &CaseFilter::any(), kind)
                .unwrap();
            assert_eq!(hits[0].id, case.id, "{kind:?}");
            assert!((hits[0].score - 1.0).abs() < 0.02, "{}", hits[0].score);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("ISIC_{i:07}")).collect()
}

#[test]
fn cases_round_trip_through_reopen_and_are_searchable() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<_> = ids(120).iter().map(|id| make_case(id, DIM)).collect();
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
        for case in &cases[..20] {
            store.insert(case).unwrap();
        }
        store.insert_batch(&cases[20..]).unwrap();
        assert_eq!(store.len().unwrap(), 120);
        assert_eq!(store.get(&cases[5].id).unwrap().as_ref(), Some(&cases[5]));
    }
    let store = reopen(dir.path());
    assert_eq!(store.open_report().cases_indexed, 120);
    assert!(store.open_report().corrupt.is_empty());
    for case in &cases {
        assert_eq!(store.get(&case.id).unwrap().as_ref(), Some(case));
        for kind in [ScoreKind::F32, ScoreKind::Int8] {
            let hits = store
                .search(&case.embedding, 3, &CaseFilter::any(), kind)
                .unwrap();
            assert_eq!(hits[0].id, case.id, "{kind:?}");
            assert!(
                (hits[0].score - 1.0).abs() < 0.02,
                "{kind:?} {}",
                hits[0].score
            );
        }
    }
    // Counts agree with the cases themselves.
    let mut by_diagnosis = BTreeMap::new();
    let mut by_source = BTreeMap::new();
    for case in &cases {
        *by_diagnosis.entry(case.diagnosis.code.clone()).or_insert(0) += 1;
        *by_source.entry(case.source).or_insert(0) += 1;
    }
    let counts = store.counts().unwrap();
    assert_eq!(counts.total, 120);
    assert_eq!(counts.by_diagnosis, by_diagnosis);
    assert_eq!(counts.by_source, by_source);
    // Iteration is in id order and yields exactly the stored cases.
    let listed = store.ids().unwrap();
    let mut expected: Vec<CaseId> = cases.iter().map(|c| c.id.clone()).collect();
    expected.sort();
    assert_eq!(listed, expected);
    let iterated: Vec<_> = store.cases().collect::<Result<_, _>>().unwrap();
    assert_eq!(iterated.len(), 120);
    assert!(iterated.iter().all(|c| cases.contains(c)));
    // Filters apply at the store level too.
    let captured = CaseFilter::any().with_sources([CaseSource::Captured]);
    let hits = store
        .search(&cases[0].embedding, 200, &captured, ScoreKind::F32)
        .unwrap();
    assert_eq!(
        hits.len(),
        by_source.get(&CaseSource::Captured).copied().unwrap_or(0)
    );
    // Removal is durable and leaves the index.
    assert!(store.remove(&cases[0].id).unwrap());
    assert!(!store.remove(&cases[0].id).unwrap());
    drop(store);
    let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
    assert!(!store.contains(&cases[0].id).unwrap());
    assert_eq!(store.get(&cases[0].id).unwrap(), None);
    let hits = store
        .search(&cases[0].embedding, 1, &CaseFilter::any(), ScoreKind::F32)
        .unwrap();
    assert_ne!(hits[0].id, cases[0].id);
    assert_eq!(store.len().unwrap(), 119);
}

#[test]
fn updating_a_case_updates_disk_and_index_and_an_insert_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
    let mut case = make_case("lesion-1", DIM);
    store.insert(&case).unwrap();
    store.insert(&make_case("lesion-2", DIM)).unwrap();
    let stored = case.clone();
    case.embedding = make_case("other", DIM).embedding;
    case.diagnosis = dermascope_store::Diagnosis::from_code("mel").unwrap();
    // An insert of a stored id is refused and changes nothing, on disk or
    // in the index; so is a batch that repeats an id.
    let refused = store.insert(&case).unwrap_err();
    assert!(
        matches!(&refused, StoreError::CaseExists { id } if id == "lesion-1"),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("update"), "{refused}");
    assert_eq!(store.get(&case.id).unwrap().as_ref(), Some(&stored));
    let twice = [make_case("lesion-3", DIM), make_case("lesion-3", DIM)];
    assert!(matches!(
        store.insert_batch(&twice),
        Err(StoreError::DuplicateInBatch { .. })
    ));
    assert!(!store.contains(&twice[0].id).unwrap());
    assert!(matches!(
        store.update(CaseWrite::from(&twice[0])),
        Err(StoreError::NoSuchCase { .. })
    ));
    // The update is the next revision; created_at and the device stay the
    // stored ones whatever the caller says.
    case.revision = 7;
    case.created_at_ms += 1000;
    assert_eq!(store.update(CaseWrite::from(&case)).unwrap(), 2);
    case.revision = 2;
    case.created_at_ms -= 1000;
    assert_eq!(store.len().unwrap(), 2);
    assert_eq!(store.get(&case.id).unwrap().as_ref(), Some(&case));
    let mel = CaseFilter::any().with_diagnoses(["mel"]);
    let hits = store
        .search(&case.embedding, 5, &mel, ScoreKind::F32)
        .unwrap();
    assert_eq!(hits[0].id, case.id);
}

#[test]
fn a_bad_case_in_a_batch_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
    let mut batch: Vec<_> = ids(3).iter().map(|id| make_case(id, DIM)).collect();
    batch[2].model_id = "another-encoder".into();
    let err = store.insert_batch(&batch).unwrap_err();
    assert!(
        matches!(err, StoreError::InvalidCase { ref id, .. } if id == "ISIC_0000002"),
        "{err}"
    );
    batch[2] = make_case("x", DIM);
    batch[2].embedding[3] = f32::NAN;
    assert!(matches!(
        store.insert_batch(&batch),
        Err(StoreError::InvalidCase { .. })
    ));
    batch[2] = make_case("y", DIM + 1);
    assert!(matches!(
        store.insert_batch(&batch),
        Err(StoreError::InvalidCase { .. })
    ));
    assert_eq!(store.len().unwrap(), 0);
    assert!(store.ids().unwrap().is_empty());
}

#[test]
fn opening_with_another_encoder_is_a_typed_error_that_says_how_to_reembed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
        store.insert(&make_case("a", DIM)).unwrap();
    }
    let other = StoreIdentity {
        model_id: "dermanet-v2".into(),
        embedding_dim: DIM,
    };
    let err = CaseStore::open(dir.path(), other).unwrap_err();
    match &err {
        StoreError::ModelMismatch {
            store_model,
            store_dim,
            encoder_model,
            ..
        } => {
            assert_eq!(store_model, MODEL);
            assert_eq!(*store_dim, DIM);
            assert_eq!(encoder_model, "dermanet-v2");
        }
        other => panic!("expected ModelMismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(MODEL) && message.contains("dermanet-v2"),
        "{message}"
    );
    assert!(
        message.contains("dermascope reembed") && message.contains("dermascope ingest"),
        "{message}"
    );
    // Same model, other dimension: also refused.
    assert!(matches!(
        CaseStore::open(dir.path(), identity(DIM * 2)),
        Err(StoreError::ModelMismatch { .. })
    ));
    // The refused opens changed nothing.
    let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
    assert_eq!(store.len().unwrap(), 1);
}

#[test]
fn other_formats_and_foreign_databases_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
        store.insert(&make_case("a", DIM)).unwrap();
    }
    {
        let db = raw_sled(dir.path());
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format_version", &99u32.to_le_bytes()).unwrap();
        db.flush().unwrap();
    }
    let err = CaseStore::open(dir.path(), identity(DIM)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::FormatMismatch {
                found: 99,
                expected: FORMAT_VERSION,
                ..
            }
        ),
        "{err:?}"
    );

    let foreign = tempfile::tempdir().unwrap();
    {
        let db = raw_sled(foreign.path());
        db.open_tree("cases").unwrap().insert("k", "v").unwrap();
        db.flush().unwrap();
    }
    let err = CaseStore::open(foreign.path(), identity(DIM)).unwrap_err();
    assert!(matches!(err, StoreError::NotACaseStore { .. }), "{err:?}");
}

#[test]
fn garbled_values_are_reported_per_case_and_the_store_still_opens() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<_> = ids(10).iter().map(|id| make_case(id, DIM)).collect();
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
        store.insert_batch(&cases).unwrap();
    }
    let garbled_record = &cases[2].id;
    let garbled_row = &cases[7].id;
    {
        let db = raw_sled(dir.path());
        let records = db.open_tree("cases").unwrap();
        let mut bytes = records
            .get(garbled_record.as_str())
            .unwrap()
            .unwrap()
            .to_vec();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5A;
        records.insert(garbled_record.as_str(), bytes).unwrap();
        let rows = db.open_tree("embeddings").unwrap();
        // A single flipped bit inside an f32 would still decode; the checksum
        // must catch it.
        let mut bytes = rows.get(garbled_row.as_str()).unwrap().unwrap().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        rows.insert(garbled_row.as_str(), bytes).unwrap();
        db.flush().unwrap();
    }
    // Raw edits bypass the write generation, as bit rot would, so the cache
    // (checksummed, written before the damage) would still be served; this
    // test is about what a scan of damaged sled values reports.
    remove_caches(dir.path());
    let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
    let report = store.open_report();
    assert!(
        matches!(report.index_source, IndexSource::Scan { .. }),
        "{:?}",
        report.index_source
    );
    assert_eq!(report.cases_indexed, 9);
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].id, garbled_row.as_str());
    assert_eq!(report.corrupt[0].tree, "embeddings");

    match store.get(garbled_record) {
        Err(StoreError::CorruptCase { id, tree, reason }) => {
            assert_eq!((id.as_str(), tree), (garbled_record.as_str(), "cases"));
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected CorruptCase, got {other:?}"),
    }
    assert!(matches!(
        store.get(garbled_row),
        Err(StoreError::CorruptCase {
            tree: "embeddings",
            ..
        })
    ));
    for case in cases
        .iter()
        .filter(|c| c.id != *garbled_record && c.id != *garbled_row)
    {
        assert_eq!(store.get(&case.id).unwrap().as_ref(), Some(case));
    }
    // The garbled row is not searchable; its record's case (intact row) is.
    let hits = store
        .search(&cases[7].embedding, 10, &CaseFilter::any(), ScoreKind::F32)
        .unwrap();
    assert!(hits.iter().all(|h| h.id != *garbled_row));
    let mut problems: Vec<_> = store
        .check_integrity()
        .unwrap()
        .into_iter()
        .map(|p| (p.id, p.tree))
        .collect();
    problems.sort();
    assert_eq!(
        problems,
        vec![
            (garbled_record.to_string(), "cases"),
            (garbled_row.to_string(), "embeddings")
        ]
    );
    // Removing and re-inserting the case repairs it (an insert alone is
    // refused: the record is still there).
    assert!(store.insert(&cases[7]).is_err());
    store.remove(&cases[7].id).unwrap();
    store.insert(&cases[7]).unwrap();
    assert_eq!(store.get(&cases[7].id).unwrap().as_ref(), Some(&cases[7]));
}

#[test]
fn a_valid_cache_is_used_and_a_missing_truncated_or_garbled_one_falls_back_to_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<_> = ids(60).iter().map(|id| make_case(id, DIM)).collect();
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
        store.insert_batch(&cases).unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(
        store.open_report().index_source,
        IndexSource::Cache { generation: 1 }
    );
    assert_serves_exactly(&store, &cases);
    drop(store);

    remove_caches(dir.path());
    let store = reopen(dir.path());
    match &store.open_report().index_source {
        IndexSource::Scan { reason } => assert!(reason.contains("no index cache"), "{reason}"),
        other => panic!("expected a scan, got {other:?}"),
    }
    assert_serves_exactly(&store, &cases);
    drop(store);
    // The scan rewrote the cache.
    assert!(dir.path().join(F32_CACHE).exists());
    assert!(dir.path().join(INT8_CACHE).exists());

    let path = dir.path().join(F32_CACHE);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let store = reopen(dir.path());
    match &store.open_report().index_source {
        IndexSource::Scan { reason } => assert!(reason.contains("checksum"), "{reason}"),
        other => panic!("expected a scan, got {other:?}"),
    }
    assert_serves_exactly(&store, &cases);
    drop(store);

    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let store = reopen(dir.path());
    assert!(
        matches!(store.open_report().index_source, IndexSource::Scan { .. }),
        "{:?}",
        store.open_report().index_source
    );
    assert_serves_exactly(&store, &cases);
    drop(store);

    std::fs::write(&path, b"not a cache").unwrap();
    let store = reopen(dir.path());
    assert!(matches!(
        store.open_report().index_source,
        IndexSource::Scan { .. }
    ));
    assert_serves_exactly(&store, &cases);
}

#[test]
fn int8_residency_reads_its_own_cache_and_refuses_f32_scoring() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<_> = ids(30).iter().map(|id| make_case(id, DIM)).collect();
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
        store.insert_batch(&cases).unwrap();
    }
    let options = OpenOptions {
        residency: Residency::Int8,
        ..OpenOptions::default()
    };
    let store = reopen_with(dir.path(), options);
    assert_eq!(
        store.open_report().index_source,
        IndexSource::Cache { generation: 1 }
    );
    assert_eq!(store.residency().unwrap(), Residency::Int8);
    let hits = store
        .search(&cases[3].embedding, 1, &CaseFilter::any(), ScoreKind::Int8)
        .unwrap();
    assert_eq!(hits[0].id, cases[3].id);
    let err = store
        .search(&cases[3].embedding, 1, &CaseFilter::any(), ScoreKind::F32)
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Index(IndexError::KindNotResident {
                requested: ScoreKind::F32,
                resident: Residency::Int8
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("Residency::Both"), "{err}");
}

#[test]
fn a_stale_cache_is_brought_up_to_date_and_never_resurrects_or_loses_cases() {
    let dir = tempfile::tempdir().unwrap();
    let old = tempfile::tempdir().unwrap();
    let mut cases: Vec<_> = ids(40).iter().map(|id| make_case(id, DIM)).collect();
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
        store.insert_batch(&cases).unwrap();
    }
    // The whole store as of generation 1, cache included.
    copy_dir(dir.path(), old.path());
    {
        // As if killed: the writes below never reach the cache.
        let options = OpenOptions {
            no_cache_on_close: true,
            ..OpenOptions::default()
        };
        let store = reopen_with(dir.path(), options);
        let added: Vec<_> = (0..10)
            .map(|i| make_case(&format!("new-{i}"), DIM))
            .collect();
        for case in &added[..4] {
            store.insert(case).unwrap();
        }
        store.insert_batch(&added[4..]).unwrap();
        for case in cases.drain(..5) {
            assert!(store.remove(&case.id).unwrap());
        }
        let mut replaced = cases[0].clone();
        replaced.embedding = make_case("replacement", DIM).embedding;
        replaced.revision = store.update(CaseWrite::from(&replaced)).unwrap();
        cases[0] = replaced;
        cases.extend(added);
    }
    // The cache is stale: generation 1, while sled is at 1 + 4 + 1 + 5 + 1.
    let store = reopen(dir.path());
    assert_eq!(
        store.open_report().index_source,
        IndexSource::CacheReplayed {
            cache_generation: 1,
            writes_replayed: 11,
            cases_reread: 16
        }
    );
    assert_serves_exactly(&store, &cases);
    let removed = make_case(&ids(40)[2], DIM);
    let hits = store
        .search(&removed.embedding, 1, &CaseFilter::any(), ScoreKind::F32)
        .unwrap();
    assert_ne!(hits[0].id, removed.id);
    drop(store);

    // The close wrote a current cache and pruned the change log, so the old
    // cache can no longer be brought up to date: it must be rescanned.
    for name in [F32_CACHE, INT8_CACHE] {
        std::fs::copy(old.path().join(name), dir.path().join(name)).unwrap();
    }
    let store = reopen(dir.path());
    match &store.open_report().index_source {
        IndexSource::Scan { reason } => assert!(reason.contains("change log"), "{reason}"),
        other => panic!("expected a scan, got {other:?}"),
    }
    assert_serves_exactly(&store, &cases);
    drop(store);

    // A cache newer than the database (the store restored from the older
    // copy, the cache not) would hold cases sled no longer has.
    for name in [F32_CACHE, INT8_CACHE] {
        std::fs::copy(dir.path().join(name), old.path().join(name)).unwrap();
    }
    let store = reopen(old.path());
    match &store.open_report().index_source {
        IndexSource::Scan { reason } => assert!(reason.contains("newer"), "{reason}"),
        other => panic!("expected a scan, got {other:?}"),
    }
    let original: Vec<_> = ids(40).iter().map(|id| make_case(id, DIM)).collect();
    assert_serves_exactly(&store, &original);
}

#[test]
fn a_format_1_store_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let case = make_case("a", DIM);
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
        store.insert(&case).unwrap();
    }
    remove_caches(dir.path());
    {
        let db = raw_sled(dir.path());
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format_version", &1u32.to_le_bytes()).unwrap();
        meta.remove("generation").unwrap();
        db.open_tree("changes").unwrap().clear().unwrap();
        db.flush().unwrap();
    }
    let store = reopen(dir.path());
    assert_serves_exactly(&store, std::slice::from_ref(&case));
    store.insert(&make_case("b", DIM)).unwrap();
    drop(store);
    let db = raw_sled(dir.path());
    let meta = db.open_tree("meta").unwrap();
    assert_eq!(
        meta.get("format_version").unwrap().unwrap().as_ref(),
        &FORMAT_VERSION.to_le_bytes()
    );
    assert_eq!(
        meta.get("generation").unwrap().unwrap().as_ref(),
        &1u64.to_le_bytes()
    );
}

#[test]
fn captured_cases_wait_in_the_outbox_across_reopens_until_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let mut captured = common::make_case("capture-1", DIM);
    captured.source = CaseSource::Captured;
    let mut reference = common::make_case("ref-1", DIM);
    reference.source = CaseSource::Reference;
    let mut second = common::make_case("capture-2", DIM);
    second.source = CaseSource::Captured;
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
        store.insert_batch(&[captured.clone(), reference]).unwrap();
        store.insert(&second).unwrap();
        assert_eq!(store.pending_upload_count(), 2);
    }
    let store = reopen(dir.path());
    let pending = |id: &CaseId, revision| PendingUpload {
        id: id.clone(),
        revision,
    };
    assert_eq!(
        store.pending_uploads().unwrap(),
        [pending(&captured.id, 1), pending(&second.id, 1)]
    );
    store.mark_uploaded(&[pending(&captured.id, 1)]).unwrap();
    store.remove(&second.id).unwrap();
    assert_eq!(store.pending_upload_count(), 0);
    drop(store);
    assert!(reopen(dir.path()).pending_uploads().unwrap().is_empty());
}

/// A capture re-labelled while its upload was in flight: the service's
/// acknowledgement of revision 1 must not clear revision 2.
#[test]
fn an_acknowledged_old_revision_leaves_the_newer_one_pending() {
    let dir = tempfile::tempdir().unwrap();
    let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
    let mut capture = make_case("0193a3c0-0000-7000-8000-000000000001", DIM);
    capture.source = CaseSource::Captured;
    store.insert(&capture).unwrap();
    let in_flight = store.pending_uploads().unwrap();
    assert_eq!(in_flight[0].revision, 1);
    capture.diagnosis = dermascope_store::Diagnosis::from_code("mel").unwrap();
    capture.label_confirmed = true;
    assert_eq!(store.update(CaseWrite::from(&capture)).unwrap(), 2);
    assert_eq!(store.mark_uploaded(&in_flight).unwrap(), 0);
    let pending = store.pending_uploads().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].revision, 2);
    drop(store);
    let store = reopen(dir.path());
    assert_eq!(store.get(&capture.id).unwrap().unwrap().revision, 2);
    assert_eq!(store.mark_uploaded(&pending).unwrap(), 1);
    assert_eq!(store.pending_upload_count(), 0);
}

#[test]
fn generated_case_ids_are_unique_uuid_v7() {
    let ids: std::collections::BTreeSet<String> = (0..10_000)
        .map(|_| CaseId::generate().as_str().to_owned())
        .collect();
    assert_eq!(ids.len(), 10_000);
    for id in ids.iter().take(3) {
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(&id[14..15], "7", "version nibble of {id}");
    }
}

#[test]
fn originals_are_kept_with_the_case_bounded_and_removed_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
    let photo = common::jpeg(640, 480);
    let original = OriginalPhoto::from_jpeg(photo.clone()).unwrap();
    assert_eq!((original.width(), original.height()), (640, 480));
    let with = make_case("with-original", DIM);
    let without = make_case("without-original", DIM);
    store
        .insert_with_originals(&[
            CaseWrite {
                case: &with,
                original: Some(&original),
            },
            CaseWrite::from(&without),
        ])
        .unwrap();
    drop(store);
    let store = reopen(dir.path());
    assert_eq!(store.original(&with.id).unwrap().unwrap().jpeg(), photo);
    assert!(store.original(&without.id).unwrap().is_none());
    // An update without a photograph keeps the stored one.
    store.update(CaseWrite::from(&with)).unwrap();
    assert!(store.has_original(&with.id).unwrap());
    store.remove(&with.id).unwrap();
    assert!(!store.has_original(&with.id).unwrap());

    // Refused before anything is stored: not a JPEG, or over the pixel cap.
    assert!(matches!(
        OriginalPhoto::from_jpeg(b"GIF89a not a jpeg".to_vec()),
        Err(CaseError::OriginalNotJpeg { .. })
    ));
    let huge = common::jpeg_header_claiming(5000, 4000);
    assert!(matches!(
        OriginalPhoto::from_jpeg(huge),
        Err(CaseError::OriginalTooLarge {
            width: 5000,
            height: 4000,
            ..
        })
    ));
}

/// A store written by the format-2 build (see tests/fixtures/README.md)
/// opens, migrates in place, and keeps every case, its outbox entry and
/// its search results; old ids stay valid and new writes follow the new rules.
#[test]
fn a_format_2_store_written_by_the_previous_build_migrates() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format2-store");
    copy_dir(&fixture, dir.path());
    std::fs::create_dir_all(dir.path().join("blobs")).unwrap();
    let identity = StoreIdentity {
        model_id: "fixture-encoder-v1".into(),
        embedding_dim: 8,
    };
    let embedding = |seed: f32| {
        let e: Vec<f32> = (0..8).map(|i| ((i as f32 + seed) * 0.7).sin()).collect();
        let n = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        e.into_iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    let store = CaseStore::open(dir.path(), identity.clone()).unwrap();
    let ids: Vec<String> = store
        .ids()
        .unwrap()
        .iter()
        .map(|id| id.as_str().to_owned())
        .collect();
    assert_eq!(
        ids,
        [
            "ISIC_0000001",
            "ISIC_0000002",
            "capture-1764000000000",
            "capture-1764000000500"
        ]
    );
    for (seed, id) in ids.iter().enumerate() {
        let case = store
            .get(&CaseId::new(id.clone()).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (case.revision, case.device_id.as_deref()),
            (1, None),
            "{id}"
        );
        assert_eq!(case.embedding, embedding(seed as f32 + 1.0), "{id}");
        assert_eq!(case.metadata.lesion_id, Some(format!("L-{id}")));
    }
    let hits = store
        .search(&embedding(2.0), 1, &CaseFilter::any(), ScoreKind::F32)
        .unwrap();
    assert_eq!(hits[0].id.as_str(), "ISIC_0000002");
    // The second capture was never uploaded: pending at its first revision.
    let second = CaseId::new("capture-1764000000500").unwrap();
    assert_eq!(
        store.pending_uploads().unwrap(),
        [PendingUpload {
            id: second.clone(),
            revision: 1
        }]
    );
    // New rules: an old id is refused by an insert, updated as revision 2.
    let mut relabelled = store.get(&second).unwrap().unwrap();
    assert!(matches!(
        store.insert(&relabelled),
        Err(StoreError::CaseExists { .. })
    ));
    relabelled.diagnosis = dermascope_store::Diagnosis::from_code("mel").unwrap();
    assert_eq!(store.update(CaseWrite::from(&relabelled)).unwrap(), 2);
    drop(store);
    let db = raw_sled(dir.path());
    assert_eq!(
        db.open_tree("meta")
            .unwrap()
            .get("format_version")
            .unwrap()
            .unwrap()
            .as_ref(),
        &FORMAT_VERSION.to_le_bytes()
    );
    drop(db);
    let store = (0..100)
        .find_map(|_| {
            let opened = CaseStore::open(dir.path(), identity.clone()).ok();
            if opened.is_none() {
                // sled releases the previous handle's lock from a thread.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            opened
        })
        .expect("reopening the migrated store");
    assert_eq!(store.pending_uploads().unwrap()[0].revision, 2);
    assert_eq!(store.len().unwrap(), 4);
}

/// A store held open elsewhere is refused with a message that names what
/// to stop, after a bounded wait (not forever, not a raw lock error).
#[test]
fn a_store_in_use_by_another_process_is_refused_clearly() {
    // sled's lock is per process, so the holder must be another process:
    // this test binary again, running this test in holder mode.
    if let Some(dir) = std::env::var_os("HOLD_STORE") {
        let _store = CaseStore::open(&dir, identity(DIM)).unwrap();
        println!("holding");
        std::thread::sleep(std::time::Duration::from_secs(120));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    drop(CaseStore::open(dir.path(), identity(DIM)).unwrap());
    let mut child = dermascope_testkit::command(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_store_in_use_by_another_process_is_refused_clearly",
            "--nocapture",
        ])
        .env("HOLD_STORE", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("holding") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() > 0,
            "the holder exited before holding the store"
        );
    }
    let refused = CaseStore::open(dir.path(), identity(DIM)).unwrap_err();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(matches!(refused, StoreError::InUse { .. }), "{refused:?}");
    assert!(refused.to_string().contains("dermascope run"), "{refused}");
}
