//! A confirmed (or pending) case: one lesion photograph, its embedding and its diagnosis.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest id we accept: ids are sled keys and are shown in the UI, so a
/// runaway string is a caller bug, not a case.
pub const MAX_CASE_ID_BYTES: usize = 256;
/// Diagnosis codes are stored with a one-byte length in the embedding tree.
pub const MAX_DIAGNOSIS_CODE_BYTES: usize = 64;
/// Anatomical sites are stored with a two-byte length in the embedding tree.
pub const MAX_SITE_BYTES: usize = 1024;
/// Largest original photograph kept with a case, in bytes. A 12 MP camera
/// frame is about 2-4 MB as JPEG at quality 90; more is not a photograph of
/// one lesion but a bug or an attack on the device's storage.
pub const MAX_ORIGINAL_BYTES: usize = 8 << 20;
/// Largest original photograph kept with a case, in pixels (4096 x 3072):
/// enough for any dermatoscope camera module, and what a 480 px encoder such
/// as MedImageInsight needs is far below it.
pub const MAX_ORIGINAL_PIXELS: u64 = 4096 * 3072;
/// Device ids are shown in the fleet's tools and sent with every upload.
pub const MAX_DEVICE_ID_BYTES: usize = 128;

/// Why a case (or one of its parts) was refused before anything was written.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CaseError {
    #[error("case id is empty")]
    EmptyId,
    #[error("case id is {len} bytes; at most {MAX_CASE_ID_BYTES} are allowed")]
    IdTooLong { len: usize },
    #[error("case id contains a control character")]
    IdControlChar,
    #[error("unknown HAM10000 diagnosis code {code:?} (known: akiec, bcc, bkl, df, mel, nv, vasc); use Diagnosis::new for other codes")]
    UnknownDiagnosis { code: String },
    #[error("diagnosis code must be 1..={MAX_DIAGNOSIS_CODE_BYTES} bytes without control characters, got {code:?}")]
    InvalidDiagnosisCode { code: String },
    #[error("anatomical site is {len} bytes; at most {MAX_SITE_BYTES} are allowed")]
    SiteTooLong { len: usize },
    #[error("lesion id is {len} bytes; at most {MAX_SITE_BYTES} are allowed")]
    LesionIdTooLong { len: usize },
    #[error("embedding has {found} dimensions; this store expects {expected}")]
    DimMismatch { expected: usize, found: usize },
    #[error("embedding component {index} is not finite")]
    NonFinite { index: usize },
    #[error("device id must be 1..={MAX_DEVICE_ID_BYTES} bytes without control characters")]
    InvalidDeviceId,
    #[error("case revision must be at least 1, got 0")]
    ZeroRevision,
    #[error("original photograph is not a readable JPEG: {reason}")]
    OriginalNotJpeg { reason: String },
    #[error(
        "original photograph is {bytes} bytes ({width}x{height}); at most {MAX_ORIGINAL_BYTES} \
         bytes and {MAX_ORIGINAL_PIXELS} pixels are kept"
    )]
    OriginalTooLarge {
        bytes: usize,
        width: u32,
        height: u32,
    },
    #[error("Fitzpatrick skin type must be 1..=6, got {0}")]
    FitzpatrickOutOfRange(u8),
    #[error(
        "case was embedded by model {case_model:?}; this store holds embeddings of {store_model:?}"
    )]
    ModelMismatch {
        case_model: String,
        store_model: String,
    },
}

/// Stable identifier of a case: a reference library's image name (such as
/// `ISIC_0024306`) or, for every case a device creates, a UUIDv7 from
/// [`CaseId::generate`], unique across a fleet. Ordered bytewise, like sled keys.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CaseId(String);

