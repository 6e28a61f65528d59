//! `dermascope run`: the handheld daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use dermascope_pipeline::{
    boot, hardware, start_from_installed, Config, Daemon, DeviceUpdates, ReferenceCases,
    StartOptions, Supervisor,
};

use crate::ingest::IngestBar;
use crate::paths;

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
    let base = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    // The installed version's configuration, encoder, adapter and store,
    // after finishing (or undoing) an install a kill interrupted.
    let (config, started) = start_from_installed(base.clone());
    if let Some(recovery) = &started.recovery {
        eprintln!("update: {recovery}");
    }
    if let Some(problem) = &started.problem {
        eprintln!("update: the installed version is not used: {problem}");
    }
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

    let options = StartOptions {
        bundle: paths::encoder_bundle(config.encoder.bundle.as_ref()),
        reference_cases: args.cases.as_ref().map(|dir| ReferenceCases {
            images: dir.join("images"),
            labels: args
                .cases_labels
                .clone()
                .unwrap_or_else(|| dir.join("labels.csv")),
        }),
        library_snapshot: started.library.clone(),
    };
    // On an A/B image, before the store opens: the check this start's
    // parts must pass before the booted slot is marked good.
    let boot_health = boot::check_before_start(&config, &options.bundle);
    let drivers: Arc<dyn hardware::Drivers> = Arc::new(dermascope_device_linux::LinuxDrivers);
    let mut bar = IngestBar::new();
    let (mut daemon, report) = Daemon::from_config(&config, drivers, &options, |p| {
        let _ = bar.update(p);
    })?;
    bar.finish();
    match DeviceUpdates::new(
        &base,
        &config,
        &paths::encoder_bundle(base.encoder.bundle.as_ref()),
    ) {
        Ok(updates) => {
            if let Some(updates) = &updates {
                updates.tidy();
                // The outcome of the install this start follows, for the
                // rollout that asked for it.
                if let (Some(kept), Some(fleet)) = (updates.take_kept_result(), &daemon.fleet) {
                    fleet.report_update(kept);
                }
            }
            daemon.updates = updates;
        }
        Err(e) => {
            // Capture goes on; only installing needs the keys.
            tracing::warn!(error = %e, "updates cannot be installed: the trusted keys did not load");
            eprintln!("updates cannot be installed: {e}");
            daemon.notice = Some(append_notice(
                daemon.notice.take(),
                "Updates are off: the trusted keys did not load (see the log).",
            ));
        }
    }
    if let boot::BootHealth::Failed(problem) = &boot_health {
        eprintln!("boot: the health check failed, the system slot stays unconfirmed: {problem}");
    }
    if let Some(words) = boot::mark_if_healthy(&boot_health, boot::boot_slot(&config).as_mut()) {
        daemon.notice = Some(append_notice(daemon.notice.take(), &words));
    }
    if let Some(problem) = started.problem.as_ref().or(started.recovery.as_ref()) {
        tracing::info!(%problem, "update notice shown on the ready screen");
        let words = if started.problem.is_some() {
            "The installed update is not used (see the log)."
        } else {
            "An interrupted update was undone; the device is unchanged."
        };
        daemon.notice = Some(append_notice(daemon.notice.take(), words));
    }
    if options.reference_cases.is_some() {
        eprintln!(
            "library: {} cases ({} added, {} rows refused; `dermascope ingest` lists why)",
            report.library_cases, report.references_added, report.references_refused
        );
    }
    if let Some(problem) = &report.adapter_problem {
        eprintln!("running without the adapter: {problem}");
    }
    let supervisor = Systemd {
        watchdog: std::env::var_os("WATCHDOG_USEC").is_some(),
    };
    let summary = daemon.run(&shutdown, &supervisor, args.max_captures)?;
    eprintln!(
        "stopped: {} captures ({} refused by the quality gate or camera), {} confirmed, {} saved",
        summary.captures, summary.rejected, summary.confirmed, summary.saved
    );
    if let Some(why) = summary.restart {
        eprintln!("update: {why}; starting again");
        return Err(start_again());
    }
    Ok(ExitCode::SUCCESS)
}

fn append_notice(earlier: Option<String>, notice: &str) -> String {
    match earlier {
        Some(earlier) => format!("{earlier} {notice}"),
        None => notice.to_owned(),
    }
}

/// Replaces this process with a fresh start of the same binary and
/// arguments, so the version now current is loaded the one way every
/// start loads it (systemd sees the same process). Returns only if the
/// exec failed.
fn start_again() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    // /proc/self/exe still runs this binary when its file was replaced
    // since it started (a package upgrade), where its path would not.
    let program = if std::path::Path::new("/proc/self/exe").exists() {
        std::path::PathBuf::from("/proc/self/exe")
    } else {
        match std::env::current_exe() {
            Ok(path) => path,
            Err(e) => return anyhow::anyhow!("cannot find this binary to start again: {e}"),
        }
    };
    let _argv0 = args.next();
    let error = std::process::Command::new(program).args(args).exec();
    anyhow::anyhow!("starting again after the update failed: {error}; start the daemon again")
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
