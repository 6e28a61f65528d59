//! The combined melanoma score, the clinic-set melanoma operating point
//! ("flag for review") and the "no close match" rule.
//!
//! Both rules are chosen on the adapter's own lesion-grouped validation
//! split, never on the queries they are scored on: the validation cases are
//! searched among the training cases in the adapter's space, as a new
//! patient's lesion is searched among the library. They are computed when
//! the adapter is trained ([`calibrate`]) and stored in its manifest.
//!
//! # The combined melanoma score
//! [`combined_probabilities`] is the one definition of "adapter + kNN"
//! every caller uses (`dermascope eval`'s "adapter + kNN k=10 weighted",
//! the operating point, the daemon's analysis): the mean of the adapter's
//! probabilities and the similarity-weighted vote of the
//! [`COMBINED_K`](crate::evaluation::COMBINED_K) nearest library cases in
//! the adapter's space.
//!
//! # Choice of the no-match quantile
//! [`NO_MATCH_QUANTILE`] is 0.02: the rule fires on about 2% of lesions
//! like the library's own (a clinician who sees "no close match" on one
//! capture in fifty of ordinary lesions still reads the matches shown
//! beside it), and the 2% quantile of a validation split of ~1,000 cases
//! rests on ~20 cases below it, where the 1% one would move with a handful
//! of outliers (blurred or mislabelled photographs). The rule looks at
//! both spaces, the adapter's and the encoder's raw one, and fires when
//! either is far ([`NoMatchRule`] says why); each space's threshold is then
//! set a little lower than its own 2% quantile so that the two together
//! still fire on at most 2% of the validation split. How often it fires on
//! another atlas and on images that are not dermoscopy at all is measured
//! by `dermascope eval` (docs/evaluation.md).

use std::path::Path;

use dermascope_adapter::{
    record_calibration, Adapter, AdapterError, AdapterOutput, LabelledEmbedding,
};
use dermascope_eval::{
    knn_distribution, lower_quantile, sensitivity_specificity, threshold_for_sensitivity, Vote,
    MELANOMA,
};
use dermascope_store::{
    CaseFilter, CaseId, CaseSource, CaseTags, FlatIndex, IndexError, Residency, ScoreKind,
};
use thiserror::Error;

pub use dermascope_adapter::{Calibration, NoMatchRule, OperatingPoint};
/// The neighbour [`combined_probabilities`] votes with, for callers (the
/// daemon) that do not otherwise depend on `dermascope-eval`.
pub use dermascope_eval::Neighbour;

use crate::evaluation::COMBINED_K;

/// Fraction of the library's own validation lesions the "no close match"
/// rule fires on (see the module's docs for why 0.02).
pub const NO_MATCH_QUANTILE: f64 = 0.02;

#[derive(Debug, Error)]
pub enum CalibrationError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("searching the training cases: {0}")]
    Index(#[from] IndexError),
}

/// The mean of the adapter's probabilities and the similarity-weighted
/// vote of the top `k` of `neighbours` (adapter space, best first), over
/// the adapter's `classes`.
pub fn combined_probabilities(
    output: &AdapterOutput,
    neighbours: &[Neighbour],
    classes: &[String],
    k: usize,
) -> Vec<f64> {
    let votes = knn_distribution(neighbours, k, Vote::SimilarityWeighted, classes);
    output
        .probabilities
        .iter()
        .zip(&votes)
        .map(|(p, v)| 0.5 * f64::from(*p) + 0.5 * v)
        .collect()
}

/// Melanoma's entry of `combined` (over `classes`); `None` when the
/// adapter has no melanoma class.
pub fn melanoma_score(classes: &[String], combined: &[f64]) -> Option<f64> {
    classes
        .iter()
        .position(|c| c == MELANOMA)
        .and_then(|i| combined.get(i).copied())
}

