//! Shared folders: the guest side of the virtio-fs device.
//!
//! At boot the agent mounts the device's tag ([`guest::SHARE_TAG`]) at
//! [`guest::SHARE_GUEST_ROOT`] (0700, root only, nosuid, nodev; not
//! noexec: an SDK granted through it runs from it) and keeps an `O_PATH`
//! descriptor of that root. The helper's share keeper binds each grant on
//! the host at `<staging>/shared/<root-relative host path>`, so a grant is
//! `shared/<path>` beneath that root.
//!
//! Each sandboxed session gets its own mount tree, root-owned, at
//! `/run/coworkvm/mnt/<session>`: a small tmpfs made `MS_SHARED`, which
//! bwrap binds at `/sessions/<name>/mnt`. bwrap's mount namespace belongs
//! to a less privileged user namespace, so its copy of the tree is a slave
//! of ours, and so is its bind of that copy: a grant attached to the tree
//! later (`mountPath`, or a second spawn of the same session) propagates
//! into the running sandbox and into no other.
//!
//! A grant, parents first: `openat2(share root, "shared/<path>",
//! O_PATH|O_DIRECTORY, RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|
//! RESOLVE_NO_MAGICLINKS)` (nothing on the host side can lead it out of
//! the share) -> `open_tree(OPEN_TREE_CLONE|AT_RECURSIVE)` (a detached
//! copy) -> `mount_setattr` (nosuid, nodev, read-only for `ro`, and an
//! idmap that shows [`guest::SHARE_OWNER_ID`], the host user's files, as
//! the session's uid and gid; where the kernel refuses idmapped virtiofs,
//! as 6.1 does, a plain bind, logged once) -> `move_mount` onto the target
//! directory, made beneath the tree one component at a time with
//! `RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS`. A grant that cannot be made is
//! that mount's failure, never the spawn's.
//!
//! When a session's last process has exited its tree is detached and its
//! directory removed.
//!
//! `installSdk` with `sharedPath`: the version directory granted read-only
//! is checked (`claude` a regular file every session user may execute)
//! and bound read-only at `/run/coworkvm/sdk/<version>`, where every
//! session's bwrap can reach it (the share root is 0700).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde_json::Value;
use socket_proto::guest;

use crate::lock;

/// The agent's runtime directory: the per-session mount trees are in
/// `mnt/`, the SDK versions granted through the share in `sdk/`.
pub const RUN_DIR: &str = "/run/coworkvm";
/// The most mounts one spawn may ask for, and the most one session holds.
pub const MAX_MOUNTS: usize = 64;
/// The longest mount name, in bytes.
pub const MAX_MOUNT_NAME_BYTES: usize = 255;
/// The most components of a mount name (`a/b/c` is 3).
pub const MAX_MOUNT_DEPTH: usize = 8;
/// The longest share-relative path, in bytes (PATH_MAX).
pub const MAX_SHARE_PATH_BYTES: usize = 4096;
/// SDK versions kept bound under `RUN_DIR/sdk`; the oldest go first.
pub const MAX_SDK_MOUNTS: usize = 4;
/// Tries of the boot mount, 100 ms apart, while the driver probes.
const BOOT_MOUNT_TRIES: u32 = 20;
/// The session tree's tmpfs holds only mount-point directories.
const TREE_TMPFS_OPTIONS: &str = "mode=0755,size=256k,nr_inodes=4096";

// linux/mount.h and linux/openat2.h: stable kernel ABI.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x01;
const MOUNT_ATTR_NOSUID: u64 = 0x02;
const MOUNT_ATTR_NODEV: u64 = 0x04;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;
const BENEATH_NO_LINKS: u64 = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// How a grant may be used in the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountMode {
    /// Read-only (also read-only on the host side).
    Ro,
    /// Read-write.
    Rw,
    /// Read-write, deletions included.
    Rwd,
}

impl MountMode {
    pub fn parse(s: &str) -> Result<Self, ShareError> {
        match s {
            "ro" => Ok(MountMode::Ro),
            "rw" => Ok(MountMode::Rw),
            "rwd" => Ok(MountMode::Rwd),
            other => Err(ShareError::BadMode(other.chars().take(32).collect())),
        }
    }
}

/// One validated mount: `shared/<path>` at `mnt/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub name: String,
    pub path: String,
    pub mode: MountMode,
}

impl Grant {
    fn depth(&self) -> usize {
        self.name.split('/').count()
    }
}

