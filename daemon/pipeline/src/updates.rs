//! Signed updates on the device: which installed version the daemon runs,
//! and installing a bundle that arrives on a USB stick or through the
//! fleet link.
//!
//! The installer itself is `dermascope-update`; this module adds what only
//! the daemon knows: the configuration a version changes, the health check
//! (the new encoder embeds a known image, the adapter predicts, the store
//! of that encoder searches, a screen renders) and the screens.
//!
//! Architecture Invariant: the daemon starts whatever happens to an
//! install. An interrupted install is recovered before anything loads; a
//! version whose record cannot be read leaves the daemon on its embedded
//! configuration with a notice, never without a screen; an install runs
//! only after the loop stopped, the case writer flushed and the store
//! closed, and the process then starts again (the same binary, the same
//! arguments) into whichever version is current.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dermascope_encoder::{Encoder, EncoderOptions};
use dermascope_library::{reembed_into, stores_to_carry, IntoReport, ReembedOptions};
use dermascope_store::{
    Case, CaseFilter, CaseStore, OpenOptions, Residency, ScoreKind, StoreError, StoreIdentity,
};
use dermascope_ui::{Canvas, Screen, StatusView, SyncState};
use dermascope_update::{
    HealthCheck, InstallOptions, InstalledVersion, Installer, Part, Prepare, Recovery, Step,
    TrustedKeys, UpdateError,
};
use tracing::{info, warn};

use dermascope_cloud_api::{UpdateOutcome, UpdateResult, MAX_UPDATE_DETAIL};
use dermascope_sync::ReadyUpdate;

use crate::config::{Config, UpdateSection};
use crate::fleet::FleetLink;

/// The daemon's version, which bundles' `min_daemon_version` is checked
/// against.
pub const DAEMON_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The configuration file a version's `config/` part holds.
pub const CONFIG_FILE: &str = "dermascope.toml";

/// The reference cases a version's `library/` part holds: one JSON case per
/// line, embedded by the encoder the bundle names (what `dermascope cases
/// --export-reference` writes and `dermascope-cloud reference import`
/// reads).
pub const LIBRARY_FILE: &str = "cases.jsonl";

/// A snapshot is a list of cases, not photographs' worth of data: a line
/// longer than this is damage.
const MAX_LIBRARY_LINE: usize = 4 << 20;

/// What the start found under `[update] root`.
#[derive(Clone, Debug, Default)]
pub struct StartedVersion {
    /// The version the daemon runs, `None` when nothing is installed.
    pub version: Option<u64>,
    /// What recovering an interrupted install did, in words.
    pub recovery: Option<String>,
    /// Why the installed version is not used (the daemon then runs its
    /// own configuration and says so).
    pub problem: Option<String>,
    /// The version's reference-library snapshot, when it carries one.
    pub library: Option<PathBuf>,
}

/// Recovers an interrupted install, then returns `base` with the current
/// version's parts in place of its own: its configuration file (keeping
/// `base`'s `[update]`), its encoder, its adapter, and the store of its
/// encoder. Without `[update]` it is `base` unchanged.
pub fn start_from_installed(base: Config) -> (Config, StartedVersion) {
    let Some(section) = base.update.clone() else {
        return (base, StartedVersion::default());
    };
    let mut started = StartedVersion::default();
    // Recovery reads only the root's own records; an unreadable key
    // directory must not stop it.
    let keys = TrustedKeys::load(&section.keys()).unwrap_or_else(|e| {
        warn!(error = %e, "trusted update keys not loaded; recovery only");
        TrustedKeys::from_keys([])
    });
    let installer = Installer::new(&section.root, keys, DAEMON_VERSION);
    match installer.recover() {
        Ok(None) => {}
        Ok(Some(recovery)) => {
            let text = recovery_words(&recovery);
            warn!(recovery = %text, "an interrupted install was recovered");
            started.recovery = Some(text);
        }
        Err(e) => {
            warn!(error = %e, "recovering an interrupted install failed");
            started.problem = Some(format!("recovering an interrupted install: {e}"));
        }
    }
    let current = match installer.status() {
        Ok(status) => status.current,
        Err(e) => {
            started.problem = Some(format!("reading the installed versions: {e}"));
            None
        }
    };
    let Some(current) = current else {
        return (base, started);
    };
    match installed_config(&base, &section, &current) {
        Ok(config) => {
            info!(
                version = current.record.version,
                "running the installed version"
            );
            started.version = Some(current.record.version);
            if current.record.part(Part::Library).is_some() {
                started.library = Some(current.part_dir(Part::Library).join(LIBRARY_FILE));
            }
            (config, started)
        }
        Err(problem) => {
            warn!(%problem, version = current.record.version, "installed version not used");
            started.problem = Some(problem);
            (base, started)
        }
    }
}

