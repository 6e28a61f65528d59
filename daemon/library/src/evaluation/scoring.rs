//! From neighbours and adapter outputs to figures: votes, the adapter + kNN
//! combination, precision@k, and breakdowns by patient group. Pure but for
//! `neighbours`, which builds a scoring index in memory.

use std::collections::{BTreeMap, HashMap};

use dermascope_adapter::AdapterOutput;
use dermascope_eval::{knn_vote, precision_at_k, ClassificationReport, Neighbour, Vote};
use dermascope_store::{
    CaseFilter, CaseSource, CaseTags, FlatIndex, IndexError, Residency, ScoreKind, Sex,
};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::method::{Method, Space};
use crate::labels::LabelledImage;
use crate::operating_point::combined_probabilities;

/// A method's predictions for every query, scored.
#[derive(Clone, Debug)]
pub(crate) struct Scored {
    pub method: Method,
    pub predicted: Vec<String>,
    pub report: ClassificationReport,
}

impl Scored {
    /// `confidence` (one per prediction) is given only by methods that
    /// produce a probability; the report's calibration error comes from it.
    pub fn new(
        method: Method,
        predicted: Vec<String>,
        confidence: Option<&[f64]>,
        classes: &[String],
        truth: &[&str],
    ) -> Self {
        let as_str: Vec<&str> = predicted.iter().map(String::as_str).collect();
        let report = ClassificationReport::new(classes, truth, &as_str, confidence);
        Self {
            method,
            predicted,
            report,
        }
    }
}

/// Top `k` neighbours of every query among the references, in one space.
/// `references` pairs each reference's case id and diagnosis with its
/// vector in that space.
pub(crate) fn neighbours(
    references: &[(&LabelledImage, &[f32])],
    queries: &[&[f32]],
    k: usize,
    kind: ScoreKind,
) -> Result<Vec<Vec<Neighbour>>, IndexError> {
    let dim = references.first().map_or(0, |(_, v)| v.len());
    let residency = match kind {
        ScoreKind::F32 => Residency::F32,
        ScoreKind::Int8 => Residency::Int8,
    };
    let mut index = FlatIndex::with_residency(dim, residency)?;
    let mut label_of: HashMap<&str, &str> = HashMap::new();
    for (row, vector) in references {
        index.upsert(
            row.case_id.clone(),
            vector,
            &CaseTags {
                diagnosis_code: row.diagnosis.code.clone(),
                source: CaseSource::Reference,
                anatomical_site: row.anatomical_site.clone(),
                label_confirmed: true,
            },
        )?;
        label_of.insert(row.case_id.as_str(), row.diagnosis.code.as_str());
    }
    let hits = index.search_batch(queries, k, &CaseFilter::any(), kind)?;
    Ok(hits
        .iter()
        .map(|row| {
            row.iter()
                .map(|hit| Neighbour {
                    label: label_of
                        .get(hit.id.as_str())
                        .map(|l| l.to_string())
                        .unwrap_or_default(),
                    similarity: hit.score,
                })
                .collect()
        })
        .collect())
}

/// The label each query's top `k` neighbours vote for ("" where a query
/// has no neighbour, which scores as wrong).
pub(crate) fn knn_predictions(hits: &[Vec<Neighbour>], k: usize, vote: Vote) -> Vec<String> {
    hits.iter()
        .map(|n| knn_vote(n, k, vote).unwrap_or_default())
        .collect()
}

/// Mean of the adapter's probabilities and the similarity-weighted kNN
/// distribution in the adapter's space: the classifier's calibrated view
/// and the library's local evidence, equally weighted. Returns each
/// query's class and the mixed probability of it.
pub(crate) fn combine(
    outputs: &[AdapterOutput],
    hits: &[Vec<Neighbour>],
    classes: &[String],
    k: usize,
) -> (Vec<String>, Vec<f64>) {
    let mut predicted = Vec::with_capacity(outputs.len());
    let mut confidence = Vec::with_capacity(outputs.len());
    for (out, neighbours) in outputs.iter().zip(hits) {
        let mixed = combined_probabilities(out, neighbours, classes, k);
        let (best, p) = mixed
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, p)| (i, *p))
            .unwrap_or((0, 0.0));
        predicted.push(classes[best].clone());
        confidence.push(p);
    }
    (predicted, confidence)
}

