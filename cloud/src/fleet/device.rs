//! The device's side: `POST /v1/update` (report -> offer),
//! `POST /v1/update/result`, and `GET /v1/bundles/{id}/archive` with a
//! single byte range.
//!
//! A device is answered from its row in the clinic's newest rollout only:
//! an older rollout's bundle is never offered once a newer one exists.
//! The archive goes only to a device that a rollout of that bundle in its
//! own clinic offered it to (or that installed it); anyone else gets the
//! same 404 as for a bundle that does not exist.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dermascope_cloud_api::{
    codes, DeviceReport, UpdateAck, UpdateOffer, UpdateResult, MAX_UPDATE_DETAIL,
};
use sqlx::PgPool;
use uuid::Uuid;

use super::bundles::{read_chunk, CHUNK_BYTES};
use super::rollouts::{apply_device_event, next_state, DeviceEvent};
use crate::auth::Viewer;
use crate::error::{db_error_kind, ApiError, ApiJson};
use crate::server::AppState;

/// Most failed versions a report may list.
const MAX_FAILED_VERSIONS: usize = 1000;

fn check_text(what: &str, text: &str, max: usize) -> Result<(), ApiError> {
    if text.is_empty() || text.chars().count() > max || text.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{what} is 1 to {max} printable characters"
        )));
    }
    Ok(())
}

fn as_i64(what: &str, n: u64) -> Result<i64, ApiError> {
    i64::try_from(n).map_err(|_| ApiError::bad_request(format!("{what} is too large")))
}

/// The device's row in its clinic's newest rollout.
#[derive(sqlx::FromRow)]
struct Membership {
    rollout_id: Uuid,
    rollout_state: String,
    device_state: String,
    bundle_id: Uuid,
    version: i64,
    archive_sha256: String,
    archive_size: i64,
}

async fn membership(pool: &PgPool, viewer: &Viewer) -> Result<Option<Membership>, sqlx::Error> {
    sqlx::query_as(
        "SELECT r.rollout_id, r.state AS rollout_state, d.state AS device_state, \
                b.bundle_id, b.version, b.archive_sha256, b.archive_size \
         FROM (SELECT rollout_id, state, bundle_id FROM rollouts WHERE clinic_id = $1 \
               ORDER BY created_at DESC, rollout_id DESC LIMIT 1) r \
         JOIN bundles b ON b.bundle_id = r.bundle_id \
         JOIN rollout_devices d ON d.rollout_id = r.rollout_id AND d.device_id = $2",
    )
    .bind(viewer.clinic_id)
    .bind(viewer.device_id)
    .fetch_optional(pool)
    .await
}

fn offer(m: &Membership) -> UpdateOffer {
    match (m.rollout_state.as_str(), m.device_state.as_str()) {
        // `done` still serves the stragglers of its last stages.
        ("running" | "done", "offered") => UpdateOffer::Install {
            rollout_id: m.rollout_id.to_string(),
            bundle_id: m.bundle_id.to_string(),
            version: u64::try_from(m.version).unwrap_or(0),
            archive_sha256: m.archive_sha256.clone(),
            archive_size: u64::try_from(m.archive_size).unwrap_or(0),
        },
        ("rolling_back", "rollback_offered") => UpdateOffer::Rollback {
            rollout_id: m.rollout_id.to_string(),
            version: u64::try_from(m.version).unwrap_or(0),
        },
        _ => UpdateOffer::None,
    }
}

/// `POST /v1/update`: records what the device runs, settles its rollout
/// row from it (running the version = installed, listing it failed =
/// failed, no longer running it after a rollback offer = rolled back),
/// and answers what its row asks of it now.
pub async fn report(
    State(state): State<AppState>,
    viewer: Viewer,
    ApiJson(report): ApiJson<DeviceReport>,
) -> Result<Json<UpdateOffer>, ApiError> {
    check_text("daemon_version", &report.daemon_version, 64)?;
    check_text("encoder_model_id", &report.encoder_model_id, 128)?;
    if report.failed_versions.len() > MAX_FAILED_VERSIONS {
        return Err(ApiError::bad_request(format!(
            "failed_versions lists at most {MAX_FAILED_VERSIONS} versions"
        )));
    }
    let bundle_version = report
        .bundle_version
        .map(|v| as_i64("bundle_version", v))
        .transpose()?;
    let pending = as_i64("pending_uploads", report.pending_uploads)?;
    sqlx::query(
        "UPDATE devices SET daemon_version = $2, bundle_version = $3, encoder_model_id = $4, \
             pending_uploads = $5, reported_at = now() WHERE device_id = $1",
    )
    .bind(viewer.device_id)
    .bind(&report.daemon_version)
    .bind(bundle_version)
    .bind(&report.encoder_model_id)
    .bind(pending)
    .execute(&state.pool)
    .await?;

    let Some(mut m) = membership(&state.pool, &viewer).await? else {
        return Ok(Json(UpdateOffer::None));
    };
    let event = DeviceEvent::Report {
        bundle_version: report.bundle_version,
        failed_versions: report.failed_versions,
    };
    let version = u64::try_from(m.version).unwrap_or(0);
    // Checked without the lock first: most reports change nothing, and
    // only a change needs the rollout's row.
    if next_state(&m.rollout_state, &m.device_state, version, &event).is_some() {
        apply_device_event(&state.pool, m.rollout_id, viewer.device_id, version, &event).await?;
        match membership(&state.pool, &viewer).await? {
            Some(now) => m = now,
            None => return Ok(Json(UpdateOffer::None)),
        }
    }
    let answer = offer(&m);
    tracing::debug!(device = %viewer.device_id, rollout = %m.rollout_id, state = %m.device_state, "update report");
    Ok(Json(answer))
}

