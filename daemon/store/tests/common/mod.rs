//! Deterministic test cases shared by the integration tests.
#![allow(dead_code)]

use dermascope_store::{Case, CaseId, CaseMetadata, CaseSource, Diagnosis, Sex, StoreIdentity};

pub const MODEL: &str = "test-encoder-v1";

pub fn identity(dim: usize) -> StoreIdentity {
    StoreIdentity {
        model_id: MODEL.to_owned(),
        embedding_dim: dim,
    }
}

/// splitmix64: the parent and the writer child regenerate identical cases
/// from the same seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The case with this id is a pure function of the id, so a checker knows
/// the exact bytes every acknowledged case must have.
pub fn make_case(id: &str, dim: usize) -> Case {
    let mut seed = 0xC0FFEE_u64;
    for b in id.bytes() {
        seed = seed.rotate_left(5) ^ u64::from(b);
        seed = seed.wrapping_mul(0x100_0000_01B3);
    }
    let mut rng = Rng(seed);
    let mut embedding: Vec<f32> = (0..dim).map(|_| rng.uniform() - 0.5).collect();
    let norm = embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
    for x in &mut embedding {
        *x /= norm;
    }
    let codes: Vec<&str> = Diagnosis::ham10000_codes().collect();
    let code = codes[rng.below(codes.len() as u64) as usize];
    let thumb_len = 200 + rng.below(3000) as usize;
    let thumbnail_jpeg: Vec<u8> = (0..thumb_len).map(|_| rng.next_u64() as u8).collect();
    let sites = ["back", "face", "lower extremity", "trunk"];
    Case {
        id: CaseId::new(id).expect("test ids are valid"),
        embedding,
        diagnosis: Diagnosis::from_code(code).expect("HAM10000 code"),
        source: CaseSource::ALL[rng.below(3) as usize],
        metadata: CaseMetadata {
            age_years: Some(20 + rng.below(60) as u16),
            sex: Some(if rng.below(2) == 0 {
                Sex::Female
            } else {
                Sex::Male
            }),
            anatomical_site: Some(sites[rng.below(4) as usize].to_owned()),
            fitzpatrick_type: Some(1 + rng.below(6) as u8),
            note: Some(format!("note for {id}")),
            lesion_id: Some(format!("lesion-{}", rng.below(1000))),
        },
        thumbnail_jpeg,
        model_id: MODEL.to_owned(),
        created_at_ms: 1_700_000_000_000 + rng.below(1_000_000),
        updated_at_ms: 1_700_000_000_000 + rng.below(1_000_000),
        label_confirmed: rng.below(4) != 0,
        device_id: None,
        revision: 1,
    }
}

/// A real JPEG of `width` x `height` (a gradient), as a camera would give.
pub fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
        .encode_image(&image)
        .expect("encoding a test JPEG");
    out
}

/// A small JPEG whose frame header claims `width` x `height`: what a
/// hostile or broken upload looks like to the pixel cap.
pub fn jpeg_header_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut bytes = jpeg(16, 16);
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline JPEG has an SOF0 marker");
    // SOF0: marker, length (2), precision (1), height (2), width (2).
    bytes[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    bytes
}
