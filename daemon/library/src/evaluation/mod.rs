//! Every method on the same split, side by side.
//!
//! Retrieval over raw encoder embeddings, retrieval over adapter
//! embeddings, the adapter's own prediction, and the adapter combined with
//! kNN, all scored by `dermascope-eval` on one lesion-grouped split (or a
//! given query set), with breakdowns by sex, age band and anatomical site.
//!
//! # Guarantees
//! - **One split for every method**, so their figures are comparable.
//! - **The adapter never sees a query.** It is trained on the references
//!   only (with its own lesion-grouped validation split for early
//!   stopping) and scored as tract runs it.
//! - **Embeddings are cached** in the store the caller passes (an
//!   evaluation store, never the device's case library), so a rerun only
//!   embeds what is new.

mod method;
mod rows;
mod scoring;
pub mod synthetic;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use dermascope_adapter::AdapterError;
use dermascope_encoder::Encoder;
use dermascope_eval::{
    knn_distribution, sensitivity_specificity, ClassificationReport, Neighbour, TwoClassFigures,
    MELANOMA,
};
use dermascope_store::{CaseStore, IndexError, ScoreKind};
use serde::Serialize;
use thiserror::Error;

use crate::ingest::IngestProgress;
use crate::labels::LabelledImage;
use crate::operating_point::{
    combined_probabilities, melanoma_score, ranked_neighbours, NoMatchRule, OperatingPoint,
};
use crate::training::{confidences, TrainingError, TrainingOptions, TrainingPlan, TrainingReport};

pub use method::{knn_methods, Method, Space};
pub use rows::{embedded_rows, EmbeddedRow, EmbeddedRows, LabelledFolder, RowsError};
pub use scoring::{age_band, Attribute, GroupFigures, GroupResult, Retrieval};

use scoring::{breakdowns, combine, knn_predictions, neighbours, retrieval_figures, Scored};

/// kNN methods are run for each of these k.
pub const KS: [usize; 3] = [1, 5, 10];
/// Retrieval is reported as precision@k for each of these k.
pub const PRECISION_KS: [usize; 3] = [1, 3, 5];
/// Neighbours voting in the adapter + kNN combination.
pub const COMBINED_K: usize = 10;

/// The cause is part of each message and not also `source()`, so that a
/// printed error chain says it once.
#[derive(Debug, Error)]
pub enum EvaluationError {
    #[error(transparent)]
    Rows(#[from] RowsError),
    #[error(
        "{} has rows without lesion_id: a lesion-grouped split is impossible; \
         give a separate query set with --queries-images/--queries-labels",
        labels.display()
    )]
    NoLesionIds { labels: PathBuf },
    #[error("nothing to evaluate: {references} references, {queries} queries")]
    Empty { references: usize, queries: usize },
    #[error(transparent)]
    Training(#[from] TrainingError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("searching neighbours: {0}")]
    Index(IndexError),
    #[error("stopped by the caller")]
    Interrupted,
    #[error("embedding the drawn non-dermoscopy images: {0}")]
    Synthetic(dermascope_encoder::EncoderError),
}

/// What to evaluate and how.
#[derive(Clone, Debug)]
pub struct EvaluationOptions {
    /// The labelled folder; without `queries`, split into references and
    /// queries by lesion.
    pub references: LabelledFolder,
    /// A separate query set.
    pub queries: Option<LabelledFolder>,
    /// Fraction of each diagnosis's lesions held out as queries.
    pub query_fraction: f64,
    /// Seed of the query split.
    pub seed: u64,
    /// Which copy of the raw embeddings retrieval scores with.
    pub raw_score: ScoreKind,
    /// The adapter trained on the references.
    pub training: TrainingOptions,
    /// Where that adapter (and its training report) is written.
    pub adapter_dir: PathBuf,
    /// Photographs embedded at once, one thread each.
    pub workers: usize,
}

impl EvaluationOptions {
    /// The defaults of `dermascope eval` for `references`.
    pub fn new(references: LabelledFolder, adapter_dir: PathBuf) -> Self {
        Self {
            references,
            queries: None,
            query_fraction: 0.2,
            seed: 1,
            raw_score: ScoreKind::F32,
            training: TrainingOptions::default(),
            adapter_dir,
            workers: 1,
        }
    }
}