/// Why a shared folder could not be mounted. The text is what the helper
/// gets (`mountPath`, `installSdk`) or what the agent logs (`spawn`).
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("no shared-folder (virtio-fs) device is mounted in this guest")]
    NoShare,
    #[error("mount name {name:?}: {why}")]
    BadMountName { name: String, why: &'static str },
    #[error("path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("mode {0:?}: expected \"ro\", \"rw\" or \"rwd\"")]
    BadMode(String),
    #[error("mount {name:?}: expected {{\"path\": <share-relative path>, \"mode\": \"ro\"|\"rw\"|\"rwd\"}}")]
    BadSpec { name: String },
    #[error("additionalMounts: expected a {{mountName: {{path, mode}}}} map")]
    NotAMap,
    #[error("{count} mounts asked for; at most {MAX_MOUNTS}")]
    TooMany { count: usize },
    #[error("mount {0:?} is already mounted in this session from another path or mode")]
    AlreadyMounted(String),
    #[error("the shared folder shared/{path}: {source}")]
    Source { path: String, source: io::Error },
    #[error("mount point mnt/{name}: {source}")]
    Target { name: String, source: io::Error },
    #[error("{step} for mount {name:?}: {source}")]
    Mount {
        step: &'static str,
        name: String,
        source: io::Error,
    },
    #[error("the session's mount tree {}: {source}", path.display())]
    Tree { path: PathBuf, source: io::Error },
    #[error("the session {0} has no mount tree (its processes run without the shared folder)")]
    NoTree(String),
    #[error("no running process {0}")]
    NoSuchProcess(String),
    #[error("mounting the shared-folder device {tag} at {root}: {source}")]
    Boot {
        tag: &'static str,
        root: &'static str,
        source: io::Error,
    },
    #[error("installSdk: {0}")]
    Sdk(String),
}

/// A mount name: relative, 1..=[`MAX_MOUNT_DEPTH`] components, none
/// empty, `.` or `..`, no NUL, at most [`MAX_MOUNT_NAME_BYTES`] bytes.
pub fn validate_mount_name(name: &str) -> Result<(), ShareError> {
    let bad = |why| {
        Err(ShareError::BadMountName {
            name: name.chars().take(64).collect(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_MOUNT_NAME_BYTES {
        return bad("longer than 255 bytes");
    }
    if name.contains('\0') {
        return bad("contains NUL");
    }
    if name.starts_with('/') {
        return bad("not relative");
    }
    let mut depth = 0;
    for c in name.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return bad("has an empty, `.` or `..` component");
        }
        depth += 1;
    }
    if depth > MAX_MOUNT_DEPTH {
        return bad("more than 8 components deep");
    }
    Ok(())
}

/// A share-relative path: relative, non-empty, no empty, `.` or `..`
/// component, no NUL, at most [`MAX_SHARE_PATH_BYTES`] bytes.
pub fn validate_share_path(path: &str) -> Result<(), ShareError> {
    let bad = |why| {
        Err(ShareError::BadPath {
            path: path.chars().take(128).collect(),
            why,
        })
    };
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_SHARE_PATH_BYTES {
        return bad("longer than 4096 bytes");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    if path.starts_with('/') {
        return bad("not relative to the share");
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("has an empty, `.` or `..` component");
    }
    Ok(())
}

/// `additionalMounts` as the helper forwards it (`{mountName: {path,
/// mode}}`): the valid grants, parents first, and the mounts that failed
/// already, by name, with why.
pub fn parse_additional_mounts(v: Option<&Value>) -> (Vec<Grant>, Vec<(String, ShareError)>) {
    let mut failed = Vec::new();
    let map = match v {
        None | Some(Value::Null) => return (Vec::new(), failed),
        Some(Value::Object(m)) => m,
        Some(other) => {
            for name in guest::failed_mount_names(other) {
                failed.push((name, ShareError::NotAMap));
            }
            return (Vec::new(), failed);
        }
    };
    if map.len() > MAX_MOUNTS {
        let count = map.len();
        for name in map.keys() {
            failed.push((name.clone(), ShareError::TooMany { count }));
        }
        return (Vec::new(), failed);
    }
    let mut grants = Vec::new();
    for (name, spec) in map {
        let grant = validate_mount_name(name).and_then(|()| {
            let field = |k: &str| spec.get(k).and_then(Value::as_str);
            let (Some(path), Some(mode)) = (field("path"), field("mode")) else {
                return Err(ShareError::BadSpec { name: name.clone() });
            };
            validate_share_path(path)?;
            Ok(Grant {
                name: name.clone(),
                path: path.to_owned(),
                mode: MountMode::parse(mode)?,
            })
        });
        match grant {
            Ok(g) => grants.push(g),
            Err(e) => failed.push((name.clone(), e)),
        }
    }
    // Parents first: `a` before `a/b`.
    grants.sort_by(|a, b| a.depth().cmp(&b.depth()).then(a.name.cmp(&b.name)));
    (grants, failed)
}

fn cstring(s: impl AsRef<[u8]>) -> io::Result<CString> {
    CString::new(s.as_ref()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn owned(fd: i64) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// openat2(2) with `resolve` restrictions.
fn openat2(dir: &OwnedFd, path: &str, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: `c` is NUL-terminated and `how` a live open_how of the size
    // passed; both outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    owned(fd)
}

fn open_path_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    owned(fd.into())
}

/// A detached copy of the mount tree at `fd` (open_tree OPEN_TREE_CLONE).
fn clone_tree(fd: &OwnedFd, recursive: bool) -> io::Result<OwnedFd> {
    let flags = OPEN_TREE_CLONE
        | libc::O_CLOEXEC as libc::c_uint
        | libc::AT_EMPTY_PATH as libc::c_uint
        | if recursive {
            libc::AT_RECURSIVE as libc::c_uint
        } else {
            0
        };
    // SAFETY: an open descriptor and a static empty string.
    let r = unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), c"".as_ptr(), flags) };
    owned(r)
}

/// mount_setattr(2) on the detached tree `fd` (and everything below it).
fn set_attrs(fd: &OwnedFd, set: u64, userns: Option<&OwnedFd>) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set
            | if userns.is_some() {
                MOUNT_ATTR_IDMAP
            } else {
                0
            },
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |u| u.as_raw_fd() as u64),
    };
    // SAFETY: an open descriptor, a static empty string, and a live
    // mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// move_mount(2): attaches the detached tree `from` on the directory `to`.
