//! The sync crate's one error type.

use std::path::PathBuf;

use dermascope_cloud_api::codes;
use dermascope_store::StoreError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SyncError {
    /// A `[sync]` key is missing, malformed or unsafe.
    #[error("[sync] {key}: {message}")]
    Config { key: &'static str, message: String },
    /// The credential file cannot be used.
    #[error("[sync] credential_file {path}: {message}")]
    Credential { path: PathBuf, message: String },
    /// The CA file or the TLS client could not be set up.
    #[error("TLS set-up: {0}")]
    Tls(String),
    /// The service could not be reached, or the connection broke before a
    /// whole answer arrived (offline, DNS, refused, reset, TLS handshake,
    /// e.g. a certificate not signed by the configured CA).
    #[error("fleet service unreachable: {0}")]
    Unreachable(String),
    /// No whole answer within the configured timeout.
    #[error("fleet service did not answer in time: {0}")]
    Timeout(String),
    /// The service refused: its HTTP status and the `code` and `message`
    /// of its [`dermascope_cloud_api::ErrorBody`], or `http_<status>` when
    /// the body was not one.
    #[error("fleet service refused ({status} {code}): {message}")]
    Service {
        status: u16,
        code: String,
        message: String,
    },
    /// A 2xx answer that breaks the contract: too large, not the JSON it
    /// should be, or outside its limits. Nothing of it was stored.
    #[error("fleet service answer refused: {0}")]
    BadResponse(String),
    /// The service does not index this store's encoder (or with another
    /// dimension): nothing is uploaded or pulled until the operator adds it.
    #[error("{0}")]
    NotIndexed(String),
    /// The download directory cannot be used (the device's disk): retried
    /// after the interval.
    #[error("update download: {0}")]
    Download(String),
    /// A thread could not be started.
    #[error("could not start a sync thread: {0}")]
    Thread(String),
    /// The local case store failed.
    #[error("case store: {0}")]
    Store(#[from] StoreError),
    /// A newer RAG request replaced this one before it was sent.
    #[error("superseded by a newer request")]
    Superseded,
    /// The sync thread or its RAG worker has stopped.
    #[error("sync stopped")]
    Stopped,
}

impl SyncError {
    /// The service said the credential is unknown, wrong or revoked, or that
    /// this device may not do what it asked: retrying before the operator
    /// acts is pointless (the loop waits a whole interval).
    pub fn is_refused_credential(&self) -> bool {
        match self {
            SyncError::Service { status, code, .. } => {
                *status == 401
                    || *status == 403
                    || code == codes::UNAUTHENTICATED
                    || code == codes::REVOKED
                    || code == codes::FORBIDDEN
            }
            _ => false,
        }
    }

    /// Transient: the network, a timeout, a 5xx or a broken answer; the
    /// loop retries with backoff.
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Unreachable(_) | SyncError::Timeout(_) | SyncError::BadResponse(_) => true,
            SyncError::Service { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// The service's `code`, when it refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            SyncError::Service { code, .. } => Some(code),
            _ => None,
        }
    }
}
