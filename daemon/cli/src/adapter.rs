//! `dermascope adapter train|index|show`: the adapter trained on the device.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use dermascope_adapter::{
    prepare_classes, save, train, Adapter, AdapterOutput, Balancing, LabelledEmbedding,
    SmallClassPolicy, TrainingConfig,
};
use dermascope_encoder::Encoder;
use dermascope_eval::{grouped_split, ClassificationReport};
use dermascope_pipeline::index_adapter_space;
use dermascope_store::{CaseStore, Residency};
use serde::Serialize;

use crate::eval::embedded_rows;
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

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BalanceArg {
    /// Loss weights inversely proportional to class counts.
    Weights,
    /// Class-balanced sampling of each epoch.
    Sampling,
}

/// Hyper-parameters shared by `adapter train` and `eval`.
#[derive(Args, Debug, Clone)]
pub struct TrainingArgs {
    /// Dimension of the adapter embedding.
    #[arg(long, default_value_t = 254)]
    hidden: usize,
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    /// AdamW learning rate (the reference's 3e-4 overfits sklesion's embeddings in an epoch).
    #[arg(long, default_value_t = 1e-4)]
    learning_rate: f32,
    /// Seed for the split, initialisation and shuffles: same seed, same adapter.
    #[arg(long, default_value_t = 7)]
    adapter_seed: u64,
    #[arg(long, value_enum, default_value = "weights")]
    balance: BalanceArg,
    /// Diagnoses with fewer cases than this go through --small-classes.
    #[arg(long, default_value_t = 10)]
    min_cases: usize,
    /// What to do with them: refuse, exclude, or merge:CODE.
    #[arg(long, default_value = "refuse", value_parser = parse_small_classes)]
    small_classes: SmallClassPolicy,
    /// Fraction of each diagnosis's lesions held out for early stopping.
    #[arg(long, default_value_t = 0.15)]
    validation_fraction: f64,
}

fn parse_small_classes(text: &str) -> Result<SmallClassPolicy, String> {
    match text {
        "refuse" => Ok(SmallClassPolicy::Refuse),
        "exclude" => Ok(SmallClassPolicy::Exclude),
        _ => match text.strip_prefix("merge:") {
            Some(code) if !code.is_empty() => Ok(SmallClassPolicy::MergeInto(code.to_string())),
            _ => Err(format!(
                "{text:?}: expected refuse, exclude or merge:CODE (e.g. merge:nv)"
            )),
        },
    }
}

