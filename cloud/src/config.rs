//! `cloud.toml`, the service's configuration.
//!
//! ```toml
//! listen = "0.0.0.0:8443"
//! database_url_env = "DERMASCOPE_CLOUD_DATABASE_URL"   # or database_url = "postgres://..."
//! [tls]
//! cert = "/etc/dermascope-cloud/cert.pem"   # chain, PEM
//! key = "/etc/dermascope-cloud/key.pem"     # PKCS#8, SEC1 or PKCS#1, PEM
//! [vlm]                                      # optional: see rag::VlmConfig
//! [database]
//! max_connections = 16
//! acquire_timeout_ms = 5000
//! statement_timeout_ms = 30000
//! ```
//!
//! The database URL may hold a password, so a file can name the environment
//! variable that holds it instead (`database_url_env`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::CloudError;
use crate::rag;

/// PEM files for HTTPS.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Connection-pool settings.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    pub max_connections: u32,
    /// How long a request waits for a free connection before it is
    /// answered 503 `unavailable`.
    pub acquire_timeout_ms: u64,
    /// Server-side cap on one statement, so a stuck query frees its
    /// connection.
    pub statement_timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            max_connections: 16,
            acquire_timeout_ms: 5_000,
            statement_timeout_ms: 30_000,
        }
    }
}

/// How device secrets are hashed when `device add` makes them. Verification
/// always uses the parameters stored in the hash itself.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashSettings {
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
}

impl Default for HashSettings {
    fn default() -> Self {
        HashSettings {
            argon2_memory_kib: argon2::Params::DEFAULT_M_COST,
            argon2_iterations: argon2::Params::DEFAULT_T_COST,
            argon2_parallelism: argon2::Params::DEFAULT_P_COST,
        }
    }
}

/// Everything `start` needs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Resolved from `database_url_env` by [`ServiceConfig::load`] when empty.
    #[serde(default)]
    pub database_url: String,
    #[serde(default)]
    pub database_url_env: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub vlm: Option<rag::VlmConfig>,
    #[serde(default)]
    pub database: DatabaseSettings,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}

impl Default for ServiceConfig {
    /// Loopback on a free port, plain HTTP, no model: what tests start.
    fn default() -> Self {
        ServiceConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: String::new(),
            database_url_env: None,
            tls: None,
            vlm: None,
            database: DatabaseSettings::default(),
        }
    }
}

impl ServiceConfig {
    /// For tests and tools: loopback, a free port, this database.
    pub fn for_database(url: impl Into<String>) -> ServiceConfig {
        ServiceConfig {
            database_url: url.into(),
            ..ServiceConfig::default()
        }
    }

    /// Reads and checks a cloud.toml; relative TLS paths are taken from
    /// the file's directory.
    pub fn load(path: &Path) -> Result<ServiceConfig, CloudError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CloudError::io(format!("reading {}", path.display()), e))?;
        let mut config = ServiceConfig::parse(&text, &path.display().to_string())?;
        if let (Some(tls), Some(dir)) = (config.tls.as_mut(), path.parent()) {
            tls.cert = dir.join(&tls.cert);
            tls.key = dir.join(&tls.key);
        }
        Ok(config)
    }

    pub fn parse(text: &str, origin: &str) -> Result<ServiceConfig, CloudError> {
        let mut config: ServiceConfig = toml::from_str(text).map_err(|e| CloudError::Config {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        config.resolve_database_url(origin)?;
        Ok(config)
    }

    fn resolve_database_url(&mut self, origin: &str) -> Result<(), CloudError> {
        let problem = |message: String| CloudError::Config {
            path: origin.to_string(),
            message,
        };
        match (&self.database_url.is_empty(), &self.database_url_env) {
            (false, Some(_)) => Err(problem(
                "give database_url or database_url_env, not both".into(),
            )),
            (true, Some(var)) => {
                self.database_url = std::env::var(var).map_err(|_| {
                    problem(format!(
                        "database_url_env names {var}, which is not set in the environment"
                    ))
                })?;
                Ok(())
            }
            // Left empty: the command line may still give it.
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_file_takes_defaults() {
        let c = ServiceConfig::parse("database_url = \"postgres://x/y\"", "t").unwrap();
        assert_eq!(c.database_url, "postgres://x/y");
        assert_eq!(c.listen, default_listen());
        assert!(c.tls.is_none() && c.vlm.is_none());
        assert_eq!(c.database, DatabaseSettings::default());
    }

    #[test]
    fn unknown_keys_and_both_urls_are_refused() {
        assert!(ServiceConfig::parse("listn = \"1.2.3.4:5\"", "t").is_err());
        let both = "database_url = \"a\"\ndatabase_url_env = \"PATH\"";
        let err = ServiceConfig::parse(both, "t").unwrap_err().to_string();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn the_example_file_parses_with_every_section() {
        // The variable's value is not this test's business; the URL is.
        let text = include_str!("../cloud.example.toml").replace(
            "database_url_env = \"DERMASCOPE_CLOUD_DATABASE_URL\"",
            "database_url = \"postgres://example/db\"",
        );
        let c = ServiceConfig::parse(&text, "cloud.example.toml").unwrap();
        assert_eq!(c.database_url, "postgres://example/db");
        assert_eq!(c.listen.port(), 8443);
        assert!(c.tls.is_some() && c.vlm.is_some());
    }

    #[test]
    fn an_unset_variable_is_named() {
        let text = "database_url_env = \"DERMASCOPE_CLOUD_TEST_SURELY_UNSET\"";
        let err = ServiceConfig::parse(text, "t").unwrap_err().to_string();
        assert!(err.contains("DERMASCOPE_CLOUD_TEST_SURELY_UNSET"), "{err}");
    }
}
