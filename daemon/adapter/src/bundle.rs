//! An adapter on disk and running it with tract.
//!
//! # Layout and install
//! A bundle is `manifest.toml` plus the ONNX file it names. The file is
//! content-addressed, `adapter-<first 16 hex digits of its sha256>.onnx`
//! (the adapter id), so installing a new adapter never overwrites the file
//! the installed manifest names. [`save`] writes the new model file (fsynced,
//! renamed into place, directory fsynced), then the manifest the same way;
//! the manifest's rename is the commit point. Only after it is durable are
//! the model files no manifest names removed. A crash at any moment leaves
//! the complete old adapter or the complete new one, never a manifest whose
//! file is missing or half written (the cause of a checksum mismatch that
//! would stop the daemon from starting). Bundles of the older layout, whose
//! manifest names [`LEGACY_MODEL_FILE`], load as before and are replaced by
//! the same install.

use std::io::Cursor;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};
use tract_onnx::prelude::*;

use crate::manifest_calibration::Calibration;
use crate::onnx::{self, EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME};
use crate::train::TrainedAdapter;
use crate::AdapterError;

pub const MANIFEST_FILE: &str = "manifest.toml";
/// The model file of bundles written before the model file was
/// content-addressed: still loaded when a manifest names it.
pub const LEGACY_MODEL_FILE: &str = "adapter.onnx";
pub const FORMAT: u32 = 1;
/// Rows per run when re-embedding a library: tract plans have a fixed batch.
pub const BATCH_ROWS: usize = 64;
/// Suffix of the files an install writes before renaming them into place.
const TEMP_SUFFIX: &str = ".tmp";

/// The adapter's contract with the daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdapterManifest {
    pub format: u32,
    /// `adapter-` + the first 16 hex digits of the ONNX file's sha256: names
    /// the adapter space in the case store, so a new adapter means new rows.
    pub adapter_id: String,
    /// The encoder whose embeddings this adapter takes.
    pub encoder_model_id: String,
    pub embedding_dim: usize,
    pub hidden: usize,
    /// Diagnosis codes in logit order.
    pub classes: Vec<String>,
    /// The model file, in the manifest's folder: `<adapter_id>.onnx`
    /// ([`LEGACY_MODEL_FILE`] in older bundles).
    pub file: String,
    pub sha256: String,
    pub created_at_ms: u64,
    pub training: TrainingSummary,
    /// The melanoma operating point and the "no close match" rule, computed
    /// on the validation split after training and stored by
    /// [`crate::record_calibration`]. Absent in manifests written before them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
}

/// How the adapter was trained (for the record; not used to run it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingSummary {
    pub seed: u64,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub train_cases: usize,
    pub validation_cases: usize,
    pub validation_balanced_accuracy: f64,
    pub class_changes: Vec<String>,
    pub wall_time_ms: u64,
}

/// The steps of an install, in order. After each one a crash leaves a
/// loadable adapter: the old one up to [`InstallStep::ManifestWritten`], the
/// new one from [`InstallStep::ManifestInPlace`] on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InstallStep {
    /// The model's temporary file is written and fsynced.
    ModelWritten,
    /// It has its content-addressed name, and the rename is durable.
    ModelInPlace,
    /// The manifest's temporary file is written and fsynced.
    ManifestWritten,
    /// The commit point: the manifest names the new model, durably.
    ManifestInPlace,
    /// Model files no manifest names (and leftover temporary files) are gone.
    OldModelsRemoved,
}

impl InstallStep {
    #[cfg(test)]
    pub(crate) const ALL: [InstallStep; 5] = [
        InstallStep::ModelWritten,
        InstallStep::ModelInPlace,
        InstallStep::ManifestWritten,
        InstallStep::ManifestInPlace,
        InstallStep::OldModelsRemoved,
    ];

    fn name(self) -> &'static str {
        match self {
            InstallStep::ModelWritten => "model written",
            InstallStep::ModelInPlace => "model in place",
            InstallStep::ManifestWritten => "manifest written",
            InstallStep::ManifestInPlace => "manifest in place",
            InstallStep::OldModelsRemoved => "old models removed",
        }
    }
}

