//! `dermascope-fleet`: the fleet operator's update tool. Signing keys,
//! signed bundle archives, publishing them to the fleet service's
//! database, and staged rollouts to a clinic's devices.
//!
//! Every command takes `--dry-run` (do the checks, say what would happen,
//! write nothing) and `--json`, and is safe to repeat: the same archive is
//! published once, an identical active rollout is returned as it is, a
//! paused rollout paused again says so.

mod local;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dermascope_cloud::db;
use dermascope_cloud::fleet::{self, Changed, Mode, NewRollout, RolloutStatus, StageSpec};
use dermascope_update::SignOptions;
use serde::Serialize;

const DATABASE_URL_ENV: &str = "DERMASCOPE_CLOUD_DATABASE_URL";

#[derive(Parser)]
#[command(
    name = "dermascope-fleet",
    version,
    about = "Sign, publish and roll out Dermascope update bundles",
    long_about = "Sign, publish and roll out Dermascope update bundles.\n\n\
        A typical release: `key create` once; `bundle build DIR --key K --version N --out B.tar`; \
        `bundle publish B.tar --keys KEYS_DIR`; `rollout create --bundle N --clinic C --stage 10% \
        --stage rest`; `rollout status ID --watch`. Devices verify every bundle themselves against \
        their own trusted keys; the service only stores and serves it."
)]
struct Cli {
    /// PostgreSQL URL of the fleet service (else $DERMASCOPE_CLOUD_DATABASE_URL).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Check everything and say what would happen, but write nothing.
    #[arg(long, global = true)]
    dry_run: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Signing keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Signed bundle archives.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Staged rollouts of a published bundle to a clinic's devices.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make an ed25519 signing key: the secret (mode 0600) and its public
    /// key, which goes onto every device's trusted keys. An existing pair
    /// is reported, never overwritten.
    Create {
        /// Where the secret key goes.
        #[arg(long)]
        secret: PathBuf,
        /// Where the public key goes (default: the secret's path with `.pub`).
        #[arg(long)]
        public: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Sign a bundle directory (encoder/ adapter/ library/ config/) and pack
    /// it into one archive. The directory itself is not changed.
    Build {
        /// The bundle directory.
        dir: PathBuf,
        /// The secret signing key.
        #[arg(long)]
        key: PathBuf,
        /// The bundle's version: an integer above every version the
        /// devices installed (unless --downgrade).
        #[arg(long)]
        version: u64,
        /// Sign explicit permission to install below a device's floor.
        #[arg(long)]
        downgrade: bool,
        /// The encoder an adapter or library was made for (default: read
        /// from adapter/manifest.toml or encoder/manifest.toml).
        #[arg(long)]
        encoder_model_id: Option<String>,
        /// The oldest daemon (MAJOR.MINOR.PATCH) that can run it.
        #[arg(long)]
        min_daemon_version: Option<String>,
        /// A public key (hex) devices must stop trusting; repeatable.
        #[arg(long = "revoke-key")]
        revoke_keys: Vec<String>,
        /// The archive to write (FILE.tar).
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify an archive against your trusted keys, then store it in the
    /// fleet service. The same archive twice is one bundle.
    Publish {
        /// The archive `bundle build` wrote.
        archive: PathBuf,
        /// A directory of trusted public keys (`*.pub`), or one key file.
        #[arg(long)]
        keys: PathBuf,
    },
    /// Published bundles, newest version first.
    List,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Roll a published bundle out to one clinic's devices in stages.
    Create {
        /// The bundle's version (when only one bundle has it) or its id.
        #[arg(long)]
        bundle: String,
        /// The clinic's name or id.
        #[arg(long)]
        clinic: String,
        /// A stage, in order; repeat: `10%` (a share of the clinic's
        /// devices), `devices:ID,ID` (those devices), `rest` (the others).
        #[arg(long = "stage", required = true, value_parser = parse_stage)]
        stages: Vec<StageSpec>,
        /// Share of a stage's devices that must install it before the next
        /// stage starts (0.9 = 90%).
        #[arg(long, default_value_t = 0.9)]
        success: f32,
        /// Share of a stage's devices failing or refusing it that pauses
        /// the rollout (0.2 = 20%).
        #[arg(long, default_value_t = 0.2)]
        error: f32,
    },
    /// One rollout's stages and devices.
    Status {
        rollout_id: String,
        /// Print again whenever it changes, until it is done or rolled back.
        #[arg(long)]
        watch: bool,
        /// Seconds between looks with --watch.
        #[arg(long, default_value_t = 2)]
        interval_s: u64,
    },
    /// Every rollout, newest first.
    List {
        /// Only this clinic's (name or id).
        #[arg(long)]
        clinic: Option<String>,
    },
    /// Stop offering the bundle (devices that have it keep it).
    Pause { rollout_id: String },
    /// Offer it again after a pause.
    Resume { rollout_id: String },
    /// Offer every device that installed it the way back to its previous version.
    Rollback { rollout_id: String },
}

fn parse_stage(text: &str) -> Result<StageSpec, String> {
    text.parse()
}

fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", human(value));
    }
    Ok(())
}

