//! The daemon assembled from its configuration, in the order that lets
//! every later problem be shown: the display first, then the trigger,
//! light and camera, then the encoder, the case store, the reference
//! cases, the adapter.
//!
//! Architecture Invariant: only a display that cannot be opened ends the
//! start without a screen. Every other start-up failure is drawn as an
//! error screen saying what to do before [`Daemon::from_config`] returns it
//! (the process then exits non-zero, and systemd restarts it with backoff);
//! an adapter that does not load is not a failure: the daemon runs without
//! it and says so on the ready screen and in the log.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dermascope_adapter::Adapter;
use dermascope_device::Display;
use dermascope_encoder::{Encoder, EncoderError, EncoderOptions, VariantChoice};
use dermascope_library::{
    ingest, load_installed, read_labels, IngestError, IngestOptions, IngestProgress, LabelsError,
};
use dermascope_store::{
    CaseSource, CaseStore, OpenOptions, Residency, ScoreKind, StoreError, StoreIdentity,
};
use dermascope_ui::{Canvas, Screen, StatusView, SyncState};
use tracing::{info, warn};

use crate::analysis::Analyzer;
use crate::config::{CaptureKind, Config, KeepOriginals};
use crate::daemon::{CaptureMode, CaseSettings, Daemon};
use crate::fleet::FleetLink;
use crate::hardware::{self, Drivers, HardwareError};
use crate::identity::{device_id, DeviceIdError};
use crate::retrain::{RetrainSettings, Retrainer};

/// What the command line adds to the configuration.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    /// The encoder bundle, resolved by the caller (flag, environment,
    /// `[encoder] bundle`, the installed default).
    pub bundle: PathBuf,
    /// Reference cases to add before serving (resumable).
    pub reference_cases: Option<ReferenceCases>,
    /// The installed version's reference-library snapshot
    /// ([`crate::updates::LIBRARY_FILE`]): its cases the store lacks are
    /// added at start.
    pub library_snapshot: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct ReferenceCases {
    pub images: PathBuf,
    pub labels: PathBuf,
}

/// Why the daemon could not start, each with what to change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Hardware(#[from] HardwareError),
    #[error("loading the encoder from {bundle}: {source}")]
    Encoder {
        bundle: PathBuf,
        #[source]
        source: EncoderError,
    },
    #[error("opening the case store at {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("reading the reference cases: {0}")]
    Labels(#[from] LabelsError),
    #[error("{path} has no usable rows")]
    NoReferenceRows { path: PathBuf },
    #[error("adding reference cases: {0}")]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    DeviceId(#[from] DeviceIdError),
}

impl StartError {
    /// What the clinician sees, in place of the ready screen.
    pub fn screen(&self) -> Screen {
        let (title, what_to_fix) = match self {
            StartError::Hardware(_) => (
                "Hardware not found",
                "The button, light or camera could not be opened. Restart the device; if it \
                 repeats, call service.",
            ),
            StartError::Encoder { .. } => (
                "Model not loaded",
                "The image model is missing or damaged. Reinstall the last update; if it \
                 repeats, call service.",
            ),
            StartError::Store { source, .. } if source.is_disk_full() => (
                "Storage full",
                "The case library cannot be opened: the storage is full. Call service to free \
                 space; stored cases are safe.",
            ),
            StartError::Store { .. } => (
                "Case library not opened",
                "The case library could not be opened. Restart the device; if it repeats, call \
                 service. Stored cases are not deleted.",
            ),
            StartError::Labels(_) | StartError::NoReferenceRows { .. } | StartError::Ingest(_) => (
                "Reference cases not added",
                "The reference library could not be added. Check the labels file named in the \
                 log, then restart.",
            ),
            StartError::DeviceId(_) => (
                "Device id unreadable",
                "The device's id could not be read or made. Call service.",
            ),
        };
        Screen::Error {
            title: title.into(),
            what_to_fix: what_to_fix.into(),
        }
    }
}

/// What the start found, for the log and the caller's summary.
#[derive(Clone, Debug, Default)]
pub struct StartReport {
    pub library_cases: usize,
    pub references_added: usize,
    pub references_refused: usize,
    /// The installed adapter, or why there is none in use.
    pub adapter: Option<String>,
    pub adapter_problem: Option<String>,
    /// Why `[sync]` is configured but the fleet link did not start.
    pub sync_problem: Option<String>,
    /// Why the installed version's reference library was not added.
    pub library_problem: Option<String>,
}

/// The encoder's options from `[encoder]`.
pub fn encoder_options(config: &Config) -> EncoderOptions {
    let defaults = EncoderOptions::default();
    EncoderOptions {
        variant: VariantChoice::from_name(config.encoder.variant.as_deref()),
        threads: config.encoder.threads.unwrap_or(defaults.threads),
        allow_slow_int8: config.encoder.allow_slow_int8,
        ..defaults
    }
}

