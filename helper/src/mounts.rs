//! The mount policy: which host paths a session's `additionalMounts` and
//! `mountPath` requests may share into the guest, in which order, and what
//! must stay hidden inside them (issue 13).
//!
//! This is the host side's pure planning step: nothing here mounts
//! anything. [`crate::grants`] keeps which session holds which plan, the
//! share keeper ([`crate::share`]) binds each grant at
//! `shared/<root-relative path>` in the VM's staging tree (covering
//! [`PlannedMount::hidden`] and [`PlannedMount::absent_denied`] with empty
//! read-only mounts), and the guest agent binds it at
//! `/sessions/<name>/mnt/<mountName>`.
//!
//! # What the client sends
//!
//! `spawn.additionalMounts` is an object keyed by mount name:
//! `{"<mountName>": {"path": "<host path>", "mode": "ro" | "rw" | "rwd"}}`.
//!
//! - **Mount names** ([`validate_mount_name`]) are relative guest paths
//!   under `/sessions/<name>/mnt/`: no leading `/`, no empty, `.` or `..`
//!   component, no NUL, at most [`MAX_NAME_BYTES`] bytes and
//!   [`MAX_NAME_DEPTH`] components. Names nest (`.claude` and
//!   `.claude/skills`); the plan lists a parent before its children
//!   (component-wise order), which is the order the guest must bind them in.
//! - **`path`** is the host path relative to `/` (the absolute path without
//!   its leading slash); `""` means the home directory. Older clients sent it
//!   relative to `$HOME`. The rule ([`MountPolicy::resolve_host_path`]):
//!   `/<path>` when it resolves (exists, after following symlinks), else
//!   `$HOME/<path>` when that resolves, else the mount fails. So a current
//!   client's path always wins; an old client's home-relative `Documents`
//!   finds `$HOME/Documents` because `/Documents` does not exist. The one
//!   ambiguity, a home-relative path whose root-relative reading also exists
//!   (an old client's `tmp` meaning `$HOME/tmp`), resolves to the
//!   root-relative one, as current clients mean it. A `path` that starts
//!   with `/`, holds a `..` component or a NUL, or is longer than
//!   [`MAX_PATH_BYTES`], is malformed and fails.
//! - **`mode`**: `ro`, `rw` or `rwd` exactly ([`MountMode`]); anything else,
//!   or none, fails that mount. What `rwd` adds over `rw` is recorded here
//!   and enforced (or documented as not enforceable) by the staging step.
//! - A malformed entry or an unknown mode fails that mount by name into
//!   [`MountPlan::failed`], never the whole spawn. More than [`MAX_MOUNTS`]
//!   mounts fail them all (a bound, with one clear reason), as does an
//!   `additionalMounts` that is not an object (named as
//!   [`socket_proto::guest::failed_mount_names`] names them).
//!
//! `mountPath {processId, subpath, mountName, mode}` adds one mount to a
//! running session: [`MountPolicy::plan_mount_path`] applies the same rules,
//! with `subpath` read like `path` (the protocol notes only say "relative to
//! the shared root"; root-relative with the home fallback covers both
//! readings), plus a duplicate-name and a per-session count check.
//!
//! # The deny-list
//!
//! The client is the user's own app, so its grants are honoured wherever
//! they point, with one exception as defence in depth: credential stores no
//! Cowork task needs ([`BUILTIN_DENY`], relative to the home directory, plus
//! [`DenyConfig::extra`]; [`DenyConfig::allow`] takes entries back off the
//! list). Every comparison is made on canonical paths (symlinks resolved),
//! and the list is resolved afresh for each plan, so a store created after
//! the helper started is still covered.
//!
//! - A grant **equal to or inside** a denied path fails, with the reason
//!   logged: by path (`~/.ssh/id_ed25519`, or a symlink that resolves into
//!   `~/.ssh`), and by inode, so that a hard link to a denied file
//!   (`~/work/cfg.json` linked to `~/.docker/config.json`) or a bind mount of
//!   a denied directory elsewhere is refused too: the grant and each of its
//!   ancestors are compared by `(st_dev, st_ino)` with every denied path
//!   that exists.
//! - A grant that is a **parent** of denied paths (the home directory) is
//!   allowed; [`PlannedMount::hidden`] lists the denied paths inside it that
//!   exist, outermost only (a hidden `~/.config` already hides
//!   `~/.config/gcloud`), for the staging step to cover.
//!
//! Limits, closed by the share keeper ([`crate::share`]): the plan is a
//! snapshot, so the keeper re-checks what it binds (opens it with
//! `RESOLVE_NO_SYMLINKS`, `O_PATH | O_NOFOLLOW` and compares the inode with
//! [`PlannedMount::inode`]); a denied path that does not exist yet
//! ([`PlannedMount::absent_denied`]) would let a `rw` grant of a parent
//! create it (e.g. `~/.ssh/authorized_keys` through a `rw` home grant), so
//! for writable grants the keeper creates it empty on the host and covers
//! it. Still open: a hard link to a denied file *inside* a granted
//! directory is not found (that would need a walk of the whole tree).

use std::collections::HashSet;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;
use socket_proto::frame::json_kind;
use socket_proto::host::MountPathParams;

/// At most this many mounts per spawn, and per session with `mountPath`
/// (a typical session sends about eight).
pub const MAX_MOUNTS: usize = 64;
/// A mount name is at most this many bytes (`NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;
/// A mount name has at most this many components (`.claude/skills` has 2).
pub const MAX_NAME_DEPTH: usize = 8;
/// A host `path` or `subpath` is at most this many bytes (`PATH_MAX` less
/// the leading `/` and the NUL).
pub const MAX_PATH_BYTES: usize = 4094;
/// A `mountPath` `processId` is at most this many bytes.
pub const MAX_PROCESS_ID_BYTES: usize = 255;
/// At most this many characters of a client-controlled name in a log line.
const LOG_NAME_CHARS: usize = 80;

/// Credential stores that no Cowork task needs, relative to the home
/// directory: denied as grants, hidden inside grants of their parents.
pub const BUILTIN_DENY: &[&str] = &[
    ".ssh",
    ".gnupg",
    ".aws",
    ".kube",
    ".docker/config.json",
    ".config/gcloud",
    ".azure",
    ".password-store",
    ".mozilla",
    ".config/google-chrome",
    ".config/chromium",
    ".config/BraveSoftware",
    ".local/share/keyrings",
];

