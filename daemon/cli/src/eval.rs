//! `dermascope eval`: every method on the same split, side by side.
//!
//! Retrieval over raw encoder embeddings, retrieval over adapter
//! embeddings, the adapter's own prediction, and the adapter combined with
//! kNN, all scored by `dermascope-eval` on one lesion-grouped split (or a
//! given query set), with breakdowns by sex, age band and anatomical site.
//!
//! Embeddings are cached in an evaluation store (never the device's case
//! library), so a rerun only embeds what is new. The adapter is trained on
//! the reference side only (with its own lesion-grouped validation split for
//! early stopping) and scored as tract runs it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use dermascope_adapter::{AdapterOutput, LabelledEmbedding};
use dermascope_encoder::Encoder;
use dermascope_eval::{
    grouped_split, knn_distribution, knn_vote, precision_at_k, ClassificationReport, Neighbour,
    Vote,
};
use dermascope_store::{
    CaseFilter, CaseSource, CaseStore, CaseTags, FlatIndex, Residency, ScoreKind, Sex,
};
use serde::Serialize;

use crate::adapter::{train_and_install, TrainingArgs};
use crate::ingest::ingest_with_progress;
use crate::{open_store_at, EncoderArgs};
use dermascope_library::{read_labels, IngestOptions, LabelledImage};

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

const KS: [usize; 3] = [1, 5, 10];
const PRECISION_KS: [usize; 3] = [1, 3, 5];
/// kNN used in the combination with the adapter's probabilities.
const COMBINED_K: usize = 10;

#[derive(Serialize)]
struct MethodResult {
    method: String,
    #[serde(flatten)]
    report: ClassificationReport,
}

#[derive(Serialize)]
struct Retrieval {
    space: &'static str,
    /// precision@k for k = 1, 3, 5.
    precision_at: BTreeMap<usize, f64>,
}

#[derive(Serialize)]
struct GroupResult {
    attribute: &'static str,
    group: String,
    n: usize,
    /// method -> (accuracy, balanced accuracy) within the group.
    methods: BTreeMap<String, (f64, f64)>,
}

#[derive(Serialize)]
struct EvaluationReport {
    model_id: String,
    raw_score: &'static str,
    references: usize,
    queries: usize,
    split: String,
    adapter_id: String,
    adapter_training_s: f64,
    retrieval: Vec<Retrieval>,
    methods: Vec<MethodResult>,
    breakdowns: Vec<GroupResult>,
}

pub(crate) struct Labelled {
    pub(crate) row: LabelledImage,
    pub(crate) embedding: Vec<f32>,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    let encoder = args.encoder.load(Some(1))?;
    let store_path = args
        .store
        .clone()
        .unwrap_or_else(|| PathBuf::from("var/eval").join(encoder.model_id()));
    // The store is only an embedding cache here; scoring uses its own index.
    let store = open_store_at(&store_path, &encoder, Residency::Int8)?;
    let (references, queries, split) = split_rows(args, &store, &encoder)?;
    if references.is_empty() || queries.is_empty() {
        bail!(
            "nothing to evaluate: {} references, {} queries",
            references.len(),
            queries.len()
        );
    }
    let classes: Vec<String> = {
        let mut c: Vec<String> = references
            .iter()
            .chain(&queries)
            .map(|r| r.row.diagnosis.code.clone())
            .collect();
        c.sort();
        c.dedup();
        c
    };
    let truth: Vec<&str> = queries
        .iter()
        .map(|q| q.row.diagnosis.code.as_str())
        .collect();

    // Raw encoder space.
    let raw_kind = if args.int8 {
        ScoreKind::Int8
    } else {
        ScoreKind::F32
    };
    let raw_refs: Vec<&[f32]> = references.iter().map(|r| r.embedding.as_slice()).collect();
    let raw_queries: Vec<&[f32]> = queries.iter().map(|q| q.embedding.as_slice()).collect();
    let raw = neighbours(&references, &raw_refs, &raw_queries, raw_kind)?;

