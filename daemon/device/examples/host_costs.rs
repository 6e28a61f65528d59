//! What the pixel paths cost per frame on this machine: YUYV and MJPEG to
//! RGB at camera size, and presenting a screen to the PNG and in-memory
//! displays. Synthetic frames (a gradient), no hardware.
//!
//! ```text
//! cargo run --release -p dermascope-device --example host_costs [-- --iterations 50]
//! ```

use std::io::Cursor;
use std::time::{Duration, Instant};

use dermascope_device::{decode_mjpeg, yuyv_to_rgb, Display, InMemoryDisplay, PngSnapshotDisplay};
use image::{ImageFormat, RgbImage};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut iterations = 50usize;
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--iterations", Some(n)) => iterations = n.parse()?,
            _ => return Err(format!("unknown argument {flag}").into()),
        }
    }

    let (width, height) = (640u32, 480u32);
    let yuyv: Vec<u8> = (0..width * height * 2).map(|i| (i % 251) as u8).collect();
    report("yuyv_to_rgb 640x480", iterations, || {
        yuyv_to_rgb(&yuyv, width, height, width as usize * 2, 0).map(drop)
    })?;

    let photo = RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut jpeg = Vec::new();
    photo.write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)?;
    report("decode_mjpeg 640x480", iterations, || {
        decode_mjpeg(&jpeg, 0, Instant::now()).map(drop)
    })?;

    let screen: Vec<u8> = (0..320 * 240 * 3).map(|i| (i % 253) as u8).collect();
    let mut memory = InMemoryDisplay::new(320, 240);
    report("InMemoryDisplay present 320x240", iterations, || {
        memory.present(320, 240, &screen)
    })?;
    let mut letterboxed = InMemoryDisplay::new(240, 240);
    report(
        "InMemoryDisplay present 320x240 into 240x240",
        iterations,
        || letterboxed.present(320, 240, &screen),
    )?;
    let dir = std::env::temp_dir().join(format!("dermascope-host-costs-{}", std::process::id()));
    let mut png = PngSnapshotDisplay::new(&dir, 320, 240)?;
    report("PngSnapshotDisplay present 320x240", iterations, || {
        png.present(320, 240, &screen)
    })?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Runs `step` `iterations` times and prints the median and worst time.
fn report<E: std::error::Error + 'static>(
    name: &str,
    iterations: usize,
    mut step: impl FnMut() -> Result<(), E>,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut times: Vec<Duration> = Vec::with_capacity(iterations);
    for _ in 0..iterations.max(1) {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    let worst = times[times.len() - 1];
    println!(
        "{name}: median {:.2} ms, worst {:.2} ms over {} runs",
        median.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3,
        times.len()
    );
    Ok(())
}
