//! The fleet status page: server-rendered HTML for the operator, behind a
//! login.
//!
//! * `GET /fleet/login`, `POST /fleet/login` (form: `name`, `password`),
//!   `POST /fleet/logout`
//! * `GET /fleet`: each clinic's devices, their versions, last seen,
//!   pending uploads, revocation
//! * `GET /fleet/rollouts`, `GET /fleet/rollouts/{id}`: each rollout's
//!   stages, counts against its thresholds, and every device's state
//!
//! The pages only read ([`status`]); the rollout logic lives in `fleet`.
//! Every value is escaped ([`html::escape`]) and the Content-Security-Policy
//! allows no script at all, so the pages work without JavaScript and a
//! device name cannot run any. Operators and sessions: [`session`].

pub mod html;
pub mod session;
pub mod status;

use std::fmt::Write;

use axum::extract::rejection::FormRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use uuid::Uuid;

use crate::error::CloudError;
use crate::server::AppState;
use html::{escape, or_dash, page, when};
use session::Operator;
use status::{ClinicStatus, RolloutDetail, RolloutSummary, StageStatus};

pub const LOGIN: &str = "/fleet/login";
pub const LOGOUT: &str = "/fleet/logout";
pub const FLEET: &str = "/fleet";
pub const ROLLOUTS: &str = "/fleet/rollouts";
pub const ROLLOUT: &str = "/fleet/rollouts/{rollout_id}";

/// How the service is reached, put in each request's extensions by
/// `server::start`: a session cookie is `Secure` exactly when it is TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transport {
    pub tls: bool,
}

/// Whether this request came over TLS (false when no [`Transport`] was set,
/// as in a router built without `start`).
struct Tls(bool);

impl<S: Send + Sync> FromRequestParts<S> for Tls {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Tls(parts
            .extensions
            .get::<Transport>()
            .is_some_and(|t| t.tls)))
    }
}

/// The status page's routes, merged into `server::router`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(LOGIN, get(login_form).post(login))
        .route(LOGOUT, post(logout))
        .route(FLEET, get(fleet_page))
        .route(ROLLOUTS, get(rollouts_page))
        .route(ROLLOUT, get(rollout_page))
}

