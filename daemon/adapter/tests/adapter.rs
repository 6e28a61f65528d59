//! Training, export and the tract runtime, on synthetic embeddings whose
//! classes are clusters around random centres (no patient data needed).

use dermascope_adapter::{
    prepare_classes, save, train, Adapter, AdapterError, Balancing, LabelledEmbedding,
    SmallClassPolicy, TrainingConfig,
};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const DIM: usize = 64;
const ENCODER: &str = "test-encoder-v1";

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// `per_class[i]` cases of class `c{i}`, two photographs per lesion.
fn clusters(per_class: &[usize], noise: f32, seed: u64) -> Vec<LabelledEmbedding> {
    let mut rng = StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = per_class
        .iter()
        .map(|_| (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    let mut out = Vec::new();
    for (class, (&n, centre)) in per_class.iter().zip(&centres).enumerate() {
        for i in 0..n {
            let v = centre
                .iter()
                .map(|c| c + noise * rng.random_range(-1.0f32..1.0))
                .collect();
            out.push(LabelledEmbedding {
                embedding: normalised(v),
                label: format!("c{class}"),
                model_id: ENCODER.to_string(),
                lesion: format!("lesion-{class}-{}", i / 2),
            });
        }
    }
    out
}

fn split(examples: &[LabelledEmbedding]) -> (Vec<&LabelledEmbedding>, Vec<&LabelledEmbedding>) {
    // Every fifth lesion validates; photographs of one lesion stay together.
    examples.iter().partition(|e| {
        let lesion: usize = e.lesion.rsplit('-').next().unwrap().parse().unwrap();
        !lesion.is_multiple_of(5)
    })
}

fn small_config() -> TrainingConfig {
    TrainingConfig {
        hidden: 32,
        max_epochs: 12,
        learning_rate: 1e-3,
        ..TrainingConfig::default()
    }
}

#[test]
fn learns_separable_classes_and_tract_runs_the_exported_graph() {
    let examples = clusters(&[60, 40, 20], 0.6, 1);
    let (train_set, validation) = split(&examples);
    let config = small_config();
    let trained = train(&train_set, &validation, &config).unwrap();
    assert_eq!(trained.classes, ["c0", "c1", "c2"]);
    let best = trained
        .history
        .iter()
        .find(|r| r.epoch == trained.best_epoch)
        .unwrap();
    assert!(
        best.validation_balanced_accuracy > 0.9,
        "validation balanced accuracy {}",
        best.validation_balanced_accuracy
    );

    let dir = tempfile::tempdir().unwrap();
    let manifest = save(&trained, config.seed, dir.path()).unwrap();
    assert!(manifest.adapter_id.starts_with("adapter-"));
    let adapter = Adapter::load(dir.path(), ENCODER, DIM).unwrap();

    // tract's logits match the training-side forward pass.
    let rows: Vec<Vec<f32>> = examples.iter().map(|e| e.embedding.clone()).collect();
    let x = Array2::from_shape_vec((rows.len(), DIM), rows.concat()).unwrap();
    let (logits, embeddings) = trained.weights.infer(x.view());
    let outputs = adapter.predict_many(&rows).unwrap();
    assert_eq!(outputs.len(), rows.len());
    let mut worst = 0f32;
    for (i, out) in outputs.iter().enumerate() {
        for (a, b) in out.logits.iter().zip(logits.row(i)) {
            worst = worst.max((a - b).abs() / (1.0 + b.abs()));
        }
        let reference = embeddings.row(i);
        let norm = reference.iter().map(|v| v * v).sum::<f32>().sqrt();
        let cosine: f32 = out
            .embedding
            .iter()
            .zip(reference.iter())
            .map(|(a, b)| a * b / norm)
            .sum();
        assert!(cosine > 0.9999, "row {i}: embedding cosine {cosine}");
        let sum: f32 = out.probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4);
    }
    assert!(worst < 1e-4, "largest relative logit difference {worst}");
    // The single-row plan agrees with the batched one.
    let one = adapter.predict(&rows[5]).unwrap();
    for (a, b) in one.logits.iter().zip(&outputs[5].logits) {
        assert!((a - b).abs() < 1e-4);
    }
}

#[test]
fn same_seed_same_adapter_other_seed_other_adapter() {
    let examples = clusters(&[30, 30], 0.8, 2);
    let (train_set, validation) = split(&examples);
    let config = TrainingConfig {
        max_epochs: 3,
        ..small_config()
    };
    let a = train(&train_set, &validation, &config).unwrap();
    let b = train(&train_set, &validation, &config).unwrap();
    assert_eq!(a.weights, b.weights);
    let other = TrainingConfig { seed: 99, ..config };
    let c = train(&train_set, &validation, &other).unwrap();
    assert_ne!(a.weights, c.weights);
}

#[test]
fn balanced_sampling_also_learns() {
    let examples = clusters(&[80, 12], 0.6, 3);
    let (train_set, validation) = split(&examples);
    let config = TrainingConfig {
        balancing: Balancing::BalancedSampling,
        min_cases_per_class: 5,
        ..small_config()
    };
    let trained = train(&train_set, &validation, &config).unwrap();
    let best = &trained.history[trained.best_epoch - 1];
    assert!(best.validation_balanced_accuracy > 0.85);
}

#[test]
fn adapter_for_another_encoder_is_refused() {
    let examples = clusters(&[20, 20], 0.5, 4);
    let (train_set, validation) = split(&examples);
    let trained = train(&train_set, &validation, &small_config()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save(&trained, 7, dir.path()).unwrap();
    let err = Adapter::load(dir.path(), "medimageinsight-v1", DIM).unwrap_err();
    assert!(matches!(err, AdapterError::EncoderMismatch { .. }), "{err}");
    assert!(err.to_string().contains("retrain"), "{err}");
    let err = Adapter::load(dir.path(), ENCODER, DIM + 1).unwrap_err();
    assert!(matches!(err, AdapterError::EncoderMismatch { .. }), "{err}");
}

#[test]
fn tampered_or_missing_files_are_clear_errors() {
    let examples = clusters(&[20, 20], 0.5, 5);
    let (train_set, validation) = split(&examples);
    let trained = train(&train_set, &validation, &small_config()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = save(&trained, 7, dir.path()).unwrap();
    let model = dir.path().join(&manifest.file);
    let mut bytes = std::fs::read(&model).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&model, &bytes).unwrap();
    let err = Adapter::load(dir.path(), ENCODER, DIM).unwrap_err();
    assert!(
        matches!(err, AdapterError::ChecksumMismatch { .. }),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    let err = Adapter::load(empty.path(), ENCODER, DIM).unwrap_err();
    assert!(matches!(err, AdapterError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("dermascope adapter train"));

    std::fs::write(
        dir.path().join("manifest.toml"),
        "format = 1\nadapter_id = 3\n",
    )
    .unwrap();
    let err = Adapter::load(dir.path(), ENCODER, DIM).unwrap_err();
    assert!(matches!(err, AdapterError::Manifest { .. }), "{err}");
}

#[test]
fn too_few_cases_refused_excluded_or_merged_as_chosen() {
    let examples = clusters(&[30, 30, 4], 0.5, 6);
    let err = prepare_classes(&examples, &TrainingConfig::default()).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, AdapterError::TooFewCases { .. }));
    assert!(message.contains("c2") && message.contains("c2: 4") && message.contains("c0: 30"));

    let exclude = TrainingConfig {
        small_classes: SmallClassPolicy::Exclude,
        ..TrainingConfig::default()
    };
    let (kept, changes) = prepare_classes(&examples, &exclude).unwrap();
    assert_eq!(kept.len(), 60);
    assert_eq!(changes, ["c2 (4 cases) left out"]);

    let merge = TrainingConfig {
        small_classes: SmallClassPolicy::MergeInto("c1".into()),
        ..TrainingConfig::default()
    };
    let (merged, changes) = prepare_classes(&examples, &merge).unwrap();
    assert_eq!(merged.iter().filter(|e| e.label == "c1").count(), 34);
    assert_eq!(changes, ["c2 (4 cases) merged into c1"]);

    let bad_target = TrainingConfig {
        small_classes: SmallClassPolicy::MergeInto("nope".into()),
        ..TrainingConfig::default()
    };
    assert!(matches!(
        prepare_classes(&examples, &bad_target).unwrap_err(),
        AdapterError::BadMergeTarget { .. }
    ));
}

#[test]
fn one_class_is_refused() {
    let examples = clusters(&[40], 0.5, 7);
    let err = prepare_classes(&examples, &TrainingConfig::default()).unwrap_err();
    assert!(matches!(err, AdapterError::OneClass { .. }), "{err}");
    let (train_set, validation) = split(&examples);
    let err = train(&train_set, &validation, &TrainingConfig::default()).unwrap_err();
    assert!(matches!(err, AdapterError::OneClass { .. }), "{err}");
}

#[test]
fn embeddings_from_two_encoders_are_refused() {
    let mut examples = clusters(&[20, 20], 0.5, 8);
    examples[3].model_id = "another-encoder".into();
    let err = prepare_classes(&examples, &TrainingConfig::default()).unwrap_err();
    assert!(matches!(err, AdapterError::MixedEncoders { .. }), "{err}");
    assert!(err.to_string().contains("another-encoder"));
    let (train_set, validation) = split(&examples);
    let err = train(&train_set, &validation, &small_config()).unwrap_err();
    assert!(matches!(err, AdapterError::MixedEncoders { .. }), "{err}");
}

#[test]
fn validation_label_unknown_to_training_is_refused() {
    let examples = clusters(&[20, 20], 0.5, 9);
    let (train_set, mut validation) = split(&examples);
    let mut stranger = validation[0].clone();
    stranger.label = "c9".into();
    validation.push(&stranger);
    let err = train(&train_set, &validation, &small_config()).unwrap_err();
    assert!(
        matches!(err, AdapterError::UnknownClass(ref c) if c == "c9"),
        "{err}"
    );
}