/// Why one mount cannot be made, or why a policy cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// `additionalMounts` is not an object keyed by mount name.
    #[error("additionalMounts must be an object keyed by mount name, not {0}")]
    NotAnObject(&'static str),
    /// More mounts than [`MAX_MOUNTS`].
    #[error("{count} mounts requested, at most {MAX_MOUNTS} are allowed")]
    TooManyMounts {
        /// How many the request (or the session with it) would have.
        count: usize,
    },
    /// The mount name is empty.
    #[error("mount name is empty")]
    NameEmpty,
    /// The mount name is longer than [`MAX_NAME_BYTES`].
    #[error("mount name is {0} bytes, at most {MAX_NAME_BYTES} are allowed")]
    NameTooLong(usize),
    /// The mount name has more than [`MAX_NAME_DEPTH`] components.
    #[error("mount name has {0} components, at most {MAX_NAME_DEPTH} are allowed")]
    NameTooDeep(usize),
    /// The mount name starts with `/`.
    #[error("mount name must be relative to the session's mnt directory")]
    NameAbsolute,
    /// The mount name has an empty, `.` or `..` component.
    #[error("mount name has an empty, '.' or '..' component")]
    NameComponent,
    /// The mount name holds a NUL byte.
    #[error("mount name holds a NUL byte")]
    NameNul,
    /// A mount of this name exists already in the session.
    #[error("a mount of this name exists already")]
    NameTaken,
    /// The entry is not an object `{path, mode}`.
    #[error("mount entry must be an object {{path, mode}}, not {0}")]
    EntryNotObject(&'static str),
    /// The entry's `path` is missing or not a string.
    #[error("mount entry has no string 'path'")]
    PathMissing,
    /// `path` starts with `/`.
    #[error("path must be relative to / (no leading '/')")]
    PathAbsolute,
    /// `path` has a `..` component.
    #[error("path has a '..' component")]
    PathParent,
    /// `path` holds a NUL byte.
    #[error("path holds a NUL byte")]
    PathNul,
    /// `path` is longer than [`MAX_PATH_BYTES`].
    #[error("path is {0} bytes, at most {MAX_PATH_BYTES} are allowed")]
    PathTooLong(usize),
    /// Neither `/<path>` nor `$HOME/<path>` resolves.
    #[error("{}: {source}", .path.display())]
    NotFound {
        /// The root-relative reading of the path.
        path: PathBuf,
        /// Why it did not resolve.
        source: std::io::Error,
    },
    /// The grant is neither a directory nor a regular file.
    #[error("{} is neither a directory nor a regular file", .0.display())]
    NotShareable(PathBuf),
    /// The entry's `mode` is not a string (a missing one is `ro`).
    #[error("mount entry's 'mode' is not a string")]
    ModeMissing,
    /// The entry's `mode` is not `ro`, `rw` or `rwd`.
    #[error("unknown mode {0:?} (ro, rw or rwd)")]
    ModeUnknown(String),
    /// The grant is, or is inside, a denied credential store.
    #[error("{} is denied: it is or is inside {}, a credential store", .grant.display(), .denied.display())]
    Denied {
        /// The grant, canonical.
        grant: PathBuf,
        /// The deny-list entry, canonical where it exists.
        denied: PathBuf,
    },
    /// `mountPath`'s `processId` is empty or too long.
    #[error("processId must be 1 to {MAX_PROCESS_ID_BYTES} bytes, not {0}")]
    ProcessId(usize),
    /// The home directory given to the policy is not absolute.
    #[error("home directory {} is not absolute", .0.display())]
    HomeNotAbsolute(PathBuf),
    /// A deny-list configuration path is empty or has a `..` component.
    #[error("deny-list entry {} must be non-empty and without '..'", .0.display())]
    BadDenyEntry(PathBuf),
    /// A path to allow back is not on the deny-list.
    #[error("{} is not on the deny-list, so it cannot be allowed back", .0.display())]
    AllowNotDenied(PathBuf),
}

/// A grant's access mode, as the client names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MountMode {
    /// `ro`: read-only, at the host level.
    ReadOnly,
    /// `rw`: read-write.
    ReadWrite,
    /// `rwd`: read-write, and the client also lets the session delete.
    ReadWriteDelete,
}

impl MountMode {
    /// The mode for the client's name of it: `ro`, `rw` or `rwd`, exactly.
    pub fn parse(s: &str) -> Result<Self, MountError> {
        match s {
            "ro" => Ok(Self::ReadOnly),
            "rw" => Ok(Self::ReadWrite),
            "rwd" => Ok(Self::ReadWriteDelete),
            other => Err(MountError::ModeUnknown(bounded(other))),
        }
    }

    /// The client's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadOnly => "ro",
            Self::ReadWrite => "rw",
            Self::ReadWriteDelete => "rwd",
        }
    }

    /// Whether the guest may write through the grant.
    pub fn is_writable(self) -> bool {
        self != Self::ReadOnly
    }
}

impl fmt::Display for MountMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One mount to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMount {
    /// The mount name: the guest sees it at
    /// `/sessions/<session>/mnt/<name>`.
    pub name: String,
    /// The host path, canonical (absolute, symlinks resolved).
    pub host_path: PathBuf,
    /// The access mode.
    pub mode: MountMode,
    /// Denied paths inside `host_path` that exist, canonical, outermost
    /// only: the staging step covers each with an empty read-only mount.
    pub hidden: Vec<PathBuf>,
    /// Denied paths inside `host_path` that do not exist yet, lexical under
    /// the canonical home, outermost only. A writable grant would let the
    /// guest create them, so the share keeper creates each (empty) on the
    /// host and covers it, as it covers [`PlannedMount::hidden`].
    pub absent_denied: Vec<AbsentDenied>,
    /// `(st_dev, st_ino)` of `host_path` when it was planned: the share
    /// keeper binds only what still has this inode.
    pub inode: (u64, u64),
}

/// A denied path that does not exist yet (see
/// [`PlannedMount::absent_denied`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsentDenied {
    /// The path, absolute.
    pub path: PathBuf,
    /// Whether the store is a file ([`deny_entry_is_file`]), so that its
    /// last component is created as an empty file rather than a directory.
    pub file: bool,
}

/// Whether a deny-list entry names a file rather than a directory: its last
/// component has an extension (`.docker/config.json`). Leading-dot names
/// such as `.ssh` have none, so every other built-in entry is a directory.
pub fn deny_entry_is_file(entry: &Path) -> bool {
    entry.extension().is_some()
}

impl PlannedMount {
    /// Where the grant goes under the share's `shared/` directory: the
    /// host path without its leading `/` (the official stack's layout).
    pub fn staging_relative(&self) -> &Path {
        self.host_path
            .strip_prefix("/")
            .unwrap_or(self.host_path.as_path())
    }
}

/// A mount that cannot be made, and why.
#[derive(Debug)]
pub struct FailedMount {
    /// The mount name, as the client sent it.
    pub name: String,
    /// Why.
    pub reason: MountError,
}

/// What a spawn's `additionalMounts` comes to.
#[derive(Debug, Default)]
pub struct MountPlan {
    /// The mounts to make, a parent before its children.
    pub mounts: Vec<PlannedMount>,
    /// The mounts that cannot be made, each with its reason.
    pub failed: Vec<FailedMount>,
}

