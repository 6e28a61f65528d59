//! Training an adapter on labelled embeddings, on the device.
//!
//! Cross-entropy with AdamW (lr 1e-4, weight decay 0.01), mini-batches in a
//! seeded order, class imbalance handled by loss weights (n / (classes · n_c),
//! scikit-learn's "balanced") or by class-balanced sampling, and early
//! stopping on a lesion-grouped validation set: the weights kept are those of
//! the epoch with the lowest class-weighted validation loss. The same inputs and
//! seed give bit-identical weights.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView2};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use tracing::info;

use crate::model::{softmax, AdamW, AdapterShape, AdapterWeights};
use crate::AdapterError;

/// One labelled embedding from the case library or a labelled folder.
#[derive(Clone, Debug)]
pub struct LabelledEmbedding {
    pub embedding: Vec<f32>,
    /// Diagnosis code.
    pub label: String,
    /// Model id of the encoder that made the embedding.
    pub model_id: String,
    /// Lesion id, so that validation never sees another photograph of a
    /// training lesion. Cases without one count as their own lesion.
    pub lesion: String,
}

/// What to do with a diagnosis that has fewer than `min_cases` cases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SmallClassPolicy {
    /// Stop with an error that lists the counts (the default: the clinician
    /// or IT person decides).
    Refuse,
    /// Leave those cases out of training; the adapter cannot predict them.
    Exclude,
    /// Relabel those cases as this diagnosis code.
    MergeInto(String),
}

/// How class imbalance is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancing {
    /// Loss weights n / (classes · n_c).
    LossWeights,
    /// Each epoch draws as many examples as there are, classes equally likely.
    BalancedSampling,
}

/// Hyper-parameters; the defaults are the reference's except the learning
/// rate: at the reference's 3e-4 the validation loss bottomed out after one
/// or two epochs on sklesion embeddings (already fine-tuned on HAM10000) and
/// adapter-space precision@1 averaged 0.855 over three seeds, no better than
/// raw embeddings; at 1e-4 it averaged 0.865 (docs/evaluation.md).
#[derive(Clone, Debug, Serialize)]
pub struct TrainingConfig {
    pub hidden: usize,
    pub max_epochs: usize,
    pub learning_rate: f32,
    pub weight_decay: f32,
    pub batch_size: usize,
    /// Epochs without a lower validation loss before stopping.
    pub patience: usize,
    pub seed: u64,
    pub balancing: Balancing,
    /// Diagnoses with fewer training cases than this go through `small_classes`.
    pub min_cases_per_class: usize,
    #[serde(skip)]
    pub small_classes: SmallClassPolicy,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            hidden: 254,
            max_epochs: 15,
            learning_rate: 1e-4,
            weight_decay: 0.01,
            batch_size: 64,
            patience: 4,
            seed: 7,
            balancing: Balancing::LossWeights,
            min_cases_per_class: 10,
            small_classes: SmallClassPolicy::Refuse,
        }
    }
}

/// One epoch's figures.
#[derive(Clone, Debug, Serialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub validation_loss: f64,
    pub validation_balanced_accuracy: f64,
}

/// A trained adapter and how it got there.
#[derive(Clone, Debug)]
pub struct TrainedAdapter {
    pub weights: AdapterWeights,
    /// Diagnosis codes, in logit order.
    pub classes: Vec<String>,
    pub encoder_model_id: String,
    pub history: Vec<EpochRecord>,
    /// 1-based epoch whose weights were kept.
    pub best_epoch: usize,
    /// Classes left out or merged before training, with their counts.
    pub class_changes: Vec<String>,
    pub train_size: usize,
    pub validation_size: usize,
    pub wall_time: Duration,
}

/// The classes training will use, after applying the small-class policy.
/// Returns the relabelled examples and a description of every change.
pub fn prepare_classes(
    examples: &[LabelledEmbedding],
    config: &TrainingConfig,
) -> Result<(Vec<LabelledEmbedding>, Vec<String>), AdapterError> {
    let model_ids: BTreeSet<&str> = examples.iter().map(|e| e.model_id.as_str()).collect();
    if model_ids.len() > 1 {
        return Err(AdapterError::MixedEncoders {
            model_ids: model_ids.into_iter().map(str::to_string).collect(),
        });
    }
    let counts = class_counts(examples);
    let small: BTreeMap<&str, usize> = counts
        .iter()
        .filter(|(_, &n)| n < config.min_cases_per_class)
        .map(|(c, &n)| (c.as_str(), n))
        .collect();
    let mut changes = Vec::new();
    let examples: Vec<LabelledEmbedding> = if small.is_empty() {
        examples.to_vec()
    } else {
        match &config.small_classes {
            SmallClassPolicy::Refuse => {
                return Err(AdapterError::TooFewCases {
                    minimum: config.min_cases_per_class,
                    counts: describe_counts(&counts),
                    small: small.keys().map(|s| s.to_string()).collect(),
                })
            }
            SmallClassPolicy::Exclude => {
                for (class, n) in &small {
                    changes.push(format!("{class} ({n} cases) left out"));
                }
                examples
                    .iter()
                    .filter(|e| !small.contains_key(e.label.as_str()))
                    .cloned()
                    .collect()
            }
            SmallClassPolicy::MergeInto(target) => {
                if small.contains_key(target.as_str()) || !counts.contains_key(target) {
                    return Err(AdapterError::BadMergeTarget {
                        target: target.clone(),
                        counts: describe_counts(&counts),
                    });
                }
                for (class, n) in &small {
                    changes.push(format!("{class} ({n} cases) merged into {target}"));
                }
                examples
                    .iter()
                    .map(|e| {
                        let mut e = e.clone();
                        if small.contains_key(e.label.as_str()) {
                            e.label = target.clone();
                        }
                        e
                    })
                    .collect()
            }
        }
    };
    let remaining = class_counts(&examples);
    if remaining.len() < 2 {
        return Err(AdapterError::OneClass {
            counts: describe_counts(&counts),
        });
    }
    Ok((examples, changes))
}

