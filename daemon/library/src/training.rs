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
//! - **The clinic's own cases count and are checked.** With
//!   [`TrainingPlan::with_local`], the clinic's confirmed captures weigh
//!   [`LocalOptions::weight`] times a reference case in the loss, and a
//!   share of their lesions, chosen by a hash of the lesion id (so a lesion
//!   held out once is held out at every retraining, and an adapter is never
//!   compared on a case it trained on), is held out; the report gives the
//!   adapter's balanced accuracy and melanoma recall on them.
//! - **Switched whole, the previous one kept.** [`promote`] installs an
//!   adapter trained beside the installed one and keeps the installed one
//!   for [`rollback`]; at every moment the installed folder's manifest
//!   names a complete model file.

use std::path::{Path, PathBuf};

use dermascope_adapter::{
    prepare_classes, save, train_weighted, Adapter, AdapterError, AdapterManifest, AdapterOutput,
    EpochRecord, LabelledEmbedding, TrainingConfig, MANIFEST_FILE,
};
use dermascope_encoder::Encoder;
// The diagnosis code whose recall is reported on its own: the one
// definition every score and rule uses.
use dermascope_eval::{grouped_split, ClassificationReport, MELANOMA};
use dermascope_store::{CaseSource, CaseStore, StoreError};
use serde::Serialize;
use thiserror::Error;

use crate::operating_point::{
    calibrate_installed, calibration_text, Calibration, CalibrationError,
};

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
    #[error("calibrating the adapter in {}: {error}", dir.display())]
    Calibration {
        dir: PathBuf,
        error: CalibrationError,
    },
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

/// How the clinic's own confirmed cases (source `captured` or `fleet`) are
/// trained on.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LocalOptions {
    /// A local case's weight in the loss; a reference case's is 1.
    pub weight: f32,
    /// Share of the local lesions held out for validation. Larger than the
    /// reference split's, so that a few dozen local cases still give a
    /// figure.
    pub validation_fraction: f64,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            weight: DEFAULT_LOCAL_WEIGHT,
            validation_fraction: 0.25,
        }
    }
}

/// See docs/evaluation.md, "Learning from the clinic's own cases", for the
/// measurement that chose it.
pub const DEFAULT_LOCAL_WEIGHT: f32 = 1.0;

/// An adapter's figures on a set of validation cases: what decides whether
/// a retrained adapter replaces the installed one.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ValidationFigures {
    pub cases: usize,
    /// Mean recall over the diagnoses present among the cases.
    pub balanced_accuracy: f64,
    /// Share of the melanomas predicted as melanoma; `None` without one.
    pub melanoma_recall: Option<f64>,
    pub melanoma_cases: usize,
}

impl ValidationFigures {
    /// `predicted[i]` is the adapter's class for the case labelled `truth[i]`;
    /// any other class than the truth is a miss.
    pub fn new(truth: &[&str], predicted: &[&str]) -> Self {
        let mut per_class: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        for (t, p) in truth.iter().zip(predicted) {
            let entry = per_class.entry(t).or_default();
            entry.1 += 1;
            if t == p {
                entry.0 += 1;
            }
        }
        let recalls: Vec<f64> = per_class
            .values()
            .map(|&(hit, n)| hit as f64 / n as f64)
            .collect();
        let melanoma = per_class.get(MELANOMA).copied();
        Self {
            cases: truth.len(),
            balanced_accuracy: if recalls.is_empty() {
                0.0
            } else {
                recalls.iter().sum::<f64>() / recalls.len() as f64
            },
            melanoma_recall: melanoma.map(|(hit, n)| hit as f64 / n as f64),
            melanoma_cases: melanoma.map_or(0, |(_, n)| n),
        }
    }

    /// `adapter`'s figures on `cases`.
    pub fn of(adapter: &Adapter, cases: &[LabelledEmbedding]) -> Result<Self, AdapterError> {
        let outputs = adapter.predict_many(
            &cases
                .iter()
                .map(|e| e.embedding.as_slice())
                .collect::<Vec<_>>(),
        )?;
        let classes = adapter.classes();
        let predicted: Vec<&str> = outputs
            .iter()
            .map(|o| classes[o.predicted].as_str())
            .collect();
        let truth: Vec<&str> = cases.iter().map(|e| e.label.as_str()).collect();
        Ok(Self::new(&truth, &predicted))
    }