impl CaseId {
    pub fn new(id: impl Into<String>) -> Result<Self, CaseError> {
        let id = id.into();
        if id.is_empty() {
            return Err(CaseError::EmptyId);
        }
        if id.len() > MAX_CASE_ID_BYTES {
            return Err(CaseError::IdTooLong { len: id.len() });
        }
        if id.chars().any(char::is_control) {
            return Err(CaseError::IdControlChar);
        }
        Ok(Self(id))
    }

    /// A new id, unique across devices and clock steps: UUIDv7 is 48 bits of
    /// wall-clock milliseconds and 74 random bits, so two devices capturing
    /// in the same millisecond, or one whose clock stepped back (a Pi has no
    /// real-time clock), still get different ids; ids of one device sort
    /// roughly by capture time.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().hyphenated().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What a log line names a case by: a short checksum of the id, stable
    /// across runs. Reference ids are often file names, and a clinic's file
    /// names can hold patient names, so ids themselves are never logged.
    pub fn log_tag(&self) -> String {
        log_tag_of(&self.0)
    }
}

impl TryFrom<String> for CaseId {
    type Error = CaseError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<CaseId> for String {
    fn from(id: CaseId) -> Self {
        id.0
    }
}

impl fmt::Display for CaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaseId({:?})", self.0)
    }
}

/// The HAM10000 diagnosis classes and how they are shown to a clinician.
const HAM10000: [(&str, &str); 7] = [
    (
        "akiec",
        "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    ),
    ("bcc", "Basal cell carcinoma"),
    ("bkl", "Benign keratosis-like lesion"),
    ("df", "Dermatofibroma"),
    ("mel", "Melanoma"),
    ("nv", "Melanocytic nevus"),
    ("vasc", "Vascular lesion"),
];

/// A diagnosis: a short machine code (used by filters and counts) and the
/// name shown to the clinician.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Diagnosis {
    pub code: String,
    pub display_name: String,
}

impl Diagnosis {
    /// One of the seven HAM10000 classes, by its code (`mel`, `nv`, ...).
    pub fn from_code(code: &str) -> Result<Self, CaseError> {
        HAM10000
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(c, name)| Self {
                code: (*c).to_owned(),
                display_name: (*name).to_owned(),
            })
            .ok_or_else(|| CaseError::UnknownDiagnosis {
                code: code.to_owned(),
            })
    }

    /// Any other diagnosis (e.g. from a clinic's own taxonomy).
    pub fn new(
        code: impl Into<String>,
        display_name: impl Into<String>,
    ) -> Result<Self, CaseError> {
        let diagnosis = Self {
            code: code.into(),
            display_name: display_name.into(),
        };
        diagnosis.validate()?;
        Ok(diagnosis)
    }

    /// The HAM10000 codes, in their usual order.
    pub fn ham10000_codes() -> impl Iterator<Item = &'static str> {
        HAM10000.iter().map(|(c, _)| *c)
    }

    pub(crate) fn validate(&self) -> Result<(), CaseError> {
        let ok = !self.code.is_empty()
            && self.code.len() <= MAX_DIAGNOSIS_CODE_BYTES
            && !self.code.chars().any(char::is_control);
        if ok {
            Ok(())
        } else {
            Err(CaseError::InvalidDiagnosisCode {
                code: self.code.clone(),
            })
        }
    }
}

/// Where a case came from; results can be restricted by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CaseSource {
    /// Shipped reference library (e.g. HAM10000).
    Reference,
    /// Captured on this device.
    Captured,
    /// Shared by another device of the same clinic.
    Fleet,
}

impl CaseSource {
    pub const ALL: [CaseSource; 3] = [
        CaseSource::Reference,
        CaseSource::Captured,
        CaseSource::Fleet,
    ];

