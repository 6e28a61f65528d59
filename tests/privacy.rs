//! "No patient data in logs" (ARCHITECTURE.md, Invariants): `dermascope
//! ingest` and `dermascope run` at `RUST_LOG=debug`, over photographs whose
//! file names are patients' names, with an age, a site, a lesion id and a
//! case note, print none of them on stdout or stderr.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use dermascope_encoder::{Encoder, EncoderOptions};
use dermascope_store::{
    Case, CaseId, CaseMetadata, CaseSource, CaseStore, Diagnosis, Sex, StoreIdentity,
};
use image::{Rgb, RgbImage};
use support::{dermascope, Running};

/// What a clinic's files could hold about a patient, each distinctive
/// enough that finding it in a log cannot be chance.
const NAMES: [&str; 2] = ["JaneDoeSmith_0042", "RobertoGomezBolanos_1999"];
const SITE: &str = "behind-left-earlobe";
const SITE_OF_NOTED_CASE: &str = "under-right-breast-fold";
const LESION: &str = "HAM_JDS_7781";
const AGE: u16 = 117;
const NOTE: &str = "Mrs Jane Doe-Smith, born 1931-02-03, tattoo beside lesion";

/// Parts of the patient data that must not appear in any output, and the
/// shapes an age would take in a log line (a bare "117" could be a timing).
fn leaks(text: &str) -> Vec<String> {
    let mut secrets: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    secrets.extend(
        [
            SITE,
            SITE_OF_NOTED_CASE,
            LESION,
            "Doe-Smith",
            "1931-02-03",
            "tattoo",
            "female",
            "age_years",
            "Some(117)",
            "age=117",
            "age: 117",
            "117 years",
        ]
        .map(String::from),
    );
    secrets
        .into_iter()
        .filter(|s| text.contains(s.as_str()))
        .collect()
}

fn assert_no_patient_data(what: &str, output: &Output) {
    for (stream, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        let text = String::from_utf8_lossy(bytes);
        let found = leaks(&text);
        assert!(
            found.is_empty(),
            "{what} printed patient data {found:?} on {stream}:\n{text}"
        );
    }
}

/// The run logged at debug level: otherwise the check above proves little.
fn assert_debug_logged(what: &str, output: &Output) {
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.lines().filter(|l| l.contains("DEBUG")).count() > 0,
        "{what} printed no DEBUG line; RUST_LOG=debug was not honoured:\n{err}"
    );
}

/// A pigmented blob on skin, `seed` moving and sizing it.
fn lesion(seed: u32) -> RgbImage {
    let cx = 90.0 + (seed % 7) as f32 * 4.0;
    let cy = 70.0 + (seed % 5) as f32 * 3.0;
    let radius = 35.0 + (seed % 11) as f32 * 2.0;
    RgbImage::from_fn(200, 150, |x, y| {
        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
        if d < radius {
            let fade = 0.6 + 0.4 * d / radius;
            Rgb([
                (110.0 * fade) as u8,
                (60.0 * fade) as u8,
                (40.0 * fade) as u8,
            ])
        } else {
            Rgb([225, 170 + (x % 9) as u8, 150 + (y % 7) as u8])
        }
    })
}

/// `dir/images/<name>.jpg` for each name, and `dir/labels.csv` giving each
/// the patient's age, sex, site and lesion id.
fn library(dir: &Path, names: &[&str]) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut csv = String::from("image,label,lesion_id,dx_type,age,sex,anatom_site\n");
    for (i, name) in names.iter().enumerate() {
        lesion(i as u32 * 5)
            .save(images.join(format!("{name}.jpg")))
            .unwrap();
        csv.push_str(&format!(
            "{name}.jpg,nv,{LESION}-{i},histo,{AGE},female,{SITE}\n"
        ));
    }
    let labels = dir.join("labels.csv");
    std::fs::write(&labels, csv).unwrap();
    labels
}

