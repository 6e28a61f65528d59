//! The lesion encoder: photograph in, L2-normalised embedding out.
//!
//! An encoder is a *bundle* directory with a [`manifest.toml`](manifest) and
//! one ONNX file per variant (`fp32`, `int8`). [`Encoder::load`] checks the
//! manifest, verifies the variant's sha256 on the very bytes it parses, fixes
//! the input shape (tract is several times slower with a symbolic batch),
//! replaces what tract runs slowly between its matrix products by the
//! encoder's own fused ops ([`stages`]), optimises the graph once, and checks
//! that the graph's output agrees with the manifest's dimension. After that, [`Encoder::embed_image_bytes`] and
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
pub mod preprocess_spec;
pub mod preprocess_steps;
pub mod stages;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::RgbImage;
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

pub use manifest::{EncoderManifest, Precision, VariantSpec};
pub use preprocess::{decode_rgb, image_to_tensor, DecodeBudget, MIN_IMAGE_SIDE};
pub use preprocess_spec::{ColourConstancy, Framing, PreprocessSpec, PREPROCESS_ENV};
pub use stages::StageFusion;

/// How an fp16 variant runs on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfPrecisionPath {
    /// On tract's f16 kernels: tract's probe found FP16 arithmetic
    /// (aarch64 with FEAT_FP16, e.g. Cortex-A76/A55; not the Pi 4's A72).
    Native,
    /// Translated to f32 at load (tract's `FloatPrecisionTranslator`): the
    /// weights keep their f16 values, the arithmetic is f32.
    TranslatedToF32,
}

/// Lets tract use its wide (16x16, zmm) int8 matrix kernel on AMD CPUs with
/// AVX-512 VNNI (Zen 4 and later), unless `TRACT_AVX512_FMA_UNITS` is set.
///
/// Why: tract picks the wide tile only where its probe finds two 512-bit
/// FMA ports; Zen 4 executes 512-bit instructions in two halves, so the probe
/// says one and tract keeps the 8x8 ymm kernel. Measured on the encoder here
/// (Zen 4, `bench_encoder --profile`, 1 thread): the wide kernel runs the
/// int8 convolutions at 162 GMAC/s against 120. On Intel's single-port
/// AVX-512 parts tract's authors measured the wide tile 4-11% slower, so
/// there tract's own choice stands. tract decides once per process, at the
/// first int8 product it plans, so this runs before any model is optimised.
pub fn prefer_wide_int8_tile_on_amd() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(target_arch = "x86_64")]
        {
            const KNOB: &str = "TRACT_AVX512_FMA_UNITS";
            // CPUID leaf 0: the vendor string, "AuthenticAMD" on AMD.
            let vendor = std::arch::x86_64::__cpuid(0);
            let amd =
                [vendor.ebx, vendor.edx, vendor.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163];
            let vnni = std::arch::is_x86_feature_detected!("avx512vnni");
            if amd && vnni && std::env::var_os(KNOB).is_none() {
                // The global layer: the environment still overrides it.
                match tract_onnx::tract_core::tract_data::knobs::set_config_global(KNOB, "2") {
                    Ok(()) => tracing::info!("asked tract for its wide AVX-512 VNNI int8 tile"),
                    Err(e) => tracing::warn!(error = %e, "could not select tract's wide int8 tile"),
                }
            }
        }
    });
}

/// The command that produces the default bundle; named in every "missing" error.
pub const BUILD_COMMAND: &str = "models/build";

