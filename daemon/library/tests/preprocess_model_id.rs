//! A library embedded with one `[preprocess]` is never searched with queries
//! embedded with another: the preprocessing is part of the model id the store
//! records, so the store refuses the other encoder with its reembed hint, as
//! it refuses another model.

use dermascope_encoder::{Encoder, EncoderOptions, PreprocessSpec, VariantChoice};
use dermascope_store::{CaseStore, StoreError, StoreIdentity};

fn encoder(preprocess: &str) -> Encoder {
    let options = EncoderOptions {
        variant: VariantChoice::Named("int8".into()),
        // On an x86_64 CPU without VNNI int8 is slow: what is checked is its numerics, not its speed.
        allow_slow_int8: true,
        threads: 1,
        preprocess: Some(PreprocessSpec::parse_list(preprocess).unwrap()),
        ..EncoderOptions::default()
    };
    Encoder::load(&dermascope_testkit::bundle_dir(), &options).unwrap()
}

fn identity(encoder: &Encoder) -> StoreIdentity {
    StoreIdentity {
        model_id: encoder.model_id().to_string(),
        embedding_dim: encoder.dim(),
    }
}

#[test]
fn a_store_embedded_with_other_preprocessing_is_refused_with_the_reembed_hint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cases");
    let plain = encoder("none");
    let balanced = encoder("shades-of-gray,lesion");
    assert_eq!(plain.model_id(), plain.manifest().model_id);
    assert_ne!(plain.model_id(), balanced.model_id());

    drop(CaseStore::open(&path, identity(&plain)).unwrap());
    let refused = CaseStore::open(&path, identity(&balanced)).unwrap_err();
    match &refused {
        StoreError::ModelMismatch {
            store_model,
            encoder_model,
            ..
        } => {
            assert_eq!(store_model, plain.model_id());
            assert_eq!(encoder_model, balanced.model_id());
        }
        other => panic!("expected a model mismatch, got {other}"),
    }
    assert!(
        refused.to_string().contains("dermascope reembed"),
        "{refused}"
    );
    // The encoder it was embedded with still opens it.
    CaseStore::open(&path, identity(&plain)).unwrap();
}
