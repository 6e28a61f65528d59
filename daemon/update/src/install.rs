//! Installing a verified bundle under a root:
//!
//! ```text
//! <root>/versions/<N>/   one complete device state per version (encoder/,
//!                        adapter/, library/, config/, version.toml, and the
//!                        bundle.toml + .sig that delivered it); never
//!                        written after it was renamed into place
//! <root>/current         symlink -> versions/<N>, replaced by one rename
//! <root>/state.toml      floor, previous, revoked keys, failed bundles, the
//!                        install in trial (written durably)
//! <root>/.lock           held while an install or rollback runs
//! ```
//!
//! Why this order survives a kill or power cut at any point: a version
//! directory is built under a staging name and renamed into place whole
//! (every file and directory fsynced first), so `current` only ever names a
//! complete version. The trial is recorded durably before the switch; a
//! start that finds a trial whose health check never finished switches back
//! and marks it failed (a bundle that kills the device in its check must not
//! be retried in a loop, Mender's known failure). A bundle that a device
//! refused, or that failed, stays failed until an operator says
//! `--retry-failed`.
//!
//! Parts a bundle does not carry are hard-linked from the running version
//! (the files are immutable once installed), so an adapter-only bundle does
//! not copy the encoder. A part made for another encoder is not carried
//! across an encoder change: no adapter crosses encoders.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::error::{io, UpdateError};
use crate::keys::TrustedKeys;
use crate::manifest::{parse_daemon_version, FileEntry, Part, MANIFEST, SIGNATURE};
use crate::verify::{check_file, verify_bundle, walk, VerifiedBundle};

pub const VERSIONS: &str = "versions";
pub const CURRENT: &str = "current";
pub const STATE: &str = "state.toml";
pub const RECORD: &str = "version.toml";
const LOCK: &str = ".lock";
const CURRENT_TMP: &str = ".current.tmp";
const STAGING_PREFIX: &str = ".staging-";
const CHUNK: usize = 1 << 20;
/// The state file is a few lists; anything larger is damage.
const MAX_STATE_BYTES: u64 = 1 << 20;

/// One part of an installed version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartRecord {
    pub part: Part,
    /// The bundle version that delivered it.
    pub from_version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_encoder: Option<String>,
    pub files: Vec<FileEntry>,
}

/// `versions/<N>/version.toml`: everything the version holds, hashed, so a
/// version can be re-verified at any time (`verify_version`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRecord {
    pub version: u64,
    /// sha256 of the bundle.toml that made this version.
    pub bundle_sha256: String,
    pub signed_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_model_id: Option<String>,
    pub parts: Vec<PartRecord>,
}

impl VersionRecord {
    pub fn part(&self, part: Part) -> Option<&PartRecord> {
        self.parts.iter().find(|p| p.part == part)
    }
}

/// An installed version: its directory and record.
#[derive(Clone, Debug)]
pub struct InstalledVersion {
    pub dir: PathBuf,
    pub record: VersionRecord,
}

impl InstalledVersion {
    /// The directory of a part (may be absent if the version lacks it).
    pub fn part_dir(&self, part: Part) -> PathBuf {
        self.dir.join(part.dir())
    }
}

/// A bundle recorded as failed: never installed again automatically.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedBundle {
    pub version: u64,
    pub bundle_sha256: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Trial {
    version: u64,
    bundle_sha256: String,
    /// The version to return to; none on a first install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    back_to: Option<u64>,
    /// Set once the health check failed, before switching back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failed: Option<String>,
}

/// `state.toml`. Plain values before tables (TOML's rule).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    /// The highest version ever installed: anything lower needs a signed
    /// downgrade. A signed downgrade does not lower it, so replaying an old
    /// (once valid) bundle afterwards is still refused.
    #[serde(default)]
    floor: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<u64>,
    #[serde(default)]
    revoked_keys: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rollback: Option<RollbackIntent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trial: Option<Trial>,
    #[serde(default)]
    failed: Vec<FailedBundle>,
}

