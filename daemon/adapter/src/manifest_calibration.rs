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

/// "No close match in the library" when the best match is less similar
/// than the validation queries' best matches are, in either of two spaces:
/// the adapter's (the space the daemon searches and whose similarities the
/// screen shows) and the encoder's raw one. Either alone misses what the
/// other sees: the adapter maps anything, a drawn gradient scene too, into
/// some class's region where cosines are near 1, so only the raw space sees
/// such a photograph as far; the raw space spreads lesions of another
/// camera out, where the adapter still finds their class. Each space's
/// threshold is its `space_quantile`-th quantile, chosen so that the two
/// together fire on at most `quantile` of the validation queries: by
/// construction the rule then fires on about `quantile` of lesions like the
/// library's own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NoMatchRule {
    pub quantile: f64,
    /// Cosine similarity in the adapter's space.
    pub min_top1_similarity: f32,
    /// Cosine similarity in the encoder's raw space; without it only the
    /// adapter-space threshold applies. Manifests written before the raw
    /// threshold applied (it was kept for comparison) have it at the full
    /// `quantile` and no `space_quantile`: it applies to them too, so such
    /// an adapter's rule fires on up to twice `quantile` of the validation
    /// split until it is retrained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_top1_raw_similarity: Option<f32>,
    /// The quantile each space's threshold sits at (at most `quantile`);
    /// absent in manifests whose two thresholds were each at `quantile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space_quantile: Option<f64>,
    /// How often the rule, both spaces together, fired on the validation
    /// queries it was chosen on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_rate: Option<f64>,
    pub validation_queries: usize,
}

impl NoMatchRule {
    /// Whether the best matches, in the adapter's space and in the raw one
    /// (`None`: an empty library, or a space not searched), are close
    /// enough to be shown as matches: both must pass their threshold.
    pub fn is_close_match(&self, top1_similarity: Option<f32>, top1_raw: Option<f32>) -> bool {
        self.adapter_close(top1_similarity) && self.raw_close(top1_raw)
    }

    /// The adapter-space half of [`Self::is_close_match`].
    pub fn adapter_close(&self, top1_similarity: Option<f32>) -> bool {
        top1_similarity.is_some_and(|s| s >= self.min_top1_similarity)
    }

    /// The raw-space half of [`Self::is_close_match`]; always close without
    /// a raw threshold.
    pub fn raw_close(&self, top1_raw: Option<f32>) -> bool {
        match self.min_top1_raw_similarity {
            Some(min) => top1_raw.is_some_and(|s| s >= min),
            None => true,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_written_before_the_raw_threshold_applied_still_loads_and_applies_it() {
        // `[calibration.no_match]` as adapters trained before carry it.
        let old: Calibration = toml::from_str(
            "[no_match]\nquantile = 0.02\nmin_top1_similarity = 0.96\n\
             min_top1_raw_similarity = 0.71\nvalidation_queries = 600\n",
        )
        .unwrap();
        let rule = old.no_match.unwrap();
        assert_eq!((rule.space_quantile, rule.validation_rate), (None, None));
        assert!(rule.is_close_match(Some(0.97), Some(0.72)));
        assert!(
            !rule.is_close_match(Some(0.97), Some(0.70)),
            "raw space far"
        );
        assert!(
            !rule.is_close_match(Some(0.95), Some(0.72)),
            "adapter space far"
        );
        // Only an adapter-space rule: the raw space is not consulted.
        let adapter_only = NoMatchRule {
            min_top1_raw_similarity: None,
            ..rule.clone()
        };
        assert!(adapter_only.is_close_match(Some(0.97), None));

        let new = Calibration {
            melanoma: None,
            no_match: Some(NoMatchRule {
                space_quantile: Some(0.0125),
                validation_rate: Some(0.0198),
                ..rule
            }),
        };
        let text = toml::to_string(&new).unwrap();
        assert_eq!(toml::from_str::<Calibration>(&text).unwrap(), new, "{text}");
    }
}
