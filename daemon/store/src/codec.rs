//! Byte layouts of the values in the `cases` and `embeddings` trees.
//!
//! Both start with a layout version byte and a CRC-32 of the rest, so a
//! garbled value is reported as corrupt instead of being decoded into a
//! plausible but wrong case.

use serde::{Deserialize, Serialize};

use crate::case::{Case, CaseId, CaseMetadata, CaseSource, Diagnosis};
use crate::index::CaseTags;

/// Layout 1 had no lesion id, layout 2 no device id or revision; both are
/// still read (as revision 1 of no device), never written.
const CASE_LAYOUT_V1: u8 = 1;
const CASE_LAYOUT_V2: u8 = 2;
const CASE_LAYOUT_V3: u8 = 3;
const EMBEDDING_LAYOUT_V1: u8 = 1;
const HEADER: usize = 5;

const FLAG_CONFIRMED: u8 = 1;
const FLAG_HAS_SITE: u8 = 2;

/// `CaseMetadata` as layout 1 stored it (postcard is not self-describing,
/// so the old shape must stay spelled out to stay readable).
#[derive(Deserialize)]
struct CaseMetadataV1 {
    age_years: Option<u16>,
    sex: Option<crate::case::Sex>,
    anatomical_site: Option<String>,
    fitzpatrick_type: Option<u8>,
    note: Option<String>,
}

#[derive(Deserialize)]
struct CaseRecordV1 {
    id: CaseId,
    diagnosis: Diagnosis,
    source: CaseSource,
    metadata: CaseMetadataV1,
    thumbnail_jpeg: Vec<u8>,
    model_id: String,
    created_at_ms: u64,
    updated_at_ms: u64,
    label_confirmed: bool,
}

/// Layout 2 (added `metadata.lesion_id`).
#[derive(Deserialize)]
struct CaseRecordV2 {
    id: CaseId,
    diagnosis: Diagnosis,
    source: CaseSource,
    metadata: CaseMetadata,
    thumbnail_jpeg: Vec<u8>,
    model_id: String,
    created_at_ms: u64,
    updated_at_ms: u64,
    label_confirmed: bool,
}

/// Everything of a case except the embedding, which lives only in the
/// embeddings tree (storing it twice would cost 8 KB per case at dim 2048),
/// and the original photograph, which lives in the originals tree so that
/// listing cases never reads megabytes. Layout 3 (adds device id, revision).
/// Also the decoded form of every layout (the caller adds the embedding).
#[derive(Serialize, Deserialize)]
pub(crate) struct CaseRecord {
    pub id: CaseId,
    pub diagnosis: Diagnosis,
    pub source: CaseSource,
    pub metadata: CaseMetadata,
    pub thumbnail_jpeg: Vec<u8>,
    pub model_id: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub label_confirmed: bool,
    pub device_id: Option<String>,
    pub revision: u64,
}

impl CaseRecord {
    pub fn into_case(self, embedding: Vec<f32>) -> Case {
        Case {
            id: self.id,
            embedding,
            diagnosis: self.diagnosis,
            source: self.source,
            metadata: self.metadata,
            thumbnail_jpeg: self.thumbnail_jpeg,
            model_id: self.model_id,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            label_confirmed: self.label_confirmed,
            device_id: self.device_id,
            revision: self.revision,
        }
    }
}

fn seal(version: u8, payload_len_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload_len_hint);
    out.push(version);
    out.extend_from_slice(&[0; 4]);
    write(&mut out);
    let crc = crc32fast::hash(&out[HEADER..]);
    out[1..HEADER].copy_from_slice(&crc.to_le_bytes());
    out
}

