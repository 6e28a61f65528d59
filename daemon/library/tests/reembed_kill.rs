//! `reembed` killed with SIGKILL at random points (chosen from the
//! batches it reports flushed), then run again: every case with an original
//! ends re-embedded exactly once, the library is only ever the complete old
//! store or the complete new one, and the old store is kept whole.
//!
//! The child is this test binary again, in child mode (`REEMBED_CHILD`).

use std::io::{BufRead, BufReader};
use std::ops::ControlFlow;
use std::path::Path;
use std::process::Stdio;

use dermascope_encoder::{Encoder, EncoderOptions};
use dermascope_library::original_from_rgb;
use dermascope_library::reembed::{reembed, staging_dir, ReembedOptions, ReembedOutcome};
use dermascope_store::{
    Case, CaseId, CaseMetadata, CaseSource, CaseStore, CaseWrite, Diagnosis, StoreIdentity,
};
use image::{Rgb, RgbImage};

const CASES: usize = 48;
const KILLS: u64 = 8;

fn old_identity() -> StoreIdentity {
    StoreIdentity {
        model_id: "old-encoder-v1".into(),
        embedding_dim: 4,
    }
}

fn encoder() -> Encoder {
    Encoder::load(
        &dermascope_testkit::bundle_dir(),
        &EncoderOptions {
            threads: 1,
            ..EncoderOptions::default()
        },
    )
    .expect("loading the default encoder")
}

fn old_library(dir: &Path) {
    let store = CaseStore::open(dir, old_identity()).unwrap();
    let cases: Vec<Case> = (0..CASES)
        .map(|i| Case {
            id: CaseId::new(format!("case-{i:03}")).unwrap(),
            embedding: vec![0.5; 4],
            diagnosis: Diagnosis::from_code("nv").unwrap(),
            source: CaseSource::Captured,
            metadata: CaseMetadata::default(),
            thumbnail_jpeg: vec![0xFF, 0xD8, 0xFF, 0xD9],
            model_id: old_identity().model_id,
            created_at_ms: i as u64,
            updated_at_ms: i as u64,
            label_confirmed: true,
            device_id: None,
            revision: 1,
        })
        .collect();
    let originals: Vec<_> = (0..CASES)
        .map(|i| {
            let shade = (40 + i * 3) as u8;
            let photo = RgbImage::from_fn(120, 90, |x, y| {
                if (x as i32 - 60).pow(2) + (y as i32 - 45).pow(2) < 600 {
                    Rgb([shade, 40, 30])
                } else {
                    Rgb([220, 170, 150])
                }
            });
            original_from_rgb(&photo).unwrap()
        })
        .collect();
    let writes: Vec<CaseWrite<'_>> = cases
        .iter()
        .zip(&originals)
        .map(|(case, original)| CaseWrite {
            case,
            original: Some(original),
        })
        .collect();
    store.insert_with_originals(&writes).unwrap();
}

/// Child mode: re-embed, printing each flushed batch, until killed.
fn child(library: &Path) {
    let encoder = encoder();
    let options = ReembedOptions {
        batch: 3,
        ..ReembedOptions::default()
    };
    let report = reembed(library, &encoder, options, |p| {
        println!("flushed {} of {}", p.done, p.total);
        ControlFlow::Continue(())
    })
    .expect("the child's reembed");
    println!("outcome {:?}", report.outcome);
}

fn open_when_free(dir: &Path, identity: &StoreIdentity) -> CaseStore {
    for _ in 0..200 {
        if let Ok(store) = CaseStore::open(dir, identity.clone()) {
            return store;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{} never opened", dir.display());
}

#[test]
fn reembed_survives_sigkill_at_random_batches() {
    if let Some(library) = std::env::var_os("REEMBED_CHILD") {
        child(Path::new(&library));
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let library = root.path().join("cases");
    old_library(&library);
    let new_identity = {
        let e = encoder();
        StoreIdentity {
            model_id: e.model_id().into(),
            embedding_dim: e.dim(),
        }
    };
    let mut seed = 0x5EED_u64;
    let mut kills = 0;
    let mut finished = false;
    for run in 0..KILLS + 1 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Kill after 1..=2 flushed batches, or let the last run finish.
        let wait_for = if run < KILLS {
            1 + (seed >> 33) % 2
        } else {
            u64::MAX
        };
        let mut child = dermascope_testkit::command(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "reembed_survives_sigkill_at_random_batches",
                "--nocapture",
            ])
            .env("REEMBED_CHILD", &library)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut flushed = 0;
        for line in stdout.lines() {
            let line = line.unwrap();
            if line.starts_with("flushed") {
                flushed += 1;
                if flushed == wait_for {
                    child.kill().unwrap();
                    kills += 1;
                    break;
                }
            }
            if line.starts_with("outcome") {
                finished = true;
            }
        }
        let status = child.wait().unwrap();
        // Between runs the library is whole: the old store until the
        // switch, the complete new one after it.
        let identity = CaseStore::identity_at(&library).unwrap().unwrap();
        if identity == old_identity() {
            assert_eq!(open_when_free(&library, &identity).len().unwrap(), CASES);
        } else {
            assert_eq!(identity, new_identity);
            assert_eq!(open_when_free(&library, &identity).len().unwrap(), CASES);
        }
        if finished {
            assert!(status.success(), "run {run}: {status}");
            break;
        }
    }
    assert!(finished, "the last run did not finish");
    assert!(kills >= KILLS, "only {kills} kills landed");
    // The end state: the new library with every case once, the old one kept.
    let store = open_when_free(&library, &new_identity);
    let ids = store.ids().unwrap();
    assert_eq!(ids.len(), CASES);
    assert_eq!(store.check_integrity().unwrap(), []);
    for id in &ids {
        assert!(store.has_original(id).unwrap());
    }
    drop(store);
    assert!(!staging_dir(&library).exists());
    let previous = library.with_file_name("cases.previous-old-encoder-v1");
    assert_eq!(
        open_when_free(&previous, &old_identity()).len().unwrap(),
        CASES
    );
    // And a further run has nothing to do.
    let again = reembed(&library, &encoder(), ReembedOptions::default(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(again.outcome, ReembedOutcome::AlreadyCurrent);
    eprintln!("reembed: {kills} SIGKILLs, {CASES} cases, none lost or doubled");
}