/// An HTML answer with the headers every page carries: no caching of
/// fleet data, no framing, no script, no referrer.
fn respond(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// A failure page that names the kind of failure only.
pub(crate) fn failure(error: CloudError) -> Response {
    let (status, what) = match &error {
        CloudError::Database(e) if crate::error::is_transient(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "The fleet database is unavailable; try again shortly.",
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "The status page failed; the service log says why.",
        ),
    };
    match &error {
        CloudError::Database(e) => {
            tracing::error!(kind = %crate::error::db_error_kind(e), "status page failed")
        }
        other => tracing::error!(error = %other, "status page failed"),
    }
    respond(
        status,
        page(
            "Error",
            None,
            false,
            &format!("<p class=\"error\">{}</p>", escape(what)),
        ),
    )
}

fn login_body(error: Option<&str>, name: &str) -> String {
    let mut b = String::from("<h1>Log in</h1>");
    if let Some(e) = error {
        let _ = write!(b, "<p class=\"error\" id=\"login-error\">{}</p>", escape(e));
    }
    let _ = write!(
        b,
        "<form class=\"login\" method=\"post\" action=\"{LOGIN}\">\
         <label for=\"name\">Operator</label>\
         <input id=\"name\" name=\"name\" autocomplete=\"username\" required value=\"{}\">\
         <label for=\"password\">Password</label>\
         <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required>\
         <button id=\"log-in\" type=\"submit\">Log in</button></form>",
        escape(name)
    );
    b
}

async fn login_form(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = session::cookie_token(&headers) {
        if let Ok(Some(_)) = session::session_operator(&state.pool, &token).await {
            return Redirect::to(FLEET).into_response();
        }
    }
    respond(
        StatusCode::OK,
        page("Log in", None, false, &login_body(None, "")),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    name: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    Tls(tls): Tls,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return respond(
            StatusCode::BAD_REQUEST,
            page(
                "Log in",
                None,
                false,
                &login_body(Some("Give an operator name and a password."), ""),
            ),
        );
    };
    match session::log_in(&state.pool, form.name.trim(), &form.password).await {
        Ok(Some(token)) => {
            // The name is the schema's character class, safe to log; the
            // password and token are not logged.
            tracing::info!(operator = %form.name.trim(), "operator logged in");
            let mut response = Redirect::to(FLEET).into_response();
            match HeaderValue::from_str(&session::session_cookie(&token, tls)) {
                Ok(cookie) => {
                    response.headers_mut().insert(header::SET_COOKIE, cookie);
                    response
                }
                Err(_) => failure(CloudError::Credential("session cookie".into())),
            }
        }
        Ok(None) => {
            tracing::info!("a status page login was refused");
            respond(
                StatusCode::UNAUTHORIZED,
                page(
                    "Log in",
                    None,
                    false,
                    &login_body(Some("Wrong operator name or password."), form.name.trim()),
                ),
            )
        }
        Err(e) => failure(e),
    }
}

async fn logout(State(state): State<AppState>, Tls(tls): Tls, headers: HeaderMap) -> Response {
    if let Some(token) = session::cookie_token(&headers) {
        if let Err(e) = session::log_out(&state.pool, &token).await {
            return failure(e);
        }
    }
    let mut response = Redirect::to(LOGIN).into_response();
    if let Ok(cookie) = HeaderValue::from_str(&session::cleared_cookie(tls)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

fn state_badge(state: &str, id: Option<&str>) -> String {
    let id = id.map(|i| format!(" id=\"{i}\"")).unwrap_or_default();
    format!(
        "<span class=\"state state-{0}\"{id}>{1}</span>",
        escape(state),
        escape(&state.replace('_', " "))
    )
}

fn short_id(id: &Uuid) -> String {
    let s = id.to_string();
    format!(
        "<code title=\"{}\">{}</code>",
        escape(&s),
        escape(&s[s.len() - 12..])
    )
}

fn rollout_link(r: &RolloutSummary, text: &str) -> String {
    format!(
        "<a href=\"{ROLLOUTS}/{}\">{}</a>",
        r.rollout_id,
        escape(text)
    )
}

fn fleet_body(clinics: &[ClinicStatus]) -> String {
    let mut b = String::from("<h1>Devices</h1>");
    if clinics.is_empty() {
        b.push_str("<p>No clinic yet: add one with <code>dermascope-cloud clinic add</code>.</p>");
    }
    for c in clinics {
        let _ = write!(
            b,
            "<section data-clinic=\"{}\"><h2>{}</h2>",
            c.clinic_id,
            escape(&c.name)
        );
        if let Some(r) = &c.active_rollout {
            let _ = write!(
                b,
                "<p>Rollout of bundle {} {}: {} of {} devices installed. {}</p>",
                r.bundle_version,
                state_badge(&r.state, None),
                r.installed,
                r.assigned,
                rollout_link(r, "Details")
            );
        }
        if c.devices.is_empty() {
            b.push_str("<p>No device.</p></section>");
            continue;
        }
        b.push_str(
            "<table><thead><tr><th>Device</th><th>Id</th><th>Daemon</th><th>Bundle</th>\
             <th>Encoder</th><th>Last seen</th><th>Pending uploads</th><th>Status</th></tr></thead><tbody>",
        );
        for d in &c.devices {
            let _ = write!(
                b,
                "<tr data-device=\"{}\"{}><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                d.device_id,
                if d.revoked_at.is_some() { " class=\"revoked\"" } else { "" },
                escape(&d.name),
                short_id(&d.device_id),
                or_dash(d.daemon_version.as_deref()),
                d.bundle_version.map_or("&mdash;".into(), |v| v.to_string()),
                or_dash(d.encoder_model_id.as_deref()),
                when(d.last_seen_at.as_deref(), d.last_seen_age_s),
                d.pending_uploads.map_or("&mdash;".into(), |v| v.to_string()),
                match &d.revoked_at {
                    Some(t) => format!("revoked <time datetime=\"{0}\">{0}</time>", escape(t)),
                    None => "active".into(),
                }
            );
        }
        b.push_str("</tbody></table></section>");
    }
    b
}

async fn fleet_page(State(state): State<AppState>, Operator(operator): Operator) -> Response {
    match status::fleet(&state.pool).await {
        Ok(clinics) => respond(
            StatusCode::OK,
            page("Devices", Some(&operator), true, &fleet_body(&clinics)),
        ),
        Err(e) => failure(e),
    }
}

fn rollouts_body(rollouts: &[RolloutSummary]) -> String {
    let mut b = String::from("<h1>Rollouts</h1>");
    if rollouts.is_empty() {
        b.push_str(
            "<p>No rollout yet: start one with <code>dermascope-fleet rollout create</code>.</p>",
        );
        return b;
    }
    b.push_str(
        "<table><thead><tr><th>Clinic</th><th>Bundle</th><th>State</th><th>Current stage</th>\
         <th>Assigned</th><th>Installed</th><th>Failed</th><th>Refused</th><th>Rolled back</th>\
         <th>Updated</th><th></th></tr></thead><tbody>",
    );
    for r in rollouts {
        let _ = write!(
            b,
            "<tr data-rollout=\"{}\"><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{} of 0&ndash;{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            r.rollout_id,
            escape(&r.clinic_name),
            r.bundle_version,
            state_badge(&r.state, None),
            r.current_stage,
            (r.stages - 1).max(0),
            r.assigned,
            r.installed,
            r.failed,
            r.refused,
            r.rolled_back,
            when(Some(&r.updated_at), Some(r.updated_age_s)),
            rollout_link(r, "Details")
        );
    }
    b.push_str("</tbody></table>");
    b
}

async fn rollouts_page(State(state): State<AppState>, Operator(operator): Operator) -> Response {
    match status::rollouts(&state.pool).await {
        Ok(list) => respond(
            StatusCode::OK,
            page("Rollouts", Some(&operator), true, &rollouts_body(&list)),
        ),
        Err(e) => failure(e),
    }
}

/// The least count `k` of `assigned` devices that reaches `threshold`, by
/// the rollout logic's own rule (`fleet::rollouts::reaches`), so the page
/// never promises an advance or a pause one device off.
pub fn needed(threshold: f32, assigned: i64) -> i64 {
    (0..=assigned)
        .find(|&k| crate::fleet::rollouts::reaches(k, assigned, threshold))
        .unwrap_or(0)
}

fn stage_kind(s: &StageStatus) -> String {
    match (s.kind.as_str(), s.percent) {
        ("percent", Some(p)) => format!("{p}% of the clinic's devices"),
        ("devices", _) => format!(
            "{} listed device{}",
            s.listed_devices,
            if s.listed_devices == 1 { "" } else { "s" }
        ),
        ("rest", _) => "every remaining device".into(),
        (other, _) => escape(other),
    }
}

fn stage_progress(s: &StageStatus, current: bool, rollout_state: &str) -> String {
    match (&s.started_at, &s.finished_at) {
        (_, Some(t)) => format!("finished {}", when(Some(t), s.finished_age_s)),
        (Some(_), None) if current && rollout_state == "paused" => "paused".into(),
        (Some(_), None) => "in progress".into(),
        (None, _) => "waiting".into(),
    }
}

fn rollout_body(r: &RolloutDetail) -> String {
    let s = &r.summary;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Rollout of bundle {} to {}</h1>",
        s.bundle_version,
        escape(&s.clinic_name)
    );
    if let Some(reason) = &s.paused_reason {
        if s.state == "paused" {
            let _ = write!(
                b,
                "<p class=\"warn\" id=\"paused-reason\">Paused: {}</p>",
                escape(reason)
            );
        }
    }
    let _ = write!(
        b,
        "<dl><dt>State</dt><dd>{}</dd>\
         <dt>Bundle</dt><dd>version <span id=\"bundle-version\">{}</span>{}; carries {}; encoder {}</dd>\
         <dt>Archive</dt><dd><code>{}</code>, {} bytes</dd>\
         <dt>Signed by</dt><dd><code>{}</code></dd>\
         <dt>Next stage starts at</dt><dd>{} of a stage's devices installed</dd>\
         <dt>Pauses at</dt><dd>{} of a stage's devices failed or refused</dd>\
         <dt>Created</dt><dd>{}</dd><dt>Updated</dt><dd>{}</dd>\
         <dt>Rollout id</dt><dd><code>{}</code></dd></dl>",
        state_badge(&s.state, Some("rollout-state")),
        s.bundle_version,
        if r.downgrade { " (signed downgrade)" } else { "" },
        escape(&r.carries.join(", ")),
        or_dash(r.encoder_model_id.as_deref()),
        escape(&r.archive_sha256),
        r.archive_size,
        escape(&r.signed_by),
        html::percent(r.success_threshold),
        html::percent(r.error_threshold),
        escape(&s.created_at),
        when(Some(&s.updated_at), Some(s.updated_age_s)),
        s.rollout_id,
    );
    b.push_str(
        "<h2>Stages</h2><table><thead><tr><th>Stage</th><th>Takes in</th><th>Progress</th>\
         <th>Assigned</th><th>Offered</th><th>Installed</th><th>Failed</th><th>Refused</th>\
         <th>Rolled back</th><th>Success needs</th><th>Pauses at</th><th></th></tr></thead><tbody>",
    );
    for st in &r.stages {
        let current = st.stage == s.current_stage;
        let rolled_back = st.rollback_offered + st.rolled_back;
        let _ = write!(
            b,
            "<tr data-stage=\"{}\"{}><td class=\"num\">{}</td><td>{}</td><td class=\"progress\">{}</td>\
             <td class=\"num assigned\">{}</td><td class=\"num offered\">{}</td>\
             <td class=\"num installed\">{}</td><td class=\"num failed\">{}</td>\
             <td class=\"num refused\">{}</td><td class=\"num rolled-back\">{}</td>\
             <td class=\"num\">{} installed</td><td class=\"num\">{} failed or refused</td>\
             <td><progress max=\"{}\" value=\"{}\"></progress></td></tr>",
            st.stage,
            if current { " class=\"current\"" } else { "" },
            st.stage,
            stage_kind(st),
            stage_progress(st, current, &s.state),
            st.assigned,
            st.offered,
            st.installed,
            st.failed,
            st.refused,
            if rolled_back == 0 {
                "0".to_string()
            } else {
                format!("{} of {rolled_back}", st.rolled_back)
            },
            needed(r.success_threshold, st.assigned),
            needed(r.error_threshold, st.assigned).max(1),
            st.assigned.max(1),
            st.installed + rolled_back,
        );
    }
    b.push_str("</tbody></table><h2>Devices</h2>");
    if r.devices.is_empty() {
        b.push_str("<p>No device taken in yet.</p>");
        return b;
    }
    b.push_str(
        "<table><thead><tr><th>Device</th><th>Id</th><th>Stage</th><th>State</th>\
         <th>Runs bundle</th><th>Detail</th><th>Updated</th></tr></thead><tbody>",
    );
    for d in &r.devices {
        let _ = write!(
            b,
            "<tr data-device=\"{}\"><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"device-state\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            d.device_id,
            escape(&d.name),
            short_id(&d.device_id),
            d.stage,
            state_badge(&d.state, None),
            d.bundle_version.map_or("&mdash;".into(), |v| v.to_string()),
            or_dash(d.detail.as_deref()),
            when(Some(&d.updated_at), Some(d.updated_age_s)),
        );
    }
    b.push_str("</tbody></table>");
    b
}

async fn rollout_page(
    State(state): State<AppState>,
    Operator(operator): Operator,
    Path(rollout_id): Path<String>,
) -> Response {
    let not_found = || {
        respond(
            StatusCode::NOT_FOUND,
            page(
                "No such rollout",
                Some(&operator),
                false,
                &format!(
                    "<p class=\"error\">No rollout {}. <a href=\"{ROLLOUTS}\">Every rollout</a></p>",
                    escape(&rollout_id)
                ),
            ),
        )
    };
    let Ok(id) = Uuid::parse_str(&rollout_id) else {
        return not_found();
    };
    match status::rollout(&state.pool, id).await {
        Ok(Some(detail)) => respond(
            StatusCode::OK,
            page(
                &format!("Rollout of bundle {}", detail.summary.bundle_version),
                Some(&operator),
                true,
                &rollout_body(&detail),
            ),
        ),
        Ok(None) => not_found(),
        Err(e) => failure(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_counts_match_the_threshold_rule() {
        assert_eq!(needed(0.9, 10), 9);
        assert_eq!(needed(0.9, 4), 4);
        assert_eq!(needed(0.3, 10), 3);
        assert_eq!(needed(0.25, 4), 1);
        assert_eq!(needed(1.0, 7), 7);
        assert_eq!(needed(0.5, 0), 0);
        for n in 1..200i64 {
            for t in [0.1f32, 0.2, 0.3, 0.7, 0.9, 0.95, 1.0] {
                let k = needed(t, n);
                assert!(k as f32 / n as f32 >= t, "{t} {n} {k}");
                assert!(k == 0 || ((k - 1) as f32 / n as f32) < t, "{t} {n} {k}");
            }
        }
    }
}
