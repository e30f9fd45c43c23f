//! The VMM's sandbox: `coworkvm boot` confines itself once every file it
//! needs is open and before the guest runs its first instruction.
//!
//! The VMM is the process a guest attacks: a bug in a device model (virtio
//! queue parsing, the vsock muxer, the UART) gives the guest code
//! execution with the VMM's privileges, which are the user's. Each layer
//! below takes away part of what such an attacker would gain; none relies
//! on another.
//!
//! 1. **no_new_privs** (`PR_SET_NO_NEW_PRIVS`): no execve can gain
//!    privileges (set-uid binaries, file capabilities). Required for the
//!    unprivileged seccomp and Landlock below.
//! 2. **Not dumpable** (`PR_SET_DUMPABLE 0`): other processes of the user
//!    cannot ptrace the VMM or read its memory (`/proc/PID/mem`), which
//!    holds the guest's memory; no core file spills it to disk.
//! 3. **Resource limits**: `RLIMIT_NOFILE` [`MAX_OPEN_FILES`] (the vsock
//!    muxer's 1024 connections plus the VMM's own descriptors), so a guest
//!    cannot exhaust the user's descriptors; `RLIMIT_CORE` 0;
//!    `RLIMIT_FSIZE` the size of the largest disk image or the console
//!    bound, whichever is larger, so the VMM cannot grow any file beyond
//!    what it legitimately writes (a write past it fails with EFBIG;
//!    SIGXFSZ is ignored so that is an I/O error for the guest, not a
//!    crash). FSIZE cannot be lower: it applies to writes into the disk
//!    images too, and a 10 GiB session disk is written near its end.
//! 4. **Namespaces** (best effort: unprivileged user namespaces may be
//!    disabled): new user, mount, network and IPC namespaces. The network
//!    namespace has no interfaces, so even with a socket the VMM reaches
//!    no network and no abstract Unix socket of the host (D-Bus, X11);
//!    pathname Unix sockets are still reached through the file system,
//!    which the vsock muxer needs for `<uds>_PORT`. All capabilities are
//!    dropped afterwards.
//! 5. **Landlock** (best effort up to the kernel's ABI): the VMM may open,
//!    create, remove or execute no file at all; its disks, console,
//!    `/dev/kvm` and `/dev/urandom` are already open. The one grant is
//!    connecting to Unix sockets under the vsock socket's directory (only
//!    enforced from ABI 9, which added that right; older ABIs do not
//!    restrict `connect` to pathname sockets at all). From ABI 4 no TCP
//!    bind or connect, from ABI 6 no abstract Unix sockets and no signals
//!    to processes outside the sandbox. This is what keeps `~/.ssh` out of
//!    reach even of a syscall the seccomp lists allow.
//! 6. **seccomp**, per thread kind ([`seccomp`]): each thread may make only
//!    the syscalls its code makes, with the ioctl of a vCPU limited to
//!    KVM_RUN, sockets limited to AF_UNIX in the vsock worker, vhost-user
//!    messages (sendmsg/recvmsg on the socket connected before the
//!    sandbox) only in the virtio-fs worker, no executable memory, no
//!    execve, no open. A forbidden syscall ends the
//!    VMM with a line naming it and exit status
//!    [`seccomp::SECCOMP_KILL_STATUS`] (159).
//!
//! 7. **chroot** into the vsock socket's directory (in the new user
//!    namespace, before the capabilities go): the VMM can name no file
//!    outside it, so before Landlock ABI 9 it still cannot `connect()` to
//!    the helper's socket or any other Unix socket of the user's.
//!
//! What it does not cover: a guest that takes over the VMM still has the
//! VMM's open files (its disks read-write, the console, KVM) and the
//! sockets in its vsock directory; with a virtio-fs device, guest RAM is a
//! memfd that virtiofsd maps too (a separate process with its own
//! sandbox), and the VMM holds the vhost-user socket to it;
//! the filters are per thread but the threads share one address space, so
//! code execution in one thread can in principle borrow another's
//! allowances. `coworkvm boot --no-sandbox` turns all of this off, for
//! debugging only.

pub mod probe;
pub mod seccomp;
pub mod spawner;
mod syscall_names;

use std::io;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, ABI,
};

/// `RLIMIT_NOFILE` of a sandboxed VMM: the vsock muxer's 1024 connections
/// and its pending handshakes, plus the VMM's own descriptors (KVM, vCPUs,
/// eventfds, disks, console, epoll sets): about 60 for 32 vCPUs.
pub const MAX_OPEN_FILES: u64 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}: {1}")]
    Sys(&'static str, io::Error),
    #[error("the VMM is multi-threaded before its sandbox is set up")]
    Threads,
    #[error("Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("Landlock: cannot open the vsock directory {0}: {1}")]
    LandlockPath(PathBuf, landlock::PathFdError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("starting the device-worker spawner: {0}")]
    Spawner(io::Error),
}

