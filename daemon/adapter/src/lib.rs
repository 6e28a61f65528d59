//! The adapter: a small classifier over frozen encoder embeddings, trained on
//! the device from the cases its clinicians confirmed, and run by tract.
//!
//! The encoder stays frozen; what makes it fit a clinic is this adapter. It
//! returns both class logits and an `h`-dimensional adapter embedding, and
//! the daemon searches in that space when an adapter is installed.
//!
//! * [`train()`] fits the network (see [`model`]) with AdamW in plain Rust,
//!   deterministically for a seed, stopping early on a lesion-grouped
//!   validation set. No Python at run time.
//! * [`save`] installs the adapter atomically: its ONNX (built with
//!   tract-onnx's own protobuf types) under a content-addressed name, then
//!   `manifest.toml` (encoder model id, classes, the file and its sha256),
//!   so a crash leaves the old adapter or the new one, whole.
//! * [`Adapter::load`] verifies the checksum and the encoder it was trained
//!   for, fixes the batch size and optimises the graph once;
//!   [`Adapter::predict`] gives probabilities and the normalised adapter
//!   embedding.
//!
//! This crate knows nothing of images, stores or screens: it takes plain
//! `f32` embeddings with their labels and encoder model id.

mod bundle;
mod manifest_calibration;
pub mod model;
mod onnx;
mod train;

use std::path::PathBuf;

pub use bundle::{
    save, Adapter, AdapterManifest, AdapterOutput, TrainingSummary, BATCH_ROWS, LEGACY_MODEL_FILE,
    MANIFEST_FILE,
};
pub use manifest_calibration::{record_calibration, Calibration, NoMatchRule, OperatingPoint};
pub use model::{AdapterShape, AdapterWeights};
pub use onnx::{export as export_onnx, EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME};
pub use train::{
    prepare_classes, train, train_weighted, Balancing, EpochRecord, LabelledEmbedding,
    SmallClassPolicy, TrainedAdapter, TrainingConfig,
};

/// Everything that can go wrong training, saving or loading an adapter.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("no adapter in {dir}: train one with `dermascope adapter train`")]
    Missing { dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("adapter manifest {path} is invalid: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path} does not match its manifest: sha256 {actual}, manifest says {expected}; retrain or reinstall the adapter")]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("this adapter was trained for encoder {adapter_encoder} ({adapter_dim} dims) but the encoder in use is {encoder} ({encoder_dim} dims); retrain it with `dermascope adapter train`")]
    EncoderMismatch {
        adapter_encoder: String,
        adapter_dim: usize,
        encoder: String,
        encoder_dim: usize,
    },
    #[error("{path} is not an adapter graph tract can run: {message}")]
    Graph { path: PathBuf, message: String },
    #[error("running the adapter failed: {0}")]
    Inference(String),
    #[error("embedding has {found} values, the adapter takes {expected}")]
    DimensionMismatch { expected: usize, found: usize },
    #[error("an embedding contains NaN or infinite values")]
    NonFiniteEmbedding,
    #[error("the training cases come from several encoders ({}); re-embed them with one encoder first", model_ids.join(", "))]
    MixedEncoders { model_ids: Vec<String> },
    #[error("diagnoses {} have fewer than {minimum} cases (counts: {counts}); confirm more cases, or choose to leave them out (--small-classes exclude) or merge them (--small-classes merge:CODE)", small.join(", "))]
    TooFewCases {
        minimum: usize,
        counts: String,
        small: Vec<String>,
    },
    #[error("cannot merge small classes into {target:?}: it must be a diagnosis with enough cases (counts: {counts})")]
    BadMergeTarget { target: String, counts: String },
    #[error(
        "an adapter needs at least two diagnoses to tell apart; the training cases have {counts}"
    )]
    OneClass { counts: String },
    #[error("diagnosis {0:?} appears in validation but not in training")]
    UnknownClass(String),
    #[error("no training cases")]
    NoExamples,
    #[error("no validation cases: early stopping needs a lesion-grouped validation split")]
    NoValidation,
    #[error("invalid training settings: {0}")]
    BadConfig(String),
}