/// Where an evaluation is, for the caller to show.
#[derive(Debug)]
pub enum EvaluationStep<'a> {
    /// A batch of `labels`'s photographs was embedded and cached.
    Embedding {
        labels: &'a Path,
        progress: IngestProgress,
    },
    /// `labels` is embedded; `unusable` of its rows could not be used.
    Embedded { labels: &'a Path, unusable: usize },
    /// The adapter is about to be trained on the references.
    Training(&'a TrainingPlan),
    /// It is trained and installed.
    Trained(&'a TrainingReport),
}

/// One method's figures over every query.
#[derive(Clone, Debug, Serialize)]
pub struct MethodResult {
    pub method: Method,
    #[serde(flatten)]
    pub report: ClassificationReport,
    /// Melanoma against the other class, when the queries are exactly
    /// melanoma and one other diagnosis (another atlas's mel and nv).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub two_class: Option<TwoClassFigures>,
}

/// The adapter's melanoma operating point (chosen on its validation split)
/// applied to the queries' combined melanoma scores.
#[derive(Clone, Debug, Serialize)]
pub struct OperatingPointResult {
    /// As stored in the adapter's manifest, with its validation figures.
    pub chosen: OperatingPoint,
    /// Melanoma queries flagged.
    pub sensitivity: f64,
    /// Other queries (any diagnosis but melanoma) not flagged.
    pub specificity: f64,
    pub melanomas: usize,
    pub others: usize,
}

/// How often "no close match" fires on a set of images.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NoMatchFiring {
    pub n: usize,
    /// The rule as the daemon applies it: either space's best match below
    /// its minimum.
    pub either_fired: usize,
    pub either_rate: f64,
    /// Its adapter-space half alone: best adapter-space similarity below
    /// its minimum.
    pub fired: usize,
    pub rate: f64,
    /// Its raw-space half alone (`None`: a rule without one).
    pub raw_fired: Option<usize>,
    pub raw_rate: Option<f64>,
    /// Median best similarity, adapter space and raw.
    pub median_top1: f64,
    pub median_top1_raw: f64,
}

/// The rule and its firing on the queries and on drawn non-dermoscopy
/// images.
#[derive(Clone, Debug, Serialize)]
pub struct NoMatchResult {
    pub rule: NoMatchRule,
    pub queries: NoMatchFiring,
    /// Per kind of [`synthetic::KINDS`], then all of them together.
    pub non_dermoscopy: Vec<(String, NoMatchFiring)>,
}

/// Everything `dermascope eval` prints (and, as JSON, its last line).
#[derive(Clone, Debug, Serialize)]
pub struct EvaluationReport {
    pub model_id: String,
    pub raw_score: &'static str,
    pub references: usize,
    pub queries: usize,
    pub split: String,
    pub adapter_id: String,
    pub adapter_training_s: f64,
    pub retrieval: Vec<Retrieval>,
    pub methods: Vec<MethodResult>,
    pub breakdowns: Vec<GroupResult>,
    /// The melanoma flag on these queries; `None` when the adapter has no
    /// operating point.
    pub operating_point: Option<OperatingPointResult>,
    /// "No close match" on these queries and on non-dermoscopy images.
    pub no_match: Option<NoMatchResult>,
    /// Every diagnosis among references and queries: the order of each
    /// method's `per_class`.
    #[serde(skip)]
    pub classes: Vec<String>,
}

/// Embeds the folders into `cache` (resumably), trains an adapter on the
/// references and scores every method on the queries. `on_step` hears each
/// step; `ControlFlow::Break` stops with [`EvaluationError::Interrupted`]
/// (or [`RowsError::Interrupted`] while embedding).
pub fn evaluate(
    cache: &CaseStore,
    encoder: &Encoder,
    options: &EvaluationOptions,
    mut on_step: impl FnMut(EvaluationStep<'_>) -> ControlFlow<()>,
) -> Result<EvaluationReport, EvaluationError> {
    let (references, queries, split) = split_rows(cache, encoder, options, &mut on_step)?;
    if references.is_empty() || queries.is_empty() {
        return Err(EvaluationError::Empty {
            references: references.len(),
            queries: queries.len(),
        });
    }
    let mut classes: Vec<String> = references
        .iter()
        .chain(&queries)
        .map(|r| r.diagnosis().to_string())
        .collect();
    classes.sort();
    classes.dedup();
    let truth: Vec<&str> = queries.iter().map(EmbeddedRow::diagnosis).collect();
    let k_max = KS.iter().chain(&PRECISION_KS).copied().max().unwrap_or(10);

    let raw_refs: Vec<&[f32]> = references.iter().map(|r| r.embedding.as_slice()).collect();
    let raw_queries: Vec<&[f32]> = queries.iter().map(|q| q.embedding.as_slice()).collect();
    let raw = neighbours(
        &paired(&references, &raw_refs),
        &raw_queries,
        k_max,
        options.raw_score,
    )
    .map_err(EvaluationError::Index)?;

    let examples: Vec<_> = references
        .iter()
        .map(|r| r.to_example(encoder.model_id()))
        .collect();
    let plan = TrainingPlan::new(&examples, &options.training)?;
    step(&mut on_step, EvaluationStep::Training(&plan))?;
    let (adapter, training) = plan.install(&options.adapter_dir)?;
    step(&mut on_step, EvaluationStep::Trained(&training))?;
    let ref_out = adapter.predict_many(&raw_refs)?;
    let query_out = adapter.predict_many(&raw_queries)?;
    let adapter_refs: Vec<&[f32]> = ref_out.iter().map(|o| o.embedding.as_slice()).collect();
    let adapter_queries: Vec<&[f32]> = query_out.iter().map(|o| o.embedding.as_slice()).collect();
    let adapted = neighbours(
        &paired(&references, &adapter_refs),
        &adapter_queries,
        k_max,
        ScoreKind::F32,
    )
    .map_err(EvaluationError::Index)?;

    let hits_in = |space: Space| match space {
        Space::Raw => &raw,
        Space::Adapter => &adapted,
    };
    let mut scored = Vec::new();
    // Each method's melanoma score per query, in `scored`'s order: the AUC
    // of the two-class figures.
    let mut melanoma_scores: Vec<Vec<f64>> = Vec::new();
    let melanoma_index = classes.iter().position(|c| c == MELANOMA);
    for space in Space::ALL {
        for method in knn_methods(space, &KS) {
            if let Method::Knn { k, vote, .. } = method {
                let predicted = knn_predictions(hits_in(space), k, vote);
                scored.push(Scored::new(method, predicted, None, &classes, &truth));
                melanoma_scores.push(
                    hits_in(space)
                        .iter()
                        .map(|n| {
                            let votes = knn_distribution(n, k, vote, &classes);
                            melanoma_index.map_or(0.0, |i| votes[i])
                        })
                        .collect(),
                );
            }
        }
    }
    let adapter_classes = adapter.classes();
    let adapter_melanoma = adapter_classes.iter().position(|c| c == MELANOMA);
    melanoma_scores.push(
        query_out
            .iter()
            .map(|o| adapter_melanoma.map_or(0.0, |i| f64::from(o.probabilities[i])))
            .collect(),
    );
    let combined_melanoma: Vec<f64> = query_out
        .iter()
        .zip(&adapted)
        .map(|(o, n)| {
            let mixed = combined_probabilities(o, n, adapter_classes, COMBINED_K);
            melanoma_score(adapter_classes, &mixed).unwrap_or(0.0)
        })
        .collect();
    melanoma_scores.push(combined_melanoma.clone());
    let predicted = query_out
        .iter()
        .map(|o| adapter_classes[o.predicted].clone())
        .collect();
    scored.push(Scored::new(
        Method::Adapter,
        predicted,
        Some(&confidences(&query_out)),
        &classes,
        &truth,
    ));
    let (predicted, confidence) = combine(&query_out, &adapted, adapter_classes, COMBINED_K);
    scored.push(Scored::new(
        Method::Combined { k: COMBINED_K },
        predicted,
        Some(&confidence),
        &classes,
        &truth,
    ));

    let retrieval = Space::ALL
        .into_iter()
        .map(|space| retrieval_figures(space, hits_in(space), &truth, &PRECISION_KS))
        .collect();
    let query_rows: Vec<&LabelledImage> = queries.iter().map(|q| &q.row).collect();
    let breakdowns = breakdowns(&query_rows, &truth, &scored, &classes);
    let calibration = adapter.manifest().calibration.clone().unwrap_or_default();
    let operating_point = calibration.melanoma.map(|chosen| {
        let positive: Vec<bool> = truth.iter().map(|t| *t == MELANOMA).collect();
        let (sensitivity, specificity) =
            sensitivity_specificity(&combined_melanoma, &positive, chosen.threshold);
        let melanomas = positive.iter().filter(|p| **p).count();
        OperatingPointResult {
            chosen,
            sensitivity,
            specificity,
            melanomas,
            others: positive.len() - melanomas,
        }
    });
    let no_match = match calibration.no_match {
        Some(rule) => {
            let queries = firing(&rule, &adapted, &raw);
            let non_dermoscopy = non_dermoscopy_firing(
                encoder,
                &adapter,
                &rule,
                &references,
                &raw_refs,
                &adapter_refs,
                options.raw_score,
            )?;
            Some(NoMatchResult {
                rule,
                queries,
                non_dermoscopy,
            })
        }
        None => None,
    };
    Ok(EvaluationReport {
        model_id: encoder.model_id().to_string(),
        raw_score: match options.raw_score {
            ScoreKind::Int8 => "int8",
            ScoreKind::F32 => "f32",
        },
        references: references.len(),
        queries: queries.len(),
        split,
        adapter_id: adapter.adapter_id().to_string(),
        adapter_training_s: training.wall_time_s,
        retrieval,
        methods: scored
            .into_iter()
            .zip(&melanoma_scores)
            .map(|(s, scores)| {
                let predicted: Vec<&str> = s.predicted.iter().map(String::as_str).collect();
                MethodResult {
                    two_class: TwoClassFigures::new(&truth, &predicted, Some(scores.as_slice())),
                    method: s.method,
                    report: s.report,
                }
            })
            .collect(),
        breakdowns,
        operating_point,
        no_match,
        classes,
    })
}

/// How often `rule` fires on queries whose neighbours are `adapted`
/// (adapter space) and `raw`, best first.
fn firing(rule: &NoMatchRule, adapted: &[Vec<Neighbour>], raw: &[Vec<Neighbour>]) -> NoMatchFiring {
    let top1 = |hits: &[Vec<Neighbour>]| -> Vec<Option<f32>> {
        hits.iter()
            .map(|n| n.first().map(|h| h.similarity))
            .collect()
    };
    let adapted = top1(adapted);
    let raw = top1(raw);
    let n = adapted.len();
    let fired = adapted.iter().filter(|s| !rule.adapter_close(**s)).count();
    let raw_fired = rule
        .min_top1_raw_similarity
        .map(|_| raw.iter().filter(|s| !rule.raw_close(**s)).count());
    let either_fired = adapted
        .iter()
        .zip(&raw)
        .filter(|(a, r)| !rule.is_close_match(**a, **r))
        .count();
    let rate = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    NoMatchFiring {
        n,
        either_fired,
        either_rate: rate(either_fired),
        fired,
        rate: rate(fired),
        raw_fired,
        raw_rate: raw_fired.map(rate),
        median_top1: median(&adapted),
        median_top1_raw: median(&raw),
    }
}

fn median(values: &[Option<f32>]) -> f64 {
    let mut v: Vec<f64> = values.iter().flatten().map(|&s| f64::from(s)).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Side of the drawn images and variants of each kind: enough to see
/// whether the rule fires on them, few enough to embed in seconds.
const DRAWN_SIZE: (u32, u32) = (640, 480);
const DRAWN_VARIANTS: u32 = 3;

/// The rule's firing on [`synthetic::non_dermoscopy_images`], per kind and
/// for all of them, searched among the references as queries are.
fn non_dermoscopy_firing(
    encoder: &Encoder,
    adapter: &dermascope_adapter::Adapter,
    rule: &NoMatchRule,
    references: &[EmbeddedRow],
    raw_refs: &[&[f32]],
    adapter_refs: &[&[f32]],
    raw_score: ScoreKind,
) -> Result<Vec<(String, NoMatchFiring)>, EvaluationError> {
    let drawn = synthetic::non_dermoscopy_images(DRAWN_SIZE.0, DRAWN_SIZE.1, DRAWN_VARIANTS);
    let mut raw = Vec::with_capacity(drawn.len());
    for (_, image) in &drawn {
        raw.push(
            encoder
                .embed_rgb(image)
                .map_err(EvaluationError::Synthetic)?
                .into_values(),
        );
    }
    let out = adapter.predict_many(&raw)?;
    let labels: Vec<&str> = references.iter().map(EmbeddedRow::diagnosis).collect();
    let raw_q: Vec<&[f32]> = raw.iter().map(Vec::as_slice).collect();
    let adapted_q: Vec<&[f32]> = out.iter().map(|o| o.embedding.as_slice()).collect();
    let raw_hits = ranked_neighbours(&labels, raw_refs, &raw_q, 1, raw_score)
        .map_err(EvaluationError::Index)?;
    let adapted_hits = ranked_neighbours(&labels, adapter_refs, &adapted_q, 1, ScoreKind::F32)
        .map_err(EvaluationError::Index)?;
    let mut result = Vec::new();
    for kind in synthetic::KINDS {
        let of_kind: Vec<usize> = (0..drawn.len()).filter(|&i| drawn[i].0 == kind).collect();
        let pick = |hits: &[Vec<Neighbour>]| -> Vec<Vec<Neighbour>> {
            of_kind.iter().map(|&i| hits[i].clone()).collect()
        };
        result.push((
            kind.to_string(),
            firing(rule, &pick(&adapted_hits), &pick(&raw_hits)),
        ));
    }
    result.push((
        "all drawn".to_string(),
        firing(rule, &adapted_hits, &raw_hits),
    ));
    Ok(result)
}

fn step(
    on_step: &mut impl FnMut(EvaluationStep<'_>) -> ControlFlow<()>,
    step: EvaluationStep<'_>,
) -> Result<(), EvaluationError> {
    match on_step(step) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(EvaluationError::Interrupted),
    }
}

fn paired<'a>(
    rows: &'a [EmbeddedRow],
    vectors: &[&'a [f32]],
) -> Vec<(&'a LabelledImage, &'a [f32])> {
    rows.iter()
        .map(|r| &r.row)
        .zip(vectors.iter().copied())
        .collect()
}

type Split = (Vec<EmbeddedRow>, Vec<EmbeddedRow>, String);

fn split_rows(
    cache: &CaseStore,
    encoder: &Encoder,
    options: &EvaluationOptions,
    on_step: &mut impl FnMut(EvaluationStep<'_>) -> ControlFlow<()>,
) -> Result<Split, EvaluationError> {
    let mut embed = |folder: &LabelledFolder| -> Result<Vec<EmbeddedRow>, EvaluationError> {
        let labels = folder.labels.as_path();
        let embedded = embedded_rows(cache, encoder, folder, options.workers, |progress| {
            on_step(EvaluationStep::Embedding { labels, progress })
        })?;
        step(
            on_step,
            EvaluationStep::Embedded {
                labels,
                unusable: embedded.unusable,
            },
        )?;
        Ok(embedded.rows)
    };
    let rows = embed(&options.references)?;
    if let Some(queries) = &options.queries {
        let queries = embed(queries)?;
        return Ok((rows, queries, "separate query set".to_string()));
    }
    if rows.iter().any(|r| r.row.lesion_id.is_none()) {
        return Err(EvaluationError::NoLesionIds {
            labels: options.references.labels.clone(),
        });
    }
    let (references, queries) = rows::lesion_split(rows, options.query_fraction, options.seed);
    let description = format!(
        "lesion-grouped, {:.0}% of each diagnosis's lesions held out, seed {}",
        options.query_fraction * 100.0,
        options.seed
    );
    Ok((references, queries, description))
}