fn recovery_words(recovery: &Recovery) -> String {
    match recovery {
        Recovery::Abandoned { version } => {
            format!("the install of update {version} was interrupted before its switch; nothing changed")
        }
        Recovery::RolledBack { version, back_to } => format!(
            "update {version} was interrupted during its check; switched back to {} and marked it failed",
            back_to.map_or("the factory version".into(), |v| format!("version {v}"))
        ),
    }
}

/// `base` with `version`'s parts in place.
fn installed_config(
    base: &Config,
    section: &UpdateSection,
    version: &InstalledVersion,
) -> Result<Config, String> {
    let mut config = if version.record.part(Part::Config).is_some() {
        let path = version.part_dir(Part::Config).join(CONFIG_FILE);
        let mut config = Config::load(&path).map_err(|e| e.to_string())?;
        config.update = Some(section.clone());
        // The A/B slots are the image's, not the fleet's: a version's
        // configuration (written for any image) must not switch off the
        // confirmation the image's own OS update depends on.
        config.boot = base.boot.clone();
        config
    } else {
        base.clone()
    };
    if version.record.part(Part::Encoder).is_some() {
        config.encoder.bundle = Some(version.part_dir(Part::Encoder));
    }
    if version.record.part(Part::Adapter).is_some() {
        config.adapter.dir = version.part_dir(Part::Adapter);
    }
    if let Some(model_id) = &version.record.encoder_model_id {
        config.store.dir = dermascope_library::store_for_encoder(&config.store.dir, model_id)
            .map_err(|e| e.to_string())?;
    }
    Ok(config)
}

/// Reads a reference-library snapshot for the store of `identity`: every
/// line must be a reference case of that encoder, or the whole snapshot is
/// refused with the line that is wrong.
pub fn read_library(path: &Path, identity: &StoreIdentity) -> Result<Vec<Case>, String> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut cases = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("line {}: {e}", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > MAX_LIBRARY_LINE {
            return Err(format!(
                "line {}: longer than {MAX_LIBRARY_LINE} bytes",
                i + 1
            ));
        }
        let mut wire: dermascope_cloud_api::WireCase =
            serde_json::from_str(&line).map_err(|e| format!("line {}: {e}", i + 1))?;
        // The export leaves the source out, as an upload does; a snapshot
        // holds reference cases only, never another clinic's captures.
        if wire.source == Some(dermascope_cloud_api::WireSource::Fleet) {
            return Err(format!(
                "line {}: a fleet case, not a reference case",
                i + 1
            ));
        }
        wire.source = Some(dermascope_cloud_api::WireSource::Reference);
        let case = dermascope_sync::convert::from_wire(wire, identity)
            .map_err(|refused| format!("line {}: {}", i + 1, refused.0))?;
        cases.push(case);
    }
    Ok(cases)
}

/// Records which snapshot was added to which store, so the starts after
/// the first do not parse a snapshot (megabytes of JSON) to add nothing.
const LIBRARY_ADDED: &str = "library-added";

/// Adds the cases of the snapshot at `snapshot` that the store at
/// `store_dir` lacks, once per snapshot and store (recorded under `root`);
/// `None` when it was added before.
pub fn add_library_once(
    root: &Path,
    snapshot: &Path,
    store: &CaseStore,
    store_dir: &Path,
    identity: &StoreIdentity,
) -> Result<Option<usize>, String> {
    let marker = root.join(LIBRARY_ADDED);
    let key = format!("{}\n{}\n", snapshot.display(), store_dir.display());
    if std::fs::read_to_string(&marker).is_ok_and(|done| done == key) {
        return Ok(None);
    }
    let cases = read_library(snapshot, identity)?;
    let added = add_library(store, &cases).map_err(|e| e.to_string())?;
    if let Err(e) = dermascope_durable::replace_durably(&marker, key.as_bytes()) {
        // The next start parses the snapshot again and adds nothing.
        warn!(error = %e, "the added reference library was not recorded");
    }
    Ok(Some(added))
}