/// The int8 dot-product instruction set this CPU offers tract, if any:
/// the condition for int8 to be the faster variant.
///
/// Decided by measurement (`scripts/bench encoder`, `scripts/bench
/// encoder-aarch64`, figures in `docs/benchmarks.md`) on the shipped int8
/// form, 1 thread:
///
/// | CPU | tract's int8 kernel | int8 vs fp32 (both with [`stages`]) |
/// |---|---|---|
/// | x86_64 with AVX-512 VNNI (AMD Zen 4) | `avx512vnni_mmm_i32_16x16` | 69-72 vs 151 ms: 2.1-2.2x faster |
/// | x86_64 without VNNI (`TRACT_CPU_ISA`) | AVX2 / AVX-512 i32 | 422-427 vs 155 ms: 2.7x slower |
/// | x86_64 AVX2-only machine (issue 18) | `avx2_mmm_i32_8x8` | 10.4 s vs 168 ms: 62x slower |
/// | Cortex-A76 (Pi 5), dot product | `arm64simd_mmm_i32_8x8_dot` (SDOT) | 0.525x the instructions |
/// | Cortex-A72 (Pi 4), none | `arm64simd_mmm_i32_8x8` (SMLAL) | 1.25x the instructions |
///
/// tract's own probe is asked, so `TRACT_CPU_ISA` (which edits what tract
/// sees) moves this decision along with tract's kernel choice. The figures
/// hold for the int8 form `models/build` writes (ConvInteger); a bundle whose
/// int8 file takes another form should be measured, and named in the
/// configuration if it loses.
pub fn int8_dot_product_isa() -> Option<&'static str> {
    use tract_onnx::tract_core::tract_linalg::isa::{native, Isa};
    let isa = native();
    [
        Isa::X86_64Avx512Vnni,
        Isa::X86_64AvxVnni,
        Isa::Aarch64DotProd,
    ]
    .into_iter()
    .find(|feature| isa.has(*feature))
    .map(|feature| feature.name())
}

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
    #[error("{PREPROCESS_ENV}={value:?}: {message}")]
    PreprocessOverride { value: String, message: String },
    #[error("variant {variant:?} is int8, and this x86_64 CPU has no int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI): tract would run it through its AVX2 int8 kernel, which took 10.4 s an image on an AVX2-only machine against 168 ms for fp32. Leave the variant unset (fp32 is this CPU's default), or allow slow int8 to measure it anyway (`--allow-slow-int8`, or `allow_slow_int8 = true` under [encoder])")]
    SlowInt8 { variant: String },
}

/// Which variant to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VariantChoice {
    /// int8 where [`int8_dot_product_isa`] finds the instructions that make
    /// it the faster variant and the bundle's int8 was validated on real
    /// images; otherwise `fp32` (or the bundle's first fp32 variant).
    #[default]
    Default,
    Named(String),
}

impl VariantChoice {
    /// A variant named by a flag or a configuration key, else the default.
    pub fn from_name(name: Option<&str>) -> Self {
        match name {
            Some(name) => VariantChoice::Named(name.to_owned()),
            None => VariantChoice::Default,
        }
    }
}

/// Threads for tract's matrix products when nothing says otherwise: both
/// cores of a two-core board. The daemon's camera thread mostly waits in
/// the kernel, and one thread made the encoder stage slower end to end
/// (106.6 against 93.4 ms p50 in `scripts/bench e2e`).
pub const DEFAULT_THREADS: usize = 2;

#[derive(Debug, Clone)]
pub struct EncoderOptions {
    pub variant: VariantChoice,
    /// Threads for tract's matrix products ([`DEFAULT_THREADS`] by default).
    pub threads: usize,
    pub decode_budget: DecodeBudget,
    /// Run depthwise convolutions, max pools and shortcut strides, with the
    /// integer (de)quantization around them, as fused ops ([`stages`])
    /// instead of tract's own. Off only to compare against stock tract.
    pub fuse_stages: bool,
    /// On AMD CPUs with AVX-512 VNNI, let tract use its wide int8 matrix
    /// kernel (see [`prefer_wide_int8_tile_on_amd`]). Process-wide, and
    /// only effective before tract plans its first int8 product in the
    /// process. Off only to compare against stock tract.
    pub prefer_wide_int8_tile: bool,
    /// Replaces the manifest's `[preprocess]` table (it enters the model id
    /// like the table would). `None`: [`PREPROCESS_ENV`] if set, else the
    /// manifest's.
    pub preprocess: Option<PreprocessSpec>,
    /// Run a named int8 variant even on an x86_64 CPU without int8
    /// dot-product instructions, where it is slow
    /// ([`EncoderError::SlowInt8`]). For benchmarks and numerics checks;
    /// the default variant never picks int8 there.
    pub allow_slow_int8: bool,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        EncoderOptions {
            variant: VariantChoice::Default,
            threads: DEFAULT_THREADS,
            decode_budget: DecodeBudget::default(),
            fuse_stages: true,
            prefer_wide_int8_tile: true,
            preprocess: None,
            allow_slow_int8: false,
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
    /// The plan's executor: with more than one thread, its pool is where
    /// each run starts (see [`Encoder::run_tensor`]).
    executor: Option<tract_linalg::multithread::Executor>,
    /// Held for a run on the pool: one run at a time (see
    /// [`Encoder::run_tensor`]).
    pool_run: Mutex<()>,
    input_shape: [usize; 4],
    /// What the plan takes: f32, or f16 for an fp16 file run natively.
    input_type: DatumType,
    half_precision: Option<HalfPrecisionPath>,
    decode_budget: DecodeBudget,
    load_timings: LoadTimings,
    stage_fusion: StageFusion,
    preprocess: PreprocessSpec,
    /// The manifest's model id with the preprocessing's suffix.
    model_id: String,
    /// Where the plan came from and how it was made, so that
    /// [`Encoder::batch_encoder`] can plan the same file for a batch.
    bundle_dir: PathBuf,
    options: EncoderOptions,
    /// Size of the variant's file: what another plan of it costs in memory.
    file_bytes: u64,
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
        Self::load_for_batch(bundle_dir, options, 1)
    }