impl MountPlan {
    /// The spawn result's `failedMounts`: the failed mount names, the shape
    /// the Go peer returns and the client reads.
    pub fn failed_names(&self) -> Vec<String> {
        self.failed.iter().map(|f| f.name.clone()).collect()
    }
}

/// Changes to the built-in deny-list, from the helper's configuration.
#[derive(Debug, Clone, Default)]
pub struct DenyConfig {
    /// More paths to deny: absolute, or relative to the home directory.
    pub extra: Vec<PathBuf>,
    /// Paths to take off the list (built-in or extra), written the same
    /// way and matched exactly, not by prefix: allowing `.config/gcloud`
    /// lets that one store be granted; allowing `.config` allows nothing and
    /// is refused ([`MountError::AllowNotDenied`]), so a typo cannot pass
    /// unnoticed.
    pub allow: Vec<PathBuf>,
}

/// A denied path as resolved for one plan.
#[derive(Debug)]
struct ResolvedDeny {
    /// Canonical where the path exists, else lexical under the canonical
    /// home.
    path: PathBuf,
    /// `(st_dev, st_ino)` where it exists.
    inode: Option<(u64, u64)>,
    /// Whether the entry names a file ([`deny_entry_is_file`]).
    file: bool,
}

/// Decides which grants a session gets.
#[derive(Debug, Clone)]
pub struct MountPolicy {
    /// `/` in production; a fake root in tests.
    root: PathBuf,
    /// The user's home directory (absolute).
    home: PathBuf,
    /// The deny-list: absolute, or relative to `home`, `..`-free.
    deny: Vec<PathBuf>,
}

impl MountPolicy {
    /// A policy for the user whose home is `home`: the built-in deny-list
    /// changed by `config`.
    pub fn new(home: PathBuf, config: &DenyConfig) -> Result<Self, MountError> {
        if !home.is_absolute() {
            return Err(MountError::HomeNotAbsolute(home));
        }
        let mut deny: Vec<PathBuf> = BUILTIN_DENY.iter().map(PathBuf::from).collect();
        for extra in &config.extra {
            check_deny_entry(extra)?;
            if !deny.contains(extra) {
                deny.push(extra.clone());
            }
        }
        for allow in &config.allow {
            check_deny_entry(allow)?;
            let abs = absolute_under(&home, allow);
            let before = deny.len();
            deny.retain(|d| absolute_under(&home, d) != abs);
            if deny.len() == before {
                return Err(MountError::AllowNotDenied(allow.clone()));
            }
        }
        Ok(Self {
            root: PathBuf::from("/"),
            home,
            deny,
        })
    }

    /// The deny-list entries in force: absolute, or relative to the home.
    pub fn deny_list(&self) -> &[PathBuf] {
        &self.deny
    }