/// A rollback in progress, recorded before its switch: a kill between the
/// switch and the state update must neither lose the version rolled back
/// from (the next start's clean-up would remove an unreferenced version)
/// nor leave `previous` naming the current version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RollbackIntent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<u64>,
    to: u64,
}

/// Runs on the new version after the switch. The real one (in the binary)
/// loads the encoder, embeds a known image and searches the store; this
/// crate knows no encoder or store.
pub trait HealthCheck {
    /// `Err` says what is wrong, in words for the operator.
    fn check(&self, version: &InstalledVersion) -> Result<(), String>;
}

/// Runs on the complete new version before the switch, while the old one
/// is still current: where the local cases are re-embedded when the
/// encoder changes, so the new version starts with a store of its own.
pub trait Prepare {
    fn prepare(
        &self,
        new: &InstalledVersion,
        previous: Option<&InstalledVersion>,
    ) -> Result<(), String>;
}

/// Nothing to prepare.
pub struct NoPreparation;
impl Prepare for NoPreparation {
    fn prepare(&self, _: &InstalledVersion, _: Option<&InstalledVersion>) -> Result<(), String> {
        Ok(())
    }
}

/// Where an install is, for a progress screen (and the kill tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Verified { files: usize, bytes: u64 },
    Copied { done: usize, total: usize },
    Staged,
    Prepared,
    TrialRecorded,
    Switched,
    Checked,
    Committed,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Verified { files, bytes } => write!(f, "verified {files} files ({bytes} bytes)"),
            Step::Copied { done, total } => write!(f, "copied {done}/{total}"),
            Step::Staged => f.write_str("staged"),
            Step::Prepared => f.write_str("prepared"),
            Step::TrialRecorded => f.write_str("trial recorded"),
            Step::Switched => f.write_str("switched"),
            Step::Checked => f.write_str("health check passed"),
            Step::Committed => f.write_str("committed"),
        }
    }
}

pub struct InstallOptions<'a> {
    /// Install a bundle recorded as failed (an operator's explicit retry).
    pub retry_failed: bool,
    pub prepare: &'a dyn Prepare,
    pub health: &'a dyn HealthCheck,
    pub progress: &'a dyn Fn(Step),
}

/// What an install would do (the dry run's answer) or did.
#[derive(Clone, Debug)]
pub struct Plan {
    pub bundle: VerifiedBundle,
    pub from: Option<u64>,
    pub encoder_model_id: Option<String>,
    /// Parts kept from the running version.
    pub carried_forward: Vec<Part>,
    /// Parts of the running version left out: made for another encoder.
    pub dropped: Vec<Part>,
    /// Keys this bundle revokes that were not revoked yet.
    pub newly_revoked: Vec<String>,
    /// Installing this exact bundle again changes nothing.
    pub already_installed: bool,
}

#[derive(Clone, Debug)]
pub struct InstallReport {
    pub plan: Plan,
    pub version: u64,
}

/// What a start found of an interrupted install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Killed before the switch: the old version is current, the trial was
    /// dropped (not the bundle's fault, so not marked failed).
    Abandoned { version: u64 },
    /// Killed after the switch, before the health check passed (or it had
    /// failed): switched back and marked failed.
    RolledBack { version: u64, back_to: Option<u64> },
}

#[derive(Clone, Debug)]
pub struct Status {
    pub current: Option<InstalledVersion>,
    pub previous: Option<u64>,
    pub floor: u64,
    pub revoked_keys: Vec<String>,
    pub failed: Vec<FailedBundle>,
    pub trial_pending: Option<u64>,
}

/// The device side of updates, on one root.
pub struct Installer {
    root: PathBuf,
    keys: TrustedKeys,
    daemon_version: String,
}

struct Lock {
    _file: fs::File,
}

