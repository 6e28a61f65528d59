//! `bundle.toml`: what a bundle carries, what it needs, and every file's
//! size and sha256. It is parsed only after its signature was checked
//! (verified before parsed), and then validated as a whole before any file
//! is read.

use serde::{Deserialize, Serialize};

/// The manifest's file name inside a bundle.
pub const MANIFEST: &str = "bundle.toml";
/// The signature over the manifest's exact bytes.
pub const SIGNATURE: &str = "bundle.toml.sig";
/// The manifest format this crate reads and writes.
pub const FORMAT: u32 = 1;
/// A manifest is a list of files, not data: anything larger is refused
/// before it is read, so a hostile stick cannot exhaust memory.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
pub const MAX_FILES: usize = 10_000;
/// Larger than any encoder variant we ship (~90 MB) by a wide margin.
pub const MAX_FILE_BYTES: u64 = 4 << 30;
pub const MAX_TOTAL_BYTES: u64 = 8 << 30;
const MAX_PATH_BYTES: usize = 1024;

/// What a bundle can carry. Each part lives under its own top-level
/// directory of the bundle and of an installed version (`encoder/`,
/// `adapter/`, `library/`, `config/`), so a file's part is its first path
/// component and parts can never overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// An encoder bundle: `manifest.toml` and its ONNX files.
    Encoder,
    /// An adapter bundle (`manifest.toml` naming its encoder, the ONNX file).
    Adapter,
    /// A reference-library snapshot.
    Library,
    /// The daemon's configuration file.
    Config,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::Encoder, Part::Adapter, Part::Library, Part::Config];

    /// The part's directory inside a bundle and an installed version.
    pub fn dir(self) -> &'static str {
        match self {
            Part::Encoder => "encoder",
            Part::Adapter => "adapter",
            Part::Library => "library",
            Part::Config => "config",
        }
    }

    pub fn from_dir(name: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|p| p.dir() == name)
    }

    /// Parts made for one encoder's embedding space.
    pub fn needs_encoder(self) -> bool {
        matches!(self, Part::Adapter | Part::Library)
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir())
    }
}

/// What the bundle needs of the device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Needs {
    /// The encoder model id an adapter or library in this bundle was made
    /// for; required when the bundle carries either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_model_id: Option<String>,
    /// The oldest daemon (`MAJOR.MINOR.PATCH`) that can run this bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_daemon_version: Option<String>,
}

/// One file of the bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative, `/`-separated, under a carried part's directory.
    pub path: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// `bundle.toml`.
///
/// The version is a plain integer that only grows: the device keeps the
/// highest version it ever installed as its floor and refuses anything
/// lower unless the signed manifest says `downgrade = true`. An integer
/// (not semver) because the only question asked of it is "newer or not",
/// across every part at once.
///
/// Field order matters: TOML needs plain values before tables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub version: u64,
    /// Signed permission to install below the device's floor.
    #[serde(default)]
    pub downgrade: bool,
    pub carries: Vec<Part>,
    /// Hex ed25519 public keys the device must never trust again.
    #[serde(default)]
    pub revoke_keys: Vec<String>,
    #[serde(default)]
    pub needs: Needs,
    #[serde(default)]
    pub files: Vec<FileEntry>,
}

/// Why a manifest is not acceptable, with what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("bundle.toml is not valid TOML for a bundle manifest: {0}")]
    Syntax(String),
    #[error("bundle.toml has format {found}; this daemon reads format {FORMAT}")]
    Format { found: u32 },
    #[error("bundle.toml: version must be at least 1")]
    ZeroVersion,
    #[error("bundle.toml carries nothing: list at least one of encoder, adapter, library, config in `carries`")]
    Empty,
    #[error("bundle.toml lists part {0} twice in `carries`")]
    DuplicatePart(Part),
    #[error("bundle.toml carries {0} but lists no file under {0}/")]
    PartWithoutFiles(Part),
    #[error("bundle.toml carries {part} but does not say which encoder it was made for: set needs.encoder_model_id")]
    NeedsEncoder { part: Part },
    #[error("bundle.toml: file path {path:?} is unsafe: {reason}")]
    UnsafePath { path: String, reason: &'static str },
    #[error("bundle.toml: file {path:?} is not under a part the bundle carries ({carried})")]
    NotCarried { path: String, carried: String },
    #[error("bundle.toml lists {path:?} twice")]
    DuplicateFile { path: String },
    #[error("bundle.toml: file {path:?} has sha256 {sha256:?}; expected 64 lowercase hex digits")]
    BadHash { path: String, sha256: String },
    #[error("bundle.toml: file {path:?} claims {size} bytes; the limit is {MAX_FILE_BYTES}")]
    FileTooLarge { path: String, size: u64 },
    #[error("bundle.toml lists {0} files; the limit is {MAX_FILES}")]
    TooManyFiles(usize),
    #[error("bundle.toml's files add up to more than {MAX_TOTAL_BYTES} bytes")]
    TooLarge,
    #[error(
        "bundle.toml: revoke_keys entry {0:?} is not a hex ed25519 public key (64 hex digits)"
    )]
    BadRevokedKey(String),
    #[error("bundle.toml: needs.min_daemon_version {0:?} is not MAJOR.MINOR.PATCH")]
    BadDaemonVersion(String),
}

