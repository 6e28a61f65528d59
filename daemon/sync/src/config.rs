//! `[sync]` in dermascope.toml.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dermascope_cloud_api::MAX_UPLOAD_BATCH;
use reqwest::Url;
use serde::Deserialize;

use crate::error::SyncError;

/// The `[sync]` section. An absent section means offline-only: the daemon
/// starts no [`crate::Syncer`].
///
/// ```toml
/// [sync]
/// url = "https://fleet.example.org"
/// ca = "/etc/dermascope/fleet-ca.pem"        # the only roots trusted
/// credential_file = "/etc/dermascope/fleet.credential"   # mode 0600
/// interval_s = 60
/// batch = 32
/// ```
///
/// Relative paths are taken relative to the directory of the file the
/// section came from ([`SyncConfig::resolve_relative_to`]).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Base URL of the fleet service. `https://` always, except `http://`
    /// to a loopback address when `allow_plain_http_for_tests` is set.
    pub url: String,
    /// PEM file with the CA certificate(s) that signed the service's
    /// certificate: the only roots trusted (no system or built-in roots).
    /// Required for `https://`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// File holding `<device_id>.<secret>` as `dermascope-cloud device add`
    /// printed it. Refused when group or others may read it (`chmod 600`).
    pub credential_file: PathBuf,
    /// Seconds between syncs when all is well (1..=86400). Failures retry
    /// sooner, with exponential backoff and full jitter capped at this.
    #[serde(default = "default_interval_s")]
    pub interval_s: u64,
    /// Most cases per upload request (1..=64, the service's cap).
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Seconds to wait for a TCP + TLS connection (1..=600).
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: u64,
    /// Seconds a whole request may take, answer included (1..=3600).
    #[serde(default = "default_request_timeout_s")]
    pub request_timeout_s: u64,
    /// Lets `url` be `http://` to a loopback address: for tests only, never
    /// on a device (credentials and cases would cross in the clear).
    #[serde(default)]
    pub allow_plain_http_for_tests: bool,
}

fn default_interval_s() -> u64 {
    60
}
fn default_batch() -> usize {
    32
}
fn default_connect_timeout_s() -> u64 {
    10
}
fn default_request_timeout_s() -> u64 {
    30
}

impl SyncConfig {
    /// A configuration with the defaults for everything but the three
    /// required values.
    pub fn new(url: impl Into<String>, ca: Option<PathBuf>, credential_file: PathBuf) -> Self {
        SyncConfig {
            url: url.into(),
            ca,
            credential_file,
            interval_s: default_interval_s(),
            batch: default_batch(),
            connect_timeout_s: default_connect_timeout_s(),
            request_timeout_s: default_request_timeout_s(),
            allow_plain_http_for_tests: false,
        }
    }