impl Installer {
    /// `daemon_version` is the running daemon's `MAJOR.MINOR.PATCH`, which
    /// `needs.min_daemon_version` is checked against.
    pub fn new(root: impl Into<PathBuf>, keys: TrustedKeys, daemon_version: &str) -> Installer {
        Installer {
            root: root.into(),
            keys,
            daemon_version: daemon_version.to_owned(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> Result<Lock, UpdateError> {
        dermascope_durable::create_private_dir_all(&self.root).map_err(io("create", &self.root))?;
        let path = self.root.join(LOCK);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(Lock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(UpdateError::Busy {
                root: self.root.clone(),
            }),
            Err(fs::TryLockError::Error(e)) => Err(io("lock", &path)(e)),
        }
    }

    fn load_state(&self) -> Result<State, UpdateError> {
        let path = self.root.join(STATE);
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(io("open", &path)(e)),
        };
        let mut text = String::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io("read", &path))?;
        toml::from_str(&text).map_err(|e| UpdateError::State {
            path,
            reason: format!(
                "{} (it holds the version floor and revoked keys: restore it from a backup rather than deleting it)",
                e.message()
            ),
        })
    }

    fn save_state(&self, state: &State) -> Result<(), UpdateError> {
        let path = self.root.join(STATE);
        let text = toml::to_string(state).map_err(|e| UpdateError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        dermascope_durable::replace_durably(&path, text.as_bytes()).map_err(io("write", &path))
    }

    fn version_dir(&self, version: u64) -> PathBuf {
        self.root.join(VERSIONS).join(version.to_string())
    }

    /// The version `current` names, if any.
    pub fn current_version(&self) -> Result<Option<u64>, UpdateError> {
        current_version_at(&self.root)
    }

    fn installed(&self, version: u64) -> Result<InstalledVersion, UpdateError> {
        let dir = self.version_dir(version);
        let record = read_record(&dir)?;
        Ok(InstalledVersion { dir, record })
    }

    /// Verifies `bundle` and decides what installing it would do; writes
    /// nothing (the dry run).
    pub fn plan(&self, bundle: &Path) -> Result<Plan, UpdateError> {
        let state = self.load_state()?;
        self.plan_with(bundle, &state, false)
    }

    fn plan_with(
        &self,
        bundle: &Path,
        state: &State,
        retry_failed: bool,
    ) -> Result<Plan, UpdateError> {
        let verified = verify_bundle(bundle, &self.keys, &state.revoked_keys)?;
        let manifest = &verified.manifest;
        let version = manifest.version;
        let from = self.current_version()?;
        let current = match from {
            Some(v) => Some(self.installed(v)?),
            None => None,
        };
        if let Some(cur) = &current {
            if cur.record.version == version && cur.record.bundle_sha256 == verified.manifest_sha256
            {
                return Ok(Plan {
                    from,
                    encoder_model_id: cur.record.encoder_model_id.clone(),
                    carried_forward: vec![],
                    dropped: vec![],
                    newly_revoked: vec![],
                    already_installed: true,
                    bundle: verified,
                });
            }
        }
        if let Some(failed) = state
            .failed
            .iter()
            .find(|f| f.bundle_sha256 == verified.manifest_sha256)
        {
            if !retry_failed {
                return Err(UpdateError::AlreadyFailed {
                    version,
                    reason: failed.reason.clone(),
                });
            }
        }
        if !manifest.downgrade && version <= state.floor {
            return Err(if version < state.floor {
                UpdateError::Downgrade {
                    version,
                    floor: state.floor,
                }
            } else {
                UpdateError::NotNewer {
                    version,
                    floor: state.floor,
                }
            });
        }
        if from == Some(version) {
            return Err(UpdateError::VersionInUse {
                version,
                role: "the current version",
            });
        }
        if state.previous == Some(version) {
            return Err(UpdateError::VersionInUse {
                version,
                role: "the previous version, kept for rollback",
            });
        }
        if let Some(needs) = &manifest.needs.min_daemon_version {
            let have = parse_daemon_version(&self.daemon_version);
            let need = parse_daemon_version(needs);
            if have.is_none() || have < need {
                return Err(UpdateError::DaemonTooOld {
                    needs: needs.clone(),
                    have: self.daemon_version.clone(),
                });
            }
        }
        let encoder_model_id = if manifest.carries.contains(&Part::Encoder) {
            Some(encoder_model_id(&bundle.join("encoder/manifest.toml"))?)
        } else {
            current
                .as_ref()
                .and_then(|c| c.record.encoder_model_id.clone())
        };
        for part in &manifest.carries {
            if !part.needs_encoder() {
                continue;
            }
            let needs = manifest.needs.encoder_model_id.clone().unwrap_or_default();
            let installed = encoder_model_id
                .clone()
                .ok_or(UpdateError::NoEncoder { part: *part })?;
            if needs != installed {
                return Err(UpdateError::EncoderMismatch {
                    part: *part,
                    needs,
                    installed,
                });
            }
        }
        // Belt and braces: the adapter's own manifest names its encoder too,
        // and a mistaken `needs` must not smuggle it across encoders.
        if manifest.carries.contains(&Part::Adapter) {
            let path = bundle.join("adapter/manifest.toml");
            if path.is_file() {
                if let Some(adapter_for) = toml_string(&path, "encoder_model_id")? {
                    let installed = encoder_model_id.clone().unwrap_or_default();
                    if adapter_for != installed {
                        return Err(UpdateError::EncoderMismatch {
                            part: Part::Adapter,
                            needs: adapter_for,
                            installed,
                        });
                    }
                }
            }
        }
        let mut carried_forward = vec![];
        let mut dropped = vec![];
        if let Some(cur) = &current {
            for rec in &cur.record.parts {
                if manifest.carries.contains(&rec.part) {
                    continue;
                }
                if rec.part.needs_encoder() && rec.needs_encoder != encoder_model_id {
                    dropped.push(rec.part);
                } else {
                    carried_forward.push(rec.part);
                }
            }
        }
        let newly_revoked: Vec<String> = manifest
            .revoke_keys
            .iter()
            .map(|k| k.to_ascii_lowercase())
            .filter(|k| !state.revoked_keys.contains(k))
            .collect();
        let still_trusted = self
            .keys
            .ids()
            .filter(|id| {
                !state.revoked_keys.contains(*id) && !newly_revoked.iter().any(|k| k == id)
            })
            .count();
        if still_trusted == 0 {
            return Err(UpdateError::RevokesEveryKey);
        }
        Ok(Plan {
            bundle: verified,
            from,
            encoder_model_id,
            carried_forward,
            dropped,
            newly_revoked,
            already_installed: false,
        })
    }

    /// Verifies and installs `bundle`. Returns once the new version passed
    /// its health check and is committed; every error before
    /// [`UpdateError::HealthCheck`] left `current` as it was.
    pub fn install(
        &self,
        bundle: &Path,
        options: &InstallOptions,
    ) -> Result<InstallReport, UpdateError> {
        let _lock = self.lock()?;
        self.recover_locked()?;
        let mut state = self.load_state()?;
        let plan = self.plan_with(bundle, &state, options.retry_failed)?;
        let manifest = &plan.bundle.manifest;
        let version = manifest.version;
        (options.progress)(Step::Verified {
            files: manifest.files.len(),
            bytes: plan.bundle.total_bytes(),
        });
        if plan.already_installed {
            info!(version, "bundle already installed; nothing to do");
            return Ok(InstallReport { version, plan });
        }
        if !plan.newly_revoked.is_empty() {
            // A revocation is a security statement, kept even if the rest
            // of this bundle fails later.
            state
                .revoked_keys
                .extend(plan.newly_revoked.iter().cloned());
            self.save_state(&state)?;
            warn!(count = plan.newly_revoked.len(), "revoked signing keys");
        }
        let previous = match plan.from {
            Some(v) => Some(self.installed(v)?),
            None => None,
        };
        let new = match self.stage(&plan, previous.as_ref(), options) {
            Ok(new) => new,
            Err(e) => {
                // A full disk or a changed stick: give the space back now
                // rather than at the next start (best effort; a leftover
                // staging directory is never read).
                let staging = self
                    .root
                    .join(VERSIONS)
                    .join(format!("{STAGING_PREFIX}{version}"));
                let _ = fs::remove_dir_all(staging);
                warn!(version, error = %e, "staging the new version failed; nothing was switched");
                return Err(e);
            }
        };
        (options.progress)(Step::Staged);
        options
            .prepare
            .prepare(&new, previous.as_ref())
            .map_err(|reason| UpdateError::Prepare { version, reason })?;
        (options.progress)(Step::Prepared);

        state.trial = Some(Trial {
            version,
            bundle_sha256: plan.bundle.manifest_sha256.clone(),
            back_to: plan.from,
            failed: None,
        });
        self.save_state(&state)?;
        (options.progress)(Step::TrialRecorded);
        switch_current(&self.root, Some(version))?;
        (options.progress)(Step::Switched);
        info!(version, from = ?plan.from, "switched to the new version; checking its health");

        if let Err(reason) = options.health.check(&new) {
            warn!(version, %reason, "health check failed; switching back");
            if let Some(trial) = state.trial.as_mut() {
                trial.failed = Some(reason.clone());
            }
            self.save_state(&state)?;
            self.finish_failed_trial(&mut state)?;
            return Err(UpdateError::HealthCheck {
                version,
                reason,
                restored: match plan.from {
                    Some(v) => format!("version {v} is current again"),
                    None => "no version is current (it was the first install)".into(),
                },
            });
        }
        (options.progress)(Step::Checked);
        state.trial = None;
        state.floor = state.floor.max(version);
        if plan.from.is_some() {
            state.previous = plan.from;
        }
        self.save_state(&state)?;
        (options.progress)(Step::Committed);
        info!(version, "update committed");
        self.remove_unused(&state)?;
        Ok(InstallReport { version, plan })
    }

    /// Builds `versions/<N>` under a staging name and renames it into place.
    fn stage(
        &self,
        plan: &Plan,
        previous: Option<&InstalledVersion>,
        options: &InstallOptions,
    ) -> Result<InstalledVersion, UpdateError> {
        let manifest = &plan.bundle.manifest;
        let version = manifest.version;
        let versions = self.root.join(VERSIONS);
        dermascope_durable::create_private_dir_all(&versions).map_err(io("create", &versions))?;
        let staging = versions.join(format!("{STAGING_PREFIX}{version}"));
        remove_dir_if_present(&staging)?;
        fs::create_dir(&staging).map_err(io("create", &staging))?;
        let mut dirs = BTreeSet::new();
        let mut parts = Vec::new();
        let total = manifest.files.len()
            + plan
                .carried_forward
                .iter()
                .filter_map(|p| previous.and_then(|v| v.record.part(*p)))
                .map(|p| p.files.len())
                .sum::<usize>();
        let mut done = 0;
        for part in &manifest.carries {
            let mut files = Vec::new();
            for entry in manifest.files_of(*part) {
                let target = staging.join(&entry.path);
                make_parents(&staging, &target, &mut dirs)?;
                copy_checked(&plan.bundle.dir.join(&entry.path), &target, entry)?;
                files.push(entry.clone());
                done += 1;
                (options.progress)(Step::Copied { done, total });
            }
            parts.push(PartRecord {
                part: *part,
                from_version: version,
                needs_encoder: part
                    .needs_encoder()
                    .then(|| manifest.needs.encoder_model_id.clone())
                    .flatten(),
                files,
            });
        }
        if let Some(prev) = previous {
            for part in &plan.carried_forward {
                let Some(rec) = prev.record.part(*part) else {
                    continue;
                };
                for entry in &rec.files {
                    let target = staging.join(&entry.path);
                    make_parents(&staging, &target, &mut dirs)?;
                    link_or_copy(&prev.dir.join(&entry.path), &target, entry)?;
                    done += 1;
                    (options.progress)(Step::Copied { done, total });
                }
                parts.push(rec.clone());
            }
        }
        parts.sort_by_key(|p| p.part);
        let record = VersionRecord {
            version,
            bundle_sha256: plan.bundle.manifest_sha256.clone(),
            signed_by: plan.bundle.signed_by.clone(),
            encoder_model_id: plan.encoder_model_id.clone(),
            parts,
        };
        let record_text = toml::to_string(&record).map_err(|e| UpdateError::State {
            path: staging.join(RECORD),
            reason: e.to_string(),
        })?;
        for (name, bytes) in [
            (RECORD, record_text.as_bytes()),
            (MANIFEST, plan.bundle.manifest_bytes.as_slice()),
            (SIGNATURE, plan.bundle.signature_bytes.as_slice()),
        ] {
            write_new_durably(&staging.join(name), bytes)?;
        }
        // Deepest first, then the staging directory itself: every entry is
        // on disk before the rename makes the version visible.
        for dir in dirs.iter().rev() {
            dermascope_durable::sync_dir(dir).map_err(io("sync", dir))?;
        }
        dermascope_durable::sync_dir(&staging).map_err(io("sync", &staging))?;
        let dir = self.version_dir(version);
        // A leftover of an abandoned or failed earlier try of this version:
        // never current or previous (plan refused those).
        remove_dir_if_present(&dir)?;
        fs::rename(&staging, &dir).map_err(io("rename into place", &dir))?;
        dermascope_durable::sync_dir(&versions).map_err(io("sync", &versions))?;
        Ok(InstalledVersion { dir, record })
    }

    /// After a failed health check (recorded in the trial): back to the
    /// old version, then the failure into the failed list.
    fn finish_failed_trial(&self, state: &mut State) -> Result<Option<Recovery>, UpdateError> {
        let Some(trial) = state.trial.clone() else {
            return Ok(None);
        };
        switch_current(&self.root, trial.back_to)?;
        let reason = trial
            .failed
            .clone()
            .unwrap_or_else(|| "interrupted during its health check".to_owned());
        state
            .failed
            .retain(|f| f.bundle_sha256 != trial.bundle_sha256);
        state.failed.push(FailedBundle {
            version: trial.version,
            bundle_sha256: trial.bundle_sha256.clone(),
            reason,
        });
        state.trial = None;
        self.save_state(state)?;
        self.remove_unused(state)?;
        Ok(Some(Recovery::RolledBack {
            version: trial.version,
            back_to: trial.back_to,
        }))
    }

    /// Finishes an install a kill or power cut interrupted: what the daemon
    /// calls at start, and every install and rollback first.
    pub fn recover(&self) -> Result<Option<Recovery>, UpdateError> {
        let _lock = self.lock()?;
        self.recover_locked()
    }

    fn recover_locked(&self) -> Result<Option<Recovery>, UpdateError> {
        let mut state = self.load_state()?;
        if let Some(intent) = state.rollback.clone() {
            info!(
                version = intent.to,
                "a rollback was interrupted; finishing it"
            );
            switch_current(&self.root, Some(intent.to))?;
            state.previous = intent.from;
            state.rollback = None;
            self.save_state(&state)?;
        }
        let Some(trial) = state.trial.clone() else {
            self.remove_unused(&state)?;
            return Ok(None);
        };
        let current = self.current_version()?;
        if trial.failed.is_some() || current == Some(trial.version) {
            warn!(
                version = trial.version,
                "an update was interrupted after its switch; switching back"
            );
            return self.finish_failed_trial(&mut state);
        }
        info!(
            version = trial.version,
            "an update was interrupted before its switch; the old version stays"
        );
        state.trial = None;
        self.save_state(&state)?;
        self.remove_unused(&state)?;
        Ok(Some(Recovery::Abandoned {
            version: trial.version,
        }))
    }

    /// Switches `current` back to the kept previous version (manual only:
    /// a device never rolls back on its own for lack of a network).
    pub fn rollback(&self) -> Result<u64, UpdateError> {
        let _lock = self.lock()?;
        self.recover_locked()?;
        let mut state = self.load_state()?;
        let previous = state.previous.ok_or(UpdateError::NoPrevious)?;
        let dir = self.version_dir(previous);
        verify_version(&dir)?;
        let current = self.current_version()?;
        state.rollback = Some(RollbackIntent {
            from: current,
            to: previous,
        });
        self.save_state(&state)?;
        switch_current(&self.root, Some(previous))?;
        state.previous = current;
        state.rollback = None;
        self.save_state(&state)?;
        info!(version = previous, "rolled back");
        Ok(previous)
    }

    pub fn status(&self) -> Result<Status, UpdateError> {
        let state = self.load_state()?;
        let current = match self.current_version()? {
            Some(v) => Some(self.installed(v)?),
            None => None,
        };
        Ok(Status {
            current,
            previous: state.previous,
            floor: state.floor,
            revoked_keys: state.revoked_keys.iter().cloned().collect(),
            failed: state.failed.clone(),
            trial_pending: state.trial.as_ref().map(|t| t.version),
        })
    }

    /// Removes versions that are neither current nor previous, and staging
    /// leftovers (best effort: a leftover is never read).
    fn remove_unused(&self, state: &State) -> Result<(), UpdateError> {
        let versions = self.root.join(VERSIONS);
        let Ok(entries) = fs::read_dir(&versions) else {
            return Ok(());
        };
        let current = self.current_version()?;
        let trial = state.trial.as_ref().map(|t| t.version);
        let rollback = state.rollback.as_ref().map(|r| (r.from, r.to));
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let keep = match name.parse::<u64>() {
                Ok(v) => {
                    Some(v) == current
                        || Some(v) == state.previous
                        || Some(v) == trial
                        || rollback.is_some_and(|(from, to)| from == Some(v) || to == v)
                }
                Err(_) => false,
            };
            if !keep {
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    warn!(error = %e, "could not remove an unused version directory");
                }
            }
        }
        let _ = fs::remove_file(self.root.join(CURRENT_TMP));
        Ok(())
    }
}

