//! Work on the case library as a whole, beside the daemon's capture loop:
//! reading a labels file (`labels`), turning its photographs into cases
//! (`ingest`, `photo`: thumbnails and kept originals), and moving a library
//! to another encoder (`reembed`).
//!
//! It wires the encoder and the store, which know nothing of each other,
//! and knows nothing of screens, hardware or the command line: the CLI and
//! the daemon's assembly call it with paths and options, and print.
//!
//! Architecture Invariant: no function here prints or exits; progress
//! reaches the caller through a callback and results as typed values.

pub mod ingest;
pub mod labels;
pub mod photo;
pub mod reembed;

pub use ingest::{ingest, IngestError, IngestOptions, IngestProgress, IngestSummary};
pub use labels::{read_labels, LabelledImage, LabelsError, LabelsFile, RejectedRow};
pub use photo::{
    original_from_bytes, original_from_rgb, thumbnail, thumbnail_jpeg, THUMBNAIL_SIDE,
};
pub use reembed::{reembed, ReembedError, ReembedOutcome, ReembedProgress, ReembedReport};
