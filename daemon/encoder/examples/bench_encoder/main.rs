//! Times one encoder variant in tract on preprocessed inputs and prints one
//! JSON line; `scripts/bench encoder` runs it once per configuration so that
//! each peak RSS is measured in its own process.
//!
//! ```sh
//! cargo run --release --example bench_encoder -- \
//!     --bundle models/dist/sklesion-xception --variant fp32 \
//!     --inputs models/dist/sklesion-xception/check/inputs.f32 --threads 1 --runs 20
//! ```
//!
//! `--model FILE` benchmarks an ONNX file outside the manifest (an experiment)
//! with the bundle's input and output specification.
//!
//! `--profile` instead times every node of tract's optimised plan over the
//! runs and prints where the time goes: by op type, the slowest nodes, and
//! which matrix-multiply kernel tract picked for each product (the
//! `OptMatMul` ops name it). The per-node hook adds a little overhead per
//! node, so the total is a few percent above the plain median.
//!
//! `--stock-tract` runs tract as it comes: its own ops for the depthwise
//! convolutions, max pools and the quantization around them instead of the
//! encoder's fused stages, and its own choice of int8 matrix kernel.

mod profile;

use std::path::PathBuf;
use std::time::Instant;

use dermascope_encoder::{Encoder, EncoderOptions, VariantChoice};

struct Args {
    bundle: PathBuf,
    variant: String,
    model: Option<PathBuf>,
    inputs: PathBuf,
    threads: usize,
    runs: usize,
    warmup: usize,
    outputs: Option<PathBuf>,
    profile: bool,
    top: usize,
    stock_tract: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        bundle: PathBuf::from("models/dist/sklesion-xception"),
        variant: "fp32".into(),
        model: None,
        inputs: PathBuf::new(),
        threads: 1,
        runs: 20,
        warmup: 2,
        outputs: None,
        profile: false,
        top: 25,
        stock_tract: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bundle" => args.bundle = value()?.into(),
            "--variant" => args.variant = value()?,
            "--model" => args.model = Some(value()?.into()),
            "--inputs" => args.inputs = value()?.into(),
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--outputs" => args.outputs = Some(value()?.into()),
            "--warmup" => args.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--profile" => args.profile = true,
            "--stock-tract" => args.stock_tract = true,
            "--top" => args.top = value()?.parse().map_err(|e| format!("--top: {e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.inputs.as_os_str().is_empty() {
        args.inputs = args.bundle.join("check/inputs.f32");
    }
    Ok(args)
}

/// An experiment's ONNX file is benchmarked through a throw-away bundle that
/// reuses the real manifest with that file's checksum.
fn experiment_bundle(
    args: &Args,
    model: &PathBuf,
) -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
    use sha2::Digest;
    let manifest = std::fs::read_to_string(args.bundle.join("manifest.toml"))?;
    let mut table: toml::Table = manifest.parse()?;
    let bytes = std::fs::read(model)?;
    let dir = tempfile::tempdir()?;
    let file_name = "experiment.onnx";
    std::fs::write(dir.path().join(file_name), &bytes)?;
    let mut variant = toml::Table::new();
    variant.insert("name".into(), "experiment".into());
    variant.insert("file".into(), file_name.into());
    variant.insert("precision".into(), "int8".into());
    variant.insert(
        "sha256".into(),
        hex::encode(sha2::Sha256::digest(&bytes)).into(),
    );
    table.insert(
        "variant".into(),
        toml::Value::Array(vec![toml::Value::Table(variant)]),
    );
    std::fs::write(dir.path().join("manifest.toml"), toml::to_string(&table)?)?;
    Ok(dir)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let experiment = args
        .model
        .as_ref()
        .map(|m| experiment_bundle(&args, m))
        .transpose()?;
    let (bundle, variant) = match &experiment {
        Some(dir) => (dir.path().to_path_buf(), "experiment".to_string()),
        None => (args.bundle.clone(), args.variant.clone()),
    };
    let options = EncoderOptions {
        variant: VariantChoice::Named(variant),
        // On an x86_64 CPU without VNNI int8 is slow: measured, not refused.
        allow_slow_int8: true,
        threads: args.threads,
        fuse_stages: !args.stock_tract,
        prefer_wide_int8_tile: !args.stock_tract,
        ..EncoderOptions::default()
    };
    let started = Instant::now();
    let encoder = Encoder::load(&bundle, &options)?;
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let timings = encoder.load_timings();

    let bytes = std::fs::read(&args.inputs)?;
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let inputs: Vec<&[f32]> = values.chunks_exact(encoder.input_len()).collect();
    if inputs.is_empty() {
        return Err("no input tensors in --inputs".into());
    }
    if args.profile {
        let path = encoder.manifest().variant_path(&bundle, encoder.variant());
        let settings = profile::Settings {
            threads: args.threads,
            runs: args.runs,
            warmup: args.warmup,
            top: args.top,
            fuse_stages: !args.stock_tract,
        };
        return profile::run(&path, encoder.manifest(), &inputs, &settings);
    }
    for i in 0..args.warmup {
        encoder.run_tensor(inputs[i % inputs.len()])?;
    }
    let mut times_ms = Vec::with_capacity(args.runs);
    let mut outputs = Vec::new();
    for i in 0..args.runs {
        let input = inputs[i % inputs.len()];
        let started = Instant::now();
        let output = encoder.run_tensor(input)?;
        times_ms.push(started.elapsed().as_secs_f64() * 1e3);
        if i < inputs.len() {
            outputs.push(output);
        }
    }
    times_ms.sort_by(f64::total_cmp);
    let median = times_ms[times_ms.len() / 2];
    let p90 = times_ms[(times_ms.len() * 9 / 10).min(times_ms.len() - 1)];
    let name = args
        .model
        .as_ref()
        .map_or(args.variant.clone(), |m| m.display().to_string());
    println!(
        "{{\"engine\":\"tract\",\"variant\":{:?},\"threads\":{},\"runs\":{},\"median_ms\":{:.2},\"p90_ms\":{:.2},\"load_ms\":{:.1},\"verify_ms\":{:.1},\"parse_ms\":{:.1},\"optimize_ms\":{:.1},\"peak_rss_mib\":{:.1}}}",
        name,
        args.threads,
        args.runs,
        median,
        p90,
        load_ms,
        timings.read_and_verify.as_secs_f64() * 1e3,
        timings.parse.as_secs_f64() * 1e3,
        timings.optimize.as_secs_f64() * 1e3,
        peak_rss_mib(),
    );
    // Raw outputs (one per distinct input, little-endian f32) let the bench
    // script check correctness against onnxruntime without a second run.
    if let Some(path) = &args.outputs {
        let bytes: Vec<u8> = outputs
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(path, bytes)?;
    }
    Ok(())
}
