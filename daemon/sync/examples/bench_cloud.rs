//! `scripts/bench cloud`: the fleet service and the device's sync, measured
//! end to end on a real PostgreSQL (a fresh database on the running server,
//! dropped afterwards) with the service in this process:
//!
//! 1. sync throughput: real case stores, real `Syncer`s, loopback HTTP;
//! 2. a sync SIGKILLed half-way (a child process) and resumed by another;
//! 3. retrieval latency at 100,000 fleet cases, HNSW against exact search,
//!    and HNSW's recall@10 against exact.
//!
//! Options (defaults in brackets): `--sync-cases N` [10000],
//! `--eight-per-device N` [1250], `--resume-cases N` [4000],
//! `--fleet-cases N` [100000], `--queries N` per query set [100],
//! `--skip-sync` (part 3 only). The child mode (`--sync-child`) is
//! how part 2 re-executes this binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dermascope_cloud::auth::Viewer;
use dermascope_cloud::config::HashSettings;
use dermascope_cloud::operator::{self, NewDevice};
use dermascope_cloud::rag::retrieve::{self, Search};
use dermascope_cloud::server::{self, ServiceConfig};
use dermascope_store::StoreIdentity;
use dermascope_store::{Case, CaseId, CaseMetadata, CaseSource, CaseStore, Diagnosis, Sex};
use dermascope_sync::{SyncConfig, Syncer};
use sqlx::PgPool;
use uuid::Uuid;

const DIM: usize = 2048;
const SYNC_MODEL: &str = "bench-sync-enc";
const RAG_MODEL: &str = "bench-rag-enc";
const K: usize = 10;
/// Distinct real JPEG thumbnails, used in turn (encoding one per case
/// would make filling the stores the slowest part of the bench).
const THUMBNAILS: usize = 256;
/// Cases per HNSW cluster in the retrieval library (see `fleet_library`).
const CLUSTER: usize = 50;
/// A hang watchdog, not a timing claim.
const WATCHDOG: Duration = Duration::from_secs(900);

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Options {
    sync_cases: usize,
    resume_cases: usize,
    skip_sync: bool,
    eight_per_device: usize,
    fleet_cases: usize,
    queries: usize,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--sync-child") {
        return sync_child(&args[1..]);
    }
    let mut options = Options {
        sync_cases: 10_000,
        // Not 10,000: uploads run at about 80 cases/s here (the HNSW
        // insert), and the whole bench should stay near 10 minutes.
        resume_cases: 4_000,
        skip_sync: false,
        eight_per_device: 1_250,
        fleet_cases: 100_000,
        // 100 + 100: the exact scans take 0.4 s each here.
        queries: 100,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || -> Result<usize> {
            Ok(it
                .next()
                .ok_or_else(|| format!("{flag} needs a number"))?
                .parse()?)
        };
        match flag.as_str() {
            "--sync-cases" => options.sync_cases = value()?,
            "--resume-cases" => options.resume_cases = value()?,
            "--skip-sync" => options.skip_sync = true,
            "--eight-per-device" => options.eight_per_device = value()?,
            "--fleet-cases" => options.fleet_cases = value()?,
            "--queries" => options.queries = value()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    machine();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let pg = dermascope_testkit::postgres("bench_cloud")
        .ok_or("no PostgreSQL server: run scripts/pg start (or set DERMASCOPE_TEST_PG)")?;
    println!("database: {} (fresh, dropped at the end)", pg.name);
    // The HNSW build keeps its graph in maintenance_work_mem; 64 MB (the
    // default) would spill 100,000 x 4 KiB vectors to disk half-way.
    psql(
        &pg.admin_url,
        &format!(
            "ALTER DATABASE \"{}\" SET maintenance_work_mem = '2GB'",
            pg.name
        ),
    )?;
    let outcome = rt.block_on(run(&pg.url, &options));
    drop(pg);
    let figures = outcome?;
    println!("total bench time: {:.0} s", started.elapsed().as_secs_f64());
    println!("cloud sync cases/s: {:.0}", figures.sync_rate);
    println!("cloud retrieval p95 ms: {:.1}", figures.hnsw_p95_ms);
    println!("cloud hnsw recall@10: {:.3}", figures.recall);
    Ok(())
}

struct Figures {
    sync_rate: f64,
    hnsw_p95_ms: f64,
    recall: f64,
}

fn machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown", str::trim)
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let vnni = cpuinfo.split_whitespace().any(|w| w == "avx512_vnni");
    println!("machine: {model}, {cores} cores, avx512_vnni: {vnni}");
}

