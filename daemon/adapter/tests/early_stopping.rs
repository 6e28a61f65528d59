//! Early stopping (ARCHITECTURE.md: "early stopping on a lesion-grouped
//! validation split"): training stops `patience` epochs after the epoch
//! with the lowest validation loss, and keeps that epoch's weights.

use dermascope_adapter::model::softmax;
use dermascope_adapter::{train, LabelledEmbedding, TrainingConfig};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const DIM: usize = 32;

/// Two classes, labelled alternately, whose photographs sit around their
/// class's centre only two times in three: a little to learn at first, then
/// only noise to memorise, so a large model at a high learning rate soon
/// makes its validation loss worse.
fn noisy_labels(n: usize, seed: u64) -> Vec<LabelledEmbedding> {
    let mut rng = StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..2)
        .map(|_| (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    (0..n)
        .map(|i| {
            let label = i % 2;
            let centre = if rng.random_range(0.0f32..1.0) < 1.0 / 3.0 {
                1 - label
            } else {
                label
            };
            let embedding = centres[centre]
                .iter()
                .map(|c| c + 1.5 * rng.random_range(-1.0f32..1.0))
                .collect();
            LabelledEmbedding {
                embedding,
                label: format!("c{label}"),
                model_id: "test-encoder".into(),
                lesion: format!("lesion-{i}"),
            }
        })
        .collect()
}

/// Mean cross-entropy of `weights` on `set`, as training computes the
/// validation loss when every class weight is 1 (balanced training classes).
fn validation_loss(
    weights: &dermascope_adapter::AdapterWeights,
    set: &[&LabelledEmbedding],
    classes: &[String],
) -> f64 {
    let rows: Vec<f32> = set.iter().flat_map(|e| e.embedding.clone()).collect();
    let x = Array2::from_shape_vec((set.len(), DIM), rows).unwrap();
    let (logits, _) = weights.infer(x.view());
    let p = softmax(&logits);
    let total: f64 = set
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let y = classes.iter().position(|c| *c == e.label).unwrap();
            -f64::from(p[[i, y]].max(f32::MIN_POSITIVE)).ln()
        })
        .sum();
    total / set.len() as f64
}

#[test]
fn training_stops_patience_epochs_after_the_best_and_keeps_its_weights() {
    let examples = noisy_labels(240, 11);
    // Every fifth validates: 24 of each label there and 96 in training, so
    // every class weight is exactly 1.
    let (train_set, validation): (Vec<&LabelledEmbedding>, Vec<&LabelledEmbedding>) =
        examples.iter().partition(|e| {
            let i: usize = e.lesion.trim_start_matches("lesion-").parse().unwrap();
            !i.is_multiple_of(5)
        });
    let config = TrainingConfig {
        hidden: 128,
        max_epochs: 200,
        learning_rate: 3e-3,
        batch_size: 16,
        patience: 3,
        ..TrainingConfig::default()
    };
    let trained = train(&train_set, &validation, &config).unwrap();
    let history = &trained.history;
    let losses: Vec<f64> = history.iter().map(|r| r.validation_loss).collect();
    eprintln!(
        "best epoch {} of {} run; validation losses {losses:.4?}",
        trained.best_epoch,
        history.len()
    );
    assert!(
        history.len() < config.max_epochs,
        "never stopped early; validation losses {losses:?}"
    );
    assert_eq!(
        history.len(),
        trained.best_epoch + config.patience,
        "stopped at epoch {}, best {}; validation losses {losses:?}",
        history.len(),
        trained.best_epoch
    );
    let best = losses[trained.best_epoch - 1];
    assert!(
        losses[..trained.best_epoch - 1].iter().all(|&l| l > best)
            && losses[trained.best_epoch..].iter().all(|&l| l >= best),
        "epoch {} is not the first lowest validation loss: {losses:?}",
        trained.best_epoch
    );

    // The weights returned are the best epoch's, not the last one's: their
    // validation loss is the best epoch's (to float rounding: training
    // divides by the summed class weights in f32) ...
    let kept = validation_loss(&trained.weights, &validation, &trained.classes);
    let last = *losses.last().unwrap();
    assert!(
        (kept - best).abs() < 1e-6 * best && (last - best).abs() > 1e-4 * best,
        "kept weights score {kept}, best epoch {best}, last epoch {last}"
    );
    // ... and, training being deterministic for a seed, exactly what a run
    // that ends at the best epoch ends with.
    let until_best = TrainingConfig {
        max_epochs: trained.best_epoch,
        ..config
    };
    let rerun = train(&train_set, &validation, &until_best).unwrap();
    assert_eq!(rerun.history.len(), trained.best_epoch);
    assert!(
        rerun.weights == trained.weights,
        "not the best epoch's weights"
    );
}
