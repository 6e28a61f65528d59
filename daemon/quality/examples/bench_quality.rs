//! How long the gate takes on one 640x480 frame (the budget is 5 ms on the
//! device). A plain loop, not a test: timings are measurements, never
//! assertions.
//!
//! `cargo run --release -p dermascope-quality --example bench_quality [iterations] [width height]`

use std::time::Instant;

use dermascope_quality::{assess, Frame, QualityThresholds};

/// A deterministic lesion-like frame: a dark disc with a lattice on skin.
fn synthetic_frame(width: u32, height: u32) -> Vec<u8> {
    let mut rgb = Vec::with_capacity((width * height * 3) as usize);
    let (cx, cy, r) = (width as f32 / 2.0, height as f32 / 2.0, height as f32 / 5.0);
    for y in 0..height {
        for x in 0..width {
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            let px: [u8; 3] = if dx * dx + dy * dy < r * r {
                if x % 12 < 3 || y % 12 < 3 {
                    [84, 52, 36]
                } else {
                    [120, 74, 52]
                }
            } else {
                [214, 170, 146]
            };
            rgb.extend_from_slice(&px);
        }
    }
    rgb
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let iterations: usize = args.first().map_or(Ok(500), |a| a.parse())?;
    let width: u32 = args.get(1).map_or(Ok(640), |a| a.parse())?;
    let height: u32 = args.get(2).map_or(Ok(480), |a| a.parse())?;
    let rgb = synthetic_frame(width, height);
    let frame = Frame::new(width, height, &rgb)?;
    let thresholds = QualityThresholds::default();

    // Warm caches and the branch predictor before timing.
    for _ in 0..10 {
        std::hint::black_box(assess(&frame, &thresholds));
    }
    let mut times_ms = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        std::hint::black_box(assess(std::hint::black_box(&frame), &thresholds));
        times_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times_ms.sort_by(f64::total_cmp);
    let mean = times_ms.iter().sum::<f64>() / times_ms.len().max(1) as f64;
    let pick = |q: f64| times_ms[((times_ms.len() - 1) as f64 * q) as usize];
    println!(
        "assess {width}x{height}: {iterations} runs, mean {mean:.3} ms, median {:.3} ms, p95 {:.3} ms, min {:.3} ms",
        pick(0.5),
        pick(0.95),
        pick(0.0)
    );
    println!("{:?}", assess(&frame, &thresholds));
    Ok(())
}