    /// [`Encoder::load`] with the input's batch dimension fixed at `batch`
    /// (the manifest describes one image; the bundles' files declare batch 1,
    /// and tract is several times slower with a symbolic one).
    fn load_for_batch(
        bundle_dir: &Path,
        options: &EncoderOptions,
        batch: usize,
    ) -> Result<Self, EncoderError> {
        if !bundle_dir.is_dir() {
            return Err(EncoderError::BundleMissing {
                path: bundle_dir.to_path_buf(),
            });
        }
        if options.prefer_wide_int8_tile {
            prefer_wide_int8_tile_on_amd();
        }
        let manifest = EncoderManifest::load(bundle_dir)?;
        let preprocess = preprocess_steps::chosen_spec(&manifest, options.preprocess)?;
        let (variant, variant_reason) = select_variant(&manifest, &options.variant)?;
        refuse_slow_int8(
            variant,
            cfg!(target_arch = "x86_64"),
            int8_dot_product_isa(),
            options.allow_slow_int8,
        )?;
        let variant = variant.clone();
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
        let file_bytes = bytes.len() as u64;

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
        let image_shape = match input.layout {
            manifest::TensorLayout::Nchw => [1, 3, input.height as usize, input.width as usize],
            manifest::TensorLayout::Nhwc => [1, input.height as usize, input.width as usize, 3],
        };
        let mut input_shape = image_shape;
        input_shape[0] = batch.max(1);
        let mismatch = |message: String| EncoderError::GraphMismatch {
            path: path.clone(),
            message,
        };
        let input_index = named_outlet_index(&model, model.input_outlets(), &input.name)
            .ok_or_else(|| {
                mismatch(format!(
                    "it has no input named {:?} (its inputs: {:?})",
                    input.name,
                    outlet_names(&model, model.input_outlets())
                ))
            })?;
        let output_index =
            named_outlet_index(&model, model.output_outlets(), &manifest.output.name).ok_or_else(
                || {
                    mismatch(format!(
                        "it has no output named {:?} (its outputs: {:?})",
                        manifest.output.name,
                        outlet_names(&model, model.output_outlets())
                    ))
                },
            )?;
        let file_input_type = check_declared(
            model.input_fact(input_index).map_err(graph_error)?,
            "input",
            &input.name,
            &variant,
            Expected::Shape(&image_shape),
        )
        .map_err(mismatch)?;
        check_declared(
            model.output_fact(output_index).map_err(graph_error)?,
            "output",
            &manifest.output.name,
            &variant,
            Expected::Len(manifest.output.dim),
        )
        .map_err(mismatch)?;
        let output_outlet = model.output_outlets().map_err(graph_error)?[output_index];
        model
            .select_output_outlets(&[output_outlet])
            .map_err(graph_error)?;
        if input_shape[0] > 1 {
            forget_declared_shapes(&mut model).map_err(graph_error)?;
        }
        model
            .set_input_fact(
                input_index,
                TypedFact::dt_shape(file_input_type, input_shape).into(),
            )
            .map_err(graph_error)?;
        let mut typed = model.into_typed().map_err(graph_error)?;
        let parse = started.elapsed();

        let started = Instant::now();
        let half_precision = (variant.precision == Precision::Fp16).then(|| {
            if tract_linalg::has_fp16() {
                HalfPrecisionPath::Native
            } else {
                HalfPrecisionPath::TranslatedToF32
            }
        });
        if half_precision == Some(HalfPrecisionPath::TranslatedToF32) {
            // Without FP16 arithmetic tract would run f16 through scalar
            // fallbacks; f32 kernels on f16-rounded weights give the same
            // embedding to f16's precision, much faster.
            use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
            use tract_onnx::tract_core::transform::ModelTransform;
            FloatPrecisionTranslator::new(f16::datum_type(), f32::datum_type())
                .transform(&mut typed)
                .map_err(graph_error)?;
        }
        let mut typed = typed.into_decluttered().map_err(graph_error)?;
        let fusion = if options.fuse_stages {
            // A graph the stages mis-read must still load: stock tract runs
            // it, slower. fuse_stages edits in place, so keep the original
            // (its constants are shared, not copied).
            let stock = typed.clone();
            match stages::fuse_stages(&mut typed) {
                Ok(fusion) => fusion,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "fused stages failed; running stock tract");
                    typed = stock;
                    StageFusion::default()
                }
            }
        } else {
            StageFusion::default()
        };
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
        let input_type = optimized.input_fact(0).map_err(graph_error)?.datum_type;
        let output_len: usize = output_shape.iter().product();
        if output_len != manifest.output.dim * input_shape[0] {
            return Err(EncoderError::GraphMismatch {
                path,
                message: format!(
                    "output {:?} has shape {:?} ({} values) but the manifest says dim = {}",
                    manifest.output.name, output_shape, output_len, manifest.output.dim
                ),
            });
        }
        let executor = executor_for(options.threads);
        let run_options = RunOptions {
            executor: executor.clone(),
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
            variant_reason = %variant_reason,
            dim = manifest.output.dim,
            threads = options.threads,
            batch = input_shape[0],
            half_precision = ?half_precision,
            fused_stages = fusion.depthwise + fusion.max_pool + fusion.subsample,
            verify_ms = read_and_verify.as_millis() as u64,
            parse_ms = parse.as_millis() as u64,
            optimize_ms = optimize.as_millis() as u64,
            "encoder loaded"
        );
        let model_id = preprocess.model_id(&manifest.model_id);
        Ok(Encoder {
            manifest,
            variant,
            plan,
            executor,
            pool_run: Mutex::new(()),
            input_shape,
            input_type,
            half_precision,
            decode_budget: options.decode_budget,
            load_timings,
            stage_fusion: fusion,
            model_id,
            preprocess,
            bundle_dir: bundle_dir.to_path_buf(),
            options: options.clone(),
            file_bytes,
        })
    }

    /// Bytes of the variant's ONNX file: about what its weights take in
    /// memory, so what a caller weighs before [`Encoder::batch_encoder`].
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// A second plan of the same file, variant and preprocessing for
    /// `batch` images at once, with `threads` for its matrix products: for
    /// embedding a library, where the wider products (the exit flow's 8x8
    /// planes are short rows for one image) pay for a load. This encoder's
    /// one-image plan stays as it is, for captures. It costs another copy
    /// of the weights in memory, and the load's time (about a second for
    /// the default bundle).
    pub fn batch_encoder(
        &self,
        batch: usize,
        threads: usize,
    ) -> Result<BatchEncoder, EncoderError> {
        let options = EncoderOptions {
            variant: VariantChoice::Named(self.variant.name.clone()),
            threads,
            preprocess: Some(self.preprocess),
            ..self.options.clone()
        };
        let inner = Self::load_for_batch(&self.bundle_dir, &options, batch)?;
        if inner.model_id != self.model_id {
            return Err(EncoderError::GraphMismatch {
                path: self.bundle_dir.clone(),
                message: format!(
                    "the bundle changed while loading a batch plan (model id {} became {})",
                    self.model_id, inner.model_id
                ),
            });
        }
        Ok(BatchEncoder {
            batch: inner.input_shape[0],
            inner,
        })
    }

    pub fn manifest(&self) -> &EncoderManifest {
        &self.manifest
    }

    /// The manifest's model id, plus a suffix for any non-default
    /// preprocessing ([`PreprocessSpec::model_id`]): what stores record.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// The preprocessing this encoder applies before the resize.
    pub fn preprocess_spec(&self) -> PreprocessSpec {
        self.preprocess
    }

    pub fn variant(&self) -> &VariantSpec {
        &self.variant
    }

    pub fn dim(&self) -> usize {
        self.manifest.output.dim
    }

    /// Which ops run as fused stages (all zero when
    /// [`EncoderOptions::fuse_stages`] is off).
    pub fn stage_fusion(&self) -> StageFusion {
        self.stage_fusion
    }

    /// How an fp16 variant runs here; `None` for fp32 and int8 variants.
    pub fn half_precision(&self) -> Option<HalfPrecisionPath> {
        self.half_precision
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
        self.embed_tensor_with_tta(&tensor)
    }

    /// Embeds a tensor from [`Encoder::preprocess`] (with the test-time
    /// augmentation, as [`Encoder::embed_rgb`]): for a caller that prepares
    /// tensors on another thread.
    pub fn embed_tensor(&self, tensor: &[f32]) -> Result<Embedding, EncoderError> {
        self.embed_tensor_with_tta(tensor)
    }

    /// The input tensor for `image`, after the colour constancy and framing
    /// the bundle's `[preprocess]` names (test-time augmentation happens in
    /// [`Encoder::embed_rgb`], on this tensor).
    pub fn preprocess(&self, image: &RgbImage) -> Result<Vec<f32>, EncoderError> {
        preprocess::check_size(image.width(), image.height())?;
        match preprocess_steps::prepare(image, &self.preprocess) {
            Some((prepared, _)) => image_to_tensor(&prepared, &self.manifest.input),
            None => image_to_tensor(image, &self.manifest.input),
        }
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
        // One run at a time on the pool: a pool thread waiting inside a
        // matrix product steals queued jobs, and a second caller's run would
        // then start inside the first one's product on the same thread,
        // where tract's per-thread scratch is already in use (it panics).
        // Each encoder has its own pool, so this lock is the only way in.
        let _one_run = self
            .executor
            .is_some()
            .then(|| self.pool_run.lock().unwrap_or_else(|e| e.into_inner()));
        on_plan_pool(self.executor.as_ref(), || self.run_tensor_here(tensor))
    }

    fn run_tensor_here(&self, tensor: &[f32]) -> Result<Vec<f32>, EncoderError> {
        let inference = |e: TractError| EncoderError::Inference {
            message: format!("{e:#}"),
        };
        let mut input = Tensor::from_shape(&self.input_shape, tensor).map_err(inference)?;
        if self.input_type != f32::datum_type() {
            input = input
                .cast_to_dt(self.input_type)
                .map_err(inference)?
                .into_owned();
        }
        let outputs = self
            .plan
            .run(tvec![input.into_tvalue()])
            .map_err(inference)?;
        let output = outputs.first().ok_or_else(|| EncoderError::Inference {
            message: "the graph returned no output".into(),
        })?;
        let output = output.cast_to::<f32>().map_err(inference)?;
        let view = output.to_plain_array_view::<f32>().map_err(inference)?;
        Ok(view.iter().copied().collect())
    }
}