/// Installs `trained` in `dir` (created if needed), replacing the adapter
/// installed there atomically (see the module's docs). Each step is logged
/// at debug level as `adapter install step` once it is done.
pub fn save(
    trained: &TrainedAdapter,
    seed: u64,
    dir: &Path,
) -> Result<AdapterManifest, AdapterError> {
    install(trained, seed, dir, |step| {
        debug!(step = step.name(), "adapter install step");
        ControlFlow::Continue(())
    })
}

/// [`save`], calling `after` when each step is done; `Break` stops the
/// install there, leaving the folder as a crash at that moment would.
pub(crate) fn install(
    trained: &TrainedAdapter,
    seed: u64,
    dir: &Path,
    mut after: impl FnMut(InstallStep) -> ControlFlow<()>,
) -> Result<AdapterManifest, AdapterError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdapterError::Io { path, source }
    };
    create_private_dir(dir).map_err(io(dir))?;
    let doc = format!(
        "Dermascope adapter for encoder {}; classes {}",
        trained.encoder_model_id,
        trained.classes.join(",")
    );
    let bytes = onnx::export(&trained.weights, &doc);
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let adapter_id = format!("adapter-{}", &sha256[..16]);
    let file = format!("{adapter_id}.onnx");
    let best = trained
        .history
        .iter()
        .find(|r| r.epoch == trained.best_epoch)
        .map(|r| r.validation_balanced_accuracy)
        .unwrap_or(0.0);
    let manifest = AdapterManifest {
        format: FORMAT,
        adapter_id,
        encoder_model_id: trained.encoder_model_id.clone(),
        embedding_dim: trained.weights.shape.input_dim,
        hidden: trained.weights.shape.hidden,
        classes: trained.classes.clone(),
        file: file.clone(),
        sha256,
        created_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        training: TrainingSummary {
            seed,
            epochs_run: trained.history.len(),
            best_epoch: trained.best_epoch,
            train_cases: trained.train_size,
            validation_cases: trained.validation_size,
            validation_balanced_accuracy: best,
            class_changes: trained.class_changes.clone(),
            wall_time_ms: trained.wall_time.as_millis() as u64,
        },
        calibration: None,
    };
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = toml::to_string_pretty(&manifest).map_err(|e| AdapterError::Manifest {
        path: manifest_path.clone(),
        message: e.to_string(),
    })?;

    // Files left by installs that were interrupted go first, so that at
    // most two models (the installed one and this one) are ever on disk.
    // Without a readable manifest nothing is provably unused: keep all.
    if let Ok(installed) = read_manifest(dir) {
        remove_unnamed_models(dir, &[&installed.file, &file]);
    }
    // An install of the adapter that is installed already rewrites the same
    // bytes under the same name: the rename swaps identical content.
    let model_path = dir.join(&file);
    let model_temp = temp_path(dir, &file);
    write_synced(&model_temp, &bytes).map_err(io(&model_temp))?;
    if after(InstallStep::ModelWritten).is_break() {
        return Ok(manifest);
    }
    rename_synced(&model_temp, &model_path, dir).map_err(io(&model_path))?;
    if after(InstallStep::ModelInPlace).is_break() {
        return Ok(manifest);
    }
    let manifest_temp = temp_path(dir, MANIFEST_FILE);
    write_synced(&manifest_temp, text.as_bytes()).map_err(io(&manifest_temp))?;
    if after(InstallStep::ManifestWritten).is_break() {
        return Ok(manifest);
    }
    rename_synced(&manifest_temp, &manifest_path, dir).map_err(io(&manifest_path))?;
    if after(InstallStep::ManifestInPlace).is_break() {
        return Ok(manifest);
    }
    // Installed; what is left is tidying, so a failure here is only logged.
    remove_unnamed_models(dir, &[&file]);
    let _ = after(InstallStep::OldModelsRemoved);
    Ok(manifest)
}

fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{TEMP_SUFFIX}"))
}

/// An adapter is trained on a clinic's cases: its folder (and any missing
/// parent) is made 0700 and its files 0600, whatever the umask.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    // A temporary left by an interrupted install would keep its old mode.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Renames `from` to `to` and fsyncs `dir`, so that the rename itself
/// survives a power cut, not only the file's bytes.
fn rename_synced(from: &Path, to: &Path, dir: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Whether `name` is a file an install writes: a model file of either
/// layout, or a temporary file of an install that did not finish.
fn written_by_install(name: &str) -> bool {
    let model = |n: &str| {
        n == LEGACY_MODEL_FILE
            || n.strip_prefix("adapter-")
                .and_then(|rest| rest.strip_suffix(".onnx"))
                .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    match name.strip_suffix(TEMP_SUFFIX) {
        Some(target) => target == MANIFEST_FILE || model(target),
        None => model(name),
    }
}

/// Removes every model file but those in `keep`, and leftover temporary
/// files. `keep` must hold the file the durable manifest names.
fn remove_unnamed_models(dir: &Path, keep: &[&str]) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            warn!(%error, "could not list the adapter folder to remove old models");
            return;
        }
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if keep.contains(&name) || !written_by_install(name) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(error) => warn!(file = name, %error, "could not remove an old adapter model"),
        }
    }
    if removed > 0 {
        if let Err(error) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            warn!(%error, "could not sync the adapter folder after removing old models");
        }
    }
}

/// What the adapter says about one embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterOutput {
    /// Softmax over the manifest's classes.
    pub probabilities: Vec<f32>,
    pub logits: Vec<f32>,
    /// The adapter embedding, L2-normalised: what the adapter space of the
    /// case store indexes.
    pub embedding: Vec<f32>,
    /// Index of the most probable class.
    pub predicted: usize,
}

/// A loaded, verified, optimised adapter.
pub struct Adapter {
    manifest: AdapterManifest,
    single: Arc<TypedRunnableModel>,
    batched: Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("adapter_id", &self.manifest.adapter_id)
            .field("encoder_model_id", &self.manifest.encoder_model_id)
            .finish_non_exhaustive()
    }
}

impl Adapter {
    /// Loads the adapter in `dir` for the encoder `encoder_model_id` with
    /// embeddings of `embedding_dim`. An adapter trained for another encoder
    /// is refused: its inputs would be meaningless.
    pub fn load(
        dir: &Path,
        encoder_model_id: &str,
        embedding_dim: usize,
    ) -> Result<Self, AdapterError> {
        let (manifest, model_path, bytes) = read_bundle(dir)?;
        if manifest.encoder_model_id != encoder_model_id || manifest.embedding_dim != embedding_dim
        {
            return Err(AdapterError::EncoderMismatch {
                adapter_encoder: manifest.encoder_model_id.clone(),
                adapter_dim: manifest.embedding_dim,
                encoder: encoder_model_id.to_string(),
                encoder_dim: embedding_dim,
            });
        }
        let actual = hex::encode(Sha256::digest(&bytes));
        // Hex digits in either case, as the encoder's manifest check reads
        // them: a hand-edited manifest in upper case is still the same file.
        if !actual.eq_ignore_ascii_case(&manifest.sha256) {
            return Err(AdapterError::ChecksumMismatch {
                path: model_path,
                expected: manifest.sha256.clone(),
                actual,
            });
        }
        let single = plan(&bytes, &model_path, &manifest, 1)?;
        let batched = plan(&bytes, &model_path, &manifest, BATCH_ROWS)?;
        Ok(Self {
            manifest,
            single,
            batched,
        })
    }

    pub fn manifest(&self) -> &AdapterManifest {
        &self.manifest
    }

    pub fn adapter_id(&self) -> &str {
        &self.manifest.adapter_id
    }

    pub fn classes(&self) -> &[String] {
        &self.manifest.classes
    }

    /// Dimension of the adapter embedding.
    pub fn hidden(&self) -> usize {
        self.manifest.hidden
    }

