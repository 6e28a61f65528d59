//! `dermascope ingest`: labelled photographs into the case store (the work
//! is `dermascope_library::ingest`; this is its command line).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use dermascope_encoder::Encoder;
use dermascope_library::{
    ingest, read_labels, IngestOptions, IngestProgress, IngestSummary, LabelledImage,
};
use dermascope_store::{CaseSource, CaseStore, Residency};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{open_store, EncoderArgs, StoreArgs};

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
    /// Keep each photograph with its case (as JPEG), so the library can be
    /// re-embedded by another encoder (`dermascope reembed`); costs about
    /// the photographs' own size on disk.
    #[arg(long)]
    keep_originals: bool,
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

pub fn run(args: &IngestArgs) -> anyhow::Result<ExitCode> {
    // Parallelism comes from embedding several photographs at once, one
    // thread each, rather than from splitting one photograph's products.
    let encoder = args.encoder.load(Some(1))?;
    // Ingest never scores: the smallest copy keeps the index current.
    let store = open_store(&args.store, &encoder, Residency::Int8)?;
    let labels = read_labels(&args.labels)?;
    let mut summary = ingest_with_progress(
        &store,
        &encoder,
        &args.images,
        &labels.rows,
        IngestOptions {
            source: args.source.into(),
            workers: usize::from(args.encoder.threads),
            keep_originals: args.keep_originals,
        },
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

/// [`ingest`] with a progress bar on stderr.
pub fn ingest_with_progress(
    store: &CaseStore,
    encoder: &Encoder,
    images: &Path,
    rows: &[LabelledImage],
    options: IngestOptions,
) -> anyhow::Result<IngestSummary> {
    let mut bar = IngestBar::new();
    let summary = ingest(store, encoder, images, rows, options, |p| bar.update(p))?;
    bar.finish();
    Ok(summary)
}

/// Says on stderr how many rows of a labels file `eval` and `adapter train`
/// could not use (`dermascope ingest` lists each with its reason).
pub fn warn_unusable(labels: &Path, unusable: usize) {
    if unusable > 0 {
        eprintln!(
            "{unusable} rows of {} could not be used (run `dermascope ingest` to see why)",
            labels.display()
        );
    }
}

/// A progress bar on stderr for photographs being embedded, shown from the
/// first flushed batch on (nothing is drawn when every row is stored).
pub struct IngestBar(ProgressBar);

impl Default for IngestBar {
    fn default() -> Self {
        Self::new()
    }
}

impl IngestBar {
    pub fn new() -> Self {
        let bar = ProgressBar::hidden();
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} cases  {per_sec}  eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Self(bar)
    }

    pub fn update(&mut self, p: IngestProgress) -> ControlFlow<()> {
        if self.0.is_hidden() {
            self.0
                .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        self.0.set_length(p.total as u64);
        self.0.set_position(p.done as u64);
        ControlFlow::Continue(())
    }

    /// Clears the bar; the next update starts a new one.
    pub fn finish(&mut self) {
        self.0.finish_and_clear();
        *self = Self::new();
    }
}
