//! `dermascope ingest`: labelled photographs into the case store (the work
//! is `dermascope_library::ingest`; this is its command line).

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use dermascope_encoder::Encoder;
use dermascope_library::{
    ingest, read_labels, IngestOptions, IngestProgress, IngestSummary, LabelledImage, ProgressLine,
};
use dermascope_store::{CaseSource, CaseStore, Residency};

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

/// [`ingest`] with a progress line on stderr.
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

/// A progress line on stderr for photographs being embedded
/// (`ingest: 1200/4176 images, 14.2/s, about 3 min 30 s left`, no file
/// names): redrawn in place at most every second on a terminal, a line at
/// most every 10 s where stderr is a log.
pub struct IngestBar {
    line: ProgressLine,
    terminal: bool,
    drawn: bool,
}

impl Default for IngestBar {
    fn default() -> Self {
        Self::new()
    }
}

impl IngestBar {
    pub fn new() -> Self {
        let terminal = std::io::stderr().is_terminal();
        let interval = if terminal {
            dermascope_library::ingest::TERMINAL_INTERVAL
        } else {
            dermascope_library::ingest::LOG_INTERVAL
        };
        Self {
            line: ProgressLine::new(interval),
            terminal,
            drawn: false,
        }
    }

    pub fn update(&mut self, p: IngestProgress) -> ControlFlow<()> {
        if let Some(text) = self.line.update(p, Instant::now()) {
            if self.terminal {
                eprint!("\r\x1b[2K{text}");
            } else {
                eprintln!("{text}");
            }
            self.drawn = true;
        }
        ControlFlow::Continue(())
    }

    /// Ends the line; the next update starts a new one.
    pub fn finish(&mut self) {
        if self.terminal && self.drawn {
            eprintln!();
        }
        *self = Self::new();
    }
}
