//! Reading a labels file (`image,label,lesion_id,dx_type,age,sex,anatom_site`).
//!
//! One bad row never stops the others: each is either accepted or rejected
//! with a reason that names its line, so a clinic's IT person can fix the
//! file and rerun.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context};
use dermascope_store::{CaseId, Diagnosis, Sex};

/// A row that passed every check the file alone allows.
#[derive(Debug, Clone)]
pub struct LabelledImage {
    /// 1-based line in the file (the header is line 1).
    pub line: usize,
    pub image: String,
    pub case_id: CaseId,
    pub diagnosis: Diagnosis,
    pub lesion_id: Option<String>,
    pub dx_type: Option<String>,
    pub age_years: Option<u16>,
    pub sex: Option<Sex>,
    pub anatomical_site: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RejectedRow {
    pub line: usize,
    pub image: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct LabelsFile {
    pub rows: Vec<LabelledImage>,
    pub rejected: Vec<RejectedRow>,
}

const REQUIRED: [&str; 2] = ["image", "label"];
/// Start of the rejection reason for a label outside the known diagnoses,
/// which training and evaluation refuse outright (see `RejectedRow::is_unknown_label`).
const UNKNOWN_LABEL: &str = "unknown label";

impl RejectedRow {
    /// Whether the row was refused for its diagnosis label alone.
    pub fn is_unknown_label(&self) -> bool {
        self.reason.starts_with(UNKNOWN_LABEL)
    }
}

pub fn read_labels(path: &Path) -> anyhow::Result<LabelsFile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        bail!(
            "{} is UTF-16 encoded: save it as UTF-8 (CSV UTF-8 in a spreadsheet program)",
            path.display()
        );
    }
    let body = bytes.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(&bytes);
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(body);
    let header = reader
        .byte_headers()
        .with_context(|| format!("reading the header of {}", path.display()))?
        .clone();
    let columns: Vec<String> = header
        .iter()
        .map(|h| String::from_utf8_lossy(h).to_ascii_lowercase())
        .collect();
    let column = |name: &str| columns.iter().position(|c| c == name);
    let missing: Vec<&str> = REQUIRED
        .iter()
        .copied()
        .filter(|c| column(c).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} lacks the column(s) {}: the header must name at least image,label \
             (and lesion_id, dx_type, age, sex, anatom_site where known); it has {:?}",
            path.display(),
            missing.join(", "),
            columns
        );
    }
    let image_col = column("image").unwrap_or(0);
    let label_col = column("label").unwrap_or(1);
    let lesion_col = column("lesion_id");
    let dx_col = column("dx_type");
    let age_col = column("age");
    let sex_col = column("sex");
    let site_col = column("anatom_site").or_else(|| column("localization"));

    let mut out = LabelsFile::default();
    let mut seen = HashSet::new();
    for (index, record) in reader.byte_records().enumerate() {
        let line = index + 2;
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                out.rejected.push(RejectedRow {
                    line,
                    image: String::new(),
                    reason: format!("unreadable CSV row: {error}"),
                });
                continue;
            }
        };
        let field = |col: Option<usize>| -> Result<Option<String>, String> {
            match col.and_then(|c| record.get(c)) {
                None => Ok(None),
                Some(raw) => match std::str::from_utf8(raw) {
                    Ok("") => Ok(None),
                    Ok(text) => Ok(Some(text.to_string())),
                    Err(_) => Err(
                        "the row is not valid UTF-8 (is the file Latin-1? save it as UTF-8)".into(),
                    ),
                },
            }
        };
        let image = field(Some(image_col)).ok().flatten().unwrap_or_default();
        let parsed = (|| -> Result<LabelledImage, String> {
            let image = field(Some(image_col))?.ok_or("the image column is empty")?;
            let label = field(Some(label_col))?.ok_or("the label column is empty")?;
            let diagnosis = Diagnosis::from_code(&label.to_ascii_lowercase()).map_err(|_| {
                format!(
                    "{UNKNOWN_LABEL} {label:?} (known: {})",
                    Diagnosis::ham10000_codes().collect::<Vec<_>>().join(", ")
                )
            })?;
            let stem = Path::new(&image)
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or("the image name has no file stem")?;
            let case_id = CaseId::new(stem).map_err(|e| format!("bad case id: {e}"))?;
            let age_years = match field(age_col)? {
                None => None,
                Some(age) => Some(
                    age.parse::<f64>()
                        .ok()
                        .filter(|a| (0.0..=130.0).contains(a))
                        .map(|a| a.round() as u16)
                        .ok_or_else(|| format!("age {age:?} is not a number of years"))?,
                ),
            };
            let sex = match field(sex_col)?
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                None | Some("unknown") => None,
                Some("male") | Some("m") => Some(Sex::Male),
                Some("female") | Some("f") => Some(Sex::Female),
                Some("other") => Some(Sex::Other),
                Some(other) => {
                    return Err(format!(
                        "sex {other:?} is not male, female, other or unknown"
                    ))
                }
            };
            let anatomical_site = field(site_col)?.filter(|s| s != "unknown");
            Ok(LabelledImage {
                line,
                image,
                case_id,
                diagnosis,
                lesion_id: field(lesion_col)?,
                dx_type: field(dx_col)?,
                age_years,
                sex,
                anatomical_site,
            })
        })();
        match parsed {
            Ok(row) if !seen.insert(row.case_id.clone()) => out.rejected.push(RejectedRow {
                line,
                image,
                reason: format!("duplicate case id {}", row.case_id.as_str()),
            }),
            Ok(row) => out.rows.push(row),
            Err(reason) => out.rejected.push(RejectedRow {
                line,
                image,
                reason,
            }),
        }
    }
    Ok(out)
}
