//! Sessions on the session disk: `/sessions/<name>`, one unprivileged user
//! per session, and the janitor's requests (`getSessionsDiskInfo`,
//! `deleteSessionDirs`, `pruneSessionCaches`).
//!
//! Layout of the session disk (the root is a parameter, `/sessions` in the
//! guest, a temporary directory in tests):
//!
//! - `<name>/`: the session's home, mode 0700, owned by its user;
//! - `.coworkvm/` (0711, root): the agent's own state, never bound into a
//!   sandbox except the SDK directory, read-only;
//! - `.coworkvm/users.json` (0600): `{"version": 1, "users": {name: uid}}`,
//!   written to a temporary file, fsynced and renamed, so a resumed session
//!   keeps its uid across reboots;
//! - `.coworkvm/sdk/`: installed SDK versions (see `crate::sdk`).
//!
//! The rootfs's `/etc` is a tmpfs overlay, so the passwd and group entries
//! of the users in use are added again each boot, when a session first
//! spawns (`cowork<uid>`). No sandbox sees these files: each gets its own
//! passwd and group naming only its user (`crate::sandbox::passwd`).

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use socket_proto::host::{
    DeleteSessionDirsResult, PruneSessionCachesParams, PruneSessionCachesResult, SessionsDiskInfo,
};

/// The first session uid (and gid).
pub const FIRST_UID: u32 = 1001;
/// The last one: below the 60000+ that Debian reserves, far below nobody.
pub const LAST_UID: u32 = 59999;
/// The agent's state directory on the session disk.
pub const STATE_DIR: &str = ".coworkvm";
/// The longest session name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// What `pruneSessionCaches` empties in each session: the XDG cache.
pub const CACHE_DIR: &str = ".cache";
/// What `includeSessionTmp` adds: the session's own `tmp` directory.
pub const SESSION_TMP_DIR: &str = "tmp";

/// A session name becomes `/sessions/<name>`: one plain path component.
/// Names starting with a dot are the agent's (`.coworkvm`); `lost+found`
/// is the filesystem's.
pub fn validate_name(name: &str) -> Result<(), SessionError> {
    let bad = |why: &'static str| {
        Err(SessionError::BadName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 128 bytes");
    }
    if name.contains('/') {
        return bad("contains '/'");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("contains a control character");
    }
    if name.starts_with('.') {
        return bad("starts with '.'");
    }
    if name == "lost+found" {
        return bad("reserved");
    }
    Ok(())
}

/// The user name of a session uid in passwd and group.
pub fn user_name(uid: u32) -> String {
    format!("cowork{uid}")
}

/// A prepared session: its directory and its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDir {
    pub name: String,
    pub path: PathBuf,
    pub uid: u32,
}

pub struct Sessions {
    root: PathBuf,
    etc: PathBuf,
    users: Mutex<BTreeMap<String, u32>>,
    /// Uids whose passwd/group entries this boot has checked.
    accounts: Mutex<HashSet<u32>>,
}