impl Daemon {
    /// The daemon as `config` describes it, the real drivers coming from
    /// `drivers`. `on_ingest` sees the reference cases being added (the
    /// first start embeds the whole library).
    pub fn from_config(
        config: &Config,
        drivers: Arc<dyn Drivers>,
        options: &StartOptions,
        mut on_ingest: impl FnMut(IngestProgress),
    ) -> Result<(Daemon, StartReport), StartError> {
        let mut display = hardware::open_display(config, &drivers)?;
        let shown = |display: &mut Box<dyn Display>, error: StartError| {
            show_start_failure(display.as_mut(), &error);
            error
        };
        macro_rules! or_show {
            ($result:expr) => {
                match $result {
                    Ok(value) => value,
                    Err(error) => return Err(shown(&mut display, error.into())),
                }
            };
        }
        let trigger = or_show!(hardware::open_trigger(config, &drivers));
        let light = or_show!(hardware::open_light(config, &drivers));
        let feed = or_show!(hardware::start_camera(config, &drivers));

        let encoder = or_show!(
            Encoder::load(&options.bundle, &encoder_options(config)).map_err(|source| {
                StartError::Encoder {
                    bundle: options.bundle.clone(),
                    source,
                }
            })
        );
        info!(model = encoder.model_id(), variant = %encoder.variant().name, "encoder loaded");
        // The handheld keeps only the int8 copy of the index resident.
        let store = or_show!(CaseStore::open_with(
            &config.store.dir,
            StoreIdentity {
                model_id: encoder.model_id().to_owned(),
                embedding_dim: encoder.dim(),
            },
            OpenOptions {
                residency: Residency::Int8,
                ..OpenOptions::default()
            },
        )
        .map_err(|source| StartError::Store {
            path: config.store.dir.clone(),
            source,
        }));
        let mut report = StartReport::default();
        if let Some(references) = &options.reference_cases {
            let (added, refused) = or_show!(add_references(
                &store,
                &encoder,
                references,
                config.store.keep_originals == KeepOriginals::All,
                &mut on_ingest,
            ));
            report.references_added = added;
            report.references_refused = refused;
        }
        if let (Some(path), Some(update)) = (&options.library_snapshot, &config.update) {
            // Checked by the install's health check; a snapshot damaged since
            // costs its cases, not the start.
            let identity = StoreIdentity {
                model_id: encoder.model_id().to_owned(),
                embedding_dim: encoder.dim(),
            };
            let added = crate::updates::add_library_once(
                &update.root,
                path,
                &store,
                &config.store.dir,
                &identity,
            );
            match added {
                Ok(None) => {}
                Ok(Some(added)) => {
                    info!(added, "reference library of the installed update added");
                    report.references_added += added;
                }
                Err(problem) => {
                    warn!(%problem, "the installed update's reference library was not added");
                    report.library_problem = Some(problem);
                }
            }
        }
        report.library_cases = store.len().unwrap_or(0);
        if report.library_cases == 0 {
            warn!("the case library is empty: captures will find no similar cases");
        }
        let device_id = or_show!(device_id(config));

        let adapter = match install_adapter(config, &encoder, &store) {
            Ok(adapter) => adapter,
            Err(problem) => {
                warn!(%problem, "adapter not used; showing similar cases without it");
                report.adapter_problem = Some(problem);
                None
            }
        };
        report.adapter = adapter.as_ref().map(|a| a.adapter_id().to_owned());
        let mut notice = report.adapter_problem.as_ref().map(|_| {
            "Similar cases only: the adapter could not be loaded (see the log).".to_owned()
        });
        let store = Arc::new(store);
        // Sync is a convenience: a device whose fleet link cannot start
        // still captures and answers from its own library, and says so.
        let fleet = match &config.sync {
            None => None,
            Some(sync) => match start_sync(config, sync, &store) {
                Ok(handle) => {
                    info!("fleet sync started");
                    let link = FleetLink::new(handle);
                    if let Some(update) = &config.update {
                        let (current, failed) = crate::updates::installed_state(&update.root);
                        link.set_installed(current, failed);
                    }
                    Some(link)
                }
                Err(e) => {
                    warn!(error = %e, "fleet sync not started; working offline");
                    report.sync_problem = Some(e.to_string());
                    notice = Some(match notice {
                        Some(earlier) => format!("{earlier} Fleet sync is off (see the log)."),
                        None => "Offline only: fleet sync could not start (see the log).".into(),
                    });
                    None
                }
            },
        };
        let retrainer = retrainer(config, &encoder, &store);
        let analyzer = Analyzer {
            encoder,
            adapter: adapter.into(),
            store,
            thresholds: config.quality,
            top_k: config.pipeline.top_k,
            raw_score: ScoreKind::Int8,
        };
        let daemon = Daemon {
            analyzer: Arc::new(analyzer),
            feed,
            trigger,
            light,
            display,
            capture_mode: match config.pipeline.capture {
                CaptureKind::Ring => CaptureMode::Ring {
                    window: Duration::from_millis(config.pipeline.ring_window_ms),
                    follow_up: Duration::from_millis(config.pipeline.follow_up_ms),
                },
                CaptureKind::Burst => CaptureMode::Burst,
            },
            burst: config.pipeline.burst as usize,
            camera_timeout: Duration::from_millis(config.pipeline.camera_timeout_ms),
            live_view: Duration::from_millis(config.pipeline.live_view_ms),
            cases: CaseSettings {
                device_id: Some(device_id),
                keep_originals: config.store.keep_originals != KeepOriginals::None,
            },
            notice,
            storage_failed: false,
            fleet,
            updates: None,
            retrainer,
        };
        Ok((daemon, report))
    }
}

