//! Staged rollouts: creating one, the operator's pause/resume/rollback,
//! and the transitions a device's report or result causes.
//!
//! The rules (the schema's comments, `cloud/migrations/0002_updates.sql`):
//! stage 0 starts when the rollout is created, stage N+1 when stage N
//! reaches installed/assigned >= success threshold; a stage that takes in
//! no device finishes at once; after the last stage the rollout is `done`.
//! A failure or refusal that brings (failed+refused)/assigned of the
//! current stage to the error threshold pauses it. A rollback offers every
//! device that installed the bundle the way back, and the rollout is
//! `rolled_back` when none is left to do so.
//!
//! Every transition runs in one transaction holding the rollout's row
//! (`FOR UPDATE`), so reports that arrive together are applied one after
//! another and every count a decision reads is exact.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::bundles::{find_bundle, Bundle};
use super::Mode;
use crate::db;
use crate::error::CloudError;
use crate::operator;

/// Most stages one rollout may have.
pub const MAX_STAGES: usize = 100;

/// One stage as the operator writes it: `10%`, `devices:ID,ID`, `rest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StageSpec {
    /// That share of the clinic's unrevoked devices, rounded up, at least one.
    Percent { percent: u8 },
    /// These devices (ids), those not yet in the rollout.
    Devices { device_ids: Vec<String> },
    /// Every device not yet in the rollout.
    Rest,
}

impl FromStr for StageSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<StageSpec, String> {
        let text = text.trim();
        let usage =
            || format!("stage {text:?}: write a percentage (`10%`), `devices:ID,ID,...` or `rest`");
        if text == "rest" {
            return Ok(StageSpec::Rest);
        }
        if let Some(p) = text.strip_suffix('%') {
            let percent: u8 = p.trim().parse().map_err(|_| usage())?;
            if !(1..=100).contains(&percent) {
                return Err(format!("stage {text:?}: a percentage is 1% to 100%"));
            }
            return Ok(StageSpec::Percent { percent });
        }
        if let Some(list) = text.strip_prefix("devices:") {
            let device_ids: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if device_ids.is_empty() {
                return Err(format!("stage {text:?}: list at least one device id"));
            }
            for id in &device_ids {
                Uuid::parse_str(id)
                    .map_err(|_| format!("stage {text:?}: {id:?} is not a device id (a UUID)"))?;
            }
            return Ok(StageSpec::Devices { device_ids });
        }
        Err(usage())
    }
}

impl std::fmt::Display for StageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageSpec::Percent { percent } => write!(f, "{percent}%"),
            StageSpec::Devices { device_ids } => write!(f, "devices:{}", device_ids.join(",")),
            StageSpec::Rest => f.write_str("rest"),
        }
    }
}

/// What `rollout create` asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewRollout {
    /// A bundle id, or a version only one published bundle has.
    pub bundle: String,
    /// A clinic's name or id.
    pub clinic: String,
    pub stages: Vec<StageSpec>,
    pub success_threshold: f32,
    pub error_threshold: f32,
}

/// One stage's progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageStatus {
    pub stage: u32,
    #[serde(flatten)]
    pub spec: StageSpec,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Devices the stage took in.
    pub assigned: u64,
    pub offered: u64,
    pub installed: u64,
    pub failed: u64,
    pub refused: u64,
    pub rollback_offered: u64,
    pub rolled_back: u64,
}

/// One device of a rollout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutDevice {
    pub device_id: String,
    pub name: String,
    pub stage: u32,
    pub state: String,
    pub detail: Option<String>,
    pub updated_at: String,
}

/// A rollout as the operator sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub rollout_id: String,
    pub bundle_id: String,
    pub version: u64,
    pub clinic_id: String,
    pub clinic_name: String,
    /// `running`, `paused`, `rolling_back`, `rolled_back` or `done`.
    pub state: String,
    pub paused_reason: Option<String>,
    pub success_threshold: f32,
    pub error_threshold: f32,
    pub current_stage: u32,
    pub created_at: String,
    pub updated_at: String,
    pub stages: Vec<StageStatus>,
    /// Every device the started stages took in (empty in lists).
    pub devices: Vec<RolloutDevice>,
}

impl RolloutStatus {
    /// `done` and `rolled_back` never change again.
    pub fn finished(&self) -> bool {
        self.state == "done" || self.state == "rolled_back"
    }
}

/// The answer to a command that changes a rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Changed {
    pub rollout: RolloutStatus,
    /// False when the rollout already was as asked (nothing was written).
    pub changed: bool,
    /// Nothing was written, whatever `changed` says would happen.
    pub dry_run: bool,
    /// What happened, for a person.
    pub message: String,
}

// ---------------------------------------------------------------- reading

