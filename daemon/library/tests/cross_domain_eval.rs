//! `evaluate` on a small slice of both atlases with the real encoder: the
//! two-class figures appear (and only for a two-class query set), the
//! adapter's manifest carries the operating point and the no-match rule,
//! and the report applies them to the queries and to drawn images.
//!
//! The slice is tiny (8 library photographs per diagnosis, 6 melanomas and
//! 6 nevi from the second atlas), so its figures say nothing about quality;
//! the test checks what is reported, not how good it is.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use dermascope_adapter::{Adapter, TrainingConfig};
use dermascope_encoder::{Encoder, EncoderOptions};
use dermascope_library::evaluation::LabelledFolder;
use dermascope_library::{evaluate, EvaluationOptions, TrainingOptions};
use dermascope_store::{CaseStore, StoreIdentity};

const TEST: &str = "cross_domain_eval";

/// The header and the first `per_label` rows of each label of `labels.csv`
/// in `folder`, written to `into`.
fn slice(folder: &Path, per_label: usize, into: &Path) -> LabelledFolder {
    let text = std::fs::read_to_string(folder.join("labels.csv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let label_col = header.split(',').position(|c| c == "label").unwrap();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut out = vec![header.to_string()];
    for line in lines {
        let label = line.split(',').nth(label_col).unwrap_or("").to_string();
        let n = counts.entry(label).or_default();
        if *n < per_label {
            *n += 1;
            out.push(line.to_string());
        }
    }
    std::fs::write(into, out.join("\n") + "\n").unwrap();
    LabelledFolder {
        images: folder.join("images"),
        labels: into.to_path_buf(),
    }
}

fn in_unit(x: f64) -> bool {
    (0.0..=1.0).contains(&x)
}

#[test]
fn two_class_queries_get_melanoma_figures_and_the_adapter_its_rules() {
    let (Some(derm), Some(isic)) = (
        dermascope_testkit::derm_data(TEST),
        dermascope_testkit::isic_data(TEST),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let library = slice(&derm, 8, &dir.path().join("derm.csv"));
    let queries = slice(&isic, 6, &dir.path().join("isic.csv"));
    let encoder = Encoder::load(
        &dermascope_testkit::bundle_dir(),
        &EncoderOptions {
            threads: 1,
            ..EncoderOptions::default()
        },
    )
    .unwrap();
    let cache = CaseStore::open(
        dir.path().join("cache"),
        StoreIdentity {
            model_id: encoder.model_id().to_string(),
            embedding_dim: encoder.dim(),
        },
    )
    .unwrap();
    let adapter_dir: PathBuf = dir.path().join("adapter");
    let mut options = EvaluationOptions::new(library.clone(), adapter_dir.clone());
    options.queries = Some(queries);
    options.workers = 2;
    options.training = TrainingOptions {
        config: TrainingConfig {
            hidden: 16,
            max_epochs: 3,
            min_cases_per_class: 4,
            ..TrainingConfig::default()
        },
        validation_fraction: 0.25,
    };
    let report = evaluate(&cache, &encoder, &options, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(report.queries, 12);

    for m in &report.methods {
        let f = m
            .two_class
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no two-class figures", m.method));
        assert_eq!((f.positive.as_str(), f.negative.as_str()), ("mel", "nv"));
        assert_eq!((f.positives, f.negatives), (6, 6), "{}", m.method);
        for x in [f.recall, f.specificity, f.balanced_accuracy] {
            assert!(in_unit(x), "{}: {f:?}", m.method);
        }
        assert!((f.balanced_accuracy - 0.5 * (f.recall + f.specificity)).abs() < 1e-12);
        let auc = f.auc.unwrap_or_else(|| panic!("{}: no AUC", m.method));
        assert!(in_unit(auc), "{}: {f:?}", m.method);
        // Recall is the class's own recall in the full report.
        let mel = m
            .report
            .per_class
            .iter()
            .find(|c| c.label == "mel")
            .unwrap();
        assert!((mel.recall - f.recall).abs() < 1e-12, "{}", m.method);
    }

    // The rules are in the installed adapter's manifest, and the report
    // applies the stored ones.
    let adapter = Adapter::load(&adapter_dir, encoder.model_id(), encoder.dim()).unwrap();
    let calibration = adapter.manifest().calibration.clone().expect("calibration");
    let point = calibration.melanoma.expect("an operating point");
    assert!(point.sensitivity >= point.target_sensitivity, "{point:?}");
    assert_eq!(point.target_sensitivity, 0.95);
    let op = report.operating_point.as_ref().expect("operating point");
    assert_eq!(op.chosen, point);
    assert_eq!((op.melanomas, op.others), (6, 6));
    assert!(in_unit(op.sensitivity) && in_unit(op.specificity), "{op:?}");
    let rule = calibration.no_match.expect("a no-match rule");
    let no_match = report.no_match.as_ref().expect("no-match figures");
    assert_eq!(no_match.rule, rule);
    assert_eq!(no_match.queries.n, 12);
    let kinds: Vec<&str> = no_match
        .non_dermoscopy
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "keyboard",
            "text on paper",
            "flat colour",
            "gradient scene",
            "all drawn"
        ]
    );
    assert_eq!(no_match.non_dermoscopy[4].1.n, 12);
    assert!(
        rule.min_top1_raw_similarity.is_some(),
        "the rule looks at both spaces: {rule:?}"
    );
    let target = rule.quantile;
    assert!(
        rule.validation_rate.is_some_and(|r| r <= target),
        "both spaces together fire on at most the target on validation: {rule:?}"
    );
    for f in
        std::iter::once(&no_match.queries).chain(no_match.non_dermoscopy.iter().map(|(_, f)| f))
    {
        assert!(in_unit(f.rate) && f.fired <= f.n, "{f:?}");
        // The daemon's rule fires where either half does, and only there.
        let raw = f.raw_fired.expect("a raw-space half");
        assert!(
            f.either_fired >= f.fired.max(raw) && f.either_fired <= f.fired + raw,
            "{f:?}"
        );
        assert!((f.either_rate - f.either_fired as f64 / f.n as f64).abs() < 1e-12);
    }
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["methods"][0]["two_class"]["auc"].is_number(), "{json}");
    assert!(json["operating_point"]["chosen"]["threshold"].is_number());

    // A seven-class query set (the library's own lesion split) has no
    // two-class figures; its embeddings are cached already.
    let mut split = EvaluationOptions::new(library, dir.path().join("adapter-split"));
    split.training = options.training.clone();
    split.query_fraction = 0.25;
    let report = evaluate(&cache, &encoder, &split, |_| ControlFlow::Continue(())).unwrap();
    assert!(report.methods.iter().all(|m| m.two_class.is_none()));
}
