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
    IndexSource, OpenOptions, Residency, ScoreKind, SearchHit, SearchStrategy, StoreIdentity,
    DEFAULT_CANDIDATES,
};
use simsimd::BinarySimilarity;

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
        let line = open_in_child(dir.path(), dim, residency);
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
        "bench=store_open n={n} dim={dim} residency={residency:?} source={source} open_ms={:.1} sled_open_ms={:.1} vmhwm_kib={}",
        secs * 1e3,
        store.open_report().sled_open.as_secs_f64() * 1e3,
        vm_hwm_kib()
    );
}

// ------------------------------------------------------------ coarse pass

/// Embeddings shaped like the encoder's: from the real bundle's check
/// embeddings (`models/dist/sklesion-xception/check/ort-fp32.f32`, 8
/// photographs, L2-normalised) the per-dimension mean `mu` and spread `s`;
/// then 7 class offsets and `GROUPS` lesion-like group offsets (Gaussian,
/// scaled by `s`), and per case uniform noise of the same variance:
/// `relu(mu + s*(class + 0.8 group + 0.8 noise))`, L2-normalised. Calibrated
/// so the mean cosine of two random cases (0.55) and the share of zero
/// components (26 %) are near the real ones (0.44, 16 %). Without the
/// bundle, `mu` and `s` are flat (and the output says so).
struct LesionModel {
    dim: usize,
    mu: Vec<f32>,
    s: Vec<f32>,
    classes: Vec<Vec<f32>>,
    groups: Vec<f32>,
    group_class: Vec<usize>,
    from_bundle: bool,
}

const GROUPS: usize = 20_000;

