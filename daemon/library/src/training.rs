//! Training the clinic's adapter from its cases and installing it.
//!
//! # Guarantees
//! - **Validated on whole lesions.** The validation split that stops
//!   training early holds out whole lesions per diagnosis, so no
//!   photograph of a validation lesion is trained on.
//! - **Reported as it will run.** The validation report scores the adapter
//!   reloaded from the files just written and run by tract, not the
//!   weights in memory.
//! - **The report lives with the adapter.** `report.json` and `report.txt`
//!   are written into the adapter's directory.

use std::path::{Path, PathBuf};

use dermascope_adapter::{
    prepare_classes, save, train, Adapter, AdapterError, AdapterOutput, EpochRecord,
    LabelledEmbedding, TrainingConfig,
};
use dermascope_encoder::Encoder;
use dermascope_eval::{grouped_split, ClassificationReport};
use dermascope_store::{CaseStore, StoreError};
use serde::Serialize;
use thiserror::Error;

pub const REPORT_JSON: &str = "report.json";
pub const REPORT_TEXT: &str = "report.txt";

/// The cause is part of each message and not also `source()`, so that a
/// printed error chain says it once.
#[derive(Debug, Error)]
pub enum TrainingError {
    /// The cases cannot be trained on (too few per class, several encoders,
    /// one class) or training itself failed.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("writing the adapter to {}: {error}", dir.display())]
    Save { dir: PathBuf, error: AdapterError },
    #[error("loading the adapter just written to {}: {error}", dir.display())]
    Reload { dir: PathBuf, error: AdapterError },
    #[error("writing {}: {error}", path.display())]
    Report {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("encoding the training report: {0}")]
    Encode(serde_json::Error),
}

/// An installed adapter that could not be loaded. `error` says why; an
/// `AdapterError::Missing` means none is installed.
#[derive(Debug, Error)]
#[error("loading the adapter in {}: {error}", dir.display())]
pub struct LoadAdapterError {
    pub dir: PathBuf,
    pub error: AdapterError,
}

/// How to train.
#[derive(Clone, Debug)]
pub struct TrainingOptions {
    pub config: TrainingConfig,
    /// Fraction of each diagnosis's lesions held out for early stopping.
    pub validation_fraction: f64,
}

impl Default for TrainingOptions {
    fn default() -> Self {
        Self {
            config: TrainingConfig::default(),
            validation_fraction: 0.15,
        }
    }
}

/// The report `adapter train` prints and saves beside the adapter.
#[derive(Clone, Debug, Serialize)]
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
    pub history: Vec<EpochRecord>,
    /// On the validation split, with the installed ONNX run by tract.
    pub validation: ClassificationReport,
}

impl TrainingReport {
    /// The report as `report.txt` holds it and `adapter train` prints it.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "adapter {} for encoder {}\n{} training cases, {} validation cases; \
             {} epochs run, best epoch {}; trained in {:.2} s\n",
            self.adapter_id,
            self.encoder_model_id,
            self.train_cases,
            self.validation_cases,
            self.epochs_run,
            self.best_epoch,
            self.wall_time_s,
        );
        for change in &self.class_changes {
            out.push_str(&format!("class change: {change}\n"));
        }
        out.push_str("epoch  train loss  val loss  val bal.acc\n");
        for r in &self.history {
            out.push_str(&format!(
                "{:>5}  {:>10.4}  {:>8.4}  {:>11.3}\n",
                r.epoch, r.train_loss, r.validation_loss, r.validation_balanced_accuracy
            ));
        }
        let v = &self.validation;
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
}

/// The classes and the lesion-grouped split training will use, known
/// before the (long) training itself, so a caller can say what is coming.
#[derive(Debug)]
pub struct TrainingPlan {
    examples: Vec<LabelledEmbedding>,
    class_changes: Vec<String>,
    train: Vec<usize>,
    validation: Vec<usize>,
    options: TrainingOptions,
}

