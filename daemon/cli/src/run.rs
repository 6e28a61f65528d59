//! `dermascope run`: the handheld daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use dermascope_encoder::{EncoderOptions, VariantChoice};
use dermascope_pipeline::{
    hardware, index_adapter_space, Analyzer, Config, Daemon, KeepOriginals, Supervisor,
};
use dermascope_store::{CaseSource, Residency, ScoreKind};

use crate::ingest::ingest_with_progress;
use crate::{open_store_at, paths};
use dermascope_library::{load_installed, read_labels, IngestOptions};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Configuration file; without it the embedded defaults run (replay
    /// camera, control socket, PNG screens, stores under var/).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Before starting, add the labelled reference cases in DIR
    /// (DIR/labels.csv and DIR/images/) to the library (resumable).
    #[arg(long, value_name = "DIR")]
    cases: Option<PathBuf>,
    /// Labels file for --cases, when it is not DIR/labels.csv.
    #[arg(long, value_name = "CSV", requires = "cases")]
    cases_labels: Option<PathBuf>,
    /// Stop after this many captures (demos and tests).
    #[arg(long)]
    max_captures: Option<u64>,
    /// Only check the configuration and exit.
    #[arg(long)]
    check: bool,
}

/// systemd's notify protocol, when started by systemd (`Type=notify`,
/// `WatchdogSec=`); silent otherwise.
struct Systemd {
    watchdog: bool,
}

impl Supervisor for Systemd {
    fn ready(&self, status: &str) {
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(status),
            ],
        );
    }

    fn alive(&self) {
        if self.watchdog {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }

    fn stopping(&self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
}

pub fn run(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if args.check {
        println!("configuration is valid");
        return Ok(ExitCode::SUCCESS);
    }
    // SIGTERM (systemd stop) and SIGINT set the flag; the loop sees it
    // within one tick and flushes before exiting.
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&shutdown))
            .context("installing the signal handlers")?;
    }

    let bundle = paths::encoder_bundle(config.encoder.bundle.as_ref());
    let options = EncoderOptions {
        variant: match &config.encoder.variant {
            Some(name) => VariantChoice::Named(name.clone()),
            None => VariantChoice::Default,
        },
        threads: config.encoder.threads.unwrap_or(2),
        ..EncoderOptions::default()
    };
    let encoder = dermascope_encoder::Encoder::load(&bundle, &options)
        .with_context(|| format!("loading the encoder from {}", bundle.display()))?;
    tracing::info!(model = encoder.model_id(), variant = %encoder.variant().name, "encoder loaded");

    // The handheld keeps only the int8 copy of the index resident.
    let store = open_store_at(&config.store.dir, &encoder, Residency::Int8)?;
    if let Some(dir) = &args.cases {
        let labels = args
            .cases_labels
            .clone()
            .unwrap_or_else(|| dir.join("labels.csv"));
        let file = read_labels(&labels)?;
        if file.rows.is_empty() {
            bail!("{} has no usable rows", labels.display());
        }
        eprintln!(
            "adding {} reference cases from {} (already stored ones are skipped)",
            file.rows.len(),
            dir.display()
        );
        let summary = ingest_with_progress(
            &store,
            &encoder,
            &dir.join("images"),
            &file.rows,
            IngestOptions {
                source: CaseSource::Reference,
                workers: 2,
                keep_originals: config.store.keep_originals == KeepOriginals::All,
            },
        )?;
        eprintln!(
            "library: {} cases ({} rows refused; `dermascope ingest` lists why)",
            store.len()?,
            file.rejected.len() + summary.rejected.len()
        );
        store.checkpoint()?;
    }
    if store.is_empty()? {
        tracing::warn!("the case library is empty: captures will find no similar cases");
    }

    let adapter_dir = &config.adapter.dir;
    let adapter = if adapter_dir
        .join(dermascope_adapter::MANIFEST_FILE)
        .is_file()
    {
        let adapter = load_installed(adapter_dir, &encoder)?;
        let computed = index_adapter_space(&store, &adapter)?;
        tracing::info!(
            adapter = adapter.adapter_id(),
            computed,
            "adapter installed; searching its space"
        );
        Some(adapter)
    } else {
        None
    };

    // The display first: every later problem needs a screen to show on.
    let drivers: Arc<dyn hardware::Drivers> = Arc::new(dermascope_device_linux::LinuxDrivers);
    let display = hardware::open_display(&config, &drivers)?;
    let trigger = hardware::open_trigger(&config, &drivers)?;
    let light = hardware::open_light(&config, &drivers)?;
    let feed = hardware::start_camera(&config, &drivers)?;
    let analyzer = Analyzer {
        encoder,
        adapter,
        store: Arc::new(store),
        thresholds: config.quality,
        top_k: config.pipeline.top_k,
        raw_score: ScoreKind::Int8,
    };
    let daemon = Daemon {
        analyzer: Arc::new(analyzer),
        feed,
        trigger,
        light,
        display,
        burst: config.pipeline.burst as usize,
        camera_timeout: std::time::Duration::from_millis(config.pipeline.camera_timeout_ms),
        live_view: std::time::Duration::from_millis(config.pipeline.live_view_ms),
        cases: dermascope_pipeline::CaseSettings {
            device_id: Some(dermascope_pipeline::device_id(&config)?),
            keep_originals: config.store.keep_originals != KeepOriginals::None,
        },
    };
    let supervisor = Systemd {
        watchdog: std::env::var_os("WATCHDOG_USEC").is_some(),
    };
    let summary = daemon.run(&shutdown, &supervisor, args.max_captures)?;
    eprintln!(
        "stopped: {} captures ({} refused by the quality gate or camera), {} confirmed",
        summary.captures, summary.rejected, summary.confirmed
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct PressArgs {
    /// `capture`, `confirm [LABEL]` or `shutdown`.
    #[arg(required = true, num_args = 1..=2, value_name = "COMMAND")]
    command: Vec<String>,
    /// The daemon's control socket (`[trigger] socket`).
    #[arg(long, default_value = "var/run/dermascope.sock")]
    socket: PathBuf,
}

/// Presses the host stand-in for the scope's buttons: one line to the
/// daemon's control socket, its one-line reply printed.
pub fn press(args: &PressArgs) -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(&args.socket).with_context(|| {
        format!(
            "connecting to {}: is `dermascope run` running with [trigger] input = \"socket\"?",
            args.socket.display()
        )
    })?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    writeln!(stream, "{}", args.command.join(" "))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("reading the daemon's reply")?;
    let reply = reply.trim();
    println!("{reply}");
    Ok(if reply == "ok" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
