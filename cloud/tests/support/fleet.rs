//! Shared by the service's tests: a fresh database, a running service, a
//! device's HTTP calls, and cases to upload.

#![allow(dead_code)]

use std::time::Duration;

use dermascope_cloud::config::HashSettings;
use dermascope_cloud::operator::{self, NewDevice};
use dermascope_cloud::server::{self, RunningService, ServiceConfig};
use dermascope_cloud_api::{
    bearer, routes, CasePage, ErrorBody, UploadBatch, UploadOutcome, UploadReceipt, WireCase,
    WireDiagnosis, WireMetadata,
};
use reqwest::StatusCode;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

pub const MODEL: &str = "enc-a";
pub const DIM: usize = 16;
pub const OTHER_MODEL: &str = "enc-b";
pub const OTHER_DIM: usize = 8;

/// A hang watchdog for any one HTTP call, not a timing claim: each
/// finishes in milliseconds unless something is stuck.
pub const WATCHDOG: Duration = Duration::from_secs(60);

/// Hashing cheap enough for many devices per test; the stored hash names
/// its own parameters, so the service verifies it the same way.
pub fn cheap_hashing() -> HashSettings {
    HashSettings {
        argon2_memory_kib: 256,
        argon2_iterations: 1,
        argon2_parallelism: 1,
    }
}

pub struct Db {
    pub url: String,
    pub pool: PgPool,
    /// Drops the database when the test ends (kept when it failed).
    _database: Option<dermascope_testkit::Postgres>,
}

/// A fresh database for `test` with the `vector` extension, or `None`
/// after counting a skip.
pub async fn database(test: &str) -> Option<Db> {
    let name = test.to_string();
    let database = tokio::task::spawn_blocking(move || dermascope_testkit::postgres(&name))
        .await
        .expect("testkit")?;
    let url = database.url.clone();
    let mut db = on(&url).await;
    db._database = Some(database);
    Some(db)
}

/// A pool on a database someone else keeps (a private server's).
pub async fn on(url: &str) -> Db {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .expect("connect to the test database");
    Db {
        url: url.to_string(),
        pool,
        _database: None,
    }
}

/// A migrated database with both encoders registered, and a service on it.
pub async fn fleet(test: &str) -> Option<(Db, RunningService)> {
    let db = database(test).await?;
    let service = start(&db).await;
    operator::add_model(&db.pool, MODEL, DIM)
        .await
        .expect("model");
    operator::add_model(&db.pool, OTHER_MODEL, OTHER_DIM)
        .await
        .expect("other model");
    Some((db, service))
}

pub async fn start(db: &Db) -> RunningService {
    tokio::time::timeout(
        WATCHDOG,
        server::start(ServiceConfig::for_database(&db.url)),
    )
    .await
    .expect("watchdog: start")
    .expect("service starts")
}

pub async fn clinic(db: &Db, name: &str, allow_originals: bool) -> String {
    operator::add_clinic(&db.pool, name, allow_originals)
        .await
        .expect("clinic")
        .clinic_id
}

pub async fn device(db: &Db, clinic: &str, name: &str) -> NewDevice {
    operator::add_device_with(&db.pool, clinic, name, &cheap_hashing())
        .await
        .expect("device")
}

