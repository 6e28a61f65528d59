//! Trigger-to-results latency of the whole pipeline, by stage.
//!
//! `scripts/bench e2e` runs this. A replay camera (30 fps) feeds the daemon's
//! own loop; a scripted button presses `--captures` times; the screen is
//! drawn into memory. The library holds `--cases` cases: real embeddings and
//! thumbnails copied from the evaluation cache (`var/eval/<model id>`, made
//! by `dermascope eval`) when it has enough, else synthetic ones (say so).
//!
//! The daemon is assembled by `Daemon::from_config`, as `dermascope run`
//! does, with only the button and the screen swapped for scripted ones.
//! `--capture ring` (the default, as on the device) answers a press from
//! the frames the camera thread captured just before it; `--capture burst`
//! waits for 3 new frames, as the daemon did before the ring, for the
//! comparison. Prints p50/p95 per stage for the variant asked for, where
//! the answered frames came from, and ends with `e2e p95 ms (...): X`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dermascope_device::{Display, InMemoryDisplay, NoHardware, ScriptedTrigger, TriggerEvent};
use dermascope_encoder::{Encoder, EncoderOptions, VariantChoice};
use dermascope_pipeline::{
    CaptureKind, Config, Daemon, FrameOrigin, NoSupervisor, StageTimings, StartOptions,
};
use dermascope_store::{
    Case, CaseId, CaseMetadata, CaseSource, CaseStore, Diagnosis, OpenOptions, Residency,
    StoreIdentity,
};

