//! A bundle: the directory that holds one VM's images and identity.
//!
//! | file | what | written |
//! |---|---|---|
//! | `vmlinuz`, `initrd.img`, `manifest.json` | the images' kernel, initramfs and manifest | seeded from an images directory |
//! | `rootfs.img.zst` | a rootfs waiting to be applied | seeded; removed once expanded (a stranger's one at seeding) |
//! | `rootfs.img` | the guest's root disk (read-only to the guest) | by expansion only |
//! | `rootfs.img.manifest.json` | the manifest `rootfs.img` came from | with `rootfs.img` |
//! | `sessiondata.img` | the user's persistent disk | created once, never replaced |
//! | `macAddress`, `machineIdentifier` | the VM's identity | created once, never rewritten |
//! | `config.json` | `{"diskSizeGB": N}`, optional | by the desktop client |
//! | `.lock` | `flock`ed by seeding and preparing | |
//!
//! Every write is temp file + fsync + rename + fsync of the directory.

pub mod expand;
pub mod fsutil;
pub mod identity;
pub mod manifest_file;
pub mod session_disk;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use socket_proto::manifest::{FileEntry, Manifest, MANIFEST_FILE};

pub use expand::{Expanded, APPLIED_MANIFEST_FILE, ROOTFS_FILE, ROOTFS_ZST_FILE};
pub use identity::{BundleIdentity, MacAddress, MachineId};
pub use manifest_file::{load_manifest, LoadedManifest};
pub use session_disk::{SessionDisk, SESSION_DISK_FILE};

use expand::ExpandError;
use identity::IdentityError;
use manifest_file::ManifestError;
use session_disk::SessionDiskError;

pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRD_FILE: &str = "initrd.img";
pub const LOCK_FILE: &str = ".lock";
/// The files an images directory gives a bundle; `manifest.json` last, so
/// the bundle's manifest names a new version only once its files are in.
pub const SEEDED_FILES: [&str; 4] = [KERNEL_FILE, INITRD_FILE, ROOTFS_ZST_FILE, MANIFEST_FILE];

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot create the bundle directory {dir}: {source}")]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("the bundle directory {0} does not exist")]
    NoDir(PathBuf),
    #[error("cannot lock the bundle {dir}: {source}")]
    Lock { dir: PathBuf, source: io::Error },
    #[error("no images directory at {0} (it needs {MANIFEST_FILE})")]
    NoImages(PathBuf),
    #[error("cannot copy {file} from {from} into the bundle {dir}: {source}")]
    Seed {
        file: &'static str,
        from: PathBuf,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("the bundle {dir} has no {file}{hint}")]
    Missing {
        dir: PathBuf,
        file: &'static str,
        hint: &'static str,
    },
    #[error("cannot examine {file} in {dir}: {source}")]
    Stat {
        file: &'static str,
        dir: PathBuf,
        source: io::Error,
    },
    #[error(
        "{ROOTFS_ZST_FILE} in {dir} is {size} bytes, not the {listed} that {MANIFEST_FILE} \
         lists: not coworkvm's image; the next start with coworkvm's images removes it"
    )]
    Foreign {
        dir: PathBuf,
        size: u64,
        listed: u64,
    },
    #[error("cannot use {file} in {dir}: {source}")]
    Open {
        file: &'static str,
        dir: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Expand(#[from] ExpandError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    SessionDisk(#[from] SessionDiskError),
}

/// An exclusive `flock` on the bundle's `.lock`, held while seeding or
/// preparing; released when dropped (or when the process dies).
pub struct BundleLock {
    _file: File,
}

impl BundleLock {
    fn acquire(dir: &Path) -> Result<Self, BundleError> {
        let lock_err = |source| BundleError::Lock {
            dir: dir.to_owned(),
            source,
        };
        let path = dir.join(LOCK_FILE);
        // O_NOFOLLOW: a `.lock` planted as a link is refused, not followed
        // to a file elsewhere (opening a FIFO read-write never blocks).
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(file) => file,
            // flock needs no write access: a read-only bundle still locks
            // (and then fails on its first write with a clearer error). On
            // a read-only file system without a .lock nobody can write
            // anyway; the directory itself is locked then.
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => File::open(&path)
                .or_else(|_| File::open(dir))
                .map_err(lock_err)?,
            Err(e) => return Err(lock_err(e)),
        };
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is
            // passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(BundleLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(lock_err(err));
            }
        }
    }
}

