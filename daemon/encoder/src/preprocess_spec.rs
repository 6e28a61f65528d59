//! Which camera-independent steps run before the resize: the manifest's
//! optional `[preprocess]` table (issue 17).
//!
//! A library embedded with one preprocessing must never be searched with
//! queries embedded with another: the vectors would disagree as much as two
//! encoders' do. So any non-default preprocessing becomes part of the model
//! id the store records ([`PreprocessSpec::model_id`]), and the store refuses
//! a mismatch with its reembed hint, exactly as for another model.
//!
//! ```toml
//! [preprocess]
//! colour_constancy = "shades-of-gray"   # or "none" (default)
//! frame = "lesion"                      # or "whole" (default)
//! tta = 4                               # 1 (default), 2, 4 or 8
//! ```

use serde::Deserialize;

use crate::manifest::InputSpec;

/// The environment variable that overrides the bundle's `[preprocess]`
/// without editing it, so `dermascope eval` can measure each setting, e.g.
/// `DERMASCOPE_PREPROCESS=shades-of-gray,lesion,tta4`. The override enters
/// the model id like the manifest's own table would.
pub const PREPROCESS_ENV: &str = "DERMASCOPE_PREPROCESS";

/// Colour constancy applied to the RGB image before anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColourConstancy {
    /// The camera's colours as they are: every bundle before issue 17.
    #[default]
    None,
    /// Shades of Gray (Finlayson and Trezzi 2004) with Minkowski p = 6, the
    /// ISIC-challenge standard; the dark vignette is left out of the
    /// statistics.
    ShadesOfGray,
}

/// Which part of the photograph is embedded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// The whole image: every bundle before issue 17.
    #[default]
    Whole,
    /// The lesion's bounding box with a margin, grown to the image's aspect
    /// ratio, inside the dermatoscope's field of view; the whole image when
    /// no lesion stands out.
    Lesion,
}

/// The manifest's `[preprocess]` table; every field defaults to today's
/// behaviour, so a bundle without it embeds exactly as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreprocessSpec {
    pub colour_constancy: ColourConstancy,
    pub frame: Framing,
    /// Test-time augmentation: how many of the image's flips and 90°
    /// rotations are embedded and averaged (1, 2, 4 or 8).
    pub tta: u8,
}

impl Default for PreprocessSpec {
    fn default() -> Self {
        PreprocessSpec {
            colour_constancy: ColourConstancy::None,
            frame: Framing::Whole,
            tta: 1,
        }
    }
}

/// The counts [`PreprocessSpec::tta`] may take: 2 adds the mirror image, 4
/// both flips and the half turn, 8 the whole symmetry group of the square.
pub const TTA_COUNTS: [u8; 4] = [1, 2, 4, 8];

impl PreprocessSpec {
    pub fn is_default(&self) -> bool {
        *self == PreprocessSpec::default()
    }

    /// The steps as the override's syntax writes them, e.g.
    /// `shades-of-gray,lesion,tta4`; `none` for the default.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.colour_constancy == ColourConstancy::ShadesOfGray {
            parts.push("shades-of-gray".to_string());
        }
        if self.frame == Framing::Lesion {
            parts.push("lesion".to_string());
        }
        if self.tta != 1 {
            parts.push(format!("tta{}", self.tta));
        }
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(",")
        }
    }

    /// The model id embeddings made with this preprocessing carry: the
    /// manifest's own for the default (stores embedded before issue 17 stay
    /// valid), else the manifest's plus one `+step` per non-default step.
    pub fn model_id(&self, manifest_model_id: &str) -> String {
        if self.is_default() {
            manifest_model_id.to_string()
        } else {
            let steps = self.describe().replace(',', "+");
            format!("{manifest_model_id}+{steps}")
        }
    }

    /// Parses the override's syntax: steps separated by commas, in any
    /// order, each named once: `shades-of-gray` (or `sog`), `lesion`,
    /// `whole`, `tta1`..`tta8`; `none` alone is the default.
    pub fn parse_list(text: &str) -> Result<PreprocessSpec, String> {
        let mut spec = PreprocessSpec::default();
        let (mut colour, mut frame, mut tta) = (false, false, false);
        let text = text.trim();
        if text.is_empty() || text == "none" {
            return Ok(spec);
        }
        for part in text.split(',').map(str::trim) {
            let once = |seen: &mut bool| {
                if std::mem::replace(seen, true) {
                    Err(format!("{part:?}: that step is named twice"))
                } else {
                    Ok(())
                }
            };
            match part {
                "shades-of-gray" | "sog" => {
                    once(&mut colour)?;
                    spec.colour_constancy = ColourConstancy::ShadesOfGray;
                }
                "lesion" | "whole" => {
                    once(&mut frame)?;
                    spec.frame = if part == "lesion" {
                        Framing::Lesion
                    } else {
                        Framing::Whole
                    };
                }
                _ => match part.strip_prefix("tta").map(str::parse::<u8>) {
                    Some(Ok(count)) if TTA_COUNTS.contains(&count) => {
                        once(&mut tta)?;
                        spec.tta = count;
                    }
                    _ => {
                        return Err(format!(
                            "{part:?} is not a step: use shades-of-gray, lesion, whole, \
                             tta1, tta2, tta4 or tta8, separated by commas (or none)"
                        ))
                    }
                },
            }
        }
        Ok(spec)
    }

    /// Checks the table against the input it feeds.
    pub fn check(&self, input: &InputSpec) -> Result<(), String> {
        if !TTA_COUNTS.contains(&self.tta) {
            return Err(format!(
                "preprocess.tta = {} is not one of {TTA_COUNTS:?}",
                self.tta
            ));
        }
        // Quarter turns are taken on the input tensor, which only a square
        // input maps onto itself.
        if self.tta == 8 && input.width != input.height {
            return Err(format!(
                "preprocess.tta = 8 rotates the input by quarter turns, which needs a square \
                 input (this one is {}x{}); use 4",
                input.width, input.height
            ));
        }
        Ok(())
    }
}