impl TrainingPlan {
    /// Applies the small-class policy and splits off the validation lesions.
    pub fn new(
        examples: &[LabelledEmbedding],
        options: &TrainingOptions,
    ) -> Result<Self, TrainingError> {
        let (examples, class_changes) = prepare_classes(examples, &options.config)?;
        let labels: Vec<&str> = examples.iter().map(|e| e.label.as_str()).collect();
        let lesions: Vec<&str> = examples.iter().map(|e| e.lesion.as_str()).collect();
        let split = grouped_split(
            &labels,
            &lesions,
            options.validation_fraction,
            options.config.seed,
        );
        Ok(Self {
            train: split.references().collect(),
            validation: split.queries().collect(),
            examples,
            class_changes,
            options: options.clone(),
        })
    }

    /// Classes left out or merged by the small-class policy, with counts.
    pub fn class_changes(&self) -> &[String] {
        &self.class_changes
    }

    pub fn train_cases(&self) -> usize {
        self.train.len()
    }

    pub fn validation_cases(&self) -> usize {
        self.validation.len()
    }

    pub fn options(&self) -> &TrainingOptions {
        &self.options
    }

    /// Trains, writes the adapter and its report into `dir`, and returns
    /// the adapter as loaded from there.
    pub fn install(self, dir: &Path) -> Result<(Adapter, TrainingReport), TrainingError> {
        let config = &self.options.config;
        let train_set: Vec<&LabelledEmbedding> =
            self.train.iter().map(|&i| &self.examples[i]).collect();
        let validation: Vec<&LabelledEmbedding> =
            self.validation.iter().map(|&i| &self.examples[i]).collect();
        let mut trained = train(&train_set, &validation, config)?;
        trained.class_changes = self.class_changes.clone();
        let manifest = save(&trained, config.seed, dir).map_err(|error| TrainingError::Save {
            dir: dir.to_path_buf(),
            error,
        })?;
        let dim = trained.weights.shape.input_dim;
        let adapter = Adapter::load(dir, &trained.encoder_model_id, dim).map_err(|error| {
            TrainingError::Reload {
                dir: dir.to_path_buf(),
                error,
            }
        })?;
        let outputs = adapter.predict_many(
            &validation
                .iter()
                .map(|e| e.embedding.as_slice())
                .collect::<Vec<_>>(),
        )?;
        let truth: Vec<&str> = validation.iter().map(|e| e.label.as_str()).collect();
        let report = TrainingReport {
            adapter_id: manifest.adapter_id,
            encoder_model_id: manifest.encoder_model_id,
            classes: manifest.classes,
            class_changes: trained.class_changes,
            train_cases: trained.train_size,
            validation_cases: trained.validation_size,
            epochs_run: trained.history.len(),
            best_epoch: trained.best_epoch,
            wall_time_s: trained.wall_time.as_secs_f64(),
            config: self.options.config,
            history: trained.history,
            validation: prediction_report(&adapter, &outputs, &truth),
        };
        let json = serde_json::to_string_pretty(&report).map_err(TrainingError::Encode)?;
        write_report(&dir.join(REPORT_JSON), &json)?;
        write_report(&dir.join(REPORT_TEXT), &report.to_text())?;
        Ok((adapter, report))
    }
}

/// Through a temporary file and a rename, so a kill leaves the previous
/// report or this one, never half of one.
fn write_report(path: &Path, text: &str) -> Result<(), TrainingError> {
    use std::io::Write;
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    std::fs::File::create(&temp)
        .and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|error| TrainingError::Report {
            path: path.to_path_buf(),
            error,
        })
}

/// Trains on `examples` (with a lesion-grouped validation split for early
/// stopping), installs the adapter in `dir` and reports it as tract runs it.
pub fn train_and_install(
    examples: &[LabelledEmbedding],
    options: &TrainingOptions,
    dir: &Path,
) -> Result<(Adapter, TrainingReport), TrainingError> {
    TrainingPlan::new(examples, options)?.install(dir)
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
    ClassificationReport::new(classes, truth, &predicted, Some(&confidences(outputs)))
}

