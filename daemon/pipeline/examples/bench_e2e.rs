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
//!
//! Issue 17's methods, for their cost per capture: `--cautions on` (the
//! default) runs the adapter as `dermascope eval` calibrated it, so the
//! review flag and the "no close match" rule run when its manifest has
//! them; `--cautions off` runs a copy of the adapter with `[calibration]`
//! removed. The adapter is always run from a copy in a temporary directory,
//! never edited where it was found. `DERMASCOPE_PREPROCESS` reaches the
//! encoder the daemon loads (and enters its model id): the library is then
//! the evaluation cache's cases relabelled for that model id, and the
//! adapter's copy names it too; the matches are wrong for that encoder but
//! cost what they would, which is all this measures. `--eval-cache DIR`
//! takes the cases and the adapter from another `dermascope eval --store`;
//! `--timings FILE` appends each answered capture's stage times to FILE.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dermascope_adapter::{Adapter, MANIFEST_FILE};
use dermascope_device::{Display, InMemoryDisplay, NoHardware, ScriptedTrigger, TriggerEvent};
use dermascope_encoder::{Encoder, EncoderOptions, VariantChoice};
use dermascope_pipeline::{
    CaptureKind, Config, Daemon, FrameOrigin, NoSupervisor, StageTimings, StartOptions,
};
use dermascope_store::{
    Case, CaseId, CaseMetadata, CaseSource, CaseStore, Diagnosis, OpenOptions, Residency,
    StoreIdentity,
};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

struct Args {
    bundle: PathBuf,
    variant: Option<String>,
    captures: u64,
    cases: usize,
    threads: usize,
    replay: Option<PathBuf>,
    capture: CaptureKind,
    /// Run the adapter's calibrated cautions (review flag, no-match rule).
    cautions: bool,
    /// Where the real cases and the adapter come from; default
    /// `var/eval/<the bundle's model id>`.
    eval_cache: Option<PathBuf>,
    /// The benchmark's own library; default `var/bench/e2e/<model id>`.
    store: Option<PathBuf>,
    /// Appends one line per answered capture, `encoder search thumbnails
    /// total` in ms, so runs interleaved with others can be pooled.
    timings: Option<PathBuf>,
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
        cautions: true,
        eval_cache: None,
        store: None,
        timings: None,
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
            "--cautions" => {
                args.cautions = match value()?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => return Err(format!("--cautions {other}: on or off")),
                }
            }
            "--eval-cache" => args.eval_cache = Some(PathBuf::from(value()?)),
            "--store" => args.store = Some(PathBuf::from(value()?)),
            "--timings" => args.timings = Some(PathBuf::from(value()?)),
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