async fn pool(cli_url: &Option<String>, mode: Mode) -> Result<sqlx::PgPool> {
    let url = cli_url
        .clone()
        .or_else(|| std::env::var(DATABASE_URL_ENV).ok())
        .filter(|u| !u.is_empty())
        .with_context(|| format!("give --database-url or set {DATABASE_URL_ENV}"))?;
    let pool = db::connect(&url, &Default::default()).await?;
    match mode {
        Mode::Apply => db::migrate(&pool)
            .await
            .context("applying the schema's migrations")?,
        // A dry run does not even migrate; it needs the schema as it is.
        Mode::DryRun => {
            let at = db::schema_version(&pool)
                .await
                .context("reading the schema version")?;
            if at < db::latest_migration() {
                anyhow::bail!(
                    "the database's schema is at version {at}, this tool needs {}; \
                     run once without --dry-run (or `dermascope-cloud migrate`)",
                    db::latest_migration()
                );
            }
        }
    }
    Ok(pool)
}

fn dry(dry_run: bool) -> &'static str {
    if dry_run {
        "dry run, nothing written: "
    } else {
        ""
    }
}

fn stage_line(s: &fleet::StageStatus) -> String {
    let when = match (&s.started_at, &s.finished_at) {
        (_, Some(f)) => format!("finished {f}"),
        (Some(t), None) => format!("started {t}"),
        (None, None) => "not started".into(),
    };
    format!(
        "  stage {} ({}): {} assigned, {} installed, {} failed, {} refused, {} offered{}; {when}",
        s.stage,
        s.spec,
        s.assigned,
        s.installed,
        s.failed,
        s.refused,
        s.offered,
        if s.rollback_offered + s.rolled_back > 0 {
            format!(
                ", {} rolled back, {} to roll back",
                s.rolled_back, s.rollback_offered
            )
        } else {
            String::new()
        },
    )
}

fn rollout_text(r: &RolloutStatus) -> String {
    let mut lines = vec![format!(
        "rollout {} of version {} to {}: {}{} (at stage {} of stages 0-{}; a stage ends at {:.0}% installed, the rollout pauses at {:.0}% failed or refused)",
        r.rollout_id,
        r.version,
        r.clinic_name,
        r.state.replace('_', " "),
        r.paused_reason
            .as_ref()
            .map(|p| format!(" — {p}"))
            .unwrap_or_default(),
        r.current_stage,
        r.stages.len().saturating_sub(1),
        r.success_threshold * 100.0,
        r.error_threshold * 100.0,
    )];
    lines.extend(r.stages.iter().map(stage_line));
    for d in &r.devices {
        lines.push(format!(
            "    {}  {}  stage {}  {}{}",
            d.device_id,
            d.name,
            d.stage,
            d.state.replace('_', " "),
            d.detail
                .as_ref()
                .map(|t| format!(" ({t})"))
                .unwrap_or_default()
        ));
    }
    lines.join("\n")
}

