//! `dermascope adapter train|index|show|rollback`: the adapter trained on
//! the device.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use dermascope_library::evaluation::{embedded_rows, LabelledFolder};
use dermascope_library::{
    confirmed_cases, index_adapter_space, load_installed, previous_dir, read_manifest, rollback,
    TrainingOptions, TrainingPlan,
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
    /// Put back the adapter a retraining (or `adapter train`) replaced; the
    /// one it replaces is kept, so a second rollback undoes the first. The
    /// daemon uses it from its next start.
    Rollback(ShowArgs),
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
        AdapterCommand::Rollback(args) => rollback_command(args),
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
    // Before anything is written over it: what `adapter rollback` restores.
    let kept = dermascope_library::training::keep_previous(&dir)?;
    let (adapter, report) = plan.install(&dir)?;
    print!("{}", report.to_text());
    println!(
        "installed in {} ({:.1} s including the report)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    if let Some(kept) = kept.filter(|k| k.adapter_id != adapter.adapter_id()) {
        println!(
            "the adapter it replaced ({}) is kept in {}: `dermascope adapter rollback` restores it",
            kept.adapter_id,
            previous_dir(&dir).display()
        );
    }
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

fn rollback_command(args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let dir = args.adapter.path();
    let previous = previous_dir(&dir);
    if !previous.join(dermascope_adapter::MANIFEST_FILE).is_file() {
        bail!(
            "nothing to roll back to: no earlier adapter is kept in {} (one is kept when a \
             retraining or `dermascope adapter train` replaces the installed adapter); {} is \
             unchanged",
            previous.display(),
            dir.display()
        );
    }
    let replaced = installed_id(&dir);
    let restored =
        rollback(&dir).with_context(|| format!("rolling back the adapter in {}", dir.display()))?;
    println!(
        "restored adapter {} (trained {}, {} training cases) in {}",
        restored.adapter_id,
        utc_minute(restored.created_at_ms),
        restored.training.train_cases,
        dir.display()
    );
    if let Some(replaced) = replaced {
        println!(
            "the adapter it replaced ({replaced}) is kept in {}: a second rollback restores it",
            previous.display()
        );
    }
    println!("a running daemon uses it from its next start");
    Ok(ExitCode::SUCCESS)
}

/// The installed adapter's id, when its manifest reads.
fn installed_id(dir: &Path) -> Option<String> {
    read_manifest(dir).ok().map(|m| m.adapter_id)
}

/// `YYYY-MM-DD HH:MM UTC` (the device has no time zone setting).
fn utc_minute(at_ms: u64) -> String {
    let minutes = at_ms / 60_000;
    let days = (minutes / 1440) as i64;
    // Howard Hinnant's days-to-civil, for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        (minutes / 60) % 24,
        minutes % 60
    )
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

#[cfg(test)]
mod tests {
    use super::utc_minute;

    #[test]
    fn trained_when_is_the_utc_calendar_minute() {
        assert_eq!(utc_minute(0), "1970-01-01 00:00 UTC");
        // A leap day, and a date in this century's calendar.
        assert_eq!(utc_minute(951_786_060_000), "2000-02-29 01:01 UTC");
        assert_eq!(utc_minute(1_796_180_820_000), "2026-12-02 03:07 UTC");
    }
}
