//! Bundles, keys and installers for the update tests. Bundles are made
//! here, small and deterministic: the installer never parses model files,
//! it only hashes them and reads `model_id` / `encoder_model_id`.
#![allow(dead_code)]

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};

use dermascope_update::keys::{generate, read_secret};
use dermascope_update::{
    sign_bundle, HealthCheck, InstallOptions, InstallReport, InstalledVersion, Installer,
    NoPreparation, SignOptions, Step, TrustedKeys, UpdateError,
};
use ed25519_dalek::SigningKey;

pub const DAEMON_VERSION: &str = "0.1.0";

pub struct Key {
    pub signing: SigningKey,
    pub public: PathBuf,
    pub id: String,
}

/// A key pair under `dir/<name>.key|.pub`, as `update keygen` writes it.
pub fn key(dir: &Path, name: &str) -> Key {
    fs::create_dir_all(dir).unwrap();
    let secret = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let verifying = generate(&secret, &public).unwrap();
    Key {
        signing: read_secret(&secret).unwrap(),
        public,
        id: hex::encode(verifying.as_bytes()),
    }
}

/// A trusted-keys directory holding the given public keys.
pub fn trusted_dir(dir: &Path, keys: &[&Key]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    for k in keys {
        fs::copy(&k.public, dir.join(k.public.file_name().unwrap())).unwrap();
    }
    dir.to_path_buf()
}

/// Deterministic filler bytes, different for each `seed`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What to put in a bundle directory.
#[derive(Clone, Default)]
pub struct Contents {
    /// Encoder model id and the size of each of its two model files.
    pub encoder: Option<(String, usize)>,
    /// The encoder the adapter was trained for, and its model size.
    pub adapter: Option<(String, usize)>,
    pub library: bool,
    pub config: bool,
    /// Makes the file contents unique to this bundle.
    pub seed: u64,
}

pub fn write_contents(dir: &Path, c: &Contents) {
    fs::create_dir_all(dir).unwrap();
    if let Some((model, size)) = &c.encoder {
        let d = dir.join("encoder");
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("manifest.toml"),
            format!("format = 1\nmodel_id = \"{model}\"\n"),
        )
        .unwrap();
        fs::write(d.join("encoder-fp32.onnx"), bytes(c.seed * 10 + 1, *size)).unwrap();
        fs::write(d.join("encoder-int8.onnx"), bytes(c.seed * 10 + 2, *size)).unwrap();
    }
    if let Some((model, size)) = &c.adapter {
        let d = dir.join("adapter");
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("manifest.toml"),
            format!("encoder_model_id = \"{model}\"\nclasses = [\"nevus\", \"melanoma\"]\n"),
        )
        .unwrap();
        fs::write(d.join("adapter.onnx"), bytes(c.seed * 10 + 3, *size)).unwrap();
    }
    if c.library {
        let d = dir.join("library");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("reference.jsonl"), bytes(c.seed * 10 + 4, 4096)).unwrap();
    }
    if c.config {
        let d = dir.join("config");
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("dermascope.toml"),
            format!("# bundle {}\n[camera]\n", c.seed),
        )
        .unwrap();
    }
}

/// Writes and signs a bundle; returns its directory.
pub fn bundle(dir: &Path, c: &Contents, version: u64, key: &Key) -> PathBuf {
    bundle_with(
        dir,
        c,
        key,
        SignOptions {
            version,
            ..SignOptions::default()
        },
    )
}

pub fn bundle_with(dir: &Path, c: &Contents, key: &Key, options: SignOptions) -> PathBuf {
    write_contents(dir, c);
    sign_bundle(dir, &key.signing, &options).unwrap();
    dir.to_path_buf()
}

pub fn full(model: &str, seed: u64) -> Contents {
    Contents {
        encoder: Some((model.into(), 64 * 1024)),
        adapter: Some((model.into(), 16 * 1024)),
        library: true,
        config: true,
        seed,
    }
}

pub fn adapter_only(model: &str, seed: u64) -> Contents {
    Contents {
        adapter: Some((model.into(), 16 * 1024)),
        seed,
        ..Contents::default()
    }
}

/// A health check that passes, or fails with a reason, and counts calls.
pub struct FakeCheck {
    pub fail: Option<String>,
    pub calls: RefCell<usize>,
}

impl FakeCheck {
    pub fn pass() -> FakeCheck {
        FakeCheck {
            fail: None,
            calls: RefCell::new(0),
        }
    }
    pub fn failing(reason: &str) -> FakeCheck {
        FakeCheck {
            fail: Some(reason.into()),
            calls: RefCell::new(0),
        }
    }
}

impl HealthCheck for FakeCheck {
    fn check(&self, version: &InstalledVersion) -> Result<(), String> {
        *self.calls.borrow_mut() += 1;
        // Whatever the verdict, the check runs on a complete version.
        dermascope_update::verify_version(&version.dir).map_err(|e| e.to_string())?;
        match &self.fail {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }
}

pub fn installer(root: &Path, keys: &Path) -> Installer {
    Installer::new(root, TrustedKeys::load(keys).unwrap(), DAEMON_VERSION)
}

pub fn install(
    installer: &Installer,
    bundle: &Path,
    check: &dyn HealthCheck,
) -> Result<InstallReport, UpdateError> {
    installer.install(
        bundle,
        &InstallOptions {
            retry_failed: false,
            prepare: &NoPreparation,
            health: check,
            progress: &|_: Step| {},
        },
    )
}

/// Everything under `root` (paths, sizes, link targets and file bytes'
/// hash): equal snapshots mean nothing on the device was touched.
pub fn snapshot(root: &Path) -> Vec<(String, String)> {
    use sha2::Digest;
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let t = e.file_type().unwrap();
            if rel == ".lock" {
                continue;
            }
            if t.is_symlink() {
                out.push((rel, format!("-> {}", fs::read_link(&p).unwrap().display())));
            } else if t.is_dir() {
                out.push((rel, "dir".into()));
                pending.push(p);
            } else {
                let data = fs::read(&p).unwrap();
                out.push((rel, hex::encode(sha2::Sha256::digest(&data))));
            }
        }
    }
    out.sort();
    out
}
