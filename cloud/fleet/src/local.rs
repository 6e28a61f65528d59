//! The commands' work on local files: keys, building an archive from a
//! bundle directory, and checking an archive before it is published. Each
//! is a few calls into `dermascope-update`, the crate the device verifies
//! and installs with, so the operator's checks are the device's.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dermascope_cloud::fleet::BundleFacts;
use dermascope_update::{archive, keys, manifest, sign_bundle, verify_bundle, SignOptions};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct KeyCreated {
    pub key_id: String,
    pub secret: PathBuf,
    pub public: PathBuf,
    /// Both files existed and belong together; nothing was written.
    pub already: bool,
    pub dry_run: bool,
}

/// A new signing key, or the existing pair when both files are there and
/// match (never overwritten).
pub fn create_key(secret: &Path, public: &Path, dry_run: bool) -> Result<KeyCreated> {
    let exists = |p: &Path| fs::symlink_metadata(p).is_ok();
    match (exists(secret), exists(public)) {
        (true, true) => {
            let signing = keys::read_secret(secret)?;
            let verifying = keys::read_public(public)?;
            if signing.verifying_key() != verifying {
                bail!(
                    "{} and {} exist but are not one key pair; move them away or name other files",
                    secret.display(),
                    public.display()
                );
            }
            Ok(KeyCreated {
                key_id: keys::key_id(&verifying),
                secret: secret.to_path_buf(),
                public: public.to_path_buf(),
                already: true,
                dry_run,
            })
        }
        (true, false) | (false, true) => bail!(
            "only one of {} and {} exists; refusing to overwrite half of a key pair",
            secret.display(),
            public.display()
        ),
        (false, false) if dry_run => Ok(KeyCreated {
            key_id: String::new(),
            secret: secret.to_path_buf(),
            public: public.to_path_buf(),
            already: false,
            dry_run,
        }),
        (false, false) => {
            let key = keys::generate(secret, public)?;
            Ok(KeyCreated {
                key_id: keys::key_id(&key),
                secret: secret.to_path_buf(),
                public: public.to_path_buf(),
                already: false,
                dry_run,
            })
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Built {
    pub out: PathBuf,
    pub version: u64,
    pub carries: Vec<String>,
    pub files: usize,
    pub signed_by: String,
    pub archive_sha256: String,
    pub archive_size: u64,
    /// `out` held this very archive already; it was left as it was.
    pub already: bool,
    /// `out` held another archive, now replaced.
    pub replaced: bool,
    pub dry_run: bool,
}

/// Copies a bundle directory's files (regular files and directories only;
/// an old `bundle.toml` and signature are left behind, since they are
/// made anew).
fn copy_tree(from: &Path, to: &Path, top: bool) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(from)
        .with_context(|| format!("listing {}", from.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", from.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        if top && (name == manifest::MANIFEST || name == manifest::SIGNATURE) {
            continue;
        }
        let src = entry.path();
        let dst = to.join(&name);
        let kind = fs::symlink_metadata(&src)
            .with_context(|| format!("reading {}", src.display()))?
            .file_type();
        if kind.is_dir() {
            fs::create_dir(&dst).with_context(|| format!("creating {}", dst.display()))?;
            copy_tree(&src, &dst, false)?;
        } else if kind.is_file() {
            fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        } else {
            bail!(
                "{} is not a regular file or directory (a bundle holds no links or devices)",
                src.display()
            );
        }
    }
    Ok(())
}

/// Signs a copy of `dir` (the directory itself is not modified) and packs
/// it into `out`. The same directory, key and options give the same
/// archive byte for byte (ed25519 signatures and the tar are
/// deterministic), so building twice is harmless.
pub fn build(
    dir: &Path,
    key: &Path,
    options: &SignOptions,
    out: &Path,
    dry_run: bool,
) -> Result<Built> {
    let key = keys::read_secret(key)?;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!(
            "{} does not exist (the directory --out names)",
            parent.display()
        );
    }
    let inside = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a.starts_with(b),
        _ => false,
    };
    if inside(&parent, dir) {
        bail!(
            "--out {} is inside the bundle directory {}; write the archive elsewhere",
            out.display(),
            dir.display()
        );
    }
    // Beside `out`, so the finished archive is renamed into place; in the
    // system's temporary directory for a dry run, which writes nothing
    // where the operator looks.
    let staging = if dry_run {
        tempfile::Builder::new()
            .prefix("dermascope-fleet-build")
            .tempdir()
    } else {
        tempfile::Builder::new()
            .prefix(".dermascope-fleet-build")
            .tempdir_in(&parent)
    }
    .context("creating a staging directory")?;
    let bundle = staging.path().join("bundle");
    fs::create_dir(&bundle).context("creating the staging directory")?;
    copy_tree(dir, &bundle, true)?;
    let signed = sign_bundle(&bundle, &key, options)
        .with_context(|| format!("signing the bundle in {}", dir.display()))?;
    let packed = staging.path().join("bundle.tar");
    let info = archive::pack(&bundle, &packed).context("packing the archive")?;
    let mut built = Built {
        out: out.to_path_buf(),
        version: signed.version,
        carries: signed.carries.iter().map(ToString::to_string).collect(),
        files: signed.files.len(),
        signed_by: keys::key_id(&key.verifying_key()),
        archive_sha256: info.sha256.clone(),
        archive_size: info.size,
        already: false,
        replaced: false,
        dry_run,
    };
    if out.exists() {
        let existing = sha256_of(out)?;
        if existing == info.sha256 {
            built.already = true;
            return Ok(built);
        }
        built.replaced = true;
    }
    if !dry_run {
        fs::rename(&packed, out)
            .with_context(|| format!("moving the archive to {}", out.display()))?;
    }
    Ok(built)
}

/// sha256 of a file, hex.
fn sha256_of(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// An archive whose bundle verified against the operator's trusted keys,
/// with the facts the service stores beside it.
#[derive(Debug)]
pub struct Checked {
    pub facts: BundleFacts,
    pub files: usize,
}

/// Unpacks `archive` into a temporary directory (removed afterwards) and
/// verifies it as a device would: signature by a key in `keys`, every
/// file's size and sha256, nothing unlisted.
pub fn check_archive(archive_path: &Path, keys_path: &Path) -> Result<Checked> {
    let trusted = dermascope_update::TrustedKeys::load(keys_path)?;
    let temp = tempfile::Builder::new()
        .prefix("dermascope-fleet-publish")
        .tempdir()
        .context("creating a temporary directory")?;
    let dir = temp.path().join("bundle");
    archive::unpack(archive_path, &dir)
        .with_context(|| format!("unpacking {}", archive_path.display()))?;
    let verified = verify_bundle(&dir, &trusted, &BTreeSet::new()).with_context(|| {
        format!(
            "{} does not verify against the keys in {}",
            archive_path.display(),
            keys_path.display()
        )
    })?;
    let manifest_text =
        String::from_utf8(verified.manifest_bytes.clone()).context("bundle.toml is not UTF-8")?;
    Ok(Checked {
        files: verified.manifest.files.len(),
        facts: BundleFacts {
            version: verified.manifest.version,
            downgrade: verified.manifest.downgrade,
            carries: verified
                .manifest
                .carries
                .iter()
                .map(ToString::to_string)
                .collect(),
            encoder_model_id: verified.manifest.needs.encoder_model_id.clone(),
            signed_by: verified.signed_by.clone(),
            manifest: manifest_text,
        },
    })
}