    pub(crate) fn to_byte(self) -> u8 {
        match self {
            CaseSource::Reference => 0,
            CaseSource::Captured => 1,
            CaseSource::Fleet => 2,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(CaseSource::Reference),
            1 => Some(CaseSource::Captured),
            2 => Some(CaseSource::Fleet),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sex {
    Female,
    Male,
    Other,
}

/// Optional clinical context. `note` is free text and is patient data: it is
/// never logged (its `Debug` says only whether there is one).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseMetadata {
    pub age_years: Option<u16>,
    pub sex: Option<Sex>,
    pub anatomical_site: Option<String>,
    /// Fitzpatrick skin type, 1..=6.
    pub fitzpatrick_type: Option<u8>,
    pub note: Option<String>,
    /// The lesion this photograph shows (several photographs, e.g. at
    /// follow-ups, can show one lesion): evaluations and adapter training
    /// split by it so that no lesion is on both sides.
    pub lesion_id: Option<String>,
}

// Hand-written so that a stray `{:?}` cannot print the note, or a lesion id
// (a clinic's, like a case id, may hold a patient's name).
impl fmt::Debug for CaseMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |present: bool| if present { "Some(<hidden>)" } else { "None" };
        f.debug_struct("CaseMetadata")
            .field("age_years", &self.age_years)
            .field("sex", &self.sex)
            .field("anatomical_site", &self.anatomical_site)
            .field("fitzpatrick_type", &self.fitzpatrick_type)
            .field("note", &format_args!("{}", hidden(self.note.is_some())))
            .field(
                "lesion_id",
                &format_args!(
                    "{}",
                    self.lesion_id
                        .as_deref()
                        .map_or("None".to_string(), |l| format!("tag {}", log_tag_of(l)))
                ),
            )
            .finish()
    }
}

/// One case of the library.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub id: CaseId,
    /// L2-normalised by the encoder; the store checks dimension and finiteness only.
    pub embedding: Vec<f32>,
    pub diagnosis: Diagnosis,
    pub source: CaseSource,
    pub metadata: CaseMetadata,
    pub thumbnail_jpeg: Vec<u8>,
    /// Encoder that produced `embedding`; must match the store's.
    pub model_id: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Whether the diagnosis is confirmed (histopathology or expert consensus).
    pub label_confirmed: bool,
    /// The device that created the case; `None` for reference library cases.
    pub device_id: Option<String>,
    /// 1 when created; [`crate::CaseStore::update`] stores every change
    /// (re-labelling, confirmation) as the next revision, so that the fleet
    /// service keeps the newest and an upload acknowledged for revision 3
    /// does not clear revision 4 from the outbox.
    pub revision: u64,
}

// Hand-written so that a stray `{:?}` in a log line cannot leak the note or
// the photograph.
impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case")
            .field("id", &self.id)
            .field("dim", &self.embedding.len())
            .field("diagnosis", &self.diagnosis.code)
            .field("source", &self.source)
            .field("model_id", &self.model_id)
            .field("thumbnail_bytes", &self.thumbnail_jpeg.len())
            .field("label_confirmed", &self.label_confirmed)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl Case {
    /// Checks everything the store relies on; `model_id`/`dim` are the store's.
    pub fn validate(&self, model_id: &str, dim: usize) -> Result<(), CaseError> {
        // Ids can arrive through deserialisation, which re-runs CaseId::new,
        // but a caller may also have built one before limits changed.
        CaseId::new(self.id.as_str())?;
        if self.model_id != model_id {
            return Err(CaseError::ModelMismatch {
                case_model: self.model_id.clone(),
                store_model: model_id.to_owned(),
            });
        }
        validate_embedding(&self.embedding, dim)?;
        self.diagnosis.validate()?;
        if let Some(site) = &self.metadata.anatomical_site {
            if site.len() > MAX_SITE_BYTES {
                return Err(CaseError::SiteTooLong { len: site.len() });
            }
        }
        if let Some(lesion) = &self.metadata.lesion_id {
            if lesion.len() > MAX_SITE_BYTES {
                return Err(CaseError::LesionIdTooLong { len: lesion.len() });
            }
        }
        if self.revision == 0 {
            return Err(CaseError::ZeroRevision);
        }
        if let Some(device) = &self.device_id {
            validate_device_id(device)?;
        }
        if let Some(t) = self.metadata.fitzpatrick_type {
            if !(1..=6).contains(&t) {
                return Err(CaseError::FitzpatrickOutOfRange(t));
            }
        }
        Ok(())
    }
}

