//! `POST /v1/cases` (upload) and `GET /v1/cases` (pull).
//!
//! An upload batch is one transaction under the clinic's advisory lock, so
//! the clinic's change sequence is drawn in commit order and a pull cursor
//! never skips a change that commits late. `case_revisions` holds every
//! `(case, revision)` received once: a retried batch is answered
//! `already_stored` without writing. `fleet_cases` holds the newest revision
//! only: an older one is answered `superseded`. A batch with any invalid
//! case is refused whole (nothing written), naming the case's index.
//!
//! A pull returns reference cases first, then the clinic's fleet cases,
//! never the requesting device's own, only the requested encoder's, without
//! original photographs (a device's index needs the embedding and the
//! thumbnail), and no more than fits a device's response limit.

use std::collections::{HashMap, HashSet};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use dermascope_cloud_api::{
    CasePage, DeviceInfo, Health, ModelInfo, UploadBatch, UploadOutcome, UploadReceipt,
    UploadResult, WireCase, WireDiagnosis, WireMetadata, WireSource, MAX_ORIGINAL_BYTES,
    MAX_PULL_PAGE, MAX_RESPONSE_BYTES, MAX_THUMBNAIL_BYTES, MAX_UPLOAD_BATCH,
};
use pgvector::HalfVector;
use serde::Deserialize;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::auth::Viewer;
use crate::db::CLINIC_LOCK_SPACE;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::server::AppState;

/// The upsert both upload paths share: a stored case is replaced only by a
/// higher revision (an equal one is a retry, a lower one superseded), and
/// every replacement draws a new change number for the pulls. A macro so
/// that each statement stays one literal (sqlx prepares it once).
macro_rules! newest_revision_wins {
    () => {
        " ON CONFLICT (clinic_id, case_id) DO UPDATE SET \
         revision = excluded.revision, model_id = excluded.model_id, \
         embedding = excluded.embedding, diagnosis_code = excluded.diagnosis_code, \
         diagnosis_name = excluded.diagnosis_name, \
         label_confirmed = excluded.label_confirmed, metadata = excluded.metadata, \
         lesion_key = excluded.lesion_key, thumbnail_jpeg = excluded.thumbnail_jpeg, \
         original_jpeg = excluded.original_jpeg, created_at_ms = excluded.created_at_ms, \
         updated_at_ms = excluded.updated_at_ms, change_seq = excluded.change_seq, \
         received_at = now() \
         WHERE excluded.revision > fleet_cases.revision "
    };
}

/// Largest finite value a `halfvec` component holds.
pub const HALF_MAX: f32 = 65504.0;

/// The encoders the service indexes, with their dimension.
pub async fn known_models(pool: &PgPool) -> Result<HashMap<String, usize>, sqlx::Error> {
    let rows: Vec<(String, i32)> = sqlx::query_as("SELECT model_id, dim FROM models")
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, dim)| (id, usize::try_from(dim).unwrap_or(0)))
        .collect())
}

/// What happens to an original photograph in an incoming case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Originals {
    /// The clinic lets originals leave its devices: stored.
    Allowed,
    /// The clinic does not: the batch is refused.
    Refused,
    /// The reference library keeps none: dropped.
    Ignored,
}

/// A case that passed [`validate`], ready to bind.
pub struct Checked<'a> {
    pub case: &'a WireCase,
    pub revision: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub embedding: HalfVector,
    pub metadata: serde_json::Value,
    pub lesion_key: String,
    pub original: Option<&'a [u8]>,
}

fn is_id_text(text: &str, max: usize) -> bool {
    !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

fn is_label_text(text: &str, max: usize) -> bool {
    !text.trim().is_empty() && text.len() <= max && !text.chars().any(char::is_control)
}

fn check_jpeg(bytes: &[u8], what: &str, at: &str, max: usize) -> Result<(), ApiError> {
    if bytes.len() > max {
        return Err(ApiError::too_large(format!(
            "{at}: the {what} is {} bytes, over the limit of {max}",
            bytes.len()
        )));
    }
    if !bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        return Err(ApiError::bad_photo(format!(
            "{at}: the {what} is not a JPEG"
        )));
    }
    let reader =
        image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Jpeg);
    match reader.into_dimensions() {
        Ok((w, h)) if w > 0 && h > 0 => Ok(()),
        _ => Err(ApiError::bad_photo(format!(
            "{at}: the {what} is not a readable JPEG"
        ))),
    }
}

