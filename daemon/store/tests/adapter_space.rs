//! The adapter space: fresh rows are searchable, stale ones are listed for
//! recomputation, and a recomputation survives a reopen.

mod common;

use common::{identity, make_case};
use dermascope_store::{CaseFilter, CaseId, CaseStore, CaseWrite, StoreError};

const DIM: usize = 32;
const HIDDEN: usize = 8;

/// A stand-in for an adapter: a deterministic function of the embedding,
/// L2-normalised like the real adapter's output (the index ranks by inner
/// product).
fn project(embedding: &[f32], salt: f32) -> Vec<f32> {
    let v: Vec<f32> = (0..HIDDEN)
        .map(|j| embedding[j] + embedding[j + HIDDEN] * salt)
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn reopen(dir: &std::path::Path) -> CaseStore {
    let mut last = None;
    for _ in 0..100 {
        match CaseStore::open(dir, identity(DIM)) {
            Ok(store) => return store,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("reopen kept failing: {last:?}");
}

fn fill(store: &CaseStore, adapter: &str, salt: f32, ids: &[CaseId]) {
    let rows: Vec<(CaseId, Vec<f32>)> = ids
        .iter()
        .map(|id| {
            let case = store.get(id).unwrap().unwrap();
            (id.clone(), project(&case.embedding, salt))
        })
        .collect();
    assert_eq!(store.put_adapter_embeddings(adapter, &rows).unwrap(), 0);
}

#[test]
fn stale_rows_are_recomputed_and_progress_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<_> = (0..40)
        .map(|i| make_case(&format!("case-{i:02}"), DIM))
        .collect();
    {
        let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
        store.insert_batch(&cases).unwrap();
        assert!(matches!(
            store.search_adapter_space(&[0.0; HIDDEN], 3, &CaseFilter::any()),
            Err(StoreError::NoAdapterSpace)
        ));
        let status = store.attach_adapter_space("adapter-a", HIDDEN).unwrap();
        assert_eq!((status.indexed, status.missing.len()), (0, 40));
        // Half done, then the process "dies".
        fill(&store, "adapter-a", 0.5, &status.missing[..20]);
        assert_eq!(store.adapter_space_missing().unwrap().len(), 20);
    }
    let store = reopen(dir.path());
    let status = store.attach_adapter_space("adapter-a", HIDDEN).unwrap();
    assert_eq!((status.indexed, status.missing.len()), (20, 20));
    fill(&store, "adapter-a", 0.5, &status.missing);
    assert!(store.adapter_space_missing().unwrap().is_empty());

    // Every case is its own nearest neighbour in the adapter space.
    for case in &cases {
        let hits = store
            .search_adapter_space(&project(&case.embedding, 0.5), 1, &CaseFilter::any())
            .unwrap();
        assert_eq!(hits[0].id, case.id);
    }

    // Updating a case makes its row stale at once and after a reopen.
    let mut replaced = make_case("case-03", DIM);
    replaced.embedding = cases[7].embedding.clone();
    store.update(CaseWrite::from(&replaced)).unwrap();
    assert_eq!(
        store.adapter_space_missing().unwrap(),
        [replaced.id.clone()]
    );
    drop(store);
    let store = reopen(dir.path());
    let status = store.attach_adapter_space("adapter-a", HIDDEN).unwrap();
    assert_eq!(status.missing, [replaced.id.clone()]);

    // A new adapter starts from nothing; the old rows do not leak into it.
    let status = store.attach_adapter_space("adapter-b", HIDDEN).unwrap();
    assert_eq!((status.indexed, status.missing.len()), (0, 40));

    // A removed case's row is dropped when a space is next attached.
    store.remove(&cases[0].id).unwrap();
    let status = store.attach_adapter_space("adapter-a", HIDDEN).unwrap();
    assert_eq!(status.indexed, 38);
    assert_eq!(status.missing, [replaced.id.clone()]);
}

#[test]
fn rows_for_unknown_cases_are_skipped_and_bad_vectors_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = CaseStore::open(dir.path(), identity(DIM)).unwrap();
    let case = make_case("only", DIM);
    store.insert(&case).unwrap();
    store.attach_adapter_space("adapter-a", HIDDEN).unwrap();
    let ghost = CaseId::new("ghost").unwrap();
    let skipped = store
        .put_adapter_embeddings(
            "adapter-a",
            &[
                (ghost, vec![0.1; HIDDEN]),
                (case.id.clone(), vec![0.2; HIDDEN]),
            ],
        )
        .unwrap();
    assert_eq!(skipped, 1);
    assert!(store.adapter_space_missing().unwrap().is_empty());
    let err = store
        .put_adapter_embeddings("adapter-a", &[(case.id.clone(), vec![f32::NAN; HIDDEN])])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::InvalidAdapterEmbedding { .. }),
        "{err}"
    );
}
