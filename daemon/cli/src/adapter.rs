//! `dermascope adapter train|index|show`: the adapter trained on the device.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use dermascope_library::evaluation::{embedded_rows, LabelledFolder};
use dermascope_library::{
    confirmed_cases, index_adapter_space, load_installed, TrainingOptions, TrainingPlan,
};
use dermascope_store::Residency;

use crate::ingest::{warn_unusable, IngestBar};
use crate::training::{announce, TrainingArgs};
use crate::{open_store, paths, EncoderArgs, StoreArgs};

#[derive(Subcommand, Debug)]
pub enum AdapterCommand {
    /// Train an adapter from the confirmed cases in the store (or a labelled
    /// folder), report it on a lesion-grouped validation split, install it,
    /// and index the store in its space.
    Train(TrainArgs),
    /// Compute the installed adapter's embeddings for every case that lacks
    /// one (resumable: rerun after an interruption).
    Index(IndexArgs),
    /// Print the installed adapter's manifest.
    Show(ShowArgs),
}

#[derive(Args, Debug, Clone)]
pub struct AdapterDirArgs {
    /// Adapter directory. Default: $DERMASCOPE_ADAPTER, else var/adapter.
    #[arg(long = "adapter", value_name = "DIR")]
    pub adapter: Option<PathBuf>,
}

impl AdapterDirArgs {
    pub fn path(&self) -> PathBuf {
        paths::adapter(self.adapter.as_ref())
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Train from this folder of photographs instead of the store's cases
    /// (with --labels; --store then names the embedding cache, default
    /// var/eval/<model id>).
    #[arg(long, value_name = "DIR", requires = "labels")]
    images: Option<PathBuf>,
    #[arg(long, value_name = "CSV", requires = "images")]
    labels: Option<PathBuf>,
    #[command(flatten)]
    training: TrainingArgs,
    #[command(flatten)]
    adapter: AdapterDirArgs,
    /// Also print the report as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    encoder: EncoderArgs,
}

#[derive(Args, Debug)]
pub struct IndexArgs {
    #[command(flatten)]
    adapter: AdapterDirArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    encoder: EncoderArgs,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    adapter: AdapterDirArgs,
}

pub fn run(command: &AdapterCommand) -> anyhow::Result<ExitCode> {
    match command {
        AdapterCommand::Train(args) => train_command(args),
        AdapterCommand::Index(args) => index_command(args),
        AdapterCommand::Show(args) => {
            let path = args.adapter.path().join(dermascope_adapter::MANIFEST_FILE);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "reading {}: no adapter installed? train one with `dermascope adapter train`",
                    path.display()
                )
            })?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn train_command(args: &TrainArgs) -> anyhow::Result<ExitCode> {
    let encoder = args.encoder.load(Some(1))?;
    let dir = args.adapter.path();
    let examples = match (&args.images, &args.labels) {
        (Some(images), Some(labels)) => {
            // With --images, --store names the embedding cache instead.
            let cache = args
                .store
                .store
                .clone()
                .unwrap_or_else(|| PathBuf::from("var/eval").join(encoder.model_id()));
            let store = crate::open_store_at(&cache, &encoder, Residency::Int8)?;
            let folder = LabelledFolder {
                images: images.clone(),
                labels: labels.clone(),
            };
            let mut bar = IngestBar::new();
            let embedded = embedded_rows(
                &store,
                &encoder,
                &folder,
                usize::from(args.encoder.threads),
                |p| bar.update(p),
            )?;
            bar.finish();
            warn_unusable(labels, embedded.unusable);
            embedded
                .rows
                .iter()
                .map(|r| r.to_example(encoder.model_id()))
                .collect()
        }
        _ => {
            let store = open_store(&args.store, &encoder, Residency::Int8)?;
            let confirmed = confirmed_cases(&store)?;
            if confirmed.unconfirmed > 0 {
                eprintln!(
                    "{} cases without a confirmed label were left out of training",
                    confirmed.unconfirmed
                );
            }
            confirmed.examples
        }
    };
    if examples.is_empty() {
        bail!(
            "no confirmed cases to train on: ingest labelled photographs first \
             (`dermascope ingest`) or give --images and --labels"
        );
    }
    let started = Instant::now();
    let plan = TrainingPlan::new(&examples, &TrainingOptions::from(&args.training))?;
    announce(&plan);
    let (adapter, report) = plan.install(&dir)?;
    print!("{}", report.to_text());
    println!(
        "installed in {} ({:.1} s including the report)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    if args.images.is_none() {
        let store = open_store(&args.store, &encoder, Residency::Int8)?;
        let computed = index_adapter_space(&store, &adapter)?;
        println!("adapter space: {computed} case embeddings computed");
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn index_command(args: &IndexArgs) -> anyhow::Result<ExitCode> {
    let encoder = args.encoder.load(Some(1))?;
    let adapter = load_installed(&args.adapter.path(), &encoder)?;
    let store = open_store(&args.store, &encoder, Residency::Int8)?;
    let computed = index_adapter_space(&store, &adapter)?;
    println!(
        "adapter space {}: {computed} case embeddings computed, {} cases searchable",
        adapter.adapter_id(),
        store.len()?
    );
    Ok(ExitCode::SUCCESS)
}