/// Fills `store` up to `wanted` cases; returns where they came from. The
/// evaluation cache holds embeddings of the bundle's own model id; with a
/// preprocessing override they are relabelled for the encoder's.
fn fill_library(
    store: &CaseStore,
    encoder: &Encoder,
    eval_cache: &Path,
    wanted: usize,
) -> Result<String, String> {
    let have = store.len().map_err(|e| e.to_string())?;
    if have >= wanted {
        return Ok(format!("{have} cases already in the benchmark store"));
    }
    let bundle_model = encoder.manifest().model_id.clone();
    let relabel = bundle_model != encoder.model_id();
    let identity = StoreIdentity {
        model_id: bundle_model.clone(),
        embedding_dim: encoder.dim(),
    };
    if eval_cache.is_dir() {
        if let Ok(real) = CaseStore::open_with(
            eval_cache,
            identity,
            OpenOptions {
                residency: Residency::Int8,
                no_cache_on_close: true,
            },
        ) {
            if real.len().unwrap_or(0) >= wanted {
                let mut batch = Vec::new();
                for case in real.cases().take(wanted) {
                    let mut case = case.map_err(|e| e.to_string())?;
                    case.model_id = encoder.model_id().to_string();
                    batch.push(case);
                    if batch.len() == 500 {
                        store.insert_batch(&batch).map_err(|e| e.to_string())?;
                        batch.clear();
                    }
                }
                store.insert_batch(&batch).map_err(|e| e.to_string())?;
                let note = if relabel {
                    format!(
                        " (embedded as {bundle_model}, relabelled for {}: cost only)",
                        encoder.model_id()
                    )
                } else {
                    String::new()
                };
                return Ok(format!(
                    "{wanted} real dermoscopy cases copied from {}{note}",
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

/// Copies the adapter in `from` into `to` for an encoder of
/// `encoder_model_id` (another one when a preprocessing override is set),
/// without its `[calibration]` unless `cautions`; returns whether the
/// original has one. The original is only read.
fn copy_adapter(
    from: &Path,
    to: &Path,
    encoder_model_id: &str,
    cautions: bool,
) -> Result<bool, String> {
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut manifest: toml::Table = read(from.join(MANIFEST_FILE))?
        .parse()
        .map_err(|e| format!("{}: {e}", from.join(MANIFEST_FILE).display()))?;
    manifest.insert(
        "encoder_model_id".into(),
        toml::Value::String(encoder_model_id.into()),
    );
    let calibrated = manifest.contains_key("calibration");
    if !cautions {
        manifest.remove("calibration");
    }
    let file = manifest
        .get("file")
        .and_then(toml::Value::as_str)
        .ok_or(format!("{}: no adapter file named", from.display()))?
        .to_owned();
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    std::fs::copy(from.join(&file), to.join(&file))
        .map_err(|e| format!("{}: {e}", from.join(&file).display()))?;
    let text = toml::to_string(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(to.join(MANIFEST_FILE), text).map_err(|e| format!("{}: {e}", to.display()))?;
    Ok(calibrated)
}

/// Which of the adapter's calibrated cautions the pipeline applies to
/// every capture, in the header's words.
fn applied_cautions(adapter: Option<&Adapter>, cautions: bool) -> String {
    let Some(adapter) = adapter else {
        return "none (no adapter ran)".into();
    };
    if !cautions {
        return "none (the adapter's copy has its [calibration] removed)".into();
    }
    let Some(calibration) = adapter.manifest().calibration.as_ref() else {
        return "none (the adapter's manifest has no [calibration])".into();
    };
    let review = match &calibration.melanoma {
        Some(point) => format!(
            "review flag APPLIED (combined {} score >= {:.4}, {} neighbours)",
            point.class,
            point.threshold,
            dermascope_library::evaluation::COMBINED_K
        ),
        None => "review flag not applied".into(),
    };
    let no_match = match &calibration.no_match {
        Some(rule) => {
            let raw = rule
                .min_top1_raw_similarity
                .map_or(String::new(), |raw| format!(", raw top-1 >= {raw:.4}"));
            format!(
                "no-match rule APPLIED (adapter top-1 >= {:.4}{raw})",
                rule.min_top1_similarity
            )
        }
        None => "no-match rule not applied".into(),
    };
    format!("{review}, {no_match}")
}

/// How often each caution fired, counted from the pipeline's own log
/// lines (it logs that one fired, never the score).
#[derive(Default)]
struct Fired {
    review: AtomicU64,
    no_match: AtomicU64,
}

struct CautionCounter(Arc<Fired>);

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for CautionCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        if message.0.contains("flagged for review") {
            self.0.review.fetch_add(1, Ordering::Relaxed);
        } else if message.0.starts_with("no close match") {
            self.0.no_match.fetch_add(1, Ordering::Relaxed);
        }
    }
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
    let fired = Arc::new(Fired::default());
    // Warnings (an adapter refused, a frame skipped) on stderr; the
    // cautions' info lines only counted.
    tracing_subscriber::registry()
        .with(CautionCounter(Arc::clone(&fired)))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(EnvFilter::new("warn")),
        )
        .init();
    // The library is filled with the benchmark's own encoder instance, then
    // closed: the daemon below is assembled exactly as `dermascope run` does.
    let options = EncoderOptions {
        variant: VariantChoice::from_name(args.variant.as_deref()),
        // On an x86_64 CPU without VNNI int8 is slow: measured, not refused.
        allow_slow_int8: true,
        threads: args.threads,
        ..EncoderOptions::default()
    };
    let encoder = Encoder::load(&args.bundle, &options).map_err(|e| e.to_string())?;
    let variant = encoder.variant().name.clone();
    let preprocess = encoder.preprocess_spec().describe();
    let store_dir = args
        .store
        .clone()
        .unwrap_or_else(|| PathBuf::from("var/bench/e2e").join(encoder.model_id()));
    let eval_cache = args
        .eval_cache
        .clone()
        .unwrap_or_else(|| PathBuf::from("var/eval").join(&encoder.manifest().model_id));
    let found_adapter = eval_cache.join("adapter");
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
        fill_library(&store, &encoder, &eval_cache, args.cases)?
    };
    // The daemon runs a copy: the cautions may be removed from it, and a
    // preprocessing override needs its model id in it.
    let scratch_adapter = tempfile::tempdir().map_err(|e| e.to_string())?;
    let adapter_dir = scratch_adapter.path().join("adapter");
    if found_adapter.join(MANIFEST_FILE).is_file() {
        let calibrated = copy_adapter(
            &found_adapter,
            &adapter_dir,
            encoder.model_id(),
            args.cautions,
        )?;
        if !calibrated {
            println!(
                "the adapter in {} has NO [calibration] (written by `dermascope eval` or `dermascope adapter train`): the review flag and the no-match rule cannot run",
                found_adapter.display()
            );
        }
    } else {
        println!(
            "no adapter in {} (run `dermascope eval` first, or pass --eval-cache): adapter stage and cautions not measured",
            found_adapter.display()
        );
    }
    drop(encoder);
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
    let (mut daemon, report) = Daemon::from_config(&config, Arc::new(NoHardware), &start, |_| {})
        .map_err(|e| e.to_string())?;
    if let Some(problem) = &report.adapter_problem {
        println!("the adapter was refused: {problem}");
    }
    // The button is scripted and the screen drawn into memory, so the
    // figures are the pipeline's, not a PNG encoder's or a socket's.
    let mut events: Vec<TriggerEvent> = (0..args.captures).map(|_| TriggerEvent::Capture).collect();
    events.push(TriggerEvent::Shutdown);
    daemon.trigger = Box::new(ScriptedTrigger::new(events));
    daemon.display = Box::new(InMemoryDisplay::new(320, 240)) as Box<dyn Display>;
    let adapter = daemon.analyzer.adapter.current();
    let adapter_id = adapter
        .as_ref()
        .map_or("none".to_string(), |a| a.adapter_id().to_string());
    let cautions = applied_cautions(adapter.as_deref(), args.cautions);
    drop(adapter);
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
        "e2e: {} captures ({} refused by the quality gate) in {:.1} s; capture {capture}; encoder variant {variant}, {} threads, preprocess {preprocess}; adapter: {adapter_id}; cautions {}: {cautions}; fired: review {} and no close match {} of {} answered; library: {provenance}; replay: {}",
        summary.captures,
        summary.rejected,
        started.elapsed().as_secs_f64(),
        args.threads,
        if args.cautions { "on" } else { "off" },
        fired.review.load(Ordering::Relaxed),
        fired.no_match.load(Ordering::Relaxed),
        answered.len(),
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
    if let Some(path) = &args.timings {
        let na = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let lines: String = answered
            .iter()
            .map(|t| {
                format!(
                    "{} {} {} {:.3}\n",
                    na(t.encoder_ms),
                    na(t.search_ms),
                    na(t.thumbnails_ms),
                    t.total_ms
                )
            })
            .collect();
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut file| file.write_all(lines.as_bytes()))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("e2e p95 ms ({variant}, {capture}): {p95_total:.1}");
    Ok(())
}
