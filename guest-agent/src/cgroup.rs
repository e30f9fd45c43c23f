//! One cgroup (v2) per session, so that no session can starve the agent
//! (PID 1) or the other sessions of processes or memory.
//!
//! ```text
//! /sys/fs/cgroup/                     the agent (root cgroup; +pids +memory delegated)
//! └── sessions/                       pids.max, memory.max: all sessions together
//!     └── cowork<uid>/                pids.max, memory.max: one session
//! ```
//!
//! The group is named after the session's user, not its name: session
//! names are free text (`memory.max` is a valid one) and cgroupfs reserves
//! the names of its interface files. The sandbox's outer bwrap enters the
//! group before it drops root (see `crate::sandbox::command`), so every
//! process of the session, bwrap's own included, is counted; bwrap then
//! unshares the cgroup namespace, and the session sees its group as `/`.
//! Everything here is owned by root: the session can read its limits and
//! change none of them, nor leave its group.
//!
//! The limits: `pids.max` is a fixed per-session count (threads count too);
//! `memory.max` is a share of the VM's memory, so one session is OOM-killed
//! inside its own group before the VM runs dry, and all sessions together
//! leave a reserve for the agent, whose `oom_score_adj` is -1000 besides.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::sessions::user_name;

/// Where the agent mounts cgroup2.
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// The parent of every session's group, below the root.
pub const SESSIONS_GROUP: &str = "sessions";
/// Processes and threads one session may have at once.
pub const SESSION_PIDS_MAX: u64 = 1024;
/// Processes and threads all sessions together may have at once (further
/// capped by the kernel's `threads-max`, see `Limits::for_machine`).
pub const ALL_SESSIONS_PIDS_MAX: u64 = 8192;
/// One session's share of the VM's memory, in percent.
pub const SESSION_MEMORY_PERCENT: u64 = 75;
/// All sessions' share together, in percent: the rest is the agent's.
pub const ALL_SESSIONS_MEMORY_PERCENT: u64 = 90;
/// The controllers the agent delegates to the session groups.
pub const CONTROLLERS: [&str; 2] = ["pids", "memory"];
/// statfs(2)'s f_type of a cgroup2 mount.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(transparent)]
    Io(#[from] crate::IoError),
    #[error("no cgroup2 filesystem is mounted at {}", .0.display())]
    NotMounted(PathBuf),
    #[error("the {controller} controller is not available (cgroup.controllers: {available:?})")]
    MissingController {
        controller: &'static str,
        available: String,
    },
    #[error("/proc/meminfo has no MemTotal")]
    NoMemTotal,
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |e| CgroupError::Io(crate::io_at(path.display())(e))
}

/// The limits written to the session groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `pids.max` of each `sessions/cowork<uid>`.
    pub session_pids: u64,
    /// `memory.max` of each `sessions/cowork<uid>`, bytes.
    pub session_memory: u64,
    /// `pids.max` of `sessions`.
    pub all_pids: u64,
    /// `memory.max` of `sessions`, bytes.
    pub all_memory: u64,
}

/// Rounded down to whole 4 KiB pages, as the kernel keeps it anyway.
fn percent_of(total: u64, percent: u64) -> u64 {
    let v = (total as u128 * percent as u128 / 100) as u64;
    v & !0xfff
}

impl Limits {
    /// The limits for a VM with `mem_total` bytes of memory whose kernel
    /// allows `threads_max` threads in all (`/proc/sys/kernel/threads-max`).
    pub fn for_machine(mem_total: u64, threads_max: Option<u64>) -> Self {
        // Leave a quarter of the kernel's threads to the agent and the
        // kernel: a thread bomb spread over sessions must not reach it.
        let all_pids = threads_max
            .map_or(ALL_SESSIONS_PIDS_MAX, |t| {
                ALL_SESSIONS_PIDS_MAX.min(t / 4 * 3)
            })
            .max(1);
        Limits {
            session_pids: SESSION_PIDS_MAX.min(all_pids),
            session_memory: percent_of(mem_total, SESSION_MEMORY_PERCENT),
            all_pids,
            all_memory: percent_of(mem_total, ALL_SESSIONS_MEMORY_PERCENT),
        }
    }
}