/// An encoder planned for a fixed number of images at once
/// ([`Encoder::batch_encoder`]); its embeddings are the one-image plan's
/// (the same products per image, only their order in memory differs).
pub struct BatchEncoder {
    inner: Encoder,
    batch: usize,
}

impl std::fmt::Debug for BatchEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchEncoder")
            .field("model_id", &self.inner.model_id)
            .field("variant", &self.inner.variant.name)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl BatchEncoder {
    /// Images per run of the plan.
    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn model_id(&self) -> &str {
        &self.inner.model_id
    }

    pub fn stage_fusion(&self) -> StageFusion {
        self.inner.stage_fusion
    }

    /// Values of one image's input tensor ([`Encoder::preprocess`]'s length).
    pub fn image_input_len(&self) -> usize {
        self.inner.input_len() / self.batch
    }

    /// Embeds `tensors` (each from [`Encoder::preprocess`] of the same
    /// bundle), `batch` at a time; a short last run is padded with copies
    /// of its last tensor, whose outputs are dropped. Test-time
    /// augmentation runs each view as a batch and averages as
    /// [`Encoder::embed_rgb`] does. The outer error fails the whole call
    /// (a wrong length, the graph); an inner one is one image's own (a
    /// degenerate embedding).
    pub fn embed_tensors(
        &self,
        tensors: &[&[f32]],
    ) -> Result<Vec<Result<Embedding, EncoderError>>, EncoderError> {
        let len = self.image_input_len();
        if let Some(bad) = tensors.iter().find(|t| t.len() != len) {
            return Err(EncoderError::TensorSize {
                expected: len,
                actual: bad.len(),
            });
        }
        let views = usize::from(self.inner.preprocess.tta).max(1);
        let dim = self.inner.dim();
        let mut out = Vec::with_capacity(tensors.len());
        let mut input = Vec::with_capacity(len * self.batch);
        for run in tensors.chunks(self.batch) {
            let mut sums: Vec<Result<Vec<f32>, EncoderError>> =
                (0..run.len()).map(|_| Ok(vec![0.0; dim])).collect();
            for k in 0..views {
                input.clear();
                for i in 0..self.batch {
                    let tensor = run[i.min(run.len() - 1)];
                    if k == 0 {
                        input.extend_from_slice(tensor);
                    } else {
                        input.extend(preprocess_steps::transform_tensor(
                            tensor,
                            &self.inner.manifest.input,
                            k,
                        ));
                    }
                }
                let raw = self.inner.run_tensor(&input)?;
                for (sum, row) in sums.iter_mut().zip(raw.chunks(dim)) {
                    let Ok(acc) = sum else { continue };
                    match Embedding::from_raw(row.to_vec()) {
                        Ok(view) if views == 1 => *acc = view.into_values(),
                        Ok(view) => acc.iter_mut().zip(view.values()).for_each(|(s, v)| *s += v),
                        Err(e) => *sum = Err(e),
                    }
                }
            }
            out.extend(sums.into_iter().map(|sum| match sum {
                Ok(values) if views == 1 => Ok(Embedding { values }),
                Ok(values) => Embedding::from_raw(values),
                Err(e) => Err(e),
            }));
        }
        Ok(out)
    }
}