    /// Plans a spawn's `additionalMounts`. Never fails as a whole: every
    /// problem fails the mounts it concerns, each logged with its reason.
    pub fn plan_additional_mounts(&self, additional_mounts: &Value) -> MountPlan {
        let map = match additional_mounts {
            Value::Object(map) => map,
            Value::Null => return MountPlan::default(),
            other => {
                let kind = json_kind(other);
                let plan = MountPlan {
                    mounts: Vec::new(),
                    failed: socket_proto::guest::failed_mount_names(other)
                        .into_iter()
                        .map(|name| FailedMount {
                            name,
                            reason: MountError::NotAnObject(kind),
                        })
                        .collect(),
                };
                tracing::warn!(
                    "additionalMounts: {}; {} mounts failed",
                    MountError::NotAnObject(kind),
                    plan.failed.len()
                );
                return plan;
            }
        };
        self.plan_entries(map.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// Plans `(name, entry)` pairs in any order.
    fn plan_entries<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a str, &'a Value)>,
    ) -> MountPlan {
        let entries: Vec<(&str, &Value)> = entries.into_iter().collect();
        let mut plan = MountPlan::default();
        if entries.len() > MAX_MOUNTS {
            let count = entries.len();
            tracing::warn!(
                "additionalMounts: {}; all failed",
                MountError::TooManyMounts { count }
            );
            plan.failed = entries
                .into_iter()
                .map(|(name, _)| FailedMount {
                    name: name.to_owned(),
                    reason: MountError::TooManyMounts { count },
                })
                .collect();
            return plan;
        }
        let denied = self.resolve_deny();
        let mut seen = HashSet::new();
        for (name, entry) in entries {
            let planned = if seen.insert(name) {
                self.plan_entry(name, entry, &denied)
            } else {
                Err(MountError::NameTaken)
            };
            match planned {
                Ok(m) => plan.mounts.push(m),
                Err(reason) => {
                    tracing::warn!("mount {}: {reason}", log_name(name));
                    plan.failed.push(FailedMount {
                        name: name.to_owned(),
                        reason,
                    });
                }
            }
        }
        plan.mounts
            .sort_by(|a, b| Path::new(&a.name).cmp(Path::new(&b.name)));
        for m in &plan.mounts {
            for h in &m.hidden {
                tracing::info!(
                    "mount {}: hiding {} inside {}",
                    log_name(&m.name),
                    h.display(),
                    m.host_path.display()
                );
            }
        }
        plan
    }

    fn plan_entry(
        &self,
        name: &str,
        entry: &Value,
        denied: &[ResolvedDeny],
    ) -> Result<PlannedMount, MountError> {
        validate_mount_name(name)?;
        let Value::Object(fields) = entry else {
            return Err(MountError::EntryNotObject(json_kind(entry)));
        };
        let Some(Value::String(path)) = fields.get("path") else {
            return Err(MountError::PathMissing);
        };
        // No mode (missing or null): read-only. The peers make it
        // read-write; a folder the client did not say may be written is not.
        let mode = match fields.get("mode") {
            None | Some(Value::Null) => MountMode::ReadOnly,
            Some(Value::String(mode)) => MountMode::parse(mode)?,
            Some(_) => return Err(MountError::ModeMissing),
        };
        self.plan_grant(name, path, mode, denied)
    }

    /// Validates a `mountPath` request for a running session whose mounts
    /// are `mounted`, and plans its one mount. An error is the reason the
    /// request fails (logged here).
    pub fn plan_mount_path(
        &self,
        params: &MountPathParams,
        mounted: &[PlannedMount],
    ) -> Result<PlannedMount, MountError> {
        let r = self.check_mount_path(params, mounted);
        if let Err(e) = &r {
            tracing::warn!(
                "mountPath {} for {}: {e}",
                log_name(&params.mount_name),
                log_name(&params.process_id)
            );
        }
        r
    }

    fn check_mount_path(
        &self,
        params: &MountPathParams,
        mounted: &[PlannedMount],
    ) -> Result<PlannedMount, MountError> {
        let id_len = params.process_id.len();
        if id_len == 0 || id_len > MAX_PROCESS_ID_BYTES {
            return Err(MountError::ProcessId(id_len));
        }
        validate_mount_name(&params.mount_name)?;
        if mounted.iter().any(|m| m.name == params.mount_name) {
            return Err(MountError::NameTaken);
        }
        if mounted.len() >= MAX_MOUNTS {
            return Err(MountError::TooManyMounts {
                count: mounted.len() + 1,
            });
        }
        let mode = MountMode::parse(&params.mode)?;
        let denied = self.resolve_deny();
        self.plan_grant(&params.mount_name, &params.subpath, mode, &denied)
    }

    fn plan_grant(
        &self,
        name: &str,
        path: &str,
        mode: MountMode,
        denied: &[ResolvedDeny],
    ) -> Result<PlannedMount, MountError> {
        let host_path = self.resolve_host_path(path)?;
        let meta = std::fs::metadata(&host_path).map_err(|source| MountError::NotFound {
            path: host_path.clone(),
            source,
        })?;
        if !meta.is_dir() && !meta.is_file() {
            return Err(MountError::NotShareable(host_path));
        }
        check_not_denied(&host_path, denied)?;
        let mut hidden: Vec<PathBuf> = denied
            .iter()
            .filter(|d| d.inode.is_some() && d.path.starts_with(&host_path))
            .map(|d| d.path.clone())
            .collect();
        // Outermost only: the cover over a parent already hides its
        // children, and a mount inside an empty cover has no mountpoint.
        hidden.sort();
        hidden.dedup();
        let mut outermost: Vec<PathBuf> = Vec::with_capacity(hidden.len());
        for h in hidden {
            if !outermost.iter().any(|o| h.starts_with(o)) {
                outermost.push(h);
            }
        }
        let mut absent: Vec<&ResolvedDeny> = denied
            .iter()
            .filter(|d| d.inode.is_none() && d.path.starts_with(&host_path) && d.path != host_path)
            .collect();
        absent.sort_by(|a, b| a.path.cmp(&b.path));
        let mut absent_denied: Vec<AbsentDenied> = Vec::with_capacity(absent.len());
        for d in absent {
            if !absent_denied.iter().any(|o| d.path.starts_with(&o.path))
                && !outermost.iter().any(|o| d.path.starts_with(o))
            {
                absent_denied.push(AbsentDenied {
                    path: d.path.clone(),
                    file: d.file,
                });
            }
        }
        Ok(PlannedMount {
            name: name.to_owned(),
            host_path,
            mode,
            hidden: outermost,
            absent_denied,
            inode: (meta.dev(), meta.ino()),
        })
    }

    /// The canonical host path for a client's `path`: `/<path>` when it
    /// resolves, else `$HOME/<path>` (older clients), else an error naming
    /// the root-relative reading. `""` is the home directory.
    pub fn resolve_host_path(&self, path: &str) -> Result<PathBuf, MountError> {
        validate_host_path(path)?;
        if path.is_empty() {
            return std::fs::canonicalize(&self.home).map_err(|source| MountError::NotFound {
                path: self.home.clone(),
                source,
            });
        }
        let from_root = self.root.join(path);
        match std::fs::canonicalize(&from_root) {
            Ok(p) => Ok(p),
            Err(root_err) => {
                std::fs::canonicalize(self.home.join(path)).map_err(|_| MountError::NotFound {
                    path: from_root,
                    source: root_err,
                })
            }
        }
    }

    /// The deny-list resolved now: canonical paths (and inodes) where they
    /// exist, lexical under the canonical home otherwise.
    fn resolve_deny(&self) -> Vec<ResolvedDeny> {
        let home = std::fs::canonicalize(&self.home).unwrap_or_else(|_| self.home.clone());
        self.deny
            .iter()
            .map(|d| {
                let lexical = absolute_under(&home, d);
                match std::fs::canonicalize(&lexical) {
                    Ok(path) => {
                        let inode = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
                        ResolvedDeny {
                            path,
                            inode,
                            file: deny_entry_is_file(d),
                        }
                    }
                    Err(_) => ResolvedDeny {
                        path: lexical,
                        inode: None,
                        file: deny_entry_is_file(d),
                    },
                }
            })
            .collect()
    }

    /// The policy with `root` in place of `/`: tests build a fake
    /// filesystem under a temporary directory.
    #[cfg(test)]
    fn with_root(mut self, root: PathBuf) -> Self {
        self.root = root;
        self
    }
}

/// Refuses a grant that is, or is inside, a denied path: by canonical path,
/// and by inode for the grant and each of its ancestors (a hard link to a
/// denied file, a bind mount of a denied directory).
fn check_not_denied(grant: &Path, denied: &[ResolvedDeny]) -> Result<(), MountError> {
    let refuse = |d: &ResolvedDeny| MountError::Denied {
        grant: grant.to_path_buf(),
        denied: d.path.clone(),
    };
    if let Some(d) = denied.iter().find(|d| grant.starts_with(&d.path)) {
        return Err(refuse(d));
    }
    let inodes: Vec<(u64, u64, &ResolvedDeny)> = denied
        .iter()
        .filter_map(|d| d.inode.map(|(dev, ino)| (dev, ino, d)))
        .collect();
    if inodes.is_empty() {
        return Ok(());
    }
    // `grant` is canonical and bounded by PATH_MAX, so this walk is too.
    for ancestor in grant.ancestors() {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        if let Some((_, _, d)) = inodes
            .iter()
            .find(|(dev, ino, _)| *dev == meta.dev() && *ino == meta.ino())
        {
            return Err(refuse(d));
        }
    }
    Ok(())
}

/// Checks a mount name: a relative path of at most [`MAX_NAME_DEPTH`]
/// normal components and [`MAX_NAME_BYTES`] bytes, without NUL.
pub fn validate_mount_name(name: &str) -> Result<(), MountError> {
    if name.is_empty() {
        return Err(MountError::NameEmpty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(MountError::NameTooLong(name.len()));
    }
    if name.contains('\0') {
        return Err(MountError::NameNul);
    }
    if name.starts_with('/') {
        return Err(MountError::NameAbsolute);
    }
    // Split by hand: `Path::components` would quietly drop the empty and
    // `.` components that this refuses.
    let mut depth = 0;
    for part in name.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(MountError::NameComponent);
        }
        depth += 1;
    }
    if depth > MAX_NAME_DEPTH {
        return Err(MountError::NameTooDeep(depth));
    }
    Ok(())
}

/// Checks a client's host `path` before it touches the filesystem.
fn validate_host_path(path: &str) -> Result<(), MountError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(MountError::PathTooLong(path.len()));
    }
    if path.contains('\0') {
        return Err(MountError::PathNul);
    }
    if path.starts_with('/') {
        return Err(MountError::PathAbsolute);
    }
    if Path::new(path)
        .components()
        .any(|c| c == Component::ParentDir)
    {
        return Err(MountError::PathParent);
    }
    Ok(())
}

fn check_deny_entry(p: &Path) -> Result<(), MountError> {
    if p.as_os_str().is_empty() || p.components().any(|c| c == Component::ParentDir) {
        return Err(MountError::BadDenyEntry(p.to_path_buf()));
    }
    Ok(())
}