fn changed_text(c: &Changed) -> String {
    format!(
        "{}{}\n{}",
        dry(c.dry_run),
        c.message,
        rollout_text(&c.rollout)
    )
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    let mode = Mode::dry_run(cli.dry_run);
    match cli.command {
        Command::Key {
            command: KeyCommand::Create { secret, public },
        } => {
            let public = public.unwrap_or_else(|| secret.with_extension("pub"));
            let k = local::create_key(&secret, &public, cli.dry_run)?;
            print(json, &k, |k| {
                if k.already {
                    format!(
                        "{}key {} exists already at {} and {}; nothing written",
                        dry(k.dry_run),
                        k.key_id,
                        k.secret.display(),
                        k.public.display()
                    )
                } else if k.dry_run {
                    format!(
                        "{}would write a new secret key to {} (mode 0600) and its public key to {}",
                        dry(true),
                        k.secret.display(),
                        k.public.display()
                    )
                } else {
                    format!(
                        "key {} created: secret {} (keep it off the devices), public {} (copy it into every device's trusted keys)",
                        k.key_id,
                        k.secret.display(),
                        k.public.display()
                    )
                }
            })
        }
        Command::Bundle { command } => match command {
            BundleCommand::Build {
                dir,
                key,
                version,
                downgrade,
                encoder_model_id,
                min_daemon_version,
                revoke_keys,
                out,
            } => {
                let options = SignOptions {
                    version,
                    downgrade,
                    encoder_model_id,
                    min_daemon_version,
                    revoke_keys,
                };
                let b = local::build(&dir, &key, &options, &out, cli.dry_run)?;
                print(json, &b, |b| {
                    let what = if b.already {
                        format!(
                            "{} holds this archive already; left as it was",
                            b.out.display()
                        )
                    } else if b.dry_run {
                        format!("would write {}", b.out.display())
                    } else if b.replaced {
                        format!("{} replaced", b.out.display())
                    } else {
                        format!("{} written", b.out.display())
                    };
                    format!(
                        "{}bundle version {} carrying {} ({} files) signed by {}\narchive sha256 {} ({} bytes): {what}",
                        dry(b.dry_run),
                        b.version,
                        b.carries.join(", "),
                        b.files,
                        b.signed_by,
                        b.archive_sha256,
                        b.archive_size,
                    )
                })
            }
            BundleCommand::Publish { archive, keys } => {
                // Verified before anything connects anywhere.
                let checked = local::check_archive(&archive, &keys)?;
                let pool = pool(&cli.database_url, mode).await?;
                let p = fleet::publish_bundle(&pool, &checked.facts, &archive, mode).await?;
                print(json, &p, |p| {
                    let b = &p.bundle;
                    let what = if p.already {
                        format!(
                            "published already as bundle {}; nothing written",
                            b.bundle_id
                        )
                    } else if p.dry_run {
                        "would be published".to_string()
                    } else {
                        format!("published as bundle {}", b.bundle_id)
                    };
                    format!(
                        "{}{} verified ({} files, version {}, carries {}, signed by {}): {what}\narchive sha256 {} ({} bytes)",
                        dry(p.dry_run),
                        archive.display(),
                        checked.files,
                        b.version,
                        b.carries.join(", "),
                        b.signed_by,
                        b.archive_sha256,
                        b.archive_size
                    )
                })
            }
            BundleCommand::List => {
                let pool = pool(&cli.database_url, mode).await?;
                let list = fleet::list_bundles(&pool).await?;
                print(json, &list, |l| {
                    if l.is_empty() {
                        return "no bundle published yet".into();
                    }
                    l.iter()
                        .map(|b| {
                            format!(
                                "{}  version {}{}  {}  {} bytes  sha256 {}  published {}",
                                b.bundle_id,
                                b.version,
                                if b.downgrade { " (downgrade)" } else { "" },
                                b.carries.join("+"),
                                b.archive_size,
                                b.archive_sha256,
                                b.published_at
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            }
        },
        Command::Rollout { command } => {
            let pool = pool(&cli.database_url, mode).await?;
            match command {
                RolloutCommand::Create {
                    bundle,
                    clinic,
                    stages,
                    success,
                    error,
                } => {
                    let new = NewRollout {
                        bundle,
                        clinic,
                        stages,
                        success_threshold: success,
                        error_threshold: error,
                    };
                    let c = fleet::create_rollout(&pool, &new, mode).await?;
                    print(json, &c, changed_text)
                }
                RolloutCommand::Status {
                    rollout_id,
                    watch,
                    interval_s,
                } => {
                    let mut shown: Option<String> = None;
                    loop {
                        let r = fleet::rollout_status(&pool, &rollout_id).await?;
                        let text = serde_json::to_string(&r)?;
                        if shown.as_deref() != Some(text.as_str()) {
                            if json && watch {
                                // One object per line, for scripts that follow it.
                                println!("{text}");
                            } else {
                                print(json, &r, rollout_text)?;
                            }
                            shown = Some(text);
                        }
                        if !watch || r.finished() {
                            return Ok(());
                        }
                        tokio::time::sleep(Duration::from_secs(interval_s.max(1))).await;
                    }
                }
                RolloutCommand::List { clinic } => {
                    let list = fleet::list_rollouts(&pool, clinic.as_deref()).await?;
                    print(json, &list, |l| {
                        if l.is_empty() {
                            return "no rollout yet".into();
                        }
                        l.iter().map(rollout_text).collect::<Vec<_>>().join("\n")
                    })
                }
                RolloutCommand::Pause { rollout_id } => {
                    let c = fleet::pause_rollout(&pool, &rollout_id, mode).await?;
                    print(json, &c, changed_text)
                }
                RolloutCommand::Resume { rollout_id } => {
                    let c = fleet::resume_rollout(&pool, &rollout_id, mode).await?;
                    print(json, &c, changed_text)
                }
                RolloutCommand::Rollback { rollout_id } => {
                    let c = fleet::rollback_rollout(&pool, &rollout_id, mode).await?;
                    print(json, &c, changed_text)
                }
            }
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