    /// Runs the adapter on one encoder embedding.
    pub fn predict(&self, embedding: &[f32]) -> Result<AdapterOutput, AdapterError> {
        let mut outputs = self.run(&self.single, 1, &[embedding])?;
        outputs.pop().ok_or(AdapterError::Inference(
            "the adapter returned no rows".into(),
        ))
    }

    /// Runs the adapter on many embeddings, `BATCH_ROWS` per tract run.
    pub fn predict_many<E: AsRef<[f32]>>(
        &self,
        embeddings: &[E],
    ) -> Result<Vec<AdapterOutput>, AdapterError> {
        let mut outputs = Vec::with_capacity(embeddings.len());
        for chunk in embeddings.chunks(BATCH_ROWS) {
            let rows: Vec<&[f32]> = chunk.iter().map(AsRef::as_ref).collect();
            outputs.extend(self.run(&self.batched, BATCH_ROWS, &rows)?);
        }
        Ok(outputs)
    }

    fn run(
        &self,
        plan: &Arc<TypedRunnableModel>,
        batch: usize,
        rows: &[&[f32]],
    ) -> Result<Vec<AdapterOutput>, AdapterError> {
        let dim = self.manifest.embedding_dim;
        let mut input = vec![0f32; batch * dim];
        for (slot, row) in input.chunks_mut(dim).zip(rows) {
            if row.len() != dim {
                return Err(AdapterError::DimensionMismatch {
                    expected: dim,
                    found: row.len(),
                });
            }
            slot.copy_from_slice(row);
        }
        let inference = |e: TractError| AdapterError::Inference(format!("{e:#}"));
        let tensor = Tensor::from_shape(&[batch, dim], &input).map_err(inference)?;
        let outputs = plan.run(tvec![tensor.into_tvalue()]).map_err(inference)?;
        let (Some(logits), Some(embeddings)) = (outputs.first(), outputs.get(1)) else {
            return Err(AdapterError::Inference("expected two outputs".into()));
        };
        let logits = logits.to_plain_array_view::<f32>().map_err(inference)?;
        let embeddings = embeddings.to_plain_array_view::<f32>().map_err(inference)?;
        let classes = self.manifest.classes.len();
        let hidden = self.manifest.hidden;
        let logits: Vec<f32> = logits.iter().copied().collect();
        let embeddings: Vec<f32> = embeddings.iter().copied().collect();
        if logits.len() != batch * classes || embeddings.len() != batch * hidden {
            return Err(AdapterError::Inference(format!(
                "output sizes {} and {} do not match {batch} rows of {classes} classes and {hidden} dims",
                logits.len(),
                embeddings.len()
            )));
        }
        Ok(rows
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let row_logits = logits[i * classes..(i + 1) * classes].to_vec();
                let mut embedding = embeddings[i * hidden..(i + 1) * hidden].to_vec();
                let norm = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
                if norm > 0.0 {
                    embedding.iter_mut().for_each(|v| *v /= norm);
                }
                let probabilities = softmax_row(&row_logits);
                let predicted = crate::train::argmax(probabilities.iter().copied());
                AdapterOutput {
                    probabilities,
                    logits: row_logits,
                    embedding,
                    predicted,
                }
            })
            .collect())
    }
}

/// How many times [`read_bundle`] reads again when an install replaced the
/// adapter between reading the manifest and reading its model file.
const INSTALL_RACE_RETRIES: usize = 10;

/// Reads the manifest and the model file it names. An install that commits
/// between the two reads removes the old file; reading both again gets the
/// new adapter whole.
fn read_bundle(dir: &Path) -> Result<(AdapterManifest, PathBuf, Vec<u8>), AdapterError> {
    let mut retries = 0;
    loop {
        let manifest = read_manifest(dir)?;
        let model_path = dir.join(&manifest.file);
        match std::fs::read(&model_path) {
            Ok(bytes) => return Ok((manifest, model_path, bytes)),
            // A file that is really missing costs a few more reads.
            Err(source)
                if source.kind() == std::io::ErrorKind::NotFound
                    && retries < INSTALL_RACE_RETRIES =>
            {
                retries += 1;
            }
            Err(source) => {
                return Err(AdapterError::Io {
                    path: model_path,
                    source,
                })
            }
        }
    }
}

