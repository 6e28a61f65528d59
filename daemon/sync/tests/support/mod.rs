//! A real fleet service (in-process, on a real PostgreSQL) behind a
//! fault-injecting loopback proxy, and devices with real case stores.
#![allow(dead_code)]

pub mod proxy;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dermascope_cloud::config::HashSettings;
use dermascope_cloud::operator::{self, NewDevice};
use dermascope_cloud::server::{self, RunningService, ServiceConfig, TlsFiles};
use dermascope_store::{Case, CaseId, CaseMetadata, CaseSource, CaseStore, Diagnosis, Sex};
use dermascope_store::{OriginalPhoto, StoreIdentity};
use dermascope_sync::{SyncConfig, SyncHandle, SyncStatus, Syncer};
use sqlx::PgPool;

pub use proxy::{Action, Proxy};

pub const MODEL: &str = "sync-test-enc";
pub const OTHER_MODEL: &str = "sync-test-other-enc";
pub const DIM: usize = 16;

/// A hang watchdog, not a timing claim: every wait below ends in well
/// under a second or two on a healthy run.
pub const WATCHDOG: Duration = Duration::from_secs(120);

/// Polls `done` until it holds; panics, saying it is a watchdog, if it
/// never does.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WATCHDOG;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "watchdog ({WATCHDOG:?}, a hang, not a timing claim): {what} never happened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a sync cycle that started after this call has finished,
/// and returns the status then.
pub fn next_cycle(sync: &SyncHandle) -> SyncStatus {
    let start = sync.status();
    // A cycle running now may have started before the call.
    let target = start.cycles + if start.syncing { 2 } else { 1 };
    sync.nudge();
    let mut last = start;
    wait_until("a sync cycle", || {
        last = sync.status();
        last.cycles >= target
    });
    last
}

/// The service, the database behind it and the proxy in front of it.
pub struct Fleet {
    pub rt: tokio::runtime::Runtime,
    /// Dropped (with the database) after the service and the pool.
    pg: dermascope_testkit::Postgres,
    pub database_url: String,
    pub pool: PgPool,
    service: Option<RunningService>,
    pub proxy: Proxy,
    tls: Option<TlsFiles>,
}

impl Fleet {
    pub fn start(test: &str) -> Option<Fleet> {
        Self::start_with_tls(test, None)
    }

    pub fn start_with_tls(test: &str, tls: Option<TlsFiles>) -> Option<Fleet> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let pg = dermascope_testkit::postgres(test)?;
        let database_url = pg.url.clone();
        let service = rt.block_on(start_service(&database_url, tls.clone()));
        let pool = rt
            .block_on(dermascope_cloud::db::connect(
                &database_url,
                &Default::default(),
            ))
            .expect("operator pool");
        for (model, dim) in [(MODEL, DIM), (OTHER_MODEL, DIM)] {
            rt.block_on(operator::add_model(&pool, model, dim))
                .expect("add a model");
        }
        let proxy = Proxy::start(service.addr());
        Some(Fleet {
            rt,
            pg,
            database_url,
            pool,
            service: Some(service),
            proxy,
            tls,
        })
    }

    /// The service's own URL (not through the proxy).
    pub fn direct_url(&self) -> String {
        self.service.as_ref().expect("service running").base_url()
    }

    pub fn clinic(&self, name: &str, allow_originals: bool) -> String {
        self.rt
            .block_on(operator::add_clinic(&self.pool, name, allow_originals))
            .expect("add a clinic")
            .clinic_id
    }

    pub fn device(&self, clinic: &str, name: &str) -> NewDevice {
        // Cheap hashing: these credentials guard nothing.
        let cheap = HashSettings {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            argon2_parallelism: 1,
        };
        self.rt
            .block_on(operator::add_device_with(&self.pool, clinic, name, &cheap))
            .expect("add a device")
    }

    pub fn revoke(&self, device_id: &str) {
        self.rt
            .block_on(operator::revoke_device(&self.pool, device_id))
            .expect("revoke a device");
    }

    /// Stops the service dropping connections in flight, as a crash, and
    /// starts a new instance (another port) behind the same proxy.
    pub fn restart(&mut self) {
        let old = self.service.take().expect("service running");
        self.rt.block_on(old.kill());
        let new = self
            .rt
            .block_on(start_service(&self.database_url, self.tls.clone()));
        self.proxy.retarget(new.addr());
        self.service = Some(new);
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.rt
            .block_on(sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool))
            .expect("count query")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(service) = self.service.take() {
            self.rt.block_on(service.kill());
        }
        self.rt.block_on(self.pool.close());
    }
}

