//! Work on the case library as a whole, beside the daemon's capture loop:
//! reading a labels file (`labels`), turning its photographs into cases
//! (`ingest`, `photo`: thumbnails and kept originals), moving a library to
//! another encoder (`reembed`), training the clinic's adapter from its
//! cases (`training`) and bringing the library's adapter space up to date
//! (`adapter_space`), and comparing every retrieval and adapter method on
//! one split (`evaluation`).
//!
//! It wires the encoder, the adapter and the store, which know nothing of
//! each other, and knows nothing of screens, hardware or the command line:
//! the CLI and the daemon's assembly call it with paths and options, and
//! print.
//!
//! Architecture Invariant: no function here prints or exits; progress
//! reaches the caller through a callback and results as typed values.

pub mod adapter_space;
pub mod evaluation;
pub mod ingest;
pub mod labels;
pub mod operating_point;
pub mod photo;
pub mod reembed;
pub mod training;

pub use adapter_space::{index_adapter_space, AdapterSpaceError};
pub use evaluation::{
    evaluate, EvaluationError, EvaluationOptions, EvaluationReport, EvaluationStep,
};

pub use ingest::{
    ingest, ingest_in_batches, IngestError, IngestOptions, IngestProgress, IngestSummary,
    ProgressLine, DEFAULT_ENCODER_BATCH,
};
pub use labels::{parse_labels, read_labels, LabelledImage, LabelsError, LabelsFile, RejectedRow};
pub use operating_point::{
    calibrate, close_match, combined_probabilities, melanoma_flag, melanoma_operating_point,
    melanoma_score, no_match_rule, Calibration, CalibrationError, Neighbour, NoMatchRule,
    OperatingPoint, NO_MATCH_QUANTILE,
};
pub use photo::{
    original_from_bytes, original_from_rgb, thumbnail, thumbnail_jpeg, THUMBNAIL_SIDE,
};
pub use reembed::{
    reembed, reembed_into, store_for_encoder, stores_to_carry, Carry, IntoOutcome, IntoReport,
    ReembedError, ReembedOptions, ReembedOutcome, ReembedProgress, ReembedReport,
};
pub use training::{
    candidate_dir, confirmed_cases, load_installed, prediction_report, previous_dir, promote,
    read_manifest, rollback, train_and_install, ConfirmedCases, LoadAdapterError, LocalOptions,
    SwitchError, TrainingError, TrainingOptions, TrainingPlan, TrainingReport, ValidationFigures,
};