/// At most [`MAX_UPDATE_DETAIL`] characters, control characters as spaces.
fn clean_detail(detail: Option<String>) -> Option<String> {
    let detail = detail?;
    let clean: String = detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_UPDATE_DETAIL)
        .collect();
    let clean = clean.trim().to_string();
    (!clean.is_empty()).then_some(clean)
}

/// `POST /v1/update/result`. A result the device's row has already moved
/// past (a retry, or a report that settled it first) is acknowledged with
/// `recorded: false`, so a device never retries forever.
pub async fn result(
    State(state): State<AppState>,
    viewer: Viewer,
    ApiJson(result): ApiJson<UpdateResult>,
) -> Result<Json<UpdateAck>, ApiError> {
    let not_in = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            codes::NOT_IN_ROLLOUT,
            "this device is not part of that rollout",
        )
    };
    let rollout_id = Uuid::parse_str(result.rollout_id.trim()).map_err(|_| not_in())?;
    let version: Option<i64> = sqlx::query_scalar(
        "SELECT b.version FROM rollouts r JOIN bundles b ON b.bundle_id = r.bundle_id \
         JOIN rollout_devices d ON d.rollout_id = r.rollout_id AND d.device_id = $3 \
         WHERE r.rollout_id = $1 AND r.clinic_id = $2",
    )
    .bind(rollout_id)
    .bind(viewer.clinic_id)
    .bind(viewer.device_id)
    .fetch_optional(&state.pool)
    .await?;
    let version = version.ok_or_else(not_in)?;
    if u64::try_from(version).ok() != Some(result.version) {
        return Err(ApiError::bad_request(format!(
            "rollout {rollout_id} is of version {version}, not {}",
            result.version
        )));
    }
    let event = DeviceEvent::Result {
        outcome: result.outcome,
        detail: clean_detail(result.detail),
    };
    let recorded = apply_device_event(
        &state.pool,
        rollout_id,
        viewer.device_id,
        result.version,
        &event,
    )
    .await?;
    tracing::info!(device = %viewer.device_id, rollout = %rollout_id, outcome = ?result.outcome, recorded, "update result");
    Ok(Json(UpdateAck { recorded }))
}

/// What a `Range` header asks of an archive of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wanted {
    Whole,
    /// Inclusive byte positions.
    Part {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// One range of `bytes=N-`, `bytes=N-M` or `bytes=-K`; anything else in
/// the bytes unit (several ranges, garbage, past the end) is
/// unsatisfiable. Another unit is ignored, as RFC 9110 allows.
pub(crate) fn wanted(range: Option<&str>, size: u64) -> Wanted {
    let Some(range) = range else {
        return Wanted::Whole;
    };
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return Wanted::Whole;
    };
    let spec = spec.trim();
    if spec.contains(',') || size == 0 {
        return Wanted::Unsatisfiable;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Wanted::Unsatisfiable;
    };
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, false) => match number(b) {
            Some(k) if k > 0 => Wanted::Part {
                start: size - k.min(size),
                end: size - 1,
            },
            _ => Wanted::Unsatisfiable,
        },
        (false, true) => match number(a) {
            Some(start) if start < size => Wanted::Part {
                start,
                end: size - 1,
            },
            _ => Wanted::Unsatisfiable,
        },
        (false, false) => match (number(a), number(b)) {
            (Some(start), Some(end)) if start <= end && start < size => Wanted::Part {
                start,
                end: end.min(size - 1),
            },
            _ => Wanted::Unsatisfiable,
        },
        (true, true) => Wanted::Unsatisfiable,
    }
}

