//! Operators of the status page and their sessions.
//!
//! A password is stored only as an argon2id hash (the device secrets'
//! hashing, [`crate::auth`]). A session is 32 random bytes handed to the
//! browser once as a cookie and kept in `operator_sessions` only as its
//! SHA-256, so a copy of the database opens no session. Sessions end after
//! [`SESSION_HOURS`] or at logout; removing an operator ends theirs
//! (`ON DELETE CASCADE`).

use std::sync::OnceLock;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::auth;
use crate::config::HashSettings;
use crate::error::CloudError;
use crate::server::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "dermascope_session";
/// How long a session lasts.
pub const SESSION_HOURS: i64 = 12;
/// Bytes of randomness in a session token.
pub const TOKEN_BYTES: usize = 32;
/// Bytes of randomness in a generated password (32 base64url characters).
const GENERATED_PASSWORD_BYTES: usize = 24;
/// A password given by the operator is at least this long.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longer passwords are refused before hashing, so a huge form field cannot
/// buy argon2 work.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// An operator just added, with the password shown this once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOperator {
    pub name: String,
    /// Only when the service generated it; `None` when the caller gave one.
    pub generated_password: Option<String>,
    pub created_at: String,
}

impl std::fmt::Debug for NewOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewOperator")
            .field("name", &self.name)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// The schema's rule for operator names (`operators.name`).
pub fn is_operator_name(name: &str) -> bool {
    (1..=100).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
}

fn generated_password() -> Result<String, CloudError> {
    let mut bytes = [0u8; GENERATED_PASSWORD_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| CloudError::Random(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Adds an operator. With `password: None` one is generated and returned
/// once in [`NewOperator::generated_password`]. An existing name is a
/// [`CloudError::Conflict`]: a password is never replaced by accident.
pub async fn add_operator(
    pool: &PgPool,
    name: &str,
    password: Option<&str>,
    hashing: &HashSettings,
) -> Result<NewOperator, CloudError> {
    if !is_operator_name(name) {
        return Err(CloudError::Invalid(
            "an operator name is 1 to 100 characters of A-Z a-z 0-9 . _ @ -".into(),
        ));
    }
    let (password, generated) = match password {
        Some(p) => {
            if p.chars().count() < MIN_PASSWORD_CHARS {
                return Err(CloudError::Invalid(format!(
                    "a password is at least {MIN_PASSWORD_CHARS} characters"
                )));
            }
            if p.len() > MAX_PASSWORD_BYTES {
                return Err(CloudError::Invalid(format!(
                    "a password is at most {MAX_PASSWORD_BYTES} bytes"
                )));
            }
            (p.to_string(), false)
        }
        None => (generated_password()?, true),
    };
    let settings = hashing.clone();
    let for_hash = password.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_secret(&for_hash, &settings))
        .await
        .map_err(|e| CloudError::Credential(format!("hashing task: {e}")))??;
    let created_at: Option<String> = sqlx::query_scalar(&format!(
        "INSERT INTO operators (name, password_hash) VALUES ($1, $2) \
         ON CONFLICT (name) DO NOTHING RETURNING {}",
        crate::db::rfc3339("created_at")
    ))
    .bind(name)
    .bind(&hash)
    .fetch_optional(pool)
    .await?;
    let created_at = created_at.ok_or_else(|| {
        CloudError::Conflict(format!(
            "an operator named {name:?} exists; remove it first to set a new password"
        ))
    })?;
    Ok(NewOperator {
        name: name.to_string(),
        generated_password: generated.then_some(password),
        created_at,
    })
}

/// Removes an operator and ends their sessions. Whether one was there.
pub async fn remove_operator(pool: &PgPool, name: &str) -> Result<bool, CloudError> {
    let removed = sqlx::query("DELETE FROM operators WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?
        .rows_affected();
    Ok(removed > 0)
}

/// Operator names, sorted.
pub async fn list_operators(pool: &PgPool) -> Result<Vec<String>, CloudError> {
    Ok(
        sqlx::query_scalar("SELECT name FROM operators ORDER BY name")
            .fetch_all(pool)
            .await?,
    )
}

/// A hash of no one's password, verified when the name is unknown so a
/// wrong name costs the same argon2 work as a wrong password and the
/// answer's timing does not tell which names exist.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| {
        auth::hash_secret("no operator has this password", &HashSettings::default())
            .unwrap_or_default()
    })
}

fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Checks a name and password; on success opens a session and returns its
/// token (for the cookie). `Ok(None)`: wrong name or password.
pub async fn log_in(
    pool: &PgPool,
    name: &str,
    password: &str,
) -> Result<Option<String>, CloudError> {
    if password.len() > MAX_PASSWORD_BYTES || !is_operator_name(name) {
        return Ok(None);
    }
    let stored: Option<String> =
        sqlx::query_scalar("SELECT password_hash FROM operators WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    let known = stored.is_some();
    let password = password.to_string();
    let ok = tokio::task::spawn_blocking(move || match stored {
        Some(hash) => auth::verify_secret(&password, &hash),
        None => auth::verify_secret(&password, decoy_hash()),
    })
    .await
    .map_err(|e| CloudError::Credential(format!("verifying task: {e}")))?;
    if !(ok && known) {
        return Ok(None);
    }
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| CloudError::Random(e.to_string()))?;
    let token = hex::encode(bytes);
    let mut tx = pool.begin().await?;
    // Housekeeping where it costs nothing noticeable: a login is rare.
    sqlx::query("DELETE FROM operator_sessions WHERE expires_at < now()")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO operator_sessions (token_sha256, operator, expires_at) \
         VALUES ($1, $2, now() + make_interval(hours => $3::int))",
    )
    .bind(token_digest(&token))
    .bind(name)
    .bind(i32::try_from(SESSION_HOURS).unwrap_or(12))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(token))
}

/// The operator a session token belongs to, if it is open.
pub async fn session_operator(pool: &PgPool, token: &str) -> Result<Option<String>, CloudError> {
    if token.len() != 2 * TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    Ok(sqlx::query_scalar(
        "SELECT operator FROM operator_sessions WHERE token_sha256 = $1 AND expires_at > now()",
    )
    .bind(token_digest(token))
    .fetch_optional(pool)
    .await?)
}

/// Ends a session (logging out twice is harmless).
pub async fn log_out(pool: &PgPool, token: &str) -> Result<(), CloudError> {
    sqlx::query("DELETE FROM operator_sessions WHERE token_sha256 = $1")
        .bind(token_digest(token))
        .execute(pool)
        .await?;
    Ok(())
}

/// The session token in a request's `Cookie` headers.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
}

/// The `Set-Cookie` value opening a session. JavaScript cannot read it
/// (`HttpOnly`), no other site's page can send it (`SameSite=Strict`, which
/// also stops cross-site form posts), and over TLS it never travels in
/// the clear (`Secure`).
pub fn session_cookie(token: &str, tls: bool) -> String {
    format!(
        "{COOKIE}={token}; Path=/fleet; Max-Age={}; HttpOnly; SameSite=Strict{}",
        SESSION_HOURS * 3600,
        if tls { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that makes the browser forget the session.
pub fn cleared_cookie(tls: bool) -> String {
    format!(
        "{COOKIE}=; Path=/fleet; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if tls { "; Secure" } else { "" }
    )
}

/// A logged-in operator: a handler taking one is only reached with an open
/// session; anyone else is sent to the login form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator(pub String);

impl FromRequestParts<AppState> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let Some(token) = cookie_token(&parts.headers) else {
            return Err(Redirect::to(super::LOGIN).into_response());
        };
        match session_operator(&state.pool, &token).await {
            Ok(Some(name)) => Ok(Operator(name)),
            Ok(None) => Err(Redirect::to(super::LOGIN).into_response()),
            Err(e) => Err(super::failure(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn operator_names_follow_the_schema() {
        assert!(is_operator_name("ops.lead@north-1"));
        for bad in ["", "a b", "a'b", "<x>", &"x".repeat(101)] {
            assert!(!is_operator_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; dermascope_session=abc ; b=2"),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("abc"));
        let mut none = HeaderMap::new();
        none.append(
            header::COOKIE,
            HeaderValue::from_static("xdermascope_session=1"),
        );
        assert_eq!(cookie_token(&none), None);
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_over_tls() {
        let c = session_cookie("t", true);
        for attr in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Max-Age=43200",
            "Path=/fleet",
        ] {
            assert!(c.contains(attr), "{c}");
        }
        assert!(!session_cookie("t", false).contains("Secure"));
        assert!(cleared_cookie(false).contains("Max-Age=0"));
    }

    #[test]
    fn generated_passwords_are_long_and_differ() {
        let a = generated_password().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, generated_password().unwrap());
    }

    #[test]
    fn a_new_operator_debug_hides_the_password() {
        let o = NewOperator {
            name: "n".into(),
            generated_password: Some("supersecret".into()),
            created_at: "t".into(),
        };
        assert!(!format!("{o:?}").contains("supersecret"));
    }
}
