//! The root-filesystem slot the system booted from, on an A/B image.
//!
//! The image (yocto/, RAUC) has two root filesystems; an OS update is
//! written into the one not running, and the bootloader gives the new slot
//! a few boot attempts. Only the system can say the slot works: until it is
//! marked good, every boot of it spends an attempt, and when they run out
//! the bootloader goes back to the other slot. The daemon marks it after its
//! own health check, so an image whose daemon cannot embed, search or draw
//! falls back by itself.
//!
//! [`RaucSlot`] asks RAUC (`rauc status mark-good`); [`NoSlots`] is a
//! system without A/B slots (a PC, Raspberry Pi OS), where there is nothing
//! to mark.

use std::path::PathBuf;
use std::process::Command;

/// Why the booted slot could not be marked.
#[derive(Debug, thiserror::Error)]
pub enum BootSlotError {
    #[error(
        "cannot run {program:?} to mark the boot slot good: {source}. Install rauc, or set \
         [boot] slots = \"none\" on a system without A/B slots"
    )]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("`{program:?} status mark-good` failed ({status}): {stderr}")]
    Refused {
        program: PathBuf,
        status: String,
        stderr: String,
    },
}

/// What marking did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Marked {
    /// The bootloader now keeps the booted slot; the text is what the
    /// slot manager said, for the log.
    Good(String),
    /// No A/B slots on this system.
    NoSlots,
}

/// The booted slot, told that it works.
pub trait BootSlot: Send {
    fn mark_good(&mut self) -> Result<Marked, BootSlotError>;
}

/// RAUC's command-line client: it asks the RAUC service over D-Bus, which
/// resets the booted slot's attempts in the bootloader's environment.
pub struct RaucSlot {
    program: PathBuf,
}

impl RaucSlot {
    /// `program` is the `rauc` binary (a path, or a name looked up in PATH).
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
        }
    }
}

/// A slot manager's message is one line; a longer one is cut for the log.
const MAX_MESSAGE: usize = 400;

fn first_chars(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    match text.char_indices().nth(MAX_MESSAGE) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

impl BootSlot for RaucSlot {
    fn mark_good(&mut self) -> Result<Marked, BootSlotError> {
        let output = Command::new(&self.program)
            .args(["status", "mark-good"])
            .output()
            .map_err(|source| BootSlotError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        // 127 is "command not found" from a shell wrapper, and what a
        // missing program looks like where spawning is a plain fork (qemu
        // user-mode): the same answer as a failed spawn.
        if output.status.code() == Some(127) {
            return Err(BootSlotError::Spawn {
                program: self.program.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    first_chars(&output.stderr),
                ),
            });
        }
        if !output.status.success() {
            return Err(BootSlotError::Refused {
                program: self.program.clone(),
                status: output.status.to_string(),
                stderr: first_chars(&output.stderr),
            });
        }
        // rauc 1.8 prints its answer on stdout ("marked slot rootfs.1 as
        // good"); later versions may use stderr.
        let said = if output.stdout.is_empty() {
            &output.stderr
        } else {
            &output.stdout
        };
        Ok(Marked::Good(first_chars(said)))
    }
}

/// A system without A/B slots: marking is a no-op.
pub struct NoSlots;

impl BootSlot for NoSlots {
    fn mark_good(&mut self) -> Result<Marked, BootSlotError> {
        Ok(Marked::NoSlots)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in `rauc` that records its arguments and answers as told:
    /// the driver's handling of the process, not RAUC, is under test here
    /// (scripts/test-rauc and tests/boot_slot.rs run the real one).
    fn program(dir: &std::path::Path, body: &str) -> PathBuf {
        let path = dir.join("rauc");
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"$@\" > {}/args\n{body}\n", dir.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn mark_good_runs_rauc_status_mark_good_and_keeps_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let rauc = program(dir.path(), "echo 'marked slot rootfs.1 as good'");
        let marked = RaucSlot::new(&rauc).mark_good().unwrap();
        assert_eq!(marked, Marked::Good("marked slot rootfs.1 as good".into()));
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert_eq!(args.trim(), "status mark-good");
    }

    #[test]
    fn a_refusal_carries_rauc_s_own_words() {
        let dir = tempfile::tempdir().unwrap();
        let rauc = program(
            dir.path(),
            "echo 'Failed to mark slot: no booted slot' >&2; exit 1",
        );
        let error = RaucSlot::new(&rauc).mark_good().unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, BootSlotError::Refused { .. }), "{error:?}");
        assert!(text.contains("no booted slot"), "{text}");
    }

    #[test]
    fn a_missing_rauc_says_what_to_install_or_set() {
        let dir = tempfile::tempdir().unwrap();
        let error = RaucSlot::new(dir.path().join("absent"))
            .mark_good()
            .unwrap_err();
        assert!(matches!(error, BootSlotError::Spawn { .. }), "{error:?}");
        assert!(
            error.to_string().contains("[boot] slots = \"none\""),
            "{error}"
        );
    }
}