/// The sync thread; with `[update]` it also takes the fleet's bundles,
/// downloaded under the update root.
fn start_sync(
    config: &Config,
    sync: &dermascope_sync::SyncConfig,
    store: &Arc<CaseStore>,
) -> Result<dermascope_sync::SyncHandle, dermascope_sync::SyncError> {
    match &config.update {
        None => dermascope_sync::Syncer::start(sync.clone(), Arc::clone(store)),
        Some(update) => dermascope_sync::Syncer::start_with_updates(
            sync.clone(),
            Arc::clone(store),
            dermascope_sync::UpdateSettings::new(
                update.root.join(crate::updates::DOWNLOADS),
                crate::updates::DAEMON_VERSION,
            ),
        ),
    }
}

fn add_references(
    store: &CaseStore,
    encoder: &Encoder,
    references: &ReferenceCases,
    keep_originals: bool,
    on_ingest: &mut impl FnMut(IngestProgress),
) -> Result<(usize, usize), StartError> {
    let file = read_labels(&references.labels)?;
    if file.rows.is_empty() {
        return Err(StartError::NoReferenceRows {
            path: references.labels.clone(),
        });
    }
    info!(
        rows = file.rows.len(),
        "adding reference cases (already stored ones are skipped)"
    );
    let summary = ingest(
        store,
        encoder,
        &references.images,
        &file.rows,
        IngestOptions {
            source: CaseSource::Reference,
            workers: 2,
            keep_originals,
        },
        |progress| {
            on_ingest(progress);
            ControlFlow::Continue(())
        },
    )?;
    // A crash before the daemon's clean stop must not cost a rescan.
    if let Err(e) = store.checkpoint() {
        warn!(error = %e, "index cache not written after adding reference cases");
    }
    Ok((
        summary.ingested,
        file.rejected.len() + summary.rejected.len(),
    ))
}

/// The background retraining `[adapter]` asks for. Off where the adapter
/// is a signed version's part: the device must not change what the fleet
/// signed (its next version brings the next adapter).
fn retrainer(config: &Config, encoder: &Encoder, store: &Arc<CaseStore>) -> Option<Retrainer> {
    let settings = RetrainSettings::from_config(&config.adapter)?;
    if let Some(update) = &config.update {
        if settings.dir.starts_with(&update.root) {
            info!("the adapter is the installed version's: no retraining on the device");
            return None;
        }
    }
    let retrainer = Retrainer::new(
        settings,
        Arc::clone(store),
        encoder.model_id(),
        encoder.dim(),
    );
    info!(
        pending = retrainer.pending(),
        after = config.adapter.retrain_after,
        "retraining the adapter after this many confirmed local cases"
    );
    Some(retrainer)
}

/// The installed adapter with the library indexed in its space, `None`
/// where none is installed; `Err` says why an installed one is unusable.
fn install_adapter(
    config: &Config,
    encoder: &Encoder,
    store: &CaseStore,
) -> Result<Option<Adapter>, String> {
    let dir = &config.adapter.dir;
    if !dir.join(dermascope_adapter::MANIFEST_FILE).is_file() {
        return Ok(None);
    }
    let adapter = load_installed(dir, encoder).map_err(|e| e.to_string())?;
    let computed =
        dermascope_library::index_adapter_space(store, &adapter).map_err(|e| e.to_string())?;
    info!(
        adapter = adapter.adapter_id(),
        computed, "adapter installed; searching its space"
    );
    Ok(Some(adapter))
}

/// Draws the start-up failure on whatever display opened. A display that
/// fails now too only leaves the log, which has the error anyway.
fn show_start_failure(display: &mut dyn Display, error: &StartError) {
    warn!(%error, "the daemon cannot start");
    let (width, height) = display.size();
    let Ok(mut canvas) = Canvas::new(width, height) else {
        return;
    };
    let status = StatusView {
        sync: SyncState::Offline,
        pending_uploads: 0,
        cases_in_library: 0,
        clock: None,
        last_sync_minutes: None,
    };
    if dermascope_ui::render(&mut canvas, &status, &error.screen()).is_ok() {
        if let Err(e) = display.present(width, height, canvas.pixels()) {
            warn!(error = %e, "the start-up error could not be shown");
        }
    }
}
