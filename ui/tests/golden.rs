//! Golden images: every screen at every size, pixel for pixel against the
//! PNGs in `tests/golden/` (copied to `docs/screens/`).
//!
//! `DERMASCOPE_BLESS=1 cargo test --release -p dermascope-ui` rewrites both
//! after a deliberate change; look at them before committing.

mod common;

use std::path::{Path, PathBuf};

use dermascope_ui::{render, Canvas};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screens")
}

fn blessing() -> bool {
    std::env::var_os("DERMASCOPE_BLESS").is_some_and(|v| v == "1")
}

/// Every golden's file name and freshly rendered canvas.
fn rendered() -> Vec<(String, Canvas)> {
    let mut all = Vec::new();
    for (stem, status, screen) in common::screens() {
        for (w, h) in common::SIZES {
            let mut canvas = Canvas::new(w, h).unwrap();
            render(&mut canvas, &status, &screen).unwrap();
            all.push((format!("{stem}_{w}x{h}.png"), canvas));
        }
    }
    all
}

/// `None` when `path` holds exactly `canvas`'s pixels, else why not.
fn difference(path: &Path, canvas: &Canvas) -> Option<String> {
    let golden = match image::open(path) {
        Ok(image) => image.to_rgb8(),
        Err(e) => return Some(format!("cannot read {}: {e}", path.display())),
    };
    if golden.dimensions() != (canvas.width(), canvas.height()) {
        return Some(format!(
            "golden is {:?}, rendered {}x{}",
            golden.dimensions(),
            canvas.width(),
            canvas.height()
        ));
    }
    let differing = golden
        .as_raw()
        .chunks_exact(3)
        .zip(canvas.pixels().chunks_exact(3))
        .filter(|(a, b)| a != b)
        .count();
    (differing > 0).then(|| format!("{differing} pixels differ"))
}

#[test]
fn screens_match_goldens() {
    let rendered = rendered();
    if blessing() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::create_dir_all(docs_dir()).unwrap();
        for (name, canvas) in &rendered {
            let png = canvas.to_png().unwrap();
            std::fs::write(golden_dir().join(name), &png).unwrap();
            std::fs::write(docs_dir().join(name), &png).unwrap();
        }
        println!("blessed {} goldens", rendered.len());
        return;
    }
    let actual_dir = std::env::temp_dir().join("dermascope-ui-golden");
    let mut failures = Vec::new();
    for (name, canvas) in &rendered {
        if let Some(why) = difference(&golden_dir().join(name), canvas) {
            std::fs::create_dir_all(&actual_dir).unwrap();
            let actual = actual_dir.join(name);
            std::fs::write(&actual, canvas.to_png().unwrap()).unwrap();
            println!(
                "MISMATCH {name}: {why}; actual written to {}",
                actual.display()
            );
            failures.push(name.clone());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} screens differ from tests/golden (actual PNGs in {}); if the change is \
         intended, rerun with DERMASCOPE_BLESS=1: {failures:?}",
        failures.len(),
        rendered.len(),
        actual_dir.display()
    );
}

#[test]
fn docs_show_the_current_goldens() {
    if blessing() {
        return;
    }
    for (name, _) in rendered() {
        let golden = image::open(golden_dir().join(&name)).unwrap().to_rgb8();
        let docs = image::open(docs_dir().join(&name))
            .unwrap_or_else(|e| panic!("docs/screens/{name}: {e}"))
            .to_rgb8();
        assert!(
            golden == docs,
            "docs/screens/{name} is stale; rerun with DERMASCOPE_BLESS=1"
        );
    }
}

#[test]
fn every_screen_looks_different() {
    let rendered = rendered();
    for (i, (a, ca)) in rendered.iter().enumerate() {
        for (b, cb) in &rendered[i + 1..] {
            if ca.width() == cb.width() {
                assert_ne!(ca.pixels(), cb.pixels(), "{a} and {b} render the same");
            }
        }
    }
}
