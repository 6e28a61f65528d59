//! On the A/B image the daemon confirms the slot it booted from only after
//! its own health check passed: Debian's real `rauc service` (1.8) on a
//! private D-Bus session bus, with file-backed slots and the emulated U-Boot
//! boot counter of scripts/rauc/harness.sh (no Raspberry Pi here), and the
//! real `dermascope run` with `[boot] slots = "rauc"` calling the real
//! `rauc status mark-good`. A boot spends one of the slot's three attempts;
//! only a mark gives them back, so the attempts left say whether the daemon
//! marked it: not when it cannot start, yes when only the clinic's adapter
//! is damaged, and yes when a signed version's configuration (which knows
//! nothing of the image's slots) is the one running.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dermascope_testkit::{bundle_dir, skip, workspace_root, Need};
use support::{daemon_config, s};

const TEST: &str = "the_daemon_marks_its_slot_good_only_after_its_health_check";

/// The RAUC test system: a session bus, rauc service booted into a slot.
struct RaucSystem {
    dir: PathBuf,
    bus_address: String,
    bus_pid: String,
}

impl RaucSystem {
    fn harness(dir: &Path, bus: Option<&str>, script: &str) -> Output {
        let harness = workspace_root().join("scripts/rauc/harness.sh");
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(format!(
                "set -euo pipefail; source {}; {script}",
                harness.display()
            ))
            .env("RAUC_DIR", dir);
        if let Some(address) = bus {
            command.env("DBUS_SESSION_BUS_ADDRESS", address);
        }
        command.output().expect("run bash")
    }

