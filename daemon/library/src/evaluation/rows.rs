//! A labelled folder as embedded rows: ingested (resumably) into an
//! embedding cache, then read back with its labels and metadata.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use dermascope_adapter::LabelledEmbedding;
use dermascope_encoder::Encoder;
use dermascope_eval::grouped_split;
use dermascope_store::{CaseSource, CaseStore, StoreError};
use thiserror::Error;

use crate::ingest::{ingest, IngestError, IngestOptions, IngestProgress};
use crate::labels::{read_labels, LabelledImage, LabelsError, RejectedRow};

/// A folder of photographs and the labels file naming them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelledFolder {
    pub images: PathBuf,
    pub labels: PathBuf,
}

/// The cause is part of each message and not also `source()`, so that a
/// printed error chain says it once.
#[derive(Debug, Error)]
pub enum RowsError {
    #[error(transparent)]
    Labels(#[from] LabelsError),
    /// A label outside the known diagnoses would silently shrink a class or
    /// drop one: training and evaluation stop instead.
    #[error("{}", unknown_labels_message(labels, rows))]
    UnknownLabels {
        labels: PathBuf,
        rows: Vec<RejectedRow>,
    },
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("reading embeddings back from the cache: {0}")]
    Store(#[from] StoreError),
    #[error("stopped while embedding {labels}; run again to resume")]
    Interrupted { labels: PathBuf },
}

fn unknown_labels_message(labels: &Path, rows: &[RejectedRow]) -> String {
    let lines: Vec<String> = rows
        .iter()
        .take(10)
        .map(|r| format!("  line {}: {}", r.line, r.reason))
        .collect();
    format!(
        "{} has {} rows whose label is not a known diagnosis:\n{}\nfix or remove those rows",
        labels.display(),
        rows.len(),
        lines.join("\n")
    )
}

/// One accepted row of a labels file with its encoder embedding.
#[derive(Clone, Debug)]
pub struct EmbeddedRow {
    pub row: LabelledImage,
    pub embedding: Vec<f32>,
}

impl EmbeddedRow {
    /// The lesion the photograph shows; a row without a lesion id is its
    /// own lesion.
    pub fn lesion(&self) -> String {
        lesion_of(&self.row)
    }

    pub fn diagnosis(&self) -> &str {
        &self.row.diagnosis.code
    }

    /// The row as an adapter training example for encoder `model_id`.
    pub fn to_example(&self, model_id: &str) -> LabelledEmbedding {
        LabelledEmbedding {
            embedding: self.embedding.clone(),
            label: self.row.diagnosis.code.clone(),
            model_id: model_id.to_string(),
            lesion: self.lesion(),
        }
    }
}

pub(crate) fn lesion_of(row: &LabelledImage) -> String {
    row.lesion_id
        .clone()
        .unwrap_or_else(|| row.case_id.as_str().to_string())
}

/// The rows of a folder that could be embedded.
#[derive(Debug, Default)]
pub struct EmbeddedRows {
    pub rows: Vec<EmbeddedRow>,
    /// Rows refused by the labels file or by ingest (`dermascope ingest`
    /// reports each with its reason).
    pub unusable: usize,
}

/// Ingests `folder` into `cache` (resumably: stored rows are not embedded
/// again) and returns every accepted row with its embedding. `progress` is
/// called after each flushed batch; `Break` stops with
/// [`RowsError::Interrupted`], never with a silently shorter set.
pub fn embedded_rows(
    cache: &CaseStore,
    encoder: &Encoder,
    folder: &LabelledFolder,
    workers: usize,
    mut progress: impl FnMut(IngestProgress) -> ControlFlow<()>,
) -> Result<EmbeddedRows, RowsError> {
    let file = read_labels(&folder.labels)?;
    let unknown: Vec<RejectedRow> = file
        .rejected
        .iter()
        .filter(|r| r.is_unknown_label())
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(RowsError::UnknownLabels {
            labels: folder.labels.clone(),
            rows: unknown,
        });
    }
    let mut stopped = false;
    let summary = ingest(
        cache,
        encoder,
        &folder.images,
        &file.rows,
        IngestOptions {
            source: CaseSource::Reference,
            workers,
            keep_originals: false,
        },
        |p| {
            let flow = progress(p);
            stopped = flow.is_break();
            flow
        },
    )?;
    if stopped {
        return Err(RowsError::Interrupted {
            labels: folder.labels.clone(),
        });
    }
    let mut rows = Vec::with_capacity(file.rows.len());
    for row in file.rows {
        if let Some(case) = cache.get(&row.case_id)? {
            rows.push(EmbeddedRow {
                embedding: case.embedding,
                row,
            });
        }
    }
    Ok(EmbeddedRows {
        rows,
        unusable: file.rejected.len() + summary.rejected.len(),
    })
}

/// `rows` split into (references, queries) by whole lesions: `fraction` of
/// each diagnosis's lesions become queries.
pub(crate) fn lesion_split(
    rows: Vec<EmbeddedRow>,
    fraction: f64,
    seed: u64,
) -> (Vec<EmbeddedRow>, Vec<EmbeddedRow>) {
    let labels: Vec<&str> = rows.iter().map(EmbeddedRow::diagnosis).collect();
    let lesions: Vec<String> = rows.iter().map(EmbeddedRow::lesion).collect();
    let lesions: Vec<&str> = lesions.iter().map(String::as_str).collect();
    let split = grouped_split(&labels, &lesions, fraction, seed);
    let mut references = Vec::new();
    let mut queries = Vec::new();
    for (row, is_query) in rows.into_iter().zip(split.is_query) {
        if is_query {
            queries.push(row);
        } else {
            references.push(row);
        }
    }
    (references, queries)
}