/// Adds the snapshot's cases the store lacks (a start after the first adds
/// nothing); returns how many were added.
pub fn add_library(store: &CaseStore, cases: &[Case]) -> Result<usize, StoreError> {
    let mut missing = Vec::new();
    for case in cases {
        if !store.contains(&case.id)? {
            missing.push(case.clone());
        }
    }
    for batch in missing.chunks(256) {
        store.insert_batch(batch)?;
    }
    Ok(missing.len())
}

/// A verified bundle waiting to be installed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundBundle {
    /// The bundle directory (an archive is unpacked first).
    pub dir: PathBuf,
    pub version: u64,
    pub origin: Origin,
}

/// Where a bundle came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Usb,
    /// Downloaded for a rollout; the outcome goes back to the service.
    Fleet {
        rollout_id: String,
        archive: PathBuf,
    },
}

/// What to do about an update the fleet link handed over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetAction {
    Install(FoundBundle),
    /// Switch back from `version` (current) to the kept previous version.
    Rollback {
        rollout_id: String,
        version: u64,
    },
    /// Nothing to install; the outcome was already reported.
    Reported,
}

/// Where unpacked archives wait for their install.
const INCOMING: &str = "incoming";
/// An install's outcome, kept across the start it ends with so the fleet
/// link of the next start reports it.
const PENDING_RESULT: &str = "pending-result.json";
/// Where the fleet link downloads archives.
pub const DOWNLOADS: &str = "downloads";
/// Versions whose automatic install stopped short of the health check.
const STOPPED: &str = "stopped-installs.json";

fn read_stopped(root: &Path) -> Vec<(u64, String)> {
    std::fs::read(root.join(STOPPED))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// The installed version and the versions marked failed under `root`,
/// for the report the fleet link sends (read without keys).
pub fn installed_state(root: &Path) -> (Option<u64>, Vec<u64>) {
    let installer = Installer::new(root, TrustedKeys::from_keys([]), DAEMON_VERSION);
    match installer.status() {
        Ok(status) => (
            status.current.map(|c| c.record.version),
            status.failed.iter().map(|f| f.version).collect(),
        ),
        Err(e) => {
            warn!(error = %e, "the installed versions could not be read for the fleet report");
            (None, Vec::new())
        }
    }
}

fn result(
    rollout_id: &str,
    version: u64,
    outcome: UpdateOutcome,
    detail: Option<String>,
) -> UpdateResult {
    UpdateResult {
        rollout_id: rollout_id.to_owned(),
        version,
        outcome,
        detail: detail.map(|d| d.chars().take(MAX_UPDATE_DETAIL).collect()),
    }
}

/// What one look at the watch directory found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsbFinding {
    /// A verified bundle newer than what runs: install it.
    Install(FoundBundle),
    /// A bundle that cannot be installed, with why (shown once per stick).
    Refused { reason: String },
}