fn attach(from: &OwnedFd, to: &OwnedFd) -> io::Result<()> {
    // SAFETY: two open descriptors and static empty strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            from.as_raw_fd(),
            c"".as_ptr(),
            to.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// mount(2) with Rust strings (the boot disk's mounts use it too).
pub(crate) fn sys_mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let src = cstring(source)?;
    let tgt = cstring(target.as_os_str().as_bytes())?;
    let fs = fstype.map(cstring).transpose()?;
    let d = cstring(data)?;
    // SAFETY: NUL-terminated strings (or NULL for the fs type) that
    // outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            d.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn detach(path: &Path) -> io::Result<()> {
    let c = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The directory `comp` in `dir`, made (0755) when missing; no link is
/// followed.
fn open_or_make_dir(dir: &OwnedFd, comp: &str) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY;
    match openat2(dir, comp, flags, BENEATH_NO_LINKS) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            let c = cstring(comp)?;
            // SAFETY: `c` is NUL-terminated; `dir` is an open directory.
            if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
            openat2(dir, comp, flags, BENEATH_NO_LINKS)
        }
        r => r,
    }
}

/// `bindfs` in the guest image (Debian's package).
const BINDFS: &str = "/usr/bin/bindfs";
/// How long a `bindfs` may take to show its mount.
const BINDFS_MOUNT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs on drop.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Moves the mount at `from` onto the directory `to`.
fn move_mount_path(from: &Path, to: &OwnedFd) -> io::Result<()> {
    let from = cstring(from.as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path, an open directory and a static empty
    // string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            libc::AT_FDCWD,
            from.as_ptr(),
            to.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts `source` on the empty directory `target_path` with
/// bindfs, mapping [`guest::SHARE_OWNER_ID`] to `uid` both ways. bindfs
/// runs in the foreground as the agent's child (the agent, PID 1, reaps it
/// when the mount is gone); the mount's appearance is awaited here.
fn bindfs(source: &Path, target_path: &Path, uid: u32, read_only: bool) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let before = std::fs::metadata(target_path)?.dev();
    let owner = guest::SHARE_OWNER_ID;
    let mut opts = String::from("nosuid,nodev");
    if read_only {
        opts.push_str(",ro");
    }
    let mut cmd = std::process::Command::new(BINDFS);
    cmd.arg("-f")
        .arg("-o")
        .arg(&opts)
        .arg(format!("--map={owner}/{uid}:@{owner}/@{uid}"))
        .arg(source)
        .arg(target_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // Never waited for here: the agent's reaper owns every child. A pidfd
    // taken at once names this child even after a reap, for the kill below.
    let child = cmd.spawn()?;
    // SAFETY: pidfd_open with a pid and no flags; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    drop(child);
    let deadline = std::time::Instant::now() + BINDFS_MOUNT_WAIT;
    loop {
        if std::fs::metadata(target_path).is_ok_and(|m| m.dev() != before) {
            if pidfd >= 0 {
                // SAFETY: closes the pidfd opened above, used nowhere else.
                unsafe { libc::close(pidfd as libc::c_int) };
            }
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            if pidfd >= 0 {
                // SAFETY: pidfd_send_signal on our own pidfd (a process that
                // is gone answers ESRCH), then close it.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd as libc::c_int,
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                    libc::close(pidfd as libc::c_int);
                }
            }
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("bindfs did not mount within {BINDFS_MOUNT_WAIT:?}"),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn mkdir_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let md = std::fs::symlink_metadata(path)?;
    if !md.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// A user namespace that maps [`guest::SHARE_OWNER_ID`] to `id` (uid and
/// gid), for `MOUNT_ATTR_IDMAP`. The agent is multi-threaded and cannot
/// unshare one itself: a child made with `clone(CLONE_NEWUSER)` (fork
/// semantics) only pauses while the agent writes its maps and opens its
/// namespace, then is killed.
fn idmap_userns(id: u32) -> io::Result<OwnedFd> {
    // SAFETY: clone without CLONE_VM and with no new stack is fork(2): the
    // child runs on a copy of this address space and makes only the
    // async-signal-safe prctl and pause system calls, never returning.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: async-signal-safe system calls on integers only.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            loop {
                libc::pause();
            }
        }
    }
    let pid = pid as i32;
    let map = format!("{} {id} 1\n", guest::SHARE_OWNER_ID);
    let result = (|| {
        std::fs::write(format!("/proc/{pid}/uid_map"), &map)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), &map)?;
        let f = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
        Ok(OwnedFd::from(f))
    })();
    // SAFETY: kill and waitpid on our own child (alive until this kill,
    // so its pid cannot have been reused); waitpid writes nothing.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        // The guest's reaper may collect it first: ECHILD is fine.
        libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL);
    }
    result
}