/// The version `<root>/current` names.
pub fn current_version_at(root: &Path) -> Result<Option<u64>, UpdateError> {
    let link = root.join(CURRENT);
    let target = match fs::read_link(&link) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &link)(e)),
    };
    let bad = || UpdateError::State {
        path: link.clone(),
        reason: format!("points at {}, not {VERSIONS}/<number>", target.display()),
    };
    let mut it = target.components();
    match it.next() {
        Some(std::path::Component::Normal(d)) if d == VERSIONS => {}
        _ => return Err(bad()),
    }
    let version = match it.next() {
        Some(std::path::Component::Normal(v)) => v.to_str().and_then(|v| v.parse().ok()),
        _ => None,
    };
    match (version, it.next()) {
        (Some(v), None) => Ok(Some(v)),
        _ => Err(bad()),
    }
}

/// Points `current` at `versions/<version>` (or removes it) with one
/// rename, then fsyncs the root so the switch survives a power cut.
fn switch_current(root: &Path, version: Option<u64>) -> Result<(), UpdateError> {
    let link = root.join(CURRENT);
    match version {
        Some(v) => {
            let tmp = root.join(CURRENT_TMP);
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io("remove", &tmp)(e))
                }
                _ => {}
            }
            let target = Path::new(VERSIONS).join(v.to_string());
            std::os::unix::fs::symlink(&target, &tmp).map_err(io("create link", &tmp))?;
            fs::rename(&tmp, &link).map_err(io("switch", &link))?;
        }
        None => match fs::remove_file(&link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", &link)(e))
            }
            _ => {}
        },
    }
    dermascope_durable::sync_dir(root).map_err(io("sync", root))
}

