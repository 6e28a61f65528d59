//! Labelled photographs into the case store.
//!
//! # Guarantees
//! - **Resumable.** Rows whose case is already stored are skipped, so a run
//!   that was interrupted (or killed) is finished by running it again;
//!   cases are written in small batches, each acknowledged once flushed.
//! - **One bad row refuses only itself.** Every row was checked when the
//!   labels file was read ([`crate::labels`]); a photograph that cannot be
//!   read, decoded or embedded is reported with its line and the rest go in.
//! - **Stops on a storage error.** A failed write (a full disk) ends the
//!   run with an error; every batch written before it stays.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use dermascope_encoder::{decode_rgb, DecodeBudget, Encoder};
use dermascope_store::{
    now_ms, Case, CaseMetadata, CaseSource, CaseStore, CaseWrite, OriginalPhoto, StoreError,
};
use thiserror::Error;

use crate::labels::{LabelledImage, RejectedRow};
use crate::photo::{original_from_bytes, thumbnail_jpeg};

/// Cases per flush: small enough that a kill loses little work, large enough
/// that fsync does not dominate.
const BATCH: usize = 16;

#[derive(Debug, Error)]
pub enum IngestError {
    #[error("writing cases to the store (cases written before this batch are safe): {0}")]
    Store(#[from] StoreError),
}

/// How to ingest.
#[derive(Clone, Copy, Debug)]
pub struct IngestOptions {
    pub source: CaseSource,
    /// Photographs embedded at once, one thread each.
    pub workers: usize,
    /// Keep each photograph as the case's original (as JPEG), so that the
    /// library can be re-embedded by another encoder later. Off by default
    /// for reference libraries: it costs about the photographs' own size.
    pub keep_originals: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            source: CaseSource::Reference,
            workers: 1,
            keep_originals: false,
        }
    }
}

#[derive(Debug, Default)]
pub struct IngestSummary {
    pub ingested: usize,
    pub already_stored: usize,
    pub rejected: Vec<RejectedRow>,
    pub seconds: f64,
}

/// Progress after each flushed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestProgress {
    pub done: usize,
    pub total: usize,
}

/// Embeds and stores every row not yet in `store`. `progress` is called
/// after each flushed batch; `ControlFlow::Break` stops there (resumable).
pub fn ingest(
    store: &CaseStore,
    encoder: &Encoder,
    images: &Path,
    rows: &[LabelledImage],
    options: IngestOptions,
    mut progress: impl FnMut(IngestProgress) -> ControlFlow<()>,
) -> Result<IngestSummary, IngestError> {
    let started = Instant::now();
    let mut summary = IngestSummary::default();
    let mut todo = Vec::with_capacity(rows.len());
    for row in rows {
        if store.contains(&row.case_id)? {
            summary.already_stored += 1;
        } else {
            todo.push(row);
        }
    }
    let workers = options.workers.max(1);
    let mut done = 0;
    for batch in todo.chunks(BATCH) {
        let outcomes = embed_in_parallel(encoder, images, batch, options, workers);
        let mut cases = Vec::with_capacity(batch.len());
        for (row, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Ok(case) => cases.push(case),
                Err(reason) => summary.rejected.push(RejectedRow {
                    line: row.line,
                    image: row.image.clone(),
                    reason: reason.to_string(),
                }),
            }
        }
        let writes: Vec<CaseWrite<'_>> = cases
            .iter()
            .map(|(case, original)| CaseWrite {
                case,
                original: original.as_ref(),
            })
            .collect();
        store.insert_with_originals(&writes)?;
        summary.ingested += cases.len();
        done += batch.len();
        if progress(IngestProgress {
            done,
            total: todo.len(),
        })
        .is_break()
        {
            break;
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        ingested = summary.ingested,
        rejected = summary.rejected.len(),
        seconds = summary.seconds,
        "ingest finished"
    );
    Ok(summary)
}

/// Why one row's photograph did not become a case.
#[derive(Debug, Error)]
enum RowError {
    #[error("image {0} not found")]
    NotFound(String),
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Encoder(#[from] dermascope_encoder::EncoderError),
    #[error("thumbnail: {0}")]
    Thumbnail(#[from] image::ImageError),
    #[error("original photograph: {0}")]
    Original(#[from] dermascope_store::CaseError),
    #[error("embedding thread panicked")]
    Panicked,
}

type Embedded = (Case, Option<OriginalPhoto>);

/// tract's plan is shared between threads; each image runs single-threaded,
/// which uses both cores better than splitting one image's matrix products.
fn embed_in_parallel(
    encoder: &Encoder,
    images: &Path,
    batch: &[&LabelledImage],
    options: IngestOptions,
    workers: usize,
) -> Vec<Result<Embedded, RowError>> {
    let per_worker = batch.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = batch
            .chunks(per_worker)
            .map(|rows| {
                (
                    rows.len(),
                    scope.spawn(move || {
                        rows.iter()
                            .map(|row| case_from_row(encoder, images, row, options))
                            .collect::<Vec<_>>()
                    }),
                )
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(len, h)| {
                h.join()
                    .unwrap_or_else(|_| (0..len).map(|_| Err(RowError::Panicked)).collect())
            })
            .collect()
    })
}

fn case_from_row(
    encoder: &Encoder,
    images: &Path,
    row: &LabelledImage,
    options: IngestOptions,
) -> Result<Embedded, RowError> {
    let path = images.join(&row.image);
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => RowError::NotFound(path.display().to_string()),
        _ => RowError::Unreadable {
            path: path.display().to_string(),
            source: e,
        },
    })?;
    let photo = decode_rgb(&bytes, DecodeBudget::default())?;
    let embedding = encoder.embed_rgb(&photo)?;
    let thumbnail_jpeg = thumbnail_jpeg(&photo)?;
    let original = if options.keep_originals {
        Some(original_from_bytes(&bytes, &photo)?)
    } else {
        None
    };
    let now = now_ms();
    let case = Case {
        id: row.case_id.clone(),
        embedding: embedding.into_values(),
        diagnosis: row.diagnosis.clone(),
        source: options.source,
        metadata: CaseMetadata {
            age_years: row.age_years,
            sex: row.sex,
            anatomical_site: row.anatomical_site.clone(),
            fitzpatrick_type: None,
            note: None,
            lesion_id: row.lesion_id.clone(),
        },
        thumbnail_jpeg,
        model_id: encoder.model_id().to_string(),
        created_at_ms: now,
        updated_at_ms: now,
        // Reference labels in HAM10000 are established by histopathology,
        // follow-up, expert consensus or confocal microscopy; a row without
        // a method is stored unconfirmed.
        label_confirmed: row.dx_type.is_some(),
        device_id: None,
        revision: 1,
    };
    Ok((case, original))
}