    /// Neither balanced accuracy nor melanoma recall lower than `old`'s
    /// (on the same cases): a retrained adapter must not trade the miss
    /// that costs for the average.
    pub fn no_worse_than(&self, old: &ValidationFigures) -> bool {
        const SLACK: f64 = 1e-9;
        let recall_ok = match (self.melanoma_recall, old.melanoma_recall) {
            (Some(new), Some(old)) => new + SLACK >= old,
            _ => true,
        };
        self.balanced_accuracy + SLACK >= old.balanced_accuracy && recall_ok
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
    /// The melanoma operating point and the "no close match" rule chosen
    /// on that split, as stored in the adapter's manifest.
    pub calibration: Calibration,
    /// The clinic's own cases trained on (weighted) and held out.
    pub local_train_cases: usize,
    pub local_weight: f32,
    /// "Validation on local cases": the installed adapter on the held-out
    /// local cases; `None` when none were held out.
    pub local_validation: Option<ValidationFigures>,
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
        out.push_str(&calibration_text(&self.calibration));
        if let Some(l) = &self.local_validation {
            out.push_str(&format!(
                "validation on local cases ({} held out, {} trained on at weight {}): \
                 balanced accuracy {:.3}, melanoma recall {}\n",
                l.cases,
                self.local_train_cases,
                self.local_weight,
                l.balanced_accuracy,
                l.melanoma_recall
                    .map_or_else(|| "- (no melanoma)".to_string(), |r| format!("{r:.3}")),
            ));
        }
        out
    }
}

/// The classes and the lesion-grouped split training will use, known
/// before the (long) training itself, so a caller can say what is coming.
#[derive(Debug)]
pub struct TrainingPlan {
    examples: Vec<LabelledEmbedding>,
    /// `local[i]`: `examples[i]` is one of the clinic's own cases.
    local: Vec<bool>,
    class_changes: Vec<String>,
    train: Vec<usize>,
    validation: Vec<usize>,
    options: TrainingOptions,
    local_options: LocalOptions,
}

impl TrainingPlan {
    /// Applies the small-class policy and splits off the validation lesions.
    pub fn new(
        examples: &[LabelledEmbedding],
        options: &TrainingOptions,
    ) -> Result<Self, TrainingError> {
        Self::with_local(
            examples,
            &vec![false; examples.len()],
            options,
            &LocalOptions::default(),
        )
    }

    /// [`TrainingPlan::new`] where `local[i]` marks `examples[i]` as one of
    /// the clinic's own cases: weighted by `local_options.weight`, and a
    /// hash-chosen share of their lesions held out (see the module's docs).
    /// The reference cases are split as by `new`.
    pub fn with_local(
        examples: &[LabelledEmbedding],
        local: &[bool],
        options: &TrainingOptions,
        local_options: &LocalOptions,
    ) -> Result<Self, TrainingError> {
        if local.len() != examples.len() {
            return Err(TrainingError::Adapter(AdapterError::BadConfig(format!(
                "{} local flags for {} examples",
                local.len(),
                examples.len()
            ))));
        }
        if !(local_options.weight.is_finite() && local_options.weight > 0.0) {
            return Err(TrainingError::Adapter(AdapterError::BadConfig(
                "the local cases' weight must be positive".into(),
            )));
        }
        let (prepared, class_changes) = prepare_classes(examples, &options.config)?;
        // The small-class policy keeps the order and either keeps every
        // example (relabelled or not) or drops the small classes' ones.
        let local: Vec<bool> = if prepared.len() == examples.len() {
            local.to_vec()
        } else {
            let kept: std::collections::BTreeSet<&str> =
                prepared.iter().map(|e| e.label.as_str()).collect();
            examples
                .iter()
                .zip(local)
                .filter(|(e, _)| kept.contains(e.label.as_str()))
                .map(|(_, &l)| l)
                .collect()
        };
        debug_assert_eq!(local.len(), prepared.len());
        let reference: Vec<usize> = (0..prepared.len()).filter(|&i| !local[i]).collect();
        let labels: Vec<&str> = reference
            .iter()
            .map(|&i| prepared[i].label.as_str())
            .collect();
        let lesions: Vec<&str> = reference
            .iter()
            .map(|&i| prepared[i].lesion.as_str())
            .collect();
        let split = grouped_split(
            &labels,
            &lesions,
            options.validation_fraction,
            options.config.seed,
        );
        let mut train: Vec<usize> = split.references().map(|j| reference[j]).collect();
        let mut validation: Vec<usize> = split.queries().map(|j| reference[j]).collect();
        for i in (0..prepared.len()).filter(|&i| local[i]) {
            if held_out_lesion(&prepared[i].lesion, local_options.validation_fraction) {
                validation.push(i);
            } else {
                train.push(i);
            }
        }
        Ok(Self {
            train,
            validation,
            examples: prepared,
            local,
            class_changes,
            options: options.clone(),
            local_options: local_options.clone(),
        })
    }