fn open(bytes: &[u8], version: u8) -> Result<&[u8], String> {
    if bytes.len() < HEADER {
        return Err(format!(
            "value is {} bytes, shorter than its header",
            bytes.len()
        ));
    }
    if bytes[0] != version {
        return Err(format!(
            "layout version {} (this build reads {version})",
            bytes[0]
        ));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let payload = &bytes[HEADER..];
    if crc32fast::hash(payload) != stored {
        return Err("checksum mismatch".to_owned());
    }
    Ok(payload)
}

pub(crate) fn encode_case(case: &Case) -> Result<Vec<u8>, String> {
    let record = CaseRecord {
        id: case.id.clone(),
        diagnosis: case.diagnosis.clone(),
        source: case.source,
        metadata: case.metadata.clone(),
        thumbnail_jpeg: case.thumbnail_jpeg.clone(),
        model_id: case.model_id.clone(),
        created_at_ms: case.created_at_ms,
        updated_at_ms: case.updated_at_ms,
        label_confirmed: case.label_confirmed,
        device_id: case.device_id.clone(),
        revision: case.revision,
    };
    let payload = postcard::to_stdvec(&record).map_err(|e| e.to_string())?;
    Ok(seal(CASE_LAYOUT_V3, payload.len(), |out| {
        out.extend_from_slice(&payload)
    }))
}

pub(crate) fn decode_case(bytes: &[u8]) -> Result<CaseRecord, String> {
    if bytes.first() == Some(&CASE_LAYOUT_V1) {
        let payload = open(bytes, CASE_LAYOUT_V1)?;
        let r: CaseRecordV1 = postcard::from_bytes(payload).map_err(|e| e.to_string())?;
        let m = r.metadata;
        return Ok(CaseRecord {
            id: r.id,
            diagnosis: r.diagnosis,
            source: r.source,
            metadata: CaseMetadata {
                age_years: m.age_years,
                sex: m.sex,
                anatomical_site: m.anatomical_site,
                fitzpatrick_type: m.fitzpatrick_type,
                note: m.note,
                lesion_id: None,
            },
            thumbnail_jpeg: r.thumbnail_jpeg,
            model_id: r.model_id,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            label_confirmed: r.label_confirmed,
            device_id: None,
            revision: 1,
        });
    }
    if bytes.first() == Some(&CASE_LAYOUT_V2) {
        let payload = open(bytes, CASE_LAYOUT_V2)?;
        let r: CaseRecordV2 = postcard::from_bytes(payload).map_err(|e| e.to_string())?;
        return Ok(CaseRecord {
            id: r.id,
            diagnosis: r.diagnosis,
            source: r.source,
            metadata: r.metadata,
            thumbnail_jpeg: r.thumbnail_jpeg,
            model_id: r.model_id,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            label_confirmed: r.label_confirmed,
            device_id: None,
            revision: 1,
        });
    }
    let payload = open(bytes, CASE_LAYOUT_V3)?;
    postcard::from_bytes(payload).map_err(|e| e.to_string())
}

const ORIGINAL_LAYOUT_V1: u8 = 1;

/// Original photograph value: the JPEG bytes under the common header, so a
/// garbled photograph is reported rather than handed to a decoder.
pub(crate) fn encode_original(jpeg: &[u8]) -> Vec<u8> {
    seal(ORIGINAL_LAYOUT_V1, jpeg.len(), |out| {
        out.extend_from_slice(jpeg)
    })
}

pub(crate) fn decode_original(bytes: &[u8]) -> Result<&[u8], String> {
    open(bytes, ORIGINAL_LAYOUT_V1)
}

/// Outbox value: the revision awaiting upload. Format 2 stores wrote empty
/// values, which were always a case's first revision.
pub(crate) fn encode_outbox_revision(revision: u64) -> [u8; 8] {
    revision.to_le_bytes()
}

pub(crate) fn decode_outbox_revision(bytes: &[u8]) -> Result<u64, String> {
    if bytes.is_empty() {
        return Ok(1);
    }
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| format!("outbox value is {} bytes, not 8", bytes.len()))?;
    Ok(u64::from_le_bytes(bytes))
}

pub(crate) fn tags_of(case: &Case) -> CaseTags {
    CaseTags {
        diagnosis_code: case.diagnosis.code.clone(),
        source: case.source,
        anatomical_site: case.metadata.anatomical_site.clone(),
        label_confirmed: case.label_confirmed,
    }
}

