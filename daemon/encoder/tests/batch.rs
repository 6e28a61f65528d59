//! The batch plan (`Encoder::batch_encoder`) against the one-image plan on
//! the bundle's check inputs (real dermoscopy where the bundle was built
//! with it): the same embedding per image, to fp32 rounding, for both
//! variants, with the fused stages in the batch plan too.

mod common;

use dermascope_encoder::{Encoder, EncoderOptions, PreprocessSpec, VariantChoice};

fn load(variant: &str, preprocess: Option<PreprocessSpec>) -> Encoder {
    let options = EncoderOptions {
        variant: VariantChoice::Named(variant.into()),
        // On an x86_64 CPU without VNNI int8 is slow: what is checked is its numerics, not its speed.
        allow_slow_int8: true,
        threads: 2,
        preprocess,
        ..EncoderOptions::default()
    };
    Encoder::load(&common::bundle_dir(), &options).expect("loading the encoder")
}

fn check_inputs(encoder: &Encoder, count: usize) -> Vec<Vec<f32>> {
    let inputs = common::read_f32_le(&common::bundle_dir().join("check/inputs.f32"));
    let len = encoder.input_len();
    assert!(
        inputs.len() >= count * len,
        "the check set has fewer than {count} inputs"
    );
    inputs
        .chunks(len)
        .take(count)
        .map(<[f32]>::to_vec)
        .collect()
}

/// Embeds `inputs` one at a time and `batch` at a time; returns the lowest
/// per-image cosine. 5 inputs in runs of 4 also check the padded short run.
fn worst_cosine(encoder: &Encoder, batch: usize, inputs: &[Vec<f32>]) -> f32 {
    let batched = encoder.batch_encoder(batch, 2).expect("planning the batch");
    assert_eq!(batched.batch(), batch);
    assert_eq!(batched.model_id(), encoder.model_id());
    let fusion = batched.stage_fusion();
    assert_eq!(
        fusion,
        encoder.stage_fusion(),
        "the batch plan fused other stages than the one-image plan"
    );
    assert!(fusion.depthwise > 0, "no stage fused: {fusion:?}");
    let tensors: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let together = batched
        .embed_tensors(&tensors)
        .expect("embedding the batch");
    assert_eq!(together.len(), inputs.len());
    let mut worst = 1f32;
    for (i, (input, batched)) in inputs.iter().zip(together).enumerate() {
        let alone = dermascope_encoder::Embedding::from_raw(encoder.run_tensor(input).unwrap())
            .expect("one image's embedding");
        let batched = batched.expect("the batch's embedding of one image");
        let cosine = alone.cosine(&batched);
        eprintln!("input {i}: batch {batch} vs one image, cosine {cosine:.7}");
        worst = worst.min(cosine);
    }
    worst
}

#[test]
fn a_batch_embeds_each_image_as_the_one_image_plan_does_fp32() {
    let encoder = load("fp32", None);
    let inputs = check_inputs(&encoder, 5);
    let worst = worst_cosine(&encoder, 4, &inputs);
    assert!(worst >= 0.99999, "fp32 batch 4: min cosine {worst}");
}

#[test]
fn a_batch_embeds_each_image_as_the_one_image_plan_does_int8() {
    let encoder = load("int8", None);
    let inputs = check_inputs(&encoder, 5);
    for batch in [4, 8] {
        let worst = worst_cosine(&encoder, batch, &inputs);
        assert!(worst >= 0.99999, "int8 batch {batch}: min cosine {worst}");
    }
}

/// Test-time augmentation runs each view as a batch: the average must be
/// the one-image path's (`embed_rgb` averages the same views).
#[test]
fn a_batch_with_test_time_augmentation_averages_the_same_views() {
    let spec = PreprocessSpec {
        tta: 2,
        ..PreprocessSpec::default()
    };
    let encoder = load("int8", Some(spec));
    let images: Vec<image::RgbImage> = (0..3u32)
        .map(|seed| {
            // Not mirror-symmetric, so the second view differs from the first.
            image::RgbImage::from_fn(300, 260, |x, y| {
                image::Rgb([
                    (x * 7 + seed * 40) as u8,
                    (y * 3 + x / 5) as u8,
                    ((x * y) / 97 + seed * 11) as u8,
                ])
            })
        })
        .collect();
    let batched = encoder.batch_encoder(2, 2).expect("planning the batch");
    let tensors: Vec<Vec<f32>> = images
        .iter()
        .map(|image| encoder.preprocess(image).unwrap())
        .collect();
    let views: Vec<&[f32]> = tensors.iter().map(Vec::as_slice).collect();
    let together = batched.embed_tensors(&views).expect("embedding the batch");
    for (i, (image, batched)) in images.iter().zip(together).enumerate() {
        let alone = encoder.embed_rgb(image).expect("one image's embedding");
        let plain =
            dermascope_encoder::Embedding::from_raw(encoder.run_tensor(&tensors[i]).unwrap())
                .unwrap();
        // The claim is not vacuous: the augmented embedding is not the
        // first view's alone.
        assert!(
            alone.cosine(&plain) < 0.999_999,
            "image {i}: the views agree"
        );
        let cosine = alone.cosine(&batched.expect("the batch's embedding"));
        assert!(cosine >= 0.99999, "image {i}: cosine {cosine}");
    }
}

#[test]
fn a_tensor_of_the_wrong_length_is_refused() {
    let encoder = load("int8", None);
    let batched = encoder.batch_encoder(2, 1).expect("planning the batch");
    let short = vec![0f32; batched.image_input_len() - 1];
    let err = batched.embed_tensors(&[&short]).unwrap_err();
    assert!(err.to_string().contains("input tensor"), "{err}");
}