/// MemTotal of `/proc/meminfo`, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Whether `path` is a cgroup2 mount.
pub fn is_cgroup2(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs only writes into `st`, a zeroed struct of the right
    // type, and reads the NUL-terminated path, which outlives the call.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    use std::io::Write;
    // One write(2) per value: cgroupfs takes each write as one command.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_at(path))?;
    f.write_all(value.as_bytes()).map_err(io_at(path))
}

/// Writes `+controller` for each of `CONTROLLERS` into `dir`'s
/// `cgroup.subtree_control`, after checking that `dir` has them.
fn delegate(dir: &Path) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.controllers");
    let available = std::fs::read_to_string(&path).map_err(io_at(&path))?;
    for controller in CONTROLLERS {
        if !available.split_whitespace().any(|c| c == controller) {
            return Err(CgroupError::MissingController {
                controller,
                available: available.trim().to_owned(),
            });
        }
    }
    let control = dir.join("cgroup.subtree_control");
    for controller in CONTROLLERS {
        write_file(&control, &format!("+{controller}"))?;
    }
    Ok(())
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io_at(dir)(e)),
        _ => Ok(()),
    }
}

/// The session groups below one cgroup2 root.
#[derive(Debug)]
pub struct SessionCgroups {
    root: PathBuf,
    /// Always set in the guest; `None` only for the sandbox tests on a
    /// host whose cgroup2 hierarchy has no controllers to limit with.
    limits: Option<Limits>,
}

impl SessionCgroups {
    /// Delegates the controllers from `root` to `root/sessions` and from
    /// there to the session groups, and writes the limits of `sessions`.
    pub fn setup(root: &Path, limits: Limits) -> Result<Self, CgroupError> {
        delegate(root)?;
        let sessions = root.join(SESSIONS_GROUP);
        make_dir(&sessions)?;
        write_file(&sessions.join("pids.max"), &limits.all_pids.to_string())?;
        write_file(&sessions.join("memory.max"), &limits.all_memory.to_string())?;
        delegate(&sessions)?;
        Ok(SessionCgroups {
            root: root.to_owned(),
            limits: Some(limits),
        })
    }

    /// Session groups below `root` with no limits written: for testing
    /// the move into the group on a host without the controllers.
    #[cfg(test)]
    pub fn without_limits(root: &Path) -> Result<Self, CgroupError> {
        make_dir(&root.join(SESSIONS_GROUP))?;
        Ok(SessionCgroups {
            root: root.to_owned(),
            limits: None,
        })
    }

    /// The guest's: cgroup2 mounted at `/sys/fs/cgroup` (by the agent when
    /// nothing is there yet), the limits from the VM's memory.
    pub fn for_guest() -> Result<Self, CgroupError> {
        let root = Path::new(CGROUP_MOUNT);
        if !is_cgroup2(root) {
            crate::init::mount_cgroup2(CGROUP_MOUNT);
            if !is_cgroup2(root) {
                return Err(CgroupError::NotMounted(root.to_owned()));
            }
        }
        let meminfo = Path::new("/proc/meminfo");
        let text = std::fs::read_to_string(meminfo).map_err(io_at(meminfo))?;
        let mem_total = parse_mem_total(&text).ok_or(CgroupError::NoMemTotal)?;
        let threads_max = std::fs::read_to_string("/proc/sys/kernel/threads-max")
            .ok()
            .and_then(|t| t.trim().parse().ok());
        Self::setup(root, Limits::for_machine(mem_total, threads_max))
    }

    pub fn limits(&self) -> Option<Limits> {
        self.limits
    }

    /// `sessions/cowork<uid>` below the root.
    pub fn group_dir(&self, uid: u32) -> PathBuf {
        self.root.join(SESSIONS_GROUP).join(user_name(uid))
    }