#[derive(sqlx::FromRow)]
struct RolloutRow {
    rollout_id: Uuid,
    bundle_id: Uuid,
    version: i64,
    clinic_id: Uuid,
    clinic_name: String,
    state: String,
    paused_reason: Option<String>,
    success_threshold: f32,
    error_threshold: f32,
    current_stage: i32,
    created_at: String,
    updated_at: String,
}

fn select_rollouts(filter: &str) -> String {
    format!(
        "SELECT r.rollout_id, r.bundle_id, b.version, r.clinic_id, c.name AS clinic_name, \
                r.state, r.paused_reason, r.success_threshold, r.error_threshold, \
                r.current_stage, {} AS created_at, {} AS updated_at \
         FROM rollouts r JOIN bundles b ON b.bundle_id = r.bundle_id \
              JOIN clinics c ON c.clinic_id = r.clinic_id {filter}",
        db::rfc3339("r.created_at"),
        db::rfc3339("r.updated_at"),
    )
}

#[derive(sqlx::FromRow)]
struct StageRow {
    stage: i32,
    kind: String,
    percent: Option<i32>,
    device_ids: Option<Vec<Uuid>>,
    started_at: Option<String>,
    finished_at: Option<String>,
    assigned: i64,
    offered: i64,
    installed: i64,
    failed: i64,
    refused: i64,
    rollback_offered: i64,
    rolled_back: i64,
}

fn spec_of(kind: &str, percent: Option<i32>, device_ids: Option<Vec<Uuid>>) -> StageSpec {
    match kind {
        "percent" => StageSpec::Percent {
            percent: percent.and_then(|p| u8::try_from(p).ok()).unwrap_or(0),
        },
        "devices" => StageSpec::Devices {
            device_ids: device_ids
                .unwrap_or_default()
                .iter()
                .map(Uuid::to_string)
                .collect(),
        },
        _ => StageSpec::Rest,
    }
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

async fn stages_of(conn: &mut PgConnection, id: Uuid) -> Result<Vec<StageStatus>, sqlx::Error> {
    let rows: Vec<StageRow> = sqlx::query_as(&format!(
        "SELECT s.stage, s.kind, s.percent, s.device_ids, \
                {} AS started_at, {} AS finished_at, \
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
         GROUP BY s.stage, s.kind, s.percent, s.device_ids, s.started_at, s.finished_at \
         ORDER BY s.stage",
        db::rfc3339("s.started_at"),
        db::rfc3339("s.finished_at"),
    ))
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| StageStatus {
            stage: u32::try_from(r.stage).unwrap_or(0),
            spec: spec_of(&r.kind, r.percent, r.device_ids),
            started_at: r.started_at,
            finished_at: r.finished_at,
            assigned: count(r.assigned),
            offered: count(r.offered),
            installed: count(r.installed),
            failed: count(r.failed),
            refused: count(r.refused),
            rollback_offered: count(r.rollback_offered),
            rolled_back: count(r.rolled_back),
        })
        .collect())
}

async fn devices_of(conn: &mut PgConnection, id: Uuid) -> Result<Vec<RolloutDevice>, sqlx::Error> {
    let rows: Vec<(Uuid, String, i32, String, Option<String>, String)> = sqlx::query_as(&format!(
        "SELECT d.device_id, v.name, d.stage, d.state, d.detail, {} \
             FROM rollout_devices d JOIN devices v ON v.device_id = d.device_id \
             WHERE d.rollout_id = $1 ORDER BY d.stage, v.name, d.device_id",
        db::rfc3339("d.updated_at")
    ))
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(device_id, name, stage, state, detail, updated_at)| RolloutDevice {
                device_id: device_id.to_string(),
                name,
                stage: u32::try_from(stage).unwrap_or(0),
                state,
                detail,
                updated_at,
            },
        )
        .collect())
}

async fn status_of(
    conn: &mut PgConnection,
    row: RolloutRow,
    with_devices: bool,
) -> Result<RolloutStatus, sqlx::Error> {
    let stages = stages_of(conn, row.rollout_id).await?;
    let devices = if with_devices {
        devices_of(conn, row.rollout_id).await?
    } else {
        Vec::new()
    };
    Ok(RolloutStatus {
        rollout_id: row.rollout_id.to_string(),
        bundle_id: row.bundle_id.to_string(),
        version: u64::try_from(row.version).unwrap_or(0),
        clinic_id: row.clinic_id.to_string(),
        clinic_name: row.clinic_name,
        state: row.state,
        paused_reason: row.paused_reason,
        success_threshold: row.success_threshold,
        error_threshold: row.error_threshold,
        current_stage: u32::try_from(row.current_stage).unwrap_or(0),
        created_at: row.created_at,
        updated_at: row.updated_at,
        stages,
        devices,
    })
}

