//! Per-node profile of tract's optimised plan (`bench_encoder --profile`).
//!
//! The plan is built here the same way `Encoder::load` builds it (input shape
//! fixed from the manifest, optimised once, same executor), then run through
//! `SimpleState::run_plan_with_eval` with a hook that times each node. The
//! encoder library keeps tract out of its public API, so the benchmark owns
//! this copy of the load steps.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use dermascope_encoder::manifest::TensorLayout;
use dermascope_encoder::EncoderManifest;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::SimpleState;
use tract_onnx::tract_core::ops::Cost;

pub struct Settings {
    pub threads: usize,
    pub runs: usize,
    pub warmup: usize,
    pub top: usize,
    /// As `EncoderOptions::fuse_stages`.
    pub fuse_stages: bool,
}

/// What one node of the plan cost over the measured runs.
struct NodeProfile {
    name: String,
    op: String,
    /// Multiply-accumulates per run, from tract's own cost model.
    macs: u64,
    /// The matrix-multiply kernel(s) tract chose, for `OptMatMul` nodes.
    kernel: Option<String>,
    spent: Duration,
}

pub fn run(
    model_path: &Path,
    manifest: &EncoderManifest,
    inputs: &[&[f32]],
    settings: &Settings,
) -> Result<(), Box<dyn std::error::Error>> {
    let input = &manifest.input;
    let shape = match input.layout {
        TensorLayout::Nchw => [1, 3, input.height as usize, input.width as usize],
        TensorLayout::Nhwc => [1, input.height as usize, input.width as usize, 3],
    };
    let mut model = tract_onnx::onnx().model_for_path(model_path)?;
    if model.input_outlets()?.len() != 1 {
        return Err("--profile expects a graph with a single input".into());
    }
    model.set_input_fact(0, f32::fact(shape).into())?;
    let mut typed = model.into_typed()?.into_decluttered()?;
    if settings.fuse_stages {
        dermascope_encoder::stages::fuse_stages(&mut typed)?;
    }
    let optimized = typed.into_optimized()?;
    let executor = dermascope_encoder::executor_for(settings.threads);
    let plan = optimized.into_runnable_with_options(&RunOptions {
        executor: executor.clone(),
        ..RunOptions::default()
    })?;
    let graph = plan.model();

    let mut nodes: Vec<NodeProfile> = graph
        .nodes()
        .iter()
        .map(|node| {
            let facts = graph.node_input_facts(node.id)?;
            let macs = node
                .op
                .cost(&facts)?
                .iter()
                .filter(|(cost, _)| matches!(cost, Cost::FMA(_)))
                .map(|(_, n)| n.to_i64().unwrap_or(0).max(0) as u64)
                .sum();
            let kernel = node.op().info()?.iter().find_map(|line| {
                line.strip_prefix("Mult:")
                    .and_then(|l| l.split_once(" with "))
                    .map(|(_, k)| k.trim().to_string())
            });
            Ok(NodeProfile {
                name: node.name.clone(),
                op: node.op().name().to_string(),
                macs,
                kernel,
                spent: Duration::ZERO,
            })
        })
        .collect::<TractResult<_>>()?;

    // On the plan's own pool, as Encoder::run_tensor runs it.
    let run_all = || -> TractResult<Duration> {
        let mut state = SimpleState::new(&plan)?;
        let mut wall = Duration::ZERO;
        for i in 0..settings.warmup + settings.runs {
            let tensor = Tensor::from_shape(&shape, inputs[i % inputs.len()])?;
            let measured = i >= settings.warmup;
            let started = Instant::now();
            state.run_plan_with_eval(
                tvec![tensor.into_tvalue()],
                |ctx, op_state, node, values| {
                    let started = Instant::now();
                    let outputs = tract_onnx::tract_core::plan::eval(ctx, op_state, node, values);
                    if measured {
                        nodes[node.id].spent += started.elapsed();
                    }
                    outputs
                },
            )?;
            if measured {
                wall += started.elapsed();
            }
        }
        Ok(wall)
    };
    let wall = dermascope_encoder::on_plan_pool(executor.as_ref(), run_all)?;
    report(&nodes, wall, settings);
    Ok(())
}

