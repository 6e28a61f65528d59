//! The fleet service's wire contract: every JSON body that crosses between a
//! device (`dermascope-sync`) and the service (`dermascope-cloud`), and the
//! limits both sides enforce.
//!
//! # Design notes
//!
//! * Only serde types and constants live here, no HTTP client or server and
//!   no database: the handheld's build pulls in this crate, not the
//!   service's dependencies.
//! * A device is named by the service (`device_id`), never by what a case
//!   claims: the service stamps uploads with the authenticated device.
//! * Cursors are opaque strings to a device. It stores the last one it
//!   applied and sends it back; the service refuses one that is not its
//!   clinic's.
//! * Every refusal is an HTTP status plus an [`ErrorBody`] whose `code` a
//!   program can match and whose `message` a person can act on.
//! * Free-text notes never leave the device: [`WireMetadata`] has no field
//!   for them.
//!
//! Architecture Invariant: this crate depends on serde, serde_json, base64
//! and thiserror only.

use serde::{Deserialize, Serialize};

/// Version prefix of every route.
pub const API_PREFIX: &str = "/v1";

/// Most cases a device may upload in one request.
pub const MAX_UPLOAD_BATCH: usize = 64;
/// Most cases the service returns in one pull page.
pub const MAX_PULL_PAGE: usize = 256;
/// Largest request body the service reads (a full batch of originals fits).
pub const MAX_REQUEST_BYTES: usize = 48 * 1024 * 1024;
/// Largest response body a device reads before giving up on it.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Largest original photograph accepted (the device store's own cap).
pub const MAX_ORIGINAL_BYTES: usize = 8 * 1024 * 1024;
/// Largest thumbnail accepted.
pub const MAX_THUMBNAIL_BYTES: usize = 256 * 1024;
/// Most similar cases a RAG request may ask for.
pub const MAX_RAG_K: usize = 16;

/// Routes, relative to the service's base URL.
pub mod routes {
    /// `GET`, no credential: liveness and the schema version.
    pub const HEALTH: &str = "/v1/health";
    /// `GET`: who the credential is ([`super::DeviceInfo`]).
    pub const DEVICE: &str = "/v1/device";
    /// `POST` an [`super::UploadBatch`] -> [`super::UploadReceipt`];
    /// `GET ?model_id=&cursor=&limit=` -> [`super::CasePage`].
    pub const CASES: &str = "/v1/cases";
    /// `POST` a [`super::RagRequest`] -> [`super::RagAnswer`].
    pub const RAG: &str = "/v1/rag";
    /// `POST` a [`super::DeviceReport`] (the device's versions and backlog,
    /// sent at every sync cycle) -> [`super::UpdateOffer`] (what the
    /// device's rollout asks of it now).
    pub const UPDATE: &str = "/v1/update";
    /// `POST` an [`super::UpdateResult`] -> [`super::UpdateAck`].
    pub const UPDATE_RESULT: &str = "/v1/update/result";
    /// `GET` (optionally with `Range: bytes=N-` or `bytes=N-M`) the
    /// archive of a bundle this device was offered: `application/x-tar`,
    /// `200` whole or `206` with `Content-Range`; `416` past the end. Use
    /// [`super::bundle_archive_route`].
    pub const BUNDLE_ARCHIVE: &str = "/v1/bundles/{bundle_id}/archive";
}

/// [`routes::BUNDLE_ARCHIVE`] for one bundle.
pub fn bundle_archive_route(bundle_id: &str) -> String {
    routes::BUNDLE_ARCHIVE.replace("{bundle_id}", bundle_id)
}

/// `Authorization: Bearer <credential>`, where the credential is
/// `<device_id>.<secret>` exactly as `dermascope-cloud device add` printed it.
pub fn bearer(credential: &str) -> String {
    format!("Bearer {}", credential.trim())
}

