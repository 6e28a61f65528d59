//! `dermascope eval`: every method on the same split, side by side (the
//! work is `dermascope_library::evaluation`; this is its command line).
//!
//! Embeddings are cached in an evaluation store (never the device's case
//! library), so a rerun only embeds what is new.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dermascope_library::evaluation::LabelledFolder;
use dermascope_library::{evaluate, EvaluationOptions, EvaluationReport, EvaluationStep};
use dermascope_store::{Residency, ScoreKind};

use crate::ingest::{warn_unusable, IngestBar};
use crate::training::{announce, TrainingArgs};
use crate::{open_store_at, EncoderArgs};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long, value_name = "DIR")]
    images: PathBuf,
    #[arg(long, value_name = "CSV")]
    labels: PathBuf,
    /// A separate query set; without it, a lesion-grouped split of --labels.
    #[arg(long, value_name = "DIR", requires = "queries_labels")]
    queries_images: Option<PathBuf>,
    #[arg(long, value_name = "CSV", requires = "queries_images")]
    queries_labels: Option<PathBuf>,
    /// Fraction of each diagnosis's lesions held out as queries.
    #[arg(long, default_value_t = 0.2)]
    query_fraction: f64,
    /// Seed of the query split.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Score raw-embedding retrieval with the int8 copy of the index.
    #[arg(long)]
    int8: bool,
    /// Embedding cache; default var/eval/<model id>.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Also print the results as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    training: TrainingArgs,
    #[command(flatten)]
    encoder: EncoderArgs,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    let encoder = args.encoder.load(Some(1))?;
    let store_path = args
        .store
        .clone()
        .unwrap_or_else(|| PathBuf::from("var/eval").join(encoder.model_id()));
    // The store is only an embedding cache here; scoring uses its own index.
    let store = open_store_at(&store_path, &encoder, Residency::Int8)?;
    let options = EvaluationOptions {
        references: LabelledFolder {
            images: args.images.clone(),
            labels: args.labels.clone(),
        },
        queries: match (&args.queries_images, &args.queries_labels) {
            (Some(images), Some(labels)) => Some(LabelledFolder {
                images: images.clone(),
                labels: labels.clone(),
            }),
            _ => None,
        },
        query_fraction: args.query_fraction,
        seed: args.seed,
        raw_score: if args.int8 {
            ScoreKind::Int8
        } else {
            ScoreKind::F32
        },
        training: (&args.training).into(),
        adapter_dir: store_path.join("adapter"),
        workers: usize::from(args.encoder.threads),
    };
    let mut bar = IngestBar::new();
    let report = evaluate(&store, &encoder, &options, |step| {
        match step {
            EvaluationStep::Embedding { progress, .. } => return bar.update(progress),
            EvaluationStep::Embedded { labels, unusable } => {
                bar.finish();
                warn_unusable(labels, unusable);
            }
            EvaluationStep::Training(plan) => announce(plan),
            EvaluationStep::Trained(training) => eprintln!(
                "adapter trained in {:.2} s ({} epochs, best {})",
                training.wall_time_s, training.epochs_run, training.best_epoch
            ),
        }
        ControlFlow::Continue(())
    })?;
    print_report(&report);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(report: &EvaluationReport) {
    let classes = &report.classes;
    println!(
        "evaluation over {} embeddings (raw scores {}): {} references, {} queries; {}",
        report.model_id, report.raw_score, report.references, report.queries, report.split
    );
    println!(
        "adapter {} trained on the references in {:.2} s",
        report.adapter_id, report.adapter_training_s
    );
    for r in &report.retrieval {
        let figures: Vec<String> = r
            .precision_at
            .iter()
            .map(|(k, p)| format!("p@{k} {p:.3}"))
            .collect();
        println!("{:<14} {}", r.space, figures.join("   "));
    }
    let mut header = format!(
        "{:<36}{:>9}{:>9}{:>10}{:>7}",
        "method", "accuracy", "bal.acc", "macro-F1", "ECE"
    );
    for class in classes {
        header.push_str(&format!("{:>8}", format!("R:{class}")));
    }
    println!("{header}");
    for method in &report.methods {
        let r = &method.report;
        let ece = r
            .expected_calibration_error
            .map_or("-".to_string(), |e| format!("{e:.3}"));
        let mut line = format!(
            "{:<36}{:>9.3}{:>9.3}{:>10.3}{:>7}",
            method.method, r.accuracy, r.balanced_accuracy, r.macro_f1, ece
        );
        for class in &r.per_class {
            line.push_str(&format!("{:>8.3}", class.recall));
        }
        println!("{line}");
    }
    print_two_class(report);
    print_decision_rules(report);
    if !report.breakdowns.is_empty() {
        println!("breakdown (accuracy / balanced accuracy per group):");
        let methods: Vec<String> = report.breakdowns[0]
            .methods
            .iter()
            .map(|(m, _)| m.to_string())
            .collect();
        let mut header = format!("{:<26}{:>6}", "group", "n");
        for m in &methods {
            header.push_str(&format!("  {:>28}", truncate(m, 28)));
        }
        println!("{header}");
        for g in &report.breakdowns {
            let mut line = format!(
                "{:<26}{:>6}",
                truncate(&format!("{}={}", g.attribute.name(), g.group), 26),
                g.n
            );
            for (_, f) in &g.methods {
                line.push_str(&format!(
                    "  {:>28}",
                    format!("{:.3} / {:.3}", f.accuracy, f.balanced_accuracy)
                ));
            }
            println!("{line}");
        }
    }
}