/// The manifest, checked for everything that does not depend on the
/// encoder in use.
pub(crate) fn read_manifest(dir: &Path) -> Result<AdapterManifest, AdapterError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            AdapterError::Missing {
                dir: dir.to_path_buf(),
            }
        } else {
            AdapterError::Io {
                path: manifest_path.clone(),
                source,
            }
        }
    })?;
    let manifest: AdapterManifest = toml::from_str(&text).map_err(|e| AdapterError::Manifest {
        path: manifest_path.clone(),
        message: e.to_string(),
    })?;
    let invalid = |message: String| AdapterError::Manifest {
        path: manifest_path.clone(),
        message,
    };
    if manifest.format != FORMAT {
        return Err(invalid(format!(
            "format {} (this build reads {FORMAT})",
            manifest.format
        )));
    }
    if manifest.classes.len() < 2 || manifest.hidden == 0 {
        return Err(invalid(
            "needs at least two classes and a positive hidden size".into(),
        ));
    }
    if manifest.file.is_empty()
        || manifest.file.contains(['/', '\\'])
        || manifest.file.contains("..")
    {
        return Err(invalid(format!(
            "file {:?} must be a name in the same folder",
            manifest.file
        )));
    }
    Ok(manifest)
}

/// Replaces the manifest in `dir` with `manifest` the way an install
/// writes it (temporary file, fsync, rename, directory fsync).
pub(crate) fn write_manifest(dir: &Path, manifest: &AdapterManifest) -> Result<(), AdapterError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = toml::to_string_pretty(manifest).map_err(|e| AdapterError::Manifest {
        path: manifest_path.clone(),
        message: e.to_string(),
    })?;
    let temp = temp_path(dir, MANIFEST_FILE);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdapterError::Io { path, source }
    };
    write_synced(&temp, text.as_bytes()).map_err(io(&temp))?;
    rename_synced(&temp, &manifest_path, dir).map_err(io(&manifest_path))
}

fn softmax_row(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let exp: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|v| v / sum).collect()
}

