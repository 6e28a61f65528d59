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

mod progress;

pub use progress::{ProgressLine, LOG_INTERVAL, TERMINAL_INTERVAL};

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use dermascope_encoder::{
    decode_rgb, BatchEncoder, DecodeBudget, Embedding, Encoder, EncoderError,
};
use dermascope_store::{
    now_ms, Case, CaseMetadata, CaseSource, CaseStore, CaseWrite, OriginalPhoto, StoreError,
};
use thiserror::Error;

use crate::labels::{LabelledImage, RejectedRow};
use crate::photo::{original_from_bytes, thumbnail_jpeg};

/// Cases per flush: small enough that a kill loses little work, large enough
/// that fsync does not dominate.
const BATCH: usize = 16;

/// Images per run of the encoder's plan in [`ingest`]: the fastest of 1, 4
/// and 8 in `scripts/bench ingest` (figures in `docs/benchmarks.md`). With
/// tract 0.23.9 a batch plan is slower per image, not faster: for N > 1 it
/// runs the 1x1 convolutions through Im2col and leaves the rescale's Mul
/// and Add unfused (profiled at batch 4, int8: 252 against 155 ms per
/// image in the plan's nodes), so one image per run, on each worker.
pub const DEFAULT_ENCODER_BATCH: usize = 1;

/// Above this file size a second plan of the encoder (its weights again,
/// and a load's peak of about three times the file) costs more memory than
/// a handheld can spare: such an encoder embeds one image at a time with
/// the caller's own plan (MedImageInsight's fp32 file is 1.4 GB).
pub const BATCH_PLAN_MAX_FILE_BYTES: u64 = 256 << 20;

/// Prepared photographs waiting for the encoder, in encoder batches: enough
/// that the decoding thread runs ahead while the encoder works, few enough
/// that tensors (0.8 MB each at 254 px) do not pile up.
const QUEUED_BATCHES: usize = 2;

#[derive(Debug, Error)]
pub enum IngestError {
    #[error("writing cases to the store (cases written before this batch are safe): {0}")]
    Store(#[from] StoreError),
}

/// How to ingest.
#[derive(Clone, Copy, Debug)]
pub struct IngestOptions {
    pub source: CaseSource,
    /// Photographs (or encoder batches) embedded at once, one thread each,
    /// beside the one thread that reads and decodes them.
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
    /// Images per run of the encoder (1 where no batch plan was made).
    pub encoder_batch: usize,
}

/// Progress: once before the first photograph (`done` 0), then after each
/// flushed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestProgress {
    pub done: usize,
    pub total: usize,
}

/// Embeds and stores every row not yet in `store`, [`DEFAULT_ENCODER_BATCH`]
/// images per encoder run. `progress` is called before the first row and
/// after each flushed batch; `ControlFlow::Break` stops there (resumable).
pub fn ingest(
    store: &CaseStore,
    encoder: &Encoder,
    images: &Path,
    rows: &[LabelledImage],
    options: IngestOptions,
    progress: impl FnMut(IngestProgress) -> ControlFlow<()>,
) -> Result<IngestSummary, IngestError> {
    ingest_in_batches(
        store,
        encoder,
        images,
        rows,
        options,
        DEFAULT_ENCODER_BATCH,
        progress,
    )
}