/// The probability of each output's predicted class.
pub(crate) fn confidences(outputs: &[AdapterOutput]) -> Vec<f64> {
    outputs
        .iter()
        .map(|o| f64::from(o.probabilities[o.predicted]))
        .collect()
}

/// The store's cases with a confirmed label, as training examples.
#[derive(Debug, Default)]
pub struct ConfirmedCases {
    pub examples: Vec<LabelledEmbedding>,
    /// Cases left out because their label is not confirmed.
    pub unconfirmed: usize,
}

/// The store's confirmed cases as training examples; a case without a
/// lesion id counts as its own lesion.
pub fn confirmed_cases(store: &CaseStore) -> Result<ConfirmedCases, StoreError> {
    let mut out = ConfirmedCases::default();
    for case in store.cases() {
        let case = case?;
        if !case.label_confirmed {
            out.unconfirmed += 1;
            continue;
        }
        out.examples.push(LabelledEmbedding {
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
    Ok(out)
}

/// The adapter installed in `dir`, refused unless it was trained for
/// `encoder`.
pub fn load_installed(dir: &Path, encoder: &Encoder) -> Result<Adapter, LoadAdapterError> {
    Adapter::load(dir, encoder.model_id(), encoder.dim()).map_err(|error| LoadAdapterError {
        dir: dir.to_path_buf(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIM: usize = 16;
    const ENCODER: &str = "test-encoder";

    /// Deterministic pseudo-random numbers in [-1, 1) (splitmix64), so the
    /// test needs no random-number crate.
    fn noise(state: &mut u64) -> f32 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `per_class[c]` photographs of class `c{c}`, two per lesion, each a
    /// noisy copy of its class's axis: separable, as confirmed cases of
    /// distinct diagnoses should be.
    fn clusters(per_class: &[usize]) -> Vec<LabelledEmbedding> {
        let mut state = 11;
        let mut out = Vec::new();
        for (class, &n) in per_class.iter().enumerate() {
            for i in 0..n {
                let mut v: Vec<f32> = (0..DIM).map(|_| 0.3 * noise(&mut state)).collect();
                v[class] += 1.0;
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter_mut().for_each(|x| *x /= norm);
                out.push(LabelledEmbedding {
                    embedding: v,
                    label: format!("c{class}"),
                    model_id: ENCODER.to_string(),
                    lesion: format!("lesion-{class}-{}", i / 2),
                });
            }
        }
        out
    }

    fn options() -> TrainingOptions {
        TrainingOptions {
            config: TrainingConfig {
                hidden: 8,
                max_epochs: 8,
                learning_rate: 3e-3,
                batch_size: 16,
                min_cases_per_class: 5,
                ..TrainingConfig::default()
            },
            validation_fraction: 0.25,
        }
    }

    #[test]
    fn installs_the_adapter_with_its_report_and_loads_back() {
        let examples = clusters(&[40, 40, 30]);
        let dir = tempfile::tempdir().unwrap();
        let (adapter, report) = train_and_install(&examples, &options(), dir.path()).unwrap();

        assert_eq!(report.classes, ["c0", "c1", "c2"]);
        assert_eq!(report.encoder_model_id, ENCODER);
        assert_eq!(report.adapter_id, adapter.adapter_id());
        assert_eq!(report.train_cases + report.validation_cases, examples.len());
        // A quarter of each class's lesions, two photographs each.
        assert!(
            (20..=34).contains(&report.validation_cases),
            "{} validation cases",
            report.validation_cases
        );
        assert_eq!(report.epochs_run, report.history.len());
        assert!((1..=report.epochs_run).contains(&report.best_epoch));
        assert_eq!(report.validation.n, report.validation_cases);
        // Separable clusters: the reloaded adapter gets them right.
        assert!(
            report.validation.balanced_accuracy > 0.9,
            "{}",
            report.to_text()
        );
        assert!(report.validation.expected_calibration_error.is_some());

        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(REPORT_JSON)).unwrap()).unwrap();
        assert_eq!(saved["adapter_id"], report.adapter_id.as_str());
        assert_eq!(saved["config"]["hidden"], 8);
        assert_eq!(
            saved["validation"]["confusion"].as_array().unwrap().len(),
            3
        );
        let text = std::fs::read_to_string(dir.path().join(REPORT_TEXT)).unwrap();
        assert_eq!(text, report.to_text());
        assert!(text.starts_with(&format!(
            "adapter {} for encoder {ENCODER}\n",
            report.adapter_id
        )));

        let reloaded = Adapter::load(dir.path(), ENCODER, DIM).unwrap();
        assert_eq!(reloaded.adapter_id(), adapter.adapter_id());
    }

    #[test]
    fn the_plan_says_what_the_small_class_policy_changed_before_training() {
        let examples = clusters(&[30, 30, 4]);
        let mut options = options();
        options.config.small_classes = dermascope_adapter::SmallClassPolicy::Exclude;
        let plan = TrainingPlan::new(&examples, &options).unwrap();
        assert_eq!(plan.class_changes(), ["c2 (4 cases) left out"]);
        assert_eq!(plan.train_cases() + plan.validation_cases(), 60);

        options.config.small_classes = dermascope_adapter::SmallClassPolicy::Refuse;
        let refused = TrainingPlan::new(&examples, &options).unwrap_err();
        assert!(
            matches!(
                refused,
                TrainingError::Adapter(AdapterError::TooFewCases { .. })
            ),
            "{refused}"
        );
    }

    #[test]
    fn confirmed_cases_leave_out_and_count_the_unconfirmed() {
        use dermascope_store::{Case, CaseId, CaseMetadata, CaseSource, Diagnosis, StoreIdentity};
        let dir = tempfile::tempdir().unwrap();
        let store = CaseStore::open(
            dir.path(),
            StoreIdentity {
                model_id: ENCODER.into(),
                embedding_dim: 2,
            },
        )
        .unwrap();
        let case = |id: &str, code: &str, lesion: Option<&str>, confirmed: bool| Case {
            id: CaseId::new(id).unwrap(),
            embedding: vec![0.6, 0.8],
            diagnosis: Diagnosis::from_code(code).unwrap(),
            source: CaseSource::Reference,
            metadata: CaseMetadata {
                lesion_id: lesion.map(str::to_string),
                ..CaseMetadata::default()
            },
            thumbnail_jpeg: vec![0xFF, 0xD8, 0xFF, 0xD9],
            model_id: ENCODER.into(),
            created_at_ms: 1,
            updated_at_ms: 1,
            label_confirmed: confirmed,
            device_id: None,
            revision: 1,
        };
        store
            .insert_batch(&[
                case("A", "mel", Some("L1"), true),
                case("B", "nv", None, true),
                case("C", "nv", Some("L2"), false),
            ])
            .unwrap();
        let confirmed = confirmed_cases(&store).unwrap();
        assert_eq!(confirmed.unconfirmed, 1);
        let mut got: Vec<(String, String, String)> = confirmed
            .examples
            .iter()
            .map(|e| (e.label.clone(), e.lesion.clone(), e.model_id.clone()))
            .collect();
        got.sort();
        // A case without a lesion id is its own lesion.
        assert_eq!(
            got,
            [
                ("mel".into(), "L1".into(), ENCODER.into()),
                ("nv".into(), "B".into(), ENCODER.into()),
            ]
        );
    }

    #[test]
    fn an_unwritable_directory_is_named_in_the_error() {
        let examples = clusters(&[20, 20]);
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"not a directory").unwrap();
        let error = train_and_install(&examples, &options(), &blocked).unwrap_err();
        assert!(matches!(error, TrainingError::Save { .. }), "{error}");
        assert!(
            error.to_string().contains(&blocked.display().to_string()),
            "{error}"
        );
    }
}