/// What a VM is booted from, all inside the bundle.
#[derive(Debug, Clone)]
pub struct PreparedBundle {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Give it to the guest read-only.
    pub rootfs: PathBuf,
    /// Read-write; may hold no file system yet.
    pub session_disk: PathBuf,
    pub identity: BundleIdentity,
    /// The rootfs version now applied (`None` for a bundle whose
    /// `rootfs.img` predates the record).
    pub rootfs_version: Option<String>,
    /// Set when this prepare applied a pending rootfs.
    pub expanded: Option<Expanded>,
    /// Set when this prepare created the session disk.
    pub session_disk_created: bool,
}

/// The bundle's boot files, open: what the VMM gets instead of paths.
#[derive(Debug)]
pub struct OpenedImages {
    pub kernel: File,
    pub initrd: File,
    /// Read-only.
    pub rootfs: File,
    /// Read-write.
    pub session_disk: File,
}

impl PreparedBundle {
    /// Opens the boot files with [`fsutil::open_regular`]: a symbolic link
    /// or anything but a regular file in their place is refused, so the
    /// guest never gets a host file that a link points at.
    pub fn open_images(&self) -> Result<OpenedImages, BundleError> {
        let open = |file: &'static str, writable: bool| {
            fsutil::open_regular(&self.dir.join(file), writable).map_err(|source| {
                BundleError::Open {
                    file,
                    dir: self.dir.clone(),
                    source,
                }
            })
        };
        Ok(OpenedImages {
            kernel: open(KERNEL_FILE, false)?,
            initrd: open(INITRD_FILE, false)?,
            rootfs: open(ROOTFS_FILE, false)?,
            session_disk: open(SESSION_DISK_FILE, true)?,
        })
    }
}

/// What [`Bundle::seed_from`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeedOutcome {
    /// The images' rootfs version is already applied or pending.
    UpToDate { rootfs_version: String },
    /// The images were copied in; the next prepare applies them.
    Seeded {
        rootfs_version: String,
        previous: Option<String>,
    },
}

pub struct Bundle {
    dir: PathBuf,
}