fn remove_dir_if_present(dir: &Path) -> Result<(), UpdateError> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", dir)(e)),
        _ => Ok(()),
    }
}

fn make_parents(
    staging: &Path,
    target: &Path,
    dirs: &mut BTreeSet<PathBuf>,
) -> Result<(), UpdateError> {
    let mut missing = Vec::new();
    let mut dir = target.parent();
    while let Some(d) = dir {
        if d == staging || dirs.contains(d) {
            break;
        }
        missing.push(d.to_path_buf());
        dir = d.parent();
    }
    for d in missing.into_iter().rev() {
        fs::create_dir(&d).map_err(io("create", &d))?;
        dirs.insert(d);
    }
    Ok(())
}

/// Copies one bundle file, hashing what it writes: the source was verified,
/// but a stick can change under us, so what lands is checked again.
fn copy_checked(src: &Path, dst: &Path, entry: &FileEntry) -> Result<(), UpdateError> {
    let input = fs::File::open(src).map_err(io("open", src))?;
    let mut input = input.take(entry.size.saturating_add(1));
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io("create", dst))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    loop {
        let n = input.read(&mut buf).map_err(io("read", src))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io("write", dst))?;
    }
    if total != entry.size || hex::encode(hasher.finalize()) != entry.sha256 {
        return Err(UpdateError::ChangedDuringCopy {
            path: entry.path.clone(),
        });
    }
    out.sync_all().map_err(io("sync", dst))
}

