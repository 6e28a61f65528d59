//! Lesion-grouped splits, kNN votes and classification metrics.
//!
//! Pure functions over labels, group ids and neighbour lists: no I/O, no
//! model. Every evaluation in Dermascope (retrieval, adapter, the side-by-side
//! comparison) goes through these so that their figures are comparable.

pub mod metrics;
pub mod split;
pub mod vote;

pub use metrics::{ClassMetrics, ClassificationReport};
pub use split::{grouped_split, Split};
pub use vote::{knn_distribution, knn_vote, precision_at_k, Neighbour, Vote};
