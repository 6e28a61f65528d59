//! The device's side of the fleet service: a background thread that
//! uploads the store's outbox, pulls the clinic's fleet cases and the
//! reference library into the store, and answers RAG requests, all off the
//! capture path.
//!
//! # Use (the daemon)
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(store: Arc<dermascope_store::CaseStore>, toml_section: &str) -> Result<(), dermascope_sync::SyncError> {
//! use dermascope_sync::{SyncConfig, Syncer};
//! // `[sync]` of dermascope.toml; an absent section means offline-only.
//! let mut config: SyncConfig = toml::from_str(toml_section).expect("the daemon's parser reports this");
//! config.resolve_relative_to(std::path::Path::new("/etc/dermascope"));
//! let sync = Syncer::start(config, Arc::clone(&store))?; // checks config + credential, starts threads
//! // every frame: the status bar
//! let status = sync.status(); // online, syncing, pending_uploads, last_sync_ms, last_error
//! // after a capture is stored:
//! sync.nudge();
//! // on the results screen: poll the receiver with try_recv() each frame
//! # let request: dermascope_cloud_api::RagRequest = todo!();
//! let answer = sync.request_rag(request);
//! // at shutdown (or just drop it):
//! sync.stop();
//! # Ok(()) }
//! ```
//!
//! # Updates (the daemon)
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(store: Arc<dermascope_store::CaseStore>, config: dermascope_sync::SyncConfig) -> Result<(), dermascope_sync::SyncError> {
//! use dermascope_sync::api::{UpdateOutcome, UpdateResult};
//! use dermascope_sync::{ReadyUpdate, Syncer, UpdateSettings};
//! let settings = UpdateSettings::new("/var/lib/dermascope/downloads", env!("CARGO_PKG_VERSION"));
//! let sync = Syncer::start_with_updates(config, store, settings)?;
//! // at start (after `recover()`) and after every install or rollback:
//! sync.set_installed(Some(7), vec![5]); // `current`'s version, the failed ones
//! // every tick: the screen shows `sync.status().download` while it runs
//! if let Some(update) = sync.take_update() {
//!     let (rollout_id, version, outcome) = match update {
//!         ReadyUpdate::Install { rollout_id, version, archive } => {
//!             // dermascope_update::archive::unpack(&archive, &dir), then
//!             // Installer::install(&dir, ...) as for a USB stick
//!             (rollout_id, version, UpdateOutcome::Installed)
//!         }
//!         ReadyUpdate::Rollback { rollout_id, version } => {
//!             // Installer::rollback() if `version` is current
//!             (rollout_id, version, UpdateOutcome::RolledBack)
//!         }
//!     };
//!     sync.report_update(UpdateResult { rollout_id, version, outcome, detail: None });
//! }
//! # Ok(()) }
//! ```
//!
//! No report is sent (so nothing is offered) before the first
//! `set_installed`. Each update is handed out once; a result is sent until
//! the service acknowledges it, and its offer is never handed out again.
//! [`update`] says what the download guarantees.
//!
//! # Guarantees
//!
//! * Nothing blocks the caller: `status`, `nudge` and `request_rag` return
//!   at once; the network is only touched on the `dermascope-sync` and
//!   `dermascope-rag` threads. `stop` waits at most for the request in
//!   flight (`request_timeout_s`).
//! * Nothing acknowledged is lost, nothing duplicated: an outbox entry is
//!   cleared only after the service's receipt names that case at that
//!   revision, and the service stores each `(id, revision)` once, so a
//!   batch retried after a dropped connection is answered `already_stored`.
//!   A pulled page and the cursor after it are one store transaction
//!   ([`dermascope_store::CaseStore::apply_pulled`]), so an interrupted
//!   pull resumes after the last page applied.
//! * Only the configured CA is trusted (`tls_certs_only`: no system or
//!   built-in roots); `http://` only to loopback with
//!   `allow_plain_http_for_tests`. The credential file must be mode 0600
//!   (group/others bits refuse it: [`SyncConfig::read_credential`]).
//! * An answer is never trusted past its limits: bodies over
//!   `MAX_RESPONSE_BYTES` are refused, pages over the asked limit, receipts
//!   that do not answer the batch in order, RAG answers over `k`; every
//!   pulled case is checked ([`convert::from_wire`]: source, encoder,
//!   dimension, finiteness, sizes) and a bad one is skipped, never stored.
//!   Cases of another encoder are never pulled into the store.
//! * No free-text note leaves the device; originals only when the clinic
//!   allows (`DeviceInfo::allow_originals`). Logs name cases by
//!   [`dermascope_store::CaseId::log_tag`] or their index in a page.
//! * Failures: network, timeouts, 5xx and malformed answers retry with
//!   exponential backoff (1 s doubling, full jitter, capped at
//!   `interval_s`); a refused credential (401/403) or an encoder the
//!   service does not index waits a whole interval; [`SyncStatus`] says why.

mod client;
mod config;
pub mod convert;
mod error;
mod syncer;
pub mod update;

pub use client::Client;
pub use config::SyncConfig;
pub use error::SyncError;
pub use syncer::{SyncHandle, SyncStatus, Syncer};
pub use update::{
    DownloadProgress, ReadyUpdate, UpdateSettings, DEFAULT_KEEP_FREE_BYTES, MAX_REFETCHES,
};

/// The wire contract this crate speaks, re-exported for callers that
/// build [`dermascope_cloud_api::RagRequest`]s or read answers.
pub use dermascope_cloud_api as api;