    // The adapter, trained on the references only.
    let examples: Vec<LabelledEmbedding> = references
        .iter()
        .map(|r| LabelledEmbedding {
            embedding: r.embedding.clone(),
            label: r.row.diagnosis.code.clone(),
            model_id: encoder.model_id().to_string(),
            lesion: lesion_of(&r.row),
        })
        .collect();
    let adapter_dir = store_path.join("adapter");
    let (adapter, training) = train_and_install(&examples, &args.training, &adapter_dir)?;
    eprintln!(
        "adapter trained in {:.2} s ({} epochs, best {})",
        training.wall_time_s, training.epochs_run, training.best_epoch
    );
    let ref_out = adapter.predict_many(&raw_refs)?;
    let query_out = adapter.predict_many(&raw_queries)?;
    let adapter_refs: Vec<&[f32]> = ref_out.iter().map(|o| o.embedding.as_slice()).collect();
    let adapter_queries: Vec<&[f32]> = query_out.iter().map(|o| o.embedding.as_slice()).collect();
    let adapted = neighbours(&references, &adapter_refs, &adapter_queries, ScoreKind::F32)?;

    let mut methods = Vec::new();
    let mut predictions: Vec<(String, Vec<String>)> = Vec::new();
    for (space, hits) in [("raw", &raw), ("adapter-space", &adapted)] {
        for k in KS {
            let votes: &[(Vote, &str)] = if k == 1 {
                &[(Vote::Majority, "")]
            } else {
                &[
                    (Vote::Majority, " majority"),
                    (Vote::SimilarityWeighted, " weighted"),
                ]
            };
            for (vote, name) in votes {
                let predicted: Vec<String> = hits
                    .iter()
                    .map(|n| knn_vote(n, k, *vote).unwrap_or_default())
                    .collect();
                predictions.push((format!("{space} kNN k={k}{name}"), predicted));
            }
        }
    }
    let adapter_classes = adapter.classes();
    predictions.push((
        "adapter prediction".to_string(),
        query_out
            .iter()
            .map(|o| adapter_classes[o.predicted].clone())
            .collect(),
    ));
    let (combined, combined_confidence) =
        combine(&query_out, &adapted, adapter_classes, COMBINED_K);
    predictions.push((format!("adapter + kNN k={COMBINED_K} weighted"), combined));
    let adapter_confidence: Vec<f64> = query_out
        .iter()
        .map(|o| f64::from(o.probabilities[o.predicted]))
        .collect();
    for (method, predicted) in &predictions {
        let predicted: Vec<&str> = predicted.iter().map(String::as_str).collect();
        // Calibration applies where a method gives a probability.
        let confidence = if method == "adapter prediction" {
            Some(adapter_confidence.as_slice())
        } else if method.starts_with("adapter + kNN") {
            Some(combined_confidence.as_slice())
        } else {
            None
        };
        methods.push(MethodResult {
            method: method.clone(),
            report: ClassificationReport::new(&classes, &truth, &predicted, confidence),
        });
    }