fn class_counts(examples: &[LabelledEmbedding]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for e in examples {
        *counts.entry(e.label.clone()).or_insert(0) += 1;
    }
    counts
}

fn describe_counts(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(c, n)| format!("{c}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Examples as a matrix plus class indices.
struct Batchable {
    x: Array2<f32>,
    y: Vec<usize>,
}

fn to_batchable(
    examples: &[&LabelledEmbedding],
    classes: &[String],
    dim: usize,
) -> Result<Batchable, AdapterError> {
    let mut x = Array2::zeros((examples.len(), dim));
    let mut y = Vec::with_capacity(examples.len());
    for (row, example) in x.rows_mut().into_iter().zip(examples) {
        if example.embedding.len() != dim {
            return Err(AdapterError::DimensionMismatch {
                expected: dim,
                found: example.embedding.len(),
            });
        }
        if example.embedding.iter().any(|v| !v.is_finite()) {
            return Err(AdapterError::NonFiniteEmbedding);
        }
        for (dst, src) in row.into_iter().zip(&example.embedding) {
            *dst = *src;
        }
        let class = classes
            .binary_search(&example.label)
            .map_err(|_| AdapterError::UnknownClass(example.label.clone()))?;
        y.push(class);
    }
    Ok(Batchable { x, y })
}

/// Trains on `train`, stopping early on `validation` (lesion-disjoint from
/// `train`; the caller splits, see `dermascope_eval::grouped_split`). Classes
/// are the sorted distinct labels of `train`; a validation label outside
/// them is an error. Call [`prepare_classes`] first.
pub fn train(
    train: &[&LabelledEmbedding],
    validation: &[&LabelledEmbedding],
    config: &TrainingConfig,
) -> Result<TrainedAdapter, AdapterError> {
    let started = Instant::now();
    let first = train.first().ok_or(AdapterError::NoExamples)?;
    if validation.is_empty() {
        return Err(AdapterError::NoValidation);
    }
    let model_ids: BTreeSet<&str> = train
        .iter()
        .chain(validation)
        .map(|e| e.model_id.as_str())
        .collect();
    if model_ids.len() > 1 {
        return Err(AdapterError::MixedEncoders {
            model_ids: model_ids.into_iter().map(str::to_string).collect(),
        });
    }
    if config.hidden == 0 || config.batch_size == 0 || config.max_epochs == 0 {
        return Err(AdapterError::BadConfig(
            "hidden, batch_size and max_epochs must be positive".into(),
        ));
    }
    let dim = first.embedding.len();
    let classes: Vec<String> = train
        .iter()
        .map(|e| e.label.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if classes.len() < 2 {
        return Err(AdapterError::OneClass {
            counts: describe_counts(&class_counts(
                &train.iter().map(|e| (*e).clone()).collect::<Vec<_>>(),
            )),
        });
    }
    let train_set = to_batchable(train, &classes, dim)?;
    let validation_set = to_batchable(validation, &classes, dim)?;

    let mut per_class = vec![0usize; classes.len()];
    for &y in &train_set.y {
        per_class[y] += 1;
    }
    let class_weight: Vec<f32> = match config.balancing {
        Balancing::LossWeights => per_class
            .iter()
            .map(|&n| train_set.y.len() as f32 / (classes.len() as f32 * n.max(1) as f32))
            .collect(),
        Balancing::BalancedSampling => vec![1.0; classes.len()],
    };
    let by_class: Vec<Vec<usize>> = (0..classes.len())
        .map(|c| {
            (0..train_set.y.len())
                .filter(|&i| train_set.y[i] == c)
                .collect()
        })
        .collect();

    let mut rng = StdRng::seed_from_u64(config.seed);
    let shape = AdapterShape {
        input_dim: dim,
        hidden: config.hidden,
        classes: classes.len(),
    };
    let mut weights = AdapterWeights::initialise(shape, &mut rng);
    let mut optimiser = AdamW::new(&mut weights, config.learning_rate, config.weight_decay);
    let mut best: Option<(f64, f64, usize, AdapterWeights)> = None;
    let mut history = Vec::new();
    let mut order: Vec<usize> = (0..train_set.y.len()).collect();
    for epoch in 1..=config.max_epochs {
        match config.balancing {
            Balancing::LossWeights => order.shuffle(&mut rng),
            Balancing::BalancedSampling => {
                for slot in order.iter_mut() {
                    let class = &by_class[rng.random_range(0..by_class.len())];
                    *slot = class[rng.random_range(0..class.len())];
                }
            }
        }
        let mut loss_sum = 0.0f64;
        for chunk in order.chunks(config.batch_size) {
            let x = train_set.x.select(ndarray::Axis(0), chunk);
            let y: Vec<usize> = chunk.iter().map(|&i| train_set.y[i]).collect();
            let act = weights.forward(x.view());
            let (loss, d_logits) = weighted_cross_entropy(&act.logits, &y, &class_weight);
            loss_sum += loss * chunk.len() as f64;
            let gradients = weights.backward(&act, &d_logits);
            optimiser.step(&mut weights, &gradients);
        }
        let (validation_loss, validation_balanced_accuracy) = evaluate(
            &weights,
            &validation_set,
            &class_weight,
            classes.len(),
            config.batch_size.max(256),
        );
        let record = EpochRecord {
            epoch,
            train_loss: loss_sum / order.len() as f64,
            validation_loss,
            validation_balanced_accuracy,
        };
        info!(
            epoch,
            train_loss = record.train_loss,
            validation_loss,
            validation_balanced_accuracy,
            "adapter epoch"
        );
        history.push(record);
        // The class-weighted validation loss picks the epoch: on a few
        // hundred validation cases balanced accuracy moves in steps of one
        // rare-class case and picked epoch 1 of one seed and epoch 4 of
        // another (docs/evaluation.md); the loss is smooth.
        let improved = match &best {
            None => true,
            Some((_, best_loss, _, _)) => validation_loss < *best_loss,
        };
        if improved {
            best = Some((
                validation_balanced_accuracy,
                validation_loss,
                epoch,
                weights.clone(),
            ));
        } else if let Some((_, _, best_epoch, _)) = &best {
            if epoch - best_epoch >= config.patience {
                info!(epoch, best_epoch, "early stop");
                break;
            }
        }
    }
    let (_, _, best_epoch, weights) = best.ok_or(AdapterError::NoExamples)?;
    Ok(TrainedAdapter {
        weights,
        classes,
        encoder_model_id: first.model_id.clone(),
        history,
        best_epoch,
        class_changes: Vec::new(),
        train_size: train.len(),
        validation_size: validation.len(),
        wall_time: started.elapsed(),
    })
}

/// Mean weighted cross-entropy (PyTorch's convention: divided by the sum of
/// the weights) and its gradient with respect to the logits.
fn weighted_cross_entropy(
    logits: &Array2<f32>,
    labels: &[usize],
    class_weight: &[f32],
) -> (f64, Array2<f32>) {
    let mut grad = softmax(logits);
    let total: f32 = labels.iter().map(|&y| class_weight[y]).sum();
    let mut loss = 0.0f64;
    for (i, &y) in labels.iter().enumerate() {
        let w = class_weight[y] / total;
        loss -= f64::from(w) * f64::from(grad[[i, y]].max(f32::MIN_POSITIVE)).ln();
        grad[[i, y]] -= 1.0;
        grad.row_mut(i).mapv_inplace(|g| g * w);
    }
    (loss, grad)
}

fn evaluate(
    weights: &AdapterWeights,
    set: &Batchable,
    class_weight: &[f32],
    classes: usize,
    batch: usize,
) -> (f64, f64) {
    let mut loss = 0.0;
    let mut correct = vec![0usize; classes];
    let mut support = vec![0usize; classes];
    for start in (0..set.y.len()).step_by(batch) {
        let end = (start + batch).min(set.y.len());
        let x: ArrayView2<f32> = set.x.slice(ndarray::s![start..end, ..]);
        let (logits, _) = weights.infer(x);
        let y = &set.y[start..end];
        let (batch_loss, _) = weighted_cross_entropy(&logits, y, class_weight);
        loss += batch_loss * y.len() as f64;
        for (row, &truth) in logits.rows().into_iter().zip(y) {
            support[truth] += 1;
            if argmax(row.iter().copied()) == truth {
                correct[truth] += 1;
            }
        }
    }
    let present: Vec<f64> = correct
        .iter()
        .zip(&support)
        .filter(|(_, &s)| s > 0)
        .map(|(&c, &s)| c as f64 / s as f64)
        .collect();
    let balanced = present.iter().sum::<f64>() / present.len().max(1) as f64;
    (loss / set.y.len().max(1) as f64, balanced)
}

pub(crate) fn argmax(values: impl Iterator<Item = f32>) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}