/// Retrieval quality in one space: mean precision@k over the queries.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Retrieval {
    pub space: Space,
    /// precision@k for each k.
    pub precision_at: BTreeMap<usize, f64>,
}

pub(crate) fn retrieval_figures(
    space: Space,
    hits: &[Vec<Neighbour>],
    truth: &[&str],
    ks: &[usize],
) -> Retrieval {
    let precision_at = ks
        .iter()
        .map(|&k| {
            let total: f64 = hits
                .iter()
                .zip(truth)
                .map(|(n, t)| precision_at_k(n, k, t))
                .sum();
            (k, total / truth.len().max(1) as f64)
        })
        .collect();
    Retrieval {
        space,
        precision_at,
    }
}

/// A patient attribute the breakdowns group queries by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribute {
    Sex,
    Age,
    Site,
}

impl Attribute {
    pub const ALL: [Attribute; 3] = [Attribute::Sex, Attribute::Age, Attribute::Site];

    pub fn name(self) -> &'static str {
        match self {
            Attribute::Sex => "sex",
            Attribute::Age => "age",
            Attribute::Site => "site",
        }
    }

    /// The group `row` falls in, `None` where the attribute is unknown.
    pub fn group_of(self, row: &LabelledImage) -> Option<String> {
        match self {
            Attribute::Sex => row.sex.map(|s| {
                match s {
                    Sex::Female => "female",
                    Sex::Male => "male",
                    Sex::Other => "other",
                }
                .to_string()
            }),
            Attribute::Age => age_band(row.age_years).map(str::to_string),
            Attribute::Site => row.anatomical_site.clone(),
        }
    }
}

impl Serialize for Attribute {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

pub fn age_band(age: Option<u16>) -> Option<&'static str> {
    Some(match age? {
        0..=29 => "<30",
        30..=49 => "30-49",
        50..=69 => "50-69",
        _ => "70+",
    })
}

/// Accuracy and balanced accuracy of a method within one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupFigures {
    pub accuracy: f64,
    pub balanced_accuracy: f64,
}

/// The queries of one group and how the compared methods did on them.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GroupResult {
    pub attribute: Attribute,
    pub group: String,
    pub n: usize,
    /// In the report: method name -> [accuracy, balanced accuracy].
    #[serde(serialize_with = "figures_by_name")]
    pub methods: Vec<(Method, GroupFigures)>,
}