fn select_variant<'m>(
    manifest: &'m EncoderManifest,
    choice: &VariantChoice,
) -> Result<(&'m VariantSpec, String), EncoderError> {
    let unknown = |requested: &str| EncoderError::UnknownVariant {
        requested: requested.to_string(),
        available: manifest.variant_names(),
    };
    match choice {
        VariantChoice::Named(name) => manifest
            .variant(name)
            .map(|variant| (variant, "named by the configuration".to_string()))
            .ok_or_else(|| unknown(name)),
        VariantChoice::Default => default_variant(manifest, int8_dot_product_isa()),
    }
}

/// Refuses an int8 `variant` on an x86_64 CPU without an int8 dot product
/// (`int8_isa` is None) unless `allowed`.
///
/// Why the cliff: there tract runs int8 products in `avx2_mmm_i32_8x8`,
/// whose inner loop (one iteration per depth step) loads the weights with a
/// legacy-SSE `movq xmm8, [rax]` (`f3 44 0f 7e`, seen in the linked binary)
/// between VEX ymm instructions. Intel cores pay a state transition (tens
/// of cycles on Haswell/Broadwell) or a merge dependency (later cores) for
/// each such mix; AMD cores and qemu do not, which is why masking features
/// on the AMD development machine (`TRACT_CPU_ISA`) gave 0.7 s, not 10.4.
/// Even without the penalty that kernel is 2.7x slower than fp32. Arm is
/// not refused: its kernels are all NEON, and the Pi 4's default is fp32.
fn refuse_slow_int8(
    variant: &VariantSpec,
    on_x86_64: bool,
    int8_isa: Option<&str>,
    allowed: bool,
) -> Result<(), EncoderError> {
    if variant.precision == Precision::Int8 && on_x86_64 && int8_isa.is_none() && !allowed {
        return Err(EncoderError::SlowInt8 {
            variant: variant.name.clone(),
        });
    }
    Ok(())
}