async fn run(database_url: &str, options: &Options) -> Result<Figures> {
    let service = server::start(ServiceConfig::for_database(database_url)).await?;
    let url = service.base_url();
    // The bench's own pool: the service's 30 s statement timeout would
    // cancel the HNSW build over 100,000 cases.
    let settings = dermascope_cloud::config::DatabaseSettings {
        statement_timeout_ms: 3_600_000,
        ..Default::default()
    };
    let pool = dermascope_cloud::db::connect(database_url, &settings).await?;
    let result = async {
        let server_version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&pool)
            .await?;
        let pgvector: String =
            sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                .fetch_one(&pool)
                .await?;
        println!("postgresql {server_version}, pgvector {pgvector}, service at {url}");
        operator::add_model(&pool, SYNC_MODEL, DIM).await?;
        let thumbnails = thumbnails();
        let mut sync_rate = f64::NAN;
        if !options.skip_sync {
            sync_rate = one_device(&pool, &url, options.sync_cases, &thumbnails).await?;
            without_index(&pool, &url, options.sync_cases / 5, &thumbnails).await?;
            eight_devices(&pool, &url, options.eight_per_device, &thumbnails).await?;
            resumed(&pool, &url, options.resume_cases, &thumbnails).await?;
        }
        let (hnsw_p95_ms, recall) =
            retrieval(&pool, options.fleet_cases, options.queries, &thumbnails[0]).await?;
        Ok::<_, Box<dyn std::error::Error>>(Figures {
            sync_rate,
            hnsw_p95_ms,
            recall,
        })
    }
    .await;
    pool.close().await;
    service.shutdown().await;
    result
}

// ---------------------------------------------------------------- sync

/// A device: its registration, store directory and credential file.
struct Device {
    _dir: tempfile::TempDir,
    store_dir: PathBuf,
    credential_file: PathBuf,
    registered: NewDevice,
}

async fn device(pool: &PgPool, clinic: &str, name: &str) -> Result<Device> {
    // Cheap hashing: these credentials guard nothing, and argon2's default
    // cost per request would be measured instead of the sync.
    let cheap = HashSettings {
        argon2_memory_kib: 64,
        argon2_iterations: 1,
        argon2_parallelism: 1,
    };
    let registered = operator::add_device_with(pool, clinic, name, &cheap).await?;
    let dir = tempfile::tempdir()?;
    let credential_file = dir.path().join("credential");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&credential_file, &registered.credential)?;
        std::fs::set_permissions(&credential_file, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(Device {
        store_dir: dir.path().join("store"),
        _dir: dir,
        credential_file,
        registered,
    })
}

fn open_store(dir: &Path) -> Result<CaseStore> {
    open_store_for(dir, SYNC_MODEL)
}

fn open_store_for(dir: &Path, model: &str) -> Result<CaseStore> {
    Ok(CaseStore::open(
        dir,
        StoreIdentity {
            model_id: model.to_owned(),
            embedding_dim: DIM,
        },
    )?)
}

/// Fills a device's store with `n` captured cases (random unit embeddings,
/// real JPEG thumbnails), all in its outbox.
fn fill(
    store: &CaseStore,
    device_id: &str,
    n: usize,
    seed: u64,
    thumbnails: &[Vec<u8>],
) -> Result<()> {
    let mut rng = Rng(seed);
    let model = store.identity().model_id.clone();
    let mut batch = Vec::with_capacity(500);
    for i in 0..n {
        batch.push(Case {
            id: CaseId::generate(),
            embedding: rng.unit(DIM),
            diagnosis: Diagnosis::from_code(["nv", "mel", "bkl", "bcc"][i % 4])?,
            source: CaseSource::Captured,
            metadata: CaseMetadata {
                age_years: Some(40 + (i % 40) as u16),
                sex: Some(if i % 2 == 0 { Sex::Female } else { Sex::Male }),
                anatomical_site: Some("back".into()),
                fitzpatrick_type: Some(2),
                note: None,
                lesion_id: None,
            },
            thumbnail_jpeg: thumbnails[i % thumbnails.len()].clone(),
            model_id: model.clone(),
            created_at_ms: 1_700_000_000_000 + i as u64,
            updated_at_ms: 1_700_000_000_000 + i as u64,
            label_confirmed: true,
            device_id: Some(device_id.to_owned()),
            revision: 1,
        });
        if batch.len() == 500 {
            store.insert_batch(&batch)?;
            batch.clear();
        }
    }
    store.insert_batch(&batch)?;
    Ok(())
}

