//! Index and store figures, one `key=value` line per measurement.
//!
//! `cargo bench -p dermascope-store --bench index` runs the full sizes
//! (10k and 100k cases at dim 2048); without `--bench` (e.g. under
//! `cargo test --all-targets`) it runs a tiny smoke pass so it stays cheap.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use dermascope_store::{
    Case, CaseFilter, CaseId, CaseMetadata, CaseSource, CaseStore, CaseTags, Diagnosis, FlatIndex,
    IndexSource, OpenOptions, Residency, ScoreKind, StoreIdentity,
};

const DIM: usize = 2048;
const MODEL: &str = "bench-encoder";

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Clustered, L2-normalised vectors, row-major in one buffer.
fn vectors(rng: &mut Rng, n: usize, dim: usize) -> Vec<f32> {
    let centres: Vec<Vec<f32>> = (0..64)
        .map(|_| (0..dim).map(|_| rng.symmetric()).collect())
        .collect();
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = &centres[(rng.next_u64() % 64) as usize];
        let start = out.len();
        out.extend(c.iter().map(|x| x + rng.symmetric()));
        let v = &mut out[start..];
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
    }
    out
}

fn write_f32(path: &Path, data: &[f32]) {
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for x in data {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

const CODES: [&str; 7] = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"];

fn tags(i: usize) -> CaseTags {
    CaseTags {
        diagnosis_code: CODES[i % 7].to_owned(),
        source: CaseSource::ALL[i % 3],
        anatomical_site: Some(["back", "face", "trunk"][i % 3].to_owned()),
        label_confirmed: true,
    }
}

/// Best time for a plain sequential read of `buf` split over `threads`: the
/// memory-bandwidth bound for a scan of the same buffer.
fn sequential_read_secs(buf: &[u8], threads: usize, reps: usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        let per = buf.len().div_ceil(threads);
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        // 8-byte words so the sum vectorises; plain loads, no compute.
                        chunk
                            .chunks_exact(8)
                            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                            .fold(0u64, u64::wrapping_add)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold(0, u64::wrapping_add)
        });
        black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn as_bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bench_index(n: usize, dim: usize, full: bool, queries: &[f32], out_dir: Option<&Path>) {
    let mut rng = Rng(n as u64);
    let data = vectors(&mut rng, n, dim);
    if let Some(dir) = out_dir {
        write_f32(&dir.join(format!("base-{n}.f32")), &data);
    }
    let mut index = FlatIndex::new(dim).unwrap();
    index.reserve(n);
    let t = Instant::now();
    for (i, v) in data.chunks_exact(dim).enumerate() {
        index
            .upsert(CaseId::new(format!("c{i}")).unwrap(), v, &tags(i))
            .unwrap();
    }
    let build_s = t.elapsed().as_secs_f64();
    println!(
        "bench=index_build n={n} dim={dim} secs={build_s:.3} rows_per_s={:.0}",
        n as f64 / build_s
    );
    drop(data);
    let queries: Vec<&[f32]> = queries.chunks_exact(dim).collect();
    let max_threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let reps = if full { 5 } else { 1 };
    // Copies of the very buffers a scan reads (same bytes, same size); a
    // copy because the index lends them only as typed slices.
    let f32_bytes = as_bytes_f32(index.f32_rows().unwrap());
    let i8_bytes: Vec<u8> = index
        .int8_rows()
        .unwrap()
        .0
        .iter()
        .map(|&x| x as u8)
        .collect();
    for threads in 1..=max_threads.min(2) {
        index.set_scan_threads(threads);
        let read_f32 = sequential_read_secs(&f32_bytes, threads, reps);
        let read_i8 = sequential_read_secs(&i8_bytes, threads, reps);
        for kind in [ScoreKind::F32, ScoreKind::Int8] {
            let (elem, read_s) = match kind {
                ScoreKind::F32 => (4, read_f32),
                ScoreKind::Int8 => (1, read_i8),
            };
            let bytes = (n * dim * elem) as f64;
            for batch in [1usize, 32] {
                let target_s = if full { 1.5 } else { 0.05 };
                let qs = &queries[..batch];
                index
                    .search_batch(qs, 10, &CaseFilter::any(), kind)
                    .unwrap();
                let mut rounds = 0usize;
                let t = Instant::now();
                while t.elapsed().as_secs_f64() < target_s || rounds < 3 {
                    let r = index
                        .search_batch(qs, 10, &CaseFilter::any(), kind)
                        .unwrap();
                    black_box(r);
                    rounds += 1;
                }
                let secs = t.elapsed().as_secs_f64();
                let per_scan = secs / rounds as f64;
                let qps = (rounds * batch) as f64 / secs;
                println!(
                    "bench=search n={n} dim={dim} kind={} batch={batch} threads={threads} qps={qps:.2} \
                     ms_per_scan={:.3} scan_gbps={:.2} seq_read_gbps={:.2} bw_fraction={:.3}",
                    if kind == ScoreKind::F32 { "f32" } else { "int8" },
                    per_scan * 1e3,
                    bytes / per_scan / 1e9,
                    bytes / read_s / 1e9,
                    read_s / per_scan,
                );
            }
        }
    }
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn identity(dim: usize) -> StoreIdentity {
    StoreIdentity {
        model_id: MODEL.into(),
        embedding_dim: dim,
    }
}

fn bench_store(n: usize, dim: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let store = CaseStore::open(dir.path(), identity(dim)).unwrap();
    let batch_size = 500;
    let mut insert_s = 0.0;
    let mut single_s = 0.0;
    let singles = 200.min(n);
    let mut i = 0;
    while i < n {
        let m = if i < singles {
            1
        } else {
            batch_size.min(n - i)
        };
        let cases: Vec<Case> = vectors(&mut rng, m, dim)
            .chunks_exact(dim)
            .enumerate()
            .map(|(j, embedding)| Case {
                id: CaseId::new(format!("ISIC_{:07}", i + j)).unwrap(),
                embedding: embedding.to_vec(),
                diagnosis: Diagnosis::from_code(CODES[(i + j) % 7]).unwrap(),
                source: CaseSource::Reference,
                metadata: CaseMetadata {
                    anatomical_site: Some("back".into()),
                    ..Default::default()
                },
                thumbnail_jpeg: vec![0xAB; 1024],
                model_id: MODEL.into(),
                created_at_ms: 0,
                updated_at_ms: 0,
                label_confirmed: true,
                device_id: None,
                revision: 1,
            })
            .collect();
        let t = Instant::now();
        if m == 1 {
            store.insert(&cases[0]).unwrap();
            single_s += t.elapsed().as_secs_f64();
        } else {
            store.insert_batch(&cases).unwrap();
            insert_s += t.elapsed().as_secs_f64();
        }
        i += m;
    }
    println!(
        "bench=store_insert n={n} dim={dim} single_inserts={singles} single_cases_per_s={:.1} batch={batch_size} batch_cases_per_s={:.1}",
        singles as f64 / single_s,
        (n - singles) as f64 / insert_s.max(1e-9)
    );
    let t = Instant::now();
    store.checkpoint().unwrap();
    println!(
        "bench=store_checkpoint n={n} dim={dim} secs={:.3}",
        t.elapsed().as_secs_f64()
    );
    drop(store);
    let disk: u64 = std::fs::read_dir(dir.path())
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    // Each open in a fresh process so VmHWM is the open's own peak. The
    // scan (cache deleted) goes last: it rewrites the cache.
    for (residency, scan) in [
        ("both", false),
        ("int8", false),
        ("f32", false),
        ("both", true),
    ] {
        if scan {
            for name in ["index-f32.cache", "index-int8.cache"] {
                std::fs::remove_file(dir.path().join(name)).unwrap();
            }
        }
        // sled releases its lock from a background thread after a close.
        let mut line = String::new();
        for _ in 0..50 {
            let out = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--open-only",
                    &dir.path().display().to_string(),
                    &dim.to_string(),
                    residency,
                ])
                .output()
                .unwrap();
            if out.status.success() {
                line = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        println!("{line} disk_bytes={disk}");
    }
}

fn open_only(dir: &str, dim: usize, residency: &str) {
    let residency = match residency {
        "int8" => Residency::Int8,
        "f32" => Residency::F32,
        _ => Residency::Both,
    };
    let options = OpenOptions {
        residency,
        ..OpenOptions::default()
    };
    let t = Instant::now();
    let store = match CaseStore::open_with(dir, identity(dim), options) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let n = store.len().unwrap();
    let source = match &store.open_report().index_source {
        IndexSource::Cache { .. } => "cache",
        IndexSource::CacheReplayed { .. } => "replay",
        IndexSource::Scan { .. } => "scan",
    };
    println!(
        "bench=store_open n={n} dim={dim} residency={residency:?} source={source} open_ms={:.1} vmhwm_kib={}",
        secs * 1e3,
        vm_hwm_kib()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--open-only") {
        let dim = args.get(3).and_then(|d| d.parse().ok()).unwrap_or(DIM);
        let residency = args.get(4).map_or("both", String::as_str);
        open_only(&args[2], dim, residency);
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let out_dir = args
        .iter()
        .position(|a| a == "--vectors-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let (sizes, dim): (&[usize], usize) = if full {
        (&[10_000, 100_000], DIM)
    } else {
        (&[500], 64)
    };
    // The same 32 queries for every size (and for faiss).
    let queries = vectors(&mut Rng(0x51DE), 32, dim);
    if let Some(dir) = &out_dir {
        write_f32(&dir.join("queries.f32"), &queries);
        println!("bench=vectors dir={} dim={dim}", dir.display());
    }
    for &n in sizes {
        bench_index(n, dim, full, &queries, out_dir.as_deref());
    }
    bench_store(if full { 100_000 } else { 300 }, dim);
}
