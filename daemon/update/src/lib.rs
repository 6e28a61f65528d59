//! Signed update bundles and their installation on the device.
//!
//! A bundle is a directory: `bundle.toml` (format, an integer version that
//! only grows, what it carries, what it needs, every file's size and
//! sha256, `downgrade`, `revoke_keys`) and `bundle.toml.sig` (an ed25519
//! signature over the manifest's exact bytes, checked with
//! `verify_strict`), beside the parts it carries: `encoder/`, `adapter/`,
//! `library/`, `config/`. One signature covers every part, so separately
//! signed parts can never be mixed (SWUpdate's lesson).
//!
//! [`Installer::install`] verifies everything before touching the device,
//! builds the complete new version beside the running one, switches one
//! `current` link, runs the caller's [`HealthCheck`], and switches back and
//! marks the bundle failed when it fails. Nothing here touches a network:
//! being offline after an install is never a failure.
//!
//! This crate knows no encoder, store or screen (the binary supplies the
//! health check and the re-embedding step as traits), so it can be audited
//! on its own and used by the CLI and the daemon alike.
//!
//! Unix only: the switch is a symlink replaced by rename(2).

pub mod archive;
mod error;
mod install;
pub mod keys;
pub mod manifest;
mod sign;
mod verify;

pub use archive::{pack, unpack, ArchiveError, ArchiveInfo};
pub use error::UpdateError;
pub use install::{
    current_version_at, encoder_model_id, verify_version, FailedBundle, HealthCheck,
    InstallOptions, InstallReport, InstalledVersion, Installer, NoPreparation, PartRecord, Plan,
    Prepare, Recovery, Status, Step, VersionRecord, CURRENT, RECORD, STATE, VERSIONS,
};
pub use keys::TrustedKeys;
pub use manifest::{Manifest, Part};
pub use sign::{sign_bundle, SignOptions};
pub use verify::{verify_bundle, VerifiedBundle};
