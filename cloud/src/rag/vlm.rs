//! The OpenAI-compatible chat-completions client (Azure OpenAI, or any local
//! server that speaks the same API).

use std::time::Duration;

use dermascope_cloud_api::MAX_RAG_K;
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::{Deserialize, Serialize};

/// Largest chat-completions response read: a differential of a few lines is
/// a few kilobytes; anything far bigger is not an answer, and reading it
/// unbounded would let a misbehaving endpoint exhaust the service's memory.
pub const MAX_VLM_RESPONSE_BYTES: usize = 1024 * 1024;

/// The `[vlm]` section of the service's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VlmConfig {
    /// The full chat-completions URL, e.g. Azure OpenAI's
    /// `https://<resource>.openai.azure.com/openai/deployments/<deployment>/chat/completions?api-version=2024-10-21`
    /// or a local server's `http://127.0.0.1:8080/v1/chat/completions`.
    pub url: String,
    /// The `model` field of each request (Azure ignores it: the deployment
    /// in the URL names the model).
    pub model: String,
    /// The NAME of the environment variable that holds the key; the key
    /// itself is never in a configuration file. Absent: no key is sent
    /// (a local server without authentication).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// How the key is sent.
    #[serde(default)]
    pub auth: VlmAuth,
    /// Whole-request deadline; past it the service answers from retrieval.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Most examples shown to the model (each is an image it must read);
    /// a request's `k` is cut to this when a model is configured.
    #[serde(default = "default_max_examples")]
    pub max_examples: usize,
    /// Photographs travel to the model, so plain `http://` is accepted only
    /// for a loopback address unless this is set (a model server on a
    /// trusted private network).
    #[serde(default)]
    pub allow_plain_http: bool,
}

fn default_timeout_ms() -> u64 {
    20_000
}

fn default_max_examples() -> usize {
    MAX_RAG_K
}

/// How the key is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VlmAuth {
    /// `Authorization: Bearer <key>` (OpenAI, most local servers).
    #[default]
    Bearer,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
}

/// Why a [`Vlm`] could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum VlmSetupError {
    #[error("[vlm] url {url:?} is not an http(s) URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "[vlm] url is plain http to a host that is not loopback; photographs would \
         travel unencrypted: use https, or set allow_plain_http = true for a trusted network"
    )]
    PlainHttp,
    #[error("[vlm] api_key_env names {name:?}, which is not set (or empty) in the environment")]
    MissingKey { name: String },
    #[error("[vlm] the key in ${name} cannot be sent as an HTTP header")]
    BadKey { name: String },
    #[error("[vlm] timeout_ms must be at least 1")]
    ZeroTimeout,
    #[error("[vlm] max_examples must be between 1 and {MAX_RAG_K}, not {0}")]
    BadMaxExamples(usize),
    #[error("[vlm] HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Why a call to the model gave no usable reply body.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("timed out")]
    Timeout,
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("answered more than {MAX_VLM_RESPONSE_BYTES} bytes")]
    Oversized,
}

/// A configured model endpoint. Cheap to clone (the HTTP client is shared).
#[derive(Clone)]
pub struct Vlm {
    client: reqwest::Client,
    url: reqwest::Url,
    model: String,
    key: Option<(HeaderName, HeaderValue)>,
    max_examples: usize,
}

// Never show the key (it is marked sensitive too, but say so here as well).
impl std::fmt::Debug for Vlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vlm")
            .field("url", &self.url.as_str())
            .field("model", &self.model)
            .field("has_key", &self.key.is_some())
            .field("max_examples", &self.max_examples)
            .finish_non_exhaustive()
    }
}

impl Vlm {
    /// Reads the key from the environment once, here, and builds the client.
    pub fn new(config: &VlmConfig) -> Result<Vlm, VlmSetupError> {
        let url = reqwest::Url::parse(&config.url).map_err(|e| VlmSetupError::BadUrl {
            url: config.url.clone(),
            reason: e.to_string(),
        })?;
        match url.scheme() {
            "https" => {}
            "http" => {
                let loopback = url.host_str().is_some_and(|host| {
                    host.eq_ignore_ascii_case("localhost")
                        || host
                            .trim_start_matches('[')
                            .trim_end_matches(']')
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                });
                if !loopback && !config.allow_plain_http {
                    return Err(VlmSetupError::PlainHttp);
                }
            }
            other => {
                return Err(VlmSetupError::BadUrl {
                    url: config.url.clone(),
                    reason: format!("scheme {other:?}"),
                })
            }
        }
        if config.timeout_ms == 0 {
            return Err(VlmSetupError::ZeroTimeout);
        }
        if !(1..=MAX_RAG_K).contains(&config.max_examples) {
            return Err(VlmSetupError::BadMaxExamples(config.max_examples));
        }
        let key = match &config.api_key_env {
            None => None,
            Some(name) => {
                let key = std::env::var(name)
                    .ok()
                    .map(|k| k.trim().to_owned())
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| VlmSetupError::MissingKey { name: name.clone() })?;
                let (header, value) = match config.auth {
                    VlmAuth::Bearer => (AUTHORIZATION, format!("Bearer {key}")),
                    VlmAuth::ApiKey => (HeaderName::from_static("api-key"), key),
                };
                let mut value = HeaderValue::from_str(&value)
                    .map_err(|_| VlmSetupError::BadKey { name: name.clone() })?;
                value.set_sensitive(true);
                Some((header, value))
            }
        };
        let timeout = Duration::from_millis(config.timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect would carry the photographs somewhere unconfigured.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(VlmSetupError::Client)?;
        Ok(Vlm {
            client,
            url,
            model: config.model.clone(),
            key,
            max_examples: config.max_examples,
        })
    }

    /// The `model` named in requests and answers.
    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn max_examples(&self) -> usize {
        self.max_examples
    }

    /// POSTs `body` and returns the response body, read up to
    /// [`MAX_VLM_RESPONSE_BYTES`].
    pub(crate) async fn post(&self, body: &serde_json::Value) -> Result<Vec<u8>, CallError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| CallError::Unreachable(format!("request body: {e}")))?;
        let mut request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(bytes);
        if let Some((name, value)) = &self.key {
            request = request.header(name.clone(), value.clone());
        }
        let mut response = request.send().await.map_err(classify)?;
        let status = response.status();
        if !status.is_success() {
            return Err(CallError::Status(status.as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_VLM_RESPONSE_BYTES as u64)
        {
            return Err(CallError::Oversized);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > MAX_VLM_RESPONSE_BYTES {
                return Err(CallError::Oversized);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn classify(e: reqwest::Error) -> CallError {
    if e.is_timeout() {
        CallError::Timeout
    } else {
        // Only the kind, never the URL's query (Azure's api-version is
        // harmless, but a local server's URL might carry a token).
        let kind = if e.is_connect() {
            "connection failed"
        } else if e.is_body() || e.is_decode() {
            "response body failed"
        } else {
            "request failed"
        };
        CallError::Unreachable(kind.into())
    }
}
