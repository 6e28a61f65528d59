//! `dermascope.toml`: what `dermascope run` runs on.
//!
//! Every section and key has a default (the embedded defaults: replay
//! camera, control socket, PNG screens, stores under `var/`), so an empty
//! file or none at all runs the daemon on a PC. Unknown keys are errors, and
//! every error names the key and what it may be.

use std::path::{Path, PathBuf};

use dermascope_quality::QualityThresholds;
use serde::Deserialize;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: key `{key}` = {value}: {allowed}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        allowed: String,
    },
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub camera: CameraSection,
    pub trigger: TriggerSection,
    pub display: DisplaySection,
    pub encoder: EncoderSection,
    pub adapter: AdapterSection,
    pub store: StoreSection,
    pub device: DeviceSection,
    pub pipeline: PipelineSection,
    pub quality: QualityThresholds,
    /// The fleet service; absent means offline-only.
    pub sync: Option<dermascope_sync::SyncConfig>,
    /// Signed updates; absent means the daemon runs what `[encoder]`,
    /// `[adapter]` and this file name, and installs nothing.
    pub update: Option<UpdateSection>,
    pub boot: BootSection,
}

/// `[boot]`: the A/B root filesystem slots of the image, if any.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BootSection {
    pub slots: SlotKind,
    /// The `rauc` client, a path or a name looked up in PATH.
    pub rauc: PathBuf,
}

