//! What the status pages show, read from the 0002 schema with read-only
//! queries of their own (the rollout logic in `fleet` writes these rows;
//! the pages never do).

use sqlx::PgPool;
use uuid::Uuid;

use crate::db::rfc3339;
use crate::error::CloudError;

/// One device as the fleet page lists it.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct DeviceStatus {
    pub device_id: Uuid,
    pub name: String,
    pub daemon_version: Option<String>,
    pub bundle_version: Option<i64>,
    pub encoder_model_id: Option<String>,
    pub pending_uploads: Option<i64>,
    /// The later of its last authenticated request and its last report.
    pub last_seen_at: Option<String>,
    pub last_seen_age_s: Option<i64>,
    pub revoked_at: Option<String>,
}

/// A clinic and its devices, with its rollout in flight if any.
#[derive(Clone, Debug, PartialEq)]
pub struct ClinicStatus {
    pub clinic_id: Uuid,
    pub name: String,
    pub active_rollout: Option<RolloutSummary>,
    pub devices: Vec<DeviceStatus>,
}

/// A rollout as the list shows it.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct RolloutSummary {
    pub rollout_id: Uuid,
    pub clinic_id: Uuid,
    pub clinic_name: String,
    pub bundle_id: Uuid,
    pub bundle_version: i64,
    pub state: String,
    pub paused_reason: Option<String>,
    pub current_stage: i32,
    pub stages: i64,
    pub assigned: i64,
    pub installed: i64,
    pub failed: i64,
    pub refused: i64,
    pub rolled_back: i64,
    pub created_at: String,
    pub updated_at: String,
    pub updated_age_s: i64,
}

/// One stage with its devices counted by state.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct StageStatus {
    pub stage: i32,
    pub kind: String,
    pub percent: Option<i32>,
    pub listed_devices: i32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub finished_age_s: Option<i64>,
    pub assigned: i64,
    pub offered: i64,
    pub installed: i64,
    pub failed: i64,
    pub refused: i64,
    pub rollback_offered: i64,
    pub rolled_back: i64,
}

/// One device's place in a rollout.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct RolloutDevice {
    pub device_id: Uuid,
    pub name: String,
    pub stage: i32,
    pub state: String,
    pub detail: Option<String>,
    pub updated_at: String,
    pub updated_age_s: i64,
    /// What the device last reported it runs.
    pub bundle_version: Option<i64>,
}

/// Everything the rollout page shows.
#[derive(Clone, Debug, PartialEq)]
pub struct RolloutDetail {
    pub summary: RolloutSummary,
    pub downgrade: bool,
    pub carries: Vec<String>,
    pub encoder_model_id: Option<String>,
    pub archive_sha256: String,
    pub archive_size: i64,
    pub signed_by: String,
    pub success_threshold: f32,
    pub error_threshold: f32,
    pub stages: Vec<StageStatus>,
    pub devices: Vec<RolloutDevice>,
}

fn summary_sql(filter: &str) -> String {
    format!(
        "SELECT r.rollout_id, r.clinic_id, c.name AS clinic_name, r.bundle_id, \
                b.version AS bundle_version, r.state, r.paused_reason, r.current_stage, \
                (SELECT count(*) FROM rollout_stages s WHERE s.rollout_id = r.rollout_id) AS stages, \
                count(d.device_id) AS assigned, \
                count(*) FILTER (WHERE d.state = 'installed') AS installed, \
                count(*) FILTER (WHERE d.state = 'failed') AS failed, \
                count(*) FILTER (WHERE d.state = 'refused') AS refused, \
                count(*) FILTER (WHERE d.state = 'rolled_back') AS rolled_back, \
                {} AS created_at, {} AS updated_at, \
                extract(epoch FROM now() - r.updated_at)::bigint AS updated_age_s \
         FROM rollouts r \
         JOIN clinics c ON c.clinic_id = r.clinic_id \
         JOIN bundles b ON b.bundle_id = r.bundle_id \
         LEFT JOIN rollout_devices d ON d.rollout_id = r.rollout_id \
         {filter} \
         GROUP BY r.rollout_id, c.name, b.version \
         ORDER BY r.created_at DESC, r.rollout_id",
        rfc3339("r.created_at"),
        rfc3339("r.updated_at"),
    )
}

/// Every rollout, newest first.
pub async fn rollouts(pool: &PgPool) -> Result<Vec<RolloutSummary>, CloudError> {
    Ok(sqlx::query_as(&summary_sql("")).fetch_all(pool).await?)
}