/// The faster faithful variant for a CPU with `int8_isa` (see
/// [`int8_dot_product_isa`]), and why.
fn default_variant<'m>(
    manifest: &'m EncoderManifest,
    int8_isa: Option<&str>,
) -> Result<(&'m VariantSpec, String), EncoderError> {
    // An int8 file calibrated on synthetic images was never checked against
    // fp32 on real lesions: never chosen by default.
    let validated_int8 = manifest
        .variants
        .iter()
        .find(|v| v.precision == Precision::Int8 && v.calibration.as_deref() != Some("synthetic"));
    // The reason is logged when the encoder loads.
    let reason = match (int8_isa, validated_int8) {
        (Some(isa), Some(int8)) => {
            return Ok((
                int8,
                format!("this CPU has {isa}: int8 is the faster variant"),
            ))
        }
        (Some(isa), None) => {
            format!("this CPU has {isa} but the bundle has no validated int8 variant")
        }
        (None, _) => "no int8 dot-product instructions here: fp32 is the faster variant".into(),
    };
    manifest
        .variant("fp32")
        .or_else(|| {
            manifest
                .variants
                .iter()
                .find(|v| v.precision == Precision::Fp32)
        })
        .or_else(|| manifest.variants.first())
        .map(|variant| (variant, reason))
        .ok_or_else(|| EncoderError::UnknownVariant {
            requested: "fp32".to_string(),
            available: manifest.variant_names(),
        })
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

/// The names of a graph's inputs or outputs, for an error that says what
/// the file has instead.
fn outlet_names(model: &InferenceModel, outlets: TractResult<&[OutletId]>) -> Vec<String> {
    outlets
        .map(|outlets| {
            outlets
                .iter()
                .map(|outlet| {
                    model
                        .outlet_label(*outlet)
                        .unwrap_or(&model.nodes()[outlet.node].name)
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Drops the shapes the file declares for its computed tensors (ONNX
/// `value_info` and outputs, written for batch 1), keeping their types, so
/// that a batch plan's shapes are inferred from its input alone.
fn forget_declared_shapes(model: &mut InferenceModel) -> TractResult<()> {
    use tract_onnx::tract_hir::infer::{Factoid, ShapeFactoid};
    let inputs = model.input_outlets()?.to_vec();
    for node in 0..model.nodes().len() {
        for slot in 0..model.nodes()[node].outputs.len() {
            let outlet = OutletId::new(node, slot);
            let fact = model.outlet_fact(outlet)?;
            if inputs.contains(&outlet) || fact.value.concretize().is_some() {
                continue;
            }
            let mut fact = fact.clone();
            fact.shape = ShapeFactoid::default();
            model.set_outlet_fact(outlet, fact)?;
        }
    }
    Ok(())
}

/// What the manifest says of a tensor's shape.
enum Expected<'a> {
    /// Every dimension (the input's).
    Shape(&'a [usize]),
    /// The number of values (the output's `dim`).
    Len(usize),
}

/// Checks what the file declares for its input or output against the
/// manifest, where it declares anything (a symbolic batch is fine), and
/// returns the declared element type (f32 where the file leaves it open).
/// An fp16 variant may take and give f16 or f32 (Azure's export is f16
/// throughout); the others f32.
fn check_declared(
    fact: &InferenceFact,
    what: &str,
    name: &str,
    variant: &VariantSpec,
    expected: Expected,
) -> Result<DatumType, String> {
    use tract_onnx::prelude::tract_itertools::Itertools;
    use tract_onnx::tract_core::internal::DimLike;
    use tract_onnx::tract_hir::infer::Factoid;
    let allowed: &[DatumType] = match variant.precision {
        Precision::Fp16 => &[DatumType::F16, DatumType::F32],
        Precision::Fp32 | Precision::Int8 => &[DatumType::F32],
    };
    let declared_type = fact.datum_type.concretize();
    let dims: Vec<Option<usize>> = fact
        .shape
        .dims()
        .map(|d| d.concretize().and_then(|d| d.to_usize().ok()))
        .collect();
    let type_ok = declared_type.is_none_or(|t| allowed.contains(&t));
    let shape_ok = fact.shape.is_open()
        || match expected {
            Expected::Shape(shape) => {
                dims.len() == shape.len()
                    && dims
                        .iter()
                        .zip(shape)
                        .all(|(d, e)| d.is_none_or(|d| d == *e))
            }
            Expected::Len(len) => {
                dims.iter().any(Option::is_none) || dims.iter().flatten().product::<usize>() == len
            }
        };
    if type_ok && shape_ok {
        return Ok(declared_type.unwrap_or(DatumType::F32));
    }
    let found_type = declared_type.map_or("?".to_string(), |t| format!("{t:?}"));
    let found_shape = dims
        .iter()
        .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
        .join(", ");
    let expected_type = allowed.iter().map(|t| format!("{t:?}")).join(" or ");
    let expected_shape = match expected {
        Expected::Shape(shape) => format!("[{}]", shape.iter().join(", ")),
        Expected::Len(len) => format!("{len} values"),
    };
    Err(format!(
        "{what} {name:?} is {found_type} [{found_shape}]; the manifest (variant {}, precision {:?}) expects {expected_type} {expected_shape}",
        variant.name, variant.precision
    ))
}

/// tract's executor for `threads` matrix-product threads: a pool of its own
/// for more than one, none (the caller's thread) for one.
pub fn executor_for(threads: usize) -> Option<tract_linalg::multithread::Executor> {
    if threads > 1 {
        Some(tract_linalg::multithread::Executor::multithread(threads))
    } else {
        None
    }
}

/// Runs `run` (a run of a plan made with `executor`) on that executor's
/// pool if it has one, else on this thread.
///
/// Why: started on a pool thread, each parallel op of the run is split
/// between that thread and the others by work stealing, where a run on the
/// caller's thread hands every op to the pool and sleeps until it is woken,
/// once per op (an int8 plan of 2 threads ran slower than one that way:
/// docs/benchmarks.md). Two runs must not share a pool at once (see
/// [`Encoder::run_tensor`]).
pub fn on_plan_pool<R: Send>(
    executor: Option<&tract_linalg::multithread::Executor>,
    run: impl FnOnce() -> R + Send,
) -> R {
    match executor {
        Some(tract_linalg::multithread::Executor::MultiThread(pool)) => pool.install(run),
        _ => run(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(int8_calibration: &str) -> EncoderManifest {
        let digest = "0".repeat(64);
        let text = format!(
            r#"format = 1
model_id = "test-encoder"
license = "MIT"
[source]
registry = "pypi"
package = "test"
version = "1"
sha256 = "{digest}"
[input]
name = "image"
layout = "NCHW"
height = 8
width = 8
channel_order = "RGB"
resize = "bilinear"
pixel_scale = 1.0
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
[output]
name = "embedding"
dim = 4
[[variant]]
name = "fp32"
file = "fp32.onnx"
precision = "fp32"
sha256 = "{digest}"
[[variant]]
name = "int8"
file = "int8.onnx"
precision = "int8"
calibration = "{int8_calibration}"
sha256 = "{digest}"
"#
        );
        EncoderManifest::parse(&text, Path::new("manifest.toml")).unwrap()
    }

    #[test]
    fn int8_is_the_default_only_with_dot_product_instructions() {
        let bundle = manifest("derm");
        let (chosen, reason) = default_variant(&bundle, Some("avx512vnni")).unwrap();
        assert_eq!(chosen.name, "int8", "{reason}");
        let (chosen, reason) = default_variant(&bundle, Some("dotprod")).unwrap();
        assert_eq!(chosen.name, "int8", "{reason}");
        let (chosen, reason) = default_variant(&bundle, None).unwrap();
        assert_eq!(chosen.name, "fp32");
        assert!(reason.contains("fp32 is the faster"), "{reason}");
    }

    #[test]
    fn an_int8_calibrated_on_synthetic_images_is_never_the_default() {
        let bundle = manifest("synthetic");
        let (chosen, reason) = default_variant(&bundle, Some("avx512vnni")).unwrap();
        assert_eq!(chosen.name, "fp32");
        assert!(reason.contains("no validated int8"), "{reason}");
    }

    #[test]
    fn a_named_variant_wins_over_the_cpu() {
        let bundle = manifest("derm");
        let (chosen, _) = select_variant(&bundle, &VariantChoice::Named("fp32".into())).unwrap();
        assert_eq!(chosen.name, "fp32");
        let err = select_variant(&bundle, &VariantChoice::Named("int4".into())).unwrap_err();
        assert!(err.to_string().contains("int4"), "{err}");
    }

    #[test]
    fn a_named_int8_is_refused_on_x86_without_a_dot_product_unless_allowed() {
        let bundle = manifest("derm");
        let int8 = bundle.variant("int8").unwrap();
        let fp32 = bundle.variant("fp32").unwrap();
        let err = refuse_slow_int8(int8, true, None, false).unwrap_err();
        assert!(matches!(err, EncoderError::SlowInt8 { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("--allow-slow-int8"), "{message}");
        assert!(message.contains("allow_slow_int8 = true"), "{message}");
        refuse_slow_int8(int8, true, None, true).unwrap();
        refuse_slow_int8(int8, true, Some("avx512vnni"), false).unwrap();
        refuse_slow_int8(int8, false, None, false).unwrap();
        refuse_slow_int8(fp32, true, None, false).unwrap();
    }
}
