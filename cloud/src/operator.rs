//! The fleet operator's commands as library functions: clinics, devices,
//! encoders and the reference library. `dermascope-cloud` prints what these
//! return (as JSON with `--json`); tests call them directly.

use std::collections::HashMap;

use dermascope_cloud_api::WireCase;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth;
use crate::cases::{self, Originals};
use crate::config::HashSettings;
use crate::db::{self, REFERENCE_LOCK_SPACE};
use crate::error::CloudError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clinic {
    pub clinic_id: String,
    pub name: String,
    pub allow_originals: bool,
    pub created_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub device_id: String,
    pub clinic_id: String,
    pub clinic_name: String,
    pub name: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
    pub last_seen_at: Option<String>,
}

/// A device just added, with the credential shown this once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDevice {
    pub device_id: String,
    pub clinic_id: String,
    pub name: String,
    /// `<device_id>.<secret>`: the device's `credential_file` holds it.
    pub credential: String,
}

impl std::fmt::Debug for NewDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewDevice")
            .field("device_id", &self.device_id)
            .field("clinic_id", &self.clinic_id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub device_id: String,
    pub revoked_at: String,
    /// It had been revoked before (the first time is kept).
    pub already: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    pub model_id: String,
    pub dim: usize,
    pub created_at: String,
    /// Cases of this encoder, fleet and reference.
    pub fleet_cases: i64,
    pub reference_cases: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    pub stored: usize,
    pub already_stored: usize,
    pub superseded: usize,
}

fn check_name(what: &str, name: &str) -> Result<(), CloudError> {
    let len = name.chars().count();
    if name.trim().is_empty() || len > 200 || name.chars().any(char::is_control) {
        return Err(CloudError::Invalid(format!(
            "a {what} name is 1 to 200 printable characters"
        )));
    }
    Ok(())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

pub async fn add_clinic(
    pool: &PgPool,
    name: &str,
    allow_originals: bool,
) -> Result<Clinic, CloudError> {
    check_name("clinic", name)?;
    let id = Uuid::now_v7();
    let created_at: String = sqlx::query_scalar(&format!(
        "INSERT INTO clinics (clinic_id, name, allow_originals) VALUES ($1, $2, $3) \
         RETURNING {}",
        db::rfc3339("created_at")
    ))
    .bind(id)
    .bind(name)
    .bind(allow_originals)
    .fetch_one(pool)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            CloudError::Conflict(format!("a clinic named {name:?} exists"))
        } else {
            CloudError::Database(e)
        }
    })?;
    Ok(Clinic {
        clinic_id: id.to_string(),
        name: name.to_string(),
        allow_originals,
        created_at,
    })
}

pub async fn list_clinics(pool: &PgPool) -> Result<Vec<Clinic>, CloudError> {
    let rows: Vec<(Uuid, String, bool, String)> = sqlx::query_as(&format!(
        "SELECT clinic_id, name, allow_originals, {} FROM clinics ORDER BY name",
        db::rfc3339("created_at")
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name, allow_originals, created_at)| Clinic {
            clinic_id: id.to_string(),
            name,
            allow_originals,
            created_at,
        })
        .collect())
}

/// A clinic by its id or its name.
pub async fn find_clinic(pool: &PgPool, clinic: &str) -> Result<Clinic, CloudError> {
    let by_id = Uuid::parse_str(clinic).ok();
    let rows: Vec<(Uuid, String, bool, String)> = sqlx::query_as(&format!(
        "SELECT clinic_id, name, allow_originals, {} FROM clinics \
         WHERE clinic_id = $1 OR name = $2 ORDER BY (clinic_id = $1) DESC NULLS LAST",
        db::rfc3339("created_at")
    ))
    .bind(by_id)
    .bind(clinic)
    .fetch_all(pool)
    .await?;
    let (id, name, allow_originals, created_at) = rows
        .into_iter()
        .next()
        .ok_or_else(|| CloudError::NotFound(format!("no clinic with the id or name {clinic:?}")))?;
    Ok(Clinic {
        clinic_id: id.to_string(),
        name,
        allow_originals,
        created_at,
    })
}

/// A new device of `clinic` (name or id) with argon2's default parameters.
pub async fn add_device(pool: &PgPool, clinic: &str, name: &str) -> Result<NewDevice, CloudError> {
    add_device_with(pool, clinic, name, &HashSettings::default()).await
}

/// [`add_device`] with chosen hashing parameters (tests use cheap ones).
pub async fn add_device_with(
    pool: &PgPool,
    clinic: &str,
    name: &str,
    hashing: &HashSettings,
) -> Result<NewDevice, CloudError> {
    check_name("device", name)?;
    let clinic = find_clinic(pool, clinic).await?;
    let clinic_id = Uuid::parse_str(&clinic.clinic_id)
        .map_err(|_| CloudError::Invalid("the clinic's id is not a UUID".into()))?;
    let device_id = Uuid::now_v7();
    let secret = auth::new_secret()?;
    let settings = hashing.clone();
    let for_hash = secret.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_secret(&for_hash, &settings))
        .await
        .map_err(|e| CloudError::Credential(format!("hashing task: {e}")))??;
    sqlx::query(
        "INSERT INTO devices (device_id, clinic_id, name, credential_hash) VALUES ($1, $2, $3, $4)",
    )
    .bind(device_id)
    .bind(clinic_id)
    .bind(name)
    .bind(&hash)
    .execute(pool)
    .await?;
    Ok(NewDevice {
        device_id: device_id.to_string(),
        clinic_id: clinic.clinic_id,
        name: name.to_string(),
        credential: format!("{device_id}.{secret}"),
    })
}