/// Why a session or the session disk could not be used. The text is the
/// answer the helper gets.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A name that cannot be `/sessions/<name>` ([`validate_name`]).
    #[error("bad session name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] crate::IoError),
    /// `statvfs` failed.
    #[error("statvfs {}: {source}", path.display())]
    Statvfs {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `fchown` of a directory just made failed.
    #[error("chown {}: {source}", path.display())]
    Chown {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Something that must be a real directory is not (or is a link).
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    /// A file to write atomically has no directory to hold its temporary.
    #[error("{}: no parent directory", path.display())]
    NoParent { path: PathBuf },
    /// A directory on the way to a cwd is a link or not a directory.
    #[error("{}: not a directory (links are not followed)", path.display())]
    LinkOnTheWay { path: PathBuf },
    /// A path with a NUL byte cannot reach the kernel.
    #[error("{} contains a NUL byte", path.display())]
    NulInPath { path: PathBuf },
    /// `users.json` cannot be read as the uid map.
    #[error("{}: {why}", path.display())]
    BadUserMap { path: PathBuf, why: String },
    /// Every session uid is taken.
    #[error("no session uid left")]
    NoUidLeft,
    /// The cwd a spawn asks for escapes the session directory.
    #[error("cwd {cwd:?} is outside the session directory {}", session.display())]
    CwdOutside { cwd: String, session: PathBuf },
    /// The cwd exists but is not a directory.
    #[error("cwd {0:?} is not a directory")]
    CwdNotADirectory(String),
    /// The cwd has a NUL byte.
    #[error("cwd contains a NUL byte")]
    CwdNul,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SessionError + '_ {
    move |e| SessionError::Io(crate::io_at(path.display())(e))
}

/// Writes `data` to `path` through a temporary file in the same directory:
/// write, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), SessionError> {
    let dir = path.parent().ok_or_else(|| SessionError::NoParent {
        path: path.to_owned(),
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    fsync_dir(dir)
}

pub fn fsync_dir(dir: &Path) -> Result<(), SessionError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

impl Sessions {
    /// Opens the session disk at `root` (creating the state directory);
    /// `etc` is where passwd and group live.
    pub fn open(root: &Path, etc: &Path) -> Result<Self, SessionError> {
        let root = root.canonicalize().map_err(io(root))?;
        let state = root.join(STATE_DIR);
        match fs::symlink_metadata(&state) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(SessionError::NotADirectory { path: state }),
            Err(_) => fs::DirBuilder::new()
                .mode(0o711)
                .create(&state)
                .map_err(io(&state))?,
        }
        // Session users must be able to reach the SDK below it (read-only).
        fs::set_permissions(&state, fs::Permissions::from_mode(0o711)).map_err(io(&state))?;
        let s = Sessions {
            root,
            etc: etc.to_owned(),
            users: Mutex::new(BTreeMap::new()),
            accounts: Mutex::new(HashSet::new()),
        };
        let users = match s.load_users() {
            Ok(u) => u,
            Err(e) => {
                // Rebuild from the owners of the session directories, so no
                // uid is handed out twice.
                eprintln!(
                    "coworkvm-agent: {e}; rebuilding the uid map from the session directories"
                );
                let mut u = BTreeMap::new();
                for name in s.list() {
                    if let Ok(md) = fs::symlink_metadata(s.root.join(&name)) {
                        if (FIRST_UID..=LAST_UID).contains(&md.uid()) {
                            u.insert(name, md.uid());
                        }
                    }
                }
                s.save_users(&u)?;
                u
            }
        };
        *s.users.lock().unwrap() = users;
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join(STATE_DIR)
    }

    fn users_file(&self) -> PathBuf {
        self.state_dir().join("users.json")
    }

    fn load_users(&self) -> Result<BTreeMap<String, u32>, SessionError> {
        let path = self.users_file();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        let bad = |why: String| SessionError::BadUserMap {
            path: path.clone(),
            why,
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let users = v
            .get("users")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no \"users\" object".into()))?;
        let mut out = BTreeMap::new();
        for (name, uid) in users {
            let uid = uid
                .as_u64()
                .filter(|u| (FIRST_UID as u64..=LAST_UID as u64).contains(u))
                .ok_or_else(|| bad(format!("bad uid for {name:?}")))?;
            out.insert(name.clone(), uid as u32);
        }
        Ok(out)
    }

    fn save_users(&self, users: &BTreeMap<String, u32>) -> Result<(), SessionError> {
        // A map of strings to numbers always serializes.
        let text =
            serde_json::to_vec_pretty(&json!({"version": 1, "users": users})).unwrap_or_default();
        write_atomic(&self.users_file(), &text, 0o600)
    }

    /// The session's uid: the one it had, or the next free one, persisted
    /// before it is used.
    pub fn uid_for(&self, name: &str) -> Result<u32, SessionError> {
        validate_name(name)?;
        let mut users = self.users.lock().unwrap();
        if let Some(uid) = users.get(name) {
            return Ok(*uid);
        }
        let used: HashSet<u32> = users.values().copied().collect();
        let next = users.values().max().map_or(FIRST_UID, |m| m + 1);
        let uid = if next <= LAST_UID {
            next
        } else {
            (FIRST_UID..=LAST_UID)
                .find(|u| !used.contains(u))
                .ok_or(SessionError::NoUidLeft)?
        };
        let mut updated = users.clone();
        updated.insert(name.to_owned(), uid);
        self.save_users(&updated)?;
        *users = updated;
        Ok(uid)
    }

    /// Adds `cowork<uid>` to passwd and group unless the uid is there.
    pub fn ensure_account(&self, uid: u32, name: &str) -> Result<(), SessionError> {
        if self.accounts.lock().unwrap().contains(&uid) {
            return Ok(());
        }
        let user = user_name(uid);
        // passwd's fields are ':'-separated lines: a name that would break
        // them gets no home field of its own (HOME is set by the agent).
        let home = if name.contains(':') {
            "/nonexistent".to_owned()
        } else {
            self.root.join(name).to_string_lossy().into_owned()
        };
        let has_id = |file: &str, line_id_field: usize| -> Result<bool, SessionError> {
            let path = self.etc.join(file);
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(io(&path)(e)),
            };
            Ok(text
                .lines()
                .any(|l| l.split(':').nth(line_id_field) == Some(uid.to_string().as_str())))
        };
        let append = |file: &str, line: String| -> Result<(), SessionError> {
            let path = self.etc.join(file);
            let mut f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .map_err(io(&path))?;
            f.write_all(line.as_bytes()).map_err(io(&path))
        };
        if !has_id("group", 2)? {
            append("group", format!("{user}:x:{uid}:\n"))?;
        }
        if !has_id("passwd", 2)? {
            append(
                "passwd",
                format!("{user}:x:{uid}:{uid}:coworkvm session:{home}:/bin/bash\n"),
            )?;
        }
        self.accounts.lock().unwrap().insert(uid);
        Ok(())
    }

    /// `/sessions/<name>`, created 0700 and owned by the session's user.
    pub fn prepare(&self, name: &str) -> Result<SessionDir, SessionError> {
        validate_name(name)?;
        let uid = self.uid_for(name)?;
        let path = self.root.join(name);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(io(&path))?;
                std::os::unix::fs::lchown(&path, Some(uid), Some(uid)).map_err(io(&path))?;
            }
            Err(e) => return Err(io(&path)(e)),
            Ok(md) if !md.is_dir() => return Err(SessionError::NotADirectory { path }),
            Ok(md) => {
                if md.uid() != uid || md.gid() != uid {
                    eprintln!(
                        "coworkvm-agent: {} belonged to {}:{}; giving it to its session user {uid}",
                        path.display(),
                        md.uid(),
                        md.gid()
                    );
                    std::os::unix::fs::lchown(&path, Some(uid), Some(uid)).map_err(io(&path))?;
                }
                if md.mode() & 0o7777 != 0o700 {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                        .map_err(io(&path))?;
                }
            }
        }
        self.ensure_account(uid, name)?;
        Ok(SessionDir {
            name: name.to_owned(),
            path,
            uid,
        })
    }

    /// The working directory for a spawn: the session directory by
    /// default; an absolute path (or one relative to the session) that
    /// must resolve inside it. A directory that does not exist yet is
    /// created as the session's user, without following any link.
    pub fn resolve_cwd(&self, s: &SessionDir, cwd: Option<&str>) -> Result<PathBuf, SessionError> {
        let Some(cwd) = cwd.filter(|c| !c.is_empty()) else {
            return Ok(s.path.clone());
        };
        let outside = || {
            Err(SessionError::CwdOutside {
                cwd: cwd.to_owned(),
                session: s.path.clone(),
            })
        };
        if cwd.contains('\0') {
            return Err(SessionError::CwdNul);
        }
        let p = s.path.join(cwd);
        if p.exists() {
            let real = p.canonicalize().map_err(io(&p))?;
            if !real.starts_with(&s.path) {
                return outside();
            }
            if !real.is_dir() {
                return Err(SessionError::CwdNotADirectory(cwd.to_owned()));
            }
            return Ok(real);
        }
        // Not there yet: it must lie beneath the session lexically, and is
        // then made one component at a time beneath an open directory.
        let Ok(rel) = p.strip_prefix(&s.path) else {
            return outside();
        };
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return outside();
        }
        mkdir_beneath(&s.path, rel, s.uid)?;
        Ok(s.path.join(rel))
    }

    /// Session names present on the disk, sorted.
    pub fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| validate_name(n).is_ok())
            .filter(|n| fs::symlink_metadata(self.root.join(n)).is_ok_and(|m| m.is_dir()))
            .collect();
        v.sort();
        v
    }

    /// `getSessionsDiskInfo`: the disk's size and free space (statvfs) and
    /// `{name, sizeBytes}` per session (space used on disk).
    pub fn disk_info(&self) -> Result<SessionsDiskInfo, SessionError> {
        let (total, free) = statvfs(&self.root)?;
        let sessions = self
            .list()
            .into_iter()
            .map(|n| {
                let size = disk_usage(&self.root.join(&n));
                json!({"name": n, "sizeBytes": size})
            })
            .collect();
        Ok(SessionsDiskInfo {
            total_bytes: total,
            free_bytes: free,
            sessions,
        })
    }

    /// `deleteSessionDirs`: never a session with a running process; a
    /// session that is not there counts as deleted. Links are removed, not
    /// followed.
    pub fn delete(&self, names: &[String], running: &HashSet<String>) -> DeleteSessionDirsResult {
        let mut r = DeleteSessionDirsResult::default();
        for name in names {
            if let Err(e) = validate_name(name) {
                r.errors.insert(name.clone(), e.to_string());
                continue;
            }
            if running.contains(name) {
                r.errors
                    .insert(name.clone(), "the session has a running process".into());
                continue;
            }
            let path = self.root.join(name);
            let res = match fs::symlink_metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
                // std's remove_dir_all works beneath open directories and
                // never follows a link (it removes the link itself).
                Ok(md) if md.is_dir() => fs::remove_dir_all(&path),
                Ok(_) => fs::remove_file(&path),
            };
            match res {
                Ok(()) => r.deleted.push(name.clone()),
                Err(e) => {
                    r.errors.insert(name.clone(), e.to_string());
                }
            }
        }
        let _ = fsync_dir(&self.root);
        r
    }

    /// `pruneSessionCaches`: empties each idle session's `.cache` and, with
    /// `includeSessionTmp`, the entries of its `tmp` older than
    /// `sessionTmpOlderThanSeconds` (all of them without it). Sessions with
    /// a running process are skipped. With `onlyIfFreeBytesBelow`, nothing
    /// happens while the disk has at least that much free; 0 means no
    /// condition (the client's menu clean-up sends 0 to prune at once).
    pub fn prune(
        &self,
        p: &PruneSessionCachesParams,
        running: &HashSet<String>,
    ) -> Result<PruneSessionCachesResult, SessionError> {
        let mut r = PruneSessionCachesResult::default();
        if let Some(limit) = p.only_if_free_bytes_below.filter(|l| *l > 0) {
            let (_, free) = statvfs(&self.root)?;
            if free >= limit {
                return Ok(r);
            }
        }
        let now = SystemTime::now();
        let min_age = Duration::from_secs(p.session_tmp_older_than_seconds.unwrap_or(0));
        for name in self.list() {
            if running.contains(&name) {
                r.skipped_sessions.push(name);
                continue;
            }
            let dir = self.root.join(&name);
            let mut freed = 0u64;
            let mut errors = Vec::new();
            let mut targets = vec![];
            for e in read_dir_sorted(&dir.join(CACHE_DIR)) {
                targets.push(e);
            }
            if p.include_session_tmp == Some(true) {
                for e in read_dir_sorted(&dir.join(SESSION_TMP_DIR)) {
                    let old = fs::symlink_metadata(&e)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| now.duration_since(t).ok())
                        .is_some_and(|age| age >= min_age);
                    if old {
                        targets.push(e);
                    }
                }
            }
            for t in targets {
                let size = disk_usage(&t);
                let res = match fs::symlink_metadata(&t) {
                    Ok(md) if md.is_dir() => fs::remove_dir_all(&t),
                    Ok(_) => fs::remove_file(&t),
                    Err(e) => Err(e),
                };
                match res {
                    Ok(()) => freed += size,
                    Err(e) => errors.push(format!("{}: {e}", t.display())),
                }
            }
            if !errors.is_empty() {
                r.errors.insert(name.clone(), errors.join("; "));
            }
            if freed > 0 {
                r.pruned_sessions.push(name);
                r.freed_bytes += freed;
            }
        }
        Ok(r)
    }
}