/// Checks one incoming case against the schema's rules; `index` is its
/// place in the batch, which refusals name (never the id).
pub fn validate<'a>(
    index: usize,
    case: &'a WireCase,
    models: &HashMap<String, usize>,
    originals: Originals,
) -> Result<Checked<'a>, ApiError> {
    let at = format!("case {index} of the batch");
    if !is_id_text(&case.id, 256) {
        return Err(ApiError::bad_request(format!(
            "{at}: the id must be 1 to 256 characters of A-Z a-z 0-9 . _ : -"
        )));
    }
    let revision = i64::try_from(case.revision)
        .ok()
        .filter(|r| *r >= 1)
        .ok_or_else(|| ApiError::bad_request(format!("{at}: the revision must be 1 or more")))?;
    let created_at_ms = i64::try_from(case.created_at_ms)
        .map_err(|_| ApiError::bad_request(format!("{at}: created_at_ms is out of range")))?;
    let updated_at_ms = i64::try_from(case.updated_at_ms)
        .map_err(|_| ApiError::bad_request(format!("{at}: updated_at_ms is out of range")))?;
    let Some(&dim) = models.get(&case.model_id) else {
        return Err(ApiError::unknown_model(format!(
            "{at}: the service does not index model {:?}; the operator adds it with \
             `dermascope-cloud model add`",
            truncate(&case.model_id)
        )));
    };
    if case.embedding.len() != dim {
        return Err(ApiError::bad_embedding(format!(
            "{at}: the embedding has {} values, model {} has {dim}",
            case.embedding.len(),
            case.model_id
        )));
    }
    if let Some(i) = case.embedding.iter().position(|x| !x.is_finite()) {
        return Err(ApiError::bad_embedding(format!(
            "{at}: embedding value {i} is not a finite number"
        )));
    }
    if let Some(i) = case.embedding.iter().position(|x| x.abs() > HALF_MAX) {
        return Err(ApiError::bad_embedding(format!(
            "{at}: embedding value {i} is beyond the half-precision range (±{HALF_MAX})"
        )));
    }
    if !is_id_text(&case.diagnosis.code, 64) || !is_label_text(&case.diagnosis.name, 200) {
        return Err(ApiError::bad_request(format!(
            "{at}: the diagnosis needs a code (1-64 of A-Z a-z 0-9 . _ : -) and a name (1-200 characters)"
        )));
    }
    check_metadata(&case.metadata, &at)?;
    check_jpeg(&case.thumbnail_jpeg, "thumbnail", &at, MAX_THUMBNAIL_BYTES)?;
    let original = match (&case.original_jpeg, originals) {
        (None, _) | (Some(_), Originals::Ignored) => None,
        (Some(_), Originals::Refused) => {
            return Err(ApiError::originals_not_allowed(format!(
                "{at}: this clinic does not let original photographs leave its devices; \
                 send the case without original_jpeg"
            )))
        }
        (Some(bytes), Originals::Allowed) => {
            check_jpeg(bytes, "original photograph", &at, MAX_ORIGINAL_BYTES)?;
            Some(bytes.as_slice())
        }
    };
    let metadata = serde_json::to_value(&case.metadata)
        .map_err(|_| ApiError::bad_request(format!("{at}: the metadata cannot be stored")))?;
    let lesion_key = case
        .metadata
        .lesion_id
        .clone()
        .unwrap_or_else(|| case.id.clone());
    Ok(Checked {
        case,
        revision,
        created_at_ms,
        updated_at_ms,
        embedding: HalfVector::from_f32_slice(&case.embedding),
        metadata,
        lesion_key,
        original,
    })
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