/// One session's mount tree.
struct SessionTree {
    path: PathBuf,
    /// `O_PATH` of the tree's root: targets are made beneath it.
    root: OwnedFd,
    /// The idmap for the session's uid, made on first use; `None` also
    /// when the kernel refuses idmapped virtiofs.
    userns: Option<OwnedFd>,
    uid: u32,
    /// What is mounted, by name.
    mounts: BTreeMap<String, (String, MountMode)>,
    /// Root-only binds of grant sources that a `bindfs` in the tree reads
    /// from (kernels without idmapped virtiofs), detached with the tree.
    sources: Vec<PathBuf>,
}

/// The shared-folder device as the agent uses it.
pub struct Share {
    /// `O_PATH` of the share's root (`/mnt/.virtiofs-root`).
    root: OwnedFd,
    trees_dir: PathBuf,
    sdk_dir: PathBuf,
    /// Root-only (0700): grant sources for `bindfs`.
    sources_dir: PathBuf,
    trees: Mutex<HashMap<String, SessionTree>>,
    /// SDK versions bound under `sdk_dir`, oldest first.
    sdk_mounts: Mutex<VecDeque<String>>,
    /// The kernel refused an idmapped bind of the share (6.1): plain binds
    /// from then on, said once.
    no_idmap: AtomicBool,
}

/// Whether the guest has a virtio-fs device (virtio device id 26).
pub fn device_present(sys_virtio: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(sys_virtio) else {
        return false;
    };
    entries.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("device"))
            .is_ok_and(|d| d.trim() == format!("0x{:04x}", 26))
    })
}