/// A small real JPEG, different per seed.
pub fn jpeg(seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([
            (x * 13 + seed) as u8,
            (y * 7 + seed * 3) as u8,
            (seed * 11) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .expect("encode a JPEG");
    out.into_inner()
}

pub fn embedding(seed: u32, dim: usize) -> Vec<f32> {
    let raw: Vec<f32> = (0..dim)
        .map(|i| ((seed as f32 + 1.0) * (i as f32 + 1.0) * 0.37).sin())
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    raw.into_iter().map(|x| x / norm).collect()
}

/// A valid case of `MODEL`.
pub fn case(id: &str, revision: u64, seed: u32) -> WireCase {
    case_of(id, revision, seed, MODEL, DIM)
}

pub fn case_of(id: &str, revision: u64, seed: u32, model: &str, dim: usize) -> WireCase {
    WireCase {
        id: id.to_string(),
        revision,
        model_id: model.to_string(),
        embedding: embedding(seed, dim),
        diagnosis: WireDiagnosis {
            code: if seed.is_multiple_of(2) { "nv" } else { "mel" }.into(),
            name: format!("diagnosis of seed {seed}"),
        },
        label_confirmed: true,
        metadata: WireMetadata {
            age_years: Some(40 + (seed % 30) as u16),
            sex: Some("female".into()),
            anatomical_site: Some("back".into()),
            fitzpatrick_type: Some(2),
            lesion_id: None,
        },
        created_at_ms: 1_700_000_000_000 + seed as u64,
        updated_at_ms: 1_700_000_000_000 + seed as u64 + revision,
        thumbnail_jpeg: jpeg(seed),
        original_jpeg: None,
        source: None,
        device_id: None,
    }
}

/// A device's side of the HTTP API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub credential: String,
    pub client: reqwest::Client,
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not the expected JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The refusal's JSON body, checked to carry `status` and `code`.
    pub fn refusal(&self, status: StatusCode, code: &str) -> ErrorBody {
        let body: ErrorBody = self.json();
        assert_eq!(
            (self.status, body.code.as_str()),
            (status, code),
            "refusal: {}",
            body.message
        );
        assert!(!body.message.is_empty());
        body
    }
}

impl Api {
    pub fn new(service: &RunningService, credential: &str) -> Api {
        Api {
            base: service.base_url(),
            credential: credential.to_string(),
            client: reqwest::Client::builder()
                .timeout(WATCHDOG)
                .build()
                .expect("client"),
        }
    }

    /// The same device talking to another instance.
    pub fn via(&self, service: &RunningService) -> Api {
        Api {
            base: service.base_url(),
            ..self.clone()
        }
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request
            .header(reqwest::header::AUTHORIZATION, bearer(&self.credential))
            .send()
            .await
            .expect("the service answers");
        let status = response.status();
        let body = response.bytes().await.expect("a body").to_vec();
        Reply { status, body }
    }

    pub async fn upload_raw(&self, body: Vec<u8>) -> Reply {
        self.send(
            self.client
                .post(format!("{}{}", self.base, routes::CASES))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body),
        )
        .await
    }

    pub async fn upload(&self, cases: &[WireCase]) -> Reply {
        let body = serde_json::to_vec(&UploadBatch {
            cases: cases.to_vec(),
        })
        .expect("serialise");
        self.upload_raw(body).await
    }

    /// Uploads and insists it was acknowledged; the outcomes in order.
    pub async fn upload_ok(&self, cases: &[WireCase]) -> Vec<UploadOutcome> {
        let reply = self.upload(cases).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let receipt: UploadReceipt = reply.json();
        assert_eq!(receipt.results.len(), cases.len());
        for (r, c) in receipt.results.iter().zip(cases) {
            assert_eq!((r.id.as_str(), r.revision), (c.id.as_str(), c.revision));
        }
        receipt.results.into_iter().map(|r| r.outcome).collect()
    }

    pub async fn pull(&self, model: &str, cursor: Option<&str>, limit: Option<usize>) -> Reply {
        let mut query = vec![("model_id", model.to_string())];
        if let Some(c) = cursor {
            query.push(("cursor", c.to_string()));
        }
        if let Some(l) = limit {
            query.push(("limit", l.to_string()));
        }
        let mut url = reqwest::Url::parse(&format!("{}{}", self.base, routes::CASES)).expect("url");
        url.query_pairs_mut().extend_pairs(&query);
        self.send(self.client.get(url)).await
    }

    pub async fn pull_ok(
        &self,
        model: &str,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> CasePage {
        let reply = self.pull(model, cursor, limit).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.json()
    }

    /// Every page from `cursor` to the end: the cases and the last cursor.
    pub async fn pull_all(
        &self,
        model: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> (Vec<WireCase>, String) {
        let mut cursor = cursor.map(str::to_string);
        let mut cases = Vec::new();
        for _ in 0..10_000 {
            let page = self.pull_ok(model, cursor.as_deref(), Some(limit)).await;
            assert!(page.cases.len() <= limit);
            cases.extend(page.cases);
            cursor = Some(page.cursor);
            if !page.more {
                return (cases, cursor.unwrap_or_default());
            }
        }
        panic!("watchdog: a pull that never ends");
    }

    pub async fn device(&self) -> Reply {
        self.send(self.client.get(format!("{}{}", self.base, routes::DEVICE)))
            .await
    }
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

/// Rows of both case tables, for "nothing was written" checks.
pub async fn rows(pool: &PgPool) -> (i64, i64) {
    (
        count(pool, "SELECT count(*) FROM fleet_cases").await,
        count(pool, "SELECT count(*) FROM case_revisions").await,
    )
}