    /// The held-out local cases: the cases a retrained adapter and the
    /// installed one are compared on.
    pub fn local_validation_cases(&self) -> Vec<LabelledEmbedding> {
        self.validation
            .iter()
            .filter(|&&i| self.local[i])
            .map(|&i| self.examples[i].clone())
            .collect()
    }

    /// Every validation case, reference and local.
    pub fn validation_examples(&self) -> Vec<LabelledEmbedding> {
        self.validation
            .iter()
            .map(|&i| self.examples[i].clone())
            .collect()
    }

    /// Local cases trained on.
    pub fn local_train_cases(&self) -> usize {
        self.train.iter().filter(|&&i| self.local[i]).count()
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
        let weight = |&i: &usize| {
            if self.local[i] {
                self.local_options.weight
            } else {
                1.0
            }
        };
        let train_weights: Vec<f32> = self.train.iter().map(weight).collect();
        let validation_weights: Vec<f32> = self.validation.iter().map(weight).collect();
        let mut trained = train_weighted(
            &train_set,
            Some(&train_weights),
            &validation,
            Some(&validation_weights),
            config,
        )?;
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
        let (adapter, calibration) = calibrate_installed(
            dir,
            adapter,
            &train_set,
            &validation,
            config.melanoma_target_sensitivity,
        )
        .map_err(|error| TrainingError::Calibration {
            dir: dir.to_path_buf(),
            error,
        })?;
        let local_validation = self.local_validation_cases();
        let local_validation = if local_validation.is_empty() {
            None
        } else {
            Some(ValidationFigures::of(&adapter, &local_validation)?)
        };
        let local_train_cases = self.local_train_cases();
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
            calibration,
            local_train_cases,
            local_weight: self.local_options.weight,
            local_validation,
        };
        let json = serde_json::to_string_pretty(&report).map_err(TrainingError::Encode)?;
        write_report(&dir.join(REPORT_JSON), &json)?;
        write_report(&dir.join(REPORT_TEXT), &report.to_text())?;
        Ok((adapter, report))
    }
}

/// Whether a local lesion is held out for validation: a hash of its id
/// alone (FNV-1a, then splitmix64's finaliser), so the answer is the same
/// at every retraining, whatever else the library holds.
pub fn held_out_lesion(lesion: &str, fraction: f64) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in lesion.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// Gives the calling thread the lowest CPU priority (nice 19; Linux's
/// nice is per thread), so a background training yields to capture.
pub fn lower_thread_priority() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19)?;
    }
    Ok(())
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

/// A failed switch between adapter folders; the installed folder still
/// holds a complete adapter (the old one unless `promote` returned `Ok`).
#[derive(Debug, Error)]
pub enum SwitchError {
    #[error("no adapter in {}: nothing to switch to", dir.display())]
    Missing { dir: PathBuf },
    #[error("adapter manifest {} is invalid: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// The folder beside `dir` that keeps the adapter `promote` replaced.
pub fn previous_dir(dir: &Path) -> PathBuf {
    sibling(dir, "previous")
}

/// The folder beside `dir` a retraining writes its candidate into.
pub fn candidate_dir(dir: &Path) -> PathBuf {
    sibling(dir, "candidate")
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "adapter".into());
    name.push(".");
    name.push(suffix);
    dir.with_file_name(name)
}