/// The highest threshold on the melanoma score whose sensitivity on these
/// validation cases reaches `target_sensitivity`, with the sensitivity and
/// specificity it has there (every other diagnosis is a negative). `None`
/// without a melanoma or without a non-melanoma among `labels`.
pub fn melanoma_operating_point(
    scores: &[f64],
    labels: &[&str],
    target_sensitivity: f64,
) -> Option<OperatingPoint> {
    let positive: Vec<bool> = labels.iter().map(|l| *l == MELANOMA).collect();
    let positives = positive.iter().filter(|p| **p).count();
    let negatives = positive.len() - positives;
    if negatives == 0 {
        return None;
    }
    let threshold = threshold_for_sensitivity(scores, &positive, target_sensitivity)?;
    let (sensitivity, specificity) = sensitivity_specificity(scores, &positive, threshold);
    Some(OperatingPoint {
        class: MELANOMA.to_string(),
        target_sensitivity,
        threshold,
        sensitivity,
        specificity,
        validation_positives: positives,
        validation_negatives: negatives,
    })
}

/// "No close match" when either space's best match is below its
/// threshold, chosen on the validation queries' best-match similarities
/// (`adapter_top1` and `raw_top1`, one pair per query; an empty `raw_top1`
/// gives an adapter-space rule alone). Each space's threshold is its
/// quantile `q'`, the largest `q'` of a grid from `quantile` down to half
/// of it at which the two together fire on at most `quantile` of the
/// queries; at half each fires on at most half, so one always exists.
/// `None` without queries, or with pairs that do not pair.
pub fn no_match_rule(adapter_top1: &[f32], raw_top1: &[f32], quantile: f64) -> Option<NoMatchRule> {
    if adapter_top1.is_empty() || !(raw_top1.is_empty() || raw_top1.len() == adapter_top1.len()) {
        return None;
    }
    let widen = |v: &[f32]| -> Vec<f64> { v.iter().map(|&s| f64::from(s)).collect() };
    let (adapter, raw) = (widen(adapter_top1), widen(raw_top1));
    let rule_at = |q: f64| -> Option<NoMatchRule> {
        let mut rule = NoMatchRule {
            quantile,
            min_top1_similarity: lower_quantile(&adapter, q)? as f32,
            min_top1_raw_similarity: None,
            space_quantile: Some(q),
            validation_rate: None,
            validation_queries: adapter_top1.len(),
        };
        if !raw.is_empty() {
            rule.min_top1_raw_similarity = Some(lower_quantile(&raw, q)? as f32);
        }
        let fired = (0..adapter_top1.len())
            .filter(|&i| !rule.is_close_match(Some(adapter_top1[i]), raw_top1.get(i).copied()))
            .count();
        rule.validation_rate = Some(fired as f64 / adapter_top1.len() as f64);
        Some(rule)
    };
    const STEPS: u32 = 64;
    let mut last = None;
    for step in 0..=STEPS {
        let q = quantile * (1.0 - 0.5 * f64::from(step) / f64::from(STEPS));
        let rule = rule_at(q)?;
        if rule.validation_rate.is_some_and(|r| r <= quantile) {
            return Some(rule);
        }
        last = Some(rule);
    }
    last
}

/// Whether the daemon flags a capture for review: `None` when the adapter
/// has no operating point (or no melanoma class).
pub fn melanoma_flag(adapter: &Adapter, combined: &[f64]) -> Option<bool> {
    let point = adapter.manifest().calibration.as_ref()?.melanoma.as_ref()?;
    melanoma_score(adapter.classes(), combined).map(|s| point.flags(s))
}

/// Whether the best matches, adapter space and raw (`None`: an empty
/// library), count as a close match; without a rule every match does.
pub fn close_match(adapter: &Adapter, top1_similarity: Option<f32>, top1_raw: Option<f32>) -> bool {
    match adapter
        .manifest()
        .calibration
        .as_ref()
        .and_then(|c| c.no_match.as_ref())
    {
        Some(rule) => rule.is_close_match(top1_similarity, top1_raw),
        None => top1_similarity.is_some(),
    }
}

