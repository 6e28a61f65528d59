//! `dermascope-cloud`: the fleet service (`serve`) and the operator's
//! commands. Each subcommand is flags, one library call, and printing
//! (JSON with `--json`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dermascope_cloud::config::ServiceConfig;
use dermascope_cloud::web::session;
use dermascope_cloud::{db, operator, server};
use serde::Serialize;

const DATABASE_URL_ENV: &str = "DERMASCOPE_CLOUD_DATABASE_URL";

#[derive(Parser)]
#[command(
    name = "dermascope-cloud",
    version,
    about = "The Dermascope fleet service"
)]
struct Cli {
    /// PostgreSQL URL (else $DERMASCOPE_CLOUD_DATABASE_URL, else cloud.toml for `serve`).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the schema's migrations.
    Migrate,
    /// Clinics.
    Clinic {
        #[command(subcommand)]
        command: ClinicCommand,
    },
    /// Devices and their credentials.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Encoders the service indexes.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// The shared reference library.
    Reference {
        #[command(subcommand)]
        command: ReferenceCommand,
    },
    /// People who may log in to the fleet status page (/fleet).
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Run the service.
    Serve {
        #[arg(long, default_value = "cloud.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ClinicCommand {
    Add {
        name: String,
        /// Let original photographs leave this clinic's devices.
        #[arg(long)]
        allow_originals: bool,
    },
    List,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Prints the device's credential, once.
    Add {
        /// The clinic's name or id.
        #[arg(long)]
        clinic: String,
        #[arg(long)]
        name: String,
    },
    List {
        #[arg(long)]
        clinic: Option<String>,
    },
    Revoke {
        device_id: String,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    Add {
        model_id: String,
        #[arg(long)]
        dim: usize,
    },
    List,
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Adds an operator and prints a generated password, once.
    Add {
        name: String,
        /// Read the password from the first line of standard input instead
        /// (at least 12 characters), for scripts.
        #[arg(long)]
        password_stdin: bool,
    },
    List,
    /// Removes an operator and ends their open sessions.
    Remove {
        name: String,
    },
}

#[derive(Subcommand)]
enum ReferenceCommand {
    /// One WireCase per line.
    Import { file: PathBuf },
}

fn database_url(cli: &Option<String>) -> Result<String> {
    cli.clone()
        .or_else(|| std::env::var(DATABASE_URL_ENV).ok())
        .filter(|u| !u.is_empty())
        .with_context(|| format!("give --database-url or set {DATABASE_URL_ENV}"))
}

fn print<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", human(value));
    }
    Ok(())
}