/// Installs the adapter in `candidate` as the one in `dir`, after copying
/// the one installed there (if any) to [`previous_dir`]. The switch is the
/// durable replacement of `dir`'s manifest (`dermascope-durable`): before
/// it `dir` holds the old adapter, after it the new one, each with its
/// model file complete. `candidate` is removed afterwards.
pub fn promote(candidate: &Path, dir: &Path) -> Result<AdapterManifest, SwitchError> {
    let manifest = read_manifest(candidate)?;
    if dir.join(MANIFEST_FILE).is_file() {
        copy_bundle(dir, &previous_dir(dir))?;
    }
    copy_bundle(candidate, dir)?;
    std::fs::remove_dir_all(candidate).map_err(|error| SwitchError::Io {
        path: candidate.to_path_buf(),
        error,
    })?;
    Ok(manifest)
}

/// Copies the adapter installed in `dir` (if any) to [`previous_dir`], as
/// [`promote`] does, for an install that writes over `dir` itself
/// (`dermascope adapter train`); returns the kept adapter's manifest.
pub fn keep_previous(dir: &Path) -> Result<Option<AdapterManifest>, SwitchError> {
    if !dir.join(MANIFEST_FILE).is_file() {
        return Ok(None);
    }
    copy_bundle(dir, &previous_dir(dir))?;
    read_manifest(dir).map(Some)
}

/// Puts back the adapter [`promote`] replaced; the one it replaces becomes
/// the previous one, so a second rollback undoes the first.
pub fn rollback(dir: &Path) -> Result<AdapterManifest, SwitchError> {
    let previous = previous_dir(dir);
    read_manifest(&previous)?;
    let staging = sibling(dir, "rollback");
    copy_bundle(&previous, &staging)?;
    promote(&staging, dir)
}

/// The manifest of the adapter bundle in `dir` (installed, kept or a
/// candidate), as the switch reads it.
pub fn read_manifest(dir: &Path) -> Result<AdapterManifest, SwitchError> {
    let path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SwitchError::Missing {
                dir: dir.to_path_buf(),
            })
        }
        Err(error) => return Err(SwitchError::Io { path, error }),
    };
    toml::from_str(&text).map_err(|e| SwitchError::Manifest {
        path,
        message: e.to_string(),
    })
}

/// Copies the adapter bundle in `from` into `to` in install order: the
/// model file (content-addressed, so never one `to`'s manifest names with
/// other content), the reports, then the manifest, which commits; model
/// files no manifest names are removed last.
fn copy_bundle(from: &Path, to: &Path) -> Result<(), SwitchError> {
    let manifest = read_manifest(from)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| SwitchError::Io { path, error }
    };
    dermascope_durable::create_private_dir_all(to).map_err(io(to))?;
    let read = |name: &str| std::fs::read(from.join(name)).map_err(io(&from.join(name)));
    let model = read(&manifest.file)?;
    dermascope_durable::replace_durably(&to.join(&manifest.file), &model)
        .map_err(io(&to.join(&manifest.file)))?;
    for report in [REPORT_JSON, REPORT_TEXT] {
        let source = from.join(report);
        if source.is_file() {
            let bytes = std::fs::read(&source).map_err(io(&source))?;
            dermascope_durable::replace_durably(&to.join(report), &bytes)
                .map_err(io(&to.join(report)))?;
        }
    }
    let text = read(MANIFEST_FILE)?;
    dermascope_durable::replace_durably(&to.join(MANIFEST_FILE), &text)
        .map_err(io(&to.join(MANIFEST_FILE)))?;
    for entry in std::fs::read_dir(to).map_err(io(to))? {
        let entry = entry.map_err(io(to))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".onnx") && name != manifest.file {
            std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}

