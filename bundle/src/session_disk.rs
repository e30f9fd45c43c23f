//! `sessiondata.img`: the user's persistent disk. Created once, sparse, and
//! never replaced, truncated or grown afterwards: it holds the user's data.
//! The host never formats it; the guest agent puts a file system on it when
//! it finds none.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::fsutil;

pub const SESSION_DISK_FILE: &str = "sessiondata.img";
pub const CONFIG_FILE: &str = "config.json";
/// Size of a new session disk when neither the caller nor `config.json`
/// says.
pub const DEFAULT_DISK_SIZE_GB: u64 = 10;
/// Sanity bound on a requested size (64 TiB): a typo should not make a
/// sparse file that the guest's mkfs then takes ages over.
pub const MAX_DISK_SIZE_GB: u64 = 64 * 1024;
const GIB: u64 = 1 << 30;
/// The largest `config.json` read (it holds one number).
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SessionDiskError {
    #[error("{CONFIG_FILE} in {dir} cannot be read: {source}")]
    ConfigUnreadable { dir: PathBuf, source: io::Error },
    #[error("{CONFIG_FILE} in {dir} is not valid: {reason}")]
    ConfigInvalid { dir: PathBuf, reason: String },
    #[error("a session disk of {0} GB is not possible (1 to {MAX_DISK_SIZE_GB} GB)")]
    BadSize(u64),
    #[error("{SESSION_DISK_FILE} in {dir} is not a regular file (a symbolic link is refused)")]
    NotAFile { dir: PathBuf },
    #[error("cannot create {SESSION_DISK_FILE} in {dir}: {source}")]
    Create { dir: PathBuf, source: io::Error },
    #[error("cannot examine {SESSION_DISK_FILE} in {dir}: {source}")]
    Stat { dir: PathBuf, source: io::Error },
}

/// `config.json`: settings the desktop client's `createVM` left behind.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleConfig {
    #[serde(rename = "diskSizeGB")]
    pub disk_size_gb: Option<u64>,
}

impl BundleConfig {
    /// The bundle's `config.json`, or defaults when it has none.
    pub fn load(dir: &Path) -> Result<Self, SessionDiskError> {
        let text = match fsutil::read_bounded(&dir.join(CONFIG_FILE), MAX_CONFIG_BYTES) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(SessionDiskError::ConfigUnreadable {
                    dir: dir.to_owned(),
                    source,
                })
            }
        };
        serde_json::from_slice(&text).map_err(|e| SessionDiskError::ConfigInvalid {
            dir: dir.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// The session disk as it is on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDisk {
    pub path: PathBuf,
    /// Apparent size in bytes (what the guest sees).
    pub size_bytes: u64,
    /// Whether this call created it.
    pub created: bool,
}

impl SessionDisk {
    /// Returns the bundle's session disk, creating it when missing with
    /// `requested_gb`, else `config.json`'s `diskSizeGB`, else
    /// [`DEFAULT_DISK_SIZE_GB`] GiB. An existing disk is kept as it is,
    /// whatever size is asked.
    pub fn ensure(dir: &Path, requested_gb: Option<u64>) -> Result<Self, SessionDiskError> {
        let path = dir.join(SESSION_DISK_FILE);
        if let Some(existing) = Self::existing(dir)? {
            if let Some(gb) = requested_gb {
                if gb.checked_mul(GIB) != Some(existing.size_bytes) {
                    tracing::info!(
                        "{} is {} bytes; keeping it as it is although {gb} GB was asked \
                         (an existing session disk is never resized)",
                        path.display(),
                        existing.size_bytes
                    );
                }
            }
            return Ok(existing);
        }
        let gb = match requested_gb {
            Some(gb) => gb,
            None => BundleConfig::load(dir)?
                .disk_size_gb
                .unwrap_or(DEFAULT_DISK_SIZE_GB),
        };
        if gb == 0 || gb > MAX_DISK_SIZE_GB {
            return Err(SessionDiskError::BadSize(gb));
        }
        let size_bytes = gb * GIB;
        let create_err = |source| SessionDiskError::Create {
            dir: dir.to_owned(),
            source,
        };
        let temp =
            fsutil::TempFileGuard::new(dir.join(fsutil::unique_temp_name(SESSION_DISK_FILE)));
        {
            // 0600: the user's data, for the user only.
            let f = fsutil::create_exclusive(temp.path(), 0o600).map_err(create_err)?;
            // set_len makes a hole: no blocks are allocated until the guest
            // writes.
            f.set_len(size_bytes).map_err(create_err)?;
            f.sync_all().map_err(create_err)?;
        }
        match fsutil::rename_noreplace(temp.path(), &path) {
            Ok(()) => {
                temp.keep();
                fsutil::fsync_dir(dir).map_err(create_err)?;
                tracing::info!("created {} ({gb} GiB, sparse)", path.display());
                Ok(SessionDisk {
                    path,
                    size_bytes,
                    created: true,
                })
            }
            // Someone created it meanwhile: theirs is the disk.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                drop(temp);
                Self::existing(dir)?.ok_or_else(|| create_err(e))
            }
            Err(e) => Err(create_err(e)),
        }
    }

    /// The bundle's session disk, `None` when there is none yet. A
    /// symbolic link is refused, not followed: the guest gets the disk
    /// read-write, and a link would give it any host file of the user's.
    pub fn existing(dir: &Path) -> Result<Option<Self>, SessionDiskError> {
        let path = dir.join(SESSION_DISK_FILE);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(SessionDisk {
                size_bytes: meta.size(),
                path,
                created: false,
            })),
            Ok(_) => Err(SessionDiskError::NotAFile {
                dir: dir.to_owned(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SessionDiskError::Stat {
                dir: dir.to_owned(),
                source,
            }),
        }
    }
}