/// Embedding row: the filter fields first, then the raw little-endian f32s,
/// so opening a store reads these without touching thumbnails.
/// Lengths were validated by `Case::validate` (code <= 64, site <= 1024).
pub(crate) fn encode_embedding(case: &Case) -> Vec<u8> {
    let site = case.metadata.anatomical_site.as_deref();
    let code = case.diagnosis.code.as_bytes();
    let hint = 3 + code.len() + 2 + site.map_or(0, str::len) + case.embedding.len() * 4;
    seal(EMBEDDING_LAYOUT_V1, hint, |out| {
        out.push(case.source.to_byte());
        let mut flags = 0;
        if case.label_confirmed {
            flags |= FLAG_CONFIRMED;
        }
        if site.is_some() {
            flags |= FLAG_HAS_SITE;
        }
        out.push(flags);
        out.push(u8::try_from(code.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(&code[..code.len().min(u8::MAX as usize)]);
        if let Some(site) = site {
            let site = site.as_bytes();
            let len = site.len().min(u16::MAX as usize);
            out.extend_from_slice(&(len as u16).to_le_bytes());
            out.extend_from_slice(&site[..len]);
        }
        for x in &case.embedding {
            out.extend_from_slice(&x.to_le_bytes());
        }
    })
}

/// Tags and the raw embedding bytes (borrowed from `bytes`).
pub(crate) fn decode_embedding(bytes: &[u8], dim: usize) -> Result<(CaseTags, &[u8]), String> {
    let p = open(bytes, EMBEDDING_LAYOUT_V1)?;
    let short = || "embedding row truncated".to_owned();
    let (&source, rest) = p.split_first().ok_or_else(short)?;
    let (&flags, rest) = rest.split_first().ok_or_else(short)?;
    let (&code_len, rest) = rest.split_first().ok_or_else(short)?;
    let code = rest.get(..code_len as usize).ok_or_else(short)?;
    let mut rest = &rest[code_len as usize..];
    let mut site = None;
    if flags & FLAG_HAS_SITE != 0 {
        let len = rest.get(..2).ok_or_else(short)?;
        let len = u16::from_le_bytes([len[0], len[1]]) as usize;
        let s = rest.get(2..2 + len).ok_or_else(short)?;
        site = Some(String::from_utf8(s.to_vec()).map_err(|_| "site is not UTF-8".to_owned())?);
        rest = &rest[2 + len..];
    }
    if rest.len() != dim * 4 {
        return Err(format!(
            "embedding has {} bytes; dim {dim} needs {}",
            rest.len(),
            dim * 4
        ));
    }
    let source = CaseSource::from_byte(source).ok_or_else(|| format!("unknown source {source}"))?;
    let diagnosis_code =
        String::from_utf8(code.to_vec()).map_err(|_| "diagnosis code is not UTF-8".to_owned())?;
    Ok((
        CaseTags {
            diagnosis_code,
            source,
            anatomical_site: site,
            label_confirmed: flags & FLAG_CONFIRMED != 0,
        },
        rest,
    ))
}

pub(crate) fn decode_f32_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

const CHANGES_LAYOUT_V1: u8 = 1;

/// Value of one `changes` entry: the ids one acknowledged write touched
/// (each as a u16 length and its bytes). Ids are at most 256 bytes.
pub(crate) fn encode_change(ids: &[&str]) -> Vec<u8> {
    let hint = ids.iter().map(|id| 2 + id.len()).sum();
    seal(CHANGES_LAYOUT_V1, hint, |out| {
        for id in ids {
            let id = id.as_bytes();
            let len = id.len().min(u16::MAX as usize);
            out.extend_from_slice(&(len as u16).to_le_bytes());
            out.extend_from_slice(&id[..len]);
        }
    })
}

pub(crate) fn decode_change(bytes: &[u8]) -> Result<Vec<String>, String> {
    let mut rest = open(bytes, CHANGES_LAYOUT_V1)?;
    let mut ids = Vec::new();
    while !rest.is_empty() {
        let len = rest.get(..2).ok_or("change entry truncated")?;
        let len = u16::from_le_bytes([len[0], len[1]]) as usize;
        let id = rest.get(2..2 + len).ok_or("change entry truncated")?;
        ids.push(String::from_utf8(id.to_vec()).map_err(|_| "id is not UTF-8".to_owned())?);
        rest = &rest[2 + len..];
    }
    Ok(ids)
}

const SYNC_CURSOR_LAYOUT_V1: u8 = 1;

/// The fleet service's pull cursor in `meta` (UTF-8 under the common
/// header): a garbled one is reported, never sent back as if it were one.
pub(crate) fn encode_sync_cursor(cursor: &str) -> Vec<u8> {
    seal(SYNC_CURSOR_LAYOUT_V1, cursor.len(), |out| {
        out.extend_from_slice(cursor.as_bytes())
    })
}

pub(crate) fn decode_sync_cursor(bytes: &[u8]) -> Result<String, String> {
    let payload = open(bytes, SYNC_CURSOR_LAYOUT_V1)?;
    String::from_utf8(payload.to_vec()).map_err(|_| "cursor is not UTF-8".to_owned())
}

const ADAPTER_LAYOUT_V1: u8 = 1;

/// The CRC-32 an `embeddings` row carries in its header: identifies the exact
/// embedding (and tags) an adapter row was computed from.
pub(crate) fn row_checksum(row: &[u8]) -> Option<u32> {
    (row.len() >= HEADER).then(|| u32::from_le_bytes([row[1], row[2], row[3], row[4]]))
}

/// A row of the `adapter_embeddings` tree: which adapter made it, from which
/// embedding row (its checksum), and the adapter embedding itself.
pub(crate) fn encode_adapter_row(
    adapter_id: &str,
    source_checksum: u32,
    vector: &[f32],
) -> Vec<u8> {
    seal(
        ADAPTER_LAYOUT_V1,
        2 + adapter_id.len() + 4 + vector.len() * 4,
        |out| {
            out.extend_from_slice(&(adapter_id.len() as u16).to_le_bytes());
            out.extend_from_slice(adapter_id.as_bytes());
            out.extend_from_slice(&source_checksum.to_le_bytes());
            for v in vector {
                out.extend_from_slice(&v.to_le_bytes());
            }
        },
    )
}

pub(crate) struct AdapterRow {
    pub adapter_id: String,
    pub source_checksum: u32,
    pub vector: Vec<f32>,
}

pub(crate) fn decode_adapter_row(bytes: &[u8]) -> Result<AdapterRow, String> {
    let payload = open(bytes, ADAPTER_LAYOUT_V1)?;
    let id_len = payload
        .get(..2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
        .ok_or("adapter row too short")?;
    let rest = &payload[2..];
    if rest.len() < id_len + 4 || (rest.len() - id_len - 4) % 4 != 0 {
        return Err("adapter row has a bad length".to_owned());
    }
    let adapter_id = std::str::from_utf8(&rest[..id_len])
        .map_err(|_| "adapter id is not UTF-8".to_owned())?
        .to_owned();
    let c = &rest[id_len..id_len + 4];
    let source_checksum = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    Ok(AdapterRow {
        adapter_id,
        source_checksum,
        vector: decode_f32_le(&rest[id_len + 4..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::Sex;

    /// A record as an older build sealed it under `layout`.
    fn sealed(layout: u8, record: &impl Serialize) -> Vec<u8> {
        let payload = postcard::to_stdvec(record).unwrap();
        seal(layout, payload.len(), |out| out.extend_from_slice(&payload))
    }

    /// Layout 1 as an older build wrote it.
    #[derive(Serialize)]
    struct OldMetadata {
        age_years: Option<u16>,
        sex: Option<Sex>,
        anatomical_site: Option<String>,
        fitzpatrick_type: Option<u8>,
        note: Option<String>,
    }

    #[derive(Serialize)]
    struct OldRecord {
        id: CaseId,
        diagnosis: Diagnosis,
        source: CaseSource,
        metadata: OldMetadata,
        thumbnail_jpeg: Vec<u8>,
        model_id: String,
        created_at_ms: u64,
        updated_at_ms: u64,
        label_confirmed: bool,
    }

    #[test]
    fn layout_1_records_still_decode_without_a_lesion_id() {
        let old = OldRecord {
            id: CaseId::new("ISIC_1").unwrap(),
            diagnosis: Diagnosis::from_code("mel").unwrap(),
            source: CaseSource::Reference,
            metadata: OldMetadata {
                age_years: Some(61),
                sex: Some(Sex::Female),
                anatomical_site: Some("back".into()),
                fitzpatrick_type: None,
                note: None,
            },
            thumbnail_jpeg: vec![1, 2, 3],
            model_id: "m".into(),
            created_at_ms: 5,
            updated_at_ms: 6,
            label_confirmed: true,
        };
        let record = decode_case(&sealed(CASE_LAYOUT_V1, &old)).unwrap();
        assert_eq!(record.metadata.age_years, Some(61));
        assert_eq!(record.metadata.anatomical_site.as_deref(), Some("back"));
        assert_eq!(record.metadata.lesion_id, None);
        assert_eq!(record.thumbnail_jpeg, [1, 2, 3]);
    }

    #[test]
    fn layout_2_records_decode_as_revision_1_of_no_device() {
        #[derive(Serialize)]
        struct RecordV2 {
            id: CaseId,
            diagnosis: Diagnosis,
            source: CaseSource,
            metadata: CaseMetadata,
            thumbnail_jpeg: Vec<u8>,
            model_id: String,
            created_at_ms: u64,
            updated_at_ms: u64,
            label_confirmed: bool,
        }
        let old = RecordV2 {
            id: CaseId::new("capture-1764000000000").unwrap(),
            diagnosis: Diagnosis::from_code("nv").unwrap(),
            source: CaseSource::Captured,
            metadata: CaseMetadata {
                lesion_id: Some("L7".into()),
                ..CaseMetadata::default()
            },
            thumbnail_jpeg: vec![9],
            model_id: "m".into(),
            created_at_ms: 1,
            updated_at_ms: 2,
            label_confirmed: false,
        };
        let record = decode_case(&sealed(CASE_LAYOUT_V2, &old)).unwrap();
        assert_eq!(record.id.as_str(), "capture-1764000000000");
        assert_eq!(record.metadata.lesion_id.as_deref(), Some("L7"));
        assert_eq!((record.revision, record.device_id), (1, None));
    }

    #[test]
    fn outbox_values_of_format_2_are_first_revisions() {
        assert_eq!(decode_outbox_revision(&[]), Ok(1));
        assert_eq!(decode_outbox_revision(&encode_outbox_revision(4)), Ok(4));
        assert!(decode_outbox_revision(&[1, 2, 3]).is_err());
    }
}