    let retrieval = vec![
        retrieval_figures("raw", &raw, &truth),
        retrieval_figures("adapter-space", &adapted, &truth),
    ];
    let breakdowns = breakdowns(&queries, &truth, &predictions, &classes, &methods);
    let report = EvaluationReport {
        model_id: encoder.model_id().to_string(),
        raw_score: if args.int8 { "int8" } else { "f32" },
        references: references.len(),
        queries: queries.len(),
        split,
        adapter_id: adapter.adapter_id().to_string(),
        adapter_training_s: training.wall_time_s,
        retrieval,
        methods,
        breakdowns,
    };
    print_report(&report, &classes);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn lesion_of(row: &LabelledImage) -> String {
    row.lesion_id
        .clone()
        .unwrap_or_else(|| row.case_id.as_str().to_string())
}

type Rows = (Vec<Labelled>, Vec<Labelled>, String);

fn split_rows(args: &EvalArgs, store: &CaseStore, encoder: &Encoder) -> anyhow::Result<Rows> {
    let rows = embedded_rows(
        store,
        encoder,
        &args.images,
        &args.labels,
        args.encoder.threads,
    )?;
    if let (Some(images), Some(labels)) = (&args.queries_images, &args.queries_labels) {
        let queries = embedded_rows(store, encoder, images, labels, args.encoder.threads)?;
        return Ok((rows, queries, "separate query set".to_string()));
    }
    if rows.iter().any(|r| r.row.lesion_id.is_none()) {
        bail!(
            "{} has rows without lesion_id: a lesion-grouped split is impossible; \
             give a separate query set with --queries-images/--queries-labels",
            args.labels.display()
        );
    }
    let labels: Vec<&str> = rows.iter().map(|r| r.row.diagnosis.code.as_str()).collect();
    let groups: Vec<String> = rows.iter().map(|r| lesion_of(&r.row)).collect();
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    let split = grouped_split(&labels, &groups, args.query_fraction, args.seed);
    let mut references = Vec::new();
    let mut queries = Vec::new();
    for (item, is_query) in rows.into_iter().zip(split.is_query) {
        if is_query {
            queries.push(item);
        } else {
            references.push(item);
        }
    }
    let description = format!(
        "lesion-grouped, {:.0}% of each diagnosis's lesions held out, seed {}",
        args.query_fraction * 100.0,
        args.seed
    );
    Ok((references, queries, description))
}

/// Top neighbours of every query among the references, in one space.
fn neighbours(
    references: &[Labelled],
    reference_vectors: &[&[f32]],
    query_vectors: &[&[f32]],
    kind: ScoreKind,
) -> anyhow::Result<Vec<Vec<Neighbour>>> {
    let dim = reference_vectors.first().map_or(0, |v| v.len());
    let residency = match kind {
        ScoreKind::F32 => Residency::F32,
        ScoreKind::Int8 => Residency::Int8,
    };
    let mut index = FlatIndex::with_residency(dim, residency)?;
    let mut label_of: HashMap<String, String> = HashMap::new();
    for (item, vector) in references.iter().zip(reference_vectors) {
        index.upsert(
            item.row.case_id.clone(),
            vector,
            &CaseTags {
                diagnosis_code: item.row.diagnosis.code.clone(),
                source: CaseSource::Reference,
                anatomical_site: item.row.anatomical_site.clone(),
                label_confirmed: true,
            },
        )?;
        label_of.insert(
            item.row.case_id.as_str().to_string(),
            item.row.diagnosis.code.clone(),
        );
    }
    let k_max = KS.iter().chain(&PRECISION_KS).copied().max().unwrap_or(10);
    let hits = index.search_batch(query_vectors, k_max, &CaseFilter::any(), kind)?;
    Ok(hits
        .iter()
        .map(|row| {
            row.iter()
                .map(|hit| Neighbour {
                    label: label_of.get(hit.id.as_str()).cloned().unwrap_or_default(),
                    similarity: hit.score,
                })
                .collect()
        })
        .collect())
}

/// Mean of the adapter's probabilities and the similarity-weighted kNN
/// distribution in the adapter's space: the classifier's calibrated view
/// and the library's local evidence, equally weighted.
fn combine(
    outputs: &[AdapterOutput],
    hits: &[Vec<Neighbour>],
    classes: &[String],
    k: usize,
) -> (Vec<String>, Vec<f64>) {
    let mut predicted = Vec::with_capacity(outputs.len());
    let mut confidence = Vec::with_capacity(outputs.len());
    for (out, neighbours) in outputs.iter().zip(hits) {
        let votes = knn_distribution(neighbours, k, Vote::SimilarityWeighted, classes);
        let mixed: Vec<f64> = out
            .probabilities
            .iter()
            .zip(&votes)
            .map(|(p, v)| 0.5 * f64::from(*p) + 0.5 * v)
            .collect();
        let (best, p) = mixed
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, p)| (i, *p))
            .unwrap_or((0, 0.0));
        predicted.push(classes[best].clone());
        confidence.push(p);
    }
    (predicted, confidence)
}

fn retrieval_figures(space: &'static str, hits: &[Vec<Neighbour>], truth: &[&str]) -> Retrieval {
    let precision_at = PRECISION_KS
        .iter()
        .map(|&k| {
            let total: f64 = hits
                .iter()
                .zip(truth)
                .map(|(n, t)| precision_at_k(n, k, t))
                .sum();
            (k, total / truth.len().max(1) as f64)
        })
        .collect();
    Retrieval {
        space,
        precision_at,
    }
}

fn age_band(age: Option<u16>) -> Option<String> {
    Some(
        match age? {
            0..=29 => "<30",
            30..=49 => "30-49",
            50..=69 => "50-69",
            _ => "70+",
        }
        .to_string(),
    )
}

