//! Checking a bundle without touching the device: signature first (the
//! manifest is parsed only once its bytes are verified), then the tree
//! (no symlinks, no special files, nothing unlisted), then every file's
//! size and sha256.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{io, UpdateError};
use crate::keys::{SignatureFile, TrustedKeys};
use crate::manifest::{FileEntry, Manifest, MANIFEST, MAX_MANIFEST_BYTES, SIGNATURE};

const CHUNK: usize = 1 << 20;

/// A bundle whose signature and files were checked.
#[derive(Clone, Debug)]
pub struct VerifiedBundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The exact signed bytes, copied into the installed version.
    pub manifest_bytes: Vec<u8>,
    pub signature_bytes: Vec<u8>,
    /// sha256 of the manifest: the bundle's identity in the failed list.
    pub manifest_sha256: String,
    pub signed_by: String,
}

impl VerifiedBundle {
    pub fn total_bytes(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.size).sum()
    }
}

/// Reads a small regular file (not a symlink) with a size cap.
fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, UpdateError> {
    let meta = fs::symlink_metadata(path).map_err(io("read", path))?;
    if !meta.file_type().is_file() {
        return Err(UpdateError::BadBundleFile {
            path: path.to_path_buf(),
            reason: "not a regular file".into(),
        });
    }
    let file = fs::File::open(path).map_err(io("open", path))?;
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read", path))?;
    if bytes.len() as u64 > cap {
        return Err(UpdateError::BadBundleFile {
            path: path.to_path_buf(),
            reason: format!("larger than {cap} bytes"),
        });
    }
    Ok(bytes)
}

/// Checks the signature of `dir`'s manifest against `trusted` minus
/// `revoked`, and returns the parsed manifest with its bytes.
pub fn verify_signature(
    dir: &Path,
    trusted: &TrustedKeys,
    revoked: &BTreeSet<String>,
) -> Result<VerifiedBundle, UpdateError> {
    let manifest_path = dir.join(MANIFEST);
    let signature_path = dir.join(SIGNATURE);
    let manifest_bytes = read_capped(&manifest_path, MAX_MANIFEST_BYTES)?;
    let signature_bytes = read_capped(&signature_path, 4096)?;
    let text = std::str::from_utf8(&signature_bytes).map_err(|_| UpdateError::BadBundleFile {
        path: signature_path.clone(),
        reason: "not UTF-8".into(),
    })?;
    let (file, signature) =
        SignatureFile::parse(text).map_err(|reason| UpdateError::BadBundleFile {
            path: signature_path.clone(),
            reason,
        })?;
    let key_hex = file.key.to_ascii_lowercase();
    if revoked.contains(&key_hex) {
        return Err(UpdateError::RevokedKey { key: key_hex });
    }
    let key = trusted
        .get(&key_hex)
        .ok_or_else(|| UpdateError::UnknownKey {
            key: key_hex.clone(),
        })?;
    // verify_strict: refuses small-order keys and non-canonical signatures,
    // so one manifest has exactly one valid signature per key.
    key.verify_strict(&manifest_bytes, &signature)
        .map_err(|_| UpdateError::BadSignature {
            key: key_hex.clone(),
        })?;
    let manifest = Manifest::parse(&manifest_bytes)?;
    Ok(VerifiedBundle {
        dir: dir.to_path_buf(),
        manifest_sha256: hex::encode(Sha256::digest(&manifest_bytes)),
        manifest,
        manifest_bytes,
        signature_bytes,
        signed_by: key_hex,
    })
}

/// Every regular file under `dir` as a `/`-separated relative path;
/// refuses symlinks and special files anywhere in the tree.
pub fn walk(dir: &Path) -> Result<BTreeSet<String>, UpdateError> {
    let mut found = BTreeSet::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = pending.pop() {
        let entries = fs::read_dir(&path).map_err(io("list", &path))?;
        for entry in entries {
            let entry = entry.map_err(io("list", &path))?;
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| UpdateError::NotInManifest {
                path: format!("{rel}{}", name.to_string_lossy()),
            })?;
            let child_rel = format!("{rel}{name}");
            let kind = entry.file_type().map_err(io("inspect", entry.path()))?;
            if kind.is_dir() {
                pending.push((entry.path(), format!("{child_rel}/")));
            } else if kind.is_file() {
                found.insert(child_rel);
            } else {
                return Err(UpdateError::NotRegular { path: child_rel });
            }
        }
    }
    Ok(found)
}

/// Hashes a file, reading at most one byte past `entry.size` so an
/// oversized file is refused without reading all of it.
pub fn check_file(path: &Path, entry: &FileEntry) -> Result<(), UpdateError> {
    let file = fs::File::open(path).map_err(io("open", path))?;
    let mut reader = file.take(entry.size.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    loop {
        let n = reader.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    if total > entry.size {
        return Err(UpdateError::Oversize {
            path: entry.path.clone(),
            expected: entry.size,
        });
    }
    if total < entry.size {
        return Err(UpdateError::Truncated {
            path: entry.path.clone(),
            expected: entry.size,
            found: total,
        });
    }
    if hex::encode(hasher.finalize()) != entry.sha256 {
        return Err(UpdateError::ChangedFile {
            path: entry.path.clone(),
        });
    }
    Ok(())
}

/// The whole check: signature, then tree, then every file. Touches nothing.
pub fn verify_bundle(
    dir: &Path,
    trusted: &TrustedKeys,
    revoked: &BTreeSet<String>,
) -> Result<VerifiedBundle, UpdateError> {
    let bundle = verify_signature(dir, trusted, revoked)?;
    let present = walk(dir)?;
    let listed: BTreeSet<&str> = bundle
        .manifest
        .files
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    for path in &present {
        if path != MANIFEST && path != SIGNATURE && !listed.contains(path.as_str()) {
            return Err(UpdateError::NotInManifest { path: path.clone() });
        }
    }
    for entry in &bundle.manifest.files {
        if !present.contains(&entry.path) {
            return Err(UpdateError::MissingFile {
                path: entry.path.clone(),
            });
        }
    }
    for entry in &bundle.manifest.files {
        check_file(&dir.join(&entry.path), entry)?;
    }
    Ok(bundle)
}

/// sha256 and size of a file (for signing).
pub fn hash_file(path: &Path) -> Result<(u64, String), UpdateError> {
    let mut file = fs::File::open(path).map_err(io("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total: u64 = 0;
    loop {
        let n = file.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((total, hex::encode(hasher.finalize())))
}