#[derive(sqlx::FromRow)]
struct DeviceRow {
    device_id: Uuid,
    clinic_id: Uuid,
    clinic_name: String,
    name: String,
    created_at: String,
    revoked_at: Option<String>,
    last_seen_at: Option<String>,
}

/// Every device, or one clinic's (name or id).
pub async fn list_devices(pool: &PgPool, clinic: Option<&str>) -> Result<Vec<Device>, CloudError> {
    let clinic_id = match clinic {
        Some(c) => Some(
            Uuid::parse_str(&find_clinic(pool, c).await?.clinic_id)
                .map_err(|_| CloudError::Invalid("the clinic's id is not a UUID".into()))?,
        ),
        None => None,
    };
    let rows: Vec<DeviceRow> = sqlx::query_as(&format!(
        "SELECT d.device_id, d.clinic_id, c.name AS clinic_name, d.name, \
                {} AS created_at, {} AS revoked_at, {} AS last_seen_at \
         FROM devices d JOIN clinics c ON c.clinic_id = d.clinic_id \
         WHERE $1::uuid IS NULL OR d.clinic_id = $1 \
         ORDER BY c.name, d.created_at",
        db::rfc3339("d.created_at"),
        db::rfc3339("d.revoked_at"),
        db::rfc3339("d.last_seen_at"),
    ))
    .bind(clinic_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Device {
            device_id: r.device_id.to_string(),
            clinic_id: r.clinic_id.to_string(),
            clinic_name: r.clinic_name,
            name: r.name,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
            last_seen_at: r.last_seen_at,
        })
        .collect())
}

