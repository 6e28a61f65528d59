//! Ingest through the encoder's batch plan, on real dermoscopy and the real
//! bundle: every stored embedding is the one-image path's, a bad photograph
//! refuses only its row, and a run stopped after its first flush is
//! finished by the next.

use std::ops::ControlFlow;
use std::path::Path;

use dermascope_encoder::{decode_rgb, DecodeBudget, Encoder, EncoderOptions, VariantChoice};
use dermascope_library::{ingest, ingest_in_batches, parse_labels, IngestOptions, IngestProgress};
use dermascope_store::{CaseStore, StoreIdentity};

const GOOD: usize = 21;

/// A labels file of the first `GOOD` rows of the derm folder (their images
/// copied into `dir/images`), a row whose image is missing and one whose
/// image is not a JPEG.
fn library(derm: &Path, dir: &Path) -> Vec<dermascope_library::LabelledImage> {
    let text = std::fs::read_to_string(derm.join("labels.csv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut csv = format!("{header}\n");
    for line in lines.take(GOOD) {
        let name = line.split(',').next().unwrap();
        std::fs::copy(derm.join("images").join(name), images.join(name)).unwrap();
        csv.push_str(line);
        csv.push('\n');
    }
    std::fs::write(images.join("broken.jpg"), b"\xFF\xD8 not a photograph").unwrap();
    csv.push_str("missing.jpg,nv,HAM_9000001,histo,40,male,back\n");
    csv.push_str("broken.jpg,nv,HAM_9000002,histo,40,male,back\n");
    let labels = parse_labels(csv.as_bytes(), Path::new("labels.csv")).unwrap();
    assert!(labels.rejected.is_empty(), "{:?}", labels.rejected);
    labels.rows
}

#[test]
fn batched_ingest_stores_the_one_image_embeddings_and_resumes() {
    let test = "batched_ingest_stores_the_one_image_embeddings_and_resumes";
    let Some(derm) = dermascope_testkit::derm_data(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rows = library(&derm, dir.path());
    let encoder = Encoder::load(
        &dermascope_testkit::bundle_dir(),
        &EncoderOptions {
            variant: VariantChoice::Named("int8".into()),
            // On an x86_64 CPU without VNNI int8 is slow: what is checked is its numerics, not its speed.
            allow_slow_int8: true,
            threads: 1,
            ..EncoderOptions::default()
        },
    )
    .unwrap();
    let identity = StoreIdentity {
        model_id: encoder.model_id().to_string(),
        embedding_dim: encoder.dim(),
    };
    let store = CaseStore::open(dir.path().join("store"), identity).unwrap();
    let images = dir.path().join("images");
    let options = IngestOptions {
        workers: 2,
        ..IngestOptions::default()
    };

    // Stopped at its first flush.
    let mut reports = Vec::new();
    let first = ingest_in_batches(&store, &encoder, &images, &rows, options, 4, |p| {
        reports.push(p);
        if p.done > 0 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(first.encoder_batch, 4);
    assert_eq!(
        reports[0],
        IngestProgress {
            done: 0,
            total: GOOD + 2
        },
        "the first report comes before any photograph"
    );
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(reports[1].done >= 16, "{reports:?}");
    assert!(first.ingested > 0 && first.ingested < GOOD, "{first:?}");
    assert_eq!(store.len().unwrap(), first.ingested);

    // Finished by the next run (the default batch).
    let second = ingest(&store, &encoder, &images, &rows, options, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(second.already_stored, first.ingested);
    assert_eq!(first.ingested + second.ingested, GOOD);
    let mut rejected: Vec<(&str, &str)> = first
        .rejected
        .iter()
        .chain(&second.rejected)
        .map(|r| (r.image.as_str(), r.reason.as_str()))
        .collect();
    rejected.sort();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!(rejected[0].0, "broken.jpg");
    assert_eq!(rejected[1].0, "missing.jpg");
    assert!(rejected[1].1.contains("not found"), "{rejected:?}");
    assert_eq!(store.len().unwrap(), GOOD);

    // Each stored embedding against the same photograph embedded alone.
    let mut worst = 1f32;
    for row in rows.iter().take(GOOD) {
        let case = store.get(&row.case_id).unwrap().expect("the row's case");
        let bytes = std::fs::read(images.join(&row.image)).unwrap();
        let photo = decode_rgb(&bytes, DecodeBudget::default()).unwrap();
        let alone = encoder.embed_rgb(&photo).unwrap();
        let cosine: f32 = alone
            .values()
            .iter()
            .zip(&case.embedding)
            .map(|(a, b)| a * b)
            .sum();
        worst = worst.min(cosine);
    }
    eprintln!("batched ingest vs one image at a time: min cosine {worst:.7} over {GOOD} images");
    assert!(worst >= 0.99999, "min cosine {worst}");
}