/// Splits a credential into the device id and the secret.
pub fn split_credential(credential: &str) -> Option<(&str, &str)> {
    let (device, secret) = credential.trim().split_once('.')?;
    (!device.is_empty() && !secret.is_empty()).then_some((device, secret))
}

/// The body of every refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, machine-readable: see [`codes`].
    pub code: String,
    /// What went wrong and what to do, for a person.
    pub message: String,
}

/// The `code`s of [`ErrorBody`].
pub mod codes {
    pub const UNAUTHENTICATED: &str = "unauthenticated";
    pub const REVOKED: &str = "device_revoked";
    pub const FORBIDDEN: &str = "forbidden";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const TOO_LARGE: &str = "too_large";
    pub const BAD_EMBEDDING: &str = "bad_embedding";
    pub const UNKNOWN_MODEL: &str = "unknown_model";
    pub const BAD_PHOTO: &str = "bad_photo";
    pub const ORIGINALS_NOT_ALLOWED: &str = "originals_not_allowed";
    pub const BAD_CURSOR: &str = "bad_cursor";
    pub const NOT_FOUND: &str = "not_found";
    /// An update result for a rollout this device is not part of.
    pub const NOT_IN_ROLLOUT: &str = "not_in_rollout";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const INTERNAL: &str = "internal";
}

/// `GET /v1/device`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device_id: String,
    pub clinic_id: String,
    pub clinic_name: String,
    /// Whether this clinic lets original photographs leave the device
    /// (uploads and RAG); thumbnails always may.
    pub allow_originals: bool,
    /// Encoders the service indexes, with their embedding dimension.
    pub models: Vec<ModelInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub model_id: String,
    pub dim: usize,
}

/// A diagnosis as it travels: the code filters and counts use, the name a
/// clinician reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDiagnosis {
    pub code: String,
    pub name: String,
}

/// Clinical context that may leave the device (no free-text note).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_years: Option<u16>,
    /// `female`, `male` or `other`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anatomical_site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fitzpatrick_type: Option<u8>,
    /// Lets retrieval show one photograph per lesion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lesion_id: Option<String>,
}

/// Where a case the service holds came from, as a device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireSource {
    /// The shared reference library every clinic sees.
    Reference,
    /// Captured by a device of the same clinic.
    Fleet,
}

/// One revision of one case, up or down.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct WireCase {
    /// The case's UUIDv7, made on the device that captured it.
    pub id: String,
    /// 1 at capture, bumped by every change on the device.
    pub revision: u64,
    pub model_id: String,
    pub embedding: Vec<f32>,
    pub diagnosis: WireDiagnosis,
    pub label_confirmed: bool,
    #[serde(default)]
    pub metadata: WireMetadata,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// JPEG, base64.
    #[serde(with = "b64")]
    pub thumbnail_jpeg: Vec<u8>,
    /// JPEG, base64; only where the clinic allows originals to leave.
    #[serde(default, with = "b64_opt", skip_serializing_if = "Option::is_none")]
    pub original_jpeg: Option<Vec<u8>>,
    /// Set by the service on pulls; ignored on uploads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<WireSource>,
    /// Set by the service on pulls (the capturing device); ignored on uploads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

// A case is patient data: Debug shows what identifies the record, not the
// photographs or the metadata.
impl std::fmt::Debug for WireCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireCase")
            .field("revision", &self.revision)
            .field("model_id", &self.model_id)
            .field("dim", &self.embedding.len())
            .field("diagnosis", &self.diagnosis.code)
            .field("thumbnail_bytes", &self.thumbnail_jpeg.len())
            .field("has_original", &self.original_jpeg.is_some())
            .finish_non_exhaustive()
    }
}

/// `POST /v1/cases`: at most [`MAX_UPLOAD_BATCH`] cases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadBatch {
    pub cases: Vec<WireCase>,
}

