//! Reading `manifest.json` files (the images' own, the bundle's pending one,
//! and `rootfs.img.manifest.json`, the record of the applied rootfs).

use std::io;
use std::path::{Path, PathBuf};

use socket_proto::manifest::{Manifest, MANIFEST_FORMAT};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid manifest: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A parsed manifest and the exact bytes it was parsed from (recorded as
/// they are when a rootfs is applied).
#[derive(Debug, Clone)]
pub struct LoadedManifest {
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
}

/// The largest `manifest.json` read: 1 MiB (coworkvm's are a few KiB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Reads and checks a manifest; `None` when the file does not exist. The
/// file must be a regular file (no symbolic link, no FIFO: see
/// [`super::fsutil::open_regular`]) of at most [`MAX_MANIFEST_BYTES`].
pub fn load_manifest(path: &Path) -> Result<Option<LoadedManifest>, ManifestError> {
    let bytes = match super::fsutil::read_bounded(path, MAX_MANIFEST_BYTES) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ManifestError::Unreadable {
                path: path.to_owned(),
                source,
            })
        }
    };
    let invalid = |reason: String| ManifestError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if manifest.format > MANIFEST_FORMAT {
        // A newer builder may mean something this code cannot check.
        return Err(invalid(format!(
            "format {} is newer than the {MANIFEST_FORMAT} this coworkvm understands",
            manifest.format
        )));
    }
    Ok(Some(LoadedManifest { manifest, bytes }))
}
