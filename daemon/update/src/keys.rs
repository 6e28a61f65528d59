//! Signing keys: the operator's secret key, the device's trusted public
//! keys, and `bundle.toml.sig`.
//!
//! Keys are stored as hex text (a secret key file holds the 32-byte seed,
//! a public key file the 32-byte key), so an operator can read, copy and
//! diff them. A key's id is its hex public key: unambiguous, and what
//! `revoke_keys` lists.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// A key or signature file is a line of hex: anything larger is refused.
const MAX_KEY_FILE_BYTES: u64 = 4096;
/// Public key files in a keys directory end with this.
pub const PUBLIC_KEY_EXT: &str = "pub";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    // The cause is in the message, not the error chain: a caller printing
    // the chain would otherwise say it twice.
    #[error("cannot {action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a key file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path} exists; refusing to overwrite a key (move it away first)")]
    Exists { path: PathBuf },
    #[error("no trusted public key in {path}: put at least one `<name>.pub` file (hex ed25519 key) there")]
    NoKeys { path: PathBuf },
    #[error("the operating system's random generator failed: {0}")]
    Random(String),
}

/// The hex id of a public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

/// A public key from its hex id.
pub fn parse_public(hex_key: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .map_err(|e| format!("not hex: {e}"))?
        .try_into()
        .map_err(|_| "not 32 bytes".to_owned())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an ed25519 public key: {e}"))
}

fn read_small(path: &Path) -> Result<String, KeyError> {
    let io = |action, source| KeyError::Io {
        action,
        path: path.to_path_buf(),
        error: source,
    };
    let file = fs::File::open(path).map_err(|e| io("open", e))?;
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| io("read", e))?;
    if text.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(KeyError::Malformed {
            path: path.to_path_buf(),
            reason: "larger than a key file can be".into(),
        });
    }
    Ok(text)
}

/// Makes a new key pair: the secret seed at `secret` (mode 0600, written
/// durably), the public key at `public`. Refuses to overwrite either.
pub fn generate(secret: &Path, public: &Path) -> Result<VerifyingKey, KeyError> {
    for path in [secret, public] {
        if fs::symlink_metadata(path).is_ok() {
            return Err(KeyError::Exists {
                path: path.to_path_buf(),
            });
        }
    }
    for path in [secret, public] {
        let dir = dermascope_durable::parent_dir(path);
        dermascope_durable::create_private_dir_all(&dir).map_err(|error| KeyError::Io {
            action: "create",
            path: dir.clone(),
            error,
        })?;
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let signing = SigningKey::from_bytes(&seed);
    seed.fill(0);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io {
            action: "write",
            path,
            error: source,
        }
    };
    // dermascope-durable writes 0600 whatever the umask: what a secret key needs.
    dermascope_durable::replace_durably(
        secret,
        format!("{}\n", hex::encode(signing.to_bytes())).as_bytes(),
    )
    .map_err(io(secret))?;
    let verifying = signing.verifying_key();
    dermascope_durable::replace_durably(public, format!("{}\n", key_id(&verifying)).as_bytes())
        .map_err(io(public))?;
    #[cfg(unix)]
    {
        // A public key is meant to be copied onto every device.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(public, fs::Permissions::from_mode(0o644)).map_err(io(public))?;
    }
    Ok(verifying)
}

/// Reads a secret key file written by [`generate`].
pub fn read_secret(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_small(path)?;
    let malformed = |reason: &str| KeyError::Malformed {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    let bytes: [u8; 32] = hex::decode(text.trim())
        .map_err(|_| malformed("not hex"))?
        .try_into()
        .map_err(|_| malformed("not a 32-byte ed25519 secret key"))?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Reads a public key file.
pub fn read_public(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = read_small(path)?;
    parse_public(&text).map_err(|reason| KeyError::Malformed {
        path: path.to_path_buf(),
        reason,
    })
}

/// The device's trusted public keys, by id. Revocation is not applied here
/// (the installer's persisted revocation list is).
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
}

impl TrustedKeys {
    /// Every `*.pub` file in a directory, or one public key file. More than
    /// one key is the normal case: a fleet rotates keys by shipping the new
    /// public key before retiring the old one.
    pub fn load(path: &Path) -> Result<TrustedKeys, KeyError> {
        let mut keys = BTreeMap::new();
        let meta = fs::metadata(path).map_err(|source| KeyError::Io {
            action: "read trusted keys from",
            path: path.to_path_buf(),
            error: source,
        })?;
        if meta.is_dir() {
            let entries = fs::read_dir(path).map_err(|source| KeyError::Io {
                action: "list",
                path: path.to_path_buf(),
                error: source,
            })?;
            let mut files = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| KeyError::Io {
                    action: "list",
                    path: path.to_path_buf(),
                    error: source,
                })?;
                let p = entry.path();
                if p.extension().is_some_and(|e| e == PUBLIC_KEY_EXT) {
                    files.push(p);
                }
            }
            files.sort();
            for file in files {
                let key = read_public(&file)?;
                keys.insert(key_id(&key), key);
            }
        } else {
            let key = read_public(path)?;
            keys.insert(key_id(&key), key);
        }
        if keys.is_empty() {
            return Err(KeyError::NoKeys {
                path: path.to_path_buf(),
            });
        }
        Ok(TrustedKeys { keys })
    }

    pub fn from_keys(keys: impl IntoIterator<Item = VerifyingKey>) -> TrustedKeys {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
        }
    }

    pub fn get(&self, id: &str) -> Option<&VerifyingKey> {
        self.keys.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

/// `bundle.toml.sig`: which key signed, and the signature over the
/// manifest's exact bytes. Naming the key lets the device tell "unknown
/// key" and "revoked key" from "bad signature".
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    pub key: String,
    pub signature: String,
}

impl SignatureFile {
    pub fn sign(key: &SigningKey, manifest_bytes: &[u8]) -> SignatureFile {
        SignatureFile {
            key: key_id(&key.verifying_key()),
            signature: hex::encode(key.sign(manifest_bytes).to_bytes()),
        }
    }

    pub fn parse(text: &str) -> Result<(SignatureFile, Signature), String> {
        let file: SignatureFile =
            toml::from_str(text).map_err(|e| format!("not a signature file: {}", e.message()))?;
        let bytes: [u8; 64] = hex::decode(&file.signature)
            .map_err(|_| "signature is not hex".to_owned())?
            .try_into()
            .map_err(|_| "signature is not 64 bytes".to_owned())?;
        Ok((file, Signature::from_bytes(&bytes)))
    }

    pub fn to_toml(&self) -> String {
        format!(
            "key = \"{}\"\nsignature = \"{}\"\n",
            self.key, self.signature
        )
    }
}
