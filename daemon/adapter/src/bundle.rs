//! An adapter on disk (`manifest.toml` + `adapter.onnx`) and running it with tract.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

use crate::onnx::{self, EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME};
use crate::train::TrainedAdapter;
use crate::AdapterError;

pub const MANIFEST_FILE: &str = "manifest.toml";
pub const MODEL_FILE: &str = "adapter.onnx";
pub const FORMAT: u32 = 1;
/// Rows per run when re-embedding a library: tract plans have a fixed batch.
pub const BATCH_ROWS: usize = 64;

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
    pub file: String,
    pub sha256: String,
    pub created_at_ms: u64,
    pub training: TrainingSummary,
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

/// Writes `trained` into `dir` (created if needed): the ONNX first, then the
/// manifest, each through a temporary file and a rename, so a crash leaves
/// either the old adapter or the new one, never a manifest without its model.
pub fn save(
    trained: &TrainedAdapter,
    seed: u64,
    dir: &Path,
) -> Result<AdapterManifest, AdapterError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdapterError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let doc = format!(
        "Dermascope adapter for encoder {}; classes {}",
        trained.encoder_model_id,
        trained.classes.join(",")
    );
    let bytes = onnx::export(&trained.weights, &doc);
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let model_path = dir.join(MODEL_FILE);
    write_atomically(&model_path, &bytes).map_err(io(&model_path))?;
    let best = trained
        .history
        .iter()
        .find(|r| r.epoch == trained.best_epoch)
        .map(|r| r.validation_balanced_accuracy)
        .unwrap_or(0.0);
    let manifest = AdapterManifest {
        format: FORMAT,
        adapter_id: format!("adapter-{}", &sha256[..16]),
        encoder_model_id: trained.encoder_model_id.clone(),
        embedding_dim: trained.weights.shape.input_dim,
        hidden: trained.weights.shape.hidden,
        classes: trained.classes.clone(),
        file: MODEL_FILE.to_string(),
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
    };
    let text = toml::to_string_pretty(&manifest).map_err(|e| AdapterError::Manifest {
        path: dir.join(MANIFEST_FILE),
        message: e.to_string(),
    })?;
    let manifest_path = dir.join(MANIFEST_FILE);
    write_atomically(&manifest_path, text.as_bytes()).map_err(io(&manifest_path))?;
    Ok(manifest)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        // Make the rename itself durable.
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
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
        let manifest: AdapterManifest =
            toml::from_str(&text).map_err(|e| AdapterError::Manifest {
                path: manifest_path.clone(),
                message: e.to_string(),
            })?;
        if manifest.format != FORMAT {
            return Err(AdapterError::Manifest {
                path: manifest_path,
                message: format!("format {} (this build reads {FORMAT})", manifest.format),
            });
        }
        if manifest.encoder_model_id != encoder_model_id || manifest.embedding_dim != embedding_dim
        {
            return Err(AdapterError::EncoderMismatch {
                adapter_encoder: manifest.encoder_model_id.clone(),
                adapter_dim: manifest.embedding_dim,
                encoder: encoder_model_id.to_string(),
                encoder_dim: embedding_dim,
            });
        }
        if manifest.classes.len() < 2 || manifest.hidden == 0 {
            return Err(AdapterError::Manifest {
                path: manifest_path,
                message: "needs at least two classes and a positive hidden size".into(),
            });
        }
        if manifest.file.contains('/') || manifest.file.contains("..") {
            return Err(AdapterError::Manifest {
                path: manifest_path,
                message: format!("file {:?} must be a name in the same folder", manifest.file),
            });
        }
        let model_path = dir.join(&manifest.file);
        let bytes = std::fs::read(&model_path).map_err(|source| AdapterError::Io {
            path: model_path.clone(),
            source,
        })?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != manifest.sha256 {
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