/// Installed files are never written again, so a hard link shares them
/// safely; another filesystem falls back to a checked copy.
fn link_or_copy(src: &Path, dst: &Path, entry: &FileEntry) -> Result<(), UpdateError> {
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(_) => copy_checked(src, dst, entry),
    }
}

fn write_new_durably(path: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create", path))?;
    file.write_all(bytes).map_err(io("write", path))?;
    file.sync_all().map_err(io("sync", path))
}

pub(crate) fn toml_string(path: &Path, key: &str) -> Result<Option<String>, UpdateError> {
    let mut text = String::new();
    fs::File::open(path)
        .map_err(io("open", path))?
        .take(MAX_STATE_BYTES)
        .read_to_string(&mut text)
        .map_err(io("read", path))?;
    let value: toml::Table = toml::from_str(&text).map_err(|e| UpdateError::EncoderManifest {
        reason: format!("{}: {}", path.display(), e.message()),
    })?;
    Ok(value.get(key).and_then(|v| v.as_str()).map(str::to_owned))
}

/// The model id in an encoder bundle's `manifest.toml`.
pub fn encoder_model_id(manifest: &Path) -> Result<String, UpdateError> {
    toml_string(manifest, "model_id")?.ok_or_else(|| UpdateError::EncoderManifest {
        reason: format!("{} names no model_id", manifest.display()),
    })
}