async fn start_service(database_url: &str, tls: Option<TlsFiles>) -> RunningService {
    let mut config = ServiceConfig::for_database(database_url);
    config.tls = tls;
    server::start(config).await.expect("start the service")
}

/// A device: a case store of its own and a credential file.
pub struct Device {
    pub dir: tempfile::TempDir,
    pub store: Arc<CaseStore>,
    pub device_id: String,
    pub credential_file: PathBuf,
}

impl Device {
    pub fn new(registered: &NewDevice) -> Device {
        Self::with_model(registered, MODEL)
    }

    pub fn with_model(registered: &NewDevice, model: &str) -> Device {
        let dir = tempfile::tempdir().expect("device dir");
        let store = CaseStore::open(
            dir.path().join("store"),
            StoreIdentity {
                model_id: model.to_owned(),
                embedding_dim: DIM,
            },
        )
        .expect("open the device's store");
        let credential_file = dir.path().join("credential");
        write_private(&credential_file, &registered.credential);
        Device {
            dir,
            store: Arc::new(store),
            device_id: registered.device_id.clone(),
            credential_file,
        }
    }

    /// Plain HTTP through `url` (the proxy), checking every 2 s.
    pub fn config(&self, url: &str) -> SyncConfig {
        let mut config = SyncConfig::new(url, None, self.credential_file.clone());
        config.allow_plain_http_for_tests = true;
        config.interval_s = 2;
        config.request_timeout_s = 5;
        config.connect_timeout_s = 5;
        config
    }

    pub fn start(&self, config: SyncConfig) -> SyncHandle {
        Syncer::start(config, Arc::clone(&self.store)).expect("start the sync")
    }

    /// Stores `n` captures of this device; returns them.
    pub fn capture(&self, n: usize, seed: &str) -> Vec<Case> {
        let cases: Vec<Case> = (0..n)
            .map(|i| captured_case(&format!("{seed}-{i}"), &self.device_id, self.model()))
            .collect();
        self.store.insert_batch(&cases).expect("store captures");
        cases
    }

    pub fn model(&self) -> &str {
        &self.store.identity().model_id
    }

    pub fn count(&self, source: CaseSource) -> usize {
        self.store
            .counts()
            .expect("counts")
            .by_source
            .get(&source)
            .copied()
            .unwrap_or(0)
    }
}

pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write a file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// A small real JPEG (the service checks thumbnails are JPEGs).
pub fn jpeg(seed: u8, size: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(size, size, |x, y| {
        image::Rgb([seed, (x * 7) as u8, (y * 13) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .expect("encode a JPEG");
    out.into_inner()
}

/// A captured case whose embedding is a function of `seed`.
pub fn captured_case(seed: &str, device_id: &str, model: &str) -> Case {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let mut embedding: Vec<f32> = (0..DIM)
        .map(|i| {
            h = h
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407 + i as u64);
            ((h >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    let norm = embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
    embedding.iter_mut().for_each(|x| *x /= norm);
    Case {
        id: CaseId::generate(),
        embedding,
        diagnosis: Diagnosis::from_code("nv").expect("HAM10000 code"),
        source: CaseSource::Captured,
        metadata: CaseMetadata {
            age_years: Some(50),
            sex: Some(Sex::Female),
            anatomical_site: Some("back".into()),
            fitzpatrick_type: Some(2),
            note: Some(format!("private note {seed}")),
            lesion_id: Some(format!("lesion-{seed}")),
        },
        thumbnail_jpeg: jpeg(h as u8, 16),
        model_id: model.to_owned(),
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_000,
        label_confirmed: true,
        device_id: Some(device_id.to_owned()),
        revision: 1,
    }
}

pub fn original(seed: u8) -> OriginalPhoto {
    OriginalPhoto::from_jpeg(jpeg(seed, 64)).expect("a valid original")
}