pub(crate) fn validate_device_id(device: &str) -> Result<(), CaseError> {
    let ok = !device.is_empty()
        && device.len() <= MAX_DEVICE_ID_BYTES
        && !device.chars().any(char::is_control);
    ok.then_some(()).ok_or(CaseError::InvalidDeviceId)
}

/// The photograph a case was made from, as JPEG, checked against the caps
/// ([`MAX_ORIGINAL_BYTES`], [`MAX_ORIGINAL_PIXELS`]) from its header alone.
/// It is what another encoder re-embeds and what a vision-language model is
/// shown, so it is kept apart from the 96 px thumbnail.
#[derive(Clone, PartialEq, Eq)]
pub struct OriginalPhoto {
    jpeg: Vec<u8>,
    width: u32,
    height: u32,
}

impl OriginalPhoto {
    pub fn from_jpeg(jpeg: Vec<u8>) -> Result<Self, CaseError> {
        let not_jpeg = |reason: String| CaseError::OriginalNotJpeg { reason };
        let reader = image::ImageReader::with_format(
            std::io::Cursor::new(jpeg.as_slice()),
            image::ImageFormat::Jpeg,
        );
        let (width, height) = reader
            .into_dimensions()
            .map_err(|e| not_jpeg(e.to_string()))?;
        if jpeg.len() > MAX_ORIGINAL_BYTES
            || u64::from(width) * u64::from(height) > MAX_ORIGINAL_PIXELS
        {
            return Err(CaseError::OriginalTooLarge {
                bytes: jpeg.len(),
                width,
                height,
            });
        }
        Ok(Self {
            jpeg,
            width,
            height,
        })
    }

    pub fn jpeg(&self) -> &[u8] {
        &self.jpeg
    }

    pub fn into_jpeg(self) -> Vec<u8> {
        self.jpeg
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }
}

// A photograph is patient data: Debug shows its size only.
impl fmt::Debug for OriginalPhoto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OriginalPhoto")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("bytes", &self.jpeg.len())
            .finish()
    }
}

/// [`CaseId::log_tag`] of a key that may not even be a valid id.
pub(crate) fn log_tag_of(id: &str) -> String {
    format!("{:08x}", crc32fast::hash(id.as_bytes()))
}