impl LesionModel {
    fn new(dim: usize) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/dist/sklesion-xception/check/ort-fp32.f32");
        let real: Option<Vec<Vec<f32>>> = std::fs::read(&path).ok().and_then(|b| {
            let v: Vec<f32> = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (v.len().is_multiple_of(dim) && !v.is_empty()).then(|| {
                v.chunks_exact(dim)
                    .map(|r| {
                        let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                        r.iter().map(|x| x / n).collect()
                    })
                    .collect()
            })
        });
        let from_bundle = real.is_some();
        let (mu, s) = match &real {
            Some(rows) => {
                let m = rows.len() as f32;
                let mu: Vec<f32> = (0..dim)
                    .map(|d| rows.iter().map(|r| r[d]).sum::<f32>() / m)
                    .collect();
                let s = (0..dim)
                    .map(|d| {
                        let var = rows.iter().map(|r| (r[d] - mu[d]).powi(2)).sum::<f32>() / m;
                        var.sqrt() + 1e-4
                    })
                    .collect();
                (mu, s)
            }
            None => (
                vec![1.0 / (dim as f32).sqrt(); dim],
                vec![0.5 / (dim as f32).sqrt(); dim],
            ),
        };
        let mut rng = Rng(0x7E51);
        let mut gauss = || {
            let u1 = ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32).max(1e-7);
            let u2 = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        };
        let classes: Vec<Vec<f32>> = (0..7)
            .map(|_| (0..dim).map(|d| s[d] * gauss()).collect())
            .collect();
        let groups: Vec<f32> = (0..GROUPS * dim)
            .map(|i| 0.8 * s[i % dim] * gauss())
            .collect();
        let mut pick = Rng(0x6A0F);
        let group_class = (0..GROUPS)
            .map(|_| (pick.next_u64() % 7) as usize)
            .collect();
        Self {
            dim,
            mu,
            s,
            classes,
            groups,
            group_class,
            from_bundle,
        }
    }

    /// `n` cases into `out` (row-major), from the stream seeded by `seed`.
    fn draw(&self, rng: &mut Rng, n: usize, out: &mut Vec<f32>) {
        let dim = self.dim;
        // Uniform noise of unit variance: cheaper than Gaussian, and the sum
        // over 2048 dimensions that an inner product is does not tell.
        let unit = 3f32.sqrt();
        for _ in 0..n {
            let g = (rng.next_u64() % GROUPS as u64) as usize;
            let class = &self.classes[self.group_class[g]];
            let group = &self.groups[g * dim..(g + 1) * dim];
            let start = out.len();
            for (((&mu, &s), &c), &g) in self.mu.iter().zip(&self.s).zip(class).zip(group) {
                let noise = 0.8 * s * unit * rng.symmetric();
                out.push((mu + c + g + noise).max(0.0));
            }
            let v = &mut out[start..];
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
    }
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn recall_at(hits: &[SearchHit], truth: &[CaseId]) -> f64 {
    let found = truth
        .iter()
        .filter(|t| hits.iter().any(|h| &h.id == *t))
        .count();
    found as f64 / truth.len().max(1) as f64
}

/// Mean ms per query and p95, searching the queries one at a time.
fn time_queries(
    index: &FlatIndex,
    queries: &[&[f32]],
    kind: ScoreKind,
    strategy: SearchStrategy,
    truth: &[Vec<CaseId>],
    rounds: usize,
) -> (f64, f64, f64) {
    let any = CaseFilter::any();
    let mut times = Vec::with_capacity(queries.len() * rounds);
    let mut recall = 0.0;
    for round in 0..rounds {
        for (q, t) in queries.iter().zip(truth) {
            let start = Instant::now();
            let hits = index.search_with(q, 10, &any, kind, strategy).unwrap();
            times.push(start.elapsed().as_secs_f64() * 1e3);
            if round == 0 {
                recall += recall_at(&hits, t);
            }
        }
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    let p95 = times[(times.len() * 95 / 100).min(times.len() - 1)];
    (mean, p95, recall / queries.len() as f64)
}

/// Recall of the coarse pass with bits taken against zero instead of the
/// mean (what centring buys), re-ranked in f32: for the record only.
fn uncentred_recall(index: &FlatIndex, queries: &[&[f32]], truth: &[Vec<CaseId>]) -> f64 {
    let rows = index.f32_rows().unwrap();
    let dim = index.dim();
    let per = dim.div_ceil(8);
    let encode = |v: &[f32], out: &mut [u8]| {
        for (b, xs) in out.iter_mut().zip(v.chunks(8)) {
            *b = xs
                .iter()
                .enumerate()
                .fold(0u8, |acc, (i, &x)| acc | (u8::from(x > 0.0) << i));
        }
    };
    let mut bits = vec![0u8; index.len() * per];
    for (v, out) in rows.chunks_exact(dim).zip(bits.chunks_exact_mut(per)) {
        encode(v, out);
    }
    let ids: Vec<&CaseId> = index.ids().collect();
    let mut total = 0.0;
    for (q, t) in queries.iter().zip(truth) {
        let mut qb = vec![0u8; per];
        encode(q, &mut qb);
        let mut scored: Vec<(f64, usize)> = bits
            .chunks_exact(per)
            .enumerate()
            .map(|(i, b)| (u8::hamming(b, &qb).unwrap(), i))
            .collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut reranked: Vec<(f32, usize)> = scored[..DEFAULT_CANDIDATES.min(scored.len())]
            .iter()
            .map(|&(_, i)| {
                let v = &rows[i * dim..(i + 1) * dim];
                (v.iter().zip(q.iter()).map(|(a, b)| a * b).sum::<f32>(), i)
            })
            .collect();
        reranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let found = t
            .iter()
            .filter(|id| reranked[..10].iter().any(|&(_, i)| ids[i] == *id))
            .count();
        total += found as f64 / 10.0;
    }
    total / queries.len() as f64
}

/// Recall@10 of the coarse pass against exact f32, queries per second and
/// memory of exact and coarse search at `n` cases; the exact f32 truth is
/// computed chunk by chunk as the cases are made, so at 1M the f32 copy
/// (8 GB) never has to be resident: the index keeps what the handheld
/// keeps (int8 + sign bits), and at 100k f32 too.
fn bench_coarse(n: usize, dim: usize, full: bool) {
    let model = LesionModel::new(dim);
    let nq = if full { 100 } else { 10 };
    let mut qbuf = Vec::new();
    model.draw(&mut Rng(0xC0A5), nq, &mut qbuf);
    let queries: Vec<&[f32]> = qbuf.chunks_exact(dim).collect();
    let residency = if n > 200_000 {
        Residency::Int8
    } else {
        Residency::Both
    };
    let rss_before = vm_rss_kib();
    let mut index = FlatIndex::with_residency(dim, residency).unwrap();
    index.reserve(n);
    let mut truth: Vec<Vec<(f32, CaseId)>> = vec![Vec::new(); nq];
    let chunk = 50_000;
    let mut rng = Rng(0xBA5E ^ n as u64);
    let mut buf = Vec::with_capacity(chunk * dim);
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let m = chunk.min(n - done);
        buf.clear();
        model.draw(&mut rng, m, &mut buf);
        let mut part = FlatIndex::with_residency(dim, Residency::F32).unwrap();
        part.set_search_strategy(SearchStrategy::Exact);
        for (j, v) in buf.chunks_exact(dim).enumerate() {
            let id = CaseId::new(format!("c{}", done + j)).unwrap();
            part.upsert(id.clone(), v, &tags(done + j)).unwrap();
            index.upsert(id, v, &tags(done + j)).unwrap();
        }
        let hits = part
            .search_batch(&queries, 10, &CaseFilter::any(), ScoreKind::F32)
            .unwrap();
        for (t, h) in truth.iter_mut().zip(hits) {
            t.extend(h.into_iter().map(|h| (h.score, h.id)));
            t.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            t.truncate(10);
        }
        done += m;
    }
    let truth: Vec<Vec<CaseId>> = truth
        .into_iter()
        .map(|t| t.into_iter().map(|(_, id)| id).collect())
        .collect();
    let build_s = t.elapsed().as_secs_f64();
    drop(buf);
    let (bits, per_row, _, centred_at) = index.sign_bits();
    let bits_mib = bits.len() as f64 / (1 << 20) as f64;
    let int8_mib = (n * dim) as f64 / (1 << 20) as f64;
    let f32_mib = if residency.has_f32() {
        int8_mib * 4.0
    } else {
        0.0
    };
    println!(
        "bench=coarse_build n={n} dim={dim} residency={residency:?} data={} secs={build_s:.1} \
         int8_mib={int8_mib:.0} f32_mib={f32_mib:.0} bits_mib={bits_mib:.0} bytes_per_row={per_row} \
         centred_at={centred_at} default_candidates={DEFAULT_CANDIDATES} rss_mib={:.0}",
        if model.from_bundle { "bundle-stats" } else { "flat-stats" },
        (vm_rss_kib().saturating_sub(rss_before)) as f64 / 1024.0,
    );
    let rounds = if full { 3 } else { 1 };
    let mut runs: Vec<(String, ScoreKind, SearchStrategy)> =
        vec![("exact".into(), ScoreKind::Int8, SearchStrategy::Exact)];
    if residency.has_f32() {
        runs.push(("exact".into(), ScoreKind::F32, SearchStrategy::Exact));
    }
    let candidate_counts: &[usize] = if full {
        &[1_000, 2_000, 4_000, 8_000, 16_000]
    } else {
        &[50]
    };
    for &c in candidate_counts {
        runs.push((
            format!("coarse{c}"),
            ScoreKind::Int8,
            SearchStrategy::Coarse { candidates: c },
        ));
        if residency.has_f32() {
            runs.push((
                format!("coarse{c}"),
                ScoreKind::F32,
                SearchStrategy::Coarse { candidates: c },
            ));
        }
    }
    for (name, kind, strategy) in runs {
        let (mean, p95, recall) = time_queries(&index, &queries, kind, strategy, &truth, rounds);
        println!(
            "bench=coarse n={n} dim={dim} mode={name} rerank={} qps={:.1} ms_mean={mean:.2} \
             ms_p95={p95:.2} recall10={recall:.4} vmhwm_mib={:.0}",
            if kind == ScoreKind::F32 {
                "f32"
            } else {
                "int8"
            },
            1e3 / mean,
            vm_hwm_kib() as f64 / 1024.0,
        );
    }
    if residency.has_f32() && full {
        println!(
            "bench=coarse_uncentred n={n} dim={dim} candidates={DEFAULT_CANDIDATES} recall10={:.4}",
            uncentred_recall(&index, &queries, &truth)
        );
    }
}

/// Store open at `n` cases ingested into sled (int8 residency, the
/// handheld's: only the int8 cache is written, since an f32 cache at this
/// size would not fit the disk budget), in a fresh process.
fn bench_store_open_large(n: usize, dim: usize) {
    let dir = tempfile::tempdir_in(std::env::var("DERMASCOPE_BENCH_DIR").unwrap_or("/tmp".into()))
        .unwrap();
    let model = LesionModel::new(dim);
    let options = OpenOptions {
        residency: Residency::Int8,
        ..OpenOptions::default()
    };
    let store = CaseStore::open_with(dir.path(), identity(dim), options).unwrap();
    let mut rng = Rng(0x0BE4);
    let mut buf = Vec::new();
    let t = Instant::now();
    let batch = 1000;
    let mut i = 0;
    while i < n {
        let m = batch.min(n - i);
        buf.clear();
        model.draw(&mut rng, m, &mut buf);
        let cases: Vec<Case> = buf
            .chunks_exact(dim)
            .enumerate()
            .map(|(j, embedding)| Case {
                id: CaseId::new(format!("ISIC_{:07}", i + j)).unwrap(),
                embedding: embedding.to_vec(),
                diagnosis: Diagnosis::from_code(CODES[(i + j) % 7]).unwrap(),
                source: CaseSource::Reference,
                metadata: CaseMetadata::default(),
                thumbnail_jpeg: vec![0xAB; 256],
                model_id: MODEL.into(),
                created_at_ms: 0,
                updated_at_ms: 0,
                label_confirmed: true,
                device_id: None,
                revision: 1,
            })
            .collect();
        store.insert_batch(&cases).unwrap();
        i += m;
    }
    let ingest_s = t.elapsed().as_secs_f64();
    drop(store);
    let disk: u64 = walk_bytes(dir.path());
    println!(
        "bench=store_ingest_large n={n} dim={dim} secs={ingest_s:.1} cases_per_s={:.0} disk_bytes={disk}",
        n as f64 / ingest_s
    );
    // A device opens its library at boot, with nothing of it in the page
    // cache: that open first (where this process may drop the cache, i.e.
    // as root), then one with the files still cached from it.
    let cold = drop_page_cache();
    for page_cache in [if cold { "cold" } else { "warm" }, "warm"] {
        let line = open_in_child(dir.path(), dim, "int8");
        println!("{line} disk_bytes={disk} page_cache={page_cache}");
    }
}

/// The line a fresh process prints for one open of the store in `dir`
/// (`--open-only`), or an empty one if it never opened. Retried: sled
/// releases its lock from a background thread after a close.
fn open_in_child(dir: &Path, dim: usize, residency: &str) -> String {
    for _ in 0..50 {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--open-only",
                &dir.display().to_string(),
                &dim.to_string(),
                residency,
            ])
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    String::new()
}

/// Writes back and drops the kernel's page cache; false where that is not
/// allowed (not root, or a container that hides the knob).
fn drop_page_cache() -> bool {
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn walk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--coarse") {
        // `--coarse N`: only the coarse-pass figures at N cases (one size
        // per process, so each size's memory figures are its own).
        let n = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(100_000);
        bench_coarse(n, DIM, true);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--open-large") {
        let n = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(300_000);
        bench_store_open_large(n, DIM);
        return;
    }
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
    if !full {
        bench_coarse(2_000, dim, false);
    }
}