/// The daemon's side of updates while it serves.
pub struct DeviceUpdates {
    section: UpdateSection,
    installer: Installer,
    /// The store path before [`start_from_installed`] chose the current
    /// encoder's store: where every encoder's store is found from.
    store_base: PathBuf,
    /// The encoder the device runs when no installed version carries one.
    factory_encoder: PathBuf,
    encoder: EncoderOptions,
    screen_size: (u32, u32),
    next_look: Instant,
    /// The stick's bundle already acted on, so it is not planned (every
    /// file re-hashed) at each look while it stays plugged in.
    handled: Option<(PathBuf, Marker)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Marker {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl DeviceUpdates {
    /// `base` is the configuration file as written (its `[store] dir`),
    /// `running` what [`start_from_installed`] made of it, and
    /// `factory_encoder` the encoder bundle used when no installed version
    /// carries one. `None` when there is no `[update]`. Keys that do not
    /// load leave the device unable to install: an error the caller shows.
    pub fn new(
        base: &Config,
        running: &Config,
        factory_encoder: &Path,
    ) -> Result<Option<DeviceUpdates>, UpdateError> {
        let Some(section) = base.update.clone() else {
            return Ok(None);
        };
        let keys = TrustedKeys::load(&section.keys())?;
        Ok(Some(DeviceUpdates {
            installer: Installer::new(&section.root, keys, DAEMON_VERSION),
            section,
            store_base: base.store.dir.clone(),
            factory_encoder: factory_encoder.to_path_buf(),
            encoder: crate::assembly::encoder_options(running),
            screen_size: (running.display.width, running.display.height),
            next_look: Instant::now(),
            handled: None,
        }))
    }

    pub fn installer(&self) -> &Installer {
        &self.installer
    }

    /// Looks at the watch directory when it is due (every
    /// `watch_interval_s`); cheap when nothing changed.
    pub fn look_at_usb(&mut self, now: Instant) -> Option<UsbFinding> {
        let dir = self.section.watch_dir.clone()?;
        if now < self.next_look {
            return None;
        }
        self.next_look = now + Duration::from_secs(self.section.watch_interval_s);
        let Some((path, marker)) = find_bundle(&dir) else {
            // The stick was taken out: the next one is looked at afresh.
            self.handled = None;
            return None;
        };
        if self.handled.as_ref() == Some(&(path.clone(), marker)) {
            return None;
        }
        self.handled = Some((path.clone(), marker));
        info!("an update bundle was found on the USB stick; verifying it");
        let dir = if path.is_file() {
            match self.unpack(&path, "usb") {
                Ok(dir) => dir,
                Err(e) => {
                    warn!(error = %e, "the USB stick's bundle archive was refused");
                    return Some(UsbFinding::Refused {
                        reason: e.to_string(),
                    });
                }
            }
        } else {
            path
        };
        match self.installer.plan(&dir) {
            Ok(plan) if plan.already_installed => None,
            Ok(plan) => match self.stopped_before(plan.bundle.manifest.version) {
                Some(reason) => Some(UsbFinding::Refused { reason }),
                None => Some(UsbFinding::Install(FoundBundle {
                    dir,
                    version: plan.bundle.manifest.version,
                    origin: Origin::Usb,
                })),
            },
            Err(e) => {
                warn!(error = %e, "the USB stick's bundle was refused");
                Some(UsbFinding::Refused {
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Unpacks `archive` into a fresh `<root>/incoming/<name>`.
    fn unpack(&self, archive: &Path, name: &str) -> Result<PathBuf, UpdateError> {
        let incoming = self.section.root.join(INCOMING);
        let dest = incoming.join(name);
        match std::fs::remove_dir_all(&dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(UpdateError::Io {
                    action: "clear",
                    path: dest,
                    error: e,
                })
            }
        }
        dermascope_durable::create_private_dir_all(&incoming).map_err(|e| UpdateError::Io {
            action: "create",
            path: incoming.clone(),
            error: e,
        })?;
        dermascope_update::archive::unpack(archive, &dest)?;
        Ok(dest)
    }

    /// Decides what to do about an update the fleet link handed over:
    /// anything refused before the install is reported at once, and the
    /// device carries on.
    pub fn take_fleet_update(&self, ready: ReadyUpdate, fleet: &FleetLink) -> FleetAction {
        match ready {
            ReadyUpdate::Install {
                rollout_id,
                version,
                archive,
            } => {
                let refuse = |e: UpdateError| {
                    warn!(error = %e, version, "the fleet's bundle was refused");
                    fleet.report_update(result(
                        &rollout_id,
                        version,
                        UpdateOutcome::Refused,
                        Some(e.to_string()),
                    ));
                    let _ = std::fs::remove_file(&archive);
                    FleetAction::Reported
                };
                let dir = match self.unpack(&archive, &format!("fleet-{version}")) {
                    Ok(dir) => dir,
                    Err(e) => return refuse(e),
                };
                match self.installer.plan(&dir) {
                    Ok(plan) if plan.already_installed => {
                        fleet.report_update(result(
                            &rollout_id,
                            version,
                            UpdateOutcome::Installed,
                            None,
                        ));
                        let _ = std::fs::remove_file(&archive);
                        FleetAction::Reported
                    }
                    Ok(plan) => match self.stopped_before(plan.bundle.manifest.version) {
                        Some(reason) => {
                            fleet.report_update(result(
                                &rollout_id,
                                version,
                                UpdateOutcome::Refused,
                                Some(reason),
                            ));
                            let _ = std::fs::remove_file(&archive);
                            FleetAction::Reported
                        }
                        None => FleetAction::Install(FoundBundle {
                            dir,
                            version: plan.bundle.manifest.version,
                            origin: Origin::Fleet {
                                rollout_id,
                                archive,
                            },
                        }),
                    },
                    Err(e) => refuse(e),
                }
            }
            ReadyUpdate::Rollback {
                rollout_id,
                version,
            } => match self.installer.current_version() {
                Ok(Some(current)) if current == version => FleetAction::Rollback {
                    rollout_id,
                    version,
                },
                // Not (or no longer) on that version: nothing to undo.
                _ => {
                    fleet.report_update(result(
                        &rollout_id,
                        version,
                        UpdateOutcome::RolledBack,
                        None,
                    ));
                    FleetAction::Reported
                }
            },
        }
    }

    /// Why an automatic install of `version` stopped before, if it did
    /// without the installer marking it failed (a full disk while copying
    /// or re-embedding): the daemon starts again after every attempt, and
    /// trying again at each start would keep the device from capturing.
    fn stopped_before(&self, version: u64) -> Option<String> {
        let stopped = read_stopped(&self.section.root);
        let (_, why) = stopped.into_iter().find(|(v, _)| *v == version)?;
        Some(format!(
            "installing update {version} stopped before ({why}); it is not tried again by \
             itself: fix the cause, then install it with `dermascope update install`"
        ))
    }

    /// Records that an automatic install of `version` stopped with `why`.
    pub fn record_stopped(&self, version: u64, why: &str) {
        let mut stopped = read_stopped(&self.section.root);
        stopped.retain(|(v, _)| *v != version);
        stopped.push((version, why.chars().take(MAX_UPDATE_DETAIL).collect()));
        let path = self.section.root.join(STOPPED);
        let written = serde_json::to_vec(&stopped)
            .map_err(std::io::Error::other)
            .and_then(|bytes| dermascope_durable::replace_durably(&path, &bytes));
        if let Err(e) = written {
            warn!(error = %e, "a stopped install was not recorded; it may be tried again");
        }
    }

    /// Keeps `outcome` of a fleet install for the next start's fleet link.
    pub fn keep_result(&self, outcome: &UpdateResult) {
        let path = self.section.root.join(PENDING_RESULT);
        let written = serde_json::to_vec(outcome)
            .map_err(std::io::Error::other)
            .and_then(|bytes| dermascope_durable::replace_durably(&path, &bytes));
        if let Err(e) = written {
            // The next report of what the device runs settles it anyway.
            warn!(error = %e, "the update's outcome was not kept for the service");
        }
    }

    /// The outcome a previous start kept, removed once taken.
    pub fn take_kept_result(&self) -> Option<UpdateResult> {
        let path = self.section.root.join(PENDING_RESULT);
        let bytes = std::fs::read(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        serde_json::from_slice(&bytes).ok()
    }

    /// Clears what an earlier install left in `incoming/`.
    pub fn tidy(&self) {
        let incoming = self.section.root.join(INCOMING);
        if let Err(e) = std::fs::remove_dir_all(&incoming) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(error = %e, "unpacked bundles were not removed");
            }
        }
    }

    /// Switches back to the kept previous version (the loop has stopped
    /// and the store is closed).
    pub fn rollback(&self) -> Result<u64, UpdateError> {
        self.installer.rollback()
    }

    /// The outcome of installing `bundle`, for the service.
    pub fn outcome_of(
        bundle: &FoundBundle,
        installed: &Result<u64, UpdateError>,
    ) -> Option<UpdateResult> {
        let Origin::Fleet { rollout_id, .. } = &bundle.origin else {
            return None;
        };
        Some(match installed {
            Ok(_) => result(rollout_id, bundle.version, UpdateOutcome::Installed, None),
            Err(e @ UpdateError::HealthCheck { .. }) => result(
                rollout_id,
                bundle.version,
                UpdateOutcome::Failed,
                Some(e.to_string()),
            ),
            Err(e) => result(
                rollout_id,
                bundle.version,
                UpdateOutcome::Refused,
                Some(e.to_string()),
            ),
        })
    }

    /// Installs `bundle` (the loop has stopped and the store is closed),
    /// drawing each step through `show`. Returns the installed version, or
    /// why not (the device is then on the version it ran).
    pub fn install(&self, bundle: &Path, mut show: impl FnMut(Screen)) -> Result<u64, UpdateError> {
        let check = DeviceCheck {
            store_base: self.store_base.clone(),
            factory_encoder: self.factory_encoder.clone(),
            encoder: self.encoder.clone(),
            screen_size: self.screen_size,
        };
        let version_hint = std::cell::Cell::new(None::<u64>);
        let show = RefCell::new(&mut show);
        let title = || match version_hint.get() {
            Some(v) => format!("Installing update {v}"),
            None => "Installing update".to_owned(),
        };
        let progress = |step: Step| {
            let (detail, done, total) = match step {
                Step::Verified { files, .. } => (format!("Verified {files} files"), 0, 0),
                Step::Copied { done, total } => (
                    "Copying the new version".to_owned(),
                    done as u64,
                    total as u64,
                ),
                Step::Staged | Step::Prepared => ("Preparing the new version".into(), 0, 0),
                Step::TrialRecorded | Step::Switched => ("Switching to it".into(), 0, 0),
                Step::Checked => ("Checked: the new version works".into(), 1, 1),
                Step::Committed => ("Installed".into(), 1, 1),
            };
            (show.borrow_mut())(Screen::Updating {
                title: title(),
                detail,
                done,
                total,
            });
        };
        let reembedding = |done: usize, total: usize| {
            (show.borrow_mut())(Screen::Updating {
                title: title(),
                detail: "Re-embedding the cases for the new model".into(),
                done: done as u64,
                total: total as u64,
            });
        };
        let carry = CarryCases {
            store_base: self.store_base.clone(),
            encoder: self.encoder.clone(),
            progress: &reembedding,
            report: RefCell::new(None),
        };
        if let Ok(plan) = self.installer.plan(bundle) {
            version_hint.set(Some(plan.bundle.manifest.version));
        }
        let report = self.installer.install(
            bundle,
            &InstallOptions {
                retry_failed: false,
                prepare: &carry,
                health: &check,
                progress: &progress,
            },
        )?;
        Ok(report.version)
    }
}

/// Before the switch: when the new version's encoder is not the one the
/// cases are embedded with (the previous version's, or the store's own),
/// the cases are re-embedded with the new encoder into its own store
/// (`stores_to_carry`). The old store is only read, so a kill here leaves
/// the old version current with its store whole, and the next attempt
/// resumes from the last flushed batch.
pub struct CarryCases<'a> {
    pub store_base: PathBuf,
    pub encoder: EncoderOptions,
    /// Cases done of the total, after each flushed batch.
    pub progress: &'a dyn Fn(usize, usize),
    /// What the re-embedding did, when it ran.
    pub report: RefCell<Option<IntoReport>>,
}

impl Prepare for CarryCases<'_> {
    fn prepare(
        &self,
        new: &InstalledVersion,
        previous: Option<&InstalledVersion>,
    ) -> Result<(), String> {
        let Some(new_model) = new.record.encoder_model_id.as_deref() else {
            return Ok(());
        };
        let previous_model = previous.and_then(|p| p.record.encoder_model_id.as_deref());
        let carry = stores_to_carry(&self.store_base, previous_model, new_model)
            .map_err(|e| format!("finding the case store to re-embed: {e}"))?;
        let Some(carry) = carry else {
            return Ok(());
        };
        let encoder = match Encoder::load(&new.part_dir(Part::Encoder), &self.encoder) {
            Ok(encoder) => encoder,
            Err(e) => {
                // The health check refuses it and records the bundle as
                // failed; failing here would leave it to be retried.
                warn!(error = %e, "the new encoder does not load; not re-embedding");
                return Ok(());
            }
        };
        info!(to = new_model, "re-embedding the cases for the new encoder");
        let report = reembed_into(
            &carry.source,
            &carry.target,
            &encoder,
            ReembedOptions::default(),
            |p| {
                (self.progress)(p.done, p.total);
                ControlFlow::Continue(())
            },
        )
        .map_err(|e| format!("re-embedding the cases for encoder {new_model}: {e}"))?;
        info!(
            reembedded = report.reembedded,
            present = report.present,
            without_original = report.without_original.len(),
            unreadable = report.unreadable.len(),
            "cases carried to the new encoder's store"
        );
        *self.report.borrow_mut() = Some(report);
        Ok(())
    }
}

/// The bundle at `dir` (a directory holding `bundle.toml`, there or one
/// level below, or a `*.tar` bundle archive there; the first by name),
/// with a marker that changes when it is rewritten.
fn find_bundle(dir: &Path) -> Option<(PathBuf, Marker)> {
    let marker = |manifest: &Path| {
        let meta = std::fs::metadata(manifest).ok()?;
        Some(Marker {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    };
    let manifest = dir.join(dermascope_update::manifest::MANIFEST);
    if let Some(m) = marker(&manifest) {
        return Some((dir.to_path_buf(), m));
    }
    let mut found: Vec<(PathBuf, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter_map(|p| {
            let manifest = p.join(dermascope_update::manifest::MANIFEST);
            if manifest.is_file() {
                Some((p, manifest))
            } else if p.is_file() && p.extension().is_some_and(|e| e == "tar") {
                Some((p.clone(), p))
            } else {
                None
            }
        })
        .collect();
    found.sort();
    let (first, marked) = found.into_iter().next()?;
    let m = marker(&marked)?;
    Some((first, m))
}

/// The health check of a new version, run after the switch: its encoder
/// loads and embeds a known image, the adapter (if any) loads for that
/// encoder and predicts, the store of that encoder opens and answers a
/// search, and a screen renders at the panel's size.
pub struct DeviceCheck {
    pub store_base: PathBuf,
    pub factory_encoder: PathBuf,
    pub encoder: EncoderOptions,
    pub screen_size: (u32, u32),
}

impl HealthCheck for DeviceCheck {
    fn check(&self, version: &InstalledVersion) -> Result<(), String> {
        let encoder_dir = if version.record.part(Part::Encoder).is_some() {
            version.part_dir(Part::Encoder)
        } else {
            self.factory_encoder.clone()
        };
        let part = |part: Part, file: Option<&str>| {
            version.record.part(part).map(|_| {
                let dir = version.part_dir(part);
                file.map_or(dir.clone(), |file| dir.join(file))
            })
        };
        self.check_parts(&CheckedParts {
            encoder_dir: &encoder_dir,
            adapter_dir: part(Part::Adapter, None).as_deref(),
            config_file: part(Part::Config, Some(CONFIG_FILE)).as_deref(),
            library: part(Part::Library, Some(LIBRARY_FILE)).as_deref(),
            store: StoreAt::ForEncoder(&self.store_base),
        })
    }
}

/// The parts one health check looks at.
pub struct CheckedParts<'a> {
    pub encoder_dir: &'a Path,
    /// Checked when given: the adapter must load for that encoder and
    /// predict.
    pub adapter_dir: Option<&'a Path>,
    pub config_file: Option<&'a Path>,
    pub library: Option<&'a Path>,
    pub store: StoreAt<'a>,
}

/// Which case store the check searches.
pub enum StoreAt<'a> {
    /// The store of the encoder under this base (an install's check: the
    /// new encoder's store, carried or not yet made).
    ForEncoder(&'a Path),
    /// This store, which the running configuration already chose.
    Exactly(&'a Path),
}

impl DeviceCheck {
    /// The check itself, for an installed version or for the parts a
    /// start is about to run (`boot_check`). A store that does not exist
    /// yet passes: the daemon makes it.
    pub fn check_parts(&self, parts: &CheckedParts) -> Result<(), String> {
        let encoder = Encoder::load(parts.encoder_dir, &self.encoder)
            .map_err(|e| format!("the encoder does not load: {e}"))?;
        let embedding = encoder
            .embed_rgb(&known_image())
            .map_err(|e| format!("the encoder does not embed: {e}"))?;
        if !embedding.values().iter().all(|v| v.is_finite()) {
            return Err("the encoder's embedding of the test image is not finite".into());
        }
        if let Some(dir) = parts.adapter_dir {
            let adapter = dermascope_library::load_installed(dir, &encoder)
                .map_err(|e| format!("the adapter does not load: {e}"))?;
            adapter
                .predict(embedding.values())
                .map_err(|e| format!("the adapter does not predict: {e}"))?;
        }
        if let Some(path) = parts.config_file {
            Config::load(path).map_err(|e| format!("the configuration is not valid: {e}"))?;
        }
        let identity = StoreIdentity {
            model_id: encoder.model_id().to_owned(),
            embedding_dim: encoder.dim(),
        };
        if let Some(path) = parts.library {
            read_library(path, &identity)
                .map_err(|e| format!("the reference library is not usable: {e}"))?;
        }
        let store_dir = match parts.store {
            StoreAt::ForEncoder(base) => {
                dermascope_library::store_for_encoder(base, encoder.model_id())
                    .map_err(|e| format!("the case store for this encoder: {e}"))?
            }
            StoreAt::Exactly(dir) => dir.to_path_buf(),
        };
        if store_dir.exists() {
            let store = CaseStore::open_with(
                &store_dir,
                identity,
                OpenOptions {
                    residency: Residency::Int8,
                    no_cache_on_close: true,
                },
            )
            .map_err(|e| format!("the case store does not open for this encoder: {e}"))?;
            store
                .search(
                    embedding.values(),
                    1,
                    &CaseFilter::default(),
                    ScoreKind::Int8,
                )
                .map_err(|e| format!("the case store does not search: {e}"))?;
        }
        let (width, height) = self.screen_size;
        let mut canvas = Canvas::new(width, height)
            .map_err(|e| format!("no screen of {width}x{height}: {e}"))?;
        let status = StatusView {
            sync: SyncState::Offline,
            pending_uploads: 0,
            cases_in_library: 0,
            clock: None,
            last_sync_minutes: None,
        };
        let ready = Screen::Ready {
            live: None,
            hint: "Press the button to capture".into(),
        };
        dermascope_ui::render(&mut canvas, &status, &ready)
            .map_err(|e| format!("the ready screen does not render: {e:?}"))?;
        Ok(())
    }
}

/// A lesion-like test image made in code: a dark ellipse with a soft edge
/// on skin tone, so the check needs no file that could be missing.
pub fn known_image() -> image::RgbImage {
    image::RgbImage::from_fn(320, 240, |x, y| {
        let dx = (x as f32 - 160.0) / 70.0;
        let dy = (y as f32 - 120.0) / 50.0;
        let r = (dx * dx + dy * dy).sqrt();
        let t = (1.0 - r).clamp(0.0, 1.0);
        let mix = |skin: f32, lesion: f32| (skin + (lesion - skin) * t) as u8;
        image::Rgb([mix(214.0, 92.0), mix(170.0, 54.0), mix(150.0, 40.0)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dermascope_cloud_api::{WireCase, WireDiagnosis, WireMetadata, WireSource};

    fn identity() -> StoreIdentity {
        StoreIdentity {
            model_id: "enc-a".into(),
            embedding_dim: 3,
        }
    }

    fn wire(id: &str, source: Option<WireSource>) -> String {
        serde_json::to_string(&WireCase {
            id: id.into(),
            revision: 1,
            model_id: "enc-a".into(),
            embedding: vec![0.5, 0.5, 0.7],
            diagnosis: WireDiagnosis {
                code: "nv".into(),
                name: "Melanocytic nevus".into(),
            },
            label_confirmed: true,
            metadata: WireMetadata::default(),
            created_at_ms: 1,
            updated_at_ms: 1,
            thumbnail_jpeg: vec![0xff, 0xd8],
            original_jpeg: None,
            source,
            device_id: None,
        })
        .unwrap()
    }

    #[test]
    fn a_snapshot_is_taken_whole_once_or_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LIBRARY_FILE);
        std::fs::write(
            &path,
            format!(
                "{}\n\n{}\n",
                wire("r1", None),
                wire("r2", Some(WireSource::Reference))
            ),
        )
        .unwrap();
        let cases = read_library(&path, &identity()).unwrap();
        assert_eq!(cases.len(), 2);
        assert!(cases
            .iter()
            .all(|c| c.source == dermascope_store::CaseSource::Reference));
        let store = CaseStore::open(dir.path().join("cases"), identity()).unwrap();
        assert_eq!(add_library(&store, &cases).unwrap(), 2);
        assert_eq!(
            add_library(&store, &cases).unwrap(),
            0,
            "a second start adds nothing"
        );
        assert_eq!(store.len().unwrap(), 2);

        for (bad, says) in [
            (wire("f1", Some(WireSource::Fleet)), "line 2: a fleet case"),
            ("{not json".to_owned(), "line 2:"),
            (
                wire("r3", None).replace("enc-a", "enc-b"),
                "line 2: embedded by",
            ),
        ] {
            std::fs::write(&path, format!("{}\n{bad}\n", wire("r1", None))).unwrap();
            let err = read_library(&path, &identity()).unwrap_err();
            assert!(err.starts_with(says), "{err}");
        }
    }
}