/// Every clinic (with or without devices) and its devices, by name.
pub async fn fleet(pool: &PgPool) -> Result<Vec<ClinicStatus>, CloudError> {
    let clinics: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT clinic_id, name FROM clinics ORDER BY name, clinic_id")
            .fetch_all(pool)
            .await?;
    #[derive(sqlx::FromRow)]
    struct Row {
        clinic_id: Uuid,
        #[sqlx(flatten)]
        device: DeviceStatus,
    }
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT clinic_id, device_id, name, daemon_version, bundle_version, encoder_model_id, \
                pending_uploads, {} AS last_seen_at, \
                extract(epoch FROM now() - greatest(last_seen_at, reported_at))::bigint \
                    AS last_seen_age_s, \
                {} AS revoked_at \
         FROM devices ORDER BY name, device_id",
        rfc3339("greatest(last_seen_at, reported_at)"),
        rfc3339("revoked_at"),
    ))
    .fetch_all(pool)
    .await?;
    let active: Vec<RolloutSummary> = sqlx::query_as(&summary_sql(
        "WHERE r.state IN ('running', 'paused', 'rolling_back')",
    ))
    .fetch_all(pool)
    .await?;
    Ok(clinics
        .into_iter()
        .map(|(clinic_id, name)| ClinicStatus {
            clinic_id,
            name,
            active_rollout: active.iter().find(|r| r.clinic_id == clinic_id).cloned(),
            devices: rows
                .iter()
                .filter(|r| r.clinic_id == clinic_id)
                .map(|r| r.device.clone())
                .collect(),
        })
        .collect())
}

/// One rollout with its stages and devices; `None` if there is no such.
pub async fn rollout(pool: &PgPool, rollout_id: Uuid) -> Result<Option<RolloutDetail>, CloudError> {
    let summary: Option<RolloutSummary> = sqlx::query_as(&summary_sql("WHERE r.rollout_id = $1"))
        .bind(rollout_id)
        .fetch_optional(pool)
        .await?;
    let Some(summary) = summary else {
        return Ok(None);
    };
    #[allow(clippy::type_complexity)]
    let (
        downgrade,
        carries,
        encoder_model_id,
        archive_sha256,
        archive_size,
        signed_by,
        success,
        error,
    ): (
        bool,
        Vec<String>,
        Option<String>,
        String,
        i64,
        String,
        f32,
        f32,
    ) = sqlx::query_as(
        "SELECT b.downgrade, b.carries, b.encoder_model_id, b.archive_sha256, b.archive_size, \
                b.signed_by, r.success_threshold, r.error_threshold \
         FROM rollouts r JOIN bundles b ON b.bundle_id = r.bundle_id WHERE r.rollout_id = $1",
    )
    .bind(rollout_id)
    .fetch_one(pool)
    .await?;
    let stages: Vec<StageStatus> = sqlx::query_as(&format!(
        "SELECT s.stage, s.kind, s.percent, coalesce(cardinality(s.device_ids), 0) AS listed_devices, \
                {} AS started_at, {} AS finished_at, \
                extract(epoch FROM now() - s.finished_at)::bigint AS finished_age_s, \
                count(d.device_id) AS assigned, \
                count(*) FILTER (WHERE d.state = 'offered') AS offered, \
                count(*) FILTER (WHERE d.state = 'installed') AS installed, \
                count(*) FILTER (WHERE d.state = 'failed') AS failed, \
                count(*) FILTER (WHERE d.state = 'refused') AS refused, \
                count(*) FILTER (WHERE d.state = 'rollback_offered') AS rollback_offered, \
                count(*) FILTER (WHERE d.state = 'rolled_back') AS rolled_back \
         FROM rollout_stages s \
         LEFT JOIN rollout_devices d ON d.rollout_id = s.rollout_id AND d.stage = s.stage \
         WHERE s.rollout_id = $1 \
         GROUP BY s.rollout_id, s.stage \
         ORDER BY s.stage",
        rfc3339("s.started_at"),
        rfc3339("s.finished_at"),
    ))
    .bind(rollout_id)
    .fetch_all(pool)
    .await?;
    let devices: Vec<RolloutDevice> = sqlx::query_as(&format!(
        "SELECT d.device_id, v.name, d.stage, d.state, d.detail, {} AS updated_at, \
                extract(epoch FROM now() - d.updated_at)::bigint AS updated_age_s, \
                v.bundle_version \
         FROM rollout_devices d JOIN devices v ON v.device_id = d.device_id \
         WHERE d.rollout_id = $1 \
         ORDER BY d.stage, v.name, d.device_id",
        rfc3339("d.updated_at"),
    ))
    .bind(rollout_id)
    .fetch_all(pool)
    .await?;
    Ok(Some(RolloutDetail {
        summary,
        downgrade,
        carries,
        encoder_model_id,
        archive_sha256,
        archive_size,
        signed_by,
        success_threshold: success,
        error_threshold: error,
        stages,
        devices,
    }))
}
