//! `Daemon::from_config`: the display is opened first, so a start-up
//! failure (encoder, store, reference cases) is an error screen saying what
//! to do and an error for the process to exit with; an adapter that does
//! not load is no failure: the daemon runs without it and says so.

mod support;

use std::path::Path;
use std::sync::Arc;

use dermascope_device::NoHardware;
use dermascope_pipeline::{Config, Daemon, StartError, StartOptions};
use dermascope_ui::Screen;
use support::{body_of, body_pixels, lesion, replay_of, BROWN};

/// The embedded defaults, everything under `dir`, screens as PNG files.
fn config_in(dir: &Path) -> Config {
    let mut config = Config::default();
    config.camera.replay_dir = dir.join("replay");
    replay_of(&config.camera.replay_dir, &lesion(1, BROWN));
    config.trigger.socket = dir.join("control.sock");
    config.display.png_dir = dir.join("screens");
    config.store.dir = dir.join("cases");
    config.adapter.dir = dir.join("adapter");
    config
}

fn options(bundle: &Path) -> StartOptions {
    StartOptions {
        bundle: bundle.to_path_buf(),
        reference_cases: None,
        library_snapshot: None,
    }
}

/// The error a start that must fail returns.
fn start_error(config: &Config, options: &StartOptions) -> StartError {
    match Daemon::from_config(config, Arc::new(NoHardware), options, |_| {}) {
        Ok(_) => panic!("the daemon started"),
        Err(error) => error,
    }
}

/// The body of the last screen written, as the clinician sees it.
fn last_screen_body(config: &Config) -> Vec<u8> {
    let latest = config.display.png_dir.join("latest.png");
    let image = image::open(&latest)
        .unwrap_or_else(|e| panic!("no screen at {}: {e}", latest.display()))
        .into_rgb8();
    body_of(image.as_raw())
}

#[test]
fn an_encoder_that_does_not_load_is_shown_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let error = start_error(&config, &options(&dir.path().join("no-bundle")));
    assert!(matches!(error, StartError::Encoder { .. }), "{error}");
    assert!(error.to_string().contains("no-bundle"), "{error}");
    let Screen::Error { title, .. } = error.screen() else {
        panic!("not an error screen");
    };
    assert_eq!(title, "Model not loaded");
    assert_eq!(last_screen_body(&config), body_pixels(&error.screen()));
}

#[test]
fn a_store_that_does_not_open_is_shown_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    // A file where the store's directory should be.
    std::fs::write(&config.store.dir, b"not a case store").unwrap();
    let error = start_error(&config, &options(&dermascope_testkit::bundle_dir()));
    assert!(matches!(error, StartError::Store { .. }), "{error}");
    assert_eq!(last_screen_body(&config), body_pixels(&error.screen()));
}

#[test]
fn reference_cases_that_cannot_be_read_are_shown_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let mut options = options(&dermascope_testkit::bundle_dir());
    options.reference_cases = Some(dermascope_pipeline::ReferenceCases {
        images: dir.path().join("images"),
        labels: dir.path().join("missing.csv"),
    });
    let error = start_error(&config, &options);
    assert!(matches!(error, StartError::Labels(_)), "{error}");
    assert!(error.to_string().contains("missing.csv"), "{error}");
    assert_eq!(last_screen_body(&config), body_pixels(&error.screen()));
}

#[test]
fn an_adapter_that_does_not_load_leaves_the_daemon_running_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    std::fs::create_dir_all(&config.adapter.dir).unwrap();
    std::fs::write(
        config.adapter.dir.join(dermascope_adapter::MANIFEST_FILE),
        "this is not an adapter manifest",
    )
    .unwrap();
    let (daemon, report) = Daemon::from_config(
        &config,
        Arc::new(NoHardware),
        &options(&dermascope_testkit::bundle_dir()),
        |_| {},
    )
    .expect("the daemon starts without its adapter");
    assert!(daemon.analyzer.adapter.current().is_none());
    assert_eq!(report.adapter, None);
    assert!(report.adapter_problem.is_some());
    let notice = daemon.notice.clone().expect("the ready screen says so");
    assert!(notice.contains("adapter"), "{notice}");
    assert!(daemon.cases.device_id.is_some());
}