fn sync_config(url: &str, credential_file: &Path) -> SyncConfig {
    let mut config = SyncConfig::new(url, None, credential_file.to_owned());
    config.allow_plain_http_for_tests = true;
    config
}

async fn fleet_rows(pool: &PgPool, clinic_id: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM fleet_cases WHERE clinic_id = $1::uuid")
            .bind(clinic_id)
            .fetch_one(pool)
            .await?,
    )
}

/// Polls until every store's outbox is empty and the clinic holds
/// `expected` rows; returns the seconds since `start`.
async fn wait_synced(
    pool: &PgPool,
    clinic_id: &str,
    stores: &[Arc<CaseStore>],
    expected: i64,
    start: Instant,
) -> Result<f64> {
    let mut last_report = Instant::now();
    loop {
        let rows = fleet_rows(pool, clinic_id).await?;
        let pending: usize = stores.iter().map(|s| s.pending_upload_count()).sum();
        if rows >= expected && pending == 0 {
            return Ok(start.elapsed().as_secs_f64());
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            println!(
                "  ... {rows} rows on the service, {pending} pending on the devices after {:.0} s",
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        if start.elapsed() > WATCHDOG {
            return Err(format!("watchdog: sync not done after {WATCHDOG:?} ({rows} rows)").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn one_device(pool: &PgPool, url: &str, n: usize, thumbnails: &[Vec<u8>]) -> Result<f64> {
    println!("\n== 1a. sync throughput, one device, {n} cases");
    let clinic = operator::add_clinic(pool, "bench-one", false).await?;
    let dev = device(pool, &clinic.clinic_id, "device-1").await?;
    let store = Arc::new(blocking(|| open_store(&dev.store_dir))?);
    let t = Instant::now();
    blocking(|| fill(&store, &dev.registered.device_id, n, 1, thumbnails))?;
    let config = sync_config(url, &dev.credential_file);
    println!(
        "  store filled in {:.1} s ({n} captured cases, {DIM}-d unit embeddings, thumbnails {}-{} bytes); batch {}",
        t.elapsed().as_secs_f64(),
        thumbnails.iter().map(Vec::len).min().unwrap_or(0),
        thumbnails.iter().map(Vec::len).max().unwrap_or(0),
        config.batch
    );
    let start = Instant::now();
    let sync = blocking(|| Syncer::start(config, Arc::clone(&store)))?;
    let secs = wait_synced(
        pool,
        &clinic.clinic_id,
        &[Arc::clone(&store)],
        n as i64,
        start,
    )
    .await?;
    blocking(|| sync.stop());
    let rate = n as f64 / secs;
    println!("  one device: {n} cases in {secs:.1} s = {rate:.0} cases/s");
    Ok(rate)
}

/// The same sync into an encoder whose HNSW index was dropped: how much
/// of the upload's cost is the index (a diagnostic; the service always
/// has the index).
async fn without_index(pool: &PgPool, url: &str, n: usize, thumbnails: &[Vec<u8>]) -> Result<()> {
    const MODEL: &str = "bench-noindex-enc";
    println!("\n== 1c. diagnostic: one device, {n} cases, the encoder's HNSW index dropped");
    operator::add_model(pool, MODEL, DIM).await?;
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'fleet_cases' \
            AND indexdef LIKE '%hnsw%' AND indexdef LIKE '%' || $1 || '%'",
    )
    .bind(MODEL)
    .fetch_all(pool)
    .await?;
    for index in &indexes {
        sqlx::query(&format!("DROP INDEX \"{index}\""))
            .execute(pool)
            .await?;
    }
    let clinic = operator::add_clinic(pool, "bench-noindex", false).await?;
    let dev = device(pool, &clinic.clinic_id, "device-n").await?;
    let store = Arc::new(blocking(|| open_store_for(&dev.store_dir, MODEL))?);
    blocking(|| fill(&store, &dev.registered.device_id, n, 3, thumbnails))?;
    let config = sync_config(url, &dev.credential_file);
    let start = Instant::now();
    let sync = blocking(|| Syncer::start(config, Arc::clone(&store)))?;
    let secs = wait_synced(
        pool,
        &clinic.clinic_id,
        &[Arc::clone(&store)],
        n as i64,
        start,
    )
    .await?;
    blocking(|| sync.stop());
    println!(
        "  without the HNSW index ({} dropped): {n} cases in {secs:.1} s = {:.0} cases/s",
        indexes.len(),
        n as f64 / secs
    );
    Ok(())
}

async fn eight_devices(
    pool: &PgPool,
    url: &str,
    per_device: usize,
    thumbnails: &[Vec<u8>],
) -> Result<()> {
    let total = 8 * per_device;
    println!("\n== 1b. sync throughput, 8 devices of one clinic at once, 8 x {per_device} cases");
    let clinic = operator::add_clinic(pool, "bench-eight", false).await?;
    let mut devices = Vec::new();
    let mut stores = Vec::new();
    let t = Instant::now();
    for d in 0..8 {
        let dev = device(pool, &clinic.clinic_id, &format!("device-{d}")).await?;
        let store = Arc::new(blocking(|| open_store(&dev.store_dir))?);
        blocking(|| {
            fill(
                &store,
                &dev.registered.device_id,
                per_device,
                100 + d as u64,
                thumbnails,
            )
        })?;
        stores.push(store);
        devices.push(dev);
    }
    println!("  stores filled in {:.1} s", t.elapsed().as_secs_f64());
    let start = Instant::now();
    let mut syncs = Vec::new();
    for (dev, store) in devices.iter().zip(&stores) {
        syncs.push(blocking(|| {
            Syncer::start(sync_config(url, &dev.credential_file), Arc::clone(store))
        })?);
    }
    let secs = wait_synced(pool, &clinic.clinic_id, &stores, total as i64, start).await?;
    blocking(|| {
        syncs
            .into_iter()
            .for_each(dermascope_sync::SyncHandle::stop)
    });
    println!(
        "  8 devices: {total} cases in {secs:.1} s = {:.0} cases/s in all ({:.0} per device); \
         each device also pulls the other seven's cases in the same cycles",
        total as f64 / secs,
        total as f64 / secs / 8.0
    );
    Ok(())
}

async fn resumed(pool: &PgPool, url: &str, n: usize, thumbnails: &[Vec<u8>]) -> Result<()> {
    println!("\n== 2. a sync SIGKILLed half-way and resumed by a new process, {n} cases");
    let clinic = operator::add_clinic(pool, "bench-resume", false).await?;
    let dev = device(pool, &clinic.clinic_id, "device-k").await?;
    blocking(|| -> Result<()> {
        let store = open_store(&dev.store_dir)?;
        fill(&store, &dev.registered.device_id, n, 7, thumbnails)
    })?;
    let child_args = |exe: &Path| {
        let mut c = Command::new(exe);
        c.arg("--sync-child")
            .arg(&dev.store_dir)
            .arg(url)
            .arg(&dev.credential_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        c
    };
    let exe = std::env::current_exe()?;
    let half = (n / 2) as i64;
    let start = Instant::now();
    let mut child = child_args(&exe).spawn()?;
    let at_kill = loop {
        let rows = fleet_rows(pool, &clinic.clinic_id).await?;
        if rows >= half {
            break rows;
        }
        if let Some(status) = child.try_wait()? {
            return Err(
                format!("the sync child ended by itself ({status}) before half-way").into(),
            );
        }
        if start.elapsed() > WATCHDOG {
            return Err("watchdog: the sync child never got half-way".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // std's kill is SIGKILL on Unix: no destructor, no flush.
    child.kill()?;
    blocking(|| child.wait())?;
    let killed_after = start.elapsed().as_secs_f64();
    // A batch the service was committing when its client died still
    // commits: the service (in this process) outlives the device.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = fleet_rows(pool, &clinic.clinic_id).await?;
    println!(
        "  killed after {killed_after:.1} s with {at_kill} rows stored ({settled} once the batch in flight settled)"
    );

    let start = Instant::now();
    let resume = child_args(&exe).spawn()?;
    let output = blocking(|| resume.wait_with_output())?;
    let resume_secs = start.elapsed().as_secs_f64();
    if !output.status.success() {
        return Err(format!("the resuming sync failed: {}", output.status).into());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let pending_at_start: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pending "))
        .ok_or("the resuming child did not say what was pending")?
        .trim()
        .parse()?;
    let acked_on_device = n - pending_at_start;

    let store = blocking(|| open_store(&dev.store_dir))?;
    let device_ids: std::collections::HashSet<String> = store
        .ids()?
        .into_iter()
        .map(|id| id.as_str().to_owned())
        .collect();
    let still_pending = store.pending_upload_count();
    drop(store);
    let (rows, distinct, revisions, distinct_revisions): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM fleet_cases WHERE clinic_id = $1::uuid), \
                (SELECT count(DISTINCT case_id) FROM fleet_cases WHERE clinic_id = $1::uuid), \
                (SELECT count(*) FROM case_revisions WHERE clinic_id = $1::uuid), \
                (SELECT count(*) FROM (SELECT DISTINCT case_id, revision FROM case_revisions \
                                        WHERE clinic_id = $1::uuid) d)",
    )
    .bind(&clinic.clinic_id)
    .fetch_one(pool)
    .await?;
    let service_ids: Vec<String> =
        sqlx::query_scalar("SELECT case_id FROM fleet_cases WHERE clinic_id = $1::uuid")
            .bind(&clinic.clinic_id)
            .fetch_all(pool)
            .await?;
    let service_ids: std::collections::HashSet<String> = service_ids.into_iter().collect();
    let lost = device_ids.difference(&service_ids).count();
    let strangers = service_ids.difference(&device_ids).count();
    let duplicates = (rows - distinct) + (revisions - distinct_revisions);
    println!(
        "  acknowledged before the kill: {acked_on_device} on the device (outbox cleared), \
         {settled} stored by the service"
    );
    println!(
        "  resume: {resume_secs:.1} s (new process: open the store, {pending_at_start} pending, upload until the outbox is empty)"
    );
    println!(
        "  after resume: {rows} rows ({distinct} distinct ids), {revisions} case_revisions \
         ({distinct_revisions} distinct), outbox {still_pending}; duplicates {duplicates}, \
         lost {lost}, unknown ids {strangers}"
    );
    if duplicates != 0 || lost != 0 || rows != n as i64 || still_pending != 0 || strangers != 0 {
        return Err("the resumed sync lost or duplicated cases".into());
    }
    Ok(())
}

/// `--sync-child STORE URL CREDENTIAL`: sync that store until its outbox
/// is empty, then exit; prints `pending N` first.
fn sync_child(args: &[String]) -> Result<()> {
    let [store_dir, url, credential] = args else {
        return Err("--sync-child STORE URL CREDENTIAL".into());
    };
    let store = Arc::new(open_store(Path::new(store_dir))?);
    println!("pending {}", store.pending_upload_count());
    let sync = Syncer::start(sync_config(url, Path::new(credential)), Arc::clone(&store))?;
    let start = Instant::now();
    while store.pending_upload_count() > 0 {
        if start.elapsed() > WATCHDOG {
            return Err("watchdog: the outbox never emptied".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    sync.stop();
    Ok(())
}

// ---------------------------------------------------------------- retrieval

/// Binary COPY of `n` fleet cases of one clinic: clustered unit embeddings
/// (`CLUSTER` cases around each of `n / CLUSTER` random centres, cosine
/// about 0.7 to their centre), every case its own lesion. Returns the
/// embeddings for making queries.
async fn fleet_library(
    pool: &PgPool,
    clinic_id: Uuid,
    device_id: Uuid,
    n: usize,
    thumbnail: &[u8],
) -> Result<Vec<Vec<f32>>> {
    let mut rng = Rng(42);
    let mut embeddings = Vec::with_capacity(n);
    let mut centre = rng.unit(DIM);
    for i in 0..n {
        if i % CLUSTER == 0 {
            centre = rng.unit(DIM);
        }
        let noise = rng.unit(DIM);
        let mut e: Vec<f32> = centre.iter().zip(&noise).map(|(c, z)| c + z).collect();
        normalise(&mut e);
        embeddings.push(e);
    }
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY fleet_cases (clinic_id, case_id, revision, device_id, model_id, embedding, \
             diagnosis_code, diagnosis_name, label_confirmed, metadata, lesion_key, \
             thumbnail_jpeg, created_at_ms, updated_at_ms, change_seq) FROM STDIN (FORMAT binary)",
        )
        .await?;
    let mut buf = Vec::with_capacity(8 << 20);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&0i32.to_be_bytes());
    let codes = [
        ("nv", "Melanocytic nevus"),
        ("mel", "Melanoma"),
        ("bkl", "Benign keratosis-like lesion"),
    ];
    for (i, e) in embeddings.iter().enumerate() {
        let case_id = format!("fleet-{i:06}");
        let (code, name) = codes[(i / CLUSTER) % codes.len()];
        buf.extend_from_slice(&15i16.to_be_bytes());
        field(&mut buf, clinic_id.as_bytes());
        field(&mut buf, case_id.as_bytes());
        field(&mut buf, &1i64.to_be_bytes());
        field(&mut buf, device_id.as_bytes());
        field(&mut buf, RAG_MODEL.as_bytes());
        // halfvec's binary form: dim, an unused int16, then IEEE halves.
        let mut v = Vec::with_capacity(4 + 2 * DIM);
        v.extend_from_slice(&(DIM as i16).to_be_bytes());
        v.extend_from_slice(&0i16.to_be_bytes());
        for x in pgvector::HalfVector::from_f32_slice(e).to_vec() {
            v.extend_from_slice(&x.to_bits().to_be_bytes());
        }
        field(&mut buf, &v);
        field(&mut buf, code.as_bytes());
        field(&mut buf, name.as_bytes());
        field(&mut buf, &[1]);
        field(&mut buf, b"\x01{}");
        field(&mut buf, case_id.as_bytes());
        field(&mut buf, thumbnail);
        field(&mut buf, &1_700_000_000_000i64.to_be_bytes());
        field(&mut buf, &1_700_000_000_000i64.to_be_bytes());
        field(&mut buf, &(i as i64 + 1).to_be_bytes());
        if buf.len() > (8 << 20) {
            copy.send(std::mem::take(&mut buf)).await?;
        }
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    copy.send(buf).await?;
    copy.finish().await?;
    sqlx::query("SELECT setval('fleet_change_seq', greatest($1, (SELECT last_value FROM fleet_change_seq)))")
        .bind(n as i64 + 1)
        .execute(&mut *conn)
        .await?;
    Ok(embeddings)
}

fn field(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    buf.extend_from_slice(bytes);
}

async fn retrieval(
    pool: &PgPool,
    n: usize,
    queries: usize,
    thumbnail: &[u8],
) -> Result<(f64, f64)> {
    println!("\n== 3. retrieval at {n} fleet cases of one clinic, k = {K}");
    let clinic = operator::add_clinic(pool, "bench-rag", false).await?;
    let dev = operator::add_device_with(
        pool,
        &clinic.clinic_id,
        "rag-device",
        &HashSettings {
            argon2_memory_kib: 64,
            argon2_iterations: 1,
            argon2_parallelism: 1,
        },
    )
    .await?;
    let clinic_id: Uuid = clinic.clinic_id.parse()?;
    let device_id: Uuid = dev.device_id.parse()?;
    // The model's row first (the cases reference it), its HNSW index after
    // the load: one bulk build instead of 100,000 incremental inserts.
    sqlx::query("INSERT INTO models (model_id, dim) VALUES ($1, $2)")
        .bind(RAG_MODEL)
        .bind(DIM as i32)
        .execute(pool)
        .await?;
    let t = Instant::now();
    let library = fleet_library(pool, clinic_id, device_id, n, thumbnail).await?;
    println!(
        "  loaded {n} cases with binary COPY in {:.1} s ({CLUSTER} per cluster, cosine ~0.7 to its centre; one lesion each)",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    operator::add_model(pool, RAG_MODEL, DIM).await?;
    sqlx::query("ANALYZE fleet_cases").execute(pool).await?;
    let index_mb: f64 = sqlx::query_scalar(
        "SELECT coalesce(sum(pg_relation_size(indexname::regclass)), 0)::float8 / 1048576 \
           FROM pg_indexes WHERE tablename = 'fleet_cases' AND indexdef LIKE '%hnsw%' \
            AND indexdef LIKE '%' || $1 || '%'",
    )
    .bind(RAG_MODEL)
    .fetch_optional(pool)
    .await?
    .unwrap_or(0.0);
    println!(
        "  HNSW index built after the load by operator::add_model in {:.1} s ({index_mb:.0} MiB; pgvector defaults m = 16, ef_construction = 64)",
        t.elapsed().as_secs_f64()
    );
    println!(
        "  plans: hnsw: {}",
        plan(pool, clinic_id, Search::Hnsw, &library[0]).await?
    );
    println!(
        "         exact: {}",
        plan(pool, clinic_id, Search::Exact, &library[0]).await?
    );

    // Query sets: noisy copies of stored cases (cosine ~0.9 to the case)
    // and random directions (near nothing).
    let mut rng = Rng(7);
    let mut sets: Vec<(&str, Vec<Vec<f32>>)> =
        vec![("noisy copies", Vec::new()), ("random", Vec::new())];
    for _ in 0..queries {
        let base = &library[(rng.next() % n as u64) as usize];
        let noise = rng.unit(DIM);
        let mut q: Vec<f32> = base.iter().zip(&noise).map(|(b, z)| b + 0.5 * z).collect();
        normalise(&mut q);
        sets[0].1.push(q);
        sets[1].1.push(rng.unit(DIM));
    }
    // Warm-up: the first queries read the index and table from disk.
    for q in sets[0].1.iter().take(10) {
        retrieve::top_k_with(pool, clinic_id, RAG_MODEL, DIM, q, K, Search::Hnsw).await?;
    }
    let mut all_hnsw = Vec::new();
    let mut all_exact = Vec::new();
    let mut all_recall = Vec::new();
    println!(
        "  {:<13} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "queries", "n", "hnsw p50", "hnsw p95", "exact p50", "exact p95", "recall@10"
    );
    for (name, qs) in &sets {
        let mut hnsw_ms = Vec::new();
        let mut hnsw_ids = Vec::new();
        for q in qs {
            let t = Instant::now();
            let hits =
                retrieve::top_k_with(pool, clinic_id, RAG_MODEL, DIM, q, K, Search::Hnsw).await?;
            hnsw_ms.push(t.elapsed().as_secs_f64() * 1e3);
            hnsw_ids.push(hits.into_iter().map(|h| h.case_id).collect::<Vec<_>>());
        }
        let mut exact_ms = Vec::new();
        let mut recall = Vec::new();
        for (q, got) in qs.iter().zip(&hnsw_ids) {
            let t = Instant::now();
            let hits =
                retrieve::top_k_with(pool, clinic_id, RAG_MODEL, DIM, q, K, Search::Exact).await?;
            exact_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let truth: Vec<String> = hits.into_iter().map(|h| h.case_id).collect();
            let found = truth.iter().filter(|id| got.contains(id)).count();
            recall.push(found as f64 / truth.len().max(1) as f64);
        }
        println!(
            "  {:<13} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.3}",
            name,
            qs.len(),
            percentile(&hnsw_ms, 50.0),
            percentile(&hnsw_ms, 95.0),
            percentile(&exact_ms, 50.0),
            percentile(&exact_ms, 95.0),
            mean(&recall)
        );
        all_hnsw.extend(hnsw_ms);
        all_exact.extend(exact_ms);
        all_recall.extend(recall);
    }
    let (p95, recall) = (percentile(&all_hnsw, 95.0), mean(&all_recall));
    println!(
        "  {:<13} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.3}",
        "all",
        all_hnsw.len(),
        percentile(&all_hnsw, 50.0),
        p95,
        percentile(&all_exact, 50.0),
        percentile(&all_exact, 95.0),
        recall
    );

    // The whole request path minus HTTP: validation, retrieval, the vote.
    let viewer = Viewer {
        device_id,
        clinic_id,
        clinic_name: clinic.name.clone(),
        allow_originals: false,
    };
    let mut answer_ms = Vec::new();
    for (_, qs) in &sets {
        for q in qs {
            let request = dermascope_sync::api::RagRequest {
                model_id: RAG_MODEL.to_owned(),
                embedding: q.clone(),
                k: K,
                photo_jpeg: None,
                thumbnail_jpeg: None,
            };
            let t = Instant::now();
            let answer = dermascope_cloud::rag::answer(pool, &viewer, None, request).await?;
            answer_ms.push(t.elapsed().as_secs_f64() * 1e3);
            if answer.cases.len() != K {
                return Err(format!("rag::answer returned {} cases", answer.cases.len()).into());
            }
        }
    }
    println!(
        "  rag::answer without a model (hnsw), all queries: p50 {:.1} ms, p95 {:.1} ms",
        percentile(&answer_ms, 50.0),
        percentile(&answer_ms, 95.0)
    );
    Ok((p95, recall))
}

/// The plan's scan of fleet_cases, as EXPLAIN names it.
async fn plan(pool: &PgPool, clinic_id: Uuid, search: Search, query: &[f32]) -> Result<String> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT set_config('hnsw.ef_search', '40', true), \
                set_config('hnsw.iterative_scan', 'relaxed_order', true), \
                set_config('plan_cache_mode', 'force_custom_plan', true), \
                set_config('enable_indexscan', $1, true)",
    )
    .bind(if search == Search::Exact { "off" } else { "on" })
    .execute(&mut *tx)
    .await?;
    let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", retrieve::top_k_sql(DIM)))
        .bind(pgvector::HalfVector::from_f32_slice(query))
        .bind(RAG_MODEL)
        .bind(clinic_id)
        .bind(40i64)
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    // The node that reads fleet_cases, without its cost estimate.
    let node = lines
        .iter()
        .find(|l| l.contains("Scan") && l.contains(" on fleet_cases"))
        .map_or("?", |l| l.trim().trim_start_matches("->").trim());
    Ok(node.split("  (").next().unwrap_or(node).to_owned())
}

// ---------------------------------------------------------------- helpers

/// Runs blocking work (sled, the sync's threads, child processes) off the
/// runtime's scheduler, so the in-process service keeps serving.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[rank.min(v.len() - 1)]
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
}

/// splitmix64: seeded, fast, good enough for test vectors.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Approximately normal (sum of four uniforms), so that the direction
    /// of the vector is close to uniform on the sphere.
    fn gauss(&mut self) -> f32 {
        (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .sum()
    }

    fn unit(&mut self, dim: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..dim).map(|_| self.gauss()).collect();
        normalise(&mut v);
        v
    }
}

/// Real 96 x 96 JPEGs (the device's thumbnail size), each a little
/// different.
fn thumbnails() -> Vec<Vec<u8>> {
    (0..THUMBNAILS)
        .map(|s| {
            let image = image::RgbImage::from_fn(96, 96, |x, y| {
                let v = (x * 3 + y * 5 + s as u32 * 11) as u8;
                image::Rgb([
                    200u8.wrapping_sub(v / 4),
                    120u8.wrapping_add(v / 8),
                    90 + (s as u8 % 40),
                ])
            });
            let mut out = std::io::Cursor::new(Vec::new());
            image::DynamicImage::ImageRgb8(image)
                .write_to(&mut out, image::ImageFormat::Jpeg)
                .map(|()| out.into_inner())
                .unwrap_or_default()
        })
        .collect()
}

fn psql(url: &str, sql: &str) -> Result<()> {
    let root = dermascope_testkit::workspace_root();
    let status = Command::new(root.join("scripts/pg"))
        .args(["psql", "-d", url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("psql failed: {sql}").into());
    }
    Ok(())
}