/// What the process-wide layers need to know.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Where the vsock muxer connects to `<uds>_PORT`: the directory of
    /// the `--vsock` socket.
    pub vsock_dir: Option<PathBuf>,
    /// `RLIMIT_FSIZE`: the largest file the VMM legitimately writes.
    pub max_file_size: u64,
    /// `RLIMIT_NOFILE`.
    pub max_open_files: u64,
}

impl Policy {
    /// The policy for a VMM with the vsock socket at `uds` (if any) whose
    /// largest written file is `max_file_size` bytes.
    pub fn new(uds: Option<&Path>, max_file_size: u64) -> Self {
        let vsock_dir = uds.map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        });
        Self {
            vsock_dir,
            max_file_size,
            max_open_files: MAX_OPEN_FILES,
        }
    }
}

/// What the process-wide layers achieved on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The namespaces entered, e.g. "user,mnt,net,ipc"; empty if none.
    pub namespaces: String,
    /// Why namespaces were not entered, if they were not.
    pub namespace_error: Option<String>,
    /// The Landlock ABI the kernel offers (0: none) and how the ruleset was enforced.
    pub landlock_abi: i32,
    pub landlock: &'static str,
    /// Whether the process's root is now the vsock directory; why not, if
    /// it had one and is not.
    pub chroot: bool,
    pub chroot_error: Option<String>,
}

/// Makes the vsock socket's directory the working directory and returns
/// the socket's name relative to it. The vsock device binds that name and
/// dials `<name>_PORT` by it, which stays valid once [`apply_process`]
/// makes the directory the process's root.
pub fn enter_vsock_dir(uds: &Path) -> io::Result<PathBuf> {
    let name = uds.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: the vsock socket path has no file name", uds.display()),
        )
    })?;
    if let Some(dir) = uds.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::env::set_current_dir(dir)?;
    }
    Ok(PathBuf::from(name))
}

/// Makes `dir` the process's root and working directory. A VMM taken over
/// can then name no file outside it: not the user's home, not the helper's
/// socket (which Landlock below ABI 9 would let it `connect()` to).
/// Needs `CAP_SYS_CHROOT`, which the process has in its new user namespace
/// (or as root); the capabilities are dropped right after.
fn chroot_into(dir: &Path) -> io::Result<()> {
    std::env::set_current_dir(dir)?;
    // SAFETY: chroot reads one NUL-terminated path that outlives the call.
    if unsafe { libc::chroot(c".".as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

fn check(what: &'static str, rc: libc::c_int) -> Result<(), SandboxError> {
    if rc < 0 {
        Err(SandboxError::Sys(what, io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    what: &'static str,
    value: u64,
) -> Result<(), SandboxError> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `cur`, which is valid.
    check(what, unsafe { libc::getrlimit(resource, &mut cur) })?;
    // Never raise a limit: only lower it to `value`.
    let max = cur.rlim_max.min(value);
    let lim = libc::rlimit {
        rlim_cur: max,
        rlim_max: max,
    };
    // SAFETY: setrlimit reads one valid rlimit.
    check(what, unsafe { libc::setrlimit(resource, &lim) })
}

/// Threads of this process, from `/proc/self/status`.
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Enters new user, mount, network and IPC namespaces, or (root without a
/// user namespace) the latter three; says which, or why none.
fn enter_namespaces() -> Result<Result<&'static str, String>, SandboxError> {
    let others = libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
    // SAFETY: geteuid/getegid take nothing and cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // SAFETY: unshare takes flags only; on success the calling (only)
    // thread is in the new namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | others) } == 0 {
        // Past this point the process is in the namespace: an unmapped one
        // must not go on (see `map_own_ids`).
        map_own_ids(uid, gid)
            .map_err(|e| SandboxError::Sys("mapping the user namespace's ids", e))?;
        return Ok(Ok("user,mnt,net,ipc"));
    }
    let with_user = io::Error::last_os_error();
    // SAFETY: as above.
    if unsafe { libc::unshare(others) } == 0 {
        return Ok(Ok("mnt,net,ipc"));
    }
    Ok(Err(format!(
        "unshare: {with_user} (with a user namespace), {} (without)",
        io::Error::last_os_error()
    )))
}

/// Maps the VMM's own uid and gid 1:1 into its new user namespace.
/// Unmapped, the VMM would see itself and every peer as the overflow uid,
/// and the vsock listener's `SO_PEERCRED` check (its own user only) would
/// let every host user in.
fn map_own_ids(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))
}

/// Drops every capability (in the new user namespace, or root's).
fn drop_capabilities() -> Result<(), SandboxError> {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a v3 header and two data structs, both valid
    // and laid out as the kernel expects.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check("capset", rc as libc::c_int)
}

fn landlock(policy: &Policy) -> Result<(i32, &'static str), SandboxError> {
    // The newest ABI whose rights this code was written for; the crate
    // drops what the running kernel lacks (best effort).
    let fs = AccessFs::from_all(ABI::V9);
    let ruleset = Ruleset::default()
        .handle_access(fs)?
        .handle_access(AccessNet::from_all(ABI::V4))?
        .scope(Scope::from_all(ABI::V6))?
        .create()?;
    let ruleset = match &policy.vsock_dir {
        Some(dir) => {
            let fd = PathFd::new(dir).map_err(|e| SandboxError::LandlockPath(dir.clone(), e))?;
            ruleset.add_rule(PathBeneath::new(fd, AccessFs::ResolveUnix))?
        }
        None => ruleset,
    };
    let status = ruleset.restrict_self()?;
    let how = match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced (older ABI)",
        RulesetStatus::NotEnforced => "not enforced (no Landlock in this kernel)",
    };
    Ok((landlock_abi(), how))
}

/// The kernel's Landlock ABI version, 0 if none.
pub fn landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with a null attribute, size 0 and the VERSION flag the call
    // only returns the ABI version (or an error); it touches no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0) as i32
}

