//! Errors: [`CloudError`] for library code (operator commands, start-up),
//! [`ApiError`] for what a request is answered with.
//!
//! Every refusal is an HTTP status and a JSON [`ErrorBody`] whose `code` is
//! one of `dermascope_cloud_api::codes` and whose `message` says why. A
//! database failure is answered without its SQL or values (they may hold
//! case data); the log gets the SQLSTATE and the kind of failure only.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dermascope_cloud_api::{codes, ErrorBody};

/// Failures of the service's library code.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("configuration {path}: {message}")]
    Config { path: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("credential: {0}")]
    Credential(String),
    #[error("no operating-system randomness: {0}")]
    Random(String),
}

impl CloudError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> CloudError {
        CloudError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A refusal or failure as a request sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn unauthenticated(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, codes::UNAUTHENTICATED, message)
    }

    pub fn revoked() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            codes::REVOKED,
            "this device's credential was revoked by the fleet operator; ask for a new one",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, codes::FORBIDDEN, message)
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST, message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, codes::TOO_LARGE, message)
    }

    pub fn bad_embedding(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, codes::BAD_EMBEDDING, message)
    }

    pub fn unknown_model(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, codes::UNKNOWN_MODEL, message)
    }

    pub fn bad_photo(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, codes::BAD_PHOTO, message)
    }

    pub fn originals_not_allowed(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, codes::ORIGINALS_NOT_ALLOWED, message)
    }

    pub fn bad_cursor(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError::new(status, codes::BAD_CURSOR, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL, message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.to_string(),
            message: self.message.clone(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Whether a database failure is the database being away (retry later)
/// rather than this request's fault or a bug.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08 connection exception, 40 rollback (serialisation, deadlock),
            // 53 insufficient resources, 57 operator intervention (shutdown),
            // 55P03 lock not available, 25006 read-only transaction (a replica).
            ["08", "40", "53", "57"]
                .iter()
                .any(|class| code.starts_with(class))
                || code == "55P03"
                || code == "25006"
        }),
        _ => false,
    }
}

fn sqlstate(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()).unwrap_or_default(),
        _ => String::new(),
    }
}

/// The kind of a database failure, safe to log: no SQL, no values.
pub fn db_error_kind(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(_) => format!("database error {}", sqlstate(error)),
        sqlx::Error::Io(e) => format!("i/o: {}", e.kind()),
        sqlx::Error::Tls(_) => "tls".into(),
        sqlx::Error::Protocol(_) => "protocol".into(),
        sqlx::Error::PoolTimedOut => "pool timed out".into(),
        sqlx::Error::PoolClosed => "pool closed".into(),
        sqlx::Error::WorkerCrashed => "worker crashed".into(),
        sqlx::Error::RowNotFound => "row not found".into(),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => "decode".into(),
        _ => "other".into(),
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        let kind = db_error_kind(&error);
        if is_transient(&error) {
            tracing::warn!(%kind, "database unavailable");
            ApiError::unavailable(format!(
                "the fleet database is unavailable ({kind}); retry later (a retried request is never applied twice)"
            ))
        } else {
            tracing::error!(%kind, "database failure");
            ApiError::internal(format!(
                "the service failed on the database ({kind}); the request was not acknowledged"
            ))
        }
    }
}

impl From<CloudError> for ApiError {
    fn from(error: CloudError) -> ApiError {
        match error {
            CloudError::Database(e) => ApiError::from(e),
            CloudError::NotFound(m) => ApiError::not_found(m),
            CloudError::Invalid(m) => ApiError::bad_request(m),
            other => {
                tracing::error!(error = %other, "request failed");
                ApiError::internal("the service failed; the request was not acknowledged")
            }
        }
    }
}

/// `Json<T>` whose every rejection (malformed JSON, a wrong field, a body
/// over the size limit, a missing content type) is an [`ApiError`] with a
/// JSON body, not axum's plain-text default.
pub struct ApiJson<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: axum::extract::rejection::JsonRejection) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::too_large(format!(
            "the request body is over the service's limit of {} bytes; send fewer cases per batch",
            dermascope_cloud_api::MAX_REQUEST_BYTES
        ));
    }
    let status = if status.is_client_error() {
        status
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(
        status,
        codes::BAD_REQUEST,
        format!("the request body was refused: {}", rejection.body_text()),
    )
}

/// `Query<T>` with a JSON [`ApiError`] rejection.
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "the query string was refused: {}",
                rejection.body_text()
            ))),
        }
    }
}
