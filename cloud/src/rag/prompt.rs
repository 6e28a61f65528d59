//! The chat-completions request shown to the vision-language model, and the
//! strict reading of its answer.
//!
//! What the model sees, and nothing else: the allowed diagnoses, and for
//! every example its photograph, its confirmed diagnosis and its similarity
//! to the query, then the query's photograph. No case id, lesion id, device,
//! clinic, age, sex, site or note: the model runs at a third party (Azure
//! OpenAI, say) that has no need for them, and any of them, alone or
//! together, can identify a patient. The examples are numbered by their
//! place in the prompt only.

use base64::Engine;
use dermascope_cloud_api::RankedDiagnosis;
use serde::Deserialize;
use serde_json::{json, Value};

/// A diagnosis the model may answer with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub code: String,
    pub name: String,
}

/// One in-context example, as the model sees it.
#[derive(Clone, Debug)]
pub struct Example<'a> {
    pub jpeg: &'a [u8],
    pub diagnosis: &'a Label,
    pub similarity: f32,
}

/// Longest reason kept from the model, in characters: one line on a
/// handheld's screen.
const MAX_REASON_CHARS: usize = 240;

/// Tokens the model may spend on its answer: a differential of a few
/// diagnoses with one line each needs far fewer.
const MAX_ANSWER_TOKENS: u32 = 1024;

fn data_url(jpeg: &[u8]) -> String {
    format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(jpeg)
    )
}

fn system_message(labels: &[Label]) -> String {
    let mut text = String::from(
        "You are assisting a clinician with a dermoscopic image. You will be shown \
         similar dermoscopic images whose diagnoses were confirmed, most similar first, \
         each with its confirmed diagnosis, and then the query image. Give a ranked \
         differential diagnosis for the query image, most likely first, with a one-line \
         reason for each diagnosis.\n\nAllowed diagnoses (answer with these codes only):\n",
    );
    for label in labels {
        text.push_str(&format!("- {}: {}\n", label.code, label.name));
    }
    text.push_str(
        "\nAnswer with JSON only, no prose and no code fence, exactly in this shape:\n\
         {\"differential\": [{\"code\": \"<an allowed code>\", \"reason\": \"<one line>\", \
         \"confidence\": <a number from 0 to 1>}]}\n\
         List at least one diagnosis, each code at most once.",
    );
    text
}

/// The request body: a system message naming the allowed diagnoses, one user
/// message per example in order, then the query (its image, or a sentence
/// saying there is none).
pub fn chat_request(
    model: &str,
    labels: &[Label],
    examples: &[Example<'_>],
    query_jpeg: Option<&[u8]>,
) -> Value {
    let mut messages = Vec::with_capacity(examples.len() + 2);
    messages.push(json!({"role": "system", "content": system_message(labels)}));
    let n = examples.len();
    for (i, example) in examples.iter().enumerate() {
        messages.push(json!({
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": format!(
                        "Example {} of {n}: confirmed diagnosis {} ({}); similarity to the query {:.2}.",
                        i + 1,
                        example.diagnosis.code,
                        example.diagnosis.name,
                        example.similarity
                    ),
                },
                {"type": "image_url", "image_url": {"url": data_url(example.jpeg)}},
            ],
        }));
    }
    let query = match query_jpeg {
        Some(jpeg) => json!([
            {
                "type": "text",
                "text": "Query image: give the ranked differential as JSON.",
            },
            {"type": "image_url", "image_url": {"url": data_url(jpeg)}},
        ]),
        None => json!([{
            "type": "text",
            "text": "Query: no image of the query lesion is available; give the ranked \
                     differential as JSON from the examples alone.",
        }]),
    };
    messages.push(json!({"role": "user", "content": query}));
    json!({
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": MAX_ANSWER_TOKENS,
    })
}

/// Why the model's answer was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("not the expected JSON: {0}")]
    Malformed(String),
    #[error("a diagnosis outside the label set")]
    OutsideLabels,
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<Value>,
}

#[derive(Deserialize)]
struct ModelAnswer {
    differential: Vec<ModelDiagnosis>,
}

#[derive(Deserialize)]
struct ModelDiagnosis {
    code: String,
    reason: String,
    #[serde(default)]
    confidence: Option<f64>,
}

/// Where the JSON went wrong, without serde's message, which quotes the
/// offending value (model output is not logged).
fn malformed(what: &str, e: &serde_json::Error) -> AnswerError {
    AnswerError::Malformed(format!(
        "{what}: {:?} error at line {} column {}",
        e.classify(),
        e.line(),
        e.column()
    ))
}

