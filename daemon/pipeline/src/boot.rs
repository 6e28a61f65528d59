//! Confirming an A/B system slot after an OS update (`[boot] slots`).
//!
//! The bootloader keeps a newly installed root filesystem only once it is
//! marked good; each boot before that spends one of its attempts. The
//! daemon is what the device is for, so it marks the slot, and only after
//! its own health check — the one an update's install runs (`DeviceCheck`:
//! the encoder embeds a known image, the store searches, a screen renders)
//! — passed on the parts this start is about to run, and the daemon itself
//! started.
//!
//! The adapter and a version's library snapshot are left out of this
//! check: they are the clinic's data on the partition both slots share, the
//! daemon runs without an adapter (and says so), and a fault in them would
//! fail the check on every slot alike, turning a damaged file into an OS
//! rollback every few boots. An install's own check covers them.
//!
//! The check runs before the daemon opens its store (the store admits one
//! process), so the start is split: [`check_before_start`], then
//! [`mark_if_healthy`] once `Daemon::from_config` succeeded.
//!
//! Architecture Invariant: a slot is never marked good when the check
//! failed or the daemon did not start; a failure to mark never stops
//! capture (the screen says it, the bootloader decides).

use std::path::Path;

use dermascope_device::{BootSlot, Marked, NoSlots, RaucSlot};
use tracing::{info, warn};

use crate::assembly::encoder_options;
use crate::config::{Config, SlotKind};
use crate::updates::{CheckedParts, DeviceCheck, StoreAt};

/// What the start-up health check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootHealth {
    /// No A/B slots: nothing is checked or marked.
    NoSlots,
    Passed,
    Failed(String),
}

/// Runs the health check on what this start will run, when the system has
/// slots to confirm. `encoder_dir` is the bundle the daemon will load.
pub fn check_before_start(config: &Config, encoder_dir: &Path) -> BootHealth {
    if config.boot.slots == SlotKind::None {
        return BootHealth::NoSlots;
    }
    let check = DeviceCheck {
        store_base: config.store.dir.clone(),
        factory_encoder: encoder_dir.to_path_buf(),
        encoder: encoder_options(config),
        screen_size: (config.display.width, config.display.height),
    };
    let parts = CheckedParts {
        encoder_dir,
        adapter_dir: None,
        config_file: None,
        library: None,
        store: StoreAt::Exactly(&config.store.dir),
    };
    match check.check_parts(&parts) {
        Ok(()) => {
            info!("start-up health check passed");
            BootHealth::Passed
        }
        Err(problem) => {
            warn!(%problem, "start-up health check failed: the boot slot stays unconfirmed");
            BootHealth::Failed(problem)
        }
    }
}

/// The slot manager `[boot] slots` names.
pub fn boot_slot(config: &Config) -> Box<dyn BootSlot> {
    match config.boot.slots {
        SlotKind::None => Box::new(NoSlots),
        SlotKind::Rauc => Box::new(RaucSlot::new(config.boot.rauc.clone())),
    }
}

/// Marks the booted slot good after a passed check (the daemon has started
/// by now). Returns the words for the screen when the slot stays
/// unconfirmed.
pub fn mark_if_healthy(health: &BootHealth, slot: &mut dyn BootSlot) -> Option<String> {
    match health {
        BootHealth::NoSlots => None,
        BootHealth::Failed(_) => Some(
            "The system is unconfirmed: its health check failed (see the log). \
             It returns to the previous system after a few restarts."
                .into(),
        ),
        BootHealth::Passed => match slot.mark_good() {
            Ok(Marked::Good(said)) => {
                info!(%said, "boot slot marked good");
                None
            }
            Ok(Marked::NoSlots) => None,
            Err(e) => {
                warn!(error = %e, "the boot slot could not be marked good");
                Some("The system could not be confirmed (see the log).".into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dermascope_device::BootSlotError;

    struct Counting(usize);

    impl BootSlot for Counting {
        fn mark_good(&mut self) -> Result<Marked, BootSlotError> {
            self.0 += 1;
            Ok(Marked::Good("marked".into()))
        }
    }

    #[test]
    fn only_a_passed_check_marks_the_slot() {
        let mut slot = Counting(0);
        assert!(mark_if_healthy(&BootHealth::Failed("no encoder".into()), &mut slot).is_some());
        assert!(mark_if_healthy(&BootHealth::NoSlots, &mut slot).is_none());
        assert_eq!(slot.0, 0);
        assert!(mark_if_healthy(&BootHealth::Passed, &mut slot).is_none());
        assert_eq!(slot.0, 1);
    }

    #[test]
    fn without_slots_nothing_is_checked() {
        let config = Config::default();
        let absent = Path::new("/nonexistent/encoder");
        assert_eq!(check_before_start(&config, absent), BootHealth::NoSlots);
        let mut rauc = config.clone();
        rauc.boot.slots = SlotKind::Rauc;
        assert!(matches!(
            check_before_start(&rauc, absent),
            BootHealth::Failed(problem) if problem.contains("encoder does not load")
        ));
    }
}
