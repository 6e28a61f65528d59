//! Signed bundles and their staged rollouts: the operator's side
//! ([`bundles`], [`rollouts`]: library functions `dermascope-fleet` and the
//! status page call) and the device's side ([`device`]: the handlers of
//! `POST /v1/update`, `POST /v1/update/result` and the ranged archive).
//!
//! # Design notes
//!
//! * The service never signs and never looks inside a bundle: the operator's
//!   tool verified the signature before publishing, and every device
//!   verifies it again after download. The service stores the archive and
//!   the facts the tool read from the verified manifest.
//! * Every rollout transition happens in one transaction that holds the
//!   rollout's row (`SELECT ... FOR UPDATE`), so concurrent reports from
//!   many devices are counted one after another, never lost.
//! * A device is offered only what its row in `rollout_devices` says:
//!   `offered` gets the bundle, `rollback_offered` the rollback, anything
//!   else nothing. A failed or refused device is never offered the bundle
//!   again (Mender's re-install loop).
//! * Each mutating function takes [`Mode`]: a dry run does the same work in
//!   a transaction it rolls back, so what it reports is exactly what would
//!   happen, and nothing is written.
//! * Stage numbers are the schema's, from 0.

pub mod bundles;
pub mod device;
pub mod rollouts;

pub use bundles::{
    find_bundle, list_bundles, publish_bundle, Bundle, BundleFacts, Published, CHUNK_BYTES,
};
pub use rollouts::{
    create_rollout, list_rollouts, pause_rollout, resume_rollout, rollback_rollout, rollout_status,
    Changed, NewRollout, RolloutDevice, RolloutStatus, StageSpec, StageStatus,
};

/// Whether a mutating function writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Apply,
    /// Do everything, report it, commit nothing.
    DryRun,
}

impl Mode {
    pub fn dry_run(dry: bool) -> Mode {
        if dry {
            Mode::DryRun
        } else {
            Mode::Apply
        }
    }
}
