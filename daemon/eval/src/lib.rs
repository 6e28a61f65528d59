//! Lesion-grouped splits, kNN votes and classification metrics.
//!
//! Pure functions over labels, group ids and neighbour lists: no I/O, no
//! model. Every evaluation in Dermascope (retrieval, adapter, the side-by-side
//! comparison) goes through these so that their figures are comparable.

pub mod binary;
pub mod metrics;
pub mod split;
pub mod vote;

pub use binary::{
    lower_quantile, roc_auc, sensitivity_specificity, threshold_for_sensitivity, two_classes,
    TwoClassFigures, MELANOMA,
};
pub use metrics::{ClassMetrics, ClassificationReport};
pub use split::{grouped_split, Split};
pub use vote::{knn_distribution, knn_vote, precision_at_k, Neighbour, Vote};
