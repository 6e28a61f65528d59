//! Reading a labels file (`image,label,lesion_id,dx_type,age,sex,anatom_site`).
//!
//! One bad row never stops the others: each is either accepted or rejected
//! with a reason that names its line, so a clinic's IT person can fix the
//! file and rerun.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use dermascope_store::{CaseId, Diagnosis, Sex, MAX_SITE_BYTES};
use thiserror::Error;

/// Why a labels file as a whole cannot be read (a bad row is a
/// [`RejectedRow`], never this).
#[derive(Debug, Error)]
pub enum LabelsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is UTF-16 encoded: save it as UTF-8 (CSV UTF-8 in a spreadsheet program)")]
    Utf16 { path: PathBuf },
    #[error("reading the header of {path}: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    #[error(
        "{path} lacks the column(s) {missing}: the header must name at least image,label \
         (and lesion_id, dx_type, age, sex, anatom_site where known); it has {columns:?}"
    )]
    MissingColumns {
        path: PathBuf,
        missing: String,
        columns: Vec<String>,
    },
}

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

/// Longest field accepted in a labels file: the store's limit on sites and
/// lesion ids, checked per row so one overlong field refuses its row alone,
/// not the batch it would have been written in.
const MAX_FIELD_BYTES: usize = MAX_SITE_BYTES;

pub fn read_labels(path: &Path) -> Result<LabelsFile, LabelsError> {
    let bytes = std::fs::read(path).map_err(|source| LabelsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_labels(&bytes, path)
}

/// [`read_labels`] on the file's bytes; `path` only names the file in errors.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<LabelsFile, LabelsError> {
    if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
        return Err(LabelsError::Utf16 {
            path: path.to_path_buf(),
        });
    }
    let body = bytes.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(body);
    let header = reader
        .byte_headers()
        .map_err(|source| LabelsError::Header {
            path: path.to_path_buf(),
            source,
        })?
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
        return Err(LabelsError::MissingColumns {
            path: path.to_path_buf(),
            missing: missing.join(", "),
            columns,
        });
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
                Some(raw) if raw.len() > MAX_FIELD_BYTES => Err(format!(
                    "a field is {} bytes; at most {MAX_FIELD_BYTES} are accepted",
                    raw.len()
                )),
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
            plain_file_name(&image)?;
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

/// An image column names a file inside the images folder and nothing else:
/// an absolute path or `..` would let a labels file read any file the user
/// can read.
fn plain_file_name(image: &str) -> Result<(), String> {
    let mut components = Path::new(image).components();
    match (components.next(), components.next()) {
        (Some(std::path::Component::Normal(_)), None) if !image.contains('\\') => Ok(()),
        _ => Err(format!(
            "image {image:?} is not a plain file name inside the images folder"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(csv: &str) -> LabelsFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.csv");
        std::fs::write(&path, csv).unwrap();
        read_labels(&path).unwrap()
    }

    #[test]
    fn paths_outside_the_images_folder_are_refused_row_by_row() {
        let file = read(
            "image,label\nok.jpg,nv\n/etc/passwd,nv\n../secret.jpg,mel\nsub/dir.jpg,nv\n..,nv\n",
        );
        assert_eq!(file.rows.len(), 1);
        assert_eq!(file.rows[0].image, "ok.jpg");
        assert_eq!(file.rejected.len(), 4);
        for row in &file.rejected {
            assert!(row.reason.contains("plain file name"), "{row:?}");
        }
    }

    #[test]
    fn an_overlong_field_refuses_its_row_only() {
        let site = "x".repeat(2000);
        let lesion = "L".repeat(2000);
        let file = read(&format!(
            "image,label,lesion_id,anatom_site\na.jpg,nv,L1,{site}\nb.jpg,nv,{lesion},back\nc.jpg,mel,L3,back\n"
        ));
        assert_eq!(file.rows.len(), 1);
        assert_eq!(file.rows[0].image, "c.jpg");
        assert_eq!(
            file.rejected.iter().map(|r| r.line).collect::<Vec<_>>(),
            [2, 3]
        );
        assert!(
            file.rejected[0].reason.contains("2000 bytes"),
            "{:?}",
            file.rejected
        );
    }
}
