//! `reembed_into` on real stores and the real encoder: the cases of one
//! encoder's store are added, re-embedded, to another encoder's store,
//! resumably, while the source store is left exactly as it was (the store
//! a rollback goes back to).

use std::ops::ControlFlow;
use std::path::Path;

use dermascope_encoder::{decode_rgb, DecodeBudget, Encoder, EncoderOptions};
use dermascope_library::reembed::{reembed_into, IntoOutcome, ReembedOptions};
use dermascope_library::{original_from_rgb, ReembedError};
use dermascope_store::{
    Case, CaseId, CaseMetadata, CaseSource, CaseStore, CaseWrite, Diagnosis, StoreIdentity,
};
use image::{Rgb, RgbImage};

const OLD_DIM: usize = 4;
const CASES: usize = 20;
const WITH_ORIGINAL: usize = 17;

fn old_identity() -> StoreIdentity {
    StoreIdentity {
        model_id: "old-encoder-v1".into(),
        embedding_dim: OLD_DIM,
    }
}

fn photograph(seed: u32) -> RgbImage {
    let (cx, cy, r) = (100.0, 75.0, 30.0 + (seed % 7) as f32 * 4.0);
    let hue = [(60 + seed * 17 % 120) as u8, (30 + seed * 7 % 60) as u8, 40];
    RgbImage::from_fn(200, 150, |x, y| {
        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
        if d < r {
            Rgb(hue)
        } else {
            Rgb([225, 170 + (x % 9) as u8, 150 + (y % 7) as u8])
        }
    })
}

fn case(i: usize, identity: &StoreIdentity) -> Case {
    let mut embedding = vec![0.1f32; identity.embedding_dim];
    embedding[i % identity.embedding_dim] = 1.0;
    let norm = embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
    Case {
        id: CaseId::generate(),
        embedding: embedding.iter().map(|x| x / norm).collect(),
        diagnosis: Diagnosis::from_code(["nv", "mel", "bkl"][i % 3]).unwrap(),
        source: if i.is_multiple_of(2) {
            CaseSource::Captured
        } else {
            CaseSource::Reference
        },
        metadata: CaseMetadata {
            age_years: Some(30 + i as u16),
            lesion_id: Some(format!("L{i}")),
            ..CaseMetadata::default()
        },
        thumbnail_jpeg: vec![0xFF, 0xD8, 0xFF, 0xD9],
        model_id: identity.model_id.clone(),
        created_at_ms: 1_000 + i as u64,
        updated_at_ms: 1_000 + i as u64,
        label_confirmed: true,
        device_id: Some("device-a".into()),
        revision: 1 + (i % 3) as u64,
    }
}

/// CASES cases of the old encoder; the last three have no original.
fn old_library(dir: &Path) -> Vec<Case> {
    let store = CaseStore::open(dir, old_identity()).unwrap();
    let cases: Vec<Case> = (0..CASES).map(|i| case(i, &old_identity())).collect();
    let originals: Vec<_> = (0..CASES)
        .map(|i| original_from_rgb(&photograph(i as u32)).unwrap())
        .collect();
    let writes: Vec<CaseWrite<'_>> = cases
        .iter()
        .zip(&originals)
        .enumerate()
        .map(|(i, (case, original))| CaseWrite {
            case,
            original: (i < WITH_ORIGINAL).then_some(original),
        })
        .collect();
    store.insert_with_originals(&writes).unwrap();
    cases
}

/// Every case of a store with its original's bytes, sorted by id: what
/// "left exactly as it was" compares.
fn snapshot(dir: &Path, identity: &StoreIdentity) -> Vec<(Case, Option<Vec<u8>>)> {
    let store = CaseStore::open(dir, identity.clone()).unwrap();
    let mut ids = store.ids().unwrap();
    ids.sort();
    ids.iter()
        .map(|id| {
            (
                store.get(id).unwrap().unwrap(),
                store.original(id).unwrap().map(|o| o.into_jpeg()),
            )
        })
        .collect()
}

fn encoder() -> Encoder {
    Encoder::load(
        &dermascope_testkit::bundle_dir(),
        &EncoderOptions::default(),
    )
    .expect("loading the default encoder")
}

