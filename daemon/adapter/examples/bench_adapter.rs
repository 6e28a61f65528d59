//! How long training and inference take on this machine.
//!
//! `scripts/bench adapter` runs this: trains on `--cases` synthetic
//! embeddings of dimension `--dim` (clusters around random centres, seven
//! classes, the default hyper-parameters: h = 254, 15 epochs at most), then
//! times single-embedding inference through tract (median of `--runs`).
//! The goals are training 3,000 embeddings in under 10 s and inference
//! under 1 ms. Real-data training time is printed by `dermascope eval`.

use std::time::Instant;

use dermascope_adapter::{save, train, Adapter, LabelledEmbedding, TrainingConfig};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn main() -> Result<(), String> {
    let mut cases = 3000usize;
    let mut dim = 2048usize;
    let mut runs = 1000usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let value: usize = value.parse().map_err(|e| format!("{flag}: {e}"))?;
        match flag.as_str() {
            "--cases" => cases = value,
            "--dim" => dim = value,
            "--runs" => runs = value,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let classes = 7;
    let mut rng = StdRng::seed_from_u64(11);
    let centres: Vec<Vec<f32>> = (0..classes)
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    // `cases` to train on, and a sixth as many other lesions to validate on.
    let validation_cases = cases / 6;
    let examples: Vec<LabelledEmbedding> = (0..cases + validation_cases)
        .map(|i| {
            let class = i % classes;
            let mut v: Vec<f32> = centres[class]
                .iter()
                .map(|c| c + 2.0 * rng.random_range(-1.0f32..1.0))
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            LabelledEmbedding {
                embedding: v,
                label: format!("class{class}"),
                model_id: "bench-encoder".into(),
                lesion: format!("lesion{}", i / 2),
            }
        })
        .collect();
    let train_set: Vec<&LabelledEmbedding> = examples[..cases].iter().collect();
    let validation: Vec<&LabelledEmbedding> = examples[cases..].iter().collect();
    let config = TrainingConfig {
        // Every epoch runs: the figure is the worst case, not an early stop.
        patience: usize::MAX,
        ..TrainingConfig::default()
    };
    let started = Instant::now();
    let trained = train(&train_set, &validation, &config).map_err(|e| e.to_string())?;
    let training_s = started.elapsed().as_secs_f64();
    let dir = std::env::temp_dir().join(format!("dermascope-bench-adapter-{}", std::process::id()));
    save(&trained, config.seed, &dir).map_err(|e| e.to_string())?;
    let adapter = Adapter::load(&dir, "bench-encoder", dim).map_err(|e| e.to_string())?;
    let query = &examples[0].embedding;
    for _ in 0..50 {
        adapter.predict(query).map_err(|e| e.to_string())?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        adapter.predict(query).map_err(|e| e.to_string())?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let p95 = times[(times.len() * 95 / 100).min(times.len() - 1)];
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "adapter: {} training embeddings (dim {dim}, {} validation), h = {}, {} epochs",
        train_set.len(),
        validation.len(),
        config.hidden,
        trained.history.len()
    );
    println!("adapter training s: {training_s:.2}");
    println!(
        "adapter inference ms (1 embedding, tract, median of {runs}): {median:.3} (p95 {p95:.3})"
    );
    Ok(())
}