async fn status_in(conn: &mut PgConnection, id: Uuid) -> Result<RolloutStatus, CloudError> {
    let row: Option<RolloutRow> = sqlx::query_as(&select_rollouts("WHERE r.rollout_id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    let row = row.ok_or_else(|| CloudError::NotFound(format!("no rollout {id}")))?;
    Ok(status_of(conn, row, true).await?)
}

fn parse_rollout_id(id: &str) -> Result<Uuid, CloudError> {
    Uuid::parse_str(id.trim())
        .map_err(|_| CloudError::Invalid(format!("{id:?} is not a rollout id (a UUID)")))
}

/// One rollout with its stages and devices.
pub async fn rollout_status(pool: &PgPool, rollout_id: &str) -> Result<RolloutStatus, CloudError> {
    let id = parse_rollout_id(rollout_id)?;
    let mut conn = pool.acquire().await?;
    status_in(&mut conn, id).await
}

/// Every rollout (or one clinic's, by name or id), newest first, with
/// their stages but not their devices.
pub async fn list_rollouts(
    pool: &PgPool,
    clinic: Option<&str>,
) -> Result<Vec<RolloutStatus>, CloudError> {
    let clinic_id = match clinic {
        Some(c) => Some(clinic_uuid(&operator::find_clinic(pool, c).await?)?),
        None => None,
    };
    let mut conn = pool.acquire().await?;
    let rows: Vec<RolloutRow> = sqlx::query_as(&select_rollouts(
        "WHERE $1::uuid IS NULL OR r.clinic_id = $1 \
         ORDER BY r.created_at DESC, r.rollout_id DESC",
    ))
    .bind(clinic_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(status_of(&mut conn, row, false).await?);
    }
    Ok(out)
}

fn clinic_uuid(clinic: &operator::Clinic) -> Result<Uuid, CloudError> {
    Uuid::parse_str(&clinic.clinic_id)
        .map_err(|_| CloudError::Invalid("the clinic's id is not a UUID".into()))
}

// ------------------------------------------------------------ transitions

/// The rollout's row, held until the transaction ends.
#[derive(sqlx::FromRow)]
struct Locked {
    clinic_id: Uuid,
    state: String,
    success_threshold: f32,
    error_threshold: f32,
    current_stage: i32,
    stages: i64,
}

async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Locked, CloudError> {
    let row: Option<Locked> = sqlx::query_as(
        "SELECT clinic_id, state, success_threshold, error_threshold, current_stage, \
                (SELECT count(*) FROM rollout_stages s WHERE s.rollout_id = r.rollout_id) \
                  AS stages \
         FROM rollouts r WHERE rollout_id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.ok_or_else(|| CloudError::NotFound(format!("no rollout {id}")))
}

/// `(assigned, installed, failed + refused)` of one stage.
async fn stage_counts(
    conn: &mut PgConnection,
    id: Uuid,
    stage: i32,
) -> Result<(i64, i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'installed'), \
                count(*) FILTER (WHERE state IN ('failed', 'refused')) \
         FROM rollout_devices WHERE rollout_id = $1 AND stage = $2",
    )
    .bind(id)
    .bind(stage)
    .fetch_one(&mut *conn)
    .await
}

/// Whether `part / whole` reaches `threshold`. In f32, where both the
/// threshold the operator wrote and the ratio of two small integers are
/// the nearest f32 to their exact value, so 1 of 5 reaches 0.2 exactly.
/// The one threshold rule: the rollout logic decides with it and the
/// status page counts with it.
pub(crate) fn reaches(part: i64, whole: i64, threshold: f32) -> bool {
    whole > 0 && (part as f32) / (whole as f32) >= threshold
}

fn percent_text(threshold: f32) -> String {
    let p = threshold * 100.0;
    if (p - p.round()).abs() < 0.05 {
        format!("{}%", p.round())
    } else {
        format!("{p:.1}%")
    }
}

/// Takes a stage's devices in as `offered` and marks it started.
async fn start_stage(
    conn: &mut PgConnection,
    id: Uuid,
    clinic_id: Uuid,
    stage: i32,
) -> Result<u64, sqlx::Error> {
    let (kind, percent, device_ids): (String, Option<i32>, Option<Vec<Uuid>>) = sqlx::query_as(
        "UPDATE rollout_stages SET started_at = now() WHERE rollout_id = $1 AND stage = $2 \
         RETURNING kind, percent, device_ids",
    )
    .bind(id)
    .bind(stage)
    .fetch_one(&mut *conn)
    .await?;
    // Unrevoked devices of the clinic not yet in this rollout, in the
    // rollout's own stable, spread order.
    const CANDIDATES: &str = "INSERT INTO rollout_devices (rollout_id, device_id, stage, state) \
         SELECT $1, d.device_id, $2, 'offered' FROM devices d \
         WHERE d.clinic_id = $3 AND d.revoked_at IS NULL \
           AND NOT EXISTS (SELECT 1 FROM rollout_devices x \
                           WHERE x.rollout_id = $1 AND x.device_id = d.device_id) ";
    let taken = match kind.as_str() {
        "percent" => {
            let total: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM devices WHERE clinic_id = $1 AND revoked_at IS NULL",
            )
            .bind(clinic_id)
            .fetch_one(&mut *conn)
            .await?;
            let p = i64::from(percent.unwrap_or(100));
            let n = ((total * p + 99) / 100).max(1);
            sqlx::query(&format!(
                "{CANDIDATES} ORDER BY md5($1::text || d.device_id::text) LIMIT $4"
            ))
            .bind(id)
            .bind(stage)
            .bind(clinic_id)
            .bind(n)
            .execute(&mut *conn)
            .await?
        }
        "devices" => {
            sqlx::query(&format!("{CANDIDATES} AND d.device_id = ANY($4)"))
                .bind(id)
                .bind(stage)
                .bind(clinic_id)
                .bind(device_ids.unwrap_or_default())
                .execute(&mut *conn)
                .await?
        }
        _ => {
            sqlx::query(CANDIDATES)
                .bind(id)
                .bind(stage)
                .bind(clinic_id)
                .execute(&mut *conn)
                .await?
        }
    };
    tracing::info!(rollout = %id, stage, devices = taken.rows_affected(), "stage started");
    Ok(taken.rows_affected())
}

