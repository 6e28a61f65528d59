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

    /// splitmix64: deterministic test data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Diagnoses with their number of lesions: common, middling, and the
    /// rare classes whose rules differ (three, two and one lesion).
    const CLASSES: [(&str, usize); 6] = [
        ("nv", 60),
        ("mel", 25),
        ("bkl", 12),
        ("df", 3),
        ("vasc", 2),
        ("akiec", 1),
    ];

    /// Images of lesions with 1 to 5 photographs each (every count occurs
    /// in every class with five or more lesions), in shuffled file order,
    /// as (label, lesion id).
    fn photographed_lesions(seed: u64) -> Vec<(String, String)> {
        let mut rng = Rng(seed);
        let mut images = Vec::new();
        for (label, lesions) in CLASSES {
            for l in 0..lesions {
                let photographs = 1 + (l + rng.below(5)) % 5;
                for _ in 0..photographs {
                    images.push((label.to_string(), format!("HAM_{label}_{l:03}")));
                }
            }
        }
        for i in (1..images.len()).rev() {
            images.swap(i, rng.below(i + 1));
        }
        images
    }

    fn split_of(images: &[(String, String)], fraction: f64, seed: u64) -> Split {
        let labels: Vec<&str> = images.iter().map(|(l, _)| l.as_str()).collect();
        let groups: Vec<&str> = images.iter().map(|(_, g)| g.as_str()).collect();
        grouped_split(&labels, &groups, fraction, seed)
    }

    #[test]
    fn lesions_of_several_photographs_stay_whole() {
        let images = photographed_lesions(11);
        let mut sizes: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, g) in &images {
            *sizes.entry(g.as_str()).or_default() += 1;
        }
        // The data really has multi-photograph lesions, or this proves nothing.
        assert_eq!(sizes.values().copied().min(), Some(1));
        assert_eq!(sizes.values().copied().max(), Some(5));
        assert!(sizes.values().filter(|&&n| n > 1).count() > 60);

        let fraction = 0.2;
        for seed in 0..20 {
            let split = split_of(&images, fraction, seed);
            assert_eq!(split.is_query.len(), images.len());
            // Each lesion's side, from its first image.
            let mut side: BTreeMap<&str, bool> = BTreeMap::new();
            for ((_, g), &q) in images.iter().zip(&split.is_query) {
                let first = *side.entry(g.as_str()).or_insert(q);
                assert_eq!(first, q, "seed {seed}: lesion {g} has images on both sides");
            }
            for (label, lesions) in CLASSES {
                let held = side
                    .iter()
                    .filter(|(g, &q)| q && g.starts_with(&format!("HAM_{label}_")))
                    .count();
                let asked = lesions as f64 * fraction;
                match lesions {
                    // One lesion: never held out, or the class has no reference.
                    1 => assert_eq!(held, 0, "seed {seed}: {label}"),
                    // Two or three: exactly one query, the rest references.
                    2 | 3 => assert_eq!(held, 1, "seed {seed}: {label}"),
                    // Otherwise the fraction of lesions asked for, to rounding.
                    _ => assert!(
                        (held as f64 - asked).abs() <= 0.5,
                        "seed {seed}: {label} held out {held} of {lesions} lesions, asked {asked}"
                    ),
                }
                let queries = split.queries().filter(|&i| images[i].0 == label).count();
                let total = images.iter().filter(|(l, _)| l == label).count();
                // Images follow lesions of 1 to 5 photographs, so their
                // fraction spreads around the lesions' (0.15-0.25 for nv and
                // mel over these seeds); a class of 20 lesions or more must
                // still give about the fraction asked of its images.
                if lesions >= 20 {
                    let share = queries as f64 / total as f64;
                    assert!(
                        (fraction / 2.0..=fraction * 1.5).contains(&share),
                        "seed {seed}: {label} has {queries} query images of {total}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_split_follows_lesions_not_file_order() {
        let images = photographed_lesions(5);
        let split = split_of(&images, 0.3, 9);
        let held: std::collections::BTreeSet<&str> =
            split.queries().map(|i| images[i].1.as_str()).collect();
        let mut reordered = images.clone();
        reordered.reverse();
        reordered.rotate_left(images.len() / 3);
        let again = split_of(&reordered, 0.3, 9);
        for ((_, g), &q) in reordered.iter().zip(&again.is_query) {
            assert_eq!(q, held.contains(g.as_str()), "{g}");
        }
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
