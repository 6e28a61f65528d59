//! The retrieval-only answer: a similarity-weighted vote over the retrieved
//! cases' confirmed diagnoses.

use dermascope_cloud_api::{RankedDiagnosis, RetrievedCase};

/// Ranks the retrieved cases' diagnoses by their share of the weights
/// `max(similarity, 0)`, normalised to sum to 1.
///
/// A case less similar than orthogonal says nothing for its diagnosis, so
/// its weight is 0; when no case has a positive similarity the vote falls
/// back to counting (each case weighs the same), so a differential is still
/// given whenever any case was retrieved. Ties go to the diagnosis whose
/// best case is the more similar, then to the code, so the order is stable.
pub fn weighted_vote(cases: &[RetrievedCase]) -> Vec<RankedDiagnosis> {
    if cases.is_empty() {
        return Vec::new();
    }
    let weight = |c: &RetrievedCase| {
        let s = c.similarity;
        if s.is_finite() {
            f64::from(s.max(0.0))
        } else {
            0.0
        }
    };
    let total: f64 = cases.iter().map(weight).sum();
    let uniform = total <= 0.0;

    struct Tally<'a> {
        code: &'a str,
        name: &'a str,
        weight: f64,
        count: usize,
        best: f32,
    }
    let mut tallies: Vec<Tally<'_>> = Vec::new();
    for case in cases {
        let w = if uniform { 1.0 } else { weight(case) };
        match tallies.iter_mut().find(|t| t.code == case.diagnosis.code) {
            Some(t) => {
                t.weight += w;
                t.count += 1;
                t.best = t.best.max(case.similarity);
            }
            None => tallies.push(Tally {
                code: &case.diagnosis.code,
                name: &case.diagnosis.name,
                weight: w,
                count: 1,
                best: case.similarity,
            }),
        }
    }
    let sum = if uniform { cases.len() as f64 } else { total };
    tallies.sort_by(|a, b| {
        b.weight
            .total_cmp(&a.weight)
            .then(b.best.total_cmp(&a.best))
            .then(a.code.cmp(b.code))
    });
    let n = cases.len();
    tallies
        .into_iter()
        .map(|t| {
            let share = (t.weight / sum) as f32;
            RankedDiagnosis {
                code: t.code.to_owned(),
                name: t.name.to_owned(),
                reason: format!(
                    "{} of {n} most similar confirmed cases; similarity-weighted vote {share:.2}",
                    t.count
                ),
                score: Some(share),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dermascope_cloud_api::{WireDiagnosis, WireSource};

    fn case(code: &str, similarity: f32) -> RetrievedCase {
        RetrievedCase {
            id: format!("{code}-{similarity}"),
            diagnosis: WireDiagnosis {
                code: code.into(),
                name: code.to_uppercase(),
            },
            similarity,
            source: WireSource::Reference,
        }
    }

    #[test]
    fn shares_are_the_normalised_positive_similarities() {
        let ranked = weighted_vote(&[
            case("mel", 0.9),
            case("nv", 0.5),
            case("nv", 0.3),
            case("bkl", -0.4),
        ]);
        let got: Vec<_> = ranked
            .iter()
            .map(|r| (r.code.as_str(), r.score.unwrap()))
            .collect();
        assert_eq!(got.len(), 3, "{got:?}");
        // One very similar melanoma outweighs two less similar nevi: a
        // weighted vote, not a majority.
        assert_eq!(got[0].0, "mel");
        assert!((got[0].1 - 0.9 / 1.7).abs() < 1e-6, "{got:?}");
        assert_eq!(got[1].0, "nv");
        assert!((got[1].1 - 0.8 / 1.7).abs() < 1e-6, "{got:?}");
        assert_eq!(got[2], ("bkl", 0.0));
        assert!(
            ranked[1].reason.starts_with("2 of 4"),
            "{}",
            ranked[1].reason
        );
    }

    #[test]
    fn without_a_positive_similarity_every_case_counts_the_same() {
        let ranked = weighted_vote(&[case("mel", -0.1), case("nv", -0.2), case("nv", 0.0)]);
        assert_eq!(ranked[0].code, "nv");
        assert!((ranked[0].score.unwrap() - 2.0 / 3.0).abs() < 1e-6);
        assert!((ranked[1].score.unwrap() - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn equal_weights_rank_the_more_similar_best_case_first() {
        let ranked = weighted_vote(&[case("nv", 0.5), case("mel", 0.25), case("mel", 0.25)]);
        assert_eq!(ranked[0].code, "nv");
        assert_eq!(ranked[1].code, "mel");
    }

    #[test]
    fn no_cases_no_differential() {
        assert!(weighted_vote(&[]).is_empty());
    }
}
