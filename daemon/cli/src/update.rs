//! `dermascope update install|status|rollback|recover|keygen|sign`: signed
//! bundles from a USB stick (or a downloaded directory) installed so that
//! a failure at any point leaves the device on a complete version.
//!
//! The installer is `dermascope-update`; what it cannot know (how to load
//! this daemon's encoder and store) is the daemon's own `DeviceCheck` and
//! `CarryCases` (`dermascope_pipeline::updates`), so an install by hand
//! checks and re-embeds exactly as the daemon's automatic one: when a
//! bundle changes the encoder, the local cases are re-embedded into the new
//! encoder's own store before the switch, and the old encoder's store stays
//! as it was for a rollback.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use dermascope_encoder::{EncoderOptions, VariantChoice};
use dermascope_pipeline::updates::{CarryCases, DeviceCheck};
use dermascope_update::{
    keys, sign_bundle, InstallOptions, Installer, SignOptions, Step, TrustedKeys,
};

const DAEMON_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Subcommand, Debug)]
pub enum UpdateCommand {
    /// Verify a bundle (signature, every file's size and sha256), install
    /// it as a new version, switch to it and health-check it; on failure
    /// switch back and mark the bundle failed.
    Install(InstallArgs),
    /// The current and previous versions, the version floor, revoked keys
    /// and failed bundles.
    Status(StatusArgs),
    /// Switch back to the kept previous version.
    Rollback(RootArgs),
    /// Finish an install a kill or power cut interrupted (the daemon's
    /// start does the same).
    Recover(RootArgs),
    /// Make an ed25519 signing key pair for bundles (operators and tests).
    Keygen(KeygenArgs),
    /// Write DIR/bundle.toml listing every file's size and sha256, and sign it.
    Sign(SignArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RootArgs {
    /// Where versions live (versions/<N>, current, state.toml).
    /// Default: $DERMASCOPE_UPDATE_ROOT, else var/update.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Trusted public keys: a directory of <name>.pub files, or one file.
    /// Default: $DERMASCOPE_UPDATE_KEYS, else <root>/keys.
    #[arg(long, value_name = "DIR")]
    keys: Option<PathBuf>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

impl RootArgs {
    fn root(&self) -> PathBuf {
        self.root
            .clone()
            .or_else(|| std::env::var_os("DERMASCOPE_UPDATE_ROOT").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("var/update"))
    }

    fn keys(&self) -> PathBuf {
        self.keys
            .clone()
            .or_else(|| std::env::var_os("DERMASCOPE_UPDATE_KEYS").map(PathBuf::from))
            .unwrap_or_else(|| self.root().join("keys"))
    }

    fn installer(&self) -> anyhow::Result<Installer> {
        let keys = self.keys();
        let trusted = TrustedKeys::load(&keys)
            .with_context(|| format!("loading the trusted keys from {}", keys.display()))?;
        Ok(Installer::new(self.root(), trusted, DAEMON_VERSION))
    }
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// The bundle directory (holding bundle.toml and bundle.toml.sig).
    path: PathBuf,
    #[command(flatten)]
    root: RootArgs,
    /// The case store: each encoder uses this path or, once another
    /// encoder's store is there, `<DIR>.<model id>` beside it. An encoder
    /// change re-embeds the cases into the new encoder's store; the health
    /// check opens and searches it (skipped when there is none).
    /// Default: $DERMASCOPE_STORE, else var/cases.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Verify and say what would change; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Install a bundle recorded as failed (after fixing the cause).
    #[arg(long)]
    retry_failed: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    root: RootArgs,
    /// Also re-hash every file of the current version against its record.
    #[arg(long)]
    verify: bool,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// The secret key file to write (mode 0600; keep it off the devices).
    #[arg(long, value_name = "FILE")]
    secret: PathBuf,
    /// The public key file to write (copy it into every device's keys
    /// directory). Default: the secret's path with the extension .pub.
    #[arg(long, value_name = "FILE")]
    public: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct SignArgs {
    /// The bundle directory: encoder/, adapter/, library/, config/ (any subset).
    dir: PathBuf,
    /// The secret key file (from `update keygen`).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The bundle's version: an integer above every version the devices
    /// installed (unless --downgrade).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    version: u64,
    /// Allow devices to install this below their version floor.
    #[arg(long)]
    downgrade: bool,
    /// The encoder an adapter or library was made for. Default: the
    /// adapter's manifest, else the bundle's own encoder.
    #[arg(long, value_name = "MODEL_ID")]
    encoder_model_id: Option<String>,
    /// The oldest daemon (MAJOR.MINOR.PATCH) that can run the bundle.
    #[arg(long, value_name = "VERSION")]
    min_daemon_version: Option<String>,
    /// A public key (hex) devices must stop trusting; repeatable.
    #[arg(long = "revoke", value_name = "HEX")]
    revoke: Vec<String>,
    #[arg(long)]
    json: bool,
}

pub fn run(command: &UpdateCommand) -> anyhow::Result<ExitCode> {
    match command {
        UpdateCommand::Install(args) => install(args),
        UpdateCommand::Status(args) => status(args),
        UpdateCommand::Rollback(args) => rollback(args),
        UpdateCommand::Recover(args) => recover(args),
        UpdateCommand::Keygen(args) => keygen(args),
        UpdateCommand::Sign(args) => sign(args),
    }
}

fn install(args: &InstallArgs) -> anyhow::Result<ExitCode> {
    let installer = args.root.installer()?;
    if args.dry_run {
        let plan = installer
            .plan(&args.path)
            .with_context(|| format!("checking the bundle {}", args.path.display()))?;
        let m = &plan.bundle.manifest;
        if args.root.json {
            println!(
                "{}",
                serde_json::json!({
                    "dry_run": true,
                    "version": m.version,
                    "from": plan.from,
                    "already_installed": plan.already_installed,
                    "carries": m.carries.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "carried_forward": plan.carried_forward.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "dropped": plan.dropped.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    "encoder_model_id": plan.encoder_model_id,
                    "revokes": plan.newly_revoked,
                    "signed_by": plan.bundle.signed_by,
                })
            );
        } else if plan.already_installed {
            println!(
                "bundle version {} is installed already; nothing to do",
                m.version
            );
        } else {
            println!(
                "bundle version {} verified ({} files, {} bytes, signed by {}); would install it over {}",
                m.version,
                m.files.len(),
                plan.bundle.total_bytes(),
                plan.bundle.signed_by,
                plan.from.map_or("nothing".into(), |v| format!("version {v}"))
            );
            for part in &plan.dropped {
                println!("  would leave out the current {part}: it was made for another encoder");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let store = crate::paths::case_store(args.store.as_ref());
    let options = EncoderOptions {
        variant: VariantChoice::from_name(None),
        ..EncoderOptions::default()
    };
    let json = args.root.json;
    let reembedding = |done: usize, total: usize| {
        if !json {
            eprintln!("update: re-embedded {done}/{total} cases");
        }
    };
    let prepare = CarryCases {
        store_base: store.clone(),
        encoder: options.clone(),
        progress: &reembedding,
        report: RefCell::new(None),
    };
    let defaults = dermascope_pipeline::Config::default();
    let check = DeviceCheck {
        store_base: store,
        factory_encoder: crate::paths::encoder_bundle(None),
        encoder: options,
        screen_size: (defaults.display.width, defaults.display.height),
    };
    let progress = |step: Step| {
        if !json {
            eprintln!("update: {step}");
        }
    };
    let started = Instant::now();
    let report = installer
        .install(
            &args.path,
            &InstallOptions {
                retry_failed: args.retry_failed,
                prepare: &prepare,
                health: &check,
                progress: &progress,
            },
        )
        .with_context(|| format!("installing the bundle {}", args.path.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let reembedded = prepare.report.into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "installed": report.version,
                "from": report.plan.from,
                "already_installed": report.plan.already_installed,
                "dropped": report.plan.dropped.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                "reembed": reembedded.as_ref().map(|r| serde_json::json!({
                    "from_model": r.from_model,
                    "to_model": r.to_model,
                    "cases": r.cases,
                    "reembedded": r.reembedded,
                    "present": r.present,
                    "without_original": r.without_original.len(),
                    "unreadable": r.unreadable.len(),
                    "seconds": r.elapsed_s,
                })),
                "seconds": seconds,
            })
        );
    } else if report.plan.already_installed {
        println!(
            "version {} is installed already; nothing changed",
            report.version
        );
    } else {
        println!(
            "installed version {} (was {}) in {seconds:.1} s",
            report.version,
            report.plan.from.map_or("none".into(), |v| v.to_string())
        );
        if let Some(r) = &reembedded {
            println!(
                "  re-embedded {} cases for encoder {} in {:.1} s ({} were there already); \
                 the store of {} is kept as it was",
                r.reembedded, r.to_model, r.elapsed_s, r.present, r.from_model
            );
            let left = r.without_original.len() + r.unreadable.len();
            if left > 0 {
                println!(
                    "  {left} cases have no readable original photograph: they stay only in the store of {}",
                    r.from_model
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let installer = args.root.installer()?;
    let status = installer.status()?;
    if args.verify {
        if let Some(current) = &status.current {
            dermascope_update::verify_version(&current.dir)
                .context("re-hashing the current version")?;
        }
    }
    let current = status.current.as_ref().map(|c| &c.record);
    if args.root.json {
        println!(
            "{}",
            serde_json::json!({
                "current": current.map(|r| r.version),
                "encoder_model_id": current.and_then(|r| r.encoder_model_id.clone()),
                "parts": current.map(|r| r.parts.iter().map(|p| serde_json::json!({
                    "part": p.part.to_string(), "from_version": p.from_version,
                })).collect::<Vec<_>>()),
                "previous": status.previous,
                "floor": status.floor,
                "revoked_keys": status.revoked_keys,
                "failed": status.failed.iter().map(|f| serde_json::json!({
                    "version": f.version, "reason": f.reason,
                })).collect::<Vec<_>>(),
                "interrupted_install": status.trial_pending,
                "verified": args.verify,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    match current {
        Some(r) => {
            println!(
                "current: version {} (encoder {})",
                r.version,
                r.encoder_model_id.as_deref().unwrap_or("none")
            );
            for p in &r.parts {
                println!("  {} from bundle {}", p.part, p.from_version);
            }
        }
        None => println!("current: none installed"),
    }
    println!(
        "previous: {}",
        status
            .previous
            .map_or("none".into(), |v| format!("version {v}"))
    );
    println!("version floor: {}", status.floor);
    for key in &status.revoked_keys {
        println!("revoked key: {key}");
    }
    for f in &status.failed {
        println!("failed: version {}: {}", f.version, f.reason);
    }
    if let Some(v) = status.trial_pending {
        println!("interrupted: version {v} (run `dermascope update recover`)");
    }
    if args.verify {
        println!("current version re-hashed: every file matches");
    }
    Ok(ExitCode::SUCCESS)
}

fn rollback(args: &RootArgs) -> anyhow::Result<ExitCode> {
    let version = args.installer()?.rollback()?;
    if args.json {
        println!("{}", serde_json::json!({ "current": version }));
    } else {
        println!("rolled back: version {version} is current");
    }
    Ok(ExitCode::SUCCESS)
}

fn recover(args: &RootArgs) -> anyhow::Result<ExitCode> {
    let recovery = args.installer()?.recover()?;
    let text = match recovery {
        None => "nothing to recover".to_owned(),
        Some(dermascope_update::Recovery::Abandoned { version }) => {
            format!("an install of version {version} was interrupted before its switch; the old version stays")
        }
        Some(dermascope_update::Recovery::RolledBack { version, back_to }) => format!(
            "version {version} was interrupted during its health check; switched back to {} and marked it failed",
            back_to.map_or("none".into(), |v| format!("version {v}"))
        ),
    };
    if args.json {
        println!("{}", serde_json::json!({ "recovery": text }));
    } else {
        println!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<ExitCode> {
    let public = args
        .public
        .clone()
        .unwrap_or_else(|| args.secret.with_extension(keys::PUBLIC_KEY_EXT));
    let key = keys::generate(&args.secret, &public)?;
    let id = keys::key_id(&key);
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "secret": args.secret, "public": public, "key": id })
        );
    } else {
        println!("secret key: {} (mode 0600)", args.secret.display());
        println!("public key: {} ({id})", public.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn sign(args: &SignArgs) -> anyhow::Result<ExitCode> {
    let secret = keys::read_secret(&args.key)?;
    let manifest = sign_bundle(
        &args.dir,
        &secret,
        &SignOptions {
            version: args.version,
            downgrade: args.downgrade,
            encoder_model_id: args.encoder_model_id.clone(),
            min_daemon_version: args.min_daemon_version.clone(),
            revoke_keys: args.revoke.clone(),
        },
    )
    .with_context(|| format!("signing the bundle {}", args.dir.display()))?;
    let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
    let carries: Vec<String> = manifest.carries.iter().map(|p| p.to_string()).collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "version": manifest.version,
                "carries": carries,
                "files": manifest.files.len(),
                "bytes": bytes,
                "key": keys::key_id(&secret.verifying_key()),
            })
        );
    } else {
        println!(
            "signed {}: version {}, carries {}, {} files ({bytes} bytes)",
            Path::new(&args.dir).join("bundle.toml").display(),
            manifest.version,
            carries.join(", "),
            manifest.files.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
