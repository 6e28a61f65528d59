//! Shared by the fleet tests: a fresh database with the service on it,
//! devices that speak HTTP, and a snapshot of every fleet table.

#![allow(dead_code)]

use std::time::Duration;

use dermascope_cloud::config::HashSettings;
use dermascope_cloud::fleet::{self, Bundle, BundleFacts, Mode};
use dermascope_cloud::operator;
use dermascope_cloud::server::{self, RunningService, ServiceConfig};
use dermascope_cloud_api::{
    bearer, bundle_archive_route, routes, DeviceReport, UpdateAck, UpdateOffer, UpdateOutcome,
    UpdateResult,
};
use reqwest::StatusCode;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

/// A hang watchdog for one HTTP call or command, not a timing claim.
pub const WATCHDOG: Duration = Duration::from_secs(120);

pub struct Fleet {
    pub url: String,
    pub pool: PgPool,
    pub service: RunningService,
    _database: dermascope_testkit::Postgres,
}

/// A fresh, migrated database and a service on it, or `None` after a
/// counted skip.
pub async fn fleet(test: &str) -> Option<Fleet> {
    let name = test.to_string();
    let database = tokio::task::spawn_blocking(move || dermascope_testkit::postgres(&name))
        .await
        .expect("testkit")?;
    let service = tokio::time::timeout(
        WATCHDOG,
        server::start(ServiceConfig::for_database(&database.url)),
    )
    .await
    .expect("watchdog: start")
    .expect("service starts");
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&database.url)
        .await
        .expect("connect to the test database");
    Some(Fleet {
        url: database.url.clone(),
        pool,
        service,
        _database: database,
    })
}

fn cheap_hashing() -> HashSettings {
    HashSettings {
        argon2_memory_kib: 256,
        argon2_iterations: 1,
        argon2_parallelism: 1,
    }
}

/// A device's side of the update API.
#[derive(Clone)]
pub struct Device {
    pub id: String,
    pub name: String,
    base: String,
    credential: String,
    client: reqwest::Client,
}

pub struct Download {
    pub status: StatusCode,
    pub content_length: Option<u64>,
    pub content_range: Option<String>,
    pub body: Vec<u8>,
}

impl Fleet {
    pub async fn clinic(&self, name: &str) -> String {
        operator::add_clinic(&self.pool, name, false)
            .await
            .expect("clinic")
            .clinic_id
    }

    pub async fn devices(&self, clinic: &str, n: usize) -> Vec<Device> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("{clinic}-{i:02}");
            let d = operator::add_device_with(&self.pool, clinic, &name, &cheap_hashing())
                .await
                .expect("device");
            out.push(Device {
                id: d.device_id.clone(),
                name,
                base: self.service.base_url(),
                credential: d.credential.clone(),
                client: reqwest::Client::builder()
                    .timeout(WATCHDOG)
                    .build()
                    .expect("client"),
            });
        }
        out
    }

    /// Publishes `bytes` as the archive of a bundle of `version` (the
    /// service takes the facts as given; the tool's tests sign real ones).
    pub async fn publish(&self, bytes: &[u8], version: u64) -> Bundle {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bundle.tar");
        std::fs::write(&path, bytes).expect("write archive");
        fleet::publish_bundle(&self.pool, &facts(version), &path, Mode::Apply)
            .await
            .expect("publish")
            .bundle
    }

    /// Every fleet table's rows, hashed: equal snapshots mean nothing was
    /// written.
    pub async fn snapshot(&self) -> Vec<String> {
        let mut out = Vec::new();
        for table in [
            "bundles",
            "bundle_chunks",
            "rollouts",
            "rollout_stages",
            "rollout_devices",
        ] {
            let digest: Option<String> = sqlx::query_scalar(&format!(
                "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t"
            ))
            .fetch_one(&self.pool)
            .await
            .expect("snapshot");
            out.push(format!("{table}:{}", digest.unwrap_or_default()));
        }
        out
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

pub fn facts(version: u64) -> BundleFacts {
    BundleFacts {
        version,
        downgrade: false,
        carries: vec!["config".into()],
        encoder_model_id: None,
        signed_by: "0f".repeat(32),
        manifest: format!("format = 1\nversion = {version}\n"),
    }
}

/// Bytes that differ at every position and per seed.
pub fn archive_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

impl Device {
    pub fn uuid(&self) -> Uuid {
        Uuid::parse_str(&self.id).expect("device id")
    }

    async fn post<T: serde::Serialize>(&self, route: &str, body: &T) -> (StatusCode, Vec<u8>) {
        let response = self
            .client
            .post(format!("{}{route}", self.base))
            .header(reqwest::header::AUTHORIZATION, bearer(&self.credential))
            .json(body)
            .send()
            .await
            .expect("the service answers");
        let status = response.status();
        (status, response.bytes().await.expect("body").to_vec())
    }

    /// `POST /v1/update` with what the device runs; the offer.
    pub async fn report(&self, bundle_version: Option<u64>, failed: &[u64]) -> UpdateOffer {
        let report = DeviceReport {
            daemon_version: "0.1.0".into(),
            bundle_version,
            encoder_model_id: "enc-a".into(),
            pending_uploads: 3,
            failed_versions: failed.to_vec(),
        };
        let (status, body) = self.post(routes::UPDATE, &report).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "report: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).expect("an offer")
    }

    /// `POST /v1/update/result`: the status and the raw body.
    pub async fn result_raw(
        &self,
        rollout_id: &str,
        version: u64,
        outcome: UpdateOutcome,
    ) -> (StatusCode, Vec<u8>) {
        let result = UpdateResult {
            rollout_id: rollout_id.to_string(),
            version,
            outcome,
            detail: Some(format!("{outcome:?} on the test device")),
        };
        self.post(routes::UPDATE_RESULT, &result).await
    }

    /// A result the service must acknowledge; whether it was recorded.
    pub async fn result(&self, rollout_id: &str, version: u64, outcome: UpdateOutcome) -> bool {
        let (status, body) = self.result_raw(rollout_id, version, outcome).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "result: {}",
            String::from_utf8_lossy(&body)
        );
        let ack: UpdateAck = serde_json::from_slice(&body).expect("an ack");
        ack.recorded
    }

    /// `GET` the archive, with a `Range` header when given.
    pub async fn download(&self, bundle_id: &str, range: Option<&str>) -> Download {
        let mut request = self
            .client
            .get(format!("{}{}", self.base, bundle_archive_route(bundle_id)))
            .header(reqwest::header::AUTHORIZATION, bearer(&self.credential));
        if let Some(range) = range {
            request = request.header(reqwest::header::RANGE, range);
        }
        let response = request.send().await.expect("the service answers");
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_length = header(reqwest::header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let content_range = header(reqwest::header::CONTENT_RANGE);
        let status = response.status();
        let body = response.bytes().await.expect("body").to_vec();
        Download {
            status,
            content_length,
            content_range,
            body,
        }
    }
}

/// The offer's rollout id, insisting it is an install of `version`.
pub fn install_of(offer: &UpdateOffer, version: u64) -> String {
    match offer {
        UpdateOffer::Install {
            rollout_id,
            version: v,
            ..
        } if *v == version => rollout_id.clone(),
        other => panic!("expected an install of {version}, got {other:?}"),
    }
}
