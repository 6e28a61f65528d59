//! Melanoma against the rest: the figures of a two-class query set
//! (another clinic's melanoma and nevus photographs), the AUC of a score,
//! and choosing and checking a threshold on that score.
//!
//! A library has seven diagnoses and such a query set two, so a method may
//! predict a third: that counts as a miss on either side (a nevus called a
//! keratosis is not a correct "not melanoma" for the clinic's purposes, and
//! a melanoma called anything but melanoma is a missed melanoma).

use serde::Serialize;

/// The diagnosis code of melanoma in the store (HAM10000's `mel`).
pub const MELANOMA: &str = "mel";

/// Figures of melanoma (`positive`) against the one other class of the
/// query set (`negative`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TwoClassFigures {
    pub positive: String,
    pub negative: String,
    pub positives: usize,
    pub negatives: usize,
    /// Positives predicted as `positive` (sensitivity).
    pub recall: f64,
    /// Negatives predicted as `negative`.
    pub specificity: f64,
    /// Mean of recall and specificity.
    pub balanced_accuracy: f64,
    /// Area under the ROC curve of the melanoma score, where the method
    /// gives one.
    pub auc: Option<f64>,
}

/// The (positive, negative) classes of a query set with exactly two
/// diagnoses one of which is melanoma; `None` for any other set.
pub fn two_classes(truth: &[&str]) -> Option<(String, String)> {
    let mut classes: Vec<&str> = truth.to_vec();
    classes.sort_unstable();
    classes.dedup();
    match classes.as_slice() {
        [a, b] if *a == MELANOMA => Some((a.to_string(), b.to_string())),
        [a, b] if *b == MELANOMA => Some((b.to_string(), a.to_string())),
        _ => None,
    }
}

impl TwoClassFigures {
    /// `None` unless the truths are exactly two classes, one of them
    /// melanoma. `melanoma_score` (one per query, higher = more likely
    /// melanoma) gives the AUC.
    pub fn new(truth: &[&str], predicted: &[&str], melanoma_score: Option<&[f64]>) -> Option<Self> {
        assert_eq!(truth.len(), predicted.len(), "one prediction per truth");
        let (positive, negative) = two_classes(truth)?;
        let mut hits = [0usize; 2];
        let mut counts = [0usize; 2];
        for (t, p) in truth.iter().zip(predicted) {
            let side = usize::from(*t != positive);
            counts[side] += 1;
            if t == p {
                hits[side] += 1;
            }
        }
        let recall = hits[0] as f64 / counts[0] as f64;
        let specificity = hits[1] as f64 / counts[1] as f64;
        let auc = melanoma_score.and_then(|scores| {
            let is_positive: Vec<bool> = truth.iter().map(|t| *t == positive).collect();
            roc_auc(scores, &is_positive)
        });
        Some(Self {
            positive,
            negative,
            positives: counts[0],
            negatives: counts[1],
            recall,
            specificity,
            balanced_accuracy: 0.5 * (recall + specificity),
            auc,
        })
    }
}

/// Area under the ROC curve: the probability that a random positive scores
/// above a random negative, ties counting one half (Mann-Whitney U over
/// average ranks). `None` without a positive and a negative, or with a
/// score that is NaN.
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), positive.len(), "one label per score");
    if scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let n_pos = positive.iter().filter(|p| **p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the positives' 1-based ranks, tied scores sharing their mean rank.
    let mut rank_sum = 0.0f64;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let mean_rank = (start + 1 + end) as f64 / 2.0;
        let tied_positives = order[start..end].iter().filter(|&&i| positive[i]).count();
        rank_sum += mean_rank * tied_positives as f64;
        start = end;
    }
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// Sensitivity and specificity of "positive when `score >= threshold`";
/// a side with no cases scores 0.
pub fn sensitivity_specificity(scores: &[f64], positive: &[bool], threshold: f64) -> (f64, f64) {
    assert_eq!(scores.len(), positive.len(), "one label per score");
    let mut counts = [0usize; 2];
    let mut hits = [0usize; 2];
    for (&s, &p) in scores.iter().zip(positive) {
        let side = usize::from(!p);
        counts[side] += 1;
        if (s >= threshold) == p {
            hits[side] += 1;
        }
    }
    let ratio = |h: usize, n: usize| if n == 0 { 0.0 } else { h as f64 / n as f64 };
    (ratio(hits[0], counts[0]), ratio(hits[1], counts[1]))
}