struct Args {
    bundle: PathBuf,
    variant: Option<String>,
    captures: u64,
    cases: usize,
    threads: usize,
    replay: Option<PathBuf>,
    capture: CaptureKind,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        bundle: PathBuf::from("models/dist/sklesion-xception"),
        variant: None,
        captures: 60,
        cases: 4000,
        threads: 2,
        replay: None,
        capture: CaptureKind::Ring,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--bundle" => args.bundle = PathBuf::from(value()?),
            "--variant" => args.variant = Some(value()?),
            "--captures" => args.captures = value()?.parse().map_err(|e| format!("{e}"))?,
            "--cases" => args.cases = value()?.parse().map_err(|e| format!("{e}"))?,
            "--threads" => args.threads = value()?.parse().map_err(|e| format!("{e}"))?,
            "--replay" => args.replay = Some(PathBuf::from(value()?)),
            "--capture" => {
                args.capture = match value()?.as_str() {
                    "ring" => CaptureKind::Ring,
                    "burst" => CaptureKind::Burst,
                    other => return Err(format!("--capture {other}: ring or burst")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn synthetic_thumbnail(seed: usize) -> Vec<u8> {
    let image = image::RgbImage::from_fn(96, 72, |x, y| {
        let d = ((x as i32 - 48).pow(2) + (y as i32 - 36).pow(2)) as usize;
        if d < 500 + seed % 300 {
            image::Rgb([90, 50, 40])
        } else {
            image::Rgb([220, 170, 150])
        }
    });
    let mut jpeg = Vec::new();
    let _ = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80).encode_image(&image);
    jpeg
}

/// Fills `store` up to `wanted` cases; returns where they came from.
fn fill_library(store: &CaseStore, encoder: &Encoder, wanted: usize) -> Result<String, String> {
    let have = store.len().map_err(|e| e.to_string())?;
    if have >= wanted {
        return Ok(format!("{have} cases already in the benchmark store"));
    }
    let eval_cache = PathBuf::from("var/eval").join(encoder.model_id());
    let identity = StoreIdentity {
        model_id: encoder.model_id().to_string(),
        embedding_dim: encoder.dim(),
    };
    if eval_cache.is_dir() {
        if let Ok(real) = CaseStore::open_with(
            &eval_cache,
            identity.clone(),
            OpenOptions {
                residency: Residency::Int8,
                no_cache_on_close: true,
            },
        ) {
            if real.len().unwrap_or(0) >= wanted {
                let mut batch = Vec::new();
                for case in real.cases().take(wanted) {
                    batch.push(case.map_err(|e| e.to_string())?);
                    if batch.len() == 500 {
                        store.insert_batch(&batch).map_err(|e| e.to_string())?;
                        batch.clear();
                    }
                }
                store.insert_batch(&batch).map_err(|e| e.to_string())?;
                return Ok(format!(
                    "{wanted} real dermoscopy cases copied from {}",
                    eval_cache.display()
                ));
            }
        }
    }
    // Synthetic: random unit vectors (the scan costs the same) and drawn thumbnails.
    let codes: Vec<&str> = Diagnosis::ham10000_codes().collect();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut batch = Vec::new();
    for i in have..wanted {
        let mut embedding: Vec<f32> = (0..encoder.dim()).map(|_| next()).collect();
        let norm = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        embedding.iter_mut().for_each(|v| *v /= norm);
        batch.push(Case {
            id: CaseId::new(format!("bench-{i:05}")).map_err(|e| e.to_string())?,
            embedding,
            diagnosis: Diagnosis::from_code(codes[i % codes.len()]).map_err(|e| e.to_string())?,
            source: CaseSource::Reference,
            metadata: CaseMetadata::default(),
            thumbnail_jpeg: synthetic_thumbnail(i),
            model_id: encoder.model_id().to_string(),
            created_at_ms: 0,
            updated_at_ms: 0,
            label_confirmed: true,
            device_id: None,
            revision: 1,
        });
        if batch.len() == 500 {
            store.insert_batch(&batch).map_err(|e| e.to_string())?;
            batch.clear();
        }
    }
    store.insert_batch(&batch).map_err(|e| e.to_string())?;
    Ok(format!(
        "{wanted} SYNTHETIC cases (run `dermascope eval` on ../shared/data/derm first for real ones)"
    ))
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

fn main() -> Result<(), String> {
    let args = parse_args()?;
    // The library is filled with the benchmark's own encoder instance, then
    // closed: the daemon below is assembled exactly as `dermascope run` does.
    let options = EncoderOptions {
        variant: VariantChoice::from_name(args.variant.as_deref()),
        threads: args.threads,
        ..EncoderOptions::default()
    };
    let encoder = Encoder::load(&args.bundle, &options).map_err(|e| e.to_string())?;
    let variant = encoder.variant().name.clone();
    let store_dir = PathBuf::from("var/bench/e2e").join(encoder.model_id());
    let adapter_dir = PathBuf::from("var/eval")
        .join(encoder.model_id())
        .join("adapter");
    let provenance = {
        let store = CaseStore::open_with(
            &store_dir,
            StoreIdentity {
                model_id: encoder.model_id().to_string(),
                embedding_dim: encoder.dim(),
            },
            OpenOptions {
                residency: Residency::Int8,
                ..OpenOptions::default()
            },
        )
        .map_err(|e| e.to_string())?;
        fill_library(&store, &encoder, args.cases)?
    };
    drop(encoder);
    if !adapter_dir
        .join(dermascope_adapter::MANIFEST_FILE)
        .is_file()
    {
        println!(
            "no adapter in {} (run `dermascope eval` first): adapter stage not measured",
            adapter_dir.display()
        );
    }
    let replay = match &args.replay {
        Some(dir) => dir.clone(),
        None => {
            let derm = PathBuf::from("../shared/data/derm/images");
            if derm.is_dir() {
                derm
            } else {
                PathBuf::from("var/demo-lesions")
            }
        }
    };
    let scratch = PathBuf::from("var/bench/e2e/run");
    let mut config = Config::default();
    config.camera.replay_dir = replay.clone();
    config.camera.replay_fps = 30.0;
    config.store.dir = store_dir;
    config.adapter.dir = adapter_dir;
    config.encoder.variant = args.variant.clone();
    config.encoder.threads = Some(args.threads);
    config.trigger.socket = scratch.join("control.sock");
    config.display.png_dir = scratch.join("screens");
    config.device.id = Some("bench-e2e".into());
    config.pipeline.capture = args.capture;
    let capture = match args.capture {
        CaptureKind::Ring => "ring",
        CaptureKind::Burst => "burst",
    };
    let start = StartOptions {
        bundle: args.bundle.clone(),
        reference_cases: None,
        library_snapshot: None,
    };
    let (mut daemon, _) = Daemon::from_config(&config, Arc::new(NoHardware), &start, |_| {})
        .map_err(|e| e.to_string())?;
    // The button is scripted and the screen drawn into memory, so the
    // figures are the pipeline's, not a PNG encoder's or a socket's.
    let mut events: Vec<TriggerEvent> = (0..args.captures).map(|_| TriggerEvent::Capture).collect();
    events.push(TriggerEvent::Shutdown);
    daemon.trigger = Box::new(ScriptedTrigger::new(events));
    daemon.display = Box::new(InMemoryDisplay::new(320, 240)) as Box<dyn Display>;
    let adapter_id = daemon
        .analyzer
        .adapter
        .current()
        .map_or("none".to_string(), |a| a.adapter_id().to_string());
    // Let the camera thread reach its pace before the first press.
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let summary = daemon
        .run(&AtomicBool::new(false), &NoSupervisor, None)
        .map_err(|e| e.to_string())?;
    let answered: Vec<&StageTimings> = summary
        .timings
        .iter()
        .filter(|t| t.encoder_ms.is_some())
        .collect();
    println!(
        "e2e: {} captures ({} refused by the quality gate) in {:.1} s; capture {capture}; encoder variant {variant}, {} threads; adapter: {adapter_id}; library: {provenance}; replay: {}",
        summary.captures,
        summary.rejected,
        started.elapsed().as_secs_f64(),
        args.threads,
        replay.display()
    );
    println!("{:<12}{:>10}{:>10}", "stage", "p50 ms", "p95 ms");
    let from = |origin: FrameOrigin| {
        answered
            .iter()
            .filter(|t| t.frame.is_some_and(|f| f.origin == origin))
            .count()
    };
    let mut ages: Vec<f64> = answered
        .iter()
        .filter_map(|t| t.frame.map(|f| f.age_ms))
        .collect();
    println!(
        "answered: {} from the ring, {} after the press (ring empty of good frames), {} from bursts; press-to-frame age p50 {:.1} ms (negative: after the press)",
        from(FrameOrigin::Ring),
        from(FrameOrigin::FollowUp),
        from(FrameOrigin::Burst),
        percentile(&mut ages, 50.0),
    );
    type Stage = (&'static str, fn(&StageTimings) -> Option<f64>);
    let stages: [Stage; 9] = [
        ("frames", |t| t.burst_ms),
        ("quality", |t| t.quality_ms),
        ("encoder", |t| t.encoder_ms),
        ("adapter", |t| t.adapter_ms),
        ("search", |t| t.search_ms),
        ("thumbnails", |t| t.thumbnails_ms),
        ("render", |t| t.render_ms),
        ("present", |t| t.present_ms),
        ("total", |t| Some(t.total_ms)),
    ];
    let mut p95_total = f64::NAN;
    for (name, stage) in stages {
        // A stage that did not run (the adapter, without one) is left out.
        let mut values: Vec<f64> = answered.iter().filter_map(|t| stage(t)).collect();
        let p50 = percentile(&mut values, 50.0);
        let p95 = percentile(&mut values, 95.0);
        println!("{name:<12}{p50:>10.1}{p95:>10.1}");
        if name == "total" {
            p95_total = p95;
        }
    }
    if answered.is_empty() {
        return Err("no capture passed the quality gate; nothing measured".into());
    }
    println!("e2e p95 ms ({variant}, {capture}): {p95_total:.1}");
    Ok(())
}