/// The entries of `dir` when it is a real directory (a link is left alone).
fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    if !fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Vec::new();
    }
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Space used on disk beneath `path` (st_blocks), not following links and
/// staying on one filesystem.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(md) = fs::symlink_metadata(path) else {
        return 0;
    };
    let dev = md.dev();
    let mut total = md.blocks() * 512;
    if !md.is_dir() {
        return total;
    }
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.dev() != dev {
                continue;
            }
            total += md.blocks() * 512;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// (total, available) bytes of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> Result<(u64, u64), SessionError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| SessionError::NulInPath {
        path: path.to_owned(),
    })?;
    // SAFETY: statvfs is plain data; all zeros is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` a live statvfs, both outlive
    // the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(SessionError::Statvfs {
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

fn open_dir_at(parent: Option<&OwnedFd>, name: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(name.as_os_str().as_bytes())?;
    let dirfd = parent.map_or(libc::AT_FDCWD, |p| p.as_raw_fd());
    // SAFETY: `c` is NUL-terminated and outlives the call; `dirfd` is an
    // open directory or AT_FDCWD.
    let fd = unsafe {
        libc::openat(
            dirfd,
            c.as_ptr(),
            libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates `rel` beneath `base`, one component at a time relative to the
/// open parent (O_NOFOLLOW: a link on the way is refused, never followed),
/// each new directory 0755 and owned by `uid`.
pub fn mkdir_beneath(base: &Path, rel: &Path, uid: u32) -> Result<(), SessionError> {
    let mut cur = open_dir_at(None, base).map_err(io(base))?;
    let mut so_far = base.to_owned();
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            continue;
        };
        so_far.push(name);
        let c = CString::new(name.as_bytes()).map_err(|_| SessionError::NulInPath {
            path: so_far.clone(),
        })?;
        // SAFETY: `c` is NUL-terminated; `cur` is an open directory.
        let r = unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o755) };
        let created = r == 0;
        if !created {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io(&so_far)(e));
            }
        }
        let next = open_dir_at(Some(&cur), Path::new(name)).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) {
                SessionError::LinkOnTheWay {
                    path: so_far.clone(),
                }
            } else {
                io(&so_far)(e)
            }
        })?;
        if created {
            // SAFETY: fchown on a descriptor we own; no memory involved.
            if unsafe { libc::fchown(next.as_raw_fd(), uid, uid) } != 0 {
                return Err(SessionError::Chown {
                    path: so_far,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        cur = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> (tempfile::TempDir, Sessions) {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sessions")).unwrap();
        fs::create_dir(d.path().join("etc")).unwrap();
        fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\n",
        )
        .unwrap();
        fs::write(d.path().join("etc/group"), "root:x:0:\n").unwrap();
        let s = Sessions::open(&d.path().join("sessions"), &d.path().join("etc")).unwrap();
        (d, s)
    }

    #[test]
    fn names_are_one_plain_component() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/",
            "a\0b",
            "a\nb",
            ".coworkvm",
            ".x",
            "lost+found",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name(&"n".repeat(MAX_NAME_LEN)).is_ok());
        assert!(validate_name(&"n".repeat(MAX_NAME_LEN + 1)).is_err());
        for good in ["s1", "local_3f2a-9", "happy-turing", "a.b", "ünï"] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn uids_are_allocated_once_and_survive_a_reopen() {
        let (d, s) = disk();
        assert_eq!(s.uid_for("a").unwrap(), FIRST_UID);
        assert_eq!(s.uid_for("b").unwrap(), FIRST_UID + 1);
        assert_eq!(s.uid_for("a").unwrap(), FIRST_UID);
        assert!(s.uid_for("../x").is_err());
        drop(s);
        // A reboot: the same disk, a fresh agent.
        let s = Sessions::open(&d.path().join("sessions"), &d.path().join("etc")).unwrap();
        assert_eq!(s.uid_for("b").unwrap(), FIRST_UID + 1);
        assert_eq!(s.uid_for("c").unwrap(), FIRST_UID + 2);
        let text = fs::read_to_string(s.users_file()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["users"]["c"], FIRST_UID + 2);
        // No temporary file is left behind.
        let leftovers: Vec<_> = fs::read_dir(s.state_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_corrupt_uid_map_is_rebuilt_from_the_directories() {
        let (d, s) = disk();
        let a = s.prepare("a").unwrap();
        let b = s.prepare("b").unwrap();
        fs::write(s.users_file(), "{not json").unwrap();
        drop(s);
        let s = Sessions::open(&d.path().join("sessions"), &d.path().join("etc")).unwrap();
        assert_eq!(s.uid_for("a").unwrap(), a.uid);
        assert_eq!(s.uid_for("b").unwrap(), b.uid);
        assert_eq!(
            s.uid_for("new").unwrap(),
            b.uid + 1,
            "no uid handed out twice"
        );
    }

    #[test]
    fn prepare_makes_a_private_dir_and_an_account() {
        let (d, s) = disk();
        let sd = s.prepare("s1").unwrap();
        let md = fs::symlink_metadata(&sd.path).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o700);
        assert_eq!((md.uid(), md.gid()), (sd.uid, sd.uid));
        // The second call (a resume) keeps it all and adds no duplicate.
        s.accounts.lock().unwrap().clear();
        assert_eq!(s.prepare("s1").unwrap(), sd);
        let passwd = fs::read_to_string(d.path().join("etc/passwd")).unwrap();
        let line = format!(
            "cowork1001:x:1001:1001:coworkvm session:{}:/bin/bash",
            sd.path.display()
        );
        assert_eq!(passwd.lines().filter(|l| *l == line).count(), 1, "{passwd}");
        let group = fs::read_to_string(d.path().join("etc/group")).unwrap();
        assert_eq!(
            group.lines().filter(|l| *l == "cowork1001:x:1001:").count(),
            1
        );
        // A file or link where the directory should be is refused.
        fs::write(s.root().join("f"), "").unwrap();
        assert!(s.prepare("f").is_err());
        std::os::unix::fs::symlink("/", s.root().join("l")).unwrap();
        assert!(s.prepare("l").is_err());
    }

    #[test]
    fn cwd_stays_inside_the_session() {
        let (d, s) = disk();
        let sd = s.prepare("s1").unwrap();
        let root = sd.path.clone();
        assert_eq!(s.resolve_cwd(&sd, None).unwrap(), root);
        fs::create_dir(root.join("w")).unwrap();
        let w = root.join("w");
        assert_eq!(s.resolve_cwd(&sd, Some(w.to_str().unwrap())).unwrap(), w);
        assert_eq!(s.resolve_cwd(&sd, Some("w")).unwrap(), w);
        // New directories are made, owned by the session's user.
        let deep = root.join("x/y");
        assert_eq!(
            s.resolve_cwd(&sd, Some(deep.to_str().unwrap())).unwrap(),
            deep
        );
        assert_eq!(fs::metadata(root.join("x")).unwrap().uid(), sd.uid);
        // Outside: by path, by `..`, through a link, another session.
        let other = s.prepare("s2").unwrap();
        for bad in [
            "/etc".to_owned(),
            "/".to_owned(),
            format!("{}/../s2", root.display()),
            "../s2".into(),
            other.path.to_string_lossy().into_owned(),
            format!("{}/../s2/new", root.display()),
            d.path().to_string_lossy().into_owned(),
        ] {
            let e = s.resolve_cwd(&sd, Some(&bad)).unwrap_err();
            assert!(matches!(e, SessionError::CwdOutside { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("outside the session"), "{bad}: {e}");
        }
        let elsewhere = d.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("link")).unwrap();
        let e = s
            .resolve_cwd(&sd, Some(&format!("{}/link", root.display())))
            .unwrap_err();
        assert!(matches!(e, SessionError::CwdOutside { .. }), "{e}");
        // Creating beneath a link is refused, never followed.
        let e = s
            .resolve_cwd(&sd, Some(&format!("{}/link/newdir", root.display())))
            .unwrap_err();
        assert!(matches!(e, SessionError::LinkOnTheWay { .. }), "{e}");
        assert!(e.to_string().contains("links are not followed"), "{e}");
        assert!(!elsewhere.join("newdir").exists());
        // A link that stays inside is fine.
        std::os::unix::fs::symlink(&w, root.join("inlink")).unwrap();
        assert_eq!(s.resolve_cwd(&sd, Some("inlink")).unwrap(), w);
        fs::write(root.join("file"), "").unwrap();
        assert!(matches!(
            s.resolve_cwd(&sd, Some("file")),
            Err(SessionError::CwdNotADirectory(_))
        ));
    }

    #[test]
    fn disk_info_has_the_host_protocol_shape() {
        let (_d, s) = disk();
        let sd = s.prepare("s1").unwrap();
        fs::write(sd.path.join("blob"), vec![1u8; 100_000]).unwrap();
        s.prepare("s2").unwrap();
        let info = s.disk_info().unwrap();
        let v = serde_json::to_value(&info).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["freeBytes", "sessions", "totalBytes"]);
        assert!(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
        let names: Vec<&str> = info
            .sessions
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["s1", "s2"], "the state directory is no session");
        assert!(info.sessions[0]["sizeBytes"].as_u64().unwrap() >= 100_000);
        assert!(info.sessions[1]["sizeBytes"].as_u64().unwrap() < 100_000);
    }

    #[test]
    fn delete_refuses_a_running_session_and_never_follows_links() {
        let (d, s) = disk();
        let a = s.prepare("a").unwrap();
        s.prepare("busy").unwrap();
        // A link inside the session to something outside it.
        let precious = d.path().join("precious");
        fs::create_dir(&precious).unwrap();
        fs::write(precious.join("keep"), "x").unwrap();
        std::os::unix::fs::symlink(&precious, a.path.join("out")).unwrap();
        let running: HashSet<String> = ["busy".to_owned()].into();
        let names: Vec<String> = ["a", "busy", "gone", "../etc", ".coworkvm"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = s.delete(&names, &running);
        assert_eq!(r.deleted, ["a", "gone"]);
        assert!(r.errors["busy"].contains("running"), "{:?}", r.errors);
        assert!(r.errors.contains_key("../etc"));
        assert!(r.errors.contains_key(".coworkvm"));
        assert!(!a.path.exists());
        assert!(s.root().join("busy").exists());
        assert!(precious.join("keep").exists(), "the link's target survives");
        assert!(s.state_dir().join("users.json").exists());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["deleted"], json!(["a", "gone"]));
        assert!(v["errors"].is_object());
    }

    #[test]
    fn prune_empties_caches_of_idle_sessions_only() {
        let (d, s) = disk();
        let idle = s.prepare("idle").unwrap();
        let busy = s.prepare("busy").unwrap();
        let clean = s.prepare("clean").unwrap();
        for sd in [&idle, &busy] {
            fs::create_dir_all(sd.path.join(".cache/pip")).unwrap();
            fs::write(sd.path.join(".cache/pip/wheel"), vec![0u8; 64 * 1024]).unwrap();
            fs::create_dir_all(sd.path.join("tmp")).unwrap();
            fs::write(sd.path.join("tmp/scratch"), vec![0u8; 8192]).unwrap();
        }
        fs::write(clean.path.join("work"), "keep").unwrap();
        // .cache as a link to outside: left alone, and so is its target.
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("f"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, clean.path.join(".cache")).unwrap();
        let running: HashSet<String> = ["busy".to_owned()].into();

        // Plenty of space: nothing to do.
        let r = s
            .prune(
                &PruneSessionCachesParams {
                    only_if_free_bytes_below: Some(1),
                    ..Default::default()
                },
                &running,
            )
            .unwrap();
        assert_eq!(r, PruneSessionCachesResult::default());
        assert!(idle.path.join(".cache/pip/wheel").exists());

        // 0: no condition, as the client's menu clean-up means it.
        let r = s
            .prune(
                &PruneSessionCachesParams {
                    only_if_free_bytes_below: Some(0),
                    ..Default::default()
                },
                &running,
            )
            .unwrap();
        assert_eq!(r.pruned_sessions, ["idle"]);
        assert_eq!(r.skipped_sessions, ["busy"]);
        assert!(r.freed_bytes >= 64 * 1024, "{r:?}");
        assert!(r.errors.is_empty(), "{r:?}");
        assert!(
            idle.path.join(".cache").exists(),
            "the cache dir itself stays"
        );
        assert!(!idle.path.join(".cache/pip").exists());
        assert!(
            idle.path.join("tmp/scratch").exists(),
            "tmp only when asked"
        );
        assert!(busy.path.join(".cache/pip/wheel").exists());
        assert!(outside.join("f").exists());
        assert!(clean.path.join("work").exists());

        // tmp, but only entries older than an hour: none are.
        let p = PruneSessionCachesParams {
            include_session_tmp: Some(true),
            session_tmp_older_than_seconds: Some(3600),
            ..Default::default()
        };
        s.prune(&p, &running).unwrap();
        assert!(idle.path.join("tmp/scratch").exists());
        let p = PruneSessionCachesParams {
            include_session_tmp: Some(true),
            session_tmp_older_than_seconds: Some(0),
            ..Default::default()
        };
        let r = s.prune(&p, &running).unwrap();
        assert_eq!(r.pruned_sessions, ["idle"]);
        assert!(!idle.path.join("tmp/scratch").exists());
        assert!(busy.path.join("tmp/scratch").exists());
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["errors", "freedBytes", "prunedSessions", "skippedSessions"]
        );
    }
}
