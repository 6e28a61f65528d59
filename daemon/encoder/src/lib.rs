//! The lesion encoder: photograph in, L2-normalised embedding out.
//!
//! An encoder is a *bundle* directory with a [`manifest.toml`](manifest) and
//! one ONNX file per variant (`fp32`, `int8`). [`Encoder::load`] checks the
//! manifest, verifies the variant's sha256 on the very bytes it parses, fixes
//! the input shape (tract is several times slower with a symbolic batch),
//! optimises the graph once, and checks that the graph's output agrees with the
//! manifest's dimension. After that, [`Encoder::embed_image_bytes`] and
//! [`Encoder::embed_rgb`] are pure functions of their input.
//!
//! ```no_run
//! use dermascope_encoder::{Encoder, EncoderOptions};
//! let encoder = Encoder::load("models/dist/sklesion-xception".as_ref(), &EncoderOptions::default())?;
//! let jpeg = std::fs::read("lesion.jpg")?;
//! let embedding = encoder.embed_image_bytes(&jpeg)?;
//! assert_eq!(embedding.values().len(), encoder.dim());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod manifest;
pub mod preprocess;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

pub use manifest::{EncoderManifest, Precision, VariantSpec};
pub use preprocess::{decode_rgb, image_to_tensor, DecodeBudget, MIN_IMAGE_SIDE};

/// The command that produces the default bundle; named in every "missing" error.
pub const BUILD_COMMAND: &str = "models/build";

/// The variant run when the configuration does not name one.
///
/// Decided by measurement (figures in `docs/benchmarks.md`). On x86_64
/// (`scripts/bench encoder`), tract 0.23.9's int8 plan is slower than its
/// fp32 one: the per-channel requantization after every `QLinearConv` runs as
/// separate element-wise passes over the accumulator instead of inside the
/// matmul kernel, so the faithful and fast choice there is fp32.
pub const DEFAULT_VARIANT: &str = if cfg!(target_arch = "aarch64") {
    DEFAULT_VARIANT_AARCH64
} else {
    "fp32"
};
/// fp32 on the device too (`scripts/bench encoder-aarch64`, qemu-user): the
/// int8 plan executes 1.96x the instructions of fp32 per embedding on a
/// Cortex-A72 (Raspberry Pi 4, SMLAL kernel) and 1.25x on a Cortex-A76
/// (Raspberry Pi 5, SDOT kernel). The A76 figure is close enough that a
/// timing on a real Pi 5 should confirm it; instruction counts ignore that an
/// SDOT does four times the multiply-adds of an FMLA.
const DEFAULT_VARIANT_AARCH64: &str = "fp32";

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("no encoder bundle at {path}: build the default one with `{BUILD_COMMAND}`")]
    BundleMissing { path: PathBuf },
    #[error("encoder file {path} is missing (variant {variant}): rebuild the bundle with `{BUILD_COMMAND}`")]
    VariantFileMissing { path: PathBuf, variant: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML for an encoder manifest: {message}")]
    ManifestSyntax { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    ManifestInvalid { path: PathBuf, message: String },
    #[error("the bundle has no variant {requested:?}; it has {available:?}")]
    UnknownVariant {
        requested: String,
        available: Vec<String>,
    },
    #[error("{path} does not match its manifest (sha256 {actual}, manifest says {expected}): the file is corrupt or from another build; rerun `{BUILD_COMMAND}`")]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path} is not a model tract can run: {message}")]
    Graph { path: PathBuf, message: String },
    #[error("the graph in {path} disagrees with its manifest: {message}")]
    GraphMismatch { path: PathBuf, message: String },
    #[error("not an image: {reason}")]
    NotAnImage { reason: String },
    #[error("the image is truncated or corrupt: {reason}")]
    CorruptImage { reason: String },
    #[error("the image is {width}x{height} pixels; at least {min_side}x{min_side} is needed")]
    ImageTooSmall {
        width: u32,
        height: u32,
        min_side: u32,
    },
    #[error("the image is {width}x{height} pixels, too large to decode within the {budget_mib} MiB budget")]
    ImageOverBudget {
        width: u32,
        height: u32,
        budget_mib: u64,
    },
    #[error("expected an input tensor of {expected} values, got {actual}")]
    TensorSize { expected: usize, actual: usize },
    #[error("inference failed: {message}")]
    Inference { message: String },
    #[error("the encoder produced a degenerate embedding (zero or non-finite)")]
    DegenerateEmbedding,
}

/// Which variant to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VariantChoice {
    /// [`DEFAULT_VARIANT`] for this architecture, or the bundle's first fp32
    /// variant if it lacks one by that name.
    #[default]
    Default,
    Named(String),
}