impl Bundle {
    /// Opens the bundle at `dir`, creating the directory (mode 0700: it
    /// holds the user's data) when missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, BundleError> {
        let dir = dir.into();
        let create_err = |source| BundleError::CreateDir {
            dir: dir.clone(),
            source,
        };
        if !dir.is_dir() {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(create_err)?;
            }
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => return Err(create_err(e)),
            }
        }
        Ok(Bundle { dir })
    }

    /// The bundle at `dir` if it exists, without creating anything (for
    /// status).
    pub fn open_existing(dir: impl Into<PathBuf>) -> Result<Self, BundleError> {
        let dir = dir.into();
        if !dir.is_dir() {
            return Err(BundleError::NoDir(dir));
        }
        Ok(Bundle { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `$XDG_DATA_HOME/coworkvm/bundle`, else `~/.local/share/coworkvm/bundle`.
    pub fn default_dir() -> Option<PathBuf> {
        let data_home = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .map(|h| PathBuf::from(h).join(".local/share"))
            })?;
        Some(data_home.join("coworkvm/bundle"))
    }

    /// `$COWORKVM_IMAGES`, else `/usr/lib/coworkvm/images` when installed,
    /// else `build/images` (a source checkout).
    pub fn default_images_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("COWORKVM_IMAGES").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        let installed = Path::new("/usr/lib/coworkvm/images");
        if installed.is_dir() {
            return installed.to_owned();
        }
        PathBuf::from("build/images")
    }

    fn lock(&self) -> Result<BundleLock, BundleError> {
        BundleLock::acquire(&self.dir)
    }

    /// The rootfs version of the applied `rootfs.img`, from its record.
    pub fn applied_version(&self) -> Result<Option<String>, BundleError> {
        Ok(
            load_manifest(&self.dir.join(APPLIED_MANIFEST_FILE))?
                .map(|m| m.manifest.rootfs_version),
        )
    }

    /// The rootfs version waiting in `rootfs.img.zst`, if one is. A `.zst`
    /// whose size is not the one the manifest lists is not that version
    /// (a stranger's image, see `settle_pending`): an error says so. Only
    /// the size is compared here; prepare checks the hash.
    pub fn pending_version(&self) -> Result<Option<String>, BundleError> {
        let size = match std::fs::metadata(self.dir.join(ROOTFS_ZST_FILE)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(BundleError::Stat {
                    file: ROOTFS_ZST_FILE,
                    dir: self.dir.clone(),
                    source,
                })
            }
        };
        let Some(m) = load_manifest(&self.dir.join(MANIFEST_FILE))? else {
            return Ok(None);
        };
        match m.manifest.file(ROOTFS_ZST_FILE) {
            Some(e) if e.size != size => Err(BundleError::Foreign {
                dir: self.dir.clone(),
                size,
                listed: e.size,
            }),
            _ => Ok(Some(m.manifest.rootfs_version)),
        }
    }

    /// Copies an images directory (`coworkvm-rootfs build`'s output) into
    /// the bundle when the bundle has no rootfs yet or the images hold a
    /// different rootfs version than the one applied (or pending): how a
    /// package upgrade reaches the bundle. Each file is checked against the
    /// images' manifest as it is copied, and lands by temp + fsync +
    /// rename. The new rootfs is applied by the next [`Bundle::prepare`].
    pub fn seed_from(&self, images: &Path) -> Result<SeedOutcome, BundleError> {
        let images_manifest = load_manifest(&images.join(MANIFEST_FILE))?
            .ok_or_else(|| BundleError::NoImages(images.to_owned()))?
            .manifest;
        let target = images_manifest.rootfs_version.clone();
        let _lock = self.lock()?;
        let pending_is_target = self.settle_pending(&images_manifest)?;
        let applied = self.applied_version()?;
        if applied.as_deref() == Some(target.as_str()) && self.rootfs_fits(&images_manifest)? {
            return Ok(SeedOutcome::UpToDate {
                rootfs_version: target,
            });
        }
        if pending_is_target {
            return Ok(SeedOutcome::UpToDate {
                rootfs_version: target,
            });
        }
        for file in SEEDED_FILES {
            let from = images.join(file);
            let seed_err = |source| BundleError::Seed {
                file,
                from: from.clone(),
                dir: self.dir.clone(),
                source,
            };
            let expected = images_manifest.file(file).cloned();
            fsutil::copy_file_atomic(&from, &self.dir, file, |copied| {
                // The manifest does not list itself; the rest it does.
                match &expected {
                    Some(e) if e.size != copied.size || !e.sha256.eq_ignore_ascii_case(&copied.sha256) => {
                        Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "it is {} bytes with SHA-256 {}, but the images' {MANIFEST_FILE} gives {} bytes with {}",
                                copied.size, copied.sha256, e.size, e.sha256
                            ),
                        ))
                    }
                    _ => Ok(()),
                }
            })
            .map_err(seed_err)?;
        }
        tracing::info!(
            "seeded {} with rootfs {target} from {}",
            self.dir.display(),
            images.display()
        );
        Ok(SeedOutcome::Seeded {
            rootfs_version: target,
            previous: applied,
        })
    }

    /// Looks at a `rootfs.img.zst` waiting in the bundle before seeding:
    /// true when it is the images' own (the next prepare applies it). One
    /// that is neither the images' nor the one the bundle's manifest lists
    /// came from elsewhere: the desktop client downloads its vendor's
    /// rootfs for Apple's VM into the same bundle, and that image carries
    /// no coworkvm agent and cannot boot here. It is removed, as the client
    /// expects of a delivered image once the VM starts, and never expanded
    /// over coworkvm's rootfs. Called with the lock held.
    fn settle_pending(&self, images: &Manifest) -> Result<bool, BundleError> {
        let zst = self.dir.join(ROOTFS_ZST_FILE);
        let stat_err = |source| BundleError::Stat {
            file: ROOTFS_ZST_FILE,
            dir: self.dir.clone(),
            source,
        };
        let size = match std::fs::metadata(&zst) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(stat_err(e)),
        };
        // The bundle's manifest may be a stranger's too: unreadable is
        // "lists nothing", and seeding replaces it.
        let listed = load_manifest(&self.dir.join(MANIFEST_FILE))
            .ok()
            .flatten()
            .and_then(|m| m.manifest.file(ROOTFS_ZST_FILE).cloned());
        let wanted = images.file(ROOTFS_ZST_FILE);
        let candidates: Vec<_> = wanted.iter().copied().chain(listed.as_ref()).collect();
        if candidates.is_empty() {
            // Nothing to tell it by; prepare checks the expansion's hash.
            return Ok(false);
        }
        let hashed = if candidates.iter().any(|e| e.size == size) {
            Some(FileEntry::of_file(&zst).map_err(stat_err)?)
        } else {
            None
        };
        let is = |e: &&FileEntry| {
            hashed
                .as_ref()
                .is_some_and(|h| h.size == e.size && h.sha256.eq_ignore_ascii_case(&e.sha256))
        };
        if wanted.as_ref().is_some_and(is) {
            return Ok(true);
        }
        if listed.as_ref().is_some_and(|e| is(&e)) {
            // coworkvm's own, of another version: seeding overwrites it.
            return Ok(false);
        }
        let sha = hashed.map_or_else(|| "not hashed: no listed size matches".into(), |h| h.sha256);
        tracing::warn!(
            "{} holds a {ROOTFS_ZST_FILE} that is not coworkvm's ({size} bytes, SHA-256 {sha}); \
             removing it: coworkvm boots its own rootfs",
            self.dir.display()
        );
        std::fs::remove_file(&zst).map_err(stat_err)?;
        fsutil::fsync_dir(&self.dir).map_err(stat_err)?;
        Ok(false)
    }

    /// Whether `rootfs.img` is there with the size the images give it. A
    /// different size means something else (the desktop client expanding
    /// its vendor image, say) wrote over the rootfs coworkvm applied.
    fn rootfs_fits(&self, images: &Manifest) -> Result<bool, BundleError> {
        let path = self.dir.join(ROOTFS_FILE);
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(BundleError::Stat {
                    file: ROOTFS_FILE,
                    dir: self.dir.clone(),
                    source,
                })
            }
        };
        match images.file(ROOTFS_FILE) {
            Some(e) if e.size != size => {
                tracing::warn!(
                    "{} in {} is {size} bytes, not the {} of the applied rootfs; applying \
                     coworkvm's again",
                    ROOTFS_FILE,
                    self.dir.display(),
                    e.size
                );
                Ok(false)
            }
            _ => Ok(true),
        }
    }

    /// Makes the bundle ready to boot: applies a pending `rootfs.img.zst`,
    /// creates the identity and the session disk (`disk_size_gb`, else
    /// `config.json`, else 10 GiB) when missing, and returns the paths.
    pub fn prepare(&self, disk_size_gb: Option<u64>) -> Result<PreparedBundle, BundleError> {
        let lock = self.lock()?;
        // Under the lock no other writer of these names is running, so any
        // temporary one is a crash's leftover.
        for name in SEEDED_FILES.iter().chain([&APPLIED_MANIFEST_FILE]) {
            for stale in fsutil::stale_temp_files(&self.dir, name) {
                let _ = std::fs::remove_file(stale);
            }
        }
        let expanded = expand::expand_pending(&self.dir, &lock)?;
        for (file, hint) in [
            (
                ROOTFS_FILE,
                " (and no rootfs.img.zst to expand): seed it from an images directory",
            ),
            (KERNEL_FILE, ": seed it from an images directory"),
            (INITRD_FILE, ": seed it from an images directory"),
        ] {
            if !self.dir.join(file).is_file() {
                return Err(BundleError::Missing {
                    dir: self.dir.clone(),
                    file,
                    hint,
                });
            }
        }
        let identity = BundleIdentity::load_or_create(&self.dir)?;
        let session = SessionDisk::ensure(&self.dir, disk_size_gb)?;
        Ok(PreparedBundle {
            dir: self.dir.clone(),
            kernel: self.dir.join(KERNEL_FILE),
            initrd: self.dir.join(INITRD_FILE),
            rootfs: self.dir.join(ROOTFS_FILE),
            session_disk: session.path,
            identity,
            rootfs_version: self.applied_version()?,
            expanded,
            session_disk_created: session.created,
        })
    }

    /// What is in the bundle, changing nothing.
    pub fn status(&self) -> BundleStatus {
        let mut problems = Vec::new();
        let mut note = |r: Result<Option<String>, String>| match r {
            Ok(v) => v,
            Err(e) => {
                problems.push(e);
                None
            }
        };
        let mac = note(
            identity::read_mac(&self.dir)
                .map(|m| m.map(|m| m.to_string()))
                .map_err(|e| e.to_string()),
        );
        let machine_id = note(
            identity::read_machine_id(&self.dir)
                .map(|m| m.map(|m| m.to_string()))
                .map_err(|e| e.to_string()),
        );
        let applied_rootfs_version = note(self.applied_version().map_err(|e| e.to_string()));
        let pending_rootfs_version = note(self.pending_version().map_err(|e| e.to_string()));
        let kernel_version = note(
            load_manifest(&self.dir.join(MANIFEST_FILE))
                .map(|m| m.map(|m| m.manifest.kernel_version))
                .map_err(|e| e.to_string()),
        );
        let files = [
            KERNEL_FILE,
            INITRD_FILE,
            ROOTFS_FILE,
            ROOTFS_ZST_FILE,
            SESSION_DISK_FILE,
        ]
        .into_iter()
        .map(|name| {
            let meta = std::fs::metadata(self.dir.join(name)).ok();
            FileStatus {
                name,
                size: meta.as_ref().map(|m| m.size()),
                // st_blocks counts 512-byte units whatever the block size.
                allocated: meta.as_ref().map(|m| m.blocks() * 512),
            }
        })
        .collect();
        BundleStatus {
            dir: self.dir.clone(),
            mac,
            machine_id,
            applied_rootfs_version,
            pending_rootfs_version,
            kernel_version,
            files,
            problems,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FileStatus {
    pub name: &'static str,
    /// Apparent size; `None` when the file is absent.
    pub size: Option<u64>,
    /// Bytes allocated on disk (`st_blocks * 512`).
    pub allocated: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BundleStatus {
    pub dir: PathBuf,
    /// `None`: not created yet.
    pub mac: Option<String>,
    pub machine_id: Option<String>,
    pub applied_rootfs_version: Option<String>,
    pub pending_rootfs_version: Option<String>,
    pub kernel_version: Option<String>,
    pub files: Vec<FileStatus>,
    /// Files that are present but unreadable or malformed.
    pub problems: Vec<String>,
}