impl Share {
    /// PID 1 at boot: mounts the device's tag at the share root. `Ok(None)`
    /// without a virtio-fs device.
    pub fn mount_at_boot() -> Result<Option<Share>, ShareError> {
        if !device_present(Path::new("/sys/bus/virtio/devices")) {
            return Ok(None);
        }
        let root = Path::new(guest::SHARE_GUEST_ROOT);
        let boot = |source| ShareError::Boot {
            tag: guest::SHARE_TAG,
            root: guest::SHARE_GUEST_ROOT,
            source,
        };
        if let Some(parent) = root.parent() {
            mkdir_mode(parent, 0o755).map_err(boot)?;
        }
        mkdir_mode(root, 0o700).map_err(boot)?;
        // The driver may still be probing the device it was just loaded
        // for: an unknown tag is EINVAL, an unknown fs type ENODEV.
        let mut tries = 0;
        loop {
            let r = sys_mount(
                guest::SHARE_TAG,
                root,
                Some("virtiofs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                "",
            );
            match r {
                Ok(()) => break,
                Err(e)
                    if tries < BOOT_MOUNT_TRIES
                        && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENODEV)) =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(boot(e)),
            }
        }
        Share::open(root, Path::new(RUN_DIR)).map(Some)
    }

    /// The share mounted at `root`; session trees and SDK binds beneath
    /// `run` (`/run/coworkvm`).
    pub fn open(root: &Path, run: &Path) -> Result<Share, ShareError> {
        let tree_err = |path: &Path| {
            let path = path.to_owned();
            move |source| ShareError::Tree { path, source }
        };
        let root_fd = open_path_dir(root).map_err(tree_err(root))?;
        let trees_dir = run.join("mnt");
        let sdk_dir = run.join("sdk");
        let sources_dir = run.join("src");
        // Root-owned, searchable: bwrap reaches its session's tree and the
        // SDK binds as the session user.
        for d in [run, &trees_dir, &sdk_dir] {
            mkdir_mode(d, 0o755).map_err(tree_err(d))?;
        }
        mkdir_mode(&sources_dir, 0o700).map_err(tree_err(&sources_dir))?;
        Ok(Share {
            root: root_fd,
            trees_dir,
            sdk_dir,
            sources_dir,
            trees: Mutex::new(HashMap::new()),
            sdk_mounts: Mutex::new(VecDeque::new()),
            no_idmap: AtomicBool::new(false),
        })
    }

    /// The session's mount tree directory (bwrap binds it at
    /// `/sessions/<name>/mnt`).
    pub fn tree_path(&self, session: &str) -> PathBuf {
        self.trees_dir.join(session)
    }

    /// Mounts `grants` into `session`'s tree (made if missing) as `uid`.
    /// Returns the tree's path, or why there is none, and each grant that
    /// failed, by name. Call [`Share::release`] if no process of the
    /// session is left to hold the tree.
    pub fn mount_grants(
        &self,
        session: &str,
        uid: u32,
        grants: &[Grant],
    ) -> (Result<PathBuf, ShareError>, Vec<(String, ShareError)>) {
        let mut trees = lock(&self.trees);
        let tree = match self.tree(&mut trees, session, uid) {
            Ok(t) => t,
            Err(e) => {
                let why = e.to_string();
                let failed = grants
                    .iter()
                    .map(|g| {
                        let e = ShareError::NoTree(format!("{session} ({why})"));
                        (g.name.clone(), e)
                    })
                    .collect();
                return (Err(e), failed);
            }
        };
        let mut failed = Vec::new();
        for g in grants {
            if let Err(e) = self.mount_one(tree, g) {
                failed.push((g.name.clone(), e));
            }
        }
        (Ok(tree.path.clone()), failed)
    }

    /// `mountPath`: one grant into the existing tree of `session`.
    pub fn mount_into_running(&self, session: &str, grant: &Grant) -> Result<(), ShareError> {
        let mut trees = lock(&self.trees);
        let tree = trees
            .get_mut(session)
            .ok_or_else(|| ShareError::NoTree(session.to_owned()))?;
        self.mount_one(tree, grant)
    }

    fn tree<'a>(
        &self,
        trees: &'a mut HashMap<String, SessionTree>,
        session: &str,
        uid: u32,
    ) -> Result<&'a mut SessionTree, ShareError> {
        if trees.get(session).is_some_and(|t| t.uid != uid) {
            // Not reached: a session keeps its uid. Never reuse another's.
            if let Some(t) = trees.remove(session) {
                let _ = detach(&t.path);
            }
        }
        if !trees.contains_key(session) {
            let path = self.tree_path(session);
            let err = |source| ShareError::Tree {
                path: path.clone(),
                source,
            };
            mkdir_mode(&path, 0o755).map_err(err)?;
            // A tree left by a failed release: start afresh.
            while detach(&path).is_ok() {}
            sys_mount(
                "coworkvm-mnt",
                &path,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                TREE_TMPFS_OPTIONS,
            )
            .map_err(err)?;
            let made =
                sys_mount("", &path, None, libc::MS_SHARED, "").and_then(|()| open_path_dir(&path));
            let root = match made {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = detach(&path);
                    return Err(err(e));
                }
            };
            trees.insert(
                session.to_owned(),
                SessionTree {
                    path,
                    root,
                    userns: None,
                    uid,
                    mounts: BTreeMap::new(),
                    sources: Vec::new(),
                },
            );
        }
        trees
            .get_mut(session)
            .ok_or_else(|| ShareError::NoTree(session.to_owned()))
    }

    fn mount_one(&self, tree: &mut SessionTree, g: &Grant) -> Result<(), ShareError> {
        if let Some((path, mode)) = tree.mounts.get(&g.name) {
            if *path == g.path && *mode == g.mode {
                return Ok(());
            }
            return Err(ShareError::AlreadyMounted(g.name.clone()));
        }
        if tree.mounts.len() >= MAX_MOUNTS {
            return Err(ShareError::TooMany {
                count: tree.mounts.len() + 1,
            });
        }
        let step = |step, source| ShareError::Mount {
            step,
            name: g.name.clone(),
            source,
        };
        let src = openat2(
            &self.root,
            &format!("{}/{}", guest::SHARE_GRANTS_DIR, g.path),
            libc::O_PATH | libc::O_DIRECTORY,
            BENEATH_NO_LINKS,
        )
        .map_err(|source| ShareError::Source {
            path: g.path.clone(),
            source,
        })?;
        let copy = clone_tree(&src, true).map_err(|e| step("open_tree", e))?;
        let mut attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        if g.mode == MountMode::Ro {
            attrs |= MOUNT_ATTR_RDONLY;
        }
        let mut idmapped = false;
        if !self.no_idmap.load(Ordering::Relaxed) {
            if tree.userns.is_none() {
                match idmap_userns(tree.uid) {
                    Ok(ns) => tree.userns = Some(ns),
                    Err(e) => eprintln!(
                        "coworkvm-agent: shared folders: no user namespace for the idmap of uid \
                         {}: {e}; plain binds",
                        tree.uid
                    ),
                }
            }
            if let Some(ns) = &tree.userns {
                match set_attrs(&copy, attrs, Some(ns)) {
                    Ok(()) => idmapped = true,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        if !self.no_idmap.swap(true, Ordering::Relaxed) {
                            eprintln!(
                                "coworkvm-agent: shared folders: this kernel refuses idmapped \
                                 virtiofs binds ({e}); {}",
                                if Path::new(BINDFS).exists() {
                                    "bindfs maps the host user's files to each session's uid"
                                } else {
                                    "no bindfs either: the host user's files show as uid 60000"
                                }
                            );
                        }
                    }
                    Err(e) => return Err(step("mount_setattr (idmap)", e)),
                }
            }
        }
        if !idmapped {
            set_attrs(&copy, attrs, None).map_err(|e| step("mount_setattr", e))?;
        }
        let target = self.target_dir(tree, &g.name)?;
        if idmapped || !Path::new(BINDFS).exists() {
            attach(&copy, &target).map_err(|e| step("move_mount", e))?;
        } else {
            // No idmapped virtiofs (Debian 12's 6.1 and 6.12): bindfs shows
            // the share owner's files as the session's and writes the
            // session's as the share owner's, from a root-only bind of the
            // grant.
            let source = self.sources_dir.join(format!(
                "{}.{}",
                tree.path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                tree.mounts.len() + tree.sources.len()
            ));
            mkdir_mode(&source, 0o700).map_err(|e| step("mkdir source", e))?;
            let src_fd = open_path_dir(&source).map_err(|e| step("open source", e))?;
            attach(&copy, &src_fd).map_err(|e| step("move_mount source", e))?;
            tree.sources.push(source.clone());
            // bindfs mounts on an empty root-only directory (libfuse may
            // refuse a non-empty mountpoint, as a nested grant's is), and
            // the mount is then moved onto the target checked above.
            let view = source.with_extension("view");
            mkdir_mode(&view, 0o700).map_err(|e| step("mkdir view", e))?;
            tree.sources.push(view.clone());
            bindfs(&source, &view, tree.uid, g.mode == MountMode::Ro)
                .map_err(|e| step("bindfs", e))?;
            move_mount_path(&view, &target).map_err(|e| step("move_mount bindfs", e))?;
        }
        tree.mounts.insert(g.name.clone(), (g.path.clone(), g.mode));
        crate::debug!(
            "shared folder shared/{} at {}/{} ({:?}{})",
            g.path,
            tree.path.display(),
            g.name,
            g.mode,
            if idmapped { ", idmapped" } else { "" }
        );
        Ok(())
    }

    /// `name`'s directory beneath the tree, made one component at a time;
    /// no link is followed and nothing leads out of the tree.
    fn target_dir(&self, tree: &SessionTree, name: &str) -> Result<OwnedFd, ShareError> {
        let err = |source| ShareError::Target {
            name: name.to_owned(),
            source,
        };
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        // A name nested in a grant (`.claude/skills` in `.claude`) needs its
        // directory inside that grant. Through the session's idmapped bind
        // root is not mapped and cannot create it, so it is made through the
        // share itself (root there is the host user, by virtiofsd's
        // translation), beneath the parent grant's source.
        let parent = tree
            .mounts
            .iter()
            .filter(|(k, _)| name.len() > k.len() && name.starts_with(k.as_str()))
            .filter(|(k, _)| name.as_bytes()[k.len()] == b'/')
            .max_by_key(|(k, _)| k.len());
        if let Some((k, (src, _))) = parent {
            let mut cur = openat2(
                &self.root,
                &format!("{}/{}", guest::SHARE_GRANTS_DIR, src),
                flags,
                BENEATH_NO_LINKS,
            )
            .map_err(err)?;
            for comp in name[k.len() + 1..].split('/') {
                cur = open_or_make_dir(&cur, comp).map_err(err)?;
            }
        }
        let mut cur = openat2(&tree.root, ".", flags, BENEATH_NO_LINKS).map_err(err)?;
        for comp in name.split('/') {
            let next = match openat2(&cur, comp, flags, BENEATH_NO_LINKS) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let c = cstring(comp).map_err(err)?;
                    // SAFETY: `c` is NUL-terminated; `cur` an open directory.
                    let r = unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o755) };
                    if r != 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(err(e));
                        }
                    }
                    openat2(&cur, comp, flags, BENEATH_NO_LINKS).map_err(err)?
                }
                Err(e) => return Err(err(e)),
            };
            cur = next;
        }
        Ok(cur)
    }

    /// Detaches `session`'s tree unless `running` still names it (a
    /// process or a spawn in progress).
    pub fn release(&self, session: &str, running: impl FnOnce() -> HashSet<String>) {
        let mut trees = lock(&self.trees);
        if !trees.contains_key(session) || running().contains(session) {
            return;
        }
        let Some(t) = trees.remove(session) else {
            return;
        };
        drop(t.root);
        // The bindfs mounts go with the tree (each bindfs exits when its
        // mount is gone); their sources after them.
        let sources = t.sources.clone();
        let _release_sources = Defer(move || {
            for s in &sources {
                let _ = detach(s);
                let _ = std::fs::remove_dir(s);
            }
        });
        if let Err(e) = detach(&t.path) {
            eprintln!(
                "coworkvm-agent: shared folders: detaching {}: {e}",
                t.path.display()
            );
            return;
        }
        if let Err(e) = std::fs::remove_dir(&t.path) {
            eprintln!(
                "coworkvm-agent: shared folders: removing {}: {e}",
                t.path.display()
            );
        }
        crate::debug!("shared folders: session {session}'s tree detached");
    }

    /// Whether `session` has a mount tree.
    #[cfg(test)]
    pub fn has_tree(&self, session: &str) -> bool {
        lock(&self.trees).contains_key(session)
    }

    /// `installSdk` with `sharedPath`: checks `shared/<shared_path>/claude`
    /// and binds its directory read-only at `<run>/sdk/<version>`; returns
    /// the binary's path there.
    pub fn bind_sdk(&self, version: &str, shared_path: &str) -> Result<PathBuf, ShareError> {
        let sdk = |why: String| ShareError::Sdk(why);
        socket_proto::sdk::validate_version(version).map_err(|e| sdk(e.to_string()))?;
        validate_share_path(shared_path)?;
        let dir = openat2(
            &self.root,
            &format!("{}/{shared_path}", guest::SHARE_GRANTS_DIR),
            libc::O_PATH | libc::O_DIRECTORY,
            BENEATH_NO_LINKS,
        )
        .map_err(|source| ShareError::Source {
            path: shared_path.to_owned(),
            source,
        })?;
        let bin_name = socket_proto::sdk::SDK_BINARY;
        let bin = openat2(&dir, bin_name, libc::O_PATH, BENEATH_NO_LINKS).map_err(|e| {
            sdk(format!(
                "shared/{shared_path}/{bin_name}: {e} (expected the SDK binary, not a link)"
            ))
        })?;
        let (dir_mode, _) = fstat(&dir).map_err(|e| sdk(format!("shared/{shared_path}: {e}")))?;
        let (mode, _) = fstat(&bin).map_err(|e| sdk(format!("{bin_name}: {e}")))?;
        check_sdk_modes(shared_path, dir_mode, mode).map_err(sdk)?;
        let copy = clone_tree(&dir, false).map_err(|e| sdk(format!("open_tree: {e}")))?;
        set_attrs(
            &copy,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            None,
        )
        .map_err(|e| sdk(format!("mount_setattr: {e}")))?;
        let mut bound = lock(&self.sdk_mounts);
        let target = self.sdk_dir.join(version);
        if let Some(i) = bound.iter().position(|v| v == version) {
            bound.remove(i);
            let _ = detach(&target);
        }
        mkdir_mode(&target, 0o755).map_err(|e| sdk(format!("{}: {e}", target.display())))?;
        let to = open_path_dir(&target).map_err(|e| sdk(format!("{}: {e}", target.display())))?;
        attach(&copy, &to).map_err(|e| sdk(format!("move_mount: {e}")))?;
        bound.push_back(version.to_owned());
        while bound.len() > MAX_SDK_MOUNTS {
            if let Some(old) = bound.pop_front() {
                // Running sandboxes keep their own copies.
                let p = self.sdk_dir.join(&old);
                if detach(&p).is_ok() {
                    let _ = std::fs::remove_dir(&p);
                }
            }
        }
        Ok(target.join(bin_name))
    }
}