#[derive(Debug, Clone)]
pub struct EncoderOptions {
    pub variant: VariantChoice,
    /// Threads for tract's matrix products; 1 leaves a core free for capture.
    pub threads: usize,
    pub decode_budget: DecodeBudget,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        EncoderOptions {
            variant: VariantChoice::Default,
            threads: 1,
            decode_budget: DecodeBudget::default(),
        }
    }
}

/// An L2-normalised embedding, tagged with the encoder that produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    values: Vec<f32>,
}

impl Embedding {
    /// Normalises `raw` to unit length.
    pub fn from_raw(mut raw: Vec<f32>) -> Result<Self, EncoderError> {
        let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
        if !norm.is_finite() || norm <= f32::EPSILON {
            return Err(EncoderError::DegenerateEmbedding);
        }
        raw.iter_mut().for_each(|v| *v /= norm);
        Ok(Embedding { values: raw })
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    pub fn cosine(&self, other: &Embedding) -> f32 {
        self.values
            .iter()
            .zip(&other.values)
            .map(|(a, b)| a * b)
            .sum()
    }
}

/// Timings of one load, for the benchmark and the start-up log.
#[derive(Debug, Clone, Copy)]
pub struct LoadTimings {
    pub read_and_verify: Duration,
    pub parse: Duration,
    pub optimize: Duration,
}

pub struct Encoder {
    manifest: EncoderManifest,
    variant: VariantSpec,
    plan: Arc<TypedRunnableModel>,
    input_shape: [usize; 4],
    decode_budget: DecodeBudget,
    load_timings: LoadTimings,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("model_id", &self.manifest.model_id)
            .field("variant", &self.variant.name)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    pub fn load(bundle_dir: &Path, options: &EncoderOptions) -> Result<Self, EncoderError> {
        if !bundle_dir.is_dir() {
            return Err(EncoderError::BundleMissing {
                path: bundle_dir.to_path_buf(),
            });
        }
        let manifest = EncoderManifest::load(bundle_dir)?;
        let variant = select_variant(&manifest, &options.variant)?.clone();
        let path = manifest.variant_path(bundle_dir, &variant);

        let started = Instant::now();
        let bytes = std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                EncoderError::VariantFileMissing {
                    path: path.clone(),
                    variant: variant.name.clone(),
                }
            } else {
                EncoderError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(&variant.sha256) {
            return Err(EncoderError::ChecksumMismatch {
                path,
                expected: variant.sha256.clone(),
                actual,
            });
        }
        let read_and_verify = started.elapsed();

        let started = Instant::now();
        let graph_error = |e: TractError| EncoderError::Graph {
            path: path.clone(),
            message: format!("{e:#}"),
        };
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut Cursor::new(&bytes))
            .map_err(graph_error)?;
        drop(bytes);

        let input = &manifest.input;
        let input_shape = match input.layout {
            manifest::TensorLayout::Nchw => [1, 3, input.height as usize, input.width as usize],
            manifest::TensorLayout::Nhwc => [1, input.height as usize, input.width as usize, 3],
        };
        let input_index = named_outlet_index(&model, model.input_outlets(), &input.name)
            .ok_or_else(|| EncoderError::GraphMismatch {
                path: path.clone(),
                message: format!("it has no input named {:?}", input.name),
            })?;
        let output_index =
            named_outlet_index(&model, model.output_outlets(), &manifest.output.name).ok_or_else(
                || EncoderError::GraphMismatch {
                    path: path.clone(),
                    message: format!("it has no output named {:?}", manifest.output.name),
                },
            )?;
        let output_outlet = model.output_outlets().map_err(graph_error)?[output_index];
        model
            .select_output_outlets(&[output_outlet])
            .map_err(graph_error)?;
        model
            .set_input_fact(input_index, f32::fact(input_shape).into())
            .map_err(graph_error)?;
        let typed = model.into_typed().map_err(graph_error)?;
        let parse = started.elapsed();

        let started = Instant::now();
        let optimized = typed.into_optimized().map_err(graph_error)?;
        let output_shape = optimized
            .output_fact(0)
            .map_err(graph_error)?
            .shape
            .as_concrete()
            .map(|s| s.to_vec())
            .ok_or_else(|| EncoderError::GraphMismatch {
                path: path.clone(),
                message: "its output shape is not fixed by the input shape".into(),
            })?;
        let output_len: usize = output_shape.iter().product();
        if output_len != manifest.output.dim {
            return Err(EncoderError::GraphMismatch {
                path,
                message: format!(
                    "output {:?} has shape {:?} ({} values) but the manifest says dim = {}",
                    manifest.output.name, output_shape, output_len, manifest.output.dim
                ),
            });
        }
        let run_options = RunOptions {
            executor: executor_for(options.threads),
            ..RunOptions::default()
        };
        let plan = optimized
            .into_runnable_with_options(&run_options)
            .map_err(graph_error)?;
        let optimize = started.elapsed();