/// The bytes `start..=end` of a stored archive, read chunk by chunk as the
/// client takes them (an encoder bundle is tens of MiB; twenty devices
/// must not hold it in memory twenty times).
fn stream(pool: PgPool, bundle_id: Uuid, start: u64, end: u64) -> Body {
    let chunk = CHUNK_BYTES as u64;
    let first = start / chunk;
    let last = end / chunk;
    let chunks = futures_util::stream::unfold(Some(first), move |next| {
        let pool = pool.clone();
        async move {
            let idx = next?;
            if idx > last {
                return None;
            }
            let Ok(sql_idx) = i32::try_from(idx) else {
                return Some((Err(std::io::Error::other("chunk index")), None));
            };
            match read_chunk(&pool, bundle_id, sql_idx).await {
                Ok(data) => {
                    let base = idx * chunk;
                    let lo = usize::try_from(start.saturating_sub(base)).unwrap_or(0);
                    let hi = usize::try_from((end + 1 - base).min(data.len() as u64))
                        .unwrap_or(data.len());
                    if lo > hi || hi > data.len() {
                        return Some((Err(std::io::Error::other("short chunk")), None));
                    }
                    let piece = Bytes::copy_from_slice(&data[lo..hi]);
                    Some((Ok::<Bytes, std::io::Error>(piece), Some(idx + 1)))
                }
                Err(e) => {
                    // The client sees a cut download and resumes it.
                    tracing::warn!(bundle = %bundle_id, kind = %db_error_kind(&e), "archive chunk unreadable");
                    Some((Err(std::io::Error::other(db_error_kind(&e))), None))
                }
            }
        }
    });
    Body::from_stream(chunks)
}

/// `GET /v1/bundles/{bundle_id}/archive`.
pub async fn archive(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(bundle_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("no such bundle for this device");
    let bundle_id = Uuid::parse_str(&bundle_id).map_err(|_| not_found())?;
    let found: Option<(i64, String)> = sqlx::query_as(
        "SELECT b.archive_size, b.archive_sha256 FROM bundles b WHERE b.bundle_id = $1 \
           AND EXISTS (SELECT 1 FROM rollouts r JOIN rollout_devices d \
                         ON d.rollout_id = r.rollout_id \
                       WHERE r.bundle_id = b.bundle_id AND r.clinic_id = $2 \
                         AND d.device_id = $3 AND d.state IN ('offered', 'installed'))",
    )
    .bind(bundle_id)
    .bind(viewer.clinic_id)
    .bind(viewer.device_id)
    .fetch_optional(&state.pool)
    .await?;
    let (size, sha256) = found.ok_or_else(not_found)?;
    let size = u64::try_from(size).map_err(|_| not_found())?;
    let range = match headers.get(header::RANGE) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad_request("the Range header is not ASCII"))?,
        ),
        None => None,
    };
    let etag = HeaderValue::from_str(&format!("\"{sha256}\""))
        .map_err(|_| ApiError::internal("archive checksum"))?;
    let (status, start, end) = match wanted(range, size) {
        Wanted::Whole => (StatusCode::OK, 0, size - 1),
        Wanted::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end),
        Wanted::Unsatisfiable => {
            let body = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                codes::BAD_REQUEST,
                format!(
                    "ask for one range inside the archive's {size} bytes (bytes=N-, bytes=N-M)"
                ),
            )
            .body();
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                Json(body),
            )
                .into_response());
        }
    };
    tracing::debug!(device = %viewer.device_id, bundle = %bundle_id, start, end, "archive download");
    let mut response = Response::new(stream(state.pool.clone(), bundle_id, start, end));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
    h.insert(header::ETAG, etag);
    if status == StatusCode::PARTIAL_CONTENT {
        let value = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}"))
            .map_err(|_| ApiError::internal("content range"))?;
        h.insert(header::CONTENT_RANGE, value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_range_is_served_and_anything_else_is_unsatisfiable() {
        let w = |r: &str| wanted(Some(r), 100);
        assert_eq!(wanted(None, 100), Wanted::Whole);
        assert_eq!(w("items=0-5"), Wanted::Whole);
        assert_eq!(w("bytes=0-"), Wanted::Part { start: 0, end: 99 });
        assert_eq!(w("bytes=40-"), Wanted::Part { start: 40, end: 99 });
        assert_eq!(w("bytes=40-49"), Wanted::Part { start: 40, end: 49 });
        assert_eq!(w("bytes=40-1000"), Wanted::Part { start: 40, end: 99 });
        assert_eq!(w("bytes=-10"), Wanted::Part { start: 90, end: 99 });
        assert_eq!(w("bytes=-1000"), Wanted::Part { start: 0, end: 99 });
        for bad in [
            "bytes=100-",
            "bytes=150-160",
            "bytes=50-40",
            "bytes=-0",
            "bytes=-",
            "bytes=0-1,5-6",
            "bytes=x-",
            "bytes=+5-",
            "bytes=5",
        ] {
            assert_eq!(w(bad), Wanted::Unsatisfiable, "{bad}");
        }
    }

    #[test]
    fn details_are_capped_and_printable() {
        let long = "é".repeat(MAX_UPDATE_DETAIL + 10);
        let d = clean_detail(Some(long)).unwrap();
        assert_eq!(d.chars().count(), MAX_UPDATE_DETAIL);
        assert_eq!(
            clean_detail(Some("a\nb\u{7}".into())).as_deref(),
            Some("a b")
        );
        assert_eq!(clean_detail(Some("\n".into())), None);
    }
}
