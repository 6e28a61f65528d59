//! The HTTP client for the fleet service: rustls trusting only the
//! configured CA, timeouts on connect and on the whole request, answers
//! read up to [`MAX_RESPONSE_BYTES`], refusals turned into
//! [`SyncError::Service`] with the service's code and message.

use std::io::Read;
use std::time::Duration;

use dermascope_cloud_api::{
    bearer, bundle_archive_route, routes, CasePage, DeviceInfo, DeviceReport, ErrorBody, Health,
    RagAnswer, RagRequest, UpdateAck, UpdateOffer, UpdateResult, UploadBatch, UploadReceipt,
    MAX_PULL_PAGE, MAX_RESPONSE_BYTES,
};
use reqwest::blocking::{RequestBuilder, Response};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::Url;
use serde::de::DeserializeOwned;
use tracing::debug;

use crate::config::SyncConfig;
use crate::error::SyncError;

/// A blocking client for one fleet service and one device credential.
/// Cheap to clone (the connection pool is shared). Never call it from
/// inside an async runtime: reqwest's blocking client runs its own.
#[derive(Clone)]
pub struct Client {
    http: reqwest::blocking::Client,
    base: Url,
    authorization: HeaderValue,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential.
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Validates `config`, reads its credential file and CA, and builds the
    /// TLS client (no network traffic yet).
    pub fn new(config: &SyncConfig) -> Result<Self, SyncError> {
        config.validate()?;
        let credential = config.read_credential()?;
        Self::with_credential(config, &credential)
    }

    /// [`Client::new`] with the credential given rather than read from the
    /// configured file.
    pub fn with_credential(config: &SyncConfig, credential: &str) -> Result<Self, SyncError> {
        let base = config.base_url()?;
        let mut authorization =
            HeaderValue::from_str(&bearer(credential)).map_err(|_| SyncError::Credential {
                path: config.credential_file.clone(),
                message: "holds characters an HTTP header cannot carry".into(),
            })?;
        authorization.set_sensitive(true);
        let mut builder = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(config.connect_timeout_s))
            .timeout(Duration::from_secs(config.request_timeout_s))
            // The device talks to one service: no proxy from the
            // environment, and no redirect that could carry the credential
            // elsewhere.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dermascope-sync/", env!("CARGO_PKG_VERSION")));
        if base.scheme() == "https" {
            let ca = config.ca.as_ref().ok_or(SyncError::Config {
                key: "ca",
                message: "is required for https".into(),
            })?;
            let pem = std::fs::read(ca)
                .map_err(|e| SyncError::Tls(format!("reading ca {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                SyncError::Tls(format!("ca {} is not PEM certificates: {e}", ca.display()))
            })?;
            if certs.is_empty() {
                return Err(SyncError::Tls(format!(
                    "ca {} holds no certificate",
                    ca.display()
                )));
            }
            // Only these roots: no system store, no built-in roots.
            builder = builder.tls_certs_only(certs).https_only(true);
        }
        let http = builder
            .build()
            .map_err(|e| SyncError::Tls(format!("building the HTTP client: {}", chain(&e))))?;
        Ok(Client {
            http,
            base,
            authorization,
        })
    }

    fn url(&self, route: &str) -> Result<Url, SyncError> {
        // The base may carry a path prefix (a reverse proxy's); routes are
        // absolute paths under it.
        let mut url = self.base.clone();
        let prefix = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{prefix}{route}"));
        Ok(url)
    }

    /// `GET /v1/health`, no credential.
    pub fn health(&self) -> Result<Health, SyncError> {
        let url = self.url(routes::HEALTH)?;
        self.send(self.http.get(url), "health")
    }

    /// `GET /v1/device`: who this credential is.
    pub fn device(&self) -> Result<DeviceInfo, SyncError> {
        let url = self.url(routes::DEVICE)?;
        self.send(self.authorized(self.http.get(url)), "device")
    }

    /// `POST /v1/cases`.
    pub fn upload(&self, batch: &UploadBatch) -> Result<UploadReceipt, SyncError> {
        let url = self.url(routes::CASES)?;
        let receipt: UploadReceipt =
            self.send(self.authorized(self.http.post(url)).json(batch), "upload")?;
        Ok(receipt)
    }

    /// `GET /v1/cases?model_id=&cursor=&limit=`. The page is checked
    /// against the limit; its cases are not (see `convert`).
    pub fn pull(
        &self,
        model_id: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<CasePage, SyncError> {
        let limit = limit.clamp(1, MAX_PULL_PAGE);
        let mut url = self.url(routes::CASES)?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("model_id", model_id);
            if let Some(cursor) = cursor {
                query.append_pair("cursor", cursor);
            }
            query.append_pair("limit", &limit.to_string());
        }
        let page: CasePage = self.send(self.authorized(self.http.get(url)), "pull")?;
        if page.cases.len() > limit {
            return Err(SyncError::BadResponse(format!(
                "a pull page of {} cases; at most {limit} were asked for",
                page.cases.len()
            )));
        }
        Ok(page)
    }

    /// `POST /v1/rag`.
    pub fn rag(&self, request: &RagRequest) -> Result<RagAnswer, SyncError> {
        let url = self.url(routes::RAG)?;
        self.send(self.authorized(self.http.post(url)).json(request), "rag")
    }