fn plan(
    bytes: &[u8],
    path: &Path,
    manifest: &AdapterManifest,
    batch: usize,
) -> Result<Arc<TypedRunnableModel>, AdapterError> {
    let graph = |e: TractError| AdapterError::Graph {
        path: PathBuf::from(path),
        message: format!("{e:#}"),
    };
    let mut model = tract_onnx::onnx()
        .model_for_read(&mut Cursor::new(bytes))
        .map_err(graph)?;
    let names: Vec<String> = model
        .input_outlets()
        .map_err(graph)?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    if names != [INPUT_NAME] {
        return Err(AdapterError::Graph {
            path: PathBuf::from(path),
            message: format!("expected one input named {INPUT_NAME:?}, found {names:?}"),
        });
    }
    let outputs: Vec<String> = model
        .output_outlets()
        .map_err(graph)?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    if outputs != [LOGITS_NAME, EMBEDDING_NAME] {
        return Err(AdapterError::Graph {
            path: PathBuf::from(path),
            message: format!(
                "expected outputs {LOGITS_NAME:?} and {EMBEDDING_NAME:?}, found {outputs:?}"
            ),
        });
    }
    model
        .set_input_fact(0, f32::fact([batch, manifest.embedding_dim]).into())
        .map_err(graph)?;
    model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(graph)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::model::{AdapterShape, AdapterWeights};

    const DIM: usize = 16;
    const ENCODER: &str = "test-encoder";

    /// An untrained adapter: the install does not care how good it is, and
    /// each seed gives other weights, so another adapter id.
    fn adapter(seed: u64) -> TrainedAdapter {
        let shape = AdapterShape {
            input_dim: DIM,
            hidden: 4,
            classes: 2,
        };
        TrainedAdapter {
            weights: AdapterWeights::initialise(shape, &mut StdRng::seed_from_u64(seed)),
            classes: vec!["mel".into(), "nv".into()],
            encoder_model_id: ENCODER.into(),
            history: Vec::new(),
            best_epoch: 1,
            class_changes: Vec::new(),
            train_size: 10,
            validation_size: 2,
            wall_time: Duration::ZERO,
        }
    }

    fn installed_id(dir: &Path) -> String {
        let loaded = Adapter::load(dir, ENCODER, DIM).unwrap_or_else(|e| {
            panic!("no loadable adapter in {}: {e}", dir.display());
        });
        // Loaded is not enough: tract must run it.
        let out = loaded.predict(&[0.25; DIM]).unwrap();
        assert_eq!(out.probabilities.len(), 2);
        loaded.adapter_id().to_string()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// The layout written before model files were content-addressed.
    fn install_legacy(trained: &TrainedAdapter, dir: &Path) -> String {
        let manifest = save(trained, 1, dir).unwrap();
        std::fs::rename(dir.join(&manifest.file), dir.join(LEGACY_MODEL_FILE)).unwrap();
        let legacy = AdapterManifest {
            file: LEGACY_MODEL_FILE.into(),
            ..manifest.clone()
        };
        std::fs::write(
            dir.join(MANIFEST_FILE),
            toml::to_string_pretty(&legacy).unwrap(),
        )
        .unwrap();
        manifest.adapter_id
    }

    #[cfg(unix)]
    #[test]
    fn an_installed_adapter_is_private_to_its_user() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        // Missing, as var/adapter is before the first install.
        let dir = root.path().join("var/adapter");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // The test runner's umask (0022 on most machines) would leave
        // 0755 folders and 0644 files.
        save(&adapter(1), 1, &dir).unwrap();
        save(&adapter(2), 1, &dir).unwrap();
        assert_eq!(mode(&root.path().join("var")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        for name in names(&dir) {
            assert_eq!(mode(&dir.join(&name)), 0o600, "{name}");
        }
    }

    #[test]
    fn the_model_file_is_named_by_its_content_and_the_manifest_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = save(&adapter(1), 1, dir.path()).unwrap();
        assert_eq!(manifest.file, format!("{}.onnx", manifest.adapter_id));
        let bytes = std::fs::read(dir.path().join(&manifest.file)).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), manifest.sha256);
        assert!(manifest.adapter_id.starts_with("adapter-"));
        assert_eq!(names(dir.path()), [manifest.file.as_str(), MANIFEST_FILE]);
        assert_eq!(installed_id(dir.path()), manifest.adapter_id);
    }

    /// Stops an install after each of its steps, as a kill there would,
    /// over each layout a device may hold: until the manifest is renamed the
    /// old adapter loads, from then on the new one, and the next install
    /// finishes and leaves only its own files.
    #[test]
    fn a_crash_after_any_install_step_leaves_the_old_or_the_new_adapter_whole() {
        for layout in ["none", "legacy", "content-addressed"] {
            for step in InstallStep::ALL {
                let dir = tempfile::tempdir().unwrap();
                let old = match layout {
                    "none" => None,
                    "legacy" => Some(install_legacy(&adapter(10), dir.path())),
                    _ => Some(save(&adapter(10), 1, dir.path()).unwrap().adapter_id),
                };
                let new = install(&adapter(20), 2, dir.path(), |done| {
                    if done == step {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })
                .unwrap();
                let committed = matches!(
                    step,
                    InstallStep::ManifestInPlace | InstallStep::OldModelsRemoved
                );
                let what = format!("{layout} layout, stopped after {step:?}");
                match (&old, committed) {
                    (_, true) => assert_eq!(installed_id(dir.path()), new.adapter_id, "{what}"),
                    (Some(old), false) => assert_eq!(&installed_id(dir.path()), old, "{what}"),
                    (None, false) => assert!(
                        matches!(
                            Adapter::load(dir.path(), ENCODER, DIM),
                            Err(AdapterError::Missing { .. })
                        ),
                        "{what}"
                    ),
                }
                // A half-written temporary file is what a kill inside a
                // write leaves; it must not matter either.
                std::fs::write(dir.path().join("manifest.toml.tmp"), "format = ").unwrap();
                let after = save(&adapter(30), 3, dir.path()).unwrap();
                assert_eq!(installed_id(dir.path()), after.adapter_id, "{what}");
                assert_eq!(
                    names(dir.path()),
                    [after.file.as_str(), MANIFEST_FILE],
                    "{what}"
                );
            }
        }
    }

    #[test]
    fn interrupted_installs_never_leave_more_than_two_models() {
        let dir = tempfile::tempdir().unwrap();
        let installed = save(&adapter(1), 1, dir.path()).unwrap();
        for seed in 2..6 {
            install(&adapter(seed), 1, dir.path(), |done| {
                if done == InstallStep::ModelInPlace {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
            let models = names(dir.path())
                .into_iter()
                .filter(|n| n.ends_with(".onnx"))
                .count();
            assert_eq!(models, 2, "after the install of seed {seed} stopped");
            assert_eq!(installed_id(dir.path()), installed.adapter_id);
        }
    }

    /// A process loading the adapter while another installs a new one (the
    /// daemon starting during `adapter train`) reads a manifest whose model
    /// the install may remove before it is read: it must get one adapter
    /// whole, never an error.
    #[test]
    fn a_load_while_adapters_are_installed_gets_one_of_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let adapters = [adapter(1), adapter(2)];
        let first = save(&adapters[0], 1, dir.path()).unwrap();
        let second = save(&adapters[1], 1, dir.path()).unwrap();
        let ids = [first.adapter_id, second.adapter_id];
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for round in 0..200 {
                    save(&adapters[round % 2], 1, dir.path()).unwrap();
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let mut loads = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) || loads == 0 {
                let (_, _, bytes) = read_bundle(dir.path())
                    .unwrap_or_else(|e| panic!("load {loads} during installs failed: {e}"));
                let sha = hex::encode(Sha256::digest(&bytes));
                assert!(ids
                    .iter()
                    .any(|id| sha.starts_with(&id["adapter-".len()..])));
                loads += 1;
            }
        });
    }

    #[test]
    fn a_bundle_of_the_older_layout_loads_and_is_replaced_by_the_next_install() {
        let dir = tempfile::tempdir().unwrap();
        let old = install_legacy(&adapter(4), dir.path());
        assert_eq!(names(dir.path()), [LEGACY_MODEL_FILE, MANIFEST_FILE]);
        assert_eq!(installed_id(dir.path()), old);
        let new = save(&adapter(5), 1, dir.path()).unwrap();
        assert_eq!(installed_id(dir.path()), new.adapter_id);
        assert_eq!(names(dir.path()), [new.file.as_str(), MANIFEST_FILE]);
    }

    #[test]
    fn installing_the_installed_adapter_again_keeps_it_loadable() {
        let dir = tempfile::tempdir().unwrap();
        let first = save(&adapter(6), 1, dir.path()).unwrap();
        let second = save(&adapter(6), 1, dir.path()).unwrap();
        assert_eq!(first.file, second.file);
        assert_eq!(installed_id(dir.path()), first.adapter_id);
        assert_eq!(names(dir.path()), [first.file.as_str(), MANIFEST_FILE]);
    }

    #[test]
    fn only_files_an_install_writes_are_tidied_away() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("report.json"), "{}").unwrap();
        std::fs::write(dir.path().join("adapter-notes.onnx"), "mine").unwrap();
        let manifest = save(&adapter(7), 1, dir.path()).unwrap();
        let mut expected = vec![
            "adapter-notes.onnx".to_string(),
            manifest.file.clone(),
            MANIFEST_FILE.into(),
            "report.json".into(),
        ];
        expected.sort();
        assert_eq!(names(dir.path()), expected);
    }
}
