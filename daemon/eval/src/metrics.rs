//! Classification metrics as a clinician reads them: per diagnosis first.
//!
//! Balanced accuracy and macro-F1 lead because the classes are badly
//! imbalanced (nv and mel dominate, df and vasc are rare): plain accuracy
//! rewards ignoring the rare, often dangerous, classes.

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassMetrics {
    pub label: String,
    pub support: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassificationReport {
    pub n: usize,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[truth][predicted]`, rows and columns in `per_class` order.
    pub confusion: Vec<Vec<usize>>,
    /// Expected calibration error (15 equal-width confidence bins), where
    /// the predictions came with a confidence.
    pub expected_calibration_error: Option<f64>,
}

impl ClassificationReport {
    /// `classes` fixes the order of rows; truths or predictions outside it
    /// are counted as wrong and otherwise ignored.
    pub fn new(
        classes: &[String],
        truth: &[&str],
        predicted: &[&str],
        confidence: Option<&[f64]>,
    ) -> Self {
        assert_eq!(truth.len(), predicted.len(), "one prediction per truth");
        let index = |label: &str| classes.iter().position(|c| c == label);
        let k = classes.len();
        let mut confusion = vec![vec![0usize; k]; k];
        let mut correct = 0usize;
        for (t, p) in truth.iter().zip(predicted) {
            if t == p {
                correct += 1;
            }
            if let (Some(ti), Some(pi)) = (index(t), index(p)) {
                confusion[ti][pi] += 1;
            }
        }
        let mut per_class = Vec::with_capacity(k);
        for (i, label) in classes.iter().enumerate() {
            let support: usize = truth.iter().filter(|t| **t == label.as_str()).count();
            let predicted_as: usize = predicted.iter().filter(|p| **p == label.as_str()).count();
            let true_positive = confusion[i][i];
            let precision = ratio(true_positive, predicted_as);
            let recall = ratio(true_positive, support);
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            per_class.push(ClassMetrics {
                label: label.clone(),
                support,
                precision,
                recall,
                f1,
            });
        }
        let present: Vec<&ClassMetrics> = per_class.iter().filter(|c| c.support > 0).collect();
        let mean = |f: fn(&ClassMetrics) -> f64| {
            if present.is_empty() {
                0.0
            } else {
                present.iter().map(|c| f(c)).sum::<f64>() / present.len() as f64
            }
        };
        let expected_calibration_error = confidence.map(|conf| {
            let hits: Vec<bool> = truth.iter().zip(predicted).map(|(t, p)| t == p).collect();
            expected_calibration_error(conf, &hits, 15)
        });
        ClassificationReport {
            n: truth.len(),
            accuracy: ratio(correct, truth.len()),
            balanced_accuracy: mean(|c| c.recall),
            macro_f1: mean(|c| c.f1),
            per_class,
            confusion,
            expected_calibration_error,
        }
    }

    /// A fixed-width text table: per-class figures, then the confusion matrix.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "n = {}  accuracy {:.3}  balanced accuracy {:.3}  macro-F1 {:.3}",
            self.n, self.accuracy, self.balanced_accuracy, self.macro_f1
        ));
        if let Some(ece) = self.expected_calibration_error {
            out.push_str(&format!("  ECE {ece:.3}"));
        }
        out.push('\n');
        out.push_str(&format!(
            "{:<8}{:>8}{:>11}{:>8}{:>8}\n",
            "class", "support", "precision", "recall", "F1"
        ));
        for c in &self.per_class {
            out.push_str(&format!(
                "{:<8}{:>8}{:>11.3}{:>8.3}{:>8.3}\n",
                c.label, c.support, c.precision, c.recall, c.f1
            ));
        }
        out.push_str("confusion (rows: truth, columns: predicted)\n");
        out.push_str(&format!("{:<8}", ""));
        for c in &self.per_class {
            out.push_str(&format!("{:>7}", c.label));
        }
        out.push('\n');
        for (c, row) in self.per_class.iter().zip(&self.confusion) {
            out.push_str(&format!("{:<8}", c.label));
            for count in row {
                out.push_str(&format!("{count:>7}"));
            }
            out.push('\n');
        }
        out
    }
}

fn ratio(numerator: usize, denominator: usize) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

/// Weighted gap between confidence and accuracy over equal-width bins.
pub fn expected_calibration_error(confidence: &[f64], correct: &[bool], bins: usize) -> f64 {
    assert_eq!(confidence.len(), correct.len());
    if confidence.is_empty() || bins == 0 {
        return 0.0;
    }
    let mut sum_conf = vec![0.0; bins];
    let mut sum_hit = vec![0.0; bins];
    let mut count = vec![0usize; bins];
    for (&c, &hit) in confidence.iter().zip(correct) {
        let bin = ((c.clamp(0.0, 1.0) * bins as f64) as usize).min(bins - 1);
        sum_conf[bin] += c;
        sum_hit[bin] += if hit { 1.0 } else { 0.0 };
        count[bin] += 1;
    }
    let n = confidence.len() as f64;
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| (sum_conf[b] - sum_hit[b]).abs() / n)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        ["mel", "nv", "df"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn figures_match_a_hand_computed_case() {
        // mel: 2 of 3 found; nv: 3 of 3 (one mel predicted as nv); df: 0 of 1.
        let truth = ["mel", "mel", "mel", "nv", "nv", "nv", "df"];
        let predicted = ["mel", "mel", "nv", "nv", "nv", "nv", "nv"];
        let report = ClassificationReport::new(&classes(), &truth, &predicted, None);
        assert!((report.accuracy - 5.0 / 7.0).abs() < 1e-12);
        assert!((report.balanced_accuracy - (2.0 / 3.0 + 1.0 + 0.0) / 3.0).abs() < 1e-12);
        let nv = &report.per_class[1];
        assert!((nv.precision - 3.0 / 5.0).abs() < 1e-12);
        assert_eq!(report.confusion[0], vec![2, 1, 0]);
        assert_eq!(report.confusion[2], vec![0, 1, 0]);
        let nv_f1 = 2.0 * 0.6 * 1.0 / 1.6;
        let mel_f1 = 2.0 * 1.0 * (2.0 / 3.0) / (1.0 + 2.0 / 3.0);
        assert!((report.macro_f1 - (mel_f1 + nv_f1 + 0.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn calibration_error_is_zero_when_confidence_matches_accuracy() {
        let conf = [0.75, 0.75, 0.75, 0.75];
        let hits = [true, true, true, false];
        assert!(expected_calibration_error(&conf, &hits, 15).abs() < 1e-12);
        let overconfident = expected_calibration_error(&[1.0, 1.0], &[false, true], 15);
        assert!((overconfident - 0.5).abs() < 1e-12);
    }
}
