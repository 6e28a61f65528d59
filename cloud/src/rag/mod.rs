//! Retrieval-augmented answers (`POST /v1/rag`): the most similar confirmed
//! cases a device may see, shown to a vision-language model as in-context
//! examples; retrieval alone when there is no model or it fails.
//!
//! # Design notes
//!
//! * Retrieval is one SQL query per table over the partial HNSW index of the
//!   query's encoder ([`retrieve`]), scoped to the viewer's clinic and the
//!   reference library; the request cannot widen it.
//! * The model gets photographs, confirmed diagnoses and similarities, never
//!   an identifier or metadata ([`prompt`] says why).
//! * The model's answer is used only if it parses as the asked JSON and
//!   names only allowed diagnoses; otherwise, or when the model is away,
//!   slow or errs, the answer is the retrieval's similarity-weighted vote
//!   ([`vote`]) and `fallback_reason` says why. A failing model never fails
//!   the request.
//! * `cases` are exactly the examples the model was shown, in its order,
//!   whichever answered.

pub mod prompt;
pub mod retrieve;
pub mod vlm;
pub mod vote;

use dermascope_cloud_api::{
    AnsweredBy, RagAnswer, RagRequest, RetrievedCase, WireDiagnosis, MAX_ORIGINAL_BYTES, MAX_RAG_K,
    MAX_THUMBNAIL_BYTES,
};
use sqlx::PgPool;

pub use prompt::Label;
pub use vlm::{Vlm, VlmAuth, VlmConfig, VlmSetupError, MAX_VLM_RESPONSE_BYTES};

use crate::auth::Viewer;
use crate::error::ApiError;

/// `fallback_reason`s of a retrieval-only answer.
pub mod fallback {
    pub const NO_MODEL: &str = "no model configured";
    pub const UNREACHABLE: &str = "model unreachable";
    pub const TIMED_OUT: &str = "model timed out";
    pub const OUTSIDE_LABELS: &str = "model answered outside the label set";
    pub const MALFORMED: &str = "model answered malformed JSON";
}

/// Largest value a `halfvec` holds.
const HALF_MAX: f32 = 65504.0;

/// Most image bytes sent to the model in one request. Originals are sent
/// in place of thumbnails only while each fits its share of this: a
/// request of sixteen 8 MiB photographs would be refused by hosted models
/// and slow everywhere.
const MAX_IMAGE_BYTES: usize = 16 * 1024 * 1024;

