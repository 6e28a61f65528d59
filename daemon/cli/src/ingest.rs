//! `dermascope ingest`: labelled photographs into the case store.
//!
//! Resumable: rows whose case is already stored are skipped, so a run that
//! was interrupted (or killed) is finished by running it again. Cases are
//! written in small batches and each batch is acknowledged only once flushed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use dermascope_encoder::{decode_rgb, DecodeBudget, Encoder};
use dermascope_store::{Case, CaseMetadata, CaseSource, CaseStore, Residency};
use image::codecs::jpeg::JpegEncoder;
use indicatif::{ProgressBar, ProgressStyle};

use crate::labels::{read_labels, LabelledImage, RejectedRow};
use crate::{open_store, EncoderArgs, StoreArgs};

/// Cases per flush: small enough that a kill loses little work, large enough
/// that fsync does not dominate.
const BATCH: usize = 16;
const THUMBNAIL_SIDE: u32 = 96;

#[derive(Args, Debug)]
pub struct IngestArgs {
    /// Folder of photographs named in the labels file.
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    /// CSV with at least image,label (HAM10000 layout: image,label,lesion_id,dx_type,age,sex,anatom_site).
    #[arg(long, value_name = "CSV")]
    labels: PathBuf,
    /// Where these cases come from.
    #[arg(long, value_enum, default_value_t = SourceArg::Reference)]
    source: SourceArg,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    encoder: EncoderArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum SourceArg {
    Reference,
    Captured,
    Fleet,
}

impl From<SourceArg> for CaseSource {
    fn from(source: SourceArg) -> Self {
        match source {
            SourceArg::Reference => CaseSource::Reference,
            SourceArg::Captured => CaseSource::Captured,
            SourceArg::Fleet => CaseSource::Fleet,
        }
    }
}

#[derive(Debug, Default)]
pub struct IngestSummary {
    pub ingested: usize,
    pub already_stored: usize,
    pub rejected: Vec<RejectedRow>,
}

pub fn run(args: &IngestArgs) -> anyhow::Result<ExitCode> {
    // Parallelism comes from embedding several photographs at once, one
    // thread each, rather than from splitting one photograph's products.
    let encoder = args.encoder.load(Some(1))?;
    // Ingest never scores: the smallest copy keeps the index current.
    let store = open_store(&args.store, &encoder, Residency::Int8)?;
    let labels = read_labels(&args.labels)?;
    let mut summary = ingest(
        &store,
        &encoder,
        &args.images,
        &labels.rows,
        args.source.into(),
        args.encoder.threads,
    )?;
    let mut rejected = labels.rejected;
    rejected.append(&mut summary.rejected);
    rejected.sort_by_key(|r| r.line);
    for row in &rejected {
        eprintln!("rejected line {} ({}): {}", row.line, row.image, row.reason);
    }
    println!(
        "ingested {}, already stored {}, rejected {}; the store now holds {} cases",
        summary.ingested,
        summary.already_stored,
        rejected.len(),
        store.len()?
    );
    Ok(ExitCode::SUCCESS)
}

/// Embeds and stores every row not yet in `store`. A failed write (a full
/// disk) stops the run with an error; every batch written before it stays.
pub fn ingest(
    store: &CaseStore,
    encoder: &Encoder,
    images: &Path,
    rows: &[LabelledImage],
    source: CaseSource,
    workers: u16,
) -> anyhow::Result<IngestSummary> {
    let mut summary = IngestSummary::default();
    let mut todo = Vec::new();
    for row in rows {
        if store.contains(&row.case_id)? {
            summary.already_stored += 1;
        } else {
            todo.push(row);
        }
    }
    if todo.is_empty() {
        return Ok(summary);
    }
    let progress = ProgressBar::new(todo.len() as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} cases  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let workers = usize::from(workers.max(1));
    for batch in todo.chunks(BATCH) {
        let outcomes = embed_in_parallel(encoder, images, batch, source, workers);
        let mut cases = Vec::with_capacity(batch.len());
        for (row, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Ok(case) => cases.push(case),
                Err(reason) => summary.rejected.push(RejectedRow {
                    line: row.line,
                    image: row.image.clone(),
                    reason,
                }),
            }
        }
        store
            .insert_batch(&cases)
            .context("writing cases to the store (cases written before this batch are safe)")?;
        summary.ingested += cases.len();
        progress.inc(batch.len() as u64);
    }
    progress.finish_and_clear();
    tracing::info!(
        ingested = summary.ingested,
        rejected = summary.rejected.len(),
        seconds = started.elapsed().as_secs_f64(),
        "ingest finished"
    );
    Ok(summary)
}

/// tract's plan is shared between threads; each image runs single-threaded,
/// which uses both cores better than splitting one image's matrix products.
fn embed_in_parallel(
    encoder: &Encoder,
    images: &Path,
    batch: &[&LabelledImage],
    source: CaseSource,
    workers: usize,
) -> Vec<Result<Case, String>> {
    let per_worker = batch.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = batch
            .chunks(per_worker)
            .map(|rows| {
                scope.spawn(move || {
                    rows.iter()
                        .map(|row| case_from_row(encoder, images, row, source))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![Err("embedding thread panicked".to_string())])
            })
            .collect()
    })
}

fn case_from_row(
    encoder: &Encoder,
    images: &Path,
    row: &LabelledImage,
    source: CaseSource,
) -> Result<Case, String> {
    let path = images.join(&row.image);
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("image {} not found", path.display()),
        _ => format!("cannot read {}: {e}", path.display()),
    })?;
    let photo = decode_rgb(&bytes, DecodeBudget::default()).map_err(|e| e.to_string())?;
    let embedding = encoder.embed_rgb(&photo).map_err(|e| e.to_string())?;
    let thumbnail_jpeg = thumbnail(&photo).map_err(|e| format!("thumbnail: {e}"))?;
    let now = now_ms();
    Ok(Case {
        id: row.case_id.clone(),
        embedding: embedding.into_values(),
        diagnosis: row.diagnosis.clone(),
        source,
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
    })
}

/// A small JPEG for the device's screen; the full photograph is not kept.
pub fn thumbnail(photo: &image::RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let small =
        image::DynamicImage::ImageRgb8(photo.clone()).thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE);
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, 80).encode_image(&small)?;
    Ok(jpeg)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