/// `p` if absolute, else `home/p`.
fn absolute_under(home: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        home.join(p)
    }
}

/// A client-controlled string cut to [`LOG_NAME_CHARS`] characters.
fn bounded(s: &str) -> String {
    match s.char_indices().nth(LOG_NAME_CHARS) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// A client-controlled name for a log line: bounded, control characters
/// escaped, so one line stays one line.
fn log_name(s: &str) -> String {
    format!("{:?}", bounded(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// A fake filesystem: `root/` stands for `/`, the home is
    /// `root/home/u`.
    struct Fake {
        root: PathBuf,
        home: PathBuf,
    }

    impl Fake {
        fn new() -> Self {
            let root = fs::canonicalize(coworkvm_tests::temp_dir("mounts")).unwrap();
            let home = root.join("home/u");
            fs::create_dir_all(&home).unwrap();
            Self { root, home }
        }

        fn policy(&self, config: &DenyConfig) -> MountPolicy {
            MountPolicy::new(self.home.clone(), config)
                .unwrap()
                .with_root(self.root.clone())
        }

        fn default_policy(&self) -> MountPolicy {
            self.policy(&DenyConfig::default())
        }

        /// The root-relative `path` for a path under the fake root.
        fn rel(&self, p: &Path) -> String {
            p.strip_prefix(&self.root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        }

        fn mkdir(&self, under_home: &str) -> PathBuf {
            let p = self.home.join(under_home);
            fs::create_dir_all(&p).unwrap();
            p
        }

        fn touch(&self, under_home: &str) -> PathBuf {
            let p = self.home.join(under_home);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"secret").unwrap();
            p
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn one(policy: &MountPolicy, name: &str, path: &str, mode: &str) -> MountPlan {
        policy.plan_additional_mounts(&json!({ name: {"path": path, "mode": mode} }))
    }

    fn only_failure(plan: &MountPlan) -> &MountError {
        assert!(plan.mounts.is_empty(), "{:?}", plan.mounts);
        assert_eq!(plan.failed.len(), 1, "{:?}", plan.failed);
        &plan.failed[0].reason
    }

    #[test]
    fn root_relative_path_is_resolved_from_root() {
        let f = Fake::new();
        let docs = f.mkdir("Documents");
        let plan = one(&f.default_policy(), "docs", &f.rel(&docs), "rw");
        assert!(plan.failed.is_empty(), "{:?}", plan.failed);
        assert_eq!(plan.mounts.len(), 1);
        let m = &plan.mounts[0];
        assert_eq!(m.name, "docs");
        assert_eq!(m.host_path, docs);
        assert_eq!(m.mode, MountMode::ReadWrite);
        assert!(m.hidden.is_empty(), "{:?}", m.hidden);
        assert_eq!(m.staging_relative(), docs.strip_prefix("/").unwrap());
    }

    #[test]
    fn home_relative_path_from_older_clients_falls_back_to_home() {
        let f = Fake::new();
        let docs = f.mkdir("Documents");
        // `Documents` does not exist under the root: an older client's
        // home-relative path.
        let plan = one(&f.default_policy(), "docs", "Documents", "ro");
        assert_eq!(plan.mounts.len(), 1, "{:?}", plan.failed);
        assert_eq!(plan.mounts[0].host_path, docs);
        assert_eq!(plan.mounts[0].mode, MountMode::ReadOnly);
    }

    #[test]
    fn root_relative_reading_wins_when_both_exist() {
        let f = Fake::new();
        let root_tmp = f.root.join("tmp");
        fs::create_dir_all(&root_tmp).unwrap();
        f.mkdir("tmp");
        let plan = one(&f.default_policy(), "t", "tmp", "rw");
        assert_eq!(plan.mounts[0].host_path, root_tmp);
    }

    #[test]
    fn empty_path_is_the_home_directory() {
        let f = Fake::new();
        let plan = one(&f.default_policy(), "home", "", "ro");
        assert_eq!(plan.mounts.len(), 1, "{:?}", plan.failed);
        assert_eq!(plan.mounts[0].host_path, f.home);
    }

    #[test]
    fn nonexistent_path_fails_that_mount_only() {
        let f = Fake::new();
        let out = f.mkdir("outputs");
        let plan = f.default_policy().plan_additional_mounts(&json!({
            "outputs": {"path": f.rel(&out), "mode": "rw"},
            "gone": {"path": "home/u/not-there", "mode": "rw"},
        }));
        assert_eq!(plan.mounts.len(), 1);
        assert_eq!(plan.mounts[0].name, "outputs");
        assert_eq!(plan.failed_names(), ["gone"]);
        let MountError::NotFound { path, .. } = &plan.failed[0].reason else {
            panic!("{:?}", plan.failed[0].reason);
        };
        assert_eq!(path, &f.root.join("home/u/not-there"));
    }

    #[test]
    fn parents_are_planned_before_children_whatever_the_input_order() {
        let f = Fake::new();
        let claude = f.mkdir(".claude");
        let skills = f.mkdir(".claude/skills");
        let deep = f.mkdir(".claude/skills/x");
        let (c, s, d) = (
            json!({"path": f.rel(&claude), "mode": "rw"}),
            json!({"path": f.rel(&skills), "mode": "ro"}),
            json!({"path": f.rel(&deep), "mode": "ro"}),
        );
        // `.claude-extra` sorts between `.claude` and `.claude/skills` as a
        // string; component order keeps each parent first regardless.
        let extra = json!({"path": f.rel(&claude), "mode": "ro"});
        let plan = f.default_policy().plan_entries([
            (".claude/skills/x", &d),
            (".claude/skills", &s),
            (".claude-extra", &extra),
            (".claude", &c),
        ]);
        assert!(plan.failed.is_empty(), "{:?}", plan.failed);
        let names: Vec<&str> = plan.mounts.iter().map(|m| m.name.as_str()).collect();
        for (child, parent) in [
            (".claude/skills", ".claude"),
            (".claude/skills/x", ".claude/skills"),
        ] {
            let ci = names.iter().position(|n| *n == child).unwrap();
            let pi = names.iter().position(|n| *n == parent).unwrap();
            assert!(pi < ci, "{parent} after {child}: {names:?}");
        }
    }

    #[test]
    fn duplicate_names_in_one_request_fail_the_second() {
        let f = Fake::new();
        let a = f.mkdir("a");
        let e = json!({"path": f.rel(&a), "mode": "rw"});
        let plan = f.default_policy().plan_entries([("a", &e), ("a", &e)]);
        assert_eq!(plan.mounts.len(), 1);
        assert!(matches!(plan.failed[0].reason, MountError::NameTaken));
    }

    #[test]
    fn every_builtin_deny_entry_refuses_its_grant() {
        let f = Fake::new();
        let policy = f.default_policy();
        for entry in BUILTIN_DENY {
            let p = if entry.ends_with(".json") {
                f.touch(entry)
            } else {
                f.mkdir(entry)
            };
            let plan = one(&policy, "x", &f.rel(&p), "ro");
            match only_failure(&plan) {
                MountError::Denied { grant, denied } => {
                    assert_eq!(grant, &p, "{entry}");
                    assert_eq!(denied, &p, "{entry}");
                }
                other => panic!("{entry}: {other:?}"),
            }
        }
    }

    #[test]
    fn grant_inside_a_denied_directory_is_refused() {
        let f = Fake::new();
        let key = f.touch(".ssh/id_ed25519");
        let plan = one(&f.default_policy(), "key", &f.rel(&key), "ro");
        assert!(
            matches!(only_failure(&plan), MountError::Denied { denied, .. } if *denied == f.home.join(".ssh"))
        );
        // The home-relative form of an older client is refused the same way.
        let plan = one(&f.default_policy(), "key", ".ssh/id_ed25519", "ro");
        assert!(matches!(only_failure(&plan), MountError::Denied { .. }));
    }

    #[test]
    fn symlink_into_a_denied_directory_is_refused() {
        let f = Fake::new();
        let keys = f.mkdir(".ssh/keys");
        let link = f.home.join("work-keys");
        symlink(&keys, &link).unwrap();
        let plan = one(&f.default_policy(), "k", &f.rel(&link), "ro");
        assert!(
            matches!(only_failure(&plan), MountError::Denied { grant, .. } if *grant == keys),
            "{:?}",
            plan.failed
        );
        // A relative symlink to the store itself, and one in a parent
        // component of the path.
        symlink(".ssh", f.home.join("dotssh")).unwrap();
        let plan = one(&f.default_policy(), "k", "home/u/dotssh/keys", "ro");
        assert!(matches!(only_failure(&plan), MountError::Denied { .. }));
    }

    #[test]
    fn denied_store_that_is_itself_a_symlink_is_denied_at_its_target() {
        let f = Fake::new();
        // ~/.aws -> /secure/aws: the real location is what is denied.
        let target = f.root.join("secure/aws");
        fs::create_dir_all(&target).unwrap();
        symlink(&target, f.home.join(".aws")).unwrap();
        let plan = one(&f.default_policy(), "aws", "secure/aws", "ro");
        assert!(
            matches!(only_failure(&plan), MountError::Denied { denied, .. } if *denied == target)
        );
    }

    #[test]
    fn hard_link_to_a_denied_file_is_refused_by_inode() {
        let f = Fake::new();
        let cfg = f.touch(".docker/config.json");
        f.mkdir("work");
        let linked = f.home.join("work/cfg.json");
        fs::hard_link(&cfg, &linked).unwrap();
        let plan = one(&f.default_policy(), "cfg", &f.rel(&linked), "ro");
        assert!(
            matches!(only_failure(&plan), MountError::Denied { grant, denied } if *grant == linked && *denied == cfg),
            "{:?}",
            plan.failed
        );
        // A different file of the same content is fine.
        let other = f.home.join("work/other.json");
        fs::write(&other, b"secret").unwrap();
        let plan = one(&f.default_policy(), "cfg", &f.rel(&other), "ro");
        assert!(plan.failed.is_empty(), "{:?}", plan.failed);
    }

    #[test]
    fn parent_grant_lists_existing_denied_subtrees_to_hide() {
        let f = Fake::new();
        let ssh = f.mkdir(".ssh");
        let gcloud = f.mkdir(".config/gcloud");
        let docker = f.touch(".docker/config.json");
        f.mkdir(".config/other");
        // `.aws`, `.kube` and the rest do not exist: nothing to hide.
        let plan = one(&f.default_policy(), "home", "", "rw");
        assert_eq!(plan.mounts.len(), 1, "{:?}", plan.failed);
        let mut want = vec![ssh, gcloud.clone(), docker];
        want.sort();
        assert_eq!(plan.mounts[0].hidden, want);
        // A narrower parent hides only what is inside it.
        let plan = one(&f.default_policy(), "cfg", "home/u/.config", "ro");
        assert_eq!(plan.mounts[0].hidden, [gcloud]);
    }

    #[test]
    fn plans_carry_the_inode_and_the_absent_denied_paths_to_cover() {
        let f = Fake::new();
        let ssh = f.mkdir(".ssh");
        f.mkdir(".docker");
        f.mkdir(".config/gcloud");
        let plan = one(&f.default_policy(), "home", "", "rw");
        let m = &plan.mounts[0];
        let meta = fs::metadata(&f.home).unwrap();
        assert_eq!(m.inode, (meta.dev(), meta.ino()));
        let absent: Vec<(String, bool)> = m
            .absent_denied
            .iter()
            .map(|a| (f.rel(&a.path), a.file))
            .collect();
        // Missing stores only; nothing that exists (.ssh, .config/gcloud)
        // and nothing inside a hidden one; `.docker/config.json` is a file.
        assert!(
            absent.contains(&("home/u/.aws".into(), false)),
            "{absent:?}"
        );
        assert!(
            absent.contains(&("home/u/.docker/config.json".into(), true)),
            "{absent:?}"
        );
        assert!(
            absent.contains(&("home/u/.config/chromium".into(), false)),
            "{absent:?}"
        );
        assert!(!absent
            .iter()
            .any(|(p, _)| p.contains(".ssh") || p.contains("gcloud")));
        assert!(m.hidden.contains(&ssh));
        // A grant with no stores inside has none to cover.
        let work = f.mkdir("work");
        let plan = one(&f.default_policy(), "w", &f.rel(&work), "rw");
        assert!(plan.mounts[0].absent_denied.is_empty());
        assert!(deny_entry_is_file(Path::new(".docker/config.json")));
        assert!(!deny_entry_is_file(Path::new(".ssh")));
        assert!(!deny_entry_is_file(Path::new(".local/share/keyrings")));
    }

    #[test]
    fn hidden_lists_outermost_denied_paths_only() {
        let f = Fake::new();
        let config = f.mkdir(".config");
        f.mkdir(".config/gcloud");
        f.mkdir(".config/chromium");
        let policy = f.policy(&DenyConfig {
            extra: vec![PathBuf::from(".config")],
            allow: vec![],
        });
        let plan = one(&policy, "home", "", "ro");
        assert_eq!(plan.mounts[0].hidden, [config]);
    }

    #[test]
    fn extra_deny_entries_apply_absolute_and_home_relative() {
        let f = Fake::new();
        let tax = f.mkdir("tax");
        let vault = f.root.join("srv/vault");
        fs::create_dir_all(&vault).unwrap();
        let policy = f.policy(&DenyConfig {
            extra: vec![PathBuf::from("tax"), vault.clone()],
            allow: vec![],
        });
        let plan = one(&policy, "t", "home/u/tax", "ro");
        assert!(matches!(only_failure(&plan), MountError::Denied { denied, .. } if *denied == tax));
        let plan = one(&policy, "v", "srv/vault", "ro");
        assert!(matches!(only_failure(&plan), MountError::Denied { .. }));
        // Without the extra entries both are granted.
        assert!(one(&f.default_policy(), "t", "home/u/tax", "ro")
            .failed
            .is_empty());
        assert!(one(&f.default_policy(), "v", "srv/vault", "ro")
            .failed
            .is_empty());
    }

    #[test]
    fn allowed_back_entry_is_granted_and_not_hidden() {
        let f = Fake::new();
        let gcloud = f.mkdir(".config/gcloud");
        let ssh = f.mkdir(".ssh");
        let policy = f.policy(&DenyConfig {
            extra: vec![],
            allow: vec![PathBuf::from(".config/gcloud")],
        });
        assert!(!policy
            .deny_list()
            .contains(&PathBuf::from(".config/gcloud")));
        let plan = one(&policy, "g", &f.rel(&gcloud), "ro");
        assert!(plan.failed.is_empty(), "{:?}", plan.failed);
        let plan = one(&policy, "home", "", "ro");
        assert_eq!(plan.mounts[0].hidden, std::slice::from_ref(&ssh));
        // Written absolutely, it matches the same entry.
        let policy = f.policy(&DenyConfig {
            extra: vec![],
            allow: vec![f.home.join(".ssh")],
        });
        assert!(one(&policy, "s", &f.rel(&ssh), "ro").failed.is_empty());
    }

    #[test]
    fn bad_deny_configuration_is_refused() {
        let f = Fake::new();
        let new = |extra: &str, allow: &str| {
            let c = DenyConfig {
                extra: [extra]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect(),
                allow: [allow]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect(),
            };
            MountPolicy::new(f.home.clone(), &c)
        };
        assert!(matches!(
            new("", ".config"),
            Err(MountError::AllowNotDenied(_))
        ));
        assert!(matches!(new("../x", ""), Err(MountError::BadDenyEntry(_))));
        assert!(matches!(
            new("", ".ssh/../.aws"),
            Err(MountError::BadDenyEntry(_))
        ));
        assert!(new("", ".ssh").is_ok());
        assert!(matches!(
            MountPolicy::new(PathBuf::from("home/u"), &DenyConfig::default()),
            Err(MountError::HomeNotAbsolute(_))
        ));
    }

    #[test]
    fn malformed_entries_fail_by_name_and_the_rest_are_planned() {
        let f = Fake::new();
        let out = f.mkdir("outputs");
        let plan = f.default_policy().plan_additional_mounts(&json!({
            "outputs": {"path": f.rel(&out), "mode": "rw"},
            "a-string": "home/u/outputs",
            "no-path": {"mode": "rw"},
            "number-path": {"path": 7, "mode": "rw"},
            "no-mode": {"path": f.rel(&out)},
            "null-mode": {"path": f.rel(&out), "mode": null},
            "number-mode": {"path": f.rel(&out), "mode": 1},
            "bad-mode": {"path": f.rel(&out), "mode": "RW"},
            "exec-mode": {"path": f.rel(&out), "mode": "rwx"},
            "abs-path": {"path": out.to_str().unwrap(), "mode": "rw"},
            "dotdot-path": {"path": "home/u/outputs/../../u/outputs", "mode": "rw"},
            "nul-path": {"path": "home/u/out\u{0}puts", "mode": "rw"},
            "long-path": {"path": "a/".repeat(MAX_PATH_BYTES), "mode": "rw"},
        }));
        // A missing or null mode is read-only (not a failure).
        let names: Vec<(&str, MountMode)> = plan
            .mounts
            .iter()
            .map(|m| (m.name.as_str(), m.mode))
            .collect();
        assert_eq!(
            names,
            [
                ("no-mode", MountMode::ReadOnly),
                ("null-mode", MountMode::ReadOnly),
                ("outputs", MountMode::ReadWrite),
            ]
        );
        let reason = |n: &str| &plan.failed.iter().find(|m| m.name == n).unwrap().reason;
        assert!(matches!(
            reason("a-string"),
            MountError::EntryNotObject("a string")
        ));
        assert!(matches!(reason("no-path"), MountError::PathMissing));
        assert!(matches!(reason("number-path"), MountError::PathMissing));
        assert!(matches!(reason("number-mode"), MountError::ModeMissing));
        assert!(matches!(reason("bad-mode"), MountError::ModeUnknown(m) if m == "RW"));
        assert!(matches!(reason("exec-mode"), MountError::ModeUnknown(_)));
        assert!(matches!(reason("abs-path"), MountError::PathAbsolute));
        assert!(matches!(reason("dotdot-path"), MountError::PathParent));
        assert!(matches!(reason("nul-path"), MountError::PathNul));
        assert!(matches!(reason("long-path"), MountError::PathTooLong(_)));
        assert_eq!(plan.failed.len(), 10);
    }

    #[test]
    fn additional_mounts_that_is_not_an_object_fails_every_named_mount() {
        let f = Fake::new();
        let policy = f.default_policy();
        let plan = policy.plan_additional_mounts(&json!([{"mountName": "a"}, {"name": "b"}, 3]));
        assert!(plan.mounts.is_empty());
        assert_eq!(plan.failed_names(), ["a", "b", "2"]);
        assert!(matches!(
            plan.failed[0].reason,
            MountError::NotAnObject("an array")
        ));
        for nothing in [json!(null), json!("x"), json!(5)] {
            let plan = policy.plan_additional_mounts(&nothing);
            assert!(
                plan.mounts.is_empty() && plan.failed.is_empty(),
                "{nothing}"
            );
        }
        assert!(policy.plan_additional_mounts(&json!({})).failed.is_empty());
    }

    #[test]
    fn devices_and_sockets_are_not_shareable() {
        let f = Fake::new();
        let sock = f.home.join("agent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let plan = one(&f.default_policy(), "s", &f.rel(&sock), "rw");
        assert!(matches!(only_failure(&plan), MountError::NotShareable(p) if *p == sock));
        // A regular file is.
        let file = f.touch("notes.txt");
        assert!(one(&f.default_policy(), "n", &f.rel(&file), "rw")
            .failed
            .is_empty());
    }

    #[test]
    fn mount_count_is_bounded() {
        let f = Fake::new();
        let dir = f.mkdir("d");
        let entry = json!({"path": f.rel(&dir), "mode": "ro"});
        let names: Vec<String> = (0..=MAX_MOUNTS).map(|i| format!("m{i}")).collect();
        let over = f
            .default_policy()
            .plan_entries(names.iter().map(|n| (n.as_str(), &entry)));
        assert!(over.mounts.is_empty());
        assert_eq!(over.failed.len(), MAX_MOUNTS + 1);
        assert!(over.failed.iter().all(
            |m| matches!(m.reason, MountError::TooManyMounts { count } if count == MAX_MOUNTS + 1)
        ));
        let at = f
            .default_policy()
            .plan_entries(names[..MAX_MOUNTS].iter().map(|n| (n.as_str(), &entry)));
        assert_eq!(at.mounts.len(), MAX_MOUNTS);
        assert!(at.failed.is_empty());
    }

    #[test]
    fn mount_names_are_validated() {
        let ok = [
            "outputs",
            ".claude",
            ".claude/skills",
            "a/b/c/d/e/f/g/h",
            "é-folder",
        ];
        for n in ok {
            assert!(validate_mount_name(n).is_ok(), "{n}");
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        type IsExpected = fn(&MountError) -> bool;
        let bad: [(&str, IsExpected); 12] = [
            ("", |e| matches!(e, MountError::NameEmpty)),
            ("..", |e| matches!(e, MountError::NameComponent)),
            ("../x", |e| matches!(e, MountError::NameComponent)),
            ("a/../../x", |e| matches!(e, MountError::NameComponent)),
            ("a/..", |e| matches!(e, MountError::NameComponent)),
            (".", |e| matches!(e, MountError::NameComponent)),
            ("a/./b", |e| matches!(e, MountError::NameComponent)),
            ("a//b", |e| matches!(e, MountError::NameComponent)),
            ("a/", |e| matches!(e, MountError::NameComponent)),
            ("/etc", |e| matches!(e, MountError::NameAbsolute)),
            ("a\0b", |e| matches!(e, MountError::NameNul)),
            ("a/b/c/d/e/f/g/h/i", |e| {
                matches!(e, MountError::NameTooDeep(9))
            }),
        ];
        for (n, want) in bad {
            let e = validate_mount_name(n).unwrap_err();
            assert!(want(&e), "{n:?}: {e:?}");
        }
        assert!(matches!(
            validate_mount_name(&long),
            Err(MountError::NameTooLong(n)) if n == MAX_NAME_BYTES + 1
        ));
        assert!(validate_mount_name(&long[1..]).is_ok());
    }

    #[test]
    fn bad_names_in_additional_mounts_fail_by_name() {
        let f = Fake::new();
        let dir = f.mkdir("d");
        let e = json!({"path": f.rel(&dir), "mode": "ro"});
        let long = "n".repeat(MAX_NAME_BYTES + 1);
        let plan = f.default_policy().plan_entries([
            ("../escape", &e),
            ("/abs", &e),
            (long.as_str(), &e),
            ("fine", &e),
        ]);
        assert_eq!(plan.mounts.len(), 1);
        assert_eq!(plan.mounts[0].name, "fine");
        assert_eq!(plan.failed_names(), ["../escape", "/abs", long.as_str()]);
    }

    fn mount_path(subpath: &str, mount_name: &str, mode: &str) -> MountPathParams {
        MountPathParams {
            process_id: "p1".into(),
            subpath: subpath.into(),
            mount_name: mount_name.into(),
            mode: mode.into(),
        }
    }

    #[test]
    fn mount_path_is_validated_like_additional_mounts() {
        let f = Fake::new();
        let picked = f.mkdir("picked");
        f.mkdir(".ssh");
        let policy = f.default_policy();
        let m = policy
            .plan_mount_path(&mount_path(&f.rel(&picked), "picked", "rwd"), &[])
            .unwrap();
        assert_eq!(m.host_path, picked);
        assert_eq!(m.mode, MountMode::ReadWriteDelete);
        // Home-relative, as older clients send it.
        let m = policy
            .plan_mount_path(&mount_path("picked", "p2", "ro"), &[])
            .unwrap();
        assert_eq!(m.host_path, picked);
        let err = |p: MountPathParams, mounted: &[PlannedMount]| {
            policy.plan_mount_path(&p, mounted).unwrap_err()
        };
        assert!(matches!(
            err(mount_path("picked", "../x", "ro"), &[]),
            MountError::NameComponent
        ));
        assert!(matches!(
            err(mount_path("picked", "x", "rx"), &[]),
            MountError::ModeUnknown(_)
        ));
        assert!(matches!(
            err(mount_path("home/u/../u", "x", "ro"), &[]),
            MountError::PathParent
        ));
        assert!(matches!(
            err(mount_path("/home/u", "x", "ro"), &[]),
            MountError::PathAbsolute
        ));
        assert!(matches!(
            err(mount_path("home/u/.ssh", "x", "ro"), &[]),
            MountError::Denied { .. }
        ));
        assert!(matches!(
            err(mount_path("nowhere", "x", "ro"), &[]),
            MountError::NotFound { .. }
        ));
        let mut no_id = mount_path("picked", "x", "ro");
        no_id.process_id.clear();
        assert!(matches!(err(no_id, &[]), MountError::ProcessId(0)));
        let mut long_id = mount_path("picked", "x", "ro");
        long_id.process_id = "p".repeat(MAX_PROCESS_ID_BYTES + 1);
        assert!(matches!(err(long_id, &[]), MountError::ProcessId(_)));
        // Against the session's existing mounts: a taken name, a full session.
        let existing = policy
            .plan_mount_path(&mount_path("picked", "picked", "ro"), &[])
            .unwrap();
        assert!(matches!(
            err(
                mount_path("picked", "picked", "ro"),
                std::slice::from_ref(&existing)
            ),
            MountError::NameTaken
        ));
        let full: Vec<PlannedMount> = (0..MAX_MOUNTS)
            .map(|i| PlannedMount {
                name: format!("m{i}"),
                ..existing.clone()
            })
            .collect();
        assert!(matches!(
            err(mount_path("picked", "new", "ro"), &full),
            MountError::TooManyMounts { count } if count == MAX_MOUNTS + 1
        ));
        assert!(policy
            .plan_mount_path(&mount_path("picked", "new", "ro"), &full[1..])
            .is_ok());
    }

    #[test]
    fn modes_round_trip_and_only_ro_is_read_only() {
        for (s, m) in [
            ("ro", MountMode::ReadOnly),
            ("rw", MountMode::ReadWrite),
            ("rwd", MountMode::ReadWriteDelete),
        ] {
            assert_eq!(MountMode::parse(s).unwrap(), m);
            assert_eq!(m.as_str(), s);
            assert_eq!(m.is_writable(), s != "ro");
        }
        for bad in ["", "RO", "r", "rwx", " ro", "ro "] {
            assert!(MountMode::parse(bad).is_err(), "{bad:?}");
        }
        // A client-controlled mode is bounded in the error (and the log).
        let MountError::ModeUnknown(m) = MountMode::parse(&"z".repeat(10_000)).unwrap_err() else {
            panic!()
        };
        assert!(m.len() < 100, "{}", m.len());
    }

    #[test]
    fn log_names_stay_on_one_line_and_bounded() {
        let n = log_name(&format!("a\nb{}", "c".repeat(1000)));
        assert!(!n.contains('\n'));
        assert!(n.len() < 100);
        assert_eq!(
            bounded("é".repeat(LOG_NAME_CHARS).as_str()),
            "é".repeat(LOG_NAME_CHARS)
        );
    }
}