/// While running: finishes every stage that reached its success threshold
/// (or took in no device), starting the next, and ends `done` after the
/// last.
async fn advance(conn: &mut PgConnection, id: Uuid) -> Result<(), CloudError> {
    loop {
        let r = lock(conn, id).await?;
        if r.state != "running" {
            return Ok(());
        }
        let stage = r.current_stage;
        let (assigned, installed, _) = stage_counts(conn, id, stage).await?;
        if assigned > 0 && !reaches(installed, assigned, r.success_threshold) {
            return Ok(());
        }
        sqlx::query(
            "UPDATE rollout_stages SET finished_at = coalesce(finished_at, now()) \
             WHERE rollout_id = $1 AND stage = $2",
        )
        .bind(id)
        .bind(stage)
        .execute(&mut *conn)
        .await?;
        if i64::from(stage) + 1 >= r.stages {
            sqlx::query(
                "UPDATE rollouts SET state = 'done', paused_reason = NULL, updated_at = now() \
                 WHERE rollout_id = $1",
            )
            .bind(id)
            .execute(&mut *conn)
            .await?;
            tracing::info!(rollout = %id, "rollout done");
            return Ok(());
        }
        sqlx::query(
            "UPDATE rollouts SET current_stage = $2, updated_at = now() WHERE rollout_id = $1",
        )
        .bind(id)
        .bind(stage + 1)
        .execute(&mut *conn)
        .await?;
        start_stage(conn, id, r.clinic_id, stage + 1).await?;
    }
}

/// While running: pauses when the current stage's failures and refusals
/// reach the error threshold.
async fn check_errors(conn: &mut PgConnection, id: Uuid) -> Result<(), CloudError> {
    let r = lock(conn, id).await?;
    if r.state != "running" {
        return Ok(());
    }
    let (assigned, _, bad) = stage_counts(conn, id, r.current_stage).await?;
    if reaches(bad, assigned, r.error_threshold) {
        let reason = format!(
            "{bad} of {assigned} devices of stage {} failed or refused the bundle (threshold {})",
            r.current_stage,
            percent_text(r.error_threshold)
        );
        sqlx::query(
            "UPDATE rollouts SET state = 'paused', paused_reason = $2, updated_at = now() \
             WHERE rollout_id = $1",
        )
        .bind(id)
        .bind(&reason)
        .execute(&mut *conn)
        .await?;
        tracing::warn!(rollout = %id, %reason, "rollout paused");
    }
    Ok(())
}

/// While rolling back: `rolled_back` once no device is left to roll back.
async fn finish_rollback(conn: &mut PgConnection, id: Uuid) -> Result<(), CloudError> {
    let r = lock(conn, id).await?;
    if r.state != "rolling_back" {
        return Ok(());
    }
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rollout_devices WHERE rollout_id = $1 AND state = 'rollback_offered'",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    if left == 0 {
        sqlx::query(
            "UPDATE rollouts SET state = 'rolled_back', updated_at = now() WHERE rollout_id = $1",
        )
        .bind(id)
        .execute(&mut *conn)
        .await?;
        tracing::info!(rollout = %id, "rollout rolled back");
    }
    Ok(())
}

