//! What an evaluation compares: a method is a value, and its name (in the
//! printed table and the JSON report) is only how it is shown.

use std::fmt;

use dermascope_eval::Vote;
use serde::{Serialize, Serializer};

/// The embedding space neighbours are searched in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    /// The encoder's own embeddings.
    Raw,
    /// The installed adapter's embeddings.
    Adapter,
}

impl Space {
    pub const ALL: [Space; 2] = [Space::Raw, Space::Adapter];

    pub fn name(self) -> &'static str {
        match self {
            Space::Raw => "raw",
            Space::Adapter => "adapter-space",
        }
    }
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl Serialize for Space {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// One way of turning a query into a diagnosis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// A vote of the `k` nearest references in `space`.
    Knn { space: Space, k: usize, vote: Vote },
    /// The adapter's own prediction (its most probable class).
    Adapter,
    /// The adapter's probabilities averaged with the similarity-weighted
    /// vote of the `k` nearest references in the adapter's space.
    Combined { k: usize },
}

impl Method {
    /// The space a kNN method searches, `None` for the others.
    pub fn knn_space(self) -> Option<Space> {
        match self {
            Method::Knn { space, .. } => Some(space),
            Method::Adapter | Method::Combined { .. } => None,
        }
    }

    /// Whether the method gives a probability with its diagnosis, so that
    /// its calibration can be measured.
    pub fn is_probabilistic(self) -> bool {
        matches!(self, Method::Adapter | Method::Combined { .. })
    }
}

impl Method {
    /// The names are the report's keys: scripts and tests read them, so
    /// they stay exactly as they were when methods were strings.
    pub fn name(self) -> String {
        match self {
            // With one neighbour both votes are the same, so k=1 has no suffix.
            Method::Knn {
                space,
                k: 1,
                vote: Vote::Majority,
            } => format!("{space} kNN k=1"),
            Method::Knn { space, k, vote } => format!("{space} kNN k={k} {}", vote_name(vote)),
            Method::Adapter => "adapter prediction".to_string(),
            Method::Combined { k } => format!("adapter + kNN k={k} weighted"),
        }
    }
}

/// Honours width and alignment, so tables can pad a method like a string.
impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.name())
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

fn vote_name(vote: Vote) -> &'static str {
    match vote {
        Vote::Majority => "majority",
        Vote::SimilarityWeighted => "weighted",
    }
}

/// Every kNN method an evaluation runs in `space`: k=1, then majority and
/// similarity-weighted votes for each larger k.
pub fn knn_methods(space: Space, ks: &[usize]) -> Vec<Method> {
    let mut methods = Vec::new();
    for &k in ks {
        if k == 1 {
            methods.push(Method::Knn {
                space,
                k,
                vote: Vote::Majority,
            });
        } else {
            for vote in [Vote::Majority, Vote::SimilarityWeighted] {
                methods.push(Method::Knn { space, k, vote });
            }
        }
    }
    methods
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_reports_historic_strings() {
        let names: Vec<String> = knn_methods(Space::Raw, &[1, 5])
            .into_iter()
            .chain(knn_methods(Space::Adapter, &[10]))
            .chain([Method::Adapter, Method::Combined { k: 10 }])
            .map(|m| m.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "raw kNN k=1",
                "raw kNN k=5 majority",
                "raw kNN k=5 weighted",
                "adapter-space kNN k=10 majority",
                "adapter-space kNN k=10 weighted",
                "adapter prediction",
                "adapter + kNN k=10 weighted",
            ]
        );
    }

    #[test]
    fn a_weighted_vote_of_one_neighbour_is_named_apart_from_the_majority() {
        let weighted = Method::Knn {
            space: Space::Raw,
            k: 1,
            vote: Vote::SimilarityWeighted,
        };
        assert_eq!(weighted.to_string(), "raw kNN k=1 weighted");
    }

    #[test]
    fn pads_like_a_string_in_tables() {
        assert_eq!(
            format!("[{:<20}]", Method::Adapter),
            "[adapter prediction  ]"
        );
        assert_eq!(format!("[{:>5}]", Space::Raw), "[  raw]");
    }

    #[test]
    fn serialises_as_its_name() {
        let json = serde_json::to_string(&[Method::Adapter, Method::Combined { k: 3 }]).unwrap();
        assert_eq!(
            json,
            r#"["adapter prediction","adapter + kNN k=3 weighted"]"#
        );
        assert_eq!(
            serde_json::to_string(&Space::Adapter).unwrap(),
            r#""adapter-space""#
        );
    }

    #[test]
    fn only_the_adapter_methods_are_calibrated() {
        assert!(Method::Adapter.is_probabilistic());
        assert!(Method::Combined { k: 10 }.is_probabilistic());
        for m in knn_methods(Space::Adapter, &[1, 5]) {
            assert!(!m.is_probabilistic(), "{m}");
            assert_eq!(m.knn_space(), Some(Space::Adapter));
        }
    }
}