impl Manifest {
    /// Parses and validates manifest bytes (call only on verified bytes).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ManifestError::Syntax("not UTF-8".to_owned()))?;
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| ManifestError::Syntax(e.message().to_owned()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The manifest as TOML (what `sign` writes and signs).
    pub fn to_toml(&self) -> Result<String, ManifestError> {
        toml::to_string(self).map_err(|e| ManifestError::Syntax(e.to_string()))
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT {
            return Err(ManifestError::Format { found: self.format });
        }
        if self.version == 0 {
            return Err(ManifestError::ZeroVersion);
        }
        if self.carries.is_empty() {
            return Err(ManifestError::Empty);
        }
        for (i, part) in self.carries.iter().enumerate() {
            if self.carries[..i].contains(part) {
                return Err(ManifestError::DuplicatePart(*part));
            }
            if part.needs_encoder() && self.needs.encoder_model_id.is_none() {
                return Err(ManifestError::NeedsEncoder { part: *part });
            }
        }
        if self.files.len() > MAX_FILES {
            return Err(ManifestError::TooManyFiles(self.files.len()));
        }
        let carried = self
            .carries
            .iter()
            .map(|p| p.dir())
            .collect::<Vec<_>>()
            .join(", ");
        let mut seen = std::collections::BTreeSet::new();
        let mut total: u64 = 0;
        for file in &self.files {
            let part = check_path(&file.path)?;
            if !part.is_some_and(|p| self.carries.contains(&p)) {
                return Err(ManifestError::NotCarried {
                    path: file.path.clone(),
                    carried,
                });
            }
            if !seen.insert(file.path.as_str()) {
                return Err(ManifestError::DuplicateFile {
                    path: file.path.clone(),
                });
            }
            if !is_sha256_hex(&file.sha256) {
                return Err(ManifestError::BadHash {
                    path: file.path.clone(),
                    sha256: file.sha256.clone(),
                });
            }
            if file.size > MAX_FILE_BYTES {
                return Err(ManifestError::FileTooLarge {
                    path: file.path.clone(),
                    size: file.size,
                });
            }
            total = total.saturating_add(file.size);
        }
        if total > MAX_TOTAL_BYTES {
            return Err(ManifestError::TooLarge);
        }
        for part in &self.carries {
            if !self.files.iter().any(|f| part_of(&f.path) == Some(*part)) {
                return Err(ManifestError::PartWithoutFiles(*part));
            }
        }
        for key in &self.revoke_keys {
            if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ManifestError::BadRevokedKey(key.clone()));
            }
        }
        if let Some(v) = &self.needs.min_daemon_version {
            if parse_daemon_version(v).is_none() {
                return Err(ManifestError::BadDaemonVersion(v.clone()));
            }
        }
        Ok(())
    }

    /// The manifest's entries for one part.
    pub fn files_of(&self, part: Part) -> impl Iterator<Item = &FileEntry> {
        self.files
            .iter()
            .filter(move |f| part_of(&f.path) == Some(part))
    }
}

/// The part a (checked) path belongs to: its first component.
pub fn part_of(path: &str) -> Option<Part> {
    path.split('/').next().and_then(Part::from_dir)
}

/// Refuses anything that could leave the version directory or be read
/// differently on another system: absolute paths, `..`, `.`, empty
/// components, backslashes, NUL; and files at the top level (every file is
/// in a part's directory). Returns the part the path is in.
pub fn check_path(path: &str) -> Result<Option<Part>, ManifestError> {
    let unsafe_path = |reason| ManifestError::UnsafePath {
        path: path.to_owned(),
        reason,
    };
    if path.is_empty() {
        return Err(unsafe_path("empty"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(unsafe_path("longer than 1024 bytes"));
    }
    if path.starts_with('/') {
        return Err(unsafe_path("absolute"));
    }
    if path.contains('\\') || path.contains('\0') {
        return Err(unsafe_path("contains a backslash or NUL"));
    }
    let components: Vec<&str> = path.split('/').collect();
    for c in &components {
        match *c {
            "" => return Err(unsafe_path("has an empty component")),
            "." | ".." => return Err(unsafe_path("has a . or .. component")),
            _ => {}
        }
    }
    if components.len() < 2 {
        return Err(unsafe_path("not inside a part's directory"));
    }
    Ok(Part::from_dir(components[0]))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `MAJOR.MINOR.PATCH` as a comparable triple (pre-release tags are not
/// used by the daemon's versions, so they are refused rather than guessed).
pub fn parse_daemon_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    let patch = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((major, minor, patch))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT,
            version: 3,
            downgrade: false,
            carries: vec![Part::Adapter],
            revoke_keys: vec![],
            needs: Needs {
                encoder_model_id: Some("enc-a".into()),
                min_daemon_version: Some("0.1.0".into()),
            },
            files: vec![FileEntry {
                path: "adapter/manifest.toml".into(),
                size: 3,
                sha256: "0".repeat(64),
            }],
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let m = manifest();
        let text = m.to_toml().unwrap();
        assert_eq!(Manifest::parse(text.as_bytes()).unwrap(), m);
    }

    #[test]
    fn refuses_unsafe_paths() {
        for bad in [
            "/etc/passwd",
            "adapter/../../etc/passwd",
            "adapter/./x",
            "adapter//x",
            "adapter\\x",
            "x",
            "",
        ] {
            let mut m = manifest();
            m.files[0].path = bad.into();
            assert!(
                matches!(m.validate(), Err(ManifestError::UnsafePath { .. })),
                "{bad:?} accepted"
            );
        }
        let mut m = manifest();
        m.files[0].path = "encoder/manifest.toml".into();
        assert!(matches!(
            m.validate(),
            Err(ManifestError::NotCarried { .. })
        ));
    }

    #[test]
    fn an_adapter_must_name_its_encoder() {
        let mut m = manifest();
        m.needs.encoder_model_id = None;
        assert_eq!(
            m.validate(),
            Err(ManifestError::NeedsEncoder {
                part: Part::Adapter
            })
        );
    }
}