/// The highest threshold at which "positive when `score >= threshold`"
/// finds at least `target` of the positives: the `ceil(target * n)`-th
/// highest positive score. Higher thresholds miss more; this one costs the
/// least specificity among those meeting the target. `None` without
/// positives or with a NaN score.
pub fn threshold_for_sensitivity(scores: &[f64], positive: &[bool], target: f64) -> Option<f64> {
    assert_eq!(scores.len(), positive.len(), "one label per score");
    let mut positives: Vec<f64> = scores
        .iter()
        .zip(positive)
        .filter(|(_, p)| **p)
        .map(|(s, _)| *s)
        .collect();
    if positives.is_empty() || positives.iter().any(|s| s.is_nan()) {
        return None;
    }
    positives.sort_by(|a, b| b.total_cmp(a));
    let needed = ((target.clamp(0.0, 1.0) * positives.len() as f64).ceil() as usize).max(1);
    positives.get(needed - 1).copied()
}

/// The lower empirical `q`-quantile: the `floor(q * (n - 1))`-th smallest
/// value, so that about a fraction `q` of `values` lies below it. `None`
/// for no values or a NaN.
pub fn lower_quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = (q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).floor() as usize;
    sorted.get(index).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_a_hand_counted_example() {
        // Positives 0.9, 0.6, 0.35; negatives 0.8, 0.4, 0.3, 0.1. Pairs won
        // by the positive: 0.9 beats all 4, 0.6 beats 3, 0.35 beats 2 = 9
        // of 12.
        let scores = [0.9, 0.8, 0.6, 0.4, 0.35, 0.3, 0.1];
        let positive = [true, false, true, false, true, false, false];
        let auc = roc_auc(&scores, &positive).unwrap();
        assert!((auc - 9.0 / 12.0).abs() < 1e-12, "{auc}");
        // Reversing the score reverses the ranking.
        let reversed: Vec<f64> = scores.iter().map(|s| -s).collect();
        assert!((roc_auc(&reversed, &positive).unwrap() - 3.0 / 12.0).abs() < 1e-12);
    }

    #[test]
    fn tied_scores_count_one_half() {
        // A constant score knows nothing: 0.5, whatever the labels.
        assert_eq!(roc_auc(&[0.5; 4], &[true, false, false, true]), Some(0.5));
        // One tie between a positive and a negative, the rest separated:
        // positives 1.0, 0.5; negatives 0.5, 0.0: pairs 1+1+0.5+1 = 3.5 of 4.
        let auc = roc_auc(&[1.0, 0.5, 0.5, 0.0], &[true, true, false, false]).unwrap();
        assert!((auc - 3.5 / 4.0).abs() < 1e-12, "{auc}");
        // A kNN k=1 score is 0 or 1: AUC = (recall + specificity) / 2.
        let scores = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0];
        let positive = [true, true, true, false, false, false];
        let auc = roc_auc(&scores, &positive).unwrap();
        assert!((auc - 0.5 * (2.0 / 3.0 + 2.0 / 3.0)).abs() < 1e-12, "{auc}");
    }

    #[test]
    fn auc_needs_both_sides_and_no_nan() {
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(roc_auc(&[], &[]), None);
        assert_eq!(roc_auc(&[f64::NAN, 0.2], &[true, false]), None);
    }

    #[test]
    fn two_classes_put_melanoma_first_whatever_the_order() {
        assert_eq!(
            two_classes(&["nv", "mel", "nv"]),
            Some(("mel".into(), "nv".into()))
        );
        assert_eq!(
            two_classes(&["mel", "bcc"]),
            Some(("mel".into(), "bcc".into()))
        );
        // Three classes, one class, or two without melanoma: not this report.
        assert_eq!(two_classes(&["mel", "nv", "bcc"]), None);
        assert_eq!(two_classes(&["mel", "mel"]), None);
        assert_eq!(two_classes(&["nv", "bcc"]), None);
    }

    #[test]
    fn a_third_predicted_class_is_a_miss_on_either_side() {
        // mel: 2 of 4 called mel (one nv, one bkl); nv: 3 of 5 called nv
        // (one mel, one bcc), and an empty prediction (no neighbour) for
        // the fifth of those counts as a miss too.
        let truth = [
            "mel", "mel", "mel", "mel", "nv", "nv", "nv", "nv", "nv", "nv",
        ];
        let predicted = [
            "mel", "mel", "nv", "bkl", "nv", "nv", "nv", "mel", "bcc", "",
        ];
        let scores = [0.9, 0.8, 0.3, 0.4, 0.1, 0.2, 0.3, 0.7, 0.5, 0.0];
        let f = TwoClassFigures::new(&truth, &predicted, Some(&scores)).unwrap();
        assert_eq!((f.positive.as_str(), f.negative.as_str()), ("mel", "nv"));
        assert_eq!((f.positives, f.negatives), (4, 6));
        assert!((f.recall - 0.5).abs() < 1e-12);
        assert!((f.specificity - 0.5).abs() < 1e-12);
        assert!((f.balanced_accuracy - 0.5).abs() < 1e-12);
        // Melanoma scores 0.9, 0.8, 0.3, 0.4 against nevus 0.1, 0.2, 0.3,
        // 0.7, 0.5, 0.0: pairs won 6 + 6 + (3 + 0.5) + 4 = 19.5 of 24.
        let auc = f.auc.unwrap();
        assert!((auc - 19.5 / 24.0).abs() < 1e-12, "{auc}");
        assert_eq!(
            TwoClassFigures::new(&truth, &predicted, None).unwrap().auc,
            None
        );
        let three = ["mel", "nv", "df"];
        assert_eq!(TwoClassFigures::new(&three, &three, None), None);
    }

    #[test]
    fn the_threshold_is_the_highest_that_meets_the_target() {
        // Ten positives scoring 0.1 .. 1.0, negatives 0.05 .. 0.95.
        let mut scores = Vec::new();
        let mut positive = Vec::new();
        for i in 1..=10 {
            scores.push(f64::from(i) / 10.0);
            positive.push(true);
            scores.push(f64::from(i) / 10.0 - 0.05);
            positive.push(false);
        }
        // 0.95 of 10 positives: 10 needed, so the lowest positive, 0.1.
        assert_eq!(
            threshold_for_sensitivity(&scores, &positive, 0.95),
            Some(0.1)
        );
        // 0.8: 8 needed, the 8th highest positive is 0.3.
        let t = threshold_for_sensitivity(&scores, &positive, 0.8).unwrap();
        assert!((t - 0.3).abs() < 1e-12, "{t}");
        let (sens, spec) = sensitivity_specificity(&scores, &positive, t);
        assert!((sens - 0.8).abs() < 1e-12);
        // Negatives below 0.3: 0.05, 0.15, 0.25.
        assert!((spec - 0.3).abs() < 1e-12);
        // Just above it, the target is no longer met.
        let (sens, _) = sensitivity_specificity(&scores, &positive, t + 1e-9);
        assert!(sens < 0.8);
        assert_eq!(threshold_for_sensitivity(&[0.3], &[false], 0.9), None);
    }

    #[test]
    fn the_lower_quantile_leaves_that_fraction_below() {
        let values: Vec<f64> = (0..101).map(f64::from).collect();
        assert_eq!(lower_quantile(&values, 0.02), Some(2.0));
        assert_eq!(lower_quantile(&values, 0.0), Some(0.0));
        assert_eq!(lower_quantile(&values, 1.0), Some(100.0));
        assert_eq!(lower_quantile(&[], 0.5), None);
    }
}