    /// Makes `ca` and `credential_file` absolute against `dir` (the
    /// directory of the configuration file) where they are relative.
    pub fn resolve_relative_to(&mut self, dir: &Path) {
        if let Some(ca) = &mut self.ca {
            if ca.is_relative() {
                *ca = dir.join(&*ca);
            }
        }
        if self.credential_file.is_relative() {
            self.credential_file = dir.join(&self.credential_file);
        }
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_s)
    }

    /// Checks every value without touching the network; the files are
    /// read by [`crate::Syncer::start`] ([`SyncConfig::read_credential`]).
    /// Each error names the key and what to change.
    pub fn validate(&self) -> Result<(), SyncError> {
        self.base_url().map(|_| ())?;
        let range = |key: &'static str, value: u64, max: u64| {
            if (1..=max).contains(&value) {
                Ok(())
            } else {
                Err(SyncError::Config {
                    key,
                    message: format!("{value} is out of range: use 1..={max}"),
                })
            }
        };
        range("interval_s", self.interval_s, 86_400)?;
        range("batch", self.batch as u64, MAX_UPLOAD_BATCH as u64)?;
        range("connect_timeout_s", self.connect_timeout_s, 600)?;
        range("request_timeout_s", self.request_timeout_s, 3_600)?;
        if self.credential_file.as_os_str().is_empty() {
            return Err(SyncError::Config {
                key: "credential_file",
                message: "is empty: name the file `dermascope-cloud device add` wrote".into(),
            });
        }
        Ok(())
    }

    /// The service's base URL, checked: scheme, host, and the CA rule.
    pub(crate) fn base_url(&self) -> Result<Url, SyncError> {
        let bad = |message: String| SyncError::Config {
            key: "url",
            message,
        };
        let url = Url::parse(self.url.trim()).map_err(|e| {
            bad(format!(
                "{:?} is not a URL ({e}): write it like \"https://fleet.example.org\"",
                self.url
            ))
        })?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad(format!("{:?} has no host", self.url)));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "holds a user name or password: the credential belongs in credential_file".into(),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("must not have a query or fragment".into()));
        }
        match url.scheme() {
            "https" => {
                if self.ca.is_none() {
                    return Err(SyncError::Config {
                        key: "ca",
                        message: "is required for https: name the PEM file of the CA that \
                                  signed the fleet service's certificate"
                            .into(),
                    });
                }
            }
            "http" => {
                if !self.allow_plain_http_for_tests {
                    return Err(bad(
                        "http:// sends the credential and cases in the clear: use https:// \
                         with a ca"
                            .into(),
                    ));
                }
                if !is_loopback(&url) {
                    return Err(bad(
                        "http:// is allowed (allow_plain_http_for_tests) only to a loopback \
                         address such as 127.0.0.1"
                            .into(),
                    ));
                }
            }
            other => {
                return Err(bad(format!(
                    "scheme {other:?} is not supported: use https://"
                )))
            }
        }
        Ok(url)
    }

    /// Reads `<device_id>.<secret>` from the credential file, refusing a
    /// file that group or others may read: a readable secret is a leaked
    /// one, so the device stays offline until it is `chmod 600`ed.
    pub fn read_credential(&self) -> Result<String, SyncError> {
        let path = &self.credential_file;
        let fail = |message: String| SyncError::Credential {
            path: path.clone(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot be read: {e}")))?;
        if !meta.is_file() {
            return Err(fail("is not a regular file".into()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(fail(format!(
                    "is readable or writable by group or others (mode {mode:03o}): run \
                     `chmod 600 {}`",
                    path.display()
                )));
            }
        }
        if meta.len() > 4096 {
            return Err(fail("is larger than a credential (4096 bytes)".into()));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(format!("cannot be read as text: {e}")))?;
        let credential = text.trim();
        let valid = dermascope_cloud_api::split_credential(credential).is_some()
            && !credential
                .chars()
                .any(|c| c.is_control() || c.is_whitespace());
        if !valid {
            return Err(fail(
                "does not hold a credential `<device_id>.<secret>` on one line".into(),
            ));
        }
        Ok(credential.to_owned())
    }
}

fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> SyncConfig {
        SyncConfig::new(url, Some("ca.pem".into()), "cred".into())
    }

    fn key_of(result: Result<(), SyncError>) -> &'static str {
        match result {
            Err(SyncError::Config { key, .. }) => key,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let toml = "url = \"https://x\"\ncredential_file = \"c\"\nintervall_s = 5\n";
        let err = toml::from_str::<SyncConfig>(toml).unwrap_err();
        assert!(err.to_string().contains("intervall_s"), "{err}");
        let ok: SyncConfig =
            toml::from_str("url = \"https://x\"\nca = \"a\"\ncredential_file = \"c\"\n").unwrap();
        assert_eq!((ok.interval_s, ok.batch), (60, 32));
        assert_eq!(ok.validate().ok(), Some(()));
    }

    #[test]
    fn every_bad_value_names_its_key() {
        assert_eq!(key_of(config("not a url").validate()), "url");
        assert_eq!(key_of(config("ftp://x").validate()), "url");
        assert_eq!(key_of(config("https://u:p@x").validate()), "url");
        let mut no_ca = config("https://x");
        no_ca.ca = None;
        assert_eq!(key_of(no_ca.validate()), "ca");
        let mut batch = config("https://x");
        batch.batch = MAX_UPLOAD_BATCH + 1;
        assert_eq!(key_of(batch.validate()), "batch");
        batch.batch = 0;
        assert_eq!(key_of(batch.validate()), "batch");
        let mut interval = config("https://x");
        interval.interval_s = 0;
        assert_eq!(key_of(interval.validate()), "interval_s");
    }

    #[test]
    fn plain_http_needs_the_test_switch_and_loopback() {
        let mut c = config("http://127.0.0.1:9");
        assert_eq!(key_of(c.validate()), "url");
        c.allow_plain_http_for_tests = true;
        assert_eq!(c.validate().ok(), Some(()));
        c.url = "http://[::1]:9".into();
        assert_eq!(c.validate().ok(), Some(()));
        c.url = "http://fleet.example.org".into();
        assert_eq!(key_of(c.validate()), "url");
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let mut c = config("https://x");
        c.resolve_relative_to(Path::new("/etc/dermascope"));
        assert_eq!(c.ca.as_deref(), Some(Path::new("/etc/dermascope/ca.pem")));
        assert_eq!(c.credential_file, Path::new("/etc/dermascope/cred"));
    }

    #[cfg(unix)]
    #[test]
    fn a_credential_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cred");
        std::fs::write(&path, "0193a3c0-0000-7000-8000-000000000001.s3cret\n").unwrap();
        let c = SyncConfig::new("https://x", None, path.clone());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = c.read_credential().unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            c.read_credential().unwrap(),
            "0193a3c0-0000-7000-8000-000000000001.s3cret"
        );
        std::fs::write(&path, "no-dot-here\n").unwrap();
        assert!(c.read_credential().is_err());
    }
}
