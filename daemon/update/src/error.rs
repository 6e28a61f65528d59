use std::path::PathBuf;

use crate::archive::ArchiveError;
use crate::keys::KeyError;
use crate::manifest::{ManifestError, Part};

/// Why a bundle was refused or an install did not complete. Every refusal
/// before [`UpdateError::HealthCheck`] left the device untouched.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    // The cause is in the message, not the error chain: a caller printing
    // the chain would otherwise say it twice.
    #[error("cannot {action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path}: {reason}")]
    BadBundleFile { path: PathBuf, reason: String },
    #[error("the bundle is signed by key {key}, which this device does not trust (add its .pub to the trusted keys, or sign with a trusted key)")]
    UnknownKey { key: String },
    #[error("the bundle is signed by key {key}, which was revoked; sign it with a key that is still trusted")]
    RevokedKey { key: String },
    #[error("the bundle's signature does not match bundle.toml for key {key}: the manifest was changed after signing, or signed with another key; sign it again")]
    BadSignature { key: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(
        "{path:?} is in the bundle but not in bundle.toml; remove it or sign the bundle again"
    )]
    NotInManifest { path: String },
    #[error("{path:?} is listed in bundle.toml but missing from the bundle; copy the whole bundle again")]
    MissingFile { path: String },
    #[error(
        "{path:?} is a symlink or special file; a bundle holds regular files and directories only"
    )]
    NotRegular { path: String },
    #[error("{path:?} is {found} bytes, bundle.toml says {expected}: the copy is truncated; copy the bundle again")]
    Truncated {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error(
        "{path:?} is larger than the {expected} bytes bundle.toml says; copy the bundle again"
    )]
    Oversize { path: String, expected: u64 },
    #[error("{path:?} does not match its sha256 in bundle.toml: the file was changed or corrupted; copy the bundle again")]
    ChangedFile { path: String },
    #[error("bundle version {version} is below this device's floor {floor}; a downgrade needs a bundle signed with `downgrade = true`")]
    Downgrade { version: u64, floor: u64 },
    #[error("bundle version {version} is not above this device's floor {floor}; build the bundle with a higher version")]
    NotNewer { version: u64, floor: u64 },
    #[error(
        "version {version} is installed already (as {role}); build the bundle with another version"
    )]
    VersionInUse { version: u64, role: &'static str },
    #[error("bundle version {version} failed before ({reason}) and is not retried automatically; install it by hand with --retry-failed once the cause is fixed")]
    AlreadyFailed { version: u64, reason: String },
    #[error("the bundle needs daemon {needs} or newer; this is {have}: update the daemon first")]
    DaemonTooOld { needs: String, have: String },
    #[error("the bundle's {part} was made for encoder {needs}, but the device would run encoder {installed}; build it for {installed} or ship the encoder with it")]
    EncoderMismatch {
        part: Part,
        needs: String,
        installed: String,
    },
    #[error("the bundle carries {part} but no encoder is installed or carried; ship the encoder with it")]
    NoEncoder { part: Part },
    #[error("the bundle's encoder/manifest.toml has no model_id: {reason}")]
    EncoderManifest { reason: String },
    #[error("the bundle would revoke every trusted key, leaving the device unable to take another update; keep at least one trusted key")]
    RevokesEveryKey,
    #[error("another update is running on {root} (its lock is held)")]
    Busy { root: PathBuf },
    #[error("preparing version {version} failed, nothing was switched: {reason}")]
    Prepare { version: u64, reason: String },
    #[error("version {version} failed its health check ({reason}); {restored}, and the bundle is marked failed")]
    HealthCheck {
        version: u64,
        reason: String,
        restored: String,
    },
    #[error("{path} is damaged: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("no previous version is kept to roll back to")]
    NoPrevious,
    #[error("installed version at {path} does not match its record: {reason}")]
    VersionCorrupt { path: PathBuf, reason: String },
    #[error("the bundle's file {path:?} changed while it was being copied (the stick was rewritten?); nothing was switched")]
    ChangedDuringCopy { path: String },
}

pub(crate) fn io(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> UpdateError {
    let path = path.into();
    move |source| UpdateError::Io {
        action,
        path,
        error: source,
    }
}