    /// Makes (or reuses) the session's group, writes its limits, and opens
    /// its `cgroup.procs` for writing: the spawn's child writes "0" to it
    /// before exec to move itself in (no allocation after fork).
    pub fn enter_fd(&self, uid: u32) -> Result<OwnedFd, CgroupError> {
        let dir = self.group_dir(uid);
        make_dir(&dir)?;
        if let Some(limits) = &self.limits {
            write_file(&dir.join("pids.max"), &limits.session_pids.to_string())?;
            write_file(&dir.join("memory.max"), &limits.session_memory.to_string())?;
        }
        let procs = dir.join("cgroup.procs");
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&procs)
            .map_err(io_at(&procs))?;
        Ok(f.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn limits_follow_the_vm() {
        let l = Limits::for_machine(4 * GIB, Some(31_000));
        assert_eq!(l.session_pids, SESSION_PIDS_MAX);
        assert_eq!(l.all_pids, ALL_SESSIONS_PIDS_MAX);
        assert_eq!(l.session_memory, 3 * GIB);
        assert_eq!(l.all_memory, percent_of(4 * GIB, 90));
        assert!(l.session_memory < l.all_memory && l.all_memory < 4 * GIB);
        // A small VM: the kernel's thread limit wins.
        let l = Limits::for_machine(512 << 20, Some(3_000));
        assert_eq!(l.all_pids, 2_250);
        assert_eq!(l.session_pids, SESSION_PIDS_MAX);
        let l = Limits::for_machine(512 << 20, Some(1_000));
        assert_eq!((l.all_pids, l.session_pids), (750, 750));
        // Never 0 ("max" is not a number either way).
        assert_eq!(Limits::for_machine(0, Some(0)).all_pids, 1);
        // Page aligned.
        let l = Limits::for_machine(1_000_000_007, None);
        assert_eq!(l.session_memory % 4096, 0);
        assert_eq!(l.all_pids, ALL_SESSIONS_PIDS_MAX);
        // No overflow for absurd sizes.
        let l = Limits::for_machine(u64::MAX, None);
        assert!(l.session_memory > 0 && l.session_memory < l.all_memory);
    }

    #[test]
    fn mem_total_from_meminfo() {
        let m = "MemTotal:        2030036 kB\nMemFree:          100 kB\n";
        assert_eq!(parse_mem_total(m), Some(2_030_036 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: x kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 1 MB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 99999999999999999999 kB\n"), None);
    }

    /// The interface files cgroupfs would show in a new group.
    fn fake_group(dir: &Path, controllers: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
        for f in [
            "cgroup.subtree_control",
            "cgroup.procs",
            "pids.max",
            "memory.max",
        ] {
            std::fs::write(dir.join(f), "").unwrap();
        }
    }

    fn fake_root(controllers: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fake_group(d.path(), controllers);
        fake_group(&d.path().join(SESSIONS_GROUP), "pids memory\n");
        d
    }

    #[test]
    fn setup_delegates_and_limits() {
        let d = fake_root("cpuset cpu io memory hugetlb pids rdma misc\n");
        let limits = Limits::for_machine(2 * GIB, None);
        let cg = SessionCgroups::setup(d.path(), limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(d.path().join(p)).unwrap();
        // Each controller in its own write; the file keeps the last one here.
        assert_eq!(read("cgroup.subtree_control"), "+memory");
        assert_eq!(read("sessions/pids.max"), ALL_SESSIONS_PIDS_MAX.to_string());
        assert_eq!(read("sessions/memory.max"), limits.all_memory.to_string());
        assert_eq!(read("sessions/cgroup.subtree_control"), "+memory");

        assert_eq!(cg.group_dir(1001), d.path().join("sessions/cowork1001"));
        fake_group(&cg.group_dir(1001), "pids memory\n");
        let fd = cg.enter_fd(1001).unwrap();
        assert_eq!(read("sessions/cowork1001/pids.max"), "1024");
        assert_eq!(
            read("sessions/cowork1001/memory.max"),
            limits.session_memory.to_string()
        );
        // The fd is the group's cgroup.procs, open for writing.
        let mut f = std::fs::File::from(fd);
        use std::io::Write;
        f.write_all(b"0").unwrap();
        assert_eq!(read("sessions/cowork1001/cgroup.procs"), "0");
        // Again: the group is reused.
        cg.enter_fd(1001).unwrap();
    }

    #[test]
    fn a_missing_controller_is_an_error() {
        let d = fake_root("cpu io memory\n");
        let e = SessionCgroups::setup(d.path(), Limits::for_machine(GIB, None)).unwrap_err();
        assert!(
            e.to_string()
                .contains("the pids controller is not available"),
            "{e}"
        );
        let e = SessionCgroups::setup(Path::new("/nonexistent/cg"), Limits::for_machine(GIB, None))
            .unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/cg/cgroup.controllers"),
            "{e}"
        );
    }
}