/// Revokes a device: its next request, to any instance, is refused.
pub async fn revoke_device(pool: &PgPool, device_id: &str) -> Result<Revoked, CloudError> {
    let id = Uuid::parse_str(device_id.trim())
        .map_err(|_| CloudError::Invalid(format!("{device_id:?} is not a device id (a UUID)")))?;
    let row: Option<(String, bool)> = sqlx::query_as(&format!(
        "WITH before AS (SELECT revoked_at IS NOT NULL AS already FROM devices WHERE device_id = $1) \
         UPDATE devices SET revoked_at = coalesce(revoked_at, now()) WHERE device_id = $1 \
         RETURNING {}, (SELECT already FROM before)",
        db::rfc3339("revoked_at")
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let (revoked_at, already) =
        row.ok_or_else(|| CloudError::NotFound(format!("no device {id}")))?;
    Ok(Revoked {
        device_id: id.to_string(),
        revoked_at,
        already,
    })
}

/// The schema's rule for model ids, checked here too because an id goes
/// into index DDL as a literal.
pub fn is_model_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn index_name(table: &str, model_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(model_id.as_bytes());
    format!("{table}_hnsw_{}", hex::encode(&digest[..8]))
}

/// Registers an encoder and makes its partial HNSW indexes on both case
/// tables. Adding it again with the same dimension only makes sure the
/// indexes exist.
pub async fn add_model(pool: &PgPool, model_id: &str, dim: usize) -> Result<Model, CloudError> {
    if !is_model_id(model_id) {
        return Err(CloudError::Invalid(
            "a model id is 1 to 128 characters of A-Z a-z 0-9 . _ -".into(),
        ));
    }
    if !(1..=4000).contains(&dim) {
        return Err(CloudError::Invalid(
            "a model's dimension is 1 to 4000 (halfvec's HNSW limit)".into(),
        ));
    }
    let dim_sql = i32::try_from(dim).map_err(|_| CloudError::Invalid("dimension".into()))?;
    let existing: Option<i32> = sqlx::query_scalar(
        "INSERT INTO models (model_id, dim) VALUES ($1, $2) \
         ON CONFLICT (model_id) DO UPDATE SET model_id = models.model_id RETURNING dim",
    )
    .bind(model_id)
    .bind(dim_sql)
    .fetch_optional(pool)
    .await?;
    if let Some(stored) = existing {
        if stored != dim_sql {
            return Err(CloudError::Conflict(format!(
                "model {model_id} is registered with dimension {stored}, not {dim}"
            )));
        }
    }
    // Safe to format: the id matched the schema's character class above, so
    // it holds no quote, and the dimension is a checked integer.
    for table in ["fleet_cases", "reference_cases"] {
        let sql = format!(
            "CREATE INDEX IF NOT EXISTS {} ON {table} USING hnsw \
             ((embedding::halfvec({dim})) halfvec_ip_ops) WHERE model_id = '{model_id}'",
            index_name(table, model_id)
        );
        sqlx::query(&sql).execute(pool).await?;
    }
    list_models(pool)
        .await?
        .into_iter()
        .find(|m| m.model_id == model_id)
        .ok_or_else(|| CloudError::NotFound(format!("model {model_id} vanished")))
}

pub async fn list_models(pool: &PgPool) -> Result<Vec<Model>, CloudError> {
    let rows: Vec<(String, i32, String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT m.model_id, m.dim, {}, \
            (SELECT count(*) FROM fleet_cases f WHERE f.model_id = m.model_id), \
            (SELECT count(*) FROM reference_cases r WHERE r.model_id = m.model_id) \
         FROM models m ORDER BY m.model_id",
        db::rfc3339("m.created_at")
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(model_id, dim, created_at, fleet_cases, reference_cases)| Model {
                model_id,
                dim: usize::try_from(dim).unwrap_or(0),
                created_at,
                fleet_cases,
                reference_cases,
            },
        )
        .collect())
}

/// Cases per reference-import transaction.
const IMPORT_CHUNK: usize = 256;

/// Adds or updates reference cases with the upload's rules: a newer
/// revision replaces, the same one is already stored, an older one is
/// superseded. All cases are checked before any is written; original
/// photographs are not kept in the shared library.
pub async fn import_reference(
    pool: &PgPool,
    cases: &[WireCase],
) -> Result<ImportReport, CloudError> {
    let models: HashMap<String, usize> = cases::known_models(pool).await?;
    let checked = cases
        .iter()
        .enumerate()
        .map(|(i, c)| cases::validate(i, c, &models, Originals::Ignored))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CloudError::Invalid(format!("{} ({})", e.message, e.code)))?;
    let mut report = ImportReport::default();
    for chunk in checked.chunks(IMPORT_CHUNK) {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
            .bind(REFERENCE_LOCK_SPACE)
            .execute(&mut *tx)
            .await?;
        for c in chunk {
            let stored: Option<i64> = sqlx::query_scalar(
                "INSERT INTO reference_cases (case_id, revision, model_id, embedding, \
                     diagnosis_code, diagnosis_name, label_confirmed, metadata, lesion_key, \
                     thumbnail_jpeg, created_at_ms, updated_at_ms, change_seq) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
                     nextval('reference_change_seq')) \
                 ON CONFLICT (case_id) DO UPDATE SET \
                     revision = excluded.revision, model_id = excluded.model_id, \
                     embedding = excluded.embedding, diagnosis_code = excluded.diagnosis_code, \
                     diagnosis_name = excluded.diagnosis_name, \
                     label_confirmed = excluded.label_confirmed, metadata = excluded.metadata, \
                     lesion_key = excluded.lesion_key, thumbnail_jpeg = excluded.thumbnail_jpeg, \
                     created_at_ms = excluded.created_at_ms, \
                     updated_at_ms = excluded.updated_at_ms, change_seq = excluded.change_seq, \
                     received_at = now() \
                 WHERE excluded.revision > reference_cases.revision \
                 RETURNING change_seq",
            )
            .bind(&c.case.id)
            .bind(c.revision)
            .bind(&c.case.model_id)
            .bind(&c.embedding)
            .bind(&c.case.diagnosis.code)
            .bind(&c.case.diagnosis.name)
            .bind(c.case.label_confirmed)
            .bind(&c.metadata)
            .bind(&c.lesion_key)
            .bind(&c.case.thumbnail_jpeg)
            .bind(c.created_at_ms)
            .bind(c.updated_at_ms)
            .fetch_optional(&mut *tx)
            .await?;
            if stored.is_some() {
                report.stored += 1;
                continue;
            }
            let held: i64 =
                sqlx::query_scalar("SELECT revision FROM reference_cases WHERE case_id = $1")
                    .bind(&c.case.id)
                    .fetch_one(&mut *tx)
                    .await?;
            if held == c.revision {
                report.already_stored += 1;
            } else {
                report.superseded += 1;
            }
        }
        tx.commit().await?;
    }
    Ok(report)
}

/// Reads a JSON-lines file of [`WireCase`]s (blank lines skipped); a bad
/// line is named by its number.
pub fn read_jsonl(text: &str) -> Result<Vec<WireCase>, CloudError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line)
                .map_err(|e| CloudError::Invalid(format!("line {}: {e}", n + 1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_follow_the_schema() {
        assert!(is_model_id("sklesion-xception_int8.v2"));
        for bad in ["", "a'b", "a b", "a;drop", &"x".repeat(129)] {
            assert!(!is_model_id(bad), "{bad}");
        }
    }

    #[test]
    fn index_names_are_valid_identifiers_per_model() {
        let a = index_name("fleet_cases", "m-1.x");
        assert!(a.len() <= 63 && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        assert_ne!(a, index_name("fleet_cases", "m-1_x"));
    }

    #[test]
    fn a_new_device_debug_hides_the_credential() {
        let d = NewDevice {
            device_id: "d".into(),
            clinic_id: "c".into(),
            name: "n".into(),
            credential: "d.supersecret".into(),
        };
        assert!(!format!("{d:?}").contains("supersecret"));
    }
}
