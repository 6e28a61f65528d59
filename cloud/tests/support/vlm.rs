//! A small OpenAI-compatible chat-completions server on loopback, in the
//! test process, that checks the structure of every request the service
//! sends it and answers as told (well, with garbage, outside the label set,
//! never, or too much).
//!
//! What it checks on its own, per request (a request failing any check is
//! answered 400, so the service falls back and the test sees it):
//! the key header; a system message first that names every allowed code;
//! then only user messages; every image a `data:image/jpeg;base64,` URL
//! whose bytes decode as a JPEG; every example naming its confirmed
//! diagnosis; the query last. What needs the service's answer (the
//! examples are the answer's `cases`, in order; no identifiers anywhere)
//! is checked by [`Seen::check_against`] after the call.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use dermascope_cloud_api::RagAnswer;
use serde_json::{json, Value};

pub const PATH: &str = "/v1/chat/completions";

/// How the fake model answers.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// A well-formed completion whose message content is this text.
    Reply(String),
    /// An HTTP 200 whose body is not a chat completion at all.
    Garbage,
    /// This status, with a small JSON error body.
    Status(u16),
    /// Accepts the request and never answers.
    Hang,
    /// A completion padded past the service's read cap.
    Oversized,
}

/// The key header the service must send.
#[derive(Clone, Debug)]
pub struct ExpectKey {
    pub header: &'static str,
    pub value: String,
}

/// One request as the fake model received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub headers: HeaderMap,
    pub raw: String,
    pub body: Value,
    /// What the server's own checks found wrong (empty: well-formed).
    pub problems: Vec<String>,
    /// Each example's image bytes and text, in order.
    pub examples: Vec<(Vec<u8>, String)>,
    /// The query's image, if it had one, and its text.
    pub query: (Option<Vec<u8>>, String),
}

pub struct FakeVlm {
    pub url: String,
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeVlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeVlm {
    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The only request received; panics unless exactly one came.
    pub fn one(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(seen.len(), 1, "the fake model got {} requests", seen.len());
        seen.into_iter().next().unwrap()
    }
}

struct Shared {
    behaviour: Behaviour,
    allowed: Vec<String>,
    key: Option<ExpectKey>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// Starts the fake model. `allowed` are the codes the system message must
/// name; `key` the header it must carry.
pub async fn start(behaviour: Behaviour, allowed: &[&str], key: Option<ExpectKey>) -> FakeVlm {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake model on loopback");
    let addr = listener.local_addr().expect("its address");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::new(Shared {
        behaviour,
        allowed: allowed.iter().map(|s| s.to_string()).collect(),
        key,
        seen: seen.clone(),
    });
    let app = Router::new()
        .route(PATH, post(handle))
        .with_state(shared)
        // The service's bodies carry several photographs.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    FakeVlm {
        url: format!("http://{addr}{PATH}"),
        addr,
        seen,
        task,
    }
}

/// A loopback URL on which nothing listens (a model that is down).
pub fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}{PATH}")
}

async fn handle(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let raw = String::from_utf8_lossy(&body).into_owned();
    let mut problems = Vec::new();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        problems.push(format!("body is not JSON: {e}"));
        Value::Null
    });
    if let Some(key) = &shared.key {
        match headers.get(key.header).and_then(|v| v.to_str().ok()) {
            Some(v) if v == key.value => {}
            other => problems.push(format!("header {} is {other:?}", key.header)),
        }
    }
    let (examples, query) = check_structure(&parsed, &shared.allowed, &mut problems);
    let failed = !problems.is_empty();
    if let Ok(mut seen) = shared.seen.lock() {
        seen.push(Seen {
            headers,
            raw,
            body: parsed,
            problems: problems.clone(),
            examples,
            query,
        });
    }
    if failed {
        return (StatusCode::BAD_REQUEST, problems.join("; ")).into_response();
    }
    match &shared.behaviour {
        Behaviour::Reply(content) => axum::Json(completion(content)).into_response(),
        Behaviour::Garbage => (StatusCode::OK, "<html>surprise</html>").into_response(),
        Behaviour::Status(code) => (
            StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(json!({"error": {"message": "overloaded"}})),
        )
            .into_response(),
        Behaviour::Hang => std::future::pending().await,
        Behaviour::Oversized => {
            let padding = "x".repeat(dermascope_cloud::rag::MAX_VLM_RESPONSE_BYTES + 1);
            axum::Json(completion(&padding)).into_response()
        }
    }
}

pub fn completion(content: &str) -> Value {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
    })
}