/// The store's cases with a confirmed label, as training examples.
#[derive(Debug, Default)]
pub struct ConfirmedCases {
    pub examples: Vec<LabelledEmbedding>,
    /// `local[i]`: `examples[i]` is the clinic's own case (captured on this
    /// device or shared by one of its fleet), not a reference case.
    pub local: Vec<bool>,
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
        out.local.push(case.source != CaseSource::Reference);
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

    /// `n` local photographs (one per lesion) of classes c0 and c1 in
    /// another "camera": the class axes rotated onto dimensions 4 and 5,
    /// so only training on them teaches the adapter this domain.
    fn local_cases(n: usize, seed: u64) -> Vec<LabelledEmbedding> {
        let mut state = seed;
        (0..n)
            .map(|i| {
                let class = i % 2;
                let mut v: Vec<f32> = (0..DIM).map(|_| 0.3 * noise(&mut state)).collect();
                v[4 + class] += 1.0;
                v[1 - class] += 0.6;
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter_mut().for_each(|x| *x /= norm);
                LabelledEmbedding {
                    embedding: v,
                    label: format!("c{class}"),
                    model_id: ENCODER.to_string(),
                    lesion: format!("local-{seed}-{i}"),
                }
            })
            .collect()
    }

    fn with_local(
        reference: &[LabelledEmbedding],
        local: &[LabelledEmbedding],
    ) -> (Vec<LabelledEmbedding>, Vec<bool>) {
        let mut examples = reference.to_vec();
        examples.extend(local.iter().cloned());
        let mut flags = vec![false; reference.len()];
        flags.resize(examples.len(), true);
        (examples, flags)
    }

