//! Turning ranked neighbours into a diagnosis.

use std::collections::BTreeMap;

/// One retrieved case: its diagnosis and its similarity to the query.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbour {
    pub label: String,
    pub similarity: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vote {
    /// Each of the top k counts once; ties go to the label whose best
    /// neighbour ranks higher.
    Majority,
    /// Each of the top k counts its similarity (clamped at 0).
    SimilarityWeighted,
}

/// The label the top `k` neighbours (ranked best first) vote for.
pub fn knn_vote(neighbours: &[Neighbour], k: usize, vote: Vote) -> Option<String> {
    let mut score: BTreeMap<&str, (f32, usize)> = BTreeMap::new();
    for (rank, neighbour) in neighbours.iter().take(k).enumerate() {
        let weight = match vote {
            Vote::Majority => 1.0,
            Vote::SimilarityWeighted => neighbour.similarity.max(0.0),
        };
        let entry = score.entry(neighbour.label.as_str()).or_insert((0.0, rank));
        entry.0 += weight;
    }
    score
        .into_iter()
        .max_by(|(_, (a, rank_a)), (_, (b, rank_b))| a.total_cmp(b).then(rank_b.cmp(rank_a)))
        .map(|(label, _)| label.to_string())
}

/// The top `k` neighbours' votes as a distribution over `classes` (sums to 1
/// unless no neighbour has a label in `classes` or every weight is 0, when
/// it is all zeros). Used to combine retrieval with a classifier's
/// probabilities.
pub fn knn_distribution(
    neighbours: &[Neighbour],
    k: usize,
    vote: Vote,
    classes: &[String],
) -> Vec<f64> {
    let mut votes = vec![0.0f64; classes.len()];
    for neighbour in neighbours.iter().take(k) {
        if let Some(i) = classes.iter().position(|c| *c == neighbour.label) {
            votes[i] += match vote {
                Vote::Majority => 1.0,
                Vote::SimilarityWeighted => f64::from(neighbour.similarity.max(0.0)),
            };
        }
    }
    let total: f64 = votes.iter().sum();
    if total > 0.0 {
        votes.iter_mut().for_each(|v| *v /= total);
    }
    votes
}

/// Fraction of the top `k` neighbours that share the query's label.
pub fn precision_at_k(neighbours: &[Neighbour], k: usize, label: &str) -> f64 {
    if k == 0 {
        return 0.0;
    }
    let hits = neighbours
        .iter()
        .take(k)
        .filter(|n| n.label == label)
        .count();
    hits as f64 / k as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_weights_by_similarity_and_sums_to_one() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let neighbours = [n("a", 0.9), n("b", 0.3), n("a", 0.3), n("z", 0.8)];
        let d = knn_distribution(&neighbours, 3, Vote::SimilarityWeighted, &classes);
        assert!((d[0] - 0.8).abs() < 1e-6 && (d[1] - 0.2).abs() < 1e-6 && d[2] == 0.0);
        let d = knn_distribution(&neighbours, 4, Vote::Majority, &classes);
        assert!((d[0] - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(knn_distribution(&[], 5, Vote::Majority, &classes), [0.0; 3]);
    }

    fn n(label: &str, similarity: f32) -> Neighbour {
        Neighbour {
            label: label.into(),
            similarity,
        }
    }

    #[test]
    fn majority_and_weighted_can_disagree() {
        let ranked = [n("mel", 0.95), n("nv", 0.40), n("nv", 0.35)];
        assert_eq!(knn_vote(&ranked, 3, Vote::Majority).as_deref(), Some("nv"));
        assert_eq!(
            knn_vote(&ranked, 3, Vote::SimilarityWeighted).as_deref(),
            Some("mel")
        );
        assert_eq!(knn_vote(&ranked, 1, Vote::Majority).as_deref(), Some("mel"));
    }

    #[test]
    fn ties_go_to_the_better_ranked_label() {
        let ranked = [n("bkl", 0.9), n("bcc", 0.8), n("bcc", 0.7), n("bkl", 0.6)];
        assert_eq!(knn_vote(&ranked, 4, Vote::Majority).as_deref(), Some("bkl"));
    }

    #[test]
    fn precision_counts_matching_labels() {
        let ranked = [
            n("nv", 0.9),
            n("mel", 0.8),
            n("nv", 0.7),
            n("nv", 0.6),
            n("df", 0.5),
        ];
        assert!((precision_at_k(&ranked, 5, "nv") - 0.6).abs() < 1e-12);
        assert_eq!(precision_at_k(&ranked, 1, "mel"), 0.0);
        assert_eq!(knn_vote(&[], 5, Vote::Majority), None);
    }
}