/// What the service did with one uploaded revision. Every outcome means
/// the service holds this revision or a newer one durably, so the device
/// may clear it from its outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadOutcome {
    /// Stored now.
    Stored,
    /// This `(id, revision)` was stored before (a retried batch).
    AlreadyStored,
    /// The service holds a newer revision, which it kept.
    Superseded,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadResult {
    pub id: String,
    pub revision: u64,
    pub outcome: UploadOutcome,
}

/// The answer to an upload: one result per case, in the batch's order,
/// sent only after the whole batch is committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadReceipt {
    pub results: Vec<UploadResult>,
}

/// `GET /v1/cases`: the next cases after `cursor` for one encoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CasePage {
    /// Reference and fleet cases of the device's clinic embedded by the
    /// requested encoder, newest change last; never the device's own.
    pub cases: Vec<WireCase>,
    /// Send this back to continue after these cases.
    pub cursor: String,
    /// Whether another page follows right away.
    pub more: bool,
}

/// `POST /v1/rag`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RagRequest {
    pub model_id: String,
    pub embedding: Vec<f32>,
    /// Similar cases to retrieve (1..=[`MAX_RAG_K`]).
    pub k: usize,
    /// The query photograph, JPEG base64, where the clinic allows it; the
    /// model is shown the query's thumbnail otherwise.
    #[serde(default, with = "b64_opt", skip_serializing_if = "Option::is_none")]
    pub photo_jpeg: Option<Vec<u8>>,
    #[serde(default, with = "b64_opt", skip_serializing_if = "Option::is_none")]
    pub thumbnail_jpeg: Option<Vec<u8>>,
}

impl std::fmt::Debug for RagRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RagRequest")
            .field("model_id", &self.model_id)
            .field("dim", &self.embedding.len())
            .field("k", &self.k)
            .field("has_photo", &self.photo_jpeg.is_some())
            .finish_non_exhaustive()
    }
}

/// Who produced a [`RagAnswer`]'s differential.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnsweredBy {
    /// The vision-language model, shown the retrieved cases.
    Model,
    /// Retrieval alone (similarity-weighted vote): no model configured, or
    /// it failed; `fallback_reason` says which.
    Retrieval,
}

/// One diagnosis of a ranked differential.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankedDiagnosis {
    pub code: String,
    pub name: String,
    /// One line from the model; for retrieval, the vote it got.
    pub reason: String,
    /// Similarity-weighted vote share for retrieval; the model's own
    /// confidence when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// A case the answer was built from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetrievedCase {
    pub id: String,
    pub diagnosis: WireDiagnosis,
    /// Inner product of the two (L2-normalised) embeddings.
    pub similarity: f32,
    pub source: WireSource,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RagAnswer {
    /// Most likely first.
    pub differential: Vec<RankedDiagnosis>,
    pub answered_by: AnsweredBy,
    /// Why the model did not answer, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    /// The model that answered, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The cases retrieved (one per lesion), most similar first: exactly
    /// the examples the model was shown, in its order.
    pub cases: Vec<RetrievedCase>,
}

/// Longest `detail` an [`UpdateResult`] may carry.
pub const MAX_UPDATE_DETAIL: usize = 500;

/// `POST /v1/update`: what the device runs, sent at every sync cycle; the
/// fleet status page shows it, and it settles a result whose report was
/// lost (a device that runs the rollout's version has installed it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// The daemon's `MAJOR.MINOR.PATCH`.
    pub daemon_version: String,
    /// The installed bundle version (`current`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_version: Option<u64>,
    /// The encoder the device embeds with.
    pub encoder_model_id: String,
    /// Cases in the outbox.
    pub pending_uploads: u64,
    /// Bundle versions this device marked failed (never retried on its own).
    #[serde(default)]
    pub failed_versions: Vec<u64>,
}

