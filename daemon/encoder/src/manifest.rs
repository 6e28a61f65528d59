//! The encoder bundle's `manifest.toml`: the contract between `models/` and the daemon.
//!
//! Any encoder that ships a manifest of this shape can be loaded (the sklesion
//! Xception today, MedImageInsight later): the daemon never hard-codes an input
//! size, a normalisation or an embedding dimension.

use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::preprocess_spec::PreprocessSpec;
use crate::EncoderError;

/// The manifest format this build understands.
pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderManifest {
    pub format: u32,
    /// Changes whenever weights or graph change; stored with every embedding so
    /// that vectors from two encoders are never compared.
    pub model_id: String,
    #[serde(default)]
    pub description: String,
    pub license: String,
    pub source: ModelSource,
    pub input: InputSpec,
    pub output: OutputSpec,
    #[serde(rename = "variant")]
    pub variants: Vec<VariantSpec>,
    #[serde(default)]
    pub validation: Option<toml::Table>,
    /// Colour constancy, framing and test-time augmentation before the
    /// resize (issue 17); absent: none of them, as every earlier bundle.
    #[serde(default)]
    pub preprocess: PreprocessSpec,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSource {
    pub registry: String,
    pub package: String,
    pub version: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub layout: TensorLayout,
    pub height: u32,
    pub width: u32,
    pub channel_order: ChannelOrder,
    pub resize: ResizeFilter,
    /// How an image of another aspect ratio meets the input's; absent in
    /// bundles written before MedImageInsight, which all stretch.
    #[serde(default)]
    pub crop: CropMode,
    /// Raw 0..255 pixel values are multiplied by this before normalisation.
    pub pixel_scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TensorLayout {
    #[serde(rename = "NCHW")]
    Nchw,
    #[serde(rename = "NHWC")]
    Nhwc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ChannelOrder {
    #[serde(rename = "RGB")]
    Rgb,
    #[serde(rename = "BGR")]
    Bgr,
}

/// How the whole image is stretched to the encoder's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    /// Triangle filter: Pillow's BILINEAR, which the build's calibration uses.
    Bilinear,
    Bicubic,
    Nearest,
}

/// What happens to an image whose aspect ratio is not the input's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    /// Stretch the whole image to the input size: what the default encoder's
    /// build does, and MedImageInsight's published `TEST.CENTER_CROP: false`.
    #[default]
    None,
    /// Cut the largest centred region of the input's aspect ratio, then resize.
    Center,
    /// Resize the whole image to fit inside the input, centred, and fill the
    /// rest with the mean colour: values that normalise to exactly 0.
    Pad,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub name: String,
    pub dim: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VariantSpec {
    pub name: String,
    pub file: String,
    pub precision: Precision,
    pub sha256: String,
    #[serde(default)]
    pub quantization: Option<String>,
    #[serde(default)]
    pub calibration: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// Half-precision weights (Azure's MedImageInsight export): run on tract's
    /// f16 kernels where the CPU has FP16 arithmetic, translated to f32 at
    /// load elsewhere.
    Fp16,
    Int8,
}

impl EncoderManifest {
    /// Reads and checks `manifest.toml` in `bundle_dir`.
    pub fn load(bundle_dir: &Path) -> Result<Self, EncoderError> {
        let path = bundle_dir.join("manifest.toml");
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                EncoderError::BundleMissing { path: path.clone() }
            } else {
                EncoderError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Self::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, EncoderError> {
        let manifest: EncoderManifest =
            toml::from_str(text).map_err(|source| EncoderError::ManifestSyntax {
                path: path.to_path_buf(),
                message: source.to_string(),
            })?;
        manifest.validate(path)?;
        Ok(manifest)
    }

    fn validate(&self, path: &Path) -> Result<(), EncoderError> {
        let invalid = |message: String| EncoderError::ManifestInvalid {
            path: path.to_path_buf(),
            message,
        };
        if self.format != MANIFEST_FORMAT {
            return Err(invalid(format!(
                "format {} is not supported by this daemon (it reads format {MANIFEST_FORMAT})",
                self.format
            )));
        }
        if self.model_id.trim().is_empty() {
            return Err(invalid("model_id is empty".into()));
        }
        let input = &self.input;
        if !(8..=4096).contains(&input.height) || !(8..=4096).contains(&input.width) {
            return Err(invalid(format!(
                "input size {}x{} is outside 8..=4096",
                input.width, input.height
            )));
        }
        if !(input.pixel_scale.is_finite() && input.pixel_scale > 0.0) {
            return Err(invalid(
                "input.pixel_scale must be a positive number".into(),
            ));
        }
        if input.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || input.mean.iter().any(|m| !m.is_finite())
        {
            return Err(invalid(
                "input.mean must be finite and input.std positive".into(),
            ));
        }
        self.preprocess.check(input).map_err(&invalid)?;
        if self.output.dim == 0 {
            return Err(invalid("output.dim is 0".into()));
        }
        if self.variants.is_empty() {
            return Err(invalid("no [[variant]] is listed".into()));
        }
        for variant in &self.variants {
            // One normal component: not absolute, and neither `.` nor `..`
            // (one component each, which would name the bundle folder or
            // the one above it).
            let mut parts = Path::new(&variant.file).components();
            let plain =
                matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none();
            if !plain {
                return Err(invalid(format!(
                    "variant {}: file {:?} must be a plain file name inside the bundle",
                    variant.name, variant.file
                )));
            }
            if variant.sha256.len() != 64 || hex::decode(&variant.sha256).is_err() {
                return Err(invalid(format!(
                    "variant {}: sha256 is not 64 hex digits",
                    variant.name
                )));
            }
        }
        Ok(())
    }

    pub fn variant(&self, name: &str) -> Option<&VariantSpec> {
        self.variants.iter().find(|v| v.name == name)
    }

    pub fn variant_path(&self, bundle_dir: &Path, variant: &VariantSpec) -> PathBuf {
        bundle_dir.join(&variant.file)
    }

    pub fn variant_names(&self) -> Vec<String> {
        self.variants.iter().map(|v| v.name.clone()).collect()
    }
}