/// (st_mode, st_uid) of a descriptor (an `O_PATH` one included).
fn fstat(fd: &OwnedFd) -> io::Result<(u32, u32)> {
    // SAFETY: fstat writes into `st`, a live zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: an open descriptor and a live stat buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_mode, st.st_uid))
}

/// The SDK directory must be searchable and its binary a regular file
/// executable by every session user (they are neither its owner nor its
/// group).
pub fn check_sdk_modes(shared_path: &str, dir_mode: u32, bin_mode: u32) -> Result<(), String> {
    let bin = socket_proto::sdk::SDK_BINARY;
    if dir_mode & libc::S_IXOTH == 0 {
        return Err(format!(
            "shared/{shared_path} (mode {:o}) is not searchable by others: the sessions could \
             not reach {bin}",
            dir_mode & 0o7777
        ));
    }
    if bin_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(format!("shared/{shared_path}/{bin} is not a regular file"));
    }
    if bin_mode & libc::S_IXOTH == 0 || bin_mode & libc::S_IROTH == 0 {
        return Err(format!(
            "shared/{shared_path}/{bin} (mode {:o}) is not readable and executable by others: \
             the sessions could not run it",
            bin_mode & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
pub mod tests_support {
    /// A tmpfs at `at`: a stand-in for the virtio-fs share that supports
    /// idmapped mounts as 6.12's virtiofs does.
    pub fn mount_tmpfs(at: &std::path::Path) {
        super::sys_mount("coworkvm-test-share", at, Some("tmpfs"), 0, "mode=0755").unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mount_names_are_bounded_relative_paths() {
        for good in ["outputs", ".claude/skills", "a/b/c/d/e/f/g/h", "ünï", "a.b"] {
            assert!(validate_mount_name(good).is_ok(), "{good:?}");
        }
        assert!(validate_mount_name(&"n".repeat(255)).is_ok());
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            ".",
            "..",
            "a/../b",
            "a/./b",
            "../x",
            "a\0b",
            "a/b/c/d/e/f/g/h/i",
        ] {
            assert!(validate_mount_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_mount_name(&"n".repeat(256)).is_err());
    }

    #[test]
    fn share_paths_stay_inside_the_share() {
        for good in ["home/u/work", "home/u/.config/Claude/sdk/2.1", "x"] {
            assert!(validate_share_path(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "/home/u",
            "home/../etc",
            "..",
            "home/u/",
            "home//u",
            "./home",
            "a\0b",
        ] {
            assert!(validate_share_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_share_path(&"a/".repeat(2048)).is_err());
        assert!(validate_share_path(&"a".repeat(4097)).is_err());
    }

    #[test]
    fn additional_mounts_are_parsed_parents_first_and_failures_named() {
        let v = json!({
            "a/b": {"path": "home/u/w/b", "mode": "ro"},
            "a": {"path": "home/u/w", "mode": "rw"},
            "z": {"path": "home/u/z", "mode": "rwd"},
            "bad/../name": {"path": "home/u", "mode": "rw"},
            "escape": {"path": "../etc", "mode": "rw"},
            "abs": {"path": "/etc", "mode": "ro"},
            "nomode": {"path": "home/u"},
            "badmode": {"path": "home/u", "mode": "rwx"},
            "notobj": "home/u",
        });
        let (grants, failed) = parse_additional_mounts(Some(&v));
        let names: Vec<&str> = grants.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["a", "z", "a/b"]);
        assert_eq!(grants[0].mode, MountMode::Rw);
        assert_eq!(grants[1].mode, MountMode::Rwd);
        assert_eq!(grants[2].mode, MountMode::Ro);
        let mut f: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
        f.sort();
        assert_eq!(
            f,
            [
                "abs",
                "bad/../name",
                "badmode",
                "escape",
                "nomode",
                "notobj"
            ]
        );
        assert_eq!(parse_additional_mounts(None).0, []);
        assert!(parse_additional_mounts(Some(&Value::Null)).1.is_empty());
        // A list is not the forwarded shape: each entry fails by name.
        let (g, f) = parse_additional_mounts(Some(&json!([{"mountName": "x"}, {}])));
        assert!(g.is_empty());
        let f: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(f, ["x", "1"]);
    }

    #[test]
    fn more_than_64_mounts_all_fail() {
        let mut m = serde_json::Map::new();
        for i in 0..=MAX_MOUNTS {
            m.insert(format!("m{i}"), json!({"path": "home/u", "mode": "ro"}));
        }
        let (g, f) = parse_additional_mounts(Some(&Value::Object(m)));
        assert!(g.is_empty());
        assert_eq!(f.len(), MAX_MOUNTS + 1);
        assert!(f[0].1.to_string().contains("at most 64"), "{}", f[0].1);
    }

    #[test]
    fn sdk_modes_must_let_every_session_run_it() {
        let reg = libc::S_IFREG;
        assert!(check_sdk_modes("p", 0o40755, reg | 0o755).is_ok());
        assert!(check_sdk_modes("p", 0o40700, reg | 0o755)
            .unwrap_err()
            .contains("not searchable"));
        assert!(check_sdk_modes("p", 0o40755, reg | 0o750)
            .unwrap_err()
            .contains("executable by others"));
        assert!(check_sdk_modes("p", 0o40755, libc::S_IFDIR | 0o755)
            .unwrap_err()
            .contains("not a regular file"));
    }

    /// As root, in a mount namespace of this test's thread: where the
    /// kernel refuses idmapped binds the grant is a plain one (the host
    /// user's files show as SHARE_OWNER_ID), read-only when asked; the
    /// tree stays while its session runs and is detached after.
    #[test]
    fn plain_binds_without_idmap_and_release() {
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            coworkvm_tests::skip_or_fail("the share bind test: not root");
            return;
        }
        // SAFETY: unshare and mount with constant arguments.
        let private = unsafe {
            libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
        };
        if !private {
            coworkvm_tests::skip_or_fail("the share bind test: no private mount namespace");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("share");
        std::fs::create_dir(&root).unwrap();
        tests_support::mount_tmpfs(&root);
        std::fs::create_dir_all(root.join("shared/h/w")).unwrap();
        std::fs::write(root.join("shared/h/w/f"), "x").unwrap();
        std::os::unix::fs::lchown(
            root.join("shared/h/w/f"),
            Some(guest::SHARE_OWNER_ID),
            Some(guest::SHARE_OWNER_ID),
        )
        .unwrap();
        let share = Share::open(&root, &d.path().join("run")).unwrap();
        share.no_idmap.store(true, Ordering::Relaxed);
        let g = |name: &str, mode| Grant {
            name: name.into(),
            path: "h/w".into(),
            mode,
        };
        let (tree, failed) = share.mount_grants(
            "s",
            1234,
            &[g("rw", MountMode::Rw), g("a/ro", MountMode::Ro)],
        );
        let tree = tree.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(tree.join("rw/f")).unwrap();
        assert_eq!(md.uid(), guest::SHARE_OWNER_ID);
        std::fs::write(tree.join("rw/new"), "y").unwrap();
        let e = std::fs::write(tree.join("a/ro/new2"), "y").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        // The same grant again is fine; another under its name is not.
        let (_, failed) = share.mount_grants("s", 1234, &[g("rw", MountMode::Rw)]);
        assert!(failed.is_empty());
        let (_, failed) = share.mount_grants("s", 1234, &[g("rw", MountMode::Ro)]);
        assert!(matches!(failed[..], [(_, ShareError::AlreadyMounted(_))]));
        // Running: kept. Idle: detached and removed.
        share.release("s", || HashSet::from(["s".to_owned()]));
        assert!(tree.join("rw/f").exists());
        share.release("s", HashSet::new);
        assert!(!tree.exists());
        assert!(!share.has_tree("s"));
        assert!(root.join("shared/h/w/new").exists());
    }

    #[test]
    fn a_virtiofs_device_is_found_by_its_id() {
        let d = tempfile::tempdir().unwrap();
        assert!(!device_present(d.path()));
        for (dev, id) in [("virtio0", "0x0002"), ("virtio1", "0x0013")] {
            std::fs::create_dir(d.path().join(dev)).unwrap();
            std::fs::write(d.path().join(dev).join("device"), format!("{id}\n")).unwrap();
        }
        assert!(!device_present(d.path()));
        std::fs::create_dir(d.path().join("virtio2")).unwrap();
        std::fs::write(d.path().join("virtio2/device"), "0x001a\n").unwrap();
        assert!(device_present(d.path()));
        assert!(!device_present(&d.path().join("nonexistent")));
    }
}
