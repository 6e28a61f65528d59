//! Fuzz target `config`: `Config::parse`, which reads the `dermascope.toml`
//! an installer, a clinic's IT person or a hand edit wrote. Seeds are in
//! `fuzz/corpus/config/` (the device image's shipped file among them); the
//! harness is `dermascope_testkit::fuzz`.
//!
//! Invariants: no input panics, overflows the stack or allocates without
//! bound; an accepted configuration holds only values inside the ranges its
//! documentation promises (checked here independently of `validate`).

use std::path::Path;

use dermascope_pipeline::{Config, ConfigError};
use dermascope_testkit::fuzz::{self, TrackingAllocator};

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

const TARGET: &str = "config";
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"=",
    b"\"",
    b"'''",
    b"\"\"\"",
    b"{",
    b"}",
    b",",
    b".",
    b"\n",
    b"#",
    b"\\u0000",
    b"nan",
    b"inf",
    b"-0",
    b"1e999",
    b"9223372036854775808",
    b"0x7fffffff",
    b"1979-05-27T07:32:00Z",
    b"[camera]",
    b"[quality]",
    b"source",
    b"\"v4l2\"",
    b"\"gpio\"",
    b"\"spi\"",
];
/// Keys the seeds may not spell, so edits can add them.
const KEYS: &[&str] = &[
    "sync",
    "url",
    "widht",
    "id",
    "keep_originals",
    "live_view_ms",
    "ring_frames",
    "ring_window_ms",
    "follow_up_ms",
    "retrain_after",
    "local_weight",
];

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("dermascope.toml"))
}

/// The promises of an accepted configuration.
fn check_accepted(c: &Config) -> Result<(), String> {
    let pins = [
        Some(c.trigger.capture_pin),
        c.trigger.confirm_pin,
        c.trigger.led_pin,
        Some(c.display.dc_pin),
        c.display.reset_pin,
        c.display.backlight_pin,
    ];
    let q = &c.quality;
    let fraction = |v: f32| (0.0..=1.0).contains(&v);
    let broken = [
        (
            "a GPIO pin above 27",
            pins.iter().flatten().any(|&p| p > 27),
        ),
        (
            "camera size",
            !(16..=8192).contains(&c.camera.width) || !(16..=8192).contains(&c.camera.height),
        ),
        ("camera.fps", !(1..=120).contains(&c.camera.fps)),
        (
            "camera.replay_fps",
            !(c.camera.replay_fps > 0.0 && c.camera.replay_fps <= 240.0),
        ),
        ("trigger.debounce_ms", c.trigger.debounce_ms > 1000),
        (
            "display size",
            !(64..=1920).contains(&c.display.width) || !(64..=1080).contains(&c.display.height),
        ),
        (
            "encoder.threads",
            c.encoder.threads.is_some_and(|t| !(1..=64).contains(&t)),
        ),
        ("adapter.retrain_after", c.adapter.retrain_after > 10_000),
        (
            "adapter.local_weight",
            !(c.adapter.local_weight.is_finite()
                && (0.1..=100.0).contains(&c.adapter.local_weight)),
        ),
        ("pipeline.burst", !(1..=16).contains(&c.pipeline.burst)),
        ("pipeline.top_k", !(1..=20).contains(&c.pipeline.top_k)),
        (
            "pipeline.ring_frames",
            !(2..=32).contains(&c.pipeline.ring_frames),
        ),
        (
            "pipeline.ring_window_ms",
            !(10..=1000).contains(&c.pipeline.ring_window_ms),
        ),
        ("pipeline.follow_up_ms", c.pipeline.follow_up_ms > 1000),
        (
            "pipeline.camera_timeout_ms",
            !(100..=60_000).contains(&c.pipeline.camera_timeout_ms),
        ),
        (
            "quality fractions",
            !(fraction(q.max_clipped_highlights)
                && fraction(q.max_crushed_shadows)
                && fraction(q.min_lesion_contrast)),
        ),
        (
            "quality.min_focus",
            !(q.min_focus >= 0.0 && q.min_focus.is_finite()),
        ),
        (
            "quality luma",
            !((0.0..=255.0).contains(&q.min_mean_luma)
                && (0.0..=255.0).contains(&q.max_mean_luma)
                && q.min_mean_luma < q.max_mean_luma),
        ),
        (
            "device.id",
            c.device.id.as_ref().is_some_and(|id| {
                id.is_empty()
                    || id.len() > dermascope_store::MAX_DEVICE_ID_BYTES
                    || id.chars().any(char::is_control)
            }),
        ),
    ];
    match broken.iter().find(|(_, broken)| *broken) {
        Some((what, _)) => Err(format!("accepted a configuration with a bad {what}: {c:?}")),
        None => Ok(()),
    }
}

fn check_text(text: &str) -> Result<(), String> {
    match parse(text) {
        Ok(config) => check_accepted(&config),
        Err(ConfigError::Read { .. }) => Err("parsing text reported a read error".into()),
        Err(_) => Ok(()),
    }
}

#[test]
fn the_seeds_are_valid_configurations() {
    for seed in fuzz::seeds(TARGET) {
        let text = String::from_utf8(seed.bytes).unwrap();
        let config = parse(&text).unwrap_or_else(|e| panic!("seed {}: {e}", seed.name));
        check_accepted(&config).unwrap();
    }
    let shipped = dermascope_testkit::workspace_root()
        .join("yocto/meta-dermascope/recipes-dermascope/dermascope/files/dermascope.toml");
    assert_eq!(
        std::fs::read(shipped).unwrap(),
        std::fs::read(fuzz::corpus_dir(TARGET).join("shipped-device.toml")).unwrap(),
        "fuzz/corpus/config/shipped-device.toml is a copy of the shipped config: copy it again"
    );
}

/// Nesting deeper than any configuration is refused by the TOML parser's
/// own limit, not by overflowing the stack (which would abort the daemon).
#[test]
fn deeply_nested_values_are_refused_not_a_stack_overflow() {
    for (open, close) in [("[", "]"), ("{a = ", "}")] {
        let text = format!(
            "[camera]\nsource = {}1{}\n",
            open.repeat(100_000),
            close.repeat(100_000)
        );
        assert!(parse(&text).is_err());
    }
}

#[test]
fn fuzz_config() {
    fuzz::fuzz_toml_text(TARGET, TOKENS, KEYS, check_text);
}
