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

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use dermascope_adapter::AdapterError;
use dermascope_encoder::Encoder;
use dermascope_eval::ClassificationReport;
use dermascope_store::{CaseStore, IndexError, ScoreKind};
use serde::Serialize;
use thiserror::Error;

use crate::ingest::IngestProgress;
use crate::labels::LabelledImage;
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
    for space in Space::ALL {
        for method in knn_methods(space, &KS) {
            if let Method::Knn { k, vote, .. } = method {
                let predicted = knn_predictions(hits_in(space), k, vote);
                scored.push(Scored::new(method, predicted, None, &classes, &truth));
            }
        }
    }
    let adapter_classes = adapter.classes();
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
            .map(|s| MethodResult {
                method: s.method,
                report: s.report,
            })
            .collect(),
        breakdowns,
        classes,
    })
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