/// The answer to a [`DeviceReport`]: at most one thing to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum UpdateOffer {
    /// Nothing to do.
    None,
    /// Download this bundle's archive ([`bundle_archive_route`]), check its
    /// size and sha256, then verify and install it as usual (the archive's
    /// own signature is what the device trusts, not this offer).
    Install {
        rollout_id: String,
        bundle_id: String,
        version: u64,
        archive_sha256: String,
        archive_size: u64,
    },
    /// The operator rolled the rollout back: switch back from `version`
    /// to the kept previous version (only if `version` is current).
    Rollback { rollout_id: String, version: u64 },
}

/// How a device's attempt at an [`UpdateOffer`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateOutcome {
    /// Installed, health-checked and committed (or was current already).
    Installed,
    /// Refused before anything changed: download, signature, hashes,
    /// version floor, another encoder, a full disk.
    Refused,
    /// Installed, failed its health check, switched back and marked failed.
    Failed,
    /// A [`UpdateOffer::Rollback`] carried out.
    RolledBack,
}

/// `POST /v1/update/result`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateResult {
    pub rollout_id: String,
    pub version: u64,
    pub outcome: UpdateOutcome,
    /// Why, for the operator (at most [`MAX_UPDATE_DETAIL`] characters; an
    /// error message, never patient data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The answer to an [`UpdateResult`]. Reporting the same result twice is
/// harmless (`recorded` is then false).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateAck {
    pub recorded: bool,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    /// The newest applied schema migration.
    pub schema_version: i64,
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::b64::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::b64")] Vec<u8>);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case() -> WireCase {
        WireCase {
            id: "0190c0de-0000-7000-8000-000000000001".into(),
            revision: 2,
            model_id: "m".into(),
            embedding: vec![0.5, -0.5],
            diagnosis: WireDiagnosis {
                code: "mel".into(),
                name: "Melanoma".into(),
            },
            label_confirmed: true,
            metadata: WireMetadata::default(),
            created_at_ms: 1,
            updated_at_ms: 2,
            thumbnail_jpeg: vec![0xff, 0xd8, 0x00],
            original_jpeg: Some(vec![1, 2, 3]),
            source: None,
            device_id: None,
        }
    }

    #[test]
    fn a_case_survives_json_with_its_photographs() {
        let json = serde_json::to_string(&case()).unwrap();
        assert!(json.contains("\"thumbnail_jpeg\":\"/9gA\""), "{json}");
        let back: WireCase = serde_json::from_str(&json).unwrap();
        assert!(back == case());
    }

    #[test]
    fn garbled_base64_is_an_error_not_empty_bytes() {
        let json = serde_json::to_string(&case())
            .unwrap()
            .replace("/9gA", "not base64!");
        assert!(serde_json::from_str::<WireCase>(&json).is_err());
    }

    #[test]
    fn debug_never_shows_photographs() {
        let shown = format!("{:?}", case());
        assert!(!shown.contains("255") && !shown.contains("/9gA"), "{shown}");
    }

    #[test]
    fn an_offer_says_its_action() {
        let json = serde_json::to_string(&UpdateOffer::None).unwrap();
        assert_eq!(json, r#"{"action":"none"}"#);
        let rollback = UpdateOffer::Rollback {
            rollout_id: "r".into(),
            version: 7,
        };
        let json = serde_json::to_string(&rollback).unwrap();
        assert_eq!(
            json,
            r#"{"action":"rollback","rollout_id":"r","version":7}"#
        );
        assert_eq!(
            serde_json::from_str::<UpdateOffer>(&json).unwrap(),
            rollback
        );
        assert_eq!(bundle_archive_route("b1"), "/v1/bundles/b1/archive");
    }

    #[test]
    fn credentials_split_at_the_first_dot_only_when_both_halves_exist() {
        assert_eq!(split_credential("dev.sec.ret\n"), Some(("dev", "sec.ret")));
        assert_eq!(split_credential(".secret"), None);
        assert_eq!(split_credential("device."), None);
        assert_eq!(split_credential("nodot"), None);
    }
}
