//! `dermascope eval retrieval`: how well do the nearest confirmed cases
//! predict a held-out lesion's diagnosis?
//!
//! Embeddings are cached in an evaluation store (never the device's case
//! library), so a rerun only embeds what is new.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use dermascope_encoder::Encoder;
use dermascope_eval::{
    grouped_split, knn_vote, precision_at_k, ClassificationReport, Neighbour, Vote,
};
use dermascope_store::{
    CaseFilter, CaseSource, CaseStore, CaseTags, Diagnosis, FlatIndex, Residency, ScoreKind,
};
use serde::Serialize;

use crate::ingest::ingest;
use crate::labels::{read_labels, LabelledImage};
use crate::{open_store_at, EncoderArgs};

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// kNN retrieval over raw encoder embeddings, lesion-grouped.
    Retrieval(RetrievalArgs),
}

#[derive(Args, Debug)]
pub struct RetrievalArgs {
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
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Score with the int8 copy of the index.
    #[arg(long)]
    int8: bool,
    /// Embedding cache; default var/eval/<model id>.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Also print the results as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    encoder: EncoderArgs,
}

const KS: [usize; 3] = [1, 5, 10];

#[derive(Serialize)]
struct MethodResult {
    method: String,
    #[serde(flatten)]
    report: ClassificationReport,
}

#[derive(Serialize)]
struct RetrievalReport {
    model_id: String,
    score: &'static str,
    references: usize,
    queries: usize,
    split: String,
    precision_at_1: f64,
    precision_at_5: f64,
    methods: Vec<MethodResult>,
}

pub fn run(command: &EvalCommand) -> anyhow::Result<ExitCode> {
    match command {
        EvalCommand::Retrieval(args) => retrieval(args),
    }
}

struct Labelled {
    row: LabelledImage,
    embedding: Vec<f32>,
}