/// Melanoma against the other class, when the queries are two classes;
/// any other predicted class is a miss.
fn print_two_class(report: &EvaluationReport) {
    let Some(first) = report.methods.iter().find_map(|m| m.two_class.as_ref()) else {
        return;
    };
    println!(
        "two-class queries: {} {} against {} {} (any other predicted class is a miss)",
        first.positives, first.positive, first.negatives, first.negative
    );
    println!(
        "{:<36}{:>9}{:>13}{:>9}{:>8}",
        "method",
        format!("R:{}", first.positive),
        "specificity",
        "bal.acc",
        "AUC"
    );
    for method in &report.methods {
        if let Some(f) = &method.two_class {
            let auc = f.auc.map_or("-".to_string(), |a| format!("{a:.3}"));
            println!(
                "{:<36}{:>9.3}{:>13.3}{:>9.3}{:>8}",
                method.method, f.recall, f.specificity, f.balanced_accuracy, auc
            );
        }
    }
}

/// The adapter's melanoma flag and "no close match" rule on these queries.
fn print_decision_rules(report: &EvaluationReport) {
    match &report.operating_point {
        Some(op) => println!(
            "melanoma flag (combined score >= {:.4}, chosen on the adapter's validation split \
             for sensitivity {:.2}: there {:.3} / specificity {:.3}): on the queries \
             sensitivity {:.3} ({} melanomas), specificity {:.3} ({} others)",
            op.chosen.threshold,
            op.chosen.target_sensitivity,
            op.chosen.sensitivity,
            op.chosen.specificity,
            op.sensitivity,
            op.melanomas,
            op.specificity,
            op.others
        ),
        None => println!("melanoma flag: the adapter has no operating point"),
    }
    let Some(no_match) = &report.no_match else {
        println!("no close match: the adapter has no rule");
        return;
    };
    let rule = &no_match.rule;
    println!(
        "no close match (best adapter-space similarity < {:.4} or best raw similarity < {}, \
         each at the {:.2}% quantile of {} validation cases; together {} of them, target {:.0}%):",
        rule.min_top1_similarity,
        rule.min_top1_raw_similarity
            .map_or("-".to_string(), |m| format!("{m:.4}")),
        rule.space_quantile.unwrap_or(rule.quantile) * 100.0,
        rule.validation_queries,
        rule.validation_rate
            .map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0)),
        rule.quantile * 100.0,
    );
    println!(
        "{:<22}{:>6}{:>9}{:>14}{:>14}{:>10}{:>12}",
        "images", "n", "fires", "adapter fires", "median top-1", "raw fires", "raw median"
    );
    let rows = std::iter::once(("queries".to_string(), &no_match.queries)).chain(
        no_match
            .non_dermoscopy
            .iter()
            .map(|(kind, f)| (format!("drawn: {kind}"), f)),
    );
    for (name, f) in rows {
        println!(
            "{:<22}{:>6}{:>9.3}{:>14.3}{:>14.3}{:>10}{:>12.3}",
            truncate(&name, 22),
            f.n,
            f.either_rate,
            f.rate,
            f.median_top1,
            f.raw_rate.map_or("-".to_string(), |r| format!("{r:.3}")),
            f.median_top1_raw
        );
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        text.chars().take(width - 1).collect::<String>() + "…"
    }
}
