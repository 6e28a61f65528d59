//! Which device this is: the id recorded on every case it creates.

use std::path::{Path, PathBuf};

use dermascope_store::CaseId;

use crate::config::Config;

/// File beside the store directory that keeps a generated device id.
pub const DEVICE_ID_FILE: &str = "device-id";

#[derive(Debug, thiserror::Error)]
pub enum DeviceIdError {
    #[error("{path}: {source}; set [device] id in the configuration, or fix the file")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not hold a device id (1..=128 bytes, one line): fix or remove it")]
    Garbled { path: PathBuf },
}

/// `[device] id`, else the id kept in `device-id` beside the store
/// directory, made at first start (a UUIDv7) and written atomically, so a
/// kill never leaves half an id and the id survives re-embedding (which
/// replaces the store directory, not its parent).
pub fn device_id(config: &Config) -> Result<String, DeviceIdError> {
    if let Some(id) = &config.device.id {
        return Ok(id.clone());
    }
    let parent = match config.store.dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    kept_or_new(&parent.join(DEVICE_ID_FILE))
}

fn kept_or_new(path: &Path) -> Result<String, DeviceIdError> {
    let io = |source| DeviceIdError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = text.trim();
            let valid = !id.is_empty()
                && id.len() <= dermascope_store::MAX_DEVICE_ID_BYTES
                && !id.chars().any(char::is_control);
            if valid {
                Ok(id.to_owned())
            } else {
                Err(DeviceIdError::Garbled {
                    path: path.to_path_buf(),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = CaseId::generate().as_str().to_owned();
            dermascope_durable::create_private_dir_all(&dermascope_durable::parent_dir(path))
                .map_err(io)?;
            dermascope_durable::replace_durably(path, format!("{id}\n").as_bytes()).map_err(io)?;
            Ok(id)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_id_is_kept_and_a_configured_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.store.dir = dir.path().join("var/cases");
        let first = device_id(&config).unwrap();
        assert_eq!(first.len(), 36, "{first}");
        assert_eq!(device_id(&config).unwrap(), first);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("var/device-id")).unwrap(),
            format!("{first}\n")
        );
        // The folder it made and the file are the daemon user's alone.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((mode("var"), mode("var/device-id")), (0o700, 0o600));
        config.device.id = Some("scope-2".into());
        assert_eq!(device_id(&config).unwrap(), "scope-2");
        config.device.id = None;
        std::fs::write(dir.path().join("var/device-id"), "\n").unwrap();
        assert!(matches!(
            device_id(&config),
            Err(DeviceIdError::Garbled { .. })
        ));
    }
}
