//! The int8 multiply-add throughput of tract's kernel on this CPU, for the
//! encoder's physical floor in `scripts/bench encoder`: times one large 1x1
//! `ConvInteger` (u8 x s8 -> i32, the shipped int8's form; written by
//! `models/ort_best_int8.py floor-model`) on one thread, after the same
//! kernel choice the encoder makes, and prints one JSON line.
//!
//! ```sh
//! models/.venv/bin/python models/ort_best_int8.py floor-model --out /tmp/floor.onnx
//! cargo run --release --example int8_floor -- --model /tmp/floor.onnx --macs 1073741824
//! ```
//!
//! Rust rather than Python: the figure must be tract's own kernel as the
//! encoder plans it (`prefer_wide_int8_tile_on_amd`, tract's packing), which
//! only a tract run measures; the kernel tract picked is printed with it.

use std::path::PathBuf;
use std::time::Instant;

use tract_onnx::prelude::*;

struct Args {
    model: PathBuf,
    macs: u64,
    runs: usize,
    warmup: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: PathBuf::new(),
        macs: 0,
        runs: 20,
        warmup: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value()?.into(),
            "--macs" => args.macs = value()?.parse().map_err(|e| format!("--macs: {e}"))?,
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--warmup" => args.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.model.as_os_str().is_empty() || args.macs == 0 {
        return Err("--model FILE and --macs N are required".into());
    }
    if args.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(args)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    // Before the first int8 product is planned, as the encoder does.
    dermascope_encoder::prefer_wide_int8_tile_on_amd();
    let model = tract_onnx::onnx()
        .model_for_path(&args.model)?
        .into_optimized()?;
    let kernels: Vec<String> = model
        .nodes()
        .iter()
        .filter_map(|node| {
            node.op().info().ok()?.iter().find_map(|line| {
                line.strip_prefix("Mult:")
                    .and_then(|l| l.split_once(" with "))
                    .map(|(_, k)| k.trim().to_string())
            })
        })
        .collect();
    let plan = model.into_runnable()?;
    let shape: Vec<usize> = plan
        .model()
        .input_fact(0)?
        .shape
        .as_concrete()
        .map(|s| s.to_vec())
        .ok_or("input shape is not concrete")?;
    let len: usize = shape.iter().product();
    // Any bytes do: the kernel's time does not depend on the values.
    let input: Tensor = tract_ndarray::Array::from_shape_vec(
        shape,
        (0..len).map(|i| (i * 7 % 251) as u8).collect(),
    )?
    .into();
    let input: TValue = input.into();
    for _ in 0..args.warmup {
        plan.run(tvec![input.clone()])?;
    }
    let mut ms: Vec<f64> = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let start = Instant::now();
        plan.run(tvec![input.clone()])?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let median = ms[ms.len() / 2];
    println!(
        "{{\"engine\":\"tract\",\"threads\":1,\"runs\":{},\"macs\":{},\"median_ms\":{:.3},\"min_ms\":{:.3},\"gmac_per_s\":{:.1},\"kernels\":{:?}}}",
        args.runs,
        args.macs,
        median,
        ms[0],
        args.macs as f64 / median / 1e6,
        kernels,
    );
    Ok(())
}