fn go_on(_: dermascope_library::ReembedProgress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

#[test]
fn cases_are_added_reembedded_resumably_and_the_source_is_untouched() {
    let encoder = encoder();
    let new_identity = StoreIdentity {
        model_id: encoder.model_id().into(),
        embedding_dim: encoder.dim(),
    };
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("cases");
    let target = root.path().join("cases.new");
    let cases = old_library(&source);
    let before = snapshot(&source, &old_identity());
    let batch = ReembedOptions {
        batch: 4,
        ..ReembedOptions::default()
    };

    // A dry run counts and creates nothing.
    let dry = reembed_into(
        &source,
        &target,
        &encoder,
        ReembedOptions {
            dry_run: true,
            ..batch
        },
        go_on,
    )
    .unwrap();
    assert_eq!(dry.outcome, IntoOutcome::DryRun);
    assert_eq!(
        (dry.cases, dry.reembedded, dry.without_original.len()),
        (CASES, WITH_ORIGINAL, CASES - WITH_ORIGINAL)
    );
    assert!(!target.exists());

    // Stopped after the second flushed batch, as a kill there would.
    let mut flushes = 0;
    let first = reembed_into(&source, &target, &encoder, batch, |_| {
        flushes += 1;
        if flushes == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(first.outcome, IntoOutcome::Interrupted);
    assert_eq!(first.reembedded, 8);

    let second = reembed_into(&source, &target, &encoder, batch, go_on).unwrap();
    assert_eq!(second.outcome, IntoOutcome::Complete);
    assert_eq!(second.present, 8);
    assert_eq!(second.reembedded, WITH_ORIGINAL - 8);
    let mut missing = second.without_original.clone();
    missing.sort();
    let mut expected: Vec<_> = cases[WITH_ORIGINAL..]
        .iter()
        .map(|c| c.id.clone())
        .collect();
    expected.sort();
    assert_eq!(missing, expected);

    // The target holds each case with an original once, embedded by the
    // new encoder from that original, everything else carried over.
    let store = CaseStore::open(&target, new_identity.clone()).unwrap();
    assert_eq!(store.len().unwrap(), WITH_ORIGINAL);
    for old in &cases[..WITH_ORIGINAL] {
        let new = store.get(&old.id).unwrap().expect("re-embedded case");
        let original = store.original(&old.id).unwrap().expect("original kept");
        let photo = decode_rgb(original.jpeg(), DecodeBudget::default()).unwrap();
        assert_eq!(
            new.embedding,
            encoder.embed_rgb(&photo).unwrap().into_values()
        );
        assert_eq!(new.model_id, encoder.model_id());
        assert_eq!(
            (
                &new.diagnosis,
                &new.metadata,
                new.revision,
                new.created_at_ms
            ),
            (
                &old.diagnosis,
                &old.metadata,
                old.revision,
                old.created_at_ms
            )
        );
    }

    // A case captured under the new encoder stays; a rerun adds nothing.
    let captured = case(99, &new_identity);
    store.insert(&captured).unwrap();
    drop(store);
    let third = reembed_into(&source, &target, &encoder, batch, go_on).unwrap();
    assert_eq!(
        (third.outcome, third.reembedded, third.present),
        (IntoOutcome::Complete, 0, WITH_ORIGINAL)
    );
    let store = CaseStore::open(&target, new_identity).unwrap();
    assert_eq!(store.len().unwrap(), WITH_ORIGINAL + 1);
    assert!(store.contains(&captured.id).unwrap());
    drop(store);

    // The source store: the same identity, cases and originals as before.
    assert_eq!(
        CaseStore::identity_at(&source).unwrap(),
        Some(old_identity())
    );
    assert_eq!(snapshot(&source, &old_identity()), before);
}

#[test]
fn a_missing_source_or_the_same_store_is_refused() {
    let encoder = encoder();
    let root = tempfile::tempdir().unwrap();
    let absent = root.path().join("absent");
    let target = root.path().join("target");
    match reembed_into(&absent, &target, &encoder, ReembedOptions::default(), go_on) {
        Err(ReembedError::NoStore { path }) => assert_eq!(path, absent),
        other => panic!("expected NoStore, got {other:?}"),
    }
    assert!(!target.exists());
    let source = root.path().join("cases");
    old_library(&source);
    match reembed_into(&source, &source, &encoder, ReembedOptions::default(), go_on) {
        Err(ReembedError::SameStore { path }) => assert_eq!(path, source),
        other => panic!("expected SameStore, got {other:?}"),
    }
    assert_eq!(
        CaseStore::identity_at(&source).unwrap(),
        Some(old_identity())
    );
}
