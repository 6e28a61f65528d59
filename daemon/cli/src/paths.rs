//! Where the daemon finds its files when the command line does not say.

use std::path::PathBuf;

const DEFAULT_BUNDLE_NAME: &str = "sklesion-xception";
const INSTALLED_MODELS: &str = "/usr/share/dermascope/models";

/// The encoder bundle: flag, then `$DERMASCOPE_MODEL_DIR`, then the build's
/// output in the working tree, then the system-wide install.
pub fn encoder_bundle(flag: Option<&PathBuf>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os("DERMASCOPE_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    let in_tree = PathBuf::from("models/dist").join(DEFAULT_BUNDLE_NAME);
    if in_tree.is_dir() {
        return in_tree;
    }
    let installed = PathBuf::from(INSTALLED_MODELS).join(DEFAULT_BUNDLE_NAME);
    if installed.is_dir() {
        return installed;
    }
    // Neither exists: return the in-tree path so the error names the build command.
    in_tree
}

/// The case store: flag, then `$DERMASCOPE_STORE`, then `var/cases`.
pub fn case_store(flag: Option<&PathBuf>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.clone();
    }
    std::env::var_os("DERMASCOPE_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("var/cases"))
}

/// The installed adapter: flag, then `$DERMASCOPE_ADAPTER`, then `var/adapter`.
pub fn adapter(flag: Option<&PathBuf>) -> PathBuf {
    if let Some(dir) = flag {
        return dir.clone();
    }
    std::env::var_os("DERMASCOPE_ADAPTER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("var/adapter"))
}