async fn pool(cli_url: &Option<String>) -> Result<sqlx::PgPool> {
    let url = database_url(cli_url)?;
    let pool = db::connect(&url, &Default::default()).await?;
    db::migrate(&pool)
        .await
        .context("applying the schema's migrations")?;
    Ok(pool)
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Migrate => {
            let pool = pool(&cli.database_url).await?;
            let version = db::schema_version(&pool).await?;
            print(
                json,
                &serde_json::json!({ "schema_version": version }),
                |_| format!("schema at version {version}"),
            )
        }
        Command::Clinic { command } => {
            let pool = pool(&cli.database_url).await?;
            match command {
                ClinicCommand::Add {
                    name,
                    allow_originals,
                } => {
                    let c = operator::add_clinic(&pool, &name, allow_originals).await?;
                    print(json, &c, |c| {
                        format!(
                            "clinic {} {} (originals {})",
                            c.clinic_id,
                            c.name,
                            if c.allow_originals {
                                "allowed"
                            } else {
                                "stay on devices"
                            }
                        )
                    })
                }
                ClinicCommand::List => {
                    let list = operator::list_clinics(&pool).await?;
                    print(json, &list, |l| {
                        l.iter()
                            .map(|c| {
                                format!(
                                    "{}  {}  originals={}",
                                    c.clinic_id, c.name, c.allow_originals
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                }
            }
        }
        Command::Device { command } => {
            let pool = pool(&cli.database_url).await?;
            match command {
                DeviceCommand::Add { clinic, name } => {
                    let d = operator::add_device(&pool, &clinic, &name).await?;
                    print(json, &d, |d| {
                        format!(
                            "device {} in clinic {}\ncredential (shown once; put it in the device's credential_file, mode 0600):\n{}",
                            d.device_id, d.clinic_id, d.credential
                        )
                    })
                }
                DeviceCommand::List { clinic } => {
                    let list = operator::list_devices(&pool, clinic.as_deref()).await?;
                    print(json, &list, |l| {
                        l.iter()
                            .map(|d| {
                                format!(
                                    "{}  {}  {}  {}",
                                    d.device_id,
                                    d.clinic_name,
                                    d.name,
                                    match &d.revoked_at {
                                        Some(t) => format!("revoked {t}"),
                                        None => format!(
                                            "last seen {}",
                                            d.last_seen_at.as_deref().unwrap_or("never")
                                        ),
                                    }
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                }
                DeviceCommand::Revoke { device_id } => {
                    let r = operator::revoke_device(&pool, &device_id).await?;
                    print(json, &r, |r| {
                        format!(
                            "device {} revoked{} at {}",
                            r.device_id,
                            if r.already { " (already)" } else { "" },
                            r.revoked_at
                        )
                    })
                }
            }
        }
        Command::Model { command } => {
            let pool = pool(&cli.database_url).await?;
            match command {
                ModelCommand::Add { model_id, dim } => {
                    let m = operator::add_model(&pool, &model_id, dim).await?;
                    print(json, &m, |m| {
                        format!("model {} dim {} indexed", m.model_id, m.dim)
                    })
                }
                ModelCommand::List => {
                    let list = operator::list_models(&pool).await?;
                    print(json, &list, |l| {
                        l.iter()
                            .map(|m| {
                                format!(
                                    "{}  dim {}  fleet {}  reference {}",
                                    m.model_id, m.dim, m.fleet_cases, m.reference_cases
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                }
            }
        }
        Command::Reference {
            command: ReferenceCommand::Import { file },
        } => {
            let pool = pool(&cli.database_url).await?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let cases = operator::read_jsonl(&text).with_context(|| file.display().to_string())?;
            let report = operator::import_reference(&pool, &cases).await?;
            print(json, &report, |r| {
                format!(
                    "reference: {} stored, {} already stored, {} superseded",
                    r.stored, r.already_stored, r.superseded
                )
            })
        }
        Command::Operator { command } => {
            let pool = pool(&cli.database_url).await?;
            match command {
                OperatorCommand::Add {
                    name,
                    password_stdin,
                } => {
                    let password = if password_stdin {
                        let text = std::io::read_to_string(std::io::stdin())
                            .context("reading the password from standard input")?;
                        Some(text.lines().next().unwrap_or_default().to_string())
                    } else {
                        None
                    };
                    let o = session::add_operator(
                        &pool,
                        &name,
                        password.as_deref(),
                        &Default::default(),
                    )
                    .await?;
                    print(json, &o, |o| {
                        match &o.generated_password {
                        Some(p) => format!(
                            "operator {} added\npassword (shown once; log in at /fleet/login):\n{p}",
                            o.name
                        ),
                        None => format!("operator {} added with the given password", o.name),
                    }
                    })
                }
                OperatorCommand::List => {
                    let names = session::list_operators(&pool).await?;
                    print(json, &names, |n| n.join("\n"))
                }
                OperatorCommand::Remove { name } => {
                    let removed = session::remove_operator(&pool, &name).await?;
                    print(
                        json,
                        &serde_json::json!({ "name": name, "removed": removed }),
                        |_| {
                            if removed {
                                format!("operator {name} removed; their sessions are closed")
                            } else {
                                format!("no operator {name} (nothing to remove)")
                            }
                        },
                    )
                }
            }
        }
        Command::Serve { config } => {
            let mut service_config = if config.exists() {
                ServiceConfig::load(&config)?
            } else {
                anyhow::bail!("no configuration at {}", config.display());
            };
            // The command line beats the file, the file beats the environment.
            if let Some(url) = cli.database_url.clone() {
                service_config.database_url = url;
            } else if service_config.database_url.is_empty() {
                service_config.database_url = std::env::var(DATABASE_URL_ENV).unwrap_or_default();
            }
            let running = server::start(service_config).await?;
            println!("listening on {}", running.base_url());
            running.wait_for_signal_then_stop().await;
            Ok(())
        }
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
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
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