/// [`ingest`] with `encoder_batch` images per encoder run: one thread reads,
/// decodes and prepares photographs (tensor, thumbnail, original) into a
/// bounded queue while `options.workers` threads each run the encoder's
/// batch plan ([`Encoder::batch_encoder`], one thread per run) on their
/// share, and this one writes the cases. Each case's embedding is the
/// one-image plan's (to fp32 rounding: `dermascope-encoder`'s
/// `tests/batch.rs`).
pub fn ingest_in_batches(
    store: &CaseStore,
    encoder: &Encoder,
    images: &Path,
    rows: &[LabelledImage],
    options: IngestOptions,
    encoder_batch: usize,
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
    let total = todo.len();
    if total == 0 || progress(IngestProgress { done: 0, total }).is_break() {
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }
    let workers = options.workers.max(1);
    let embedder = Embedder::plan(
        encoder,
        encoder_batch.clamp(1, total.div_ceil(workers)),
        workers,
    );
    summary.encoder_batch = embedder.batch();
    let (sender, receiver) =
        std::sync::mpsc::sync_channel::<Prepared>(embedder.group() * QUEUED_BATCHES);
    let todo = &todo;
    let written = std::thread::scope(|scope| {
        // Owned here, so that leaving early (a Break, a store error) drops
        // it, which ends the reading thread's next send.
        let receiver = receiver;
        let reader = scope.spawn(move || {
            for row in todo.iter() {
                let prepared = prepare(encoder, images, row, options);
                if sender.send(prepared).is_err() {
                    break;
                }
            }
        });
        let mut writer = Writer {
            store,
            encoder,
            options,
            summary: &mut summary,
            cases: Vec::with_capacity(BATCH),
            settled: 0,
            flushed: 0,
            total,
        };
        let mut waiting: Vec<(&LabelledImage, Photo)> = Vec::with_capacity(embedder.group());
        let mut received = 0;
        for (row, photo) in todo.iter().copied().zip(receiver.iter()) {
            received += 1;
            match photo {
                Ok(photo) => waiting.push((row, photo)),
                Err(reason) => writer.reject(row, &reason),
            }
            if waiting.len() == embedder.group() {
                writer.embed(&embedder, &mut waiting);
            }
            if writer.settled - writer.flushed >= BATCH && writer.flush(&mut progress)?.is_break() {
                return Ok(());
            }
        }
        writer.embed(&embedder, &mut waiting);
        // The channel ended early only if the reading thread panicked: its
        // rows are refused, not silently left out.
        if reader.join().is_err() {
            for row in &todo[received..] {
                writer.reject(row, &"the thread reading photographs panicked");
            }
        }
        if writer.settled > writer.flushed {
            let _ = writer.flush(&mut progress)?;
        }
        Ok::<(), IngestError>(())
    });
    written?;
    summary.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        ingested = summary.ingested,
        rejected = summary.rejected.len(),
        encoder_batch = summary.encoder_batch,
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
}

/// One photograph ready for the encoder: its input tensor and what its case
/// keeps of it.
struct Photo {
    tensor: Vec<f32>,
    thumbnail_jpeg: Vec<u8>,
    original: Option<OriginalPhoto>,
}

type Prepared = Result<Photo, RowError>;

/// The encoder's plan for a library: a batch plan, or the caller's own
/// one-image plan where a batch plan costs too much or fails to load; run
/// on `workers` images (or batches) at once, one thread each, which uses
/// two cores better than splitting one image's matrix products.
struct Embedder<'e> {
    plan: Plan<'e>,
    workers: usize,
}

enum Plan<'e> {
    Batch(Box<BatchEncoder>),
    Single(&'e Encoder),
}

impl<'e> Embedder<'e> {
    fn plan(encoder: &'e Encoder, batch: usize, workers: usize) -> Self {
        let plan = if encoder.file_bytes() > BATCH_PLAN_MAX_FILE_BYTES {
            tracing::info!(
                file_mib = encoder.file_bytes() >> 20,
                "the encoder is too large for a second plan; ingest embeds one image at a time"
            );
            Plan::Single(encoder)
        } else {
            // Even at batch 1 a plan of its own: one thread per plan run,
            // whatever the caller's plan was made with.
            match encoder.batch_encoder(batch, 1) {
                Ok(plan) => Plan::Batch(Box::new(plan)),
                Err(e) => {
                    tracing::warn!(error = %e, batch, "no batch plan; ingest embeds one image at a time");
                    Plan::Single(encoder)
                }
            }
        };
        Embedder { plan, workers }
    }

    /// Images per run of the plan.
    fn batch(&self) -> usize {
        match &self.plan {
            Plan::Batch(plan) => plan.batch(),
            Plan::Single(_) => 1,
        }
    }

    /// Images embedded at once: a batch for each worker.
    fn group(&self) -> usize {
        self.batch() * self.workers
    }

    /// One result per tensor, in order.
    fn embed(&self, tensors: &[&[f32]]) -> Vec<Result<Embedding, EncoderError>> {
        let share = tensors.len().div_ceil(self.workers).div_ceil(self.batch()) * self.batch();
        if share >= tensors.len() {
            return self.embed_on_this_thread(tensors);
        }
        std::thread::scope(|scope| {
            let runs: Vec<_> = tensors
                .chunks(share.max(1))
                .map(|chunk| {
                    (
                        chunk.len(),
                        scope.spawn(|| self.embed_on_this_thread(chunk)),
                    )
                })
                .collect();
            runs.into_iter()
                .flat_map(|(len, run)| {
                    run.join().unwrap_or_else(|_| {
                        (0..len)
                            .map(|_| {
                                Err(EncoderError::Inference {
                                    message: "the embedding thread panicked".into(),
                                })
                            })
                            .collect()
                    })
                })
                .collect()
        })
    }