/// The top `k` of `references` (labels and vectors) for every query, best
/// first, scored as the library's index scores them.
pub(crate) fn ranked_neighbours(
    labels: &[&str],
    vectors: &[&[f32]],
    queries: &[&[f32]],
    k: usize,
    kind: ScoreKind,
) -> Result<Vec<Vec<Neighbour>>, IndexError> {
    let dim = vectors.first().map_or(1, |v| v.len());
    let residency = match kind {
        ScoreKind::F32 => Residency::F32,
        ScoreKind::Int8 => Residency::Int8,
    };
    let mut index = FlatIndex::with_residency(dim, residency)?;
    let mut ids = Vec::with_capacity(vectors.len());
    for (i, (label, vector)) in labels.iter().zip(vectors).enumerate() {
        // Positions are unique, non-empty and short: always a valid id.
        let Ok(id) = CaseId::new(i.to_string()) else {
            continue;
        };
        index.upsert(
            id.clone(),
            vector,
            &CaseTags {
                diagnosis_code: (*label).to_string(),
                source: CaseSource::Reference,
                anatomical_site: None,
                label_confirmed: true,
            },
        )?;
        ids.push(id);
    }
    let hits = index.search_batch(queries, k, &CaseFilter::any(), kind)?;
    Ok(hits
        .iter()
        .map(|row| {
            row.iter()
                .map(|hit| Neighbour {
                    label: hit
                        .id
                        .as_str()
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| labels.get(i))
                        .map(|l| l.to_string())
                        .unwrap_or_default(),
                    similarity: hit.score,
                })
                .collect()
        })
        .collect())
}

/// Both rules for `adapter` from its training and validation cases:
/// validation cases are scored against the training cases (adapter space
/// for the combined score, both spaces for the no-match rule).
pub fn calibrate(
    adapter: &Adapter,
    train: &[&LabelledEmbedding],
    validation: &[&LabelledEmbedding],
    target_sensitivity: f64,
) -> Result<Calibration, CalibrationError> {
    if train.is_empty() || validation.is_empty() {
        return Ok(Calibration::default());
    }
    let raw_train: Vec<&[f32]> = train.iter().map(|e| e.embedding.as_slice()).collect();
    let raw_val: Vec<&[f32]> = validation.iter().map(|e| e.embedding.as_slice()).collect();
    let train_out = adapter.predict_many(&raw_train)?;
    let val_out = adapter.predict_many(&raw_val)?;
    let labels: Vec<&str> = train.iter().map(|e| e.label.as_str()).collect();
    let adapted_train: Vec<&[f32]> = train_out.iter().map(|o| o.embedding.as_slice()).collect();
    let adapted_val: Vec<&[f32]> = val_out.iter().map(|o| o.embedding.as_slice()).collect();
    let hits = ranked_neighbours(
        &labels,
        &adapted_train,
        &adapted_val,
        COMBINED_K,
        ScoreKind::F32,
    )?;
    let raw_hits = ranked_neighbours(&labels, &raw_train, &raw_val, 1, ScoreKind::F32)?;

    let classes = adapter.classes();
    let scores: Vec<f64> = val_out
        .iter()
        .zip(&hits)
        .map(|(o, n)| {
            melanoma_score(classes, &combined_probabilities(o, n, classes, COMBINED_K))
                .unwrap_or(0.0)
        })
        .collect();
    let truth: Vec<&str> = validation.iter().map(|e| e.label.as_str()).collect();
    let melanoma = if classes.iter().any(|c| c == MELANOMA) {
        melanoma_operating_point(&scores, &truth, target_sensitivity)
    } else {
        None
    };
    // Every validation case has a best match: the training cases are
    // not empty.
    let top1 = |hits: &[Vec<Neighbour>]| -> Vec<f32> {
        hits.iter()
            .map(|n| n.first().map_or(f32::NEG_INFINITY, |h| h.similarity))
            .collect()
    };
    let no_match = no_match_rule(&top1(&hits), &top1(&raw_hits), NO_MATCH_QUANTILE);
    Ok(Calibration { melanoma, no_match })
}

/// [`calibrate`]s the adapter just installed in `dir` from the cases it
/// was trained and validated on, stores the rules in its manifest (a second
/// atomic write: a crash in between leaves the new adapter without them,
/// which runs with no flag and no rule) and returns it reloaded with them.
pub fn calibrate_installed(
    dir: &Path,
    adapter: Adapter,
    train: &[&LabelledEmbedding],
    validation: &[&LabelledEmbedding],
    target_sensitivity: f64,
) -> Result<(Adapter, Calibration), CalibrationError> {
    let calibration = calibrate(&adapter, train, validation, target_sensitivity)?;
    record_calibration(dir, adapter.adapter_id(), calibration.clone())?;
    let manifest = adapter.manifest();
    let reloaded = Adapter::load(dir, &manifest.encoder_model_id, manifest.embedding_dim)?;
    Ok((reloaded, calibration))
}

