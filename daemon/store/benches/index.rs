//! Index and store figures, one `key=value` line per measurement.
//!
//! `cargo bench -p dermascope-store --bench index` runs the full sizes
//! (10k and 100k cases at dim 2048); without `--bench` (e.g. under
//! `cargo test --all-targets`) it runs a tiny smoke pass so it stays cheap.

use std::hint::black_box;
use std::process::Command;
use std::time::Instant;

use dermascope_store::{
    Case, CaseFilter, CaseId, CaseMetadata, CaseSource, CaseStore, CaseTags, Diagnosis, FlatIndex,
    ScoreKind, StoreIdentity,
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

/// Clustered, L2-normalised vectors (uniform noise: cheap to make at 100k x 2048).
fn vectors(rng: &mut Rng, n: usize, dim: usize) -> Vec<Vec<f32>> {
    let centres: Vec<Vec<f32>> = (0..64)
        .map(|_| (0..dim).map(|_| rng.symmetric()).collect())
        .collect();
    (0..n)
        .map(|_| {
            let c = &centres[(rng.next_u64() % 64) as usize];
            let mut v: Vec<f32> = c.iter().map(|x| x + rng.symmetric()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            v
        })
        .collect()
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

/// Time for a plain sequential read of `bytes` split over `threads`, the
/// memory-bandwidth bound a scan of the same buffer is compared against.
fn sequential_read_secs(buf: &[u8], threads: usize, reps: usize) -> f64 {
    let words: &[u64] = {
        // Reading as u64 lets the sum vectorise; the tail (< 8 bytes) is ignored.
        let (head, mid, _) = unsafe { buf.align_to::<u64>() };
        assert!(head.is_empty(), "Vec allocations are 8-aligned");
        mid
    };
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        let per = words.len().div_ceil(threads);
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = words
                .chunks(per)
                .map(|chunk| s.spawn(move || chunk.iter().fold(0u64, |a, &w| a.wrapping_add(w))))
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

fn bench_index(n: usize, dim: usize, full: bool) {
    let mut rng = Rng(n as u64);
    let data = vectors(&mut rng, n, dim);
    let mut index = FlatIndex::new(dim).unwrap();
    let t = Instant::now();
    for (i, v) in data.iter().enumerate() {
        index
            .upsert(CaseId::new(format!("c{i}")).unwrap(), v, &tags(i))
            .unwrap();
    }
    let build_s = t.elapsed().as_secs_f64();
    println!(
        "bench=index_build n={n} dim={dim} secs={build_s:.3} rows_per_s={:.0} int8_scale={:.6}",
        n as f64 / build_s,
        index.int8_scale()
    );
    drop(data);
    let queries = vectors(&mut rng, 64, dim);
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    // The same bytes a scan reads, for the bandwidth bound.
    let f32_bytes: Vec<u8> = vec![1u8; n * dim * 4];
    let i8_bytes: Vec<u8> = vec![1u8; n * dim];
    let reps = if full { 5 } else { 1 };
    let read_f32 = sequential_read_secs(&f32_bytes, threads, reps);
    let read_i8 = sequential_read_secs(&i8_bytes, threads, reps);
    drop((f32_bytes, i8_bytes));
    for kind in [ScoreKind::F32, ScoreKind::Int8] {
        let (elem, read_s) = match kind {
            ScoreKind::F32 => (4, read_f32),
            ScoreKind::Int8 => (1, read_i8),
        };
        let bytes = (n * dim * elem) as f64;
        for batch in [1usize, 32] {
            let target_s = if full { 2.0 } else { 0.05 };
            // Warm-up, then as many rounds as fit in the time target.
            index
                .search_batch(&queries[..batch], 10, &CaseFilter::any(), kind)
                .unwrap();
            let mut rounds = 0usize;
            let t = Instant::now();
            while t.elapsed().as_secs_f64() < target_s || rounds < 3 {
                let r = index
                    .search_batch(&queries[..batch], 10, &CaseFilter::any(), kind)
                    .unwrap();
                black_box(r);
                rounds += 1;
            }
            let secs = t.elapsed().as_secs_f64();
            let per_scan = secs / rounds as f64;
            let qps = (rounds * batch) as f64 / secs;
            let scan_gbps = bytes / per_scan / 1e9;
            let read_gbps = bytes / read_s / 1e9;
            println!(
                "bench=search n={n} dim={dim} kind={} batch={batch} threads={threads} qps={qps:.1} \
                 ms_per_scan={:.3} scan_gbps={scan_gbps:.2} seq_read_gbps={read_gbps:.2} bw_fraction={:.3}",
                if kind == ScoreKind::F32 { "f32" } else { "int8" },
                per_scan * 1e3,
                scan_gbps / read_gbps,
            );
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
            .into_iter()
            .enumerate()
            .map(|(j, embedding)| Case {
                id: CaseId::new(format!("ISIC_{:07}", i + j)).unwrap(),
                embedding,
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
    drop(store);
    let disk: u64 = std::fs::read_dir(dir.path())
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    // Open in a fresh process so VmHWM is the open's own peak, not the bench's.
    for attempt in 0..2 {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--open-only",
                &dir.path().display().to_string(),
                &dim.to_string(),
            ])
            .output()
            .unwrap();
        println!(
            "{} disk_bytes={disk} cache={}",
            String::from_utf8_lossy(&out.stdout).trim_end(),
            if attempt == 0 { "first" } else { "warm" }
        );
    }
}

fn open_only(dir: &str, dim: usize) {
    let t = Instant::now();
    let store = CaseStore::open(dir, identity(dim)).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let n = store.len().unwrap();
    println!(
        "bench=store_open n={n} dim={dim} open_ms={:.1} vmhwm_kib={}",
        secs * 1e3,
        vm_hwm_kib()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--open-only") {
        let dim = args.get(3).and_then(|d| d.parse().ok()).unwrap_or(DIM);
        open_only(&args[2], dim);
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    if full {
        for n in [10_000, 100_000] {
            bench_index(n, DIM, true);
        }
        bench_store(100_000, DIM);
    } else {
        bench_index(500, 64, false);
        bench_store(300, 64);
    }
}
