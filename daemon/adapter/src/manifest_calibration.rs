//! Decision rules calibrated on the adapter's own lesion-grouped validation
//! split, kept in its manifest: the melanoma operating point ("flag for
//! review") and the "no close match" rule. They belong to one adapter: a
//! retrained adapter has other scores and another space, so it gets its own.
//!
//! This crate only stores and applies them; `dermascope-library`'s
//! `operating_point` module computes them when the adapter is trained.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bundle::{read_manifest, write_manifest};
use crate::{AdapterError, AdapterManifest};

/// Both rules; either may be missing (a validation split without melanoma
/// cannot set an operating point).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub melanoma: Option<OperatingPoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_match: Option<NoMatchRule>,
}

/// "Flag for review" when the combined melanoma score reaches `threshold`,
/// chosen as the highest threshold whose sensitivity on the validation
/// split reaches `target_sensitivity`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OperatingPoint {
    /// The diagnosis code the score is of (`mel`).
    pub class: String,
    pub target_sensitivity: f64,
    pub threshold: f64,
    /// Measured on the validation split at `threshold`.
    pub sensitivity: f64,
    pub specificity: f64,
    pub validation_positives: usize,
    pub validation_negatives: usize,
}

impl OperatingPoint {
    /// Whether a query with this combined score is flagged for review.
    pub fn flags(&self, score: f64) -> bool {
        score >= self.threshold
    }
}

/// "No close match in the library" when the best match is less similar than
/// the `quantile`-th quantile of the validation queries' best matches among
/// the training cases: by construction it fires on about `quantile` of
/// lesions like the library's own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NoMatchRule {
    pub quantile: f64,
    /// Cosine similarity in the adapter's space, the space the daemon
    /// searches and whose similarities the screen shows.
    pub min_top1_similarity: f32,
    /// The same quantile in the encoder's raw space (for the record and for
    /// comparison in `dermascope eval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_top1_raw_similarity: Option<f32>,
    pub validation_queries: usize,
}

impl NoMatchRule {
    /// Whether the best adapter-space match (`None`: an empty library) is
    /// close enough to be shown as a match.
    pub fn is_close_match(&self, top1_similarity: Option<f32>) -> bool {
        top1_similarity.is_some_and(|s| s >= self.min_top1_similarity)
    }
}

/// Stores `calibration` in the manifest of the adapter installed in `dir`,
/// atomically (temporary file, fsync, rename), and returns the new
/// manifest. Refused when the installed adapter is not `adapter_id`: an
/// adapter installed meanwhile must not get rules computed for another.
/// A crash before the rename leaves the manifest without them, which loads
/// as an adapter with no flag and no rule.
pub fn record_calibration(
    dir: &Path,
    adapter_id: &str,
    calibration: Calibration,
) -> Result<AdapterManifest, AdapterError> {
    let mut manifest = read_manifest(dir)?;
    if manifest.adapter_id != adapter_id {
        return Err(AdapterError::Manifest {
            path: dir.join(crate::MANIFEST_FILE),
            message: format!(
                "installed adapter is {}, calibration is for {adapter_id}",
                manifest.adapter_id
            ),
        });
    }
    manifest.calibration = Some(calibration);
    write_manifest(dir, &manifest)?;
    Ok(manifest)
}
