//! Device credentials: `Authorization: Bearer <device_id>.<secret>`.
//!
//! The secret is 32 random bytes (hex), stored only as an argon2id hash.
//! Verifying one costs tens of milliseconds, so a process remembers the
//! SHA-256 of a secret that verified against a given stored hash; the device
//! row itself (revocation, clinic) is read on every request, so a revocation
//! is seen by every instance at the device's next request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use dermascope_cloud_api::split_credential;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::HashSettings;
use crate::error::{ApiError, CloudError};
use crate::server::AppState;

/// The authenticated device a request speaks for. Every query that reads or
/// writes cases is scoped by `clinic_id` from here, never from the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viewer {
    pub device_id: Uuid,
    pub clinic_id: Uuid,
    pub clinic_name: String,
    pub allow_originals: bool,
}

/// Bytes of randomness in a device secret.
pub const SECRET_BYTES: usize = 32;

/// A new secret from the operating system's generator, as hex.
pub fn new_secret() -> Result<String, CloudError> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| CloudError::Random(e.to_string()))?;
    Ok(hex::encode(bytes))
}

fn hasher(settings: &HashSettings) -> Result<Argon2<'static>, CloudError> {
    let params = Params::new(
        settings.argon2_memory_kib,
        settings.argon2_iterations,
        settings.argon2_parallelism,
        None,
    )
    .map_err(|e| CloudError::Credential(format!("argon2 parameters: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// The argon2id PHC string stored for a secret.
pub fn hash_secret(secret: &str, settings: &HashSettings) -> Result<String, CloudError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| CloudError::Random(e.to_string()))?;
    let salt =
        SaltString::encode_b64(&salt).map_err(|e| CloudError::Credential(format!("salt: {e}")))?;
    let hash = hasher(settings)?
        .hash_password(secret.as_bytes(), &salt)
        .map_err(|e| CloudError::Credential(format!("hashing: {e}")))?;
    Ok(hash.to_string())
}

/// Whether `secret` matches the stored PHC string (its own parameters).
pub fn verify_secret(secret: &str, stored: &str) -> bool {
    match PasswordHash::new(stored) {
        Ok(parsed) => Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Secrets that verified in this process, by device: the stored hash they
/// verified against and the secret's SHA-256. A new hash for the device
/// (a re-issued credential) misses the cache.
#[derive(Default)]
pub struct CredentialCache {
    verified: Mutex<HashMap<Uuid, (String, [u8; 32])>>,
}

/// More devices than a fleet of clinics has; past it the cache starts over.
const CACHE_CAPACITY: usize = 100_000;

impl CredentialCache {
    pub fn new() -> Arc<CredentialCache> {
        Arc::new(CredentialCache::default())
    }

    fn hit(&self, device: Uuid, stored: &str, digest: &[u8; 32]) -> bool {
        let Ok(map) = self.verified.lock() else {
            return false;
        };
        map.get(&device)
            .is_some_and(|(hash, known)| hash == stored && constant_time_eq(known, digest))
    }

    fn remember(&self, device: Uuid, stored: String, digest: [u8; 32]) {
        if let Ok(mut map) = self.verified.lock() {
            if map.len() >= CACHE_CAPACITY {
                map.clear();
            }
            map.insert(device, (stored, digest));
        }
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(sqlx::FromRow)]
struct DeviceRow {
    credential_hash: String,
    revoked: bool,
    clinic_id: Uuid,
    clinic_name: String,
    allow_originals: bool,
    seen_long_ago: bool,
}

/// Who an `Authorization` header value speaks for.
pub async fn authenticate(
    pool: &PgPool,
    cache: &CredentialCache,
    header: Option<&str>,
) -> Result<Viewer, ApiError> {
    let header = header.ok_or_else(|| {
        ApiError::unauthenticated("no credential: send Authorization: Bearer <device_id>.<secret>")
    })?;
    let credential = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| {
            ApiError::unauthenticated("the Authorization header is not Bearer <device_id>.<secret>")
        })?;
    let (device, secret) = split_credential(credential)
        .ok_or_else(|| ApiError::unauthenticated("the credential is not <device_id>.<secret>"))?;
    let device_id = Uuid::parse_str(device)
        .map_err(|_| ApiError::unauthenticated("the credential's device id is not a UUID"))?;
    let wrong = || ApiError::unauthenticated("unknown device or wrong secret");

    let row: Option<DeviceRow> = sqlx::query_as(
        "SELECT d.credential_hash, d.revoked_at IS NOT NULL AS revoked, d.clinic_id, \
                c.name AS clinic_name, c.allow_originals, \
                (d.last_seen_at IS NULL OR d.last_seen_at < now() - interval '1 minute') \
                  AS seen_long_ago \
         FROM devices d JOIN clinics c ON c.clinic_id = d.clinic_id \
         WHERE d.device_id = $1",
    )
    .bind(device_id)
    .fetch_optional(pool)
    .await?;
    let row = row.ok_or_else(wrong)?;

    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    if !cache.hit(device_id, &row.credential_hash, &digest) {
        let stored = row.credential_hash.clone();
        let secret = secret.to_string();
        let ok = tokio::task::spawn_blocking(move || verify_secret(&secret, &stored))
            .await
            .map_err(|_| ApiError::internal("credential check failed"))?;
        if !ok {
            return Err(wrong());
        }
        cache.remember(device_id, row.credential_hash.clone(), digest);
    }
    // Only after the secret checked out, so a stranger learns nothing.
    if row.revoked {
        return Err(ApiError::revoked());
    }
    if row.seen_long_ago {
        // Best effort: a failure here must not refuse a device whose
        // credential is fine.
        if let Err(e) = sqlx::query("UPDATE devices SET last_seen_at = now() WHERE device_id = $1")
            .bind(device_id)
            .execute(pool)
            .await
        {
            tracing::warn!(kind = %crate::error::db_error_kind(&e), "last_seen_at not updated");
        }
    }
    Ok(Viewer {
        device_id,
        clinic_id: row.clinic_id,
        clinic_name: row.clinic_name,
        allow_originals: row.allow_originals,
    })
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Viewer, ApiError> {
        let header =
            match parts.headers.get(axum::http::header::AUTHORIZATION) {
                Some(value) => Some(value.to_str().map_err(|_| {
                    ApiError::unauthenticated("the Authorization header is not ASCII")
                })?),
                None => None,
            };
        authenticate(&state.pool, &state.credentials, header).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> HashSettings {
        HashSettings {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            argon2_parallelism: 1,
        }
    }

    #[test]
    fn a_hash_verifies_its_secret_only() {
        let secret = new_secret().unwrap();
        assert_eq!(secret.len(), 2 * SECRET_BYTES);
        let stored = hash_secret(&secret, &cheap()).unwrap();
        assert!(stored.starts_with("$argon2id$"), "{stored}");
        assert!(verify_secret(&secret, &stored));
        assert!(!verify_secret(&new_secret().unwrap(), &stored));
        assert!(!verify_secret(&secret, "not a hash"));
    }

    #[test]
    fn production_defaults_are_argon2s() {
        let d = HashSettings::default();
        let stored = hash_secret("s", &d).unwrap();
        assert!(stored.contains("m=19456,t=2,p=1"), "{stored}");
    }

    #[test]
    fn the_cache_needs_the_same_hash_and_secret() {
        let cache = CredentialCache::default();
        let dev = Uuid::now_v7();
        let d1: [u8; 32] = Sha256::digest(b"one").into();
        let d2: [u8; 32] = Sha256::digest(b"two").into();
        cache.remember(dev, "h1".into(), d1);
        assert!(cache.hit(dev, "h1", &d1));
        assert!(!cache.hit(dev, "h1", &d2));
        assert!(!cache.hit(dev, "h2", &d1));
        assert!(!cache.hit(Uuid::now_v7(), "h1", &d1));
    }
}