impl Default for BootSection {
    fn default() -> Self {
        Self {
            slots: SlotKind::None,
            rauc: PathBuf::from("rauc"),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SlotKind {
    /// No A/B slots (a PC, Raspberry Pi OS): nothing to mark.
    None,
    /// The Yocto image's RAUC slots: the booted slot is marked good once
    /// the start-up health check passed, so a slot whose daemon fails it
    /// is given up by the bootloader after its boot attempts.
    Rauc,
}

/// `[update]`: where installed versions live and where bundles arrive.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdateSection {
    /// `versions/<N>`, `current`, `state.toml` (dermascope-update's layout).
    pub root: PathBuf,
    /// The trusted public keys: a directory of `<name>.pub` files.
    /// Default: `<root>/keys`.
    #[serde(default)]
    pub keys: Option<PathBuf>,
    /// Where a clinic's USB stick mounts: a bundle directory (holding
    /// `bundle.toml`) or a bundle archive (`*.tar`) there, or one level
    /// below, is verified and installed.
    #[serde(default)]
    pub watch_dir: Option<PathBuf>,
    /// How often `watch_dir` is looked at.
    #[serde(default = "default_watch_interval_s")]
    pub watch_interval_s: u64,
}

fn default_watch_interval_s() -> u64 {
    5
}

impl UpdateSection {
    pub fn keys(&self) -> PathBuf {
        self.keys.clone().unwrap_or_else(|| self.root.join("keys"))
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CameraKind {
    /// The dermatoscope's camera through V4L2.
    V4l2,
    /// A folder of photographs, looped (PCs, demos, benchmarks).
    Replay,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CameraSection {
    pub source: CameraKind,
    pub device: PathBuf,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Folder of JPEG/PNG photographs for `source = "replay"`.
    pub replay_dir: PathBuf,
    pub replay_fps: f64,
}

impl Default for CameraSection {
    fn default() -> Self {
        Self {
            source: CameraKind::Replay,
            device: PathBuf::from("/dev/video0"),
            width: 640,
            height: 480,
            fps: 30,
            replay_dir: PathBuf::from("var/demo-lesions"),
            replay_fps: 30.0,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TriggerKind {
    /// The scope's push buttons on GPIO.
    Gpio,
    /// Lines on a Unix control socket (`capture`, `confirm [label]`, `shutdown`).
    Socket,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TriggerSection {
    pub input: TriggerKind,
    /// BCM pin of the capture button.
    pub capture_pin: u8,
    /// BCM pin of the confirm button, if fitted.
    pub confirm_pin: Option<u8>,
    pub debounce_ms: u64,
    /// BCM pin of the LED ring, if it is switched by the daemon.
    pub led_pin: Option<u8>,
    /// Control socket for `input = "socket"`.
    pub socket: PathBuf,
    /// A group (name or gid) whose members may also press and confirm on
    /// the control socket (not shut the daemon down). Unset: only the
    /// daemon's user and root.
    pub socket_group: Option<String>,
}

impl Default for TriggerSection {
    fn default() -> Self {
        Self {
            input: TriggerKind::Socket,
            capture_pin: 17,
            confirm_pin: None,
            debounce_ms: 30,
            led_pin: None,
            socket: PathBuf::from("var/run/dermascope.sock"),
            socket_group: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DisplayKind {
    /// `/dev/fb0` (HDMI or a panel with a kernel driver).
    Framebuffer,
    /// An ST7789/ILI9341 panel on SPI.
    Spi,
    /// Each screen written as a PNG file.
    Png,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PanelKind {
    St7789,
    Ili9341,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DisplaySection {
    pub output: DisplayKind,
    /// Size the screens are drawn at.
    pub width: u32,
    pub height: u32,
    pub framebuffer: PathBuf,
    pub png_dir: PathBuf,
    pub panel: PanelKind,
    pub spi_bus: u8,
    pub chip_select: u8,
    pub dc_pin: u8,
    pub reset_pin: Option<u8>,
    pub backlight_pin: Option<u8>,
}

impl Default for DisplaySection {
    fn default() -> Self {
        Self {
            output: DisplayKind::Png,
            width: 320,
            height: 240,
            framebuffer: PathBuf::from("/dev/fb0"),
            png_dir: PathBuf::from("var/screens"),
            panel: PanelKind::St7789,
            spi_bus: 0,
            chip_select: 0,
            dc_pin: 25,
            reset_pin: Some(27),
            backlight_pin: None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EncoderSection {
    /// Encoder bundle; default: the CLI's search order.
    pub bundle: Option<PathBuf>,
    /// Variant from the bundle's manifest; default: measured best for the CPU.
    pub variant: Option<String>,
    /// Threads for the encoder's matrix products; default 2.
    pub threads: Option<usize>,
    /// Run an int8 `variant` even on an x86_64 CPU without int8
    /// dot-product instructions (refused otherwise: many times slower).
    pub allow_slow_int8: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdapterSection {
    /// Installed adapter; used when it holds one, ignored when empty.
    pub dir: PathBuf,
    /// Retrain the adapter in the background once this many of the
    /// clinic's own cases have been confirmed since the last training
    /// (`retrain.rs`); 0 is off.
    pub retrain_after: usize,
    /// A confirmed local case's weight in that training; a reference
    /// case's is 1.
    pub local_weight: f32,
}

/// Above this a retraining would never come in a clinic's lifetime; a
/// larger value is a typo (0 is how it is switched off).
pub const MAX_RETRAIN_AFTER: usize = 10_000;

impl Default for AdapterSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("var/adapter"),
            retrain_after: 25,
            local_weight: dermascope_library::training::DEFAULT_LOCAL_WEIGHT,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSection {
    pub dir: PathBuf,
    /// Which cases keep their original photograph (what another encoder
    /// re-embeds): `captures` (the default), `all` (reference cases added
    /// with `--cases` too: about the photographs' size again on disk), or
    /// `none`.
    pub keep_originals: KeepOriginals,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("var/cases"),
            keep_originals: KeepOriginals::Captures,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeepOriginals {
    None,
    #[default]
    Captures,
    All,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceSection {
    /// This device's id, recorded on every case it creates. Default: the id
    /// in `device-id` beside the store directory, made (a UUIDv7) at first
    /// start and kept, so a device keeps its id across re-embedding.
    pub id: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineSection {
    /// Which frames a press chooses from.
    pub capture: CaptureKind,
    /// `capture = "burst"`: frames taken per button press; the sharpest
    /// acceptable one is used.
    pub burst: u32,
    /// `capture = "ring"`: frames the camera thread keeps (memory: this
    /// many frames at the camera's resolution).
    pub ring_frames: u32,
    /// `capture = "ring"`: how old a frame captured before the press may
    /// be; an older one may show where the scope was, not where it is.
    pub ring_window_ms: u64,
    /// `capture = "ring"`: when no recent frame passes the gate, the
    /// frames of this long after the press are judged (0: the next one).
    pub follow_up_ms: u64,
    /// Similar cases shown.
    pub top_k: usize,
    /// Longest wait for the camera during a burst before the capture fails
    /// with a camera-problem screen.
    pub camera_timeout_ms: u64,
    /// Refresh the ready screen with the live view this often (0: never;
    /// PNG screens default to never, so a PC's disk does not fill).
    pub live_view_ms: u64,
}

/// How a press gets its frames.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CaptureKind {
    /// The sharpest acceptable frame of those captured just before the
    /// press (the light ring stays on while the device is ready), or of
    /// the next ones when none passes.
    #[default]
    Ring,
    /// `burst` new frames after the press (light on for the burst only).
    Burst,
}

impl Default for PipelineSection {
    fn default() -> Self {
        Self {
            capture: CaptureKind::Ring,
            ring_frames: 8,
            ring_window_ms: 150,
            follow_up_ms: 100,
            burst: 3,
            top_k: 5,
            camera_timeout_ms: 3000,
            live_view_ms: 0,
        }
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, value: String, allowed: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            value,
            allowed: allowed.to_string(),
        };
        if let Some(update) = &self.update {
            if !(1..=3600).contains(&update.watch_interval_s) {
                return Err(invalid(
                    "update.watch_interval_s",
                    update.watch_interval_s.to_string(),
                    "must be 1..=3600 seconds",
                ));
            }
            if update.root.as_os_str().is_empty() {
                return Err(invalid(
                    "update.root",
                    "\"\"".into(),
                    "must name the directory installed versions live in",
                ));
            }
        }
        if let Some(sync) = &self.sync {
            sync.validate().map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("[sync]: {e}"),
            })?;
        }
        if let Some(id) = &self.device.id {
            if id.is_empty()
                || id.len() > dermascope_store::MAX_DEVICE_ID_BYTES
                || id.chars().any(char::is_control)
            {
                return Err(invalid(
                    "device.id",
                    format!("{id:?}"),
                    "must be 1..=128 bytes without control characters",
                ));
            }
        }
        let c = &self.camera;
        if !(16..=8192).contains(&c.width) {
            return Err(invalid(
                "camera.width",
                c.width.to_string(),
                "must be 16..=8192 pixels",
            ));
        }
        if !(16..=8192).contains(&c.height) {
            return Err(invalid(
                "camera.height",
                c.height.to_string(),
                "must be 16..=8192 pixels",
            ));
        }
        if !(1..=120).contains(&c.fps) {
            return Err(invalid("camera.fps", c.fps.to_string(), "must be 1..=120"));
        }
        if !(c.replay_fps > 0.0 && c.replay_fps <= 240.0) {
            return Err(invalid(
                "camera.replay_fps",
                c.replay_fps.to_string(),
                "must be > 0 and <= 240",
            ));
        }
        let t = &self.trigger;
        for (key, pin) in [
            ("trigger.capture_pin", Some(t.capture_pin)),
            ("trigger.confirm_pin", t.confirm_pin),
            ("trigger.led_pin", t.led_pin),
            ("display.dc_pin", Some(self.display.dc_pin)),
            ("display.reset_pin", self.display.reset_pin),
            ("display.backlight_pin", self.display.backlight_pin),
        ] {
            if let Some(pin) = pin {
                if pin > 27 {
                    return Err(invalid(
                        key,
                        pin.to_string(),
                        "must be a BCM GPIO number 0..=27",
                    ));
                }
            }
        }
        if let Some(group) = &t.socket_group {
            // A group name as useradd takes it, or a numeric gid; resolved
            // when the socket is opened, so a config checks on any machine.
            let valid = !group.is_empty()
                && group.len() <= 32
                && !group.starts_with('-')
                && group
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !valid {
                return Err(invalid(
                    "trigger.socket_group",
                    format!("{group:?}"),
                    "must be a group name (letters, digits, '_', '-', '.'; up to 32) or a gid",
                ));
            }
        }
        if t.debounce_ms > 1000 {
            return Err(invalid(
                "trigger.debounce_ms",
                t.debounce_ms.to_string(),
                "must be 0..=1000",
            ));
        }
        let d = &self.display;
        if !(64..=1920).contains(&d.width) {
            return Err(invalid(
                "display.width",
                d.width.to_string(),
                "must be 64..=1920",
            ));
        }
        if !(64..=1080).contains(&d.height) {
            return Err(invalid(
                "display.height",
                d.height.to_string(),
                "must be 64..=1080",
            ));
        }
        if let Some(threads) = self.encoder.threads {
            if !(1..=64).contains(&threads) {
                return Err(invalid(
                    "encoder.threads",
                    threads.to_string(),
                    "must be 1..=64",
                ));
            }
        }
        if self.adapter.retrain_after > MAX_RETRAIN_AFTER {
            return Err(invalid(
                "adapter.retrain_after",
                self.adapter.retrain_after.to_string(),
                "must be 0..=10000 confirmed cases (0 is off)",
            ));
        }
        let w = self.adapter.local_weight;
        if !(w.is_finite() && (0.1..=100.0).contains(&w)) {
            return Err(invalid(
                "adapter.local_weight",
                w.to_string(),
                "must be 0.1..=100",
            ));
        }
        let p = &self.pipeline;
        if !(1..=16).contains(&p.burst) {
            return Err(invalid(
                "pipeline.burst",
                p.burst.to_string(),
                "must be 1..=16 frames",
            ));
        }
        if !(2..=32).contains(&p.ring_frames) {
            return Err(invalid(
                "pipeline.ring_frames",
                p.ring_frames.to_string(),
                "must be 2..=32 frames",
            ));
        }
        if !(10..=1000).contains(&p.ring_window_ms) {
            return Err(invalid(
                "pipeline.ring_window_ms",
                p.ring_window_ms.to_string(),
                "must be 10..=1000",
            ));
        }
        if p.follow_up_ms > 1000 {
            return Err(invalid(
                "pipeline.follow_up_ms",
                p.follow_up_ms.to_string(),
                "must be 0..=1000",
            ));
        }
        if !(1..=20).contains(&p.top_k) {
            return Err(invalid(
                "pipeline.top_k",
                p.top_k.to_string(),
                "must be 1..=20 cases",
            ));
        }
        if !(100..=60_000).contains(&p.camera_timeout_ms) {
            return Err(invalid(
                "pipeline.camera_timeout_ms",
                p.camera_timeout_ms.to_string(),
                "must be 100..=60000",
            ));
        }
        let q = &self.quality;
        for (key, value) in [
            ("quality.max_clipped_highlights", q.max_clipped_highlights),
            ("quality.max_crushed_shadows", q.max_crushed_shadows),
            ("quality.min_lesion_contrast", q.min_lesion_contrast),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(invalid(key, value.to_string(), "must be a fraction 0..=1"));
            }
        }
        if !(q.min_focus >= 0.0 && q.min_focus.is_finite()) {
            return Err(invalid(
                "quality.min_focus",
                q.min_focus.to_string(),
                "must be >= 0",
            ));
        }
        if !(0.0..=255.0).contains(&q.min_mean_luma)
            || !(0.0..=255.0).contains(&q.max_mean_luma)
            || q.min_mean_luma >= q.max_mean_luma
        {
            return Err(invalid(
                "quality.min_mean_luma/max_mean_luma",
                format!("{}/{}", q.min_mean_luma, q.max_mean_luma),
                "must be 0..=255 with min < max",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("dermascope.toml"))
    }

    #[test]
    fn empty_file_is_the_embedded_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.sync, None, "no [sync] is offline-only");
        assert_eq!(config.camera.source, CameraKind::Replay);
        assert_eq!(config.display.output, DisplayKind::Png);
    }

    #[test]
    fn a_sync_section_is_checked_with_the_rest() {
        let config = parse(
            "[sync]\nurl = \"https://fleet.example.org\"\nca = \"/etc/dermascope/fleet-ca.pem\"\n\
             credential_file = \"/etc/dermascope/fleet.credential\"\ninterval_s = 120\n",
        )
        .unwrap();
        let sync = config.sync.unwrap();
        assert_eq!(sync.url, "https://fleet.example.org");
        assert_eq!(sync.interval_s, 120);
        // Plain HTTP to another machine would send the credential and the
        // cases in the clear.
        let err = parse("[sync]\nurl = \"http://fleet.example.org\"\ncredential_file = \"/c\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("[sync]") && err.contains("url"), "{err}");
        let err = parse("[sync]\nurl = \"https://f\"\ncredential_file = \"/c\"\nspeed = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("speed"), "{err}");
    }

    #[test]
    fn an_update_section_names_its_root_and_defaults_the_rest() {
        let config = parse("[update]\nroot = \"/data/update\"\n").unwrap();
        let update = config.update.unwrap();
        assert_eq!(update.keys(), PathBuf::from("/data/update/keys"));
        assert_eq!(update.watch_dir, None);
        assert_eq!(update.watch_interval_s, 5);
        let err = parse("[update]\nwatch_dir = \"/media/usb\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("root"), "{err}");
        let err = parse("[update]\nroot = \"/u\"\nwatch_interval_s = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("update.watch_interval_s"), "{err}");
    }

    #[test]
    fn the_retraining_keys_are_checked_and_zero_switches_it_off() {
        let config = parse("[adapter]\nretrain_after = 50\nlocal_weight = 3.0\n").unwrap();
        let settings = crate::retrain::RetrainSettings::from_config(&config.adapter).unwrap();
        assert_eq!(settings.retrain_after, 50);
        assert_eq!(settings.local.weight, 3.0);
        let off = parse("[adapter]\nretrain_after = 0\n").unwrap();
        assert!(crate::retrain::RetrainSettings::from_config(&off.adapter).is_none());
        let err = parse("[adapter]\nretrain_after = 10001\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("adapter.retrain_after"), "{err}");
        let err = parse("[adapter]\nlocal_weight = 0.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("adapter.local_weight"), "{err}");
    }

    #[test]
    fn device_configuration_parses() {
        let config = parse(
            r#"
            [camera]
            source = "v4l2"
            device = "/dev/video2"
            [trigger]
            input = "gpio"
            capture_pin = 5
            led_pin = 6
            [display]
            output = "spi"
            panel = "ili9341"
            [encoder]
            threads = 4
            variant = "int8"
            [quality]
            min_focus = 12.0
            "#,
        )
        .unwrap();
        assert_eq!(config.camera.source, CameraKind::V4l2);
        assert_eq!(config.trigger.led_pin, Some(6));
        assert_eq!(config.display.panel, PanelKind::Ili9341);
        assert_eq!(config.quality.min_focus, 12.0);
        assert_eq!(
            config.quality.max_mean_luma,
            QualityThresholds::default().max_mean_luma
        );
    }

    #[test]
    fn the_config_the_device_image_installs_is_valid() {
        let shipped = include_str!(
            "../../../yocto/meta-dermascope/recipes-dermascope/dermascope/files/dermascope.toml"
        );
        let config = parse(shipped).unwrap();
        assert_eq!(config.camera.source, CameraKind::V4l2);
        assert_eq!(config.trigger.input, TriggerKind::Gpio);
        assert_eq!(config.display.output, DisplayKind::Spi);
    }

    #[test]
    fn errors_name_the_key_and_the_allowed_values() {
        let err = parse("[camera]\nsource = \"usb\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("source") && err.contains("v4l2") && err.contains("replay"),
            "{err}"
        );
        let err = parse("[display]\noutput = \"hdmi\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("framebuffer") && err.contains("spi") && err.contains("png"),
            "{err}"
        );
        let err = parse("[camera]\nwidht = 640\n").unwrap_err().to_string();
        assert!(err.contains("widht") && err.contains("width"), "{err}");
        let err = parse("[pipeline]\nburst = 0\n").unwrap_err().to_string();
        assert!(
            err.contains("pipeline.burst") && err.contains("1..=16"),
            "{err}"
        );
        let err = parse("[pipeline]\nring_frames = 1000\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pipeline.ring_frames") && err.contains("2..=32"),
            "{err}"
        );
        let err = parse("[pipeline]\ncapture = \"stream\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ring") && err.contains("burst"), "{err}");
        let err = parse("[trigger]\ncapture_pin = 40\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("trigger.capture_pin") && err.contains("0..=27"),
            "{err}"
        );
        let err = parse("[trigger]\nsocket_group = \"press; rm\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("trigger.socket_group") && err.contains("gid"),
            "{err}"
        );
        let ok = parse("[trigger]\nsocket_group = \"dermascope-press\"\n").unwrap();
        assert_eq!(ok.trigger.socket_group.as_deref(), Some("dermascope-press"));
        let err = parse("[quality]\nmax_clipped_highlights = 2.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("quality.max_clipped_highlights"), "{err}");
        let err = parse("[camera]\nfps = \"fast\"\n").unwrap_err().to_string();
        assert!(err.contains("fps"), "{err}");
        let err = parse("[store]\nkeep_originals = \"some\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("keep_originals") && err.contains("captures"),
            "{err}"
        );
        let err = parse("[device]\nid = \"\"\n").unwrap_err().to_string();
        assert!(err.contains("device.id"), "{err}");
        let config =
            parse("[store]\nkeep_originals = \"all\"\n[device]\nid = \"clinic-7-scope-2\"\n")
                .unwrap();
        assert_eq!(config.store.keep_originals, KeepOriginals::All);
        assert_eq!(config.device.id.as_deref(), Some("clinic-7-scope-2"));
        let err = parse("[sync]\nurl = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("credential_file"), "{err}");
    }
}