fn check_metadata(meta: &WireMetadata, at: &str) -> Result<(), ApiError> {
    if let Some(sex) = &meta.sex {
        if !["female", "male", "other"].contains(&sex.as_str()) {
            return Err(ApiError::bad_request(format!(
                "{at}: metadata.sex must be female, male or other"
            )));
        }
    }
    if meta.age_years.is_some_and(|a| a > 150) {
        return Err(ApiError::bad_request(format!(
            "{at}: metadata.age_years must be at most 150"
        )));
    }
    if meta.fitzpatrick_type.is_some_and(|t| !(1..=6).contains(&t)) {
        return Err(ApiError::bad_request(format!(
            "{at}: metadata.fitzpatrick_type must be 1 to 6"
        )));
    }
    if meta
        .anatomical_site
        .as_deref()
        .is_some_and(|s| !is_label_text(s, 100))
    {
        return Err(ApiError::bad_request(format!(
            "{at}: metadata.anatomical_site must be 1 to 100 printable characters"
        )));
    }
    if meta
        .lesion_id
        .as_deref()
        .is_some_and(|l| !is_id_text(l, 256))
    {
        return Err(ApiError::bad_request(format!(
            "{at}: metadata.lesion_id must be 1 to 256 characters of A-Z a-z 0-9 . _ : -"
        )));
    }
    Ok(())
}

/// A short, non-reversible tag for logs, where a case must be told apart
/// without naming it.
pub fn log_tag(id: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(id.as_bytes())[..4])
}

/// Stores an already validated batch for `viewer`, in one transaction.
pub async fn store_batch(
    pool: &PgPool,
    viewer: &Viewer,
    checked: &[Checked<'_>],
) -> Result<Vec<UploadResult>, ApiError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(CLINIC_LOCK_SPACE)
        .bind(viewer.clinic_id.to_string())
        .execute(&mut *tx)
        .await?;

    let ids: Vec<String> = checked.iter().map(|c| c.case.id.clone()).collect();
    let owners: Vec<(String, Uuid)> = sqlx::query_as(
        "SELECT case_id, device_id FROM fleet_cases WHERE clinic_id = $1 AND case_id = ANY($2)",
    )
    .bind(viewer.clinic_id)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let foreign: HashSet<&str> = owners
        .iter()
        .filter(|(_, device)| *device != viewer.device_id)
        .map(|(id, _)| id.as_str())
        .collect();
    if let Some(index) = ids.iter().position(|id| foreign.contains(id.as_str())) {
        return Err(ApiError::forbidden(format!(
            "case {index} of the batch: a case with this id was uploaded by another device \
             of the clinic; a device may only upload its own cases"
        )));
    }

    let distinct: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let outcomes = if distinct.len() == ids.len() {
        store_distinct(&mut tx, viewer, checked).await?
    } else {
        // The same case twice in one batch: one at a time, in order, so the
        // later of the two sees the earlier (one statement could not).
        let mut outcomes = Vec::with_capacity(checked.len());
        for c in checked {
            outcomes.push(store_one(&mut tx, viewer, c).await?);
        }
        outcomes
    };
    tx.commit().await?;
    Ok(checked
        .iter()
        .zip(outcomes)
        .map(|(c, outcome)| UploadResult {
            id: c.case.id.clone(),
            revision: c.case.revision,
            outcome,
        })
        .collect())
}