/// The HAM10000 classes, the allowed diagnoses when the library has none.
const HAM10000: [(&str, &str); 7] = [
    (
        "akiec",
        "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    ),
    ("bcc", "Basal cell carcinoma"),
    ("bkl", "Benign keratosis-like lesion"),
    ("df", "Dermatofibroma"),
    ("mel", "Melanoma"),
    ("nv", "Melanocytic nevus"),
    ("vasc", "Vascular lesion"),
];

/// Answers a RAG request for `viewer`: retrieval over its clinic's fleet
/// cases and the reference library, then the model if one is configured.
pub async fn answer(
    pool: &PgPool,
    viewer: &Viewer,
    vlm: Option<&Vlm>,
    request: RagRequest,
) -> Result<RagAnswer, ApiError> {
    let dim = validate(pool, viewer, &request).await?;
    let k = match vlm {
        Some(vlm) => request.k.min(vlm.max_examples()),
        None => request.k,
    };
    let clinic_id = viewer.clinic_id;
    let hits = retrieve::top_k(
        pool,
        clinic_id,
        &request.model_id,
        dim,
        &request.embedding,
        k,
    )
    .await?;
    let cases: Vec<RetrievedCase> = hits
        .iter()
        .map(|h| RetrievedCase {
            id: h.case_id.clone(),
            diagnosis: WireDiagnosis {
                code: h.label.code.clone(),
                name: h.label.name.clone(),
            },
            similarity: h.similarity,
            source: h.source,
        })
        .collect();

    let Some(vlm) = vlm else {
        return Ok(retrieval_only(cases, fallback::NO_MODEL));
    };

    let mut labels = retrieve::library_labels(pool, clinic_id, &request.model_id).await?;
    if labels.is_empty() {
        labels = HAM10000
            .iter()
            .map(|(code, name)| Label {
                code: (*code).into(),
                name: (*name).into(),
            })
            .collect();
    }
    // The retrieved cases' own diagnoses are always allowed, even past the
    // label list's cap.
    for hit in &hits {
        if !labels.iter().any(|l| l.code == hit.label.code) {
            labels.push(hit.label.clone());
        }
    }

    let share = MAX_IMAGE_BYTES / (hits.len() + 1);
    let originals = if viewer.allow_originals { share } else { 0 };
    let images = retrieve::images(pool, clinic_id, &hits, originals).await?;
    // A case deleted between the two queries is not shown, so it must not
    // be listed either.
    let (mut shown, mut examples_jpeg) = (Vec::new(), Vec::new());
    for ((case, hit), jpeg) in cases.into_iter().zip(&hits).zip(images) {
        if let Some(jpeg) = jpeg {
            shown.push((case, hit));
            examples_jpeg.push(jpeg);
        }
    }
    let examples: Vec<prompt::Example<'_>> = shown
        .iter()
        .zip(&examples_jpeg)
        .map(|((case, hit), jpeg)| prompt::Example {
            jpeg,
            diagnosis: &hit.label,
            similarity: case.similarity,
        })
        .collect();
    let query_jpeg = request
        .photo_jpeg
        .as_deref()
        .or(request.thumbnail_jpeg.as_deref());
    let body = prompt::chat_request(vlm.model(), &labels, &examples, query_jpeg);
    drop(examples);
    let cases: Vec<RetrievedCase> = shown.into_iter().map(|(case, _)| case).collect();

    let reason = match vlm.post(&body).await {
        Err(e) => {
            tracing::warn!(error = %e, "vision-language model failed; answering from retrieval");
            match e {
                vlm::CallError::Timeout => fallback::TIMED_OUT,
                vlm::CallError::Oversized => fallback::MALFORMED,
                vlm::CallError::Unreachable(_) | vlm::CallError::Status(_) => fallback::UNREACHABLE,
            }
        }
        Ok(reply) => {
            match prompt::response_text(&reply).and_then(|t| prompt::parse_answer(&t, &labels)) {
                Ok(differential) => {
                    tracing::info!(
                        examples = cases.len(),
                        diagnoses = differential.len(),
                        "answered by the vision-language model"
                    );
                    return Ok(RagAnswer {
                        differential,
                        answered_by: AnsweredBy::Model,
                        fallback_reason: None,
                        model: Some(vlm.model().to_owned()),
                        cases,
                    });
                }
                // The reply's text is not logged: it may quote the prompt.
                Err(e) => {
                    tracing::warn!(error = %e, "unusable model answer; answering from retrieval");
                    match e {
                        prompt::AnswerError::OutsideLabels => fallback::OUTSIDE_LABELS,
                        prompt::AnswerError::Malformed(_) => fallback::MALFORMED,
                    }
                }
            }
        }
    };
    Ok(retrieval_only(cases, reason))
}

fn retrieval_only(cases: Vec<RetrievedCase>, reason: &str) -> RagAnswer {
    tracing::info!(examples = cases.len(), reason, "answered by retrieval");
    RagAnswer {
        differential: vote::weighted_vote(&cases),
        answered_by: AnsweredBy::Retrieval,
        fallback_reason: Some(reason.to_owned()),
        model: None,
        cases,
    }
}

/// Checks a request against the limits and the viewer's clinic; returns the
/// encoder's dimension.
async fn validate(pool: &PgPool, viewer: &Viewer, request: &RagRequest) -> Result<usize, ApiError> {
    if !(1..=MAX_RAG_K).contains(&request.k) {
        return Err(ApiError::bad_request(format!(
            "k must be between 1 and {MAX_RAG_K}, not {}",
            request.k
        )));
    }
    let Some(dim) = retrieve::model_dim(pool, &request.model_id).await? else {
        return Err(ApiError::unknown_model(format!(
            "the service indexes no encoder {:?}; GET /v1/device lists the known ones",
            request.model_id
        )));
    };
    let dim = usize::try_from(dim)
        .map_err(|_| ApiError::internal("the models table holds a negative dimension"))?;
    if request.embedding.len() != dim {
        return Err(ApiError::bad_embedding(format!(
            "the embedding has {} values; encoder {:?} makes {dim}",
            request.embedding.len(),
            request.model_id
        )));
    }
    if let Some(i) = request
        .embedding
        .iter()
        .position(|x| !x.is_finite() || x.abs() > HALF_MAX)
    {
        return Err(ApiError::bad_embedding(format!(
            "embedding value {i} is not finite or beyond a half float's range (±{HALF_MAX})"
        )));
    }
    if let Some(photo) = &request.photo_jpeg {
        if !viewer.allow_originals {
            return Err(ApiError::originals_not_allowed(
                "this clinic does not let original photographs leave its devices; send the \
                 thumbnail instead",
            ));
        }
        check_jpeg("photo_jpeg", photo, MAX_ORIGINAL_BYTES)?;
    }
    if let Some(thumbnail) = &request.thumbnail_jpeg {
        check_jpeg("thumbnail_jpeg", thumbnail, MAX_THUMBNAIL_BYTES)?;
    }
    Ok(dim)
}

fn check_jpeg(field: &str, bytes: &[u8], max: usize) -> Result<(), ApiError> {
    if bytes.len() > max {
        return Err(ApiError::too_large(format!(
            "{field} is {} bytes; at most {max} are accepted",
            bytes.len()
        )));
    }
    // Reads the header only: enough to refuse what no model could view,
    // without decoding a whole photograph per request.
    let reader =
        image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Jpeg);
    if reader.into_dimensions().is_err() {
        return Err(ApiError::bad_photo(format!(
            "{field} is not a readable JPEG"
        )));
    }
    Ok(())
}