/// What a device said, as it bears on its rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DeviceEvent {
    /// A `DeviceReport`: what it runs and what it marked failed.
    Report {
        bundle_version: Option<u64>,
        failed_versions: Vec<u64>,
    },
    /// An `UpdateResult`.
    Result {
        outcome: dermascope_cloud_api::UpdateOutcome,
        detail: Option<String>,
    },
}

/// The device's state after `event`, when it changes it.
pub(crate) fn next_state(
    rollout_state: &str,
    device_state: &str,
    version: u64,
    event: &DeviceEvent,
) -> Option<(&'static str, Option<String>)> {
    use dermascope_cloud_api::UpdateOutcome as O;
    let installed = if rollout_state == "rolling_back" {
        // Installed after the operator asked to roll back: it goes back too.
        "rollback_offered"
    } else {
        "installed"
    };
    match (device_state, event) {
        (
            "offered",
            DeviceEvent::Report {
                bundle_version,
                failed_versions,
            },
        ) => {
            if *bundle_version == Some(version) {
                Some((installed, None))
            } else if failed_versions.contains(&version) {
                Some((
                    "failed",
                    Some(format!("the device lists version {version} as failed")),
                ))
            } else {
                None
            }
        }
        ("rollback_offered", DeviceEvent::Report { bundle_version, .. }) => {
            (*bundle_version != Some(version)).then_some(("rolled_back", None))
        }
        ("offered", DeviceEvent::Result { outcome, detail }) => match outcome {
            O::Installed => Some((installed, detail.clone())),
            O::Refused => Some(("refused", detail.clone())),
            O::Failed => Some(("failed", detail.clone())),
            O::RolledBack => None,
        },
        ("rollback_offered", DeviceEvent::Result { outcome, detail }) => {
            (*outcome == O::RolledBack).then(|| ("rolled_back", detail.clone()))
        }
        _ => None,
    }
}

