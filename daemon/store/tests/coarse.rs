//! The coarse search pass through the store: its sign bits survive the
//! index cache and its replay, writes reach it, and a cache written before
//! the bits existed is rebuilt rather than misread.

mod common;

use std::path::Path;

use common::{identity, make_case};
use dermascope_store::{
    CaseFilter, CaseId, CaseStore, CaseWrite, IndexSource, OpenOptions, Residency, ScoreKind,
    SearchHit, SearchStrategy, StoreIdentity,
};

const DIM: usize = 64;
const COARSE: SearchStrategy = SearchStrategy::Coarse { candidates: 40 };

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("ISIC_{i:07}")).collect()
}

fn open(dir: &Path, residency: Residency, no_cache_on_close: bool) -> CaseStore {
    let options = OpenOptions {
        residency,
        no_cache_on_close,
    };
    CaseStore::open_with(dir, identity(DIM), options).unwrap()
}

fn coarse_hits(store: &CaseStore, kind: ScoreKind, queries: &[Vec<f32>]) -> Vec<Vec<SearchHit>> {
    store.set_search_strategy(COARSE).unwrap();
    queries
        .iter()
        .map(|q| store.search(q, 5, &CaseFilter::any(), kind).unwrap())
        .collect()
}

/// After a clean close the next open reads the bits from the cache (no
/// scan), and its coarse results are the same as before the close, for
/// both residencies the cache files serve.
#[test]
fn coarse_results_are_the_same_after_a_reopen_from_the_cache() {
    for (residency, kind) in [
        (Residency::Int8, ScoreKind::Int8),
        (Residency::Both, ScoreKind::F32),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<_> = ids(600).iter().map(|id| make_case(id, DIM)).collect();
        let queries: Vec<Vec<f32>> = cases
            .iter()
            .step_by(37)
            .map(|c| c.embedding.clone())
            .collect();
        let store = open(dir.path(), residency, false);
        store.insert_batch(&cases).unwrap();
        let before = coarse_hits(&store, kind, &queries);
        // The query's own case is its best match in every one.
        for (hits, case) in before.iter().zip(cases.iter().step_by(37)) {
            assert_eq!(hits[0].id, case.id, "{residency:?}");
        }
        drop(store);
        let store = open(dir.path(), residency, false);
        assert!(
            matches!(store.open_report().index_source, IndexSource::Cache { .. }),
            "{residency:?}: {:?}",
            store.open_report().index_source
        );
        assert_eq!(coarse_hits(&store, kind, &queries), before, "{residency:?}");
    }
}

/// Writes made after the cache was written reach the coarse pass after a
/// replay at open, as they reach the exact scan: an updated embedding is
/// found where it now is, a removed case is gone.
#[test]
fn updates_and_removals_replayed_at_open_reach_the_coarse_pass() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<_> = ids(400).iter().map(|id| make_case(id, DIM)).collect();
    let store = open(dir.path(), Residency::Int8, false);
    store.insert_batch(&cases).unwrap();
    drop(store);
    let store = open(dir.path(), Residency::Int8, true);
    let mut moved = cases[7].clone();
    moved.embedding = cases[300].embedding.iter().map(|x| x * 1.01).collect();
    store.update(CaseWrite::from(&moved)).unwrap();
    assert!(store.remove(&cases[20].id).unwrap());
    drop(store);

    let store = open(dir.path(), Residency::Int8, false);
    assert!(
        matches!(
            store.open_report().index_source,
            IndexSource::CacheReplayed { .. }
        ),
        "{:?}",
        store.open_report().index_source
    );
    store.set_search_strategy(COARSE).unwrap();
    let any = CaseFilter::any();
    let top = |q: &[f32]| store.search(q, 5, &any, ScoreKind::Int8).unwrap();
    assert_eq!(top(&cases[300].embedding)[0].id, cases[7].id);
    assert!(top(&cases[7].embedding).iter().all(|h| h.id != cases[7].id));
    assert!(top(&cases[20].embedding)
        .iter()
        .all(|h| h.id != cases[20].id));
    // Every row's bits moved with it (the removal put the last row in the
    // removed one's place): each remaining case is its own best match (but
    // case 300, whose embedding case 7 now has, scaled up).
    let changed = [&cases[7].id, &cases[20].id, &cases[300].id];
    for case in cases.iter().filter(|c| !changed.contains(&&c.id)) {
        assert_eq!(top(&case.embedding)[0].id, case.id);
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

/// The format-2 fixture store (tests/fixtures/README.md) holds index caches
/// of cache format 1, written by the build before the sign bits: their
/// sections have other sizes, so reading one as format 2 would misplace
/// every row. Open must refuse them by their format, rebuild the index
/// from sled (cases and search results intact) and write a format-2 cache
/// that the next open uses.
#[test]
fn a_cache_written_before_the_sign_bits_is_rebuilt_not_misread() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format2-store");
    let old_cache = std::fs::read(fixture.join("index-int8.cache")).unwrap();
    assert_eq!(
        &old_cache[..8],
        b"DSIDXC\x00\x01",
        "the fixture's cache is format 1"
    );
    let identity = StoreIdentity {
        model_id: "fixture-encoder-v1".into(),
        embedding_dim: 8,
    };
    for residency in [Residency::Int8, Residency::Both] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&fixture, dir.path());
        std::fs::create_dir_all(dir.path().join("blobs")).unwrap();
        let options = OpenOptions {
            residency,
            ..OpenOptions::default()
        };
        let store = CaseStore::open_with(dir.path(), identity.clone(), options).unwrap();
        match &store.open_report().index_source {
            IndexSource::Scan { reason } => {
                assert!(reason.contains("cache format 1"), "{residency:?}: {reason}")
            }
            other => panic!("{residency:?}: an old cache was used: {other:?}"),
        }
        assert_eq!(store.len().unwrap(), 4);
        let embedding = |seed: f32| {
            let e: Vec<f32> = (0..8).map(|i| ((i as f32 + seed) * 0.7).sin()).collect();
            let n = e.iter().map(|x| x * x).sum::<f32>().sqrt();
            e.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let kind = if residency == Residency::Int8 {
            ScoreKind::Int8
        } else {
            ScoreKind::F32
        };
        for (seed, id) in [
            (1.0, "ISIC_0000001"),
            (2.0, "ISIC_0000002"),
            (3.0, "capture-1764000000000"),
        ] {
            for strategy in [
                SearchStrategy::Exact,
                SearchStrategy::Coarse { candidates: 2 },
            ] {
                store.set_search_strategy(strategy).unwrap();
                let hits = store
                    .search(&embedding(seed), 1, &CaseFilter::any(), kind)
                    .unwrap();
                assert_eq!(hits[0].id, CaseId::new(id).unwrap(), "{strategy:?}");
            }
        }
        drop(store);
        let rewritten = std::fs::read(dir.path().join("index-int8.cache")).unwrap();
        assert_eq!(&rewritten[..8], b"DSIDXC\x00\x02");
        let store = CaseStore::open_with(dir.path(), identity.clone(), options).unwrap();
        assert!(
            matches!(store.open_report().index_source, IndexSource::Cache { .. }),
            "{:?}",
            store.open_report().index_source
        );
    }
}