        let load_timings = LoadTimings {
            read_and_verify,
            parse,
            optimize,
        };
        tracing::info!(
            model_id = %manifest.model_id,
            variant = %variant.name,
            dim = manifest.output.dim,
            threads = options.threads,
            verify_ms = read_and_verify.as_millis() as u64,
            parse_ms = parse.as_millis() as u64,
            optimize_ms = optimize.as_millis() as u64,
            "encoder loaded"
        );
        Ok(Encoder {
            manifest,
            variant,
            plan,
            input_shape,
            decode_budget: options.decode_budget,
            load_timings,
        })
    }

    pub fn manifest(&self) -> &EncoderManifest {
        &self.manifest
    }

    pub fn model_id(&self) -> &str {
        &self.manifest.model_id
    }

    pub fn variant(&self) -> &VariantSpec {
        &self.variant
    }

    pub fn dim(&self) -> usize {
        self.manifest.output.dim
    }

    pub fn load_timings(&self) -> LoadTimings {
        self.load_timings
    }

    pub fn input_len(&self) -> usize {
        self.input_shape.iter().product()
    }

    /// Decodes JPEG/PNG bytes and embeds them.
    pub fn embed_image_bytes(&self, bytes: &[u8]) -> Result<Embedding, EncoderError> {
        let image = decode_rgb(bytes, self.decode_budget)?;
        self.embed_rgb(&image)
    }

    /// Embeds an RGB frame (from the camera, or already decoded).
    pub fn embed_rgb(&self, image: &RgbImage) -> Result<Embedding, EncoderError> {
        let tensor = self.preprocess(image)?;
        Embedding::from_raw(self.run_tensor(&tensor)?)
    }

    pub fn preprocess(&self, image: &RgbImage) -> Result<Vec<f32>, EncoderError> {
        image_to_tensor(image, &self.manifest.input)
    }

    /// Runs the graph on an already-normalised input tensor and returns the raw,
    /// un-normalised output: what the reference tests compare with onnxruntime.
    pub fn run_tensor(&self, tensor: &[f32]) -> Result<Vec<f32>, EncoderError> {
        if tensor.len() != self.input_len() {
            return Err(EncoderError::TensorSize {
                expected: self.input_len(),
                actual: tensor.len(),
            });
        }
        let inference = |e: TractError| EncoderError::Inference {
            message: format!("{e:#}"),
        };
        let input = Tensor::from_shape(&self.input_shape, tensor).map_err(inference)?;
        let outputs = self
            .plan
            .run(tvec![input.into_tvalue()])
            .map_err(inference)?;
        let output = outputs.first().ok_or_else(|| EncoderError::Inference {
            message: "the graph returned no output".into(),
        })?;
        let view = output.to_plain_array_view::<f32>().map_err(inference)?;
        Ok(view.iter().copied().collect())
    }
}

fn select_variant<'m>(
    manifest: &'m EncoderManifest,
    choice: &VariantChoice,
) -> Result<&'m VariantSpec, EncoderError> {
    let unknown = |requested: &str| EncoderError::UnknownVariant {
        requested: requested.to_string(),
        available: manifest.variant_names(),
    };
    match choice {
        VariantChoice::Named(name) => manifest.variant(name).ok_or_else(|| unknown(name)),
        VariantChoice::Default => manifest
            .variant(DEFAULT_VARIANT)
            .or_else(|| {
                manifest
                    .variants
                    .iter()
                    .find(|v| v.precision == Precision::Fp32)
            })
            .ok_or_else(|| unknown(DEFAULT_VARIANT)),
    }
}

fn named_outlet_index(
    model: &InferenceModel,
    outlets: TractResult<&[OutletId]>,
    name: &str,
) -> Option<usize> {
    let outlets = outlets.ok()?;
    outlets.iter().position(|outlet| {
        let node = &model.nodes()[outlet.node];
        node.name == name
            || model
                .outlet_label(*outlet)
                .is_some_and(|label| label == name)
    })
}

fn executor_for(threads: usize) -> Option<tract_linalg::multithread::Executor> {
    if threads > 1 {
        Some(tract_linalg::multithread::Executor::multithread(threads))
    } else {
        None
    }
}
