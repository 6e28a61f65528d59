//! The operator's side, for now: hash a bundle directory into `bundle.toml`
//! and sign it. (It moves to the fleet tool later; the tests need it now.)

use std::path::Path;

use ed25519_dalek::SigningKey;

use crate::error::{io, UpdateError};
use crate::keys::SignatureFile;
use crate::manifest::{check_path, FileEntry, Manifest, Needs, Part, FORMAT, MANIFEST, SIGNATURE};
use crate::verify::{hash_file, walk};

#[derive(Clone, Debug, Default)]
pub struct SignOptions {
    pub version: u64,
    pub downgrade: bool,
    /// The encoder an adapter or library was made for. When absent, taken
    /// from `adapter/manifest.toml` (`encoder_model_id`), else from the
    /// bundle's own `encoder/manifest.toml`.
    pub encoder_model_id: Option<String>,
    pub min_daemon_version: Option<String>,
    pub revoke_keys: Vec<String>,
}

/// Writes `dir/bundle.toml` listing every file under `encoder/`,
/// `adapter/`, `library/` and `config/` (the parts present are what the
/// bundle carries) and `dir/bundle.toml.sig`. Refuses anything else in the
/// directory, so what is signed is exactly what is shipped.
pub fn sign_bundle(
    dir: &Path,
    key: &SigningKey,
    options: &SignOptions,
) -> Result<Manifest, UpdateError> {
    let mut files = Vec::new();
    let mut carries = Vec::new();
    for path in walk(dir)? {
        if path == MANIFEST || path == SIGNATURE {
            continue;
        }
        let part =
            check_path(&path)?.ok_or_else(|| UpdateError::NotInManifest { path: path.clone() })?;
        if !carries.contains(&part) {
            carries.push(part);
        }
        let (size, sha256) = hash_file(&dir.join(&path))?;
        files.push(FileEntry { path, size, sha256 });
    }
    carries.sort();
    let mut encoder_model_id = options.encoder_model_id.clone();
    if encoder_model_id.is_none() && carries.iter().any(|p| p.needs_encoder()) {
        let adapter = dir.join("adapter/manifest.toml");
        let encoder = dir.join("encoder/manifest.toml");
        if carries.contains(&Part::Adapter) && adapter.is_file() {
            encoder_model_id = crate::install::toml_string(&adapter, "encoder_model_id")?;
        }
        if encoder_model_id.is_none() && carries.contains(&Part::Encoder) {
            encoder_model_id = Some(crate::install::encoder_model_id(&encoder)?);
        }
    }
    let manifest = Manifest {
        format: FORMAT,
        version: options.version,
        downgrade: options.downgrade,
        carries,
        revoke_keys: options
            .revoke_keys
            .iter()
            .map(|k| k.to_ascii_lowercase())
            .collect(),
        needs: Needs {
            encoder_model_id,
            min_daemon_version: options.min_daemon_version.clone(),
        },
        files,
    };
    manifest.validate()?;
    let text = manifest.to_toml()?;
    let signature = SignatureFile::sign(key, text.as_bytes());
    let manifest_path = dir.join(MANIFEST);
    let signature_path = dir.join(SIGNATURE);
    write_public(&manifest_path, text.as_bytes())?;
    write_public(&signature_path, signature.to_toml().as_bytes())?;
    Ok(manifest)
}

/// A bundle is copied to sticks and servers: readable by all.
fn write_public(path: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    dermascope_durable::replace_durably(path, bytes).map_err(io("write", path))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(io("chmod", path))
}