/// Milliseconds since the Unix epoch, for `created_at_ms`/`updated_at_ms`.
/// A clock before 1970 (a Pi without network time can start there) gives 0:
/// timestamps are for people; nothing orders or identifies cases by them.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Dimension and finiteness; shared by cases, index rows and queries.
pub(crate) fn validate_embedding(embedding: &[f32], dim: usize) -> Result<(), CaseError> {
    if embedding.len() != dim {
        return Err(CaseError::DimMismatch {
            expected: dim,
            found: embedding.len(),
        });
    }
    if let Some(index) = embedding.iter().position(|x| !x.is_finite()) {
        return Err(CaseError::NonFinite { index });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_debug_hides_the_note_and_the_lesion_id() {
        let metadata = CaseMetadata {
            age_years: Some(54),
            anatomical_site: Some("back".into()),
            note: Some("Mrs Jane Doe, follow up in March".into()),
            lesion_id: Some("doe_jane_lesion_2".into()),
            ..CaseMetadata::default()
        };
        let shown = format!("{metadata:?} {metadata:#?}");
        for secret in ["Jane", "Doe", "March", "doe_jane"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("note: Some(<hidden>)"), "{shown}");
        assert!(shown.contains(&log_tag_of("doe_jane_lesion_2")), "{shown}");
        assert!(shown.contains("age_years: Some(54)"), "{shown}");
        let empty = format!("{:?}", CaseMetadata::default());
        assert!(
            empty.contains("note: None") && empty.contains("lesion_id: None"),
            "{empty}"
        );
    }

    #[test]
    fn ham10000_codes_resolve_and_unknown_codes_fail() {
        assert_eq!(
            Diagnosis::from_code("mel").map(|d| d.display_name),
            Ok("Melanoma".to_owned())
        );
        assert_eq!(Diagnosis::ham10000_codes().count(), 7);
        for code in Diagnosis::ham10000_codes() {
            assert_eq!(
                Diagnosis::from_code(code).map(|d| d.code),
                Ok(code.to_owned())
            );
        }
        assert!(matches!(
            Diagnosis::from_code("melanoma"),
            Err(CaseError::UnknownDiagnosis { .. })
        ));
        assert!(Diagnosis::new("scc", "Squamous cell carcinoma").is_ok());
        assert!(Diagnosis::new("", "nothing").is_err());
    }

    #[test]
    fn case_ids_are_checked() {
        assert!(CaseId::new("ISIC_0024306").is_ok());
        assert_eq!(CaseId::new(""), Err(CaseError::EmptyId));
        assert_eq!(CaseId::new("a\nb"), Err(CaseError::IdControlChar));
        assert!(matches!(
            CaseId::new("x".repeat(MAX_CASE_ID_BYTES + 1)),
            Err(CaseError::IdTooLong { .. })
        ));
    }

    #[test]
    fn debug_output_hides_note_and_thumbnail() {
        let case = Case {
            id: CaseId::new("c1").unwrap(),
            embedding: vec![1.0],
            diagnosis: Diagnosis::from_code("nv").unwrap(),
            source: CaseSource::Captured,
            metadata: CaseMetadata {
                note: Some("patient-secret-note".into()),
                ..Default::default()
            },
            thumbnail_jpeg: vec![0xFF, 0xD8, 0xAB],
            model_id: "m".into(),
            created_at_ms: 1,
            updated_at_ms: 1,
            label_confirmed: true,
            device_id: None,
            revision: 1,
        };
        let shown = format!("{case:?}");
        assert!(!shown.contains("patient-secret-note"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }

    #[test]
    fn validation_rejects_bad_fields() {
        let mut case = Case {
            id: CaseId::new("c1").unwrap(),
            embedding: vec![0.6, 0.8],
            diagnosis: Diagnosis::from_code("nv").unwrap(),
            source: CaseSource::Captured,
            metadata: CaseMetadata::default(),
            thumbnail_jpeg: vec![],
            model_id: "m".into(),
            created_at_ms: 1,
            updated_at_ms: 1,
            label_confirmed: true,
            device_id: None,
            revision: 1,
        };
        assert_eq!(case.validate("m", 2), Ok(()));
        assert!(matches!(
            case.validate("other", 2),
            Err(CaseError::ModelMismatch { .. })
        ));
        assert_eq!(
            case.validate("m", 3),
            Err(CaseError::DimMismatch {
                expected: 3,
                found: 2
            })
        );
        case.revision = 0;
        assert_eq!(case.validate("m", 2), Err(CaseError::ZeroRevision));
        case.revision = 1;
        case.device_id = Some("dev\n1".into());
        assert_eq!(case.validate("m", 2), Err(CaseError::InvalidDeviceId));
        case.device_id = Some("0193a3c0-0000-7000-8000-00000000000d".into());
        assert_eq!(case.validate("m", 2), Ok(()));
        case.metadata.fitzpatrick_type = Some(7);
        assert_eq!(
            case.validate("m", 2),
            Err(CaseError::FitzpatrickOutOfRange(7))
        );
        case.metadata.fitzpatrick_type = Some(6);
        case.embedding[1] = f32::NAN;
        assert_eq!(
            case.validate("m", 2),
            Err(CaseError::NonFinite { index: 1 })
        );
    }
}