fn retrieval(args: &RetrievalArgs) -> anyhow::Result<ExitCode> {
    let encoder = args.encoder.load(Some(1))?;
    let store_path = args
        .store
        .clone()
        .unwrap_or_else(|| PathBuf::from("var/eval").join(encoder.model_id()));
    // The store is only an embedding cache here; scoring uses its own index.
    let store = open_store_at(&store_path, &encoder, Residency::Int8)?;

    let references = embedded_rows(
        &store,
        &encoder,
        &args.images,
        &args.labels,
        args.encoder.threads,
    )?;
    let (references, queries, split) = match (&args.queries_images, &args.queries_labels) {
        (Some(images), Some(labels)) => {
            let queries = embedded_rows(&store, &encoder, images, labels, args.encoder.threads)?;
            (references, queries, "separate query set".to_string())
        }
        _ => {
            let labels: Vec<&str> = references
                .iter()
                .map(|r| r.row.diagnosis.code.as_str())
                .collect();
            let groups: Vec<&str> = references
                .iter()
                .map(|r| r.row.lesion_id.as_deref().unwrap_or(""))
                .collect();
            if groups.iter().any(|g| g.is_empty()) {
                bail!(
                    "{} has rows without lesion_id: a grouped split is impossible; \
                     give a separate query set with --queries-images/--queries-labels",
                    args.labels.display()
                );
            }
            let split = grouped_split(&labels, &groups, args.query_fraction, args.seed);
            let mut refs = Vec::new();
            let mut queries = Vec::new();
            for (item, is_query) in references.into_iter().zip(split.is_query) {
                if is_query {
                    queries.push(item);
                } else {
                    refs.push(item);
                }
            }
            let description = format!(
                "lesion-grouped, {:.0}% of each diagnosis's lesions held out, seed {}",
                args.query_fraction * 100.0,
                args.seed
            );
            (refs, queries, description)
        }
    };
    if references.is_empty() || queries.is_empty() {
        bail!(
            "nothing to evaluate: {} references, {} queries",
            references.len(),
            queries.len()
        );
    }

    let mut index = FlatIndex::new(encoder.dim())?;
    let mut label_of: HashMap<String, String> = HashMap::new();
    for item in &references {
        index.upsert(
            item.row.case_id.clone(),
            &item.embedding,
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
    let kind = if args.int8 {
        ScoreKind::Int8
    } else {
        ScoreKind::F32
    };
    let k_max = *KS.iter().max().unwrap_or(&10);
    let query_vectors: Vec<&[f32]> = queries.iter().map(|q| q.embedding.as_slice()).collect();
    let hits = index.search_batch(&query_vectors, k_max, &CaseFilter::any(), kind)?;
    let neighbours: Vec<Vec<Neighbour>> = hits
        .iter()
        .map(|row| {
            row.iter()
                .map(|hit| Neighbour {
                    label: label_of.get(hit.id.as_str()).cloned().unwrap_or_default(),
                    similarity: hit.score,
                })
                .collect()
        })
        .collect();

    let classes: Vec<String> = Diagnosis::ham10000_codes().map(str::to_string).collect();
    let truth: Vec<&str> = queries
        .iter()
        .map(|q| q.row.diagnosis.code.as_str())
        .collect();
    let mean = |values: Vec<f64>| values.iter().sum::<f64>() / values.len().max(1) as f64;
    let precision_at_1 = mean(
        neighbours
            .iter()
            .zip(&truth)
            .map(|(n, t)| precision_at_k(n, 1, t))
            .collect(),
    );
    let precision_at_5 = mean(
        neighbours
            .iter()
            .zip(&truth)
            .map(|(n, t)| precision_at_k(n, 5, t))
            .collect(),
    );
    let mut methods = Vec::new();
    for k in KS {
        for (vote, name) in [
            (Vote::Majority, "majority"),
            (Vote::SimilarityWeighted, "weighted"),
        ] {
            let predicted: Vec<String> = neighbours
                .iter()
                .map(|n| knn_vote(n, k, vote).unwrap_or_default())
                .collect();
            let predicted: Vec<&str> = predicted.iter().map(String::as_str).collect();
            methods.push(MethodResult {
                method: format!("kNN k={k} {name}"),
                report: ClassificationReport::new(&classes, &truth, &predicted, None),
            });
        }
    }
    let report = RetrievalReport {
        model_id: encoder.model_id().to_string(),
        score: if args.int8 { "int8" } else { "f32" },
        references: references.len(),
        queries: queries.len(),
        split,
        precision_at_1,
        precision_at_5,
        methods,
    };
    print_table(&report, &classes);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Ingests (resumably) and returns every accepted row with its embedding.
fn embedded_rows(
    store: &CaseStore,
    encoder: &Encoder,
    images: &std::path::Path,
    labels: &std::path::Path,
    workers: u16,
) -> anyhow::Result<Vec<Labelled>> {
    let file = read_labels(labels)?;
    let summary = ingest(
        store,
        encoder,
        images,
        &file.rows,
        CaseSource::Reference,
        workers,
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

fn print_table(report: &RetrievalReport, classes: &[String]) {
    println!(
        "retrieval over {} embeddings ({} scores): {} references, {} queries; {}",
        report.model_id, report.score, report.references, report.queries, report.split
    );
    println!(
        "precision@1 {:.3}   precision@5 {:.3}",
        report.precision_at_1, report.precision_at_5
    );
    let mut header = format!(
        "{:<22}{:>9}{:>10}{:>10}",
        "method", "accuracy", "bal.acc", "macro-F1"
    );
    for class in classes {
        header.push_str(&format!("{:>8}", format!("R:{class}")));
    }
    println!("{header}");
    for method in &report.methods {
        let r = &method.report;
        let mut line = format!(
            "{:<22}{:>9.3}{:>10.3}{:>10.3}",
            method.method, r.accuracy, r.balanced_accuracy, r.macro_f1
        );
        for class in &r.per_class {
            line.push_str(&format!("{:>8.3}", class.recall));
        }
        println!("{line}");
    }
}