/// Applies `event` of `device_id` to its row in rollout `id`, with every
/// consequence for the rollout, in one transaction. Returns whether
/// anything changed.
pub(crate) async fn apply_device_event(
    pool: &PgPool,
    id: Uuid,
    device_id: Uuid,
    version: u64,
    event: &DeviceEvent,
) -> Result<bool, CloudError> {
    let mut tx = pool.begin().await?;
    let r = lock(&mut tx, id).await?;
    let device_state: Option<String> = sqlx::query_scalar(
        "SELECT state FROM rollout_devices WHERE rollout_id = $1 AND device_id = $2",
    )
    .bind(id)
    .bind(device_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(device_state) = device_state else {
        return Ok(false);
    };
    let Some((next, detail)) = next_state(&r.state, &device_state, version, event) else {
        return Ok(false);
    };
    sqlx::query(
        "UPDATE rollout_devices SET state = $3, detail = $4, updated_at = now() \
         WHERE rollout_id = $1 AND device_id = $2",
    )
    .bind(id)
    .bind(device_id)
    .bind(next)
    .bind(&detail)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE rollouts SET updated_at = now() WHERE rollout_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    match next {
        "installed" => advance(&mut tx, id).await?,
        "failed" | "refused" => check_errors(&mut tx, id).await?,
        "rolled_back" => finish_rollback(&mut tx, id).await?,
        _ => {}
    }
    tx.commit().await?;
    tracing::info!(rollout = %id, device = %device_id, from = %device_state, to = next, "device moved");
    Ok(true)
}

// -------------------------------------------------------- operator commands

fn check_thresholds(success: f32, error: f32) -> Result<(), CloudError> {
    for (name, t) in [("success", success), ("error", error)] {
        if !(t > 0.0 && t <= 1.0) {
            return Err(CloudError::Invalid(format!(
                "the {name} threshold is a share above 0 and at most 1 (0.9 = 90%), not {t}"
            )));
        }
    }
    Ok(())
}

/// The stages, checked against the clinic: every listed device exists, is
/// the clinic's and is not revoked; `rest` comes last.
async fn check_stages(
    conn: &mut PgConnection,
    clinic_id: Uuid,
    stages: &[StageSpec],
) -> Result<(), CloudError> {
    if stages.is_empty() || stages.len() > MAX_STAGES {
        return Err(CloudError::Invalid(format!(
            "a rollout has 1 to {MAX_STAGES} stages (--stage 10% --stage devices:ID,ID --stage rest)"
        )));
    }
    for (i, stage) in stages.iter().enumerate() {
        match stage {
            StageSpec::Rest if i + 1 != stages.len() => {
                return Err(CloudError::Invalid(
                    "`rest` takes every remaining device, so it must be the last stage".into(),
                ));
            }
            StageSpec::Percent { percent } if !(1..=100).contains(percent) => {
                return Err(CloudError::Invalid(format!(
                    "stage {i}: a percentage is 1% to 100%, not {percent}%"
                )));
            }
            StageSpec::Devices { device_ids } => {
                if device_ids.is_empty() {
                    return Err(CloudError::Invalid(format!(
                        "stage {i}: list at least one device"
                    )));
                }
                for id in device_ids {
                    let uuid = Uuid::parse_str(id).map_err(|_| {
                        CloudError::Invalid(format!("stage {i}: {id:?} is not a device id"))
                    })?;
                    let ok: Option<bool> = sqlx::query_scalar(
                        "SELECT revoked_at IS NULL FROM devices \
                         WHERE device_id = $1 AND clinic_id = $2",
                    )
                    .bind(uuid)
                    .bind(clinic_id)
                    .fetch_optional(&mut *conn)
                    .await?;
                    match ok {
                        None => {
                            return Err(CloudError::Invalid(format!(
                                "stage {i}: device {id} is not a device of this clinic"
                            )))
                        }
                        Some(false) => {
                            return Err(CloudError::Invalid(format!(
                                "stage {i}: device {id} is revoked"
                            )))
                        }
                        Some(true) => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn same_stages(a: &[StageSpec], b: &[StageSpec]) -> bool {
    let norm = |s: &StageSpec| match s {
        StageSpec::Devices { device_ids } => {
            let mut ids: Vec<String> = device_ids.iter().map(|d| d.to_lowercase()).collect();
            ids.sort();
            ids.dedup();
            StageSpec::Devices { device_ids: ids }
        }
        other => other.clone(),
    };
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| norm(x) == norm(y))
}

fn is_unique_violation(e: &CloudError) -> bool {
    matches!(e, CloudError::Database(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505"))
}

async fn finish<T>(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    mode: Mode,
    value: T,
) -> Result<T, CloudError> {
    match mode {
        Mode::Apply => tx.commit().await?,
        Mode::DryRun => tx.rollback().await?,
    }
    Ok(value)
}

/// Creates a rollout and starts its first stage. An identical rollout
/// (same bundle, stages and thresholds) already active in the clinic is
/// returned unchanged; a different one is a conflict, since two rollouts
/// at once would offer a device two bundles.
pub async fn create_rollout(
    pool: &PgPool,
    new: &NewRollout,
    mode: Mode,
) -> Result<Changed, CloudError> {
    check_thresholds(new.success_threshold, new.error_threshold)?;
    let clinic = operator::find_clinic(pool, &new.clinic).await?;
    let clinic_id = clinic_uuid(&clinic)?;
    let bundle = find_bundle(pool, &new.bundle).await?;
    // A concurrent identical create loses on the one-active-rollout index;
    // the second attempt then finds the winner's rollout and returns it.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_create(pool, new, clinic_id, &clinic.name, &bundle, mode).await {
            Err(e) if attempt < 3 && is_unique_violation(&e) => continue,
            other => return other,
        }
    }
}

async fn try_create(
    pool: &PgPool,
    new: &NewRollout,
    clinic_id: Uuid,
    clinic_name: &str,
    bundle: &Bundle,
    mode: Mode,
) -> Result<Changed, CloudError> {
    let bundle_id = Uuid::parse_str(&bundle.bundle_id)
        .map_err(|_| CloudError::Invalid("the bundle's id is not a UUID".into()))?;
    let mut tx = pool.begin().await?;
    check_stages(&mut tx, clinic_id, &new.stages).await?;
    let active: Option<Uuid> = sqlx::query_scalar(
        "SELECT rollout_id FROM rollouts \
         WHERE clinic_id = $1 AND state IN ('running', 'paused', 'rolling_back') FOR UPDATE",
    )
    .bind(clinic_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(active) = active {
        let status = status_in(&mut tx, active).await?;
        let stages: Vec<StageSpec> = status.stages.iter().map(|s| s.spec.clone()).collect();
        let identical = status.bundle_id == bundle.bundle_id
            && status.success_threshold == new.success_threshold
            && status.error_threshold == new.error_threshold
            && same_stages(&stages, &new.stages);
        tx.rollback().await?;
        if identical {
            return Ok(Changed {
                message: format!(
                    "rollout {active} of version {} to {clinic_name} exists already ({})",
                    status.version, status.state
                ),
                rollout: status,
                changed: false,
                dry_run: mode == Mode::DryRun,
            });
        }
        return Err(CloudError::Conflict(format!(
            "clinic {clinic_name} has an active rollout, {active} of version {} ({}); \
             wait for it, or roll it back, before starting another",
            status.version, status.state
        )));
    }

    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO rollouts (rollout_id, bundle_id, clinic_id, state, success_threshold, \
             error_threshold, current_stage) VALUES ($1, $2, $3, 'running', $4, $5, 0)",
    )
    .bind(id)
    .bind(bundle_id)
    .bind(clinic_id)
    .bind(new.success_threshold)
    .bind(new.error_threshold)
    .execute(&mut *tx)
    .await?;
    for (i, stage) in new.stages.iter().enumerate() {
        let (kind, percent, ids): (&str, Option<i32>, Option<Vec<Uuid>>) = match stage {
            StageSpec::Percent { percent } => ("percent", Some(i32::from(*percent)), None),
            StageSpec::Devices { device_ids } => (
                "devices",
                None,
                Some(
                    device_ids
                        .iter()
                        .filter_map(|d| Uuid::parse_str(d).ok())
                        .collect(),
                ),
            ),
            StageSpec::Rest => ("rest", None, None),
        };
        sqlx::query(
            "INSERT INTO rollout_stages (rollout_id, stage, kind, percent, device_ids) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(i as i32)
        .bind(kind)
        .bind(percent)
        .bind(ids)
        .execute(&mut *tx)
        .await?;
    }
    start_stage(&mut tx, id, clinic_id, 0).await?;
    advance(&mut tx, id).await?;
    let status = status_in(&mut tx, id).await?;
    let message = format!(
        "rollout {id} of version {} to {clinic_name}: stage 0 offers it to {} device(s); now {}",
        status.version,
        status.stages.first().map_or(0, |s| s.assigned),
        status.state
    );
    if mode == Mode::Apply {
        tracing::info!(rollout = %id, version = status.version, "rollout created");
    }
    finish(
        tx,
        mode,
        Changed {
            rollout: status,
            changed: true,
            dry_run: mode == Mode::DryRun,
            message,
        },
    )
    .await
}

/// The operator's three commands on a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Pause,
    Resume,
    Rollback,
}

async fn command(
    pool: &PgPool,
    rollout_id: &str,
    command: Command,
    mode: Mode,
) -> Result<Changed, CloudError> {
    let id = parse_rollout_id(rollout_id)?;
    command_on(pool, id, command, mode)
        .await
        .map_err(|e| match e {
            // Rolling a done rollout back while another of its clinic is
            // active would make two active ones (the schema's unique index).
            e if is_unique_violation(&e) => CloudError::Conflict(format!(
                "rollout {id} cannot roll back while another rollout of its clinic is active"
            )),
            e => e,
        })
}

async fn command_on(
    pool: &PgPool,
    id: Uuid,
    command: Command,
    mode: Mode,
) -> Result<Changed, CloudError> {
    let mut tx = pool.begin().await?;
    let r = lock(&mut tx, id).await?;
    let state = r.state.as_str();
    let unchanged = |message: String| (false, message);
    let (changed, message) = match (command, state) {
        (Command::Pause, "paused") => unchanged(format!("rollout {id} is paused already")),
        (Command::Pause, "running") => {
            sqlx::query(
                "UPDATE rollouts SET state = 'paused', paused_reason = 'paused by the operator', \
                     updated_at = now() WHERE rollout_id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            (
                true,
                format!("rollout {id} paused: no device is offered the bundle until `resume`"),
            )
        }
        (Command::Resume, "running") => unchanged(format!("rollout {id} is running already")),
        (Command::Resume, "paused") => {
            sqlx::query(
                "UPDATE rollouts SET state = 'running', paused_reason = NULL, updated_at = now() \
                 WHERE rollout_id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            // Devices may have installed while it was paused.
            advance(&mut tx, id).await?;
            (true, format!("rollout {id} resumed"))
        }
        (Command::Rollback, "rolling_back" | "rolled_back") => unchanged(format!(
            "rollout {id} is {} already",
            state.replace('_', " ")
        )),
        (Command::Rollback, "running" | "paused" | "done") => {
            let moved = sqlx::query(
                "UPDATE rollout_devices SET state = 'rollback_offered', updated_at = now() \
                 WHERE rollout_id = $1 AND state = 'installed'",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query(
                "UPDATE rollouts SET state = 'rolling_back', paused_reason = NULL, \
                     updated_at = now() WHERE rollout_id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            finish_rollback(&mut tx, id).await?;
            (
                true,
                format!("rollout {id} rolling back: {moved} device(s) that installed it are offered the way back"),
            )
        }
        (_, other) => {
            return Err(CloudError::Conflict(format!(
                "rollout {id} is {}: it cannot be {}",
                other.replace('_', " "),
                match command {
                    Command::Pause => "paused",
                    Command::Resume => "resumed",
                    Command::Rollback => "rolled back",
                }
            )))
        }
    };
    let status = status_in(&mut tx, id).await?;
    if changed && mode == Mode::Apply {
        tracing::info!(rollout = %id, ?command, state = %status.state, "rollout changed by the operator");
    }
    finish(
        tx,
        mode,
        Changed {
            rollout: status,
            changed,
            dry_run: mode == Mode::DryRun,
            message,
        },
    )
    .await
}

/// Stops offering the bundle; devices that have it keep it.
pub async fn pause_rollout(
    pool: &PgPool,
    rollout_id: &str,
    mode: Mode,
) -> Result<Changed, CloudError> {
    command(pool, rollout_id, Command::Pause, mode).await
}

/// Offers the bundle again (a paused rollout whose stage reached its
/// success threshold meanwhile moves on at once).
pub async fn resume_rollout(
    pool: &PgPool,
    rollout_id: &str,
    mode: Mode,
) -> Result<Changed, CloudError> {
    command(pool, rollout_id, Command::Resume, mode).await
}

/// Offers every device that installed the bundle a rollback.
pub async fn rollback_rollout(
    pool: &PgPool,
    rollout_id: &str,
    mode: Mode,
) -> Result<Changed, CloudError> {
    command(pool, rollout_id, Command::Rollback, mode).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use dermascope_cloud_api::UpdateOutcome;

    #[test]
    fn stages_parse_as_the_operator_writes_them() {
        assert_eq!(
            "10%".parse::<StageSpec>(),
            Ok(StageSpec::Percent { percent: 10 })
        );
        assert_eq!("rest".parse::<StageSpec>(), Ok(StageSpec::Rest));
        let id = Uuid::now_v7().to_string();
        assert_eq!(
            format!("devices:{id}, {id}").parse::<StageSpec>(),
            Ok(StageSpec::Devices {
                device_ids: vec![id.clone(), id.clone()]
            })
        );
        for bad in ["0%", "101%", "ten%", "devices:", "devices:nope", "all", ""] {
            assert!(bad.parse::<StageSpec>().is_err(), "{bad}");
        }
        assert_eq!(StageSpec::Percent { percent: 25 }.to_string(), "25%");
    }

    #[test]
    fn thresholds_compare_exactly_at_the_boundary() {
        assert!(reaches(1, 5, 0.2));
        assert!(reaches(9, 10, 0.9));
        assert!(!reaches(8, 10, 0.9));
        assert!(reaches(1, 4, 0.25));
        assert!(!reaches(0, 0, 0.1));
        assert!(reaches(7, 10, 0.7));
        assert!(reaches(3, 10, 0.3));
        assert_eq!(percent_text(0.25), "25%");
        assert_eq!(percent_text(0.125), "12.5%");
    }

    #[test]
    fn a_failed_device_is_never_offered_again() {
        let failed = DeviceEvent::Result {
            outcome: UpdateOutcome::Failed,
            detail: None,
        };
        assert_eq!(
            next_state("running", "offered", 5, &failed).map(|s| s.0),
            Some("failed")
        );
        let installed = DeviceEvent::Result {
            outcome: UpdateOutcome::Installed,
            detail: None,
        };
        for from in ["failed", "refused", "installed", "rolled_back"] {
            assert_eq!(next_state("running", from, 5, &installed), None, "{from}");
        }
        let report = DeviceEvent::Report {
            bundle_version: Some(4),
            failed_versions: vec![5],
        };
        assert_eq!(
            next_state("running", "offered", 5, &report).map(|s| s.0),
            Some("failed")
        );
        let runs_it = DeviceEvent::Report {
            bundle_version: Some(5),
            failed_versions: vec![],
        };
        assert_eq!(
            next_state("rolling_back", "offered", 5, &runs_it).map(|s| s.0),
            Some("rollback_offered")
        );
        assert_eq!(
            next_state("rolling_back", "rollback_offered", 5, &runs_it),
            None
        );
        assert_eq!(
            next_state("rolling_back", "rollback_offered", 5, &report).map(|s| s.0),
            Some("rolled_back")
        );
    }

    #[test]
    fn identical_stages_ignore_device_order_and_case() {
        let a = Uuid::now_v7().to_string();
        let b = Uuid::now_v7().to_string();
        let x = vec![
            StageSpec::Devices {
                device_ids: vec![a.clone(), b.clone()],
            },
            StageSpec::Rest,
        ];
        let y = vec![
            StageSpec::Devices {
                device_ids: vec![b.to_uppercase(), a],
            },
            StageSpec::Rest,
        ];
        assert!(same_stages(&x, &y));
        assert!(!same_stages(&x, &y[1..]));
    }
}