    fn run(&self, script: &str) -> String {
        let out = Self::harness(&self.dir, Some(&self.bus_address), script);
        assert!(
            out.status.success(),
            "harness `{script}`: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A freshly flashed card (slot A, an empty B) and its first power-on.
    fn boot_first(dir: &Path) -> Self {
        let key = dir.join("ca.key");
        let keyring = dir.join("keyring.pem");
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=dermascope boot-slot test CA"])
            .args(["-keyout", s(&key), "-out", s(&keyring)])
            .output()
            .expect("run openssl");
        assert!(made.status.success(), "openssl: {made:?}");
        let system = dir.join("rauc");
        let out = Self::harness(
            &system,
            None,
            &format!(
                "rauc_harness_init \"$RAUC_DIR\" {keyring:?}; rauc_harness_bus; \
                 echo \"$DBUS_SESSION_BUS_ADDRESS\"; echo \"$rauc_harness_bus_pid\""
            ),
        );
        assert!(out.status.success(), "harness init: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut lines = stdout.lines();
        let system = RaucSystem {
            dir: system,
            bus_address: lines.next().unwrap_or_default().to_owned(),
            bus_pid: lines.next().unwrap_or_default().to_owned(),
        };
        system.run("rauc_harness_boot \"$RAUC_DIR\"");
        system
    }

    fn attempts_left(&self, slot: &str) -> String {
        self.run(&format!("rauc_harness_env \"$RAUC_DIR\" BOOT_{slot}_LEFT"))
    }

    /// `dermascope run` until its first screen, with RAUC's client on this
    /// system's bus.
    fn daemon(&self, config: &Path) -> Output {
        Command::new(env!("CARGO_BIN_EXE_dermascope"))
            .args([
                "--log",
                "info",
                "run",
                "--config",
                s(config),
                "--max-captures",
                "0",
            ])
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus_address)
            .env("DBUS_STARTER_BUS_TYPE", "session")
            .output()
            .expect("run dermascope")
    }
}

impl Drop for RaucSystem {
    fn drop(&mut self) {
        let _ = Self::harness(
            &self.dir,
            Some(&self.bus_address),
            "rauc_harness_stop \"$RAUC_DIR\"",
        );
        if !self.bus_pid.is_empty() {
            let _ = Command::new("kill").arg(&self.bus_pid).status();
        }
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|out| out.status.success())
}

#[test]
fn the_daemon_marks_its_slot_good_only_after_its_health_check() {
    for tool in ["rauc", "dbus-daemon", "debugfs", "openssl"] {
        if !have(tool) {
            skip(
                TEST,
                Need::Rauc,
                &format!("{tool} is not installed (scripts/setup installs it)"),
            );
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let rauc = RaucSystem::boot_first(dir.path());
    assert_eq!(rauc.run("rauc_harness_slot \"$RAUC_DIR\" - booted"), "A");
    assert_eq!(
        rauc.attempts_left("A"),
        "2",
        "the first boot spends an attempt"
    );

    let host = daemon_config(dir.path(), &dir.path().join("cases"));
    // The configuration a fleet's update would carry (no [boot]: that is
    // the image's), and the image's own, which adds [boot] and [update].
    let fleet_config = format!(
        "{}[encoder]\nbundle = {:?}\n",
        std::fs::read_to_string(&host.config).unwrap(),
        bundle_dir()
    );
    let root = dir.path().join("update");
    std::fs::create_dir_all(root.join("keys")).unwrap();
    let image_config = |encoder: &Path| {
        let text = fleet_config.replace(&format!("{:?}", bundle_dir()), &format!("{encoder:?}"));
        std::fs::write(
            &host.config,
            format!("{text}[boot]\nslots = \"rauc\"\n[update]\nroot = {root:?}\n"),
        )
        .unwrap();
    };

    // A daemon that cannot start (its encoder bundle is missing) leaves
    // the slot unconfirmed: the boot's attempt stays spent.
    image_config(&dir.path().join("no-encoder"));
    let out = rauc.daemon(&host.config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started without an encoder: {stderr}"
    );
    assert!(stderr.contains("encoder"), "{stderr}");
    assert_eq!(
        rauc.attempts_left("A"),
        "2",
        "marked without starting: {stderr}"
    );

    // A damaged adapter is the clinic's data on the shared partition, not
    // the slot's: the daemon runs without it, says so, and confirms the slot.
    image_config(&bundle_dir());
    let adapter = dir.path().join("no-adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(adapter.join("manifest.toml"), "not an adapter manifest [").unwrap();
    let out = rauc.daemon(&host.config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("running without the adapter"), "{stderr}");
    assert!(stderr.contains("boot slot marked good"), "{stderr}");
    assert_eq!(rauc.attempts_left("A"), "3", "not marked: {stderr}");
    assert_eq!(
        rauc.run("rauc_harness_slot \"$RAUC_DIR\" A boot_status"),
        "good"
    );
    std::fs::remove_dir_all(&adapter).unwrap();

    // Next boot, now running a signed version whose configuration (written
    // for any image) has no [boot]: the image's own [boot] still holds.
    rauc.run("rauc_harness_reboot \"$RAUC_DIR\"");
    assert_eq!(rauc.attempts_left("A"), "2");
    let secret = dir.path().join("operator/a.key");
    // From the checkout, where the factory encoder the install's health
    // check falls back to (models/dist/...) is found.
    let ran = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_dermascope"))
            .args(["--log", "warn"])
            .args(args)
            .current_dir(workspace_root())
            .output()
            .expect("run dermascope");
        assert!(out.status.success(), "dermascope {args:?}: {out:?}");
    };
    ran(&["update", "keygen", "--secret", s(&secret)]);
    std::fs::copy(dir.path().join("operator/a.pub"), root.join("keys/a.pub")).unwrap();
    let version = dir.path().join("version-1");
    std::fs::create_dir_all(version.join("config")).unwrap();
    std::fs::write(version.join("config/dermascope.toml"), &fleet_config).unwrap();
    ran(&[
        "update",
        "sign",
        s(&version),
        "--key",
        s(&secret),
        "--version",
        "1",
    ]);
    let store = dir.path().join("cases");
    ran(&[
        "update",
        "install",
        s(&version),
        "--root",
        s(&root),
        "--store",
        s(&store),
    ]);
    let out = rauc.daemon(&host.config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("running the installed version"), "{stderr}");
    assert_eq!(
        rauc.attempts_left("A"),
        "3",
        "the installed config switched marking off: {stderr}"
    );
}
