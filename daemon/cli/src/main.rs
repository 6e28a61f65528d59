//! `dermascope`: the daemon and the command line a clinic's IT person or a
//! fleet operator scripts against.

mod adapter;
mod embed;
mod eval;
mod ingest;
mod paths;
mod reembed;
mod run;
mod search;
mod training;
mod update;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dermascope_encoder::{Encoder, EncoderOptions, VariantChoice};
use dermascope_store::{CaseStore, OpenOptions, Residency, StoreIdentity};

#[derive(Parser, Debug)]
#[command(
    name = "dermascope",
    version,
    about = "Point-of-care dermoscopy: embed a lesion, find similar confirmed cases"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Embed lesion photographs (JPEG or PNG) and print their embeddings.
    Embed(embed::EmbedArgs),
    /// Add labelled photographs to the case store (resumable).
    Ingest(ingest::IngestArgs),
    /// Find the confirmed cases most similar to a photograph.
    Search(search::SearchArgs),
    /// Count the stored cases per diagnosis and source.
    Cases(search::CasesArgs),
    /// Compare every method (raw and adapter retrieval, adapter, combined)
    /// on one lesion-grouped split of a labelled folder.
    Eval(eval::EvalArgs),
    /// Run the handheld daemon: button, camera, quality gate, search, screen.
    Run(run::RunArgs),
    /// Press a button of a running daemon through its control socket.
    Press(run::PressArgs),
    /// Train, index and inspect the adapter classifier.
    #[command(subcommand)]
    Adapter(adapter::AdapterCommand),
    Reembed(reembed::ReembedArgs),
    /// Install signed update bundles (from a USB stick), show the installed
    /// version, roll back; make and sign bundles.
    #[command(subcommand)]
    Update(update::UpdateCommand),
}

/// The case store's location.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Case store directory. Default: $DERMASCOPE_STORE, else var/cases.
    #[arg(long = "store", value_name = "DIR")]
    pub store: Option<PathBuf>,
}

impl StoreArgs {
    pub fn path(&self) -> PathBuf {
        paths::case_store(self.store.as_ref())
    }
}

/// Opens the case store for `encoder`'s embeddings, keeping only the index
/// copy the command scores with: both copies of 100k cases take 2.2 s and
/// 1 GB to load, one takes 0.2 s (int8) or 0.9 s (f32).
pub fn open_store(
    args: &StoreArgs,
    encoder: &Encoder,
    residency: Residency,
) -> anyhow::Result<CaseStore> {
    open_store_at(&args.path(), encoder, residency)
}

pub fn open_store_at(
    path: &std::path::Path,
    encoder: &Encoder,
    residency: Residency,
) -> anyhow::Result<CaseStore> {
    let store = CaseStore::open_with(
        path,
        StoreIdentity {
            model_id: encoder.model_id().to_string(),
            embedding_dim: encoder.dim(),
        },
        OpenOptions {
            residency,
            ..OpenOptions::default()
        },
    )
    .with_context(|| format!("opening the case store at {}", path.display()))?;
    let report = store.open_report();
    if !report.corrupt.is_empty() {
        tracing::warn!(
            damaged = report.corrupt.len(),
            "damaged records were left out of the index; `dermascope cases` lists them"
        );
    }
    Ok(store)
}

/// Where the encoder comes from and how it runs; shared by every command that embeds.
#[derive(Args, Debug, Clone)]
pub struct EncoderArgs {
    /// Encoder bundle directory (with manifest.toml). Default: $DERMASCOPE_MODEL_DIR,
    /// then ./models/dist/sklesion-xception, then /usr/share/dermascope/models/sklesion-xception.
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Encoder variant from the bundle's manifest (fp32, int8); default: int8
    /// on CPUs with int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI,
    /// Arm dot product), where it is the faster one, else fp32.
    #[arg(long)]
    pub variant: Option<String>,
    /// Run an int8 --variant even on an x86_64 CPU without int8 dot-product
    /// instructions, where tract's int8 kernel is many times slower than
    /// fp32 (refused otherwise).
    #[arg(long)]
    pub allow_slow_int8: bool,
    /// Threads for the encoder's matrix products.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
}

impl EncoderArgs {
    /// Loads the encoder these flags name. Commands that embed several
    /// photographs in parallel pass `per_image_threads = Some(1)` and use
    /// `threads` as their worker count instead.
    pub fn load(&self, per_image_threads: Option<usize>) -> anyhow::Result<Encoder> {
        let bundle = paths::encoder_bundle(self.bundle.as_ref());
        let mut options = self.options();
        if let Some(threads) = per_image_threads {
            options.threads = threads;
        }
        Encoder::load(&bundle, &options)
            .with_context(|| format!("loading the encoder from {}", bundle.display()))
    }

    pub fn options(&self) -> EncoderOptions {
        EncoderOptions {
            variant: VariantChoice::from_name(self.variant.as_deref()),
            threads: usize::from(self.threads),
            allow_slow_int8: self.allow_slow_int8,
            ..EncoderOptions::default()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let outcome = match cli.command {
        Command::Embed(args) => embed::run(&args),
        Command::Ingest(args) => ingest::run(&args),
        Command::Search(args) => search::search(&args),
        Command::Cases(args) => search::cases(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Adapter(command) => adapter::run(&command),
        Command::Run(args) => run::run(&args),
        Command::Press(args) => run::press(&args),
        Command::Reembed(args) => reembed::run(&args),
        Command::Update(command) => update::run(&command),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default_filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr so that stdout stays machine-readable for scripts;
    // colours only on a terminal, so journald and log files get plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