/// Applies the process-wide layers (1-5 of the module comment) and
/// installs the SIGSYS handler. Must run while the process has one
/// thread (user namespaces require it), after every file is open.
pub fn apply_process(policy: &Policy) -> Result<Applied, SandboxError> {
    if thread_count().is_some_and(|n| n > 1) {
        return Err(SandboxError::Threads);
    }
    seccomp::install_sigsys_handler()?;
    // SAFETY: prctl with integer arguments only.
    check("PR_SET_NO_NEW_PRIVS", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    set_rlimit(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", policy.max_open_files)?;
    set_rlimit(libc::RLIMIT_FSIZE, "RLIMIT_FSIZE", policy.max_file_size)?;
    set_rlimit(libc::RLIMIT_CORE, "RLIMIT_CORE", 0)?;
    // SAFETY: setting SIGXFSZ to SIG_IGN installs no handler code.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(SandboxError::Sys(
            "ignoring SIGXFSZ",
            io::Error::last_os_error(),
        ));
    }
    let (namespaces, namespace_error) = match enter_namespaces()? {
        Ok(ns) => (ns.to_string(), None),
        Err(e) => (String::new(), Some(e)),
    };
    // A panic's backtrace would open /proc/self/exe, which the filters
    // forbid: the kill would then name openat and hide the panic's text.
    // Single-threaded here, so changing the environment is sound.
    std::env::set_var("RUST_BACKTRACE", "0");
    let (chroot, chroot_error) = match &policy.vsock_dir {
        Some(dir) => match chroot_into(dir) {
            Ok(()) => (true, None),
            Err(e) => (false, Some(format!("chroot to {}: {e}", dir.display()))),
        },
        None => (false, None),
    };
    drop_capabilities()?;
    // After the namespaces: entering a user namespace resets dumpable.
    // SAFETY: prctl with integer arguments only.
    check("PR_SET_DUMPABLE", unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)
    })?;
    // Inside the chroot the vsock directory is the root.
    let landlock_policy = if chroot {
        Policy {
            vsock_dir: Some(PathBuf::from("/")),
            ..policy.clone()
        }
    } else {
        policy.clone()
    };
    let (landlock_abi, landlock) = landlock(&landlock_policy)?;
    Ok(Applied {
        namespaces,
        namespace_error,
        landlock_abi,
        landlock,
        chroot,
        chroot_error,
    })
}

/// A sandbox in force: the compiled per-thread filters, the spawner
/// running. Created by [`enter`]; the caller installs the vCPU filter in
/// each vCPU thread and the main filter in the main thread, last.
pub struct Sandbox {
    pub filters: seccomp::Filters,
    pub applied: Applied,
}

/// Compiles the filters, applies the process-wide layers and starts the
/// device-worker spawner.
pub fn enter(policy: &Policy) -> Result<Sandbox, SandboxError> {
    let filters = seccomp::Filters::compile()?;
    let applied = apply_process(policy)?;
    spawner::start(filters.clone()).map_err(SandboxError::Spawner)?;
    tracing::info!(
        namespaces = %applied.namespaces,
        landlock_abi = applied.landlock_abi,
        landlock = applied.landlock,
        chroot = applied.chroot,
        "the VMM is sandboxed"
    );
    if let Some(e) = &applied.namespace_error {
        tracing::warn!("the VMM runs without its own namespaces: {e}");
    }
    if let Some(e) = &applied.chroot_error {
        tracing::warn!("the VMM keeps the host's file system as its root: {e}");
    }
    Ok(Sandbox { filters, applied })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_dir_is_the_sockets_directory() {
        let p = Policy::new(Some(Path::new("/run/u/vm/v.sock")), 1 << 30);
        assert_eq!(p.vsock_dir.as_deref(), Some(Path::new("/run/u/vm")));
        let p = Policy::new(Some(Path::new("v.sock")), 1 << 30);
        assert_eq!(p.vsock_dir.as_deref(), Some(Path::new(".")));
        assert_eq!(Policy::new(None, 1).vsock_dir, None);
        assert_eq!(Policy::new(None, 1).max_open_files, MAX_OPEN_FILES);
    }
}
