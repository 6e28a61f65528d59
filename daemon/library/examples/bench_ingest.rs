//! Library ingest throughput: `ingest_in_batches` of the first N photographs
//! of the derm folder into a fresh store, for each encoder batch and variant
//! (`scripts/bench ingest`). The figure is the whole call (the batch plan's
//! load, reading, decoding, thumbnails, embedding, flushed writes), as a
//! first start sees it.
//!
//! ```text
//! bench_ingest [--images N] [--batches 1,4,8] [--variants fp32,int8] [--threads T]
//! ```
//! Data: `$DERMASCOPE_DERM_DATA`, else `../shared/data/derm` beside the
//! checkout; bundle: `$DERMASCOPE_MODEL_DIR`, else the default one.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dermascope_encoder::{Encoder, EncoderOptions, VariantChoice};
use dermascope_library::{ingest_in_batches, read_labels, IngestOptions};
use dermascope_store::{CaseStore, OpenOptions, Residency, StoreIdentity};

struct Args {
    images: usize,
    batches: Vec<usize>,
    variants: Vec<String>,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        images: 200,
        batches: vec![1, 4, 8],
        variants: vec!["fp32".into(), "int8".into()],
        threads: dermascope_encoder::DEFAULT_THREADS,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--images" => args.images = value()?.parse().map_err(|e| format!("--images: {e}"))?,
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            "--batches" => {
                args.batches = value()?
                    .split(',')
                    .map(|b| b.parse().map_err(|e| format!("--batches: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--variants" => args.variants = value()?.split(',').map(str::to_string).collect(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("bench_ingest: {e}");
            return ExitCode::from(2);
        }
    };
    let data = std::env::var_os("DERMASCOPE_DERM_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/data/derm"));
    if !data.join("labels.csv").is_file() || !data.join("images").is_dir() {
        println!(
            "ingest: SKIPPED, no dermoscopy folder at {} (set DERMASCOPE_DERM_DATA)",
            data.display()
        );
        return ExitCode::SUCCESS;
    }
    let bundle = std::env::var_os("DERMASCOPE_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/dist/sklesion-xception"));
    let labels = match read_labels(&data.join("labels.csv")) {
        Ok(labels) => labels,
        Err(e) => {
            eprintln!("bench_ingest: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rows: Vec<_> = labels.rows.into_iter().take(args.images).collect();
    println!(
        "ingest: {} images of {}, {} encoder workers (one thread each) beside one reading thread, {} cores",
        rows.len(),
        data.display(),
        args.threads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for variant in &args.variants {
        let options = EncoderOptions {
            variant: VariantChoice::Named(variant.clone()),
            // On an x86_64 CPU without VNNI int8 is slow: measured, not refused.
            allow_slow_int8: true,
            threads: args.threads,
            ..EncoderOptions::default()
        };
        let encoder = match Encoder::load(&bundle, &options) {
            Ok(encoder) => encoder,
            Err(e) => {
                eprintln!("bench_ingest: {e}");
                return ExitCode::FAILURE;
            }
        };
        for &batch in &args.batches {
            match run(&encoder, &data, &rows, batch, args.threads) {
                Ok(run) => println!(
                    "ingest images per second (batch {batch}, variant {variant}): {:.1}  \
                     ({} images in {:.1} s, {} rejected; {} CPU ms per image)",
                    run.rate,
                    rows.len(),
                    run.seconds,
                    run.rejected,
                    run.cpu_ms_per_image
                        .map_or("?".to_string(), |ms| format!("{ms:.0}")),
                ),
                Err(e) => {
                    eprintln!("bench_ingest: batch {batch}, {variant}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}

struct Run {
    rate: f64,
    seconds: f64,
    rejected: usize,
    /// The process's CPU time (every thread) per image: on a machine others
    /// load, the work done, where the rate says how much CPU it was given.
    cpu_ms_per_image: Option<f64>,
}

/// User + system CPU seconds of this process so far (Linux: /proc).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command's closing parenthesis: utime, stime are the
    // 12th and 13th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn run(
    encoder: &Encoder,
    data: &Path,
    rows: &[dermascope_library::LabelledImage],
    batch: usize,
    threads: usize,
) -> Result<Run, Box<dyn std::error::Error>> {
    let cpu_before = cpu_seconds();
    let dir = tempfile::tempdir()?;
    let identity = StoreIdentity {
        model_id: encoder.model_id().to_string(),
        embedding_dim: encoder.dim(),
    };
    // As `dermascope ingest` opens it: ingest never scores.
    let store = CaseStore::open_with(
        dir.path().join("store"),
        identity,
        OpenOptions {
            residency: Residency::Int8,
            ..OpenOptions::default()
        },
    )?;
    let summary = ingest_in_batches(
        &store,
        encoder,
        &data.join("images"),
        rows,
        IngestOptions {
            workers: threads,
            ..IngestOptions::default()
        },
        batch,
        |_| ControlFlow::Continue(()),
    )?;
    if summary.encoder_batch != batch {
        return Err(format!("ran at batch {} instead", summary.encoder_batch).into());
    }
    let cpu = cpu_before.zip(cpu_seconds()).map(|(a, b)| b - a);
    Ok(Run {
        rate: summary.ingested as f64 / summary.seconds,
        seconds: summary.seconds,
        rejected: summary.rejected.len(),
        cpu_ms_per_image: cpu.map(|s| s * 1e3 / summary.ingested.max(1) as f64),
    })
}