    fn embed_on_this_thread(&self, tensors: &[&[f32]]) -> Vec<Result<Embedding, EncoderError>> {
        match &self.plan {
            Plan::Batch(plan) => match plan.embed_tensors(tensors) {
                Ok(embeddings) => embeddings,
                Err(e) => {
                    let reason = e.to_string();
                    tensors
                        .iter()
                        .map(|_| {
                            Err(EncoderError::Inference {
                                message: reason.clone(),
                            })
                        })
                        .collect()
                }
            },
            Plan::Single(encoder) => tensors
                .iter()
                .map(|tensor| encoder.embed_tensor(tensor))
                .collect(),
        }
    }
}

/// The writing side of [`ingest_in_batches`]: embedded cases waiting for a
/// flush, and how many rows are settled (stored, or refused).
struct Writer<'a> {
    store: &'a CaseStore,
    encoder: &'a Encoder,
    options: IngestOptions,
    summary: &'a mut IngestSummary,
    cases: Vec<Embedded>,
    settled: usize,
    flushed: usize,
    total: usize,
}

impl Writer<'_> {
    fn reject(&mut self, row: &LabelledImage, reason: &dyn std::fmt::Display) {
        self.summary.rejected.push(RejectedRow {
            line: row.line,
            image: row.image.clone(),
            reason: reason.to_string(),
        });
        self.settled += 1;
    }

    fn embed(&mut self, embedder: &Embedder<'_>, waiting: &mut Vec<(&LabelledImage, Photo)>) {
        if waiting.is_empty() {
            return;
        }
        let tensors: Vec<&[f32]> = waiting.iter().map(|(_, p)| p.tensor.as_slice()).collect();
        let embeddings = embedder.embed(&tensors);
        for ((row, photo), embedding) in waiting.drain(..).zip(embeddings) {
            match embedding {
                Ok(embedding) => {
                    self.cases.push(case_from_row(
                        self.encoder,
                        row,
                        self.options,
                        embedding,
                        photo,
                    ));
                    self.settled += 1;
                }
                Err(reason) => self.reject(row, &reason),
            }
        }
    }

    fn flush(
        &mut self,
        progress: &mut impl FnMut(IngestProgress) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, IngestError> {
        let writes: Vec<CaseWrite<'_>> = self
            .cases
            .iter()
            .map(|(case, original)| CaseWrite {
                case,
                original: original.as_ref(),
            })
            .collect();
        self.store.insert_with_originals(&writes)?;
        self.summary.ingested += self.cases.len();
        self.cases.clear();
        self.flushed = self.settled;
        Ok(progress(IngestProgress {
            done: self.settled,
            total: self.total,
        }))
    }
}

type Embedded = (Case, Option<OriginalPhoto>);

/// Everything of a row but its embedding, on the reading thread.
fn prepare(
    encoder: &Encoder,
    images: &Path,
    row: &LabelledImage,
    options: IngestOptions,
) -> Prepared {
    let path = images.join(&row.image);
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => RowError::NotFound(path.display().to_string()),
        _ => RowError::Unreadable {
            path: path.display().to_string(),
            source: e,
        },
    })?;
    let photo = decode_rgb(&bytes, DecodeBudget::default())?;
    let tensor = encoder.preprocess(&photo)?;
    let thumbnail_jpeg = thumbnail_jpeg(&photo)?;
    let original = if options.keep_originals {
        Some(original_from_bytes(&bytes, &photo)?)
    } else {
        None
    };
    Ok(Photo {
        tensor,
        thumbnail_jpeg,
        original,
    })
}

fn case_from_row(
    encoder: &Encoder,
    row: &LabelledImage,
    options: IngestOptions,
    embedding: Embedding,
    photo: Photo,
) -> Embedded {
    let Photo {
        thumbnail_jpeg,
        original,
        ..
    } = photo;
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
    (case, original)
}