fn ms_per_run(spent: Duration, runs: usize) -> f64 {
    spent.as_secs_f64() * 1e3 / runs.max(1) as f64
}

fn gmacs_per_s(macs: u64, ms: f64) -> String {
    if macs == 0 || ms <= 0.0 {
        "-".into()
    } else {
        format!("{:.2}", macs as f64 / (ms * 1e6))
    }
}

fn report(nodes: &[NodeProfile], wall: Duration, settings: &Settings) {
    let runs = settings.runs;
    let total: Duration = nodes.iter().map(|n| n.spent).sum();
    let total_ms = ms_per_run(total, runs);
    let total_macs: u64 = nodes.iter().map(|n| n.macs).sum();
    println!(
        "profile: {} nodes, {} runs, {} thread(s): {:.1} ms per run in nodes, {:.1} ms wall, {:.2} GMAC per run ({} GMAC/s overall)",
        nodes.len(),
        runs,
        settings.threads,
        total_ms,
        ms_per_run(wall, runs),
        total_macs as f64 / 1e9,
        gmacs_per_s(total_macs, total_ms),
    );

    let mut by_op: BTreeMap<&str, (usize, Duration, u64)> = BTreeMap::new();
    for node in nodes {
        let entry = by_op.entry(&node.op).or_default();
        entry.0 += 1;
        entry.1 += node.spent;
        entry.2 += node.macs;
    }
    let mut by_op: Vec<_> = by_op.into_iter().collect();
    by_op.sort_by_key(|(_, (_, spent, _))| std::cmp::Reverse(*spent));
    println!("\nby op type:");
    println!(
        "{:<28}{:>6}{:>11}{:>8}{:>10}{:>9}",
        "op", "nodes", "ms/run", "%", "GMAC", "GMAC/s"
    );
    for (op, (count, spent, macs)) in &by_op {
        let ms = ms_per_run(*spent, runs);
        println!(
            "{:<28}{:>6}{:>11.2}{:>8.1}{:>10.3}{:>9}",
            op,
            count,
            ms,
            100.0 * ms / total_ms,
            *macs as f64 / 1e9,
            gmacs_per_s(*macs, ms)
        );
    }

    let mut by_kernel: BTreeMap<&str, (usize, Duration, u64)> = BTreeMap::new();
    for node in nodes {
        if let Some(kernel) = &node.kernel {
            let entry = by_kernel.entry(kernel).or_default();
            entry.0 += 1;
            entry.1 += node.spent;
            entry.2 += node.macs;
        }
    }
    println!("\nmatrix-multiply kernels picked:");
    println!(
        "{:<48}{:>6}{:>11}{:>8}{:>9}",
        "kernel", "nodes", "ms/run", "%", "GMAC/s"
    );
    for (kernel, (count, spent, macs)) in &by_kernel {
        let ms = ms_per_run(*spent, runs);
        println!(
            "{:<48}{:>6}{:>11.2}{:>8.1}{:>9}",
            kernel,
            count,
            ms,
            100.0 * ms / total_ms,
            gmacs_per_s(*macs, ms)
        );
    }

    let mut slowest: Vec<&NodeProfile> = nodes.iter().collect();
    slowest.sort_by_key(|node| std::cmp::Reverse(node.spent));
    println!("\ntop {} nodes:", settings.top);
    println!(
        "{:>9}{:>7}{:>9}  {:<20} {:<40} kernel",
        "ms/run", "%", "GMAC/s", "op", "node"
    );
    for node in slowest.into_iter().take(settings.top) {
        let ms = ms_per_run(node.spent, runs);
        println!(
            "{:>9.2}{:>7.1}{:>9}  {:<20} {:<40} {}",
            ms,
            100.0 * ms / total_ms,
            gmacs_per_s(node.macs, ms),
            node.op,
            node.name,
            node.kernel.as_deref().unwrap_or("")
        );
    }
}
