//! The adapter's training flags, shared by `adapter train` and `eval`, and
//! what both say about a training run before it starts.

use clap::{Args, ValueEnum};
use dermascope_adapter::{Balancing, SmallClassPolicy, TrainingConfig};
use dermascope_library::{TrainingOptions, TrainingPlan};

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

impl From<&TrainingArgs> for TrainingOptions {
    fn from(args: &TrainingArgs) -> Self {
        TrainingOptions {
            config: TrainingConfig {
                hidden: args.hidden,
                max_epochs: args.epochs,
                learning_rate: args.learning_rate,
                seed: args.adapter_seed,
                balancing: match args.balance {
                    BalanceArg::Weights => Balancing::LossWeights,
                    BalanceArg::Sampling => Balancing::BalancedSampling,
                },
                min_cases_per_class: args.min_cases,
                small_classes: args.small_classes.clone(),
                ..TrainingConfig::default()
            },
            validation_fraction: args.validation_fraction,
        }
    }
}

/// Says on stderr what training is about to do.
pub fn announce(plan: &TrainingPlan) {
    for change in plan.class_changes() {
        eprintln!("note: {change}");
    }
    eprintln!(
        "training on {} cases, validating on {} (lesion-grouped, {:.0}%)",
        plan.train_cases(),
        plan.validation_cases(),
        plan.options().validation_fraction * 100.0
    );
}