    /// `POST /v1/update`: what this device runs -> what its rollout asks.
    pub fn report(&self, report: &DeviceReport) -> Result<UpdateOffer, SyncError> {
        let url = self.url(routes::UPDATE)?;
        self.send(
            self.authorized(self.http.post(url)).json(report),
            "update report",
        )
    }

    /// `POST /v1/update/result`.
    pub fn update_result(&self, result: &UpdateResult) -> Result<UpdateAck, SyncError> {
        let url = self.url(routes::UPDATE_RESULT)?;
        self.send(
            self.authorized(self.http.post(url)).json(result),
            "update result",
        )
    }

    /// `GET` a bundle's archive from byte `from` on (`Range: bytes=N-` when
    /// `from > 0`). The body is left to the caller to stream; a refusal is
    /// read and returned as an error. `bundle_id` must be path-safe (the
    /// caller checks it: it comes from the service).
    pub(crate) fn archive(&self, bundle_id: &str, from: u64) -> Result<Archive, SyncError> {
        let url = self.url(&bundle_archive_route(bundle_id))?;
        let mut request = self.authorized(self.http.get(url));
        if from > 0 {
            request = request.header(RANGE, format!("bytes={from}-"));
        }
        let response = request.send().map_err(transport)?;
        let status = response.status().as_u16();
        debug!(status, from, "archive answer");
        if status != 200 && status != 206 {
            let body = read_capped(response)?;
            return Err(refusal(status, &body));
        }
        let length = header_u64(&response, CONTENT_LENGTH);
        let (start, total) = if status == 206 {
            let range = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range)
                .ok_or_else(|| {
                    SyncError::BadResponse(
                        "a 206 archive answer without a valid Content-Range".into(),
                    )
                })?;
            (range.0, Some(range.2))
        } else {
            (0, length)
        };
        Ok(Archive {
            start,
            total,
            length,
            response,
        })
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        request.header(AUTHORIZATION, self.authorization.clone())
    }

    fn send<T: DeserializeOwned>(
        &self,
        request: RequestBuilder,
        what: &'static str,
    ) -> Result<T, SyncError> {
        let response = request.send().map_err(transport)?;
        let status = response.status();
        let body = read_capped(response)?;
        debug!(
            what,
            status = status.as_u16(),
            bytes = body.len(),
            "fleet answer"
        );
        if !status.is_success() {
            return Err(refusal(status.as_u16(), &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| SyncError::BadResponse(format!("{what}: not the expected JSON ({e})")))
    }
}

/// An archive answer whose body is still to be read.
pub(crate) struct Archive {
    /// The byte of the archive the body starts at.
    pub start: u64,
    /// The whole archive's size, as the answer states it.
    pub total: Option<u64>,
    /// `Content-Length`, when announced.
    pub length: Option<u64>,
    pub response: Response,
}

fn header_u64(response: &Response, name: reqwest::header::HeaderName) -> Option<u64> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// `bytes START-END/TOTAL` -> (start, end, total).
fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (start <= end && end < total).then_some((start, end, total))
}

/// The body, refused beyond [`MAX_RESPONSE_BYTES`] whether or not a
/// `Content-Length` announced it.
fn read_capped(response: Response) -> Result<Vec<u8>, SyncError> {
    let too_large = |n: String| {
        SyncError::BadResponse(format!(
            "answer of {n} bytes; at most {MAX_RESPONSE_BYTES} are read"
        ))
    };
    let announced = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = announced {
        if n > MAX_RESPONSE_BYTES as u64 {
            return Err(too_large(n.to_string()));
        }
    }
    let mut body = Vec::with_capacity(announced.map_or(8192, |n| n as usize));
    response
        .take(MAX_RESPONSE_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                SyncError::Timeout(format!("reading the answer: {e}"))
            } else {
                SyncError::Unreachable(format!("reading the answer: {e}"))
            }
        })?;
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(too_large(format!("more than {MAX_RESPONSE_BYTES}")));
    }
    Ok(body)
}

/// A non-2xx answer: the service's [`ErrorBody`] when it sent one.
fn refusal(status: u16, body: &[u8]) -> SyncError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { code, message }) => SyncError::Service {
            status,
            code,
            message,
        },
        Err(_) => SyncError::Service {
            status,
            code: format!("http_{status}"),
            message: "the answer carried no error body".into(),
        },
    }
}

fn transport(e: reqwest::Error) -> SyncError {
    if e.is_timeout() {
        SyncError::Timeout(chain(&e))
    } else {
        SyncError::Unreachable(chain(&e))
    }
}

/// An error with its causes: reqwest's own message alone rarely says
/// whether it was DNS, a refused connection or a certificate.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, 9, 10)));
        assert_eq!(parse_content_range("bytes 0-0/1"), Some((0, 0, 1)));
        for bad in [
            "bytes 5-4/10",
            "bytes 5-10/10",
            "bytes */10",
            "items 1-2/3",
            "bytes 1-2",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_refusal_keeps_the_services_code_and_message() {
        let body = br#"{"code":"device_revoked","message":"revoked by the operator"}"#;
        match refusal(401, body) {
            SyncError::Service {
                status,
                code,
                message,
            } => {
                assert_eq!((status, code.as_str()), (401, "device_revoked"));
                assert_eq!(message, "revoked by the operator");
            }
            other => panic!("{other:?}"),
        }
        match refusal(502, b"<html>bad gateway</html>") {
            SyncError::Service { code, .. } => assert_eq!(code, "http_502"),
            other => panic!("{other:?}"),
        }
    }
}