/// A case holding a note, added through the store's own API (no command
/// takes notes yet), whose photograph the camera will show, so a capture
/// reads it back as its best match.
fn add_noted_case(store: &Path, photo: &RgbImage) {
    let encoder = Encoder::load(
        &dermascope_testkit::bundle_dir(),
        &EncoderOptions::default(),
    )
    .unwrap();
    let cases = CaseStore::open(
        store,
        StoreIdentity {
            model_id: encoder.model_id().to_string(),
            embedding_dim: encoder.dim(),
        },
    )
    .unwrap();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
        .encode_image(photo)
        .unwrap();
    cases
        .insert(&Case {
            id: CaseId::new("noted-case").unwrap(),
            embedding: encoder.embed_rgb(photo).unwrap().into_values(),
            diagnosis: Diagnosis::from_code("mel").unwrap(),
            source: CaseSource::Reference,
            metadata: CaseMetadata {
                age_years: Some(AGE),
                sex: Some(Sex::Female),
                anatomical_site: Some(SITE_OF_NOTED_CASE.into()),
                fitzpatrick_type: None,
                note: Some(NOTE.into()),
                lesion_id: Some(format!("{LESION}-noted")),
            },
            thumbnail_jpeg: jpeg,
            model_id: encoder.model_id().to_string(),
            created_at_ms: 0,
            updated_at_ms: 0,
            label_confirmed: true,
            device_id: None,
            revision: 1,
        })
        .unwrap();
}

#[test]
fn ingest_and_the_daemon_log_no_patient_data_at_debug_level() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("cases");

    // `dermascope ingest` of a photograph named after its patient.
    let first = dir.path().join("first");
    let labels = library(&first, &NAMES[..1]);
    let ingest = dermascope()
        .args(["ingest", "--images"])
        .arg(first.join("images"))
        .arg("--labels")
        .arg(&labels)
        .arg("--store")
        .arg(&store)
        .output()
        .unwrap();
    assert!(
        ingest.status.success(),
        "{}",
        String::from_utf8_lossy(&ingest.stderr)
    );
    assert!(String::from_utf8_lossy(&ingest.stdout).contains("ingested 1,"));
    assert_debug_logged("ingest", &ingest);
    assert_no_patient_data("ingest", &ingest);

    let camera = lesion(3);
    add_noted_case(&store, &camera);

    // `dermascope run` adding another such photograph at start, answering a
    // capture whose best match holds the note, and storing a confirmation.
    let second = dir.path().join("second");
    library(&second, &NAMES[1..]);
    let replay = dir.path().join("replay");
    std::fs::create_dir_all(&replay).unwrap();
    camera.save(replay.join("frame.png")).unwrap();
    let socket = dir.path().join("control.sock");
    let config = dir.path().join("dermascope.toml");
    std::fs::write(
        &config,
        format!(
            "[camera]\nreplay_dir = {replay:?}\n[trigger]\nsocket = {socket:?}\n\
             [display]\npng_dir = {screens:?}\n[store]\ndir = {store:?}\n\
             [adapter]\ndir = {adapter:?}\n[quality]\nmin_focus = 0.0\nmin_lesion_contrast = 0.0\n",
            screens = dir.path().join("screens"),
            adapter = dir.path().join("no-adapter"),
        ),
    )
    .unwrap();
    let mut daemon = Running::spawn(
        dermascope()
            .args(["run", "--config"])
            .arg(&config)
            .arg("--cases")
            .arg(&second),
    );
    // Watchdog only: the daemon embeds one photograph, then listens.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "watchdog: no control socket after 300 s"
        );
        if daemon.child.try_wait().unwrap().is_some() {
            let output = daemon.finish(deadline);
            panic!(
                "the daemon exited early: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The loop takes the presses in order: the capture is answered before
    // the confirmation, which is stored before the shutdown completes.
    for press in [&["capture"][..], &["confirm", "mel"], &["shutdown"]] {
        let pressed = dermascope()
            .args(["press", "--socket"])
            .arg(&socket)
            .args(press)
            .output()
            .unwrap();
        assert!(pressed.status.success(), "press {press:?}: {pressed:?}");
        assert_no_patient_data("press", &pressed);
    }
    let output = daemon.finish(Instant::now() + Duration::from_secs(120));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{err}");
    assert!(
        err.contains("stopped: 1 captures") && err.contains("1 confirmed"),
        "{err}"
    );
    assert!(err.contains("capture stored as a case"), "{err}");
    assert_debug_logged("run", &output);
    assert_no_patient_data("run", &output);
}