/// The rules as the training report's text gives them.
pub fn calibration_text(calibration: &Calibration) -> String {
    let mut out = String::new();
    match &calibration.melanoma {
        Some(p) => out.push_str(&format!(
            "melanoma flag: combined score >= {:.4} (target sensitivity {:.2}; on validation \
             sensitivity {:.3}, specificity {:.3}, {} melanomas, {} others)\n",
            p.threshold,
            p.target_sensitivity,
            p.sensitivity,
            p.specificity,
            p.validation_positives,
            p.validation_negatives
        )),
        None => out.push_str("melanoma flag: none (no melanoma among the validation cases)\n"),
    }
    if let Some(r) = &calibration.no_match {
        let raw = r.min_top1_raw_similarity.map_or(String::new(), |m| {
            format!(" or best raw similarity < {m:.4}")
        });
        out.push_str(&format!(
            "no close match: best adapter-space similarity < {:.4}{raw} \
             (each at the {:.2}% quantile; together {:.1}% of {} validation cases, target {:.0}%)\n",
            r.min_top1_similarity,
            r.space_quantile.unwrap_or(r.quantile) * 100.0,
            r.validation_rate.unwrap_or(f64::NAN) * 100.0,
            r.validation_queries,
            r.quantile * 100.0,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(probabilities: &[f32]) -> AdapterOutput {
        AdapterOutput {
            predicted: 0,
            probabilities: probabilities.to_vec(),
            logits: vec![0.0; probabilities.len()],
            embedding: vec![],
        }
    }

    fn n(label: &str, similarity: f32) -> Neighbour {
        Neighbour {
            label: label.into(),
            similarity,
        }
    }

    fn classes() -> Vec<String> {
        ["bcc", "mel", "nv"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_combined_score_is_the_mean_of_adapter_and_weighted_vote() {
        // Adapter: mel 0.2. Neighbours mel 0.9, nv 0.3, mel 0.6 (k=3):
        // vote mel 1.5 / 1.8. Mean: 0.5 * 0.2 + 0.5 * 1.5 / 1.8.
        let out = output(&[0.1, 0.2, 0.7]);
        let hits = [n("mel", 0.9), n("nv", 0.3), n("mel", 0.6), n("nv", 0.99)];
        let combined = combined_probabilities(&out, &hits, &classes(), 3);
        let mel = melanoma_score(&classes(), &combined).unwrap();
        assert!((mel - (0.1 + 0.5 * 1.5 / 1.8)).abs() < 1e-6, "{mel}");
        assert!((combined.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        let no_mel: Vec<String> = vec!["bcc".into(), "nv".into()];
        assert_eq!(melanoma_score(&no_mel, &[0.5, 0.5]), None);
    }

    #[test]
    fn the_operating_point_meets_the_target_on_validation() {
        // 20 melanomas scoring 0.40 .. 0.97, 30 others 0.00 .. 0.58.
        let mut scores = Vec::new();
        let mut labels = Vec::new();
        for i in 0..20 {
            scores.push(0.40 + 0.03 * f64::from(i));
            labels.push("mel");
        }
        for i in 0..30 {
            scores.push(0.02 * f64::from(i));
            labels.push(if i % 2 == 0 { "nv" } else { "bkl" });
        }
        let point = melanoma_operating_point(&scores, &labels, 0.95).unwrap();
        // 19 of 20 needed: the second-lowest melanoma, 0.43.
        assert!((point.threshold - 0.43).abs() < 1e-9, "{point:?}");
        assert!((point.sensitivity - 0.95).abs() < 1e-12);
        // Others at or above 0.43: 0.44 .. 0.58, 8 of 30.
        assert!((point.specificity - 22.0 / 30.0).abs() < 1e-12, "{point:?}");
        assert_eq!(
            (point.validation_positives, point.validation_negatives),
            (20, 30)
        );
        assert!(point.flags(point.threshold) && !point.flags(point.threshold - 1e-4));
        // A higher target can only lower the threshold.
        let all = melanoma_operating_point(&scores, &labels, 1.0).unwrap();
        assert!(all.threshold <= point.threshold && all.sensitivity == 1.0);
        assert!(melanoma_operating_point(&[0.5], &["nv"], 0.95).is_none());
        assert!(melanoma_operating_point(&[0.5], &["mel"], 0.95).is_none());
    }

    #[test]
    fn the_no_match_rule_fires_on_the_chosen_fraction_of_validation() {
        let top1: Vec<f32> = (0..200).map(|i| 0.5 + 0.002 * i as f32).collect();
        let rule = no_match_rule(&top1, &[], 0.02).unwrap();
        let fired = top1
            .iter()
            .filter(|&&s| !rule.is_close_match(Some(s), None))
            .count();
        // floor(0.02 * 199) = 3: the three lowest are below it.
        assert_eq!(fired, 3);
        assert_eq!(rule.validation_queries, 200);
        assert_eq!(rule.min_top1_raw_similarity, None);
        assert!(!rule.is_close_match(None, None));
        assert!(rule.is_close_match(Some(0.99), None) && !rule.is_close_match(Some(0.1), None));
        assert!(no_match_rule(&[], &[], 0.02).is_none());
        assert!(no_match_rule(&top1, &top1[1..], 0.02).is_none());
    }

    #[test]
    fn the_rule_of_both_spaces_fires_on_at_most_the_chosen_fraction() {
        // 400 queries; the adapter space ranks them by i, the raw space in
        // another order (i * 7 mod 400), so the lowest of each are mostly
        // different queries and thresholds at 2% each would fire on ~4%.
        let n = 400;
        let adapter: Vec<f32> = (0..n).map(|i| 0.9 + 0.0002 * i as f32).collect();
        let raw: Vec<f32> = (0..n).map(|i| 0.5 + 0.001 * ((i * 7) % n) as f32).collect();
        let rule = no_match_rule(&adapter, &raw, 0.02).unwrap();
        let fired: Vec<usize> = (0..n)
            .filter(|&i| !rule.is_close_match(Some(adapter[i]), Some(raw[i])))
            .collect();
        assert!(fired.len() <= 8, "{} of {n} fired: {rule:?}", fired.len());
        assert_eq!(rule.validation_rate, Some(fired.len() as f64 / n as f64));
        let q = rule.space_quantile.unwrap();
        assert!((0.01..0.02).contains(&q), "{rule:?}");
        // Each space fires on its own: a query below only the raw threshold
        // is far, and one below only the adapter's.
        let raw_min = rule.min_top1_raw_similarity.unwrap();
        assert!(!rule.is_close_match(Some(0.99), Some(raw_min - 1e-4)));
        assert!(!rule.is_close_match(Some(rule.min_top1_similarity - 1e-4), Some(0.99)));
        assert!(rule.is_close_match(Some(rule.min_top1_similarity), Some(raw_min)));
        assert!(
            !rule.is_close_match(Some(0.99), None),
            "raw space not searched"
        );
        // Where the two spaces rank alike the grid stops at the quantile.
        let same = no_match_rule(&adapter, &adapter, 0.02).unwrap();
        assert_eq!(same.space_quantile, Some(0.02));
    }

    #[test]
    fn ranked_neighbours_carry_labels_best_first() {
        let vectors: Vec<&[f32]> = vec![&[1.0, 0.0], &[0.0, 1.0], &[0.6, 0.8]];
        let hits = ranked_neighbours(
            &["mel", "nv", "bcc"],
            &vectors,
            &[&[0.0, 1.0]],
            2,
            ScoreKind::F32,
        )
        .unwrap();
        let labels: Vec<&str> = hits[0].iter().map(|h| h.label.as_str()).collect();
        assert_eq!(labels, ["nv", "bcc"]);
        assert!((hits[0][0].similarity - 1.0).abs() < 1e-6);
    }
}