fn text_and_image(
    message: &Value,
    at: usize,
    problems: &mut Vec<String>,
) -> (Option<Vec<u8>>, String) {
    let Some(parts) = message.get("content").and_then(Value::as_array) else {
        problems.push(format!("message {at}: content is not a list of parts"));
        return (None, String::new());
    };
    let mut text = String::new();
    let mut image = None;
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(part.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("image_url") => {
                let url = part
                    .pointer("/image_url/url")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let Some(b64) = url.strip_prefix("data:image/jpeg;base64,") else {
                    problems.push(format!("message {at}: image is not a JPEG data URL"));
                    continue;
                };
                match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(bytes) => {
                        if image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
                            .is_err()
                        {
                            problems.push(format!("message {at}: image does not decode as JPEG"));
                        }
                        if image.replace(bytes).is_some() {
                            problems.push(format!("message {at}: more than one image"));
                        }
                    }
                    Err(e) => problems.push(format!("message {at}: bad base64: {e}")),
                }
            }
            other => problems.push(format!("message {at}: unknown part type {other:?}")),
        }
    }
    (image, text)
}

type Examples = Vec<(Vec<u8>, String)>;

fn check_structure(
    body: &Value,
    allowed: &[String],
    problems: &mut Vec<String>,
) -> (Examples, (Option<Vec<u8>>, String)) {
    let mut examples = Vec::new();
    let mut query = (None, String::new());
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        problems.push("no messages".into());
        return (examples, query);
    };
    if body.get("model").and_then(Value::as_str).is_none() {
        problems.push("no model".into());
    }
    let Some((system, rest)) = messages.split_first() else {
        problems.push("empty messages".into());
        return (examples, query);
    };
    if system.get("role").and_then(Value::as_str) != Some("system") {
        problems.push("the first message is not the system message".into());
    }
    let system_text = system.get("content").and_then(Value::as_str).unwrap_or("");
    for code in allowed {
        if !system_text.contains(&format!("- {code}:")) {
            problems.push(format!("the system message does not name {code}"));
        }
    }
    if !system_text.contains("\"differential\"") {
        problems.push("the system message gives no JSON shape".into());
    }
    let Some((last, example_messages)) = rest.split_last() else {
        problems.push("no query message".into());
        return (examples, query);
    };
    for (i, message) in rest.iter().enumerate() {
        if message.get("role").and_then(Value::as_str) != Some("user") {
            problems.push(format!("message {} is not a user message", i + 1));
        }
    }
    for (i, message) in example_messages.iter().enumerate() {
        let (image, text) = text_and_image(message, i + 1, problems);
        match image {
            Some(image) => {
                if !allowed
                    .iter()
                    .any(|c| text.contains(&format!("diagnosis {c} (")))
                {
                    problems.push(format!(
                        "example {} names no allowed confirmed diagnosis",
                        i + 1
                    ));
                }
                examples.push((image, text));
            }
            None => problems.push(format!("example {} has no image", i + 1)),
        }
    }
    query = text_and_image(last, rest.len(), problems);
    if !query.1.starts_with("Query") {
        problems.push("the last message is not the query".into());
    }
    (examples, query)
}

impl Seen {
    /// The checks that need the service's answer: one example per case of
    /// `answer.cases`, in its order, each showing `images[case id]` and
    /// naming the case's diagnosis; the query shows `query` (or nothing);
    /// none of `forbidden` (ids, lesion ids, clinic and device names,
    /// metadata) appears anywhere in the request.
    pub fn check_against(
        &self,
        answer: &RagAnswer,
        images: &HashMap<String, Vec<u8>>,
        query: Option<&[u8]>,
        forbidden: &[String],
    ) -> Vec<String> {
        let mut problems = self.problems.clone();
        if self.examples.len() != answer.cases.len() {
            problems.push(format!(
                "{} examples shown, {} cases answered",
                self.examples.len(),
                answer.cases.len()
            ));
        }
        for (i, (case, (image, text))) in answer.cases.iter().zip(&self.examples).enumerate() {
            match images.get(&case.id) {
                Some(expected) if expected == image => {}
                Some(_) => problems.push(format!(
                    "example {} does not show case {}'s image",
                    i + 1,
                    case.id
                )),
                None => problems.push(format!("case {} has no known image", case.id)),
            }
            if !text.contains(&format!("diagnosis {} (", case.diagnosis.code)) {
                problems.push(format!(
                    "example {} does not name {}",
                    i + 1,
                    case.diagnosis.code
                ));
            }
        }
        if self.query.0.as_deref() != query {
            problems.push(format!(
                "the query shows {} image bytes, expected {}",
                self.query.0.as_ref().map_or(0, Vec::len),
                query.map_or(0, <[u8]>::len)
            ));
        }
        for word in forbidden {
            if self.raw.contains(word.as_str()) {
                problems.push(format!("the request contains {word:?}"));
            }
        }
        problems
    }
}