fn read_record(dir: &Path) -> Result<VersionRecord, UpdateError> {
    let path = dir.join(RECORD);
    let mut text = String::new();
    fs::File::open(&path)
        .map_err(io("open", &path))?
        .take(crate::manifest::MAX_MANIFEST_BYTES * 2)
        .read_to_string(&mut text)
        .map_err(io("read", &path))?;
    toml::from_str(&text).map_err(|e| UpdateError::VersionCorrupt {
        path,
        reason: e.message().to_owned(),
    })
}

/// Re-hashes every file of an installed version against its record and
/// refuses any file the record does not list.
pub fn verify_version(dir: &Path) -> Result<VersionRecord, UpdateError> {
    let record = read_record(dir)?;
    let corrupt = |reason: String| UpdateError::VersionCorrupt {
        path: dir.to_path_buf(),
        reason,
    };
    let present = walk(dir)?;
    let mut listed: BTreeSet<&str> = [RECORD, MANIFEST, SIGNATURE].into_iter().collect();
    for part in &record.parts {
        for entry in &part.files {
            listed.insert(entry.path.as_str());
            check_file(&dir.join(&entry.path), entry).map_err(|e| corrupt(e.to_string()))?;
        }
    }
    if let Some(extra) = present.iter().find(|p| !listed.contains(p.as_str())) {
        return Err(corrupt(format!("{extra} is not in version.toml")));
    }
    if !present.contains(RECORD) || !present.contains(MANIFEST) || !present.contains(SIGNATURE) {
        return Err(corrupt(
            "version.toml, bundle.toml or its signature is missing".into(),
        ));
    }
    Ok(record)
}