/// A batch whose case ids are all different, in two statements: the
/// revisions not seen before, then the upsert of those (newer wins).
async fn store_distinct(
    tx: &mut Transaction<'_, Postgres>,
    viewer: &Viewer,
    checked: &[Checked<'_>],
) -> Result<Vec<UploadOutcome>, ApiError> {
    let ids: Vec<&str> = checked.iter().map(|c| c.case.id.as_str()).collect();
    let revisions: Vec<i64> = checked.iter().map(|c| c.revision).collect();
    let new: Vec<String> = sqlx::query_scalar(
        "INSERT INTO case_revisions (clinic_id, case_id, revision, device_id) \
         SELECT $1, t.case_id, t.revision, $2 FROM unnest($3::text[], $4::bigint[]) \
             AS t(case_id, revision) \
         ON CONFLICT DO NOTHING RETURNING case_id",
    )
    .bind(viewer.clinic_id)
    .bind(viewer.device_id)
    .bind(&ids)
    .bind(&revisions)
    .fetch_all(&mut **tx)
    .await?;
    let new: HashSet<String> = new.into_iter().collect();
    let fresh: Vec<&Checked<'_>> = checked
        .iter()
        .filter(|c| new.contains(&c.case.id))
        .collect();
    let stored: HashSet<String> = if fresh.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar::<_, String>(concat!(
            "INSERT INTO fleet_cases (clinic_id, case_id, revision, device_id, model_id, \
                 embedding, diagnosis_code, diagnosis_name, label_confirmed, metadata, \
                 lesion_key, thumbnail_jpeg, original_jpeg, created_at_ms, updated_at_ms, \
                 change_seq) \
             SELECT $1, t.case_id, t.revision, $2, t.model_id, t.embedding, t.code, t.name, \
                 t.confirmed, t.metadata, t.lesion_key, t.thumbnail, t.original, t.created, \
                 t.updated, nextval('fleet_change_seq') \
             FROM unnest($3::text[], $4::bigint[], $5::text[], $6::halfvec[], $7::text[], \
                 $8::text[], $9::boolean[], $10::jsonb[], $11::text[], $12::bytea[], \
                 $13::bytea[], $14::bigint[], $15::bigint[]) \
                 AS t(case_id, revision, model_id, embedding, code, name, confirmed, metadata, \
                      lesion_key, thumbnail, original, created, updated) \
             ",
            newest_revision_wins!(),
            "RETURNING case_id"
        ))
        .bind(viewer.clinic_id)
        .bind(viewer.device_id)
        .bind(fresh.iter().map(|c| c.case.id.as_str()).collect::<Vec<_>>())
        .bind(fresh.iter().map(|c| c.revision).collect::<Vec<_>>())
        .bind(
            fresh
                .iter()
                .map(|c| c.case.model_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            fresh
                .iter()
                .map(|c| c.embedding.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            fresh
                .iter()
                .map(|c| c.case.diagnosis.code.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            fresh
                .iter()
                .map(|c| c.case.diagnosis.name.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            fresh
                .iter()
                .map(|c| c.case.label_confirmed)
                .collect::<Vec<_>>(),
        )
        .bind(fresh.iter().map(|c| c.metadata.clone()).collect::<Vec<_>>())
        .bind(
            fresh
                .iter()
                .map(|c| c.lesion_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            fresh
                .iter()
                .map(|c| c.case.thumbnail_jpeg.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(fresh.iter().map(|c| c.original).collect::<Vec<_>>())
        .bind(fresh.iter().map(|c| c.created_at_ms).collect::<Vec<_>>())
        .bind(fresh.iter().map(|c| c.updated_at_ms).collect::<Vec<_>>())
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect()
    };
    Ok(checked
        .iter()
        .map(|c| {
            if !new.contains(&c.case.id) {
                UploadOutcome::AlreadyStored
            } else if stored.contains(&c.case.id) {
                UploadOutcome::Stored
            } else {
                UploadOutcome::Superseded
            }
        })
        .collect())
}

async fn store_one(
    tx: &mut Transaction<'_, Postgres>,
    viewer: &Viewer,
    c: &Checked<'_>,
) -> Result<UploadOutcome, ApiError> {
    let inserted = sqlx::query(
        "INSERT INTO case_revisions (clinic_id, case_id, revision, device_id) \
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(viewer.clinic_id)
    .bind(&c.case.id)
    .bind(c.revision)
    .bind(viewer.device_id)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(UploadOutcome::AlreadyStored);
    }
    let stored: Option<i64> = sqlx::query_scalar(concat!(
        "INSERT INTO fleet_cases (clinic_id, case_id, revision, device_id, model_id, embedding, \
             diagnosis_code, diagnosis_name, label_confirmed, metadata, lesion_key, \
             thumbnail_jpeg, original_jpeg, created_at_ms, updated_at_ms, change_seq) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
             nextval('fleet_change_seq')) \
         ",
        newest_revision_wins!(),
        "RETURNING change_seq"
    ))
    .bind(viewer.clinic_id)
    .bind(&c.case.id)
    .bind(c.revision)
    .bind(viewer.device_id)
    .bind(&c.case.model_id)
    .bind(&c.embedding)
    .bind(&c.case.diagnosis.code)
    .bind(&c.case.diagnosis.name)
    .bind(c.case.label_confirmed)
    .bind(&c.metadata)
    .bind(&c.lesion_key)
    .bind(&c.case.thumbnail_jpeg)
    .bind(c.original)
    .bind(c.created_at_ms)
    .bind(c.updated_at_ms)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(if stored.is_some() {
        UploadOutcome::Stored
    } else {
        UploadOutcome::Superseded
    })
}

/// `POST /v1/cases`.
pub async fn upload(
    State(state): State<AppState>,
    viewer: Viewer,
    ApiJson(batch): ApiJson<UploadBatch>,
) -> Result<Json<UploadReceipt>, ApiError> {
    if batch.cases.len() > MAX_UPLOAD_BATCH {
        return Err(ApiError::too_large(format!(
            "a batch of {} cases; at most {MAX_UPLOAD_BATCH} per request",
            batch.cases.len()
        )));
    }
    let models = known_models(&state.pool).await?;
    let originals = if viewer.allow_originals {
        Originals::Allowed
    } else {
        Originals::Refused
    };
    let checked = batch
        .cases
        .iter()
        .enumerate()
        .map(|(i, case)| validate(i, case, &models, originals))
        .collect::<Result<Vec<_>, _>>()?;
    let results = store_batch(&state.pool, &viewer, &checked).await?;
    let count = |o: UploadOutcome| results.iter().filter(|r| r.outcome == o).count();
    tracing::info!(
        device = %viewer.device_id,
        cases = results.len(),
        stored = count(UploadOutcome::Stored),
        already_stored = count(UploadOutcome::AlreadyStored),
        superseded = count(UploadOutcome::Superseded),
        "upload committed"
    );
    Ok(Json(UploadReceipt { results }))
}

/// Where a device's pull stands: the last reference and fleet changes it
/// was sent. Opaque to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub clinic_id: Uuid,
    pub reference_seq: i64,
    pub fleet_seq: i64,
}

impl Cursor {
    pub fn start(clinic_id: Uuid) -> Cursor {
        Cursor {
            clinic_id,
            reference_seq: 0,
            fleet_seq: 0,
        }
    }

    pub fn encode(&self) -> String {
        format!(
            "v1.{}.{}.{}",
            self.clinic_id, self.reference_seq, self.fleet_seq
        )
    }

    /// Reads a cursor a device sent back; one of another clinic is refused.
    pub fn parse(text: Option<&str>, viewer: &Viewer) -> Result<Cursor, ApiError> {
        let text = match text.map(str::trim) {
            None | Some("") => return Ok(Cursor::start(viewer.clinic_id)),
            Some(t) => t,
        };
        let malformed = || {
            ApiError::bad_cursor(
                StatusCode::BAD_REQUEST,
                "the cursor is not one this service hands out; pull from the start (no cursor)",
            )
        };
        let parts: Vec<&str> = text.split('.').collect();
        let [version, clinic, reference, fleet] = parts.as_slice() else {
            return Err(malformed());
        };
        if *version != "v1" {
            return Err(malformed());
        }
        let clinic_id = Uuid::parse_str(clinic).map_err(|_| malformed())?;
        let reference_seq: i64 = reference.parse().map_err(|_| malformed())?;
        let fleet_seq: i64 = fleet.parse().map_err(|_| malformed())?;
        if reference_seq < 0 || fleet_seq < 0 {
            return Err(malformed());
        }
        if clinic_id != viewer.clinic_id {
            return Err(ApiError::bad_cursor(
                StatusCode::FORBIDDEN,
                "the cursor belongs to another clinic; a device pulls only its own clinic's cases",
            ));
        }
        Ok(Cursor {
            clinic_id,
            reference_seq,
            fleet_seq,
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct PullQuery {
    pub model_id: Option<String>,
    pub cursor: Option<String>,
    pub limit: Option<usize>,
}

#[derive(sqlx::FromRow)]
struct CaseRow {
    case_id: String,
    revision: i64,
    device_id: Option<Uuid>,
    model_id: String,
    embedding: HalfVector,
    diagnosis_code: String,
    diagnosis_name: String,
    label_confirmed: bool,
    metadata: sqlx::types::Json<WireMetadata>,
    thumbnail_jpeg: Vec<u8>,
    created_at_ms: i64,
    updated_at_ms: i64,
    change_seq: i64,
}

impl CaseRow {
    fn into_wire(self, source: WireSource) -> WireCase {
        WireCase {
            id: self.case_id,
            revision: u64::try_from(self.revision).unwrap_or(0),
            model_id: self.model_id,
            embedding: self
                .embedding
                .as_slice()
                .iter()
                .map(|h| h.to_f32())
                .collect(),
            diagnosis: WireDiagnosis {
                code: self.diagnosis_code,
                name: self.diagnosis_name,
            },
            label_confirmed: self.label_confirmed,
            metadata: self.metadata.0,
            created_at_ms: u64::try_from(self.created_at_ms).unwrap_or(0),
            updated_at_ms: u64::try_from(self.updated_at_ms).unwrap_or(0),
            thumbnail_jpeg: self.thumbnail_jpeg,
            original_jpeg: None,
            source: Some(source),
            device_id: self.device_id.map(|d| d.to_string()),
        }
    }

    /// What this case adds to a JSON response, roughly: base64 thumbnail,
    /// embedding values as text, and the rest.
    fn wire_bytes(&self) -> usize {
        self.thumbnail_jpeg.len() / 3 * 4 + self.embedding.as_slice().len() * 16 + 2048
    }
}

/// A page must fit a device's response limit with room to spare.
const PAGE_BYTES: usize = MAX_RESPONSE_BYTES / 2;

const CASE_COLUMNS: &str = "case_id, revision, model_id, embedding, diagnosis_code, \
    diagnosis_name, label_confirmed, metadata, thumbnail_jpeg, created_at_ms, updated_at_ms, \
    change_seq";

/// The next page after `cursor` for `model_id`, as `viewer` may see it.
pub async fn pull_page(
    pool: &PgPool,
    viewer: &Viewer,
    model_id: &str,
    cursor: Cursor,
    limit: usize,
) -> Result<CasePage, ApiError> {
    let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut next = cursor;
    let mut cases = Vec::new();
    let mut bytes = 0usize;
    let mut cut_short = false;

    let reference: Vec<CaseRow> = sqlx::query_as(&format!(
        "SELECT {CASE_COLUMNS}, NULL::uuid AS device_id FROM reference_cases \
         WHERE model_id = $1 AND change_seq > $2 ORDER BY change_seq LIMIT $3"
    ))
    .bind(model_id)
    .bind(cursor.reference_seq)
    .bind(limit_sql)
    .fetch_all(pool)
    .await?;
    for row in reference {
        if !cases.is_empty() && bytes + row.wire_bytes() > PAGE_BYTES {
            cut_short = true;
            break;
        }
        bytes += row.wire_bytes();
        next.reference_seq = row.change_seq;
        cases.push(row.into_wire(WireSource::Reference));
    }

    let room = limit.saturating_sub(cases.len());
    if room > 0 && !cut_short {
        let fleet: Vec<CaseRow> = sqlx::query_as(&format!(
            "SELECT {CASE_COLUMNS}, device_id FROM fleet_cases \
             WHERE clinic_id = $1 AND model_id = $2 AND change_seq > $3 AND device_id <> $4 \
             ORDER BY change_seq LIMIT $5"
        ))
        .bind(viewer.clinic_id)
        .bind(model_id)
        .bind(cursor.fleet_seq)
        .bind(viewer.device_id)
        .bind(i64::try_from(room).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await?;
        for row in fleet {
            if !cases.is_empty() && bytes + row.wire_bytes() > PAGE_BYTES {
                cut_short = true;
                break;
            }
            bytes += row.wire_bytes();
            next.fleet_seq = row.change_seq;
            cases.push(row.into_wire(WireSource::Fleet));
        }
    }
    let more = cut_short || cases.len() == limit;
    Ok(CasePage {
        cases,
        cursor: next.encode(),
        more,
    })
}

/// `GET /v1/cases?model_id=&cursor=&limit=`.
pub async fn pull(
    State(state): State<AppState>,
    viewer: Viewer,
    ApiQuery(query): ApiQuery<PullQuery>,
) -> Result<Json<CasePage>, ApiError> {
    let model_id = query
        .model_id
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("give model_id: the encoder whose cases to pull"))?;
    let limit = query.limit.unwrap_or(MAX_PULL_PAGE);
    if !(1..=MAX_PULL_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_PULL_PAGE}"
        )));
    }
    let cursor = Cursor::parse(query.cursor.as_deref(), &viewer)?;
    let models = known_models(&state.pool).await?;
    if !models.contains_key(&model_id) {
        return Err(ApiError::unknown_model(format!(
            "the service does not index model {:?}",
            truncate(&model_id)
        )));
    }
    let page = pull_page(&state.pool, &viewer, &model_id, cursor, limit).await?;
    tracing::debug!(device = %viewer.device_id, cases = page.cases.len(), more = page.more, "pull page");
    Ok(Json(page))
}

/// `GET /v1/device`.
pub async fn device(
    State(state): State<AppState>,
    viewer: Viewer,
) -> Result<Json<DeviceInfo>, ApiError> {
    let mut models: Vec<ModelInfo> = known_models(&state.pool)
        .await?
        .into_iter()
        .map(|(model_id, dim)| ModelInfo { model_id, dim })
        .collect();
    models.sort_by(|a, b| a.model_id.cmp(&b.model_id));
    Ok(Json(DeviceInfo {
        device_id: viewer.device_id.to_string(),
        clinic_id: viewer.clinic_id.to_string(),
        clinic_name: viewer.clinic_name,
        allow_originals: viewer.allow_originals,
        models,
    }))
}

/// `GET /v1/health`: no credential; 503 when the database is away.
pub async fn health(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    let schema_version = crate::db::schema_version(&state.pool).await?;
    Ok(Json(Health {
        status: "ok".into(),
        schema_version,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn viewer() -> Viewer {
        Viewer {
            device_id: Uuid::now_v7(),
            clinic_id: Uuid::now_v7(),
            clinic_name: "c".into(),
            allow_originals: false,
        }
    }

    #[test]
    fn a_cursor_round_trips_and_another_clinics_is_refused() {
        let v = viewer();
        let c = Cursor {
            clinic_id: v.clinic_id,
            reference_seq: 7,
            fleet_seq: 9,
        };
        assert_eq!(Cursor::parse(Some(&c.encode()), &v).unwrap(), c);
        assert_eq!(Cursor::parse(None, &v).unwrap(), Cursor::start(v.clinic_id));
        assert_eq!(
            Cursor::parse(Some(""), &v).unwrap(),
            Cursor::start(v.clinic_id)
        );
        let other = Cursor::start(Uuid::now_v7()).encode();
        let err = Cursor::parse(Some(&other), &v).unwrap_err();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::FORBIDDEN, "bad_cursor")
        );
        for bad in ["v2.x.1.2", "v1.1.2", "garbage", "v1.not-a-uuid.1.2"] {
            let err = Cursor::parse(Some(bad), &v).unwrap_err();
            assert_eq!(
                (err.status, err.code),
                (StatusCode::BAD_REQUEST, "bad_cursor"),
                "{bad}"
            );
        }
        let negative = format!("v1.{}.-1.0", v.clinic_id);
        assert!(Cursor::parse(Some(&negative), &v).is_err());
    }

    #[test]
    fn log_tags_are_short_and_stable() {
        assert_eq!(log_tag("a"), log_tag("a"));
        assert_ne!(log_tag("a"), log_tag("b"));
        assert_eq!(log_tag("anything").len(), 8);
    }
}