    #[test]
    fn local_cases_are_held_out_by_lesion_and_reported() {
        let reference = clusters(&[40, 40]);
        let local = local_cases(60, 3);
        let (examples, flags) = with_local(&reference, &local);
        let local_options = LocalOptions {
            weight: 3.0,
            validation_fraction: 0.3,
        };
        let plan = TrainingPlan::with_local(&examples, &flags, &options(), &local_options).unwrap();
        let held: Vec<String> = plan
            .local_validation_cases()
            .iter()
            .map(|e| e.lesion.clone())
            .collect();
        let expected: Vec<String> = local
            .iter()
            .filter(|e| held_out_lesion(&e.lesion, 0.3))
            .map(|e| e.lesion.clone())
            .collect();
        assert_eq!(held, expected);
        assert!((8..=30).contains(&held.len()), "{} held out", held.len());
        assert_eq!(plan.local_train_cases(), local.len() - held.len());
        // The reference cases split as without local cases.
        let alone = TrainingPlan::new(&reference, &options()).unwrap();
        assert_eq!(
            plan.validation_cases(),
            alone.validation_cases() + held.len()
        );

        let dir = tempfile::tempdir().unwrap();
        let (adapter, report) = plan.install(dir.path()).unwrap();
        let figures = report.local_validation.clone().expect("local validation");
        assert_eq!(figures.cases, held.len());
        assert_eq!(report.local_train_cases, local.len() - held.len());
        assert_eq!(report.local_weight, 3.0);
        // The figure is the installed adapter's on exactly those cases.
        let again = ValidationFigures::of(&adapter, &plan_cases(&local, &held)).unwrap();
        assert_eq!(figures, again);
        assert!(report.to_text().contains("validation on local cases"));
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(REPORT_JSON)).unwrap()).unwrap();
        assert_eq!(saved["local_validation"]["cases"], held.len());
    }

    fn plan_cases(local: &[LabelledEmbedding], held: &[String]) -> Vec<LabelledEmbedding> {
        local
            .iter()
            .filter(|e| held.contains(&e.lesion))
            .cloned()
            .collect()
    }

    #[test]
    fn a_lesion_held_out_once_stays_held_out_as_cases_accumulate() {
        let reference = clusters(&[30, 30]);
        let mut local = local_cases(30, 5);
        let plan = |local: &[LabelledEmbedding]| {
            let (examples, flags) = with_local(&reference, local);
            TrainingPlan::with_local(&examples, &flags, &options(), &LocalOptions::default())
                .unwrap()
                .local_validation_cases()
                .into_iter()
                .map(|e| e.lesion)
                .collect::<Vec<_>>()
        };
        let before = plan(&local);
        local.extend(local_cases(40, 6));
        let after = plan(&local);
        assert!(!before.is_empty());
        assert!(
            before.iter().all(|l| after.contains(l)),
            "{before:?} {after:?}"
        );
        assert!(after.len() > before.len());
    }

    #[test]
    fn training_on_local_cases_teaches_their_domain() {
        let reference = clusters(&[40, 40]);
        let local = local_cases(80, 9);
        let local_options = LocalOptions {
            weight: 3.0,
            validation_fraction: 0.3,
        };
        let (examples, flags) = with_local(&reference, &local);
        let plan = TrainingPlan::with_local(&examples, &flags, &options(), &local_options).unwrap();
        let held = plan.local_validation_cases();
        let dir = tempfile::tempdir().unwrap();
        let (_, with) = plan.install(dir.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (without, _) = train_and_install(&reference, &options(), dir.path()).unwrap();
        let before = ValidationFigures::of(&without, &held).unwrap();
        let after = with.local_validation.unwrap();
        // The local "camera" pushes each class towards the other's axis.
        assert!(
            after.balanced_accuracy > before.balanced_accuracy + 0.2,
            "{before:?} -> {after:?}"
        );
    }

    #[test]
    fn figures_count_other_classes_as_misses_and_compare_both_figures() {
        let f = ValidationFigures::new(
            &["mel", "mel", "nv", "nv", "nv", "nv"],
            &["mel", "bkl", "nv", "nv", "nv", "mel"],
        );
        assert_eq!(f.cases, 6);
        assert_eq!(f.melanoma_cases, 2);
        assert_eq!(f.melanoma_recall, Some(0.5));
        assert!((f.balanced_accuracy - 0.625).abs() < 1e-12);
        let better_average_worse_recall = ValidationFigures {
            balanced_accuracy: 0.9,
            melanoma_recall: Some(0.4),
            ..f.clone()
        };
        assert!(!better_average_worse_recall.no_worse_than(&f));
        assert!(f.no_worse_than(&f));
        let worse_average = ValidationFigures {
            balanced_accuracy: 0.6,
            melanoma_recall: Some(0.9),
            ..f.clone()
        };
        assert!(!worse_average.no_worse_than(&f));
        let none = ValidationFigures::new(&["nv"], &["nv"]);
        assert_eq!(none.melanoma_recall, None);
    }

    #[test]
    fn promote_keeps_the_old_adapter_and_rollback_puts_it_back() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("adapter");
        let (old, _) = train_and_install(&clusters(&[30, 30]), &options(), &dir).unwrap();
        let candidate = candidate_dir(&dir);
        let mut other = options();
        other.config.seed = 99;
        let (new, _) = train_and_install(&clusters(&[30, 30]), &other, &candidate).unwrap();
        assert_ne!(old.adapter_id(), new.adapter_id());

        let manifest = promote(&candidate, &dir).unwrap();
        assert_eq!(manifest.adapter_id, new.adapter_id());
        assert!(!candidate.exists());
        let installed = Adapter::load(&dir, ENCODER, DIM).unwrap();
        assert_eq!(installed.adapter_id(), new.adapter_id());
        let kept = Adapter::load(&previous_dir(&dir), ENCODER, DIM).unwrap();
        assert_eq!(kept.adapter_id(), old.adapter_id());
        // The installed folder holds only the model its manifest names.
        let models: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".onnx"))
            .collect();
        assert_eq!(models, [installed.manifest().file.clone()]);
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(REPORT_JSON)).unwrap()).unwrap();
        assert_eq!(report["adapter_id"], new.adapter_id());

        rollback(&dir).unwrap();
        assert_eq!(
            Adapter::load(&dir, ENCODER, DIM).unwrap().adapter_id(),
            old.adapter_id()
        );
        assert_eq!(
            Adapter::load(&previous_dir(&dir), ENCODER, DIM)
                .unwrap()
                .adapter_id(),
            new.adapter_id()
        );
        let none = root.path().join("never");
        assert!(matches!(rollback(&none), Err(SwitchError::Missing { .. })));
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