fn figures_by_name<S: Serializer>(
    methods: &[(Method, GroupFigures)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(Some(methods.len()))?;
    for (method, f) in methods {
        map.serialize_entry(method, &(f.accuracy, f.balanced_accuracy))?;
    }
    map.end()
}

/// The methods a breakdown compares: the best raw kNN and the best
/// adapter-space kNN (by balanced accuracy over all queries), the adapter
/// and the combination.
fn compared(scored: &[Scored]) -> Vec<&Scored> {
    let best_in = |space: Space| {
        scored
            .iter()
            .filter(|s| s.method.knn_space() == Some(space))
            .max_by(|a, b| {
                a.report
                    .balanced_accuracy
                    .total_cmp(&b.report.balanced_accuracy)
            })
    };
    Space::ALL
        .into_iter()
        .filter_map(best_in)
        .chain(
            scored
                .iter()
                .filter(|s| matches!(s.method, Method::Adapter)),
        )
        .chain(
            scored
                .iter()
                .filter(|s| matches!(s.method, Method::Combined { .. })),
        )
        .collect()
}

/// Accuracy and balanced accuracy per sex, age band and site (groups in
/// order of name; queries whose attribute is unknown are in none).
pub(crate) fn breakdowns(
    queries: &[&LabelledImage],
    truth: &[&str],
    scored: &[Scored],
    classes: &[String],
) -> Vec<GroupResult> {
    let chosen = compared(scored);
    let mut out = Vec::new();
    for attribute in Attribute::ALL {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, q) in queries.iter().enumerate() {
            if let Some(group) = attribute.group_of(q) {
                groups.entry(group).or_default().push(i);
            }
        }
        for (group, members) in groups {
            let group_truth: Vec<&str> = members.iter().map(|&i| truth[i]).collect();
            let methods = chosen
                .iter()
                .map(|s| {
                    let predicted: Vec<&str> =
                        members.iter().map(|&i| s.predicted[i].as_str()).collect();
                    let r = ClassificationReport::new(classes, &group_truth, &predicted, None);
                    (
                        s.method,
                        GroupFigures {
                            accuracy: r.accuracy,
                            balanced_accuracy: r.balanced_accuracy,
                        },
                    )
                })
                .collect();
            out.push(GroupResult {
                attribute,
                group,
                n: members.len(),
                methods,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dermascope_store::{CaseId, Diagnosis};

    fn n(label: &str, similarity: f32) -> Neighbour {
        Neighbour {
            label: label.to_string(),
            similarity,
        }
    }

    fn classes() -> Vec<String> {
        ["mel", "nv"].iter().map(|s| s.to_string()).collect()
    }

    fn row(
        id: &str,
        code: &str,
        sex: Option<Sex>,
        age: Option<u16>,
        site: Option<&str>,
    ) -> LabelledImage {
        LabelledImage {
            line: 2,
            image: format!("{id}.jpg"),
            case_id: CaseId::new(id).unwrap(),
            diagnosis: Diagnosis::from_code(code).unwrap(),
            lesion_id: None,
            dx_type: None,
            age_years: age,
            sex,
            anatomical_site: site.map(str::to_string),
        }
    }

    fn output(probabilities: [f32; 2]) -> AdapterOutput {
        AdapterOutput {
            predicted: usize::from(probabilities[1] > probabilities[0]),
            probabilities: probabilities.to_vec(),
            logits: vec![0.0; 2],
            embedding: vec![],
        }
    }

    #[test]
    fn age_bands_cover_every_age_at_their_edges() {
        let bands: Vec<_> = [0, 29, 30, 49, 50, 69, 70, 110]
            .into_iter()
            .map(|a| age_band(Some(a)).unwrap())
            .collect();
        assert_eq!(
            bands,
            ["<30", "<30", "30-49", "30-49", "50-69", "50-69", "70+", "70+"]
        );
        assert_eq!(age_band(None), None);
    }

    #[test]
    fn precision_at_k_is_averaged_over_queries() {
        // Query 1 (mel): neighbours mel, nv, mel; query 2 (nv): mel, mel, mel.
        let hits = vec![
            vec![n("mel", 0.9), n("nv", 0.8), n("mel", 0.7)],
            vec![n("mel", 0.9), n("mel", 0.8), n("mel", 0.7)],
        ];
        let r = retrieval_figures(Space::Raw, &hits, &["mel", "nv"], &[1, 2, 3]);
        assert_eq!(r.space, Space::Raw);
        assert_eq!(r.precision_at[&1], 0.5);
        assert_eq!(r.precision_at[&2], 0.25);
        assert!((r.precision_at[&3] - 1.0 / 3.0).abs() < 1e-12);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["space"], "raw");
        assert_eq!(json["precision_at"]["2"], 0.25);
    }

    #[test]
    fn combine_averages_the_adapter_and_the_weighted_vote() {
        // Query 1: the adapter leans nv (0.6), the neighbours are all mel:
        // mel gets 0.5*0.4 + 0.5*1 = 0.7. Query 2: adapter sure of mel
        // (0.9), neighbours split evenly: mel 0.5*0.9 + 0.5*0.5 = 0.7.
        let outputs = [output([0.4, 0.6]), output([0.9, 0.1])];
        let hits = vec![
            vec![n("mel", 0.8), n("mel", 0.6)],
            vec![n("mel", 0.5), n("nv", 0.5)],
        ];
        let (predicted, confidence) = combine(&outputs, &hits, &classes(), 2);
        assert_eq!(predicted, ["mel", "mel"]);
        assert!((confidence[0] - 0.7).abs() < 1e-6, "{confidence:?}");
        assert!((confidence[1] - 0.7).abs() < 1e-6, "{confidence:?}");
        // Only the top k vote: with k=1 the second query's nv neighbour is
        // out, and mel's mix is 0.5*0.9 + 0.5 = 0.95.
        let (_, confidence) = combine(&outputs, &hits, &classes(), 1);
        assert!((confidence[1] - 0.95).abs() < 1e-6, "{confidence:?}");
    }

    #[test]
    fn neighbours_are_ranked_by_similarity_and_carry_the_reference_label() {
        let a = row("A", "mel", None, None, None);
        let b = row("B", "nv", None, None, None);
        let refs: Vec<(&LabelledImage, &[f32])> = vec![(&a, &[1.0, 0.0]), (&b, &[0.0, 1.0])];
        let queries: Vec<&[f32]> = vec![&[0.6, 0.8]];
        let hits = neighbours(&refs, &queries, 2, ScoreKind::F32).unwrap();
        assert_eq!(hits.len(), 1);
        let labels: Vec<&str> = hits[0].iter().map(|h| h.label.as_str()).collect();
        assert_eq!(labels, ["nv", "mel"]);
        assert!((hits[0][0].similarity - 0.8).abs() < 1e-6);
    }

    /// Four queries (two women, one man, one of unknown sex), two kNN
    /// methods per space with known scores, the adapter and the combination.
    #[test]
    fn breakdowns_compare_the_best_knn_of_each_space_with_the_adapter_methods() {
        let queries = [
            row("Q1", "mel", Some(Sex::Female), Some(25), Some("back")),
            row("Q2", "nv", Some(Sex::Female), Some(72), Some("back")),
            row("Q3", "mel", Some(Sex::Male), Some(40), None),
            row("Q4", "nv", None, None, Some("face")),
        ];
        let queries: Vec<&LabelledImage> = queries.iter().collect();
        let truth = ["mel", "nv", "mel", "nv"];
        let classes = classes();
        let knn = |space, k| Method::Knn {
            space,
            k,
            vote: Vote::Majority,
        };
        let scored: Vec<Scored> = [
            (knn(Space::Raw, 1), ["mel", "mel", "mel", "mel"]), // bal.acc 0.5
            (knn(Space::Raw, 5), ["mel", "nv", "nv", "nv"]),    // 0.75: the best raw
            (knn(Space::Adapter, 1), ["mel", "nv", "mel", "nv"]), // 1.0: the best adapter-space
            (knn(Space::Adapter, 5), ["nv", "nv", "nv", "nv"]),
            (Method::Adapter, ["nv", "nv", "mel", "nv"]),
            (Method::Combined { k: 10 }, ["mel", "nv", "mel", "mel"]),
        ]
        .into_iter()
        .map(|(m, p)| {
            Scored::new(
                m,
                p.iter().map(|s| s.to_string()).collect(),
                None,
                &classes,
                &truth,
            )
        })
        .collect();

        let groups = breakdowns(&queries, &truth, &scored, &classes);
        let names: Vec<(&str, &str, usize)> = groups
            .iter()
            .map(|g| (g.attribute.name(), g.group.as_str(), g.n))
            .collect();
        assert_eq!(
            names,
            [
                ("sex", "female", 2),
                ("sex", "male", 1),
                ("age", "30-49", 1),
                ("age", "70+", 1),
                ("age", "<30", 1),
                ("site", "back", 2),
                ("site", "face", 1),
            ]
        );
        let methods: Vec<Method> = groups[0].methods.iter().map(|(m, _)| *m).collect();
        assert_eq!(
            methods,
            [
                knn(Space::Raw, 5),
                knn(Space::Adapter, 1),
                Method::Adapter,
                Method::Combined { k: 10 }
            ]
        );
        // Women (Q1 mel, Q2 nv): raw k=5 gets both, the adapter only Q2.
        let female = &groups[0].methods;
        assert_eq!(female[0].1.accuracy, 1.0);
        assert_eq!(female[2].1.accuracy, 0.5);
        assert_eq!(female[2].1.balanced_accuracy, 0.5);
        // The man (Q3 mel): raw k=5 says nv.
        assert_eq!(groups[1].methods[0].1.accuracy, 0.0);

        let json = serde_json::to_value(&groups[0]).unwrap();
        assert_eq!(json["attribute"], "sex");
        assert_eq!(
            json["methods"]["raw kNN k=5 majority"],
            serde_json::json!([1.0, 1.0])
        );
        assert_eq!(
            json["methods"]["adapter prediction"],
            serde_json::json!([0.5, 0.5])
        );
    }
}
