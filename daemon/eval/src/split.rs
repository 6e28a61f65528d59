//! Splits that never put two images of one lesion on both sides.
//!
//! HAM10000 has up to six images per lesion, some near-duplicates: a random
//! image-level split lets the top match be the same lesion and inflates every
//! figure. We split whole lesions, per diagnosis (so rare classes still get
//! queries), by a keyed hash of the lesion id: deterministic for a seed and
//! independent of file order.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// For each item, whether it is a query (held out) or a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub is_query: Vec<bool>,
}

impl Split {
    pub fn queries(&self) -> impl Iterator<Item = usize> + '_ {
        self.is_query
            .iter()
            .enumerate()
            .filter(|(_, q)| **q)
            .map(|(i, _)| i)
    }

    pub fn references(&self) -> impl Iterator<Item = usize> + '_ {
        self.is_query
            .iter()
            .enumerate()
            .filter(|(_, q)| !**q)
            .map(|(i, _)| i)
    }
}

fn group_rank(seed: u64, group: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update(group.as_bytes());
    hasher.finalize().into()
}

/// Holds out about `query_fraction` of each label's groups (at least one
/// where the label has two or more groups). A group whose images carry
/// different labels goes with its first label.
pub fn grouped_split(labels: &[&str], groups: &[&str], query_fraction: f64, seed: u64) -> Split {
    assert_eq!(labels.len(), groups.len(), "one group per label");
    let mut first_label: BTreeMap<&str, &str> = BTreeMap::new();
    for (label, group) in labels.iter().zip(groups) {
        first_label.entry(group).or_insert(label);
    }
    let mut groups_by_label: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (group, label) in &first_label {
        groups_by_label.entry(label).or_default().push(group);
    }
    let mut held_out: std::collections::BTreeSet<&str> = Default::default();
    for groups in groups_by_label.values_mut() {
        groups.sort_by_key(|g| group_rank(seed, g));
        let mut take = (groups.len() as f64 * query_fraction).round() as usize;
        if take == 0 && groups.len() >= 2 && query_fraction > 0.0 {
            take = 1;
        }
        take = take.min(groups.len().saturating_sub(1));
        held_out.extend(groups.iter().take(take).copied());
    }
    Split {
        is_query: groups.iter().map(|g| held_out.contains(g)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_group_lands_on_both_sides() {
        let labels: Vec<String> = (0..300)
            .map(|i| ["nv", "mel", "df"][i % 3].to_string())
            .collect();
        let groups: Vec<String> = (0..300)
            .map(|i| format!("L{}", i / 3 * 3 + i % 3 + (i / 9)))
            .collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        let split = grouped_split(&labels, &groups, 0.2, 7);
        for q in split.queries() {
            for r in split.references() {
                assert_ne!(groups[q], groups[r]);
            }
        }
        let queries = split.queries().count();
        assert!((40..=80).contains(&queries), "{queries} queries of 300");
    }

    #[test]
    fn same_seed_same_split_other_seed_other_split() {
        let labels = vec!["nv"; 100];
        let groups: Vec<String> = (0..100).map(|i| format!("HAM_{i}")).collect();
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        let a = grouped_split(&labels, &groups, 0.3, 1);
        assert_eq!(a, grouped_split(&labels, &groups, 0.3, 1));
        assert_ne!(a, grouped_split(&labels, &groups, 0.3, 2));
    }

    #[test]
    fn a_rare_class_still_gets_a_query_and_keeps_a_reference() {
        let labels = ["df", "df", "nv", "nv", "nv", "nv", "nv", "nv"];
        let groups = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let split = grouped_split(&labels, &groups, 0.1, 3);
        let df_queries = split.queries().filter(|&i| labels[i] == "df").count();
        assert_eq!(df_queries, 1);
        // A class with one lesion is never held out entirely.
        let single = grouped_split(&["vasc"], &["z"], 0.5, 3);
        assert_eq!(single.queries().count(), 0);
    }
}
