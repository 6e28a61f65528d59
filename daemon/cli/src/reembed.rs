//! `dermascope reembed`: move the case library to another encoder bundle.

use std::ops::ControlFlow;
use std::process::ExitCode;

use clap::Args;
use dermascope_library::reembed::{reembed, ReembedOptions, ReembedOutcome};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{EncoderArgs, StoreArgs};

/// Re-embeds every case that has its original photograph with the encoder
/// given by --bundle, into a new store beside the library, then switches the
/// library to it in one atomic step; the old store is kept beside it.
/// Resumable: a rerun after a kill goes on where it stopped.
#[derive(Args, Debug)]
pub struct ReembedArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The new encoder (`--bundle DIR`; default as for every command).
    #[command(flatten)]
    encoder: EncoderArgs,
    /// Count what would be re-embedded and which cases lack an original.
    #[arg(long)]
    dry_run: bool,
    /// One JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &ReembedArgs) -> anyhow::Result<ExitCode> {
    let encoder = args.encoder.load(None)?;
    let library = args.store.path();
    let bar = ProgressBar::hidden();
    if !args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("re-embedding {wide_bar} {pos}/{len} cases, {eta} left")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    }
    let report = reembed(
        &library,
        &encoder,
        ReembedOptions {
            dry_run: args.dry_run,
            ..ReembedOptions::default()
        },
        |progress| {
            bar.set_length(progress.total as u64);
            bar.set_position(progress.done as u64);
            ControlFlow::Continue(())
        },
    )?;
    bar.finish_and_clear();
    let without: Vec<&str> = report
        .without_original
        .iter()
        .map(|id| id.as_str())
        .collect();
    if args.json {
        let line = serde_json::json!({
            "outcome": format!("{:?}", report.outcome).to_lowercase(),
            "from_model": report.from_model,
            "to_model": report.to_model,
            "cases": report.cases,
            "reembedded": report.reembedded,
            "resumed": report.resumed,
            "without_original": without,
            "unreadable": report.unreadable.iter().map(|(id, why)| serde_json::json!({"id": id.as_str(), "reason": why})).collect::<Vec<_>>(),
            "previous": report.previous.as_ref().map(|p| p.display().to_string()),
            "seconds": report.elapsed_s,
        });
        println!("{line}");
        return Ok(ExitCode::SUCCESS);
    }
    match report.outcome {
        ReembedOutcome::AlreadyCurrent => println!(
            "the library at {} already belongs to {}; nothing to do",
            library.display(),
            report.to_model
        ),
        ReembedOutcome::DryRun => println!(
            "{} cases of {}: {} would be re-embedded with {}, {} have no original photograph",
            report.cases,
            report.from_model,
            report.cases - report.without_original.len(),
            report.to_model,
            report.without_original.len()
        ),
        ReembedOutcome::Interrupted => println!("stopped; run again to finish"),
        ReembedOutcome::Switched => println!(
            "switched {} from {} to {}: {} cases re-embedded ({} by an earlier run) in {:.1} s",
            library.display(),
            report.from_model,
            report.to_model,
            report.reembedded + report.resumed,
            report.resumed,
            report.elapsed_s
        ),
    }
    if !without.is_empty() || !report.unreadable.is_empty() {
        println!(
            "not in the new library ({} without an original photograph, {} unreadable); \
             they stay in the previous store:",
            without.len(),
            report.unreadable.len()
        );
        for id in &without {
            println!("  {id}  no original photograph");
        }
        for (id, why) in &report.unreadable {
            println!("  {}  {why}", id.as_str());
        }
    }
    if let Some(previous) = &report.previous {
        println!("previous store kept at {}", previous.display());
    }
    Ok(ExitCode::SUCCESS)
}