impl TrainingArgs {
    pub fn config(&self) -> TrainingConfig {
        TrainingConfig {
            hidden: self.hidden,
            max_epochs: self.epochs,
            learning_rate: self.learning_rate,
            seed: self.adapter_seed,
            balancing: match self.balance {
                BalanceArg::Weights => Balancing::LossWeights,
                BalanceArg::Sampling => Balancing::BalancedSampling,
            },
            min_cases_per_class: self.min_cases,
            small_classes: self.small_classes.clone(),
            ..TrainingConfig::default()
        }
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

/// The report `adapter train` prints and saves beside the adapter.
#[derive(Serialize)]
pub struct TrainingReport {
    pub adapter_id: String,
    pub encoder_model_id: String,
    pub classes: Vec<String>,
    pub class_changes: Vec<String>,
    pub train_cases: usize,
    pub validation_cases: usize,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub wall_time_s: f64,
    pub config: TrainingConfig,
    pub history: Vec<dermascope_adapter::EpochRecord>,
    /// On the validation split, with the installed ONNX run by tract.
    pub validation: ClassificationReport,
}

/// Trains on `examples`, splitting off a lesion-grouped validation set,
/// writes the adapter to `dir`, and reports it as run by tract.
pub fn train_and_install(
    examples: &[LabelledEmbedding],
    training: &TrainingArgs,
    dir: &Path,
) -> anyhow::Result<(Adapter, TrainingReport)> {
    let config = training.config();
    let (examples, class_changes) = prepare_classes(examples, &config)?;
    for change in &class_changes {
        eprintln!("note: {change}");
    }
    let labels: Vec<&str> = examples.iter().map(|e| e.label.as_str()).collect();
    let lesions: Vec<&str> = examples.iter().map(|e| e.lesion.as_str()).collect();
    let split = grouped_split(&labels, &lesions, training.validation_fraction, config.seed);
    let train_set: Vec<&LabelledEmbedding> = split.references().map(|i| &examples[i]).collect();
    let validation: Vec<&LabelledEmbedding> = split.queries().map(|i| &examples[i]).collect();
    eprintln!(
        "training on {} cases, validating on {} (lesion-grouped, {:.0}%)",
        train_set.len(),
        validation.len(),
        training.validation_fraction * 100.0
    );
    let mut trained = train(&train_set, &validation, &config)?;
    trained.class_changes = class_changes;
    let manifest = save(&trained, config.seed, dir)
        .with_context(|| format!("writing the adapter to {}", dir.display()))?;
    let dim = trained.weights.shape.input_dim;
    let adapter = Adapter::load(dir, &trained.encoder_model_id, dim)
        .with_context(|| format!("loading the adapter just written to {}", dir.display()))?;
    let outputs = adapter.predict_many(
        &validation
            .iter()
            .map(|e| e.embedding.as_slice())
            .collect::<Vec<_>>(),
    )?;
    let truth: Vec<&str> = validation.iter().map(|e| e.label.as_str()).collect();
    let validation_report = prediction_report(&adapter, &outputs, &truth);
    let report = TrainingReport {
        adapter_id: manifest.adapter_id.clone(),
        encoder_model_id: manifest.encoder_model_id.clone(),
        classes: manifest.classes.clone(),
        class_changes: trained.class_changes.clone(),
        train_cases: trained.train_size,
        validation_cases: trained.validation_size,
        epochs_run: trained.history.len(),
        best_epoch: trained.best_epoch,
        wall_time_s: trained.wall_time.as_secs_f64(),
        config,
        history: trained.history.clone(),
        validation: validation_report,
    };
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(dir.join("report.json"), json)
        .with_context(|| format!("writing {}", dir.join("report.json").display()))?;
    std::fs::write(dir.join("report.txt"), render_report(&report))
        .with_context(|| format!("writing {}", dir.join("report.txt").display()))?;
    Ok((adapter, report))
}

/// The adapter's own predictions scored against `truth`, with its
/// confidence for calibration.
pub fn prediction_report(
    adapter: &Adapter,
    outputs: &[AdapterOutput],
    truth: &[&str],
) -> ClassificationReport {
    let classes = adapter.classes();
    let predicted: Vec<&str> = outputs
        .iter()
        .map(|o| classes[o.predicted].as_str())
        .collect();
    let confidence: Vec<f64> = outputs
        .iter()
        .map(|o| f64::from(o.probabilities[o.predicted]))
        .collect();
    ClassificationReport::new(classes, truth, &predicted, Some(&confidence))
}

pub fn render_report(report: &TrainingReport) -> String {
    let mut out = format!(
        "adapter {} for encoder {}\n{} training cases, {} validation cases; \
         {} epochs run, best epoch {}; trained in {:.2} s\n",
        report.adapter_id,
        report.encoder_model_id,
        report.train_cases,
        report.validation_cases,
        report.epochs_run,
        report.best_epoch,
        report.wall_time_s,
    );
    for change in &report.class_changes {
        out.push_str(&format!("class change: {change}\n"));
    }
    out.push_str("epoch  train loss  val loss  val bal.acc\n");
    for r in &report.history {
        out.push_str(&format!(
            "{:>5}  {:>10.4}  {:>8.4}  {:>11.3}\n",
            r.epoch, r.train_loss, r.validation_loss, r.validation_balanced_accuracy
        ));
    }
    let v = &report.validation;
    out.push_str(&format!(
        "validation: balanced accuracy {:.3}, macro-F1 {:.3}, accuracy {:.3}, ECE {:.3}\n",
        v.balanced_accuracy,
        v.macro_f1,
        v.accuracy,
        v.expected_calibration_error.unwrap_or(f64::NAN)
    ));
    out.push_str(&v.to_table());
    out
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
            embedded_rows(&store, &encoder, images, labels, args.encoder.threads)?
                .into_iter()
                .map(|r| LabelledEmbedding {
                    lesion: r
                        .row
                        .lesion_id
                        .clone()
                        .unwrap_or_else(|| r.row.case_id.as_str().to_string()),
                    label: r.row.diagnosis.code.clone(),
                    model_id: encoder.model_id().to_string(),
                    embedding: r.embedding,
                })
                .collect()
        }
        _ => {
            let store = open_store(&args.store, &encoder, Residency::Int8)?;
            confirmed_cases(&store)?
        }
    };
    if examples.is_empty() {
        bail!(
            "no confirmed cases to train on: ingest labelled photographs first \
             (`dermascope ingest`) or give --images and --labels"
        );
    }
    let started = Instant::now();
    let (adapter, report) = train_and_install(&examples, &args.training, &dir)?;
    print!("{}", render_report(&report));
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

/// The store's confirmed cases as training examples; cases without a lesion
/// id count as their own lesion.
pub fn confirmed_cases(store: &CaseStore) -> anyhow::Result<Vec<LabelledEmbedding>> {
    let mut examples = Vec::new();
    let mut unconfirmed = 0usize;
    for case in store.cases() {
        let case = case?;
        if !case.label_confirmed {
            unconfirmed += 1;
            continue;
        }
        examples.push(LabelledEmbedding {
            lesion: case
                .metadata
                .lesion_id
                .clone()
                .unwrap_or_else(|| case.id.as_str().to_string()),
            label: case.diagnosis.code.clone(),
            model_id: case.model_id.clone(),
            embedding: case.embedding,
        });
    }
    if unconfirmed > 0 {
        eprintln!("{unconfirmed} cases without a confirmed label were left out of training");
    }
    Ok(examples)
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

pub fn load_installed(dir: &Path, encoder: &Encoder) -> anyhow::Result<Adapter> {
    Adapter::load(dir, encoder.model_id(), encoder.dim())
        .with_context(|| format!("loading the adapter in {}", dir.display()))
}