/// The text of the first choice of a chat-completions response body.
pub fn response_text(body: &[u8]) -> Result<String, AnswerError> {
    let response: ChatResponse =
        serde_json::from_slice(body).map_err(|e| malformed("chat response", &e))?;
    let choice = response
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| AnswerError::Malformed("no choices".into()))?;
    match choice.message.content {
        Some(Value::String(text)) => Ok(text),
        // Some servers return content parts even for text.
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                if let Some(t) = part.get("text").and_then(Value::as_str) {
                    text.push_str(t);
                }
            }
            Ok(text)
        }
        _ => Err(AnswerError::Malformed("no text content".into())),
    }
}

/// The JSON inside a reply, without the ```json fence some models add.
fn unfenced(text: &str) -> &str {
    let text = text.trim();
    let Some(rest) = text.strip_prefix("```") else {
        return text;
    };
    let rest = rest.strip_prefix("json").unwrap_or(rest);
    rest.strip_suffix("```").unwrap_or(rest).trim()
}

/// Reads the model's reply strictly: JSON of the asked shape, at least one
/// diagnosis, every code in `labels` (names are ours, not the model's). A
/// code listed twice keeps its first, higher, rank.
pub fn parse_answer(text: &str, labels: &[Label]) -> Result<Vec<RankedDiagnosis>, AnswerError> {
    let answer: ModelAnswer =
        serde_json::from_str(unfenced(text)).map_err(|e| malformed("answer", &e))?;
    if answer.differential.is_empty() {
        return Err(AnswerError::Malformed("an empty differential".into()));
    }
    let mut ranked: Vec<RankedDiagnosis> = Vec::with_capacity(answer.differential.len());
    for item in answer.differential {
        let code = item.code.trim();
        let label = labels
            .iter()
            .find(|l| l.code.eq_ignore_ascii_case(code))
            .ok_or(AnswerError::OutsideLabels)?;
        if ranked.iter().any(|r| r.code == label.code) {
            continue;
        }
        let reason: String = item
            .reason
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(MAX_REASON_CHARS)
            .collect();
        let score = item
            .confidence
            .filter(|c| c.is_finite() && (0.0..=1.0).contains(c))
            .map(|c| c as f32);
        ranked.push(RankedDiagnosis {
            code: label.code.clone(),
            name: label.name.clone(),
            reason,
            score,
        });
    }
    Ok(ranked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<Label> {
        ["mel", "nv"]
            .iter()
            .map(|c| Label {
                code: (*c).into(),
                name: c.to_uppercase(),
            })
            .collect()
    }

    #[test]
    fn a_fenced_answer_is_read_with_our_names() {
        let text = "```json\n{\"differential\":[{\"code\":\"MEL\",\"reason\":\"irregular\\nnetwork\",\"confidence\":0.7},{\"code\":\"nv\",\"reason\":\"r\",\"confidence\":7}]}\n```";
        let ranked = parse_answer(text, &labels()).unwrap();
        assert_eq!(ranked.len(), 2);
        assert_eq!(ranked[0].code, "mel");
        assert_eq!(ranked[0].name, "MEL");
        assert_eq!(ranked[0].reason, "irregular network");
        assert_eq!(ranked[0].score, Some(0.7));
        assert_eq!(
            ranked[1].score, None,
            "a confidence outside 0..=1 is dropped"
        );
    }

    #[test]
    fn a_code_outside_the_labels_refuses_the_whole_answer() {
        let text = r#"{"differential":[{"code":"mel","reason":"a"},{"code":"scc","reason":"b"}]}"#;
        assert_eq!(
            parse_answer(text, &labels()),
            Err(AnswerError::OutsideLabels)
        );
    }

    #[test]
    fn prose_empty_and_misshapen_answers_are_malformed() {
        for text in [
            "I think it is a melanoma.",
            r#"{"differential":[]}"#,
            r#"{"differential":[{"code":"mel"}]}"#,
            r#"{"diagnosis":"mel"}"#,
            "",
        ] {
            assert!(
                matches!(
                    parse_answer(text, &labels()),
                    Err(AnswerError::Malformed(_))
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn repeated_codes_keep_their_first_rank() {
        let text = r#"{"differential":[{"code":"nv","reason":"a"},{"code":"mel","reason":"b"},{"code":"nv","reason":"c"}]}"#;
        let codes: Vec<_> = parse_answer(text, &labels())
            .unwrap()
            .into_iter()
            .map(|r| r.code)
            .collect();
        assert_eq!(codes, ["nv", "mel"]);
    }

    #[test]
    fn the_response_text_is_the_first_choice() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"hi"}}]}"#;
        assert_eq!(response_text(body).unwrap(), "hi");
        assert!(response_text(br#"{"choices":[]}"#).is_err());
        assert!(response_text(b"<html>").is_err());
    }
}
