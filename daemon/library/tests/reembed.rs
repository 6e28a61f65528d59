//! `reembed` on a real store and the real encoder: a library of another
//! encoder moves to the default one, interrupted and resumed, and switched
//! in one step with nothing dropped silently.

use std::ops::ControlFlow;
use std::path::Path;

use dermascope_encoder::{decode_rgb, DecodeBudget, Encoder, EncoderOptions};
use dermascope_library::reembed::{staging_dir, ReembedOptions};
use dermascope_library::{original_from_rgb, reembed, ReembedOutcome};
use dermascope_store::{
    Case, CaseFilter, CaseId, CaseMetadata, CaseSource, CaseStore, CaseWrite, Diagnosis, ScoreKind,
    StoreIdentity,
};
use image::{Rgb, RgbImage};

const OLD_DIM: usize = 4;

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

fn old_case(i: usize) -> Case {
    let mut embedding = [0.1f32; OLD_DIM];
    embedding[i % OLD_DIM] = 1.0;
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
        model_id: old_identity().model_id,
        created_at_ms: 1_000 + i as u64,
        updated_at_ms: 1_000 + i as u64,
        label_confirmed: true,
        device_id: Some("device-a".into()),
        revision: 1 + (i % 3) as u64,
    }
}

/// 20 cases of the old encoder; the last 3 have no original photograph.
fn old_library(dir: &Path) -> Vec<Case> {
    let store = CaseStore::open(dir, old_identity()).unwrap();
    let cases: Vec<Case> = (0..20).map(old_case).collect();
    let originals: Vec<_> = (0..20)
        .map(|i| original_from_rgb(&photograph(i as u32)).unwrap())
        .collect();
    let writes: Vec<CaseWrite<'_>> = cases
        .iter()
        .zip(&originals)
        .enumerate()
        .map(|(i, (case, original))| CaseWrite {
            case,
            original: (i < 17).then_some(original),
        })
        .collect();
    store.insert_with_originals(&writes).unwrap();
    cases
}

fn open_when_free(dir: &Path, identity: StoreIdentity) -> CaseStore {
    let mut last = None;
    for _ in 0..100 {
        match CaseStore::open(dir, identity.clone()) {
            Ok(store) => return store,
            // sled releases the previous handle's lock from a thread.
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("store at {} never opened: {last:?}", dir.display());
}

#[test]
fn a_library_moves_to_another_encoder_resumably_and_in_one_switch() {
    let encoder = Encoder::load(
        &dermascope_testkit::bundle_dir(),
        &EncoderOptions::default(),
    )
    .expect("loading the default encoder");
    let new_identity = StoreIdentity {
        model_id: encoder.model_id().into(),
        embedding_dim: encoder.dim(),
    };
    let root = tempfile::tempdir().unwrap();
    let library = root.path().join("cases");
    let cases = old_library(&library);

    // A dry run counts and writes nothing.
    let dry = reembed(
        &library,
        &encoder,
        ReembedOptions {
            dry_run: true,
            ..ReembedOptions::default()
        },
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(dry.outcome, ReembedOutcome::DryRun);
    assert_eq!((dry.cases, dry.without_original.len()), (20, 3));
    assert!(!staging_dir(&library).exists());

    // Stopped after the first flushed batch, as a kill there would: the
    // library is untouched and still of the old encoder.
    let mut calls = Vec::new();
    let first = reembed(&library, &encoder, ReembedOptions::default(), |p| {
        calls.push(p);
        ControlFlow::Break(())
    })
    .unwrap();
    assert_eq!(first.outcome, ReembedOutcome::Interrupted);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].total, 20);
    assert_eq!(
        CaseStore::identity_at(&library).unwrap(),
        Some(old_identity())
    );

    let second = reembed(&library, &encoder, ReembedOptions::default(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(second.outcome, ReembedOutcome::Switched);
    assert_eq!(second.resumed, calls[0].done);
    assert!(second.resumed > 0 && second.resumed < 17);
    assert_eq!(second.reembedded + second.resumed, 17);
    let mut missing: Vec<_> = second.without_original.clone();
    missing.sort();
    let mut expected_missing: Vec<_> = cases[17..].iter().map(|c| c.id.clone()).collect();
    expected_missing.sort();
    assert_eq!(missing, expected_missing);
    assert!(second.unreadable.is_empty());
    let previous = second.previous.clone().expect("the old store is kept");
    assert!(!staging_dir(&library).exists());

    // The library is the new encoder's: every case with an original, with
    // the embedding of its original, everything else carried over.
    assert_eq!(
        CaseStore::identity_at(&library).unwrap(),
        Some(new_identity.clone())
    );
    let store = open_when_free(&library, new_identity.clone());
    assert_eq!(store.len().unwrap(), 17);
    for (i, old) in cases.iter().enumerate().take(17) {
        let new = store.get(&old.id).unwrap().expect("re-embedded case");
        let original = store.original(&old.id).unwrap().expect("original kept");
        let photo = decode_rgb(original.jpeg(), DecodeBudget::default()).unwrap();
        let expected = encoder.embed_rgb(&photo).unwrap().into_values();
        assert_eq!(new.embedding, expected, "case {i}");
        assert_eq!(new.model_id, encoder.model_id());
        assert_eq!(
            (
                &new.diagnosis,
                new.source,
                &new.metadata,
                new.revision,
                &new.device_id,
                new.created_at_ms
            ),
            (
                &old.diagnosis,
                old.source,
                &old.metadata,
                old.revision,
                &old.device_id,
                old.created_at_ms
            )
        );
        let hits = store
            .search(&expected, 1, &CaseFilter::any(), ScoreKind::F32)
            .unwrap();
        assert_eq!(hits[0].id, old.id);
    }
    drop(store);
    // The old store, with all 20 cases, is kept beside it.
    let kept = open_when_free(&previous, old_identity());
    assert_eq!(kept.len().unwrap(), 20);
    drop(kept);

    // A kill after the swap but before the old store was renamed leaves it
    // at the staging path: the next run keeps it and changes nothing else.
    std::fs::rename(&previous, staging_dir(&library)).unwrap();
    let third = reembed(&library, &encoder, ReembedOptions::default(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(third.outcome, ReembedOutcome::AlreadyCurrent);
    assert_eq!(third.previous.as_deref(), Some(previous.as_path()));
    assert!(!staging_dir(&library).exists());
    assert_eq!(open_when_free(&library, new_identity).len().unwrap(), 17);
}

#[test]
fn no_store_is_a_clear_error() {
    let encoder = Encoder::load(
        &dermascope_testkit::bundle_dir(),
        &EncoderOptions::default(),
    )
    .expect("loading the default encoder");
    let root = tempfile::tempdir().unwrap();
    let error = reembed(
        &root.path().join("absent"),
        &encoder,
        ReembedOptions::default(),
        |_| ControlFlow::Continue(()),
    )
    .unwrap_err();
    assert!(error.to_string().contains("no case store"), "{error}");
}