/// Accuracy and balanced accuracy per sex, age band and site, for the best
/// raw kNN, the best adapter-space kNN, the adapter and the combination.
fn breakdowns(
    queries: &[Labelled],
    truth: &[&str],
    predictions: &[(String, Vec<String>)],
    classes: &[String],
    methods: &[MethodResult],
) -> Vec<GroupResult> {
    let best_of = |prefix: &str| {
        methods
            .iter()
            .filter(|m| m.method.starts_with(prefix))
            .max_by(|a, b| {
                a.report
                    .balanced_accuracy
                    .total_cmp(&b.report.balanced_accuracy)
            })
            .map(|m| m.method.clone())
    };
    let mut chosen: Vec<String> = [best_of("raw kNN"), best_of("adapter-space kNN")]
        .into_iter()
        .flatten()
        .collect();
    chosen.push("adapter prediction".to_string());
    chosen.push(format!("adapter + kNN k={COMBINED_K} weighted"));

    type Attribute = (&'static str, fn(&LabelledImage) -> Option<String>);
    let attributes: [Attribute; 3] = [
        ("sex", |r| {
            r.sex.map(|s| {
                match s {
                    Sex::Female => "female",
                    Sex::Male => "male",
                    Sex::Other => "other",
                }
                .to_string()
            })
        }),
        ("age", |r| age_band(r.age_years)),
        ("site", |r| r.anatomical_site.clone()),
    ];
    let mut out = Vec::new();
    for (attribute, value_of) in attributes {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, q) in queries.iter().enumerate() {
            if let Some(value) = value_of(&q.row) {
                groups.entry(value).or_default().push(i);
            }
        }
        for (group, members) in groups {
            let group_truth: Vec<&str> = members.iter().map(|&i| truth[i]).collect();
            let mut figures = BTreeMap::new();
            for method in &chosen {
                if let Some((_, predicted)) = predictions.iter().find(|(m, _)| m == method) {
                    let group_predicted: Vec<&str> =
                        members.iter().map(|&i| predicted[i].as_str()).collect();
                    let r =
                        ClassificationReport::new(classes, &group_truth, &group_predicted, None);
                    figures.insert(method.clone(), (r.accuracy, r.balanced_accuracy));
                }
            }
            out.push(GroupResult {
                attribute,
                group,
                n: members.len(),
                methods: figures,
            });
        }
    }
    out
}

/// Ingests (resumably) and returns every accepted row with its embedding.
pub(crate) fn embedded_rows(
    store: &CaseStore,
    encoder: &Encoder,
    images: &std::path::Path,
    labels: &std::path::Path,
    workers: u16,
) -> anyhow::Result<Vec<Labelled>> {
    let file = read_labels(labels)?;
    // A label outside the known diagnoses would silently shrink a class or
    // drop one: training and evaluation stop instead.
    let unknown: Vec<String> = file
        .rejected
        .iter()
        .filter(|r| r.is_unknown_label())
        .map(|r| format!("  line {}: {}", r.line, r.reason))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "{} has {} rows whose label is not a known diagnosis:\n{}\nfix or remove those rows",
            labels.display(),
            unknown.len(),
            unknown
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let summary = ingest_with_progress(
        store,
        encoder,
        images,
        &file.rows,
        IngestOptions {
            source: CaseSource::Reference,
            workers: usize::from(workers),
            keep_originals: false,
        },
    )?;
    let rejected = file.rejected.len() + summary.rejected.len();
    if rejected > 0 {
        eprintln!(
            "{rejected} rows of {} could not be used (run `dermascope ingest` to see why)",
            labels.display()
        );
    }
    let mut out = Vec::with_capacity(file.rows.len());
    for row in file.rows {
        if let Some(case) = store.get(&row.case_id)? {
            out.push(Labelled {
                embedding: case.embedding,
                row,
            });
        }
    }
    Ok(out)
}

fn print_report(report: &EvaluationReport, classes: &[String]) {
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
    if !report.breakdowns.is_empty() {
        println!("breakdown (accuracy / balanced accuracy per group):");
        let methods: Vec<&String> = report.breakdowns[0].methods.keys().collect();
        let mut header = format!("{:<26}{:>6}", "group", "n");
        for m in &methods {
            header.push_str(&format!("  {:>28}", truncate(m, 28)));
        }
        println!("{header}");
        for g in &report.breakdowns {
            let mut line = format!(
                "{:<26}{:>6}",
                truncate(&format!("{}={}", g.attribute, g.group), 26),
                g.n
            );
            for m in &methods {
                let (acc, bal) = g.methods.get(*m).copied().unwrap_or((f64::NAN, f64::NAN));
                line.push_str(&format!("  {:>28}", format!("{acc:.3} / {bal:.3}")));
            }
            println!("{line}");
        }
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        text.chars().take(width - 1).collect::<String>() + "…"
    }
}
