//! PID 1 duties: the pseudo filesystems (cgroup2 included), kernel modules,
//! power-off.

use std::ffi::CString;
use std::path::Path;

fn mount(source: &str, target: &str, fstype: &str, data: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (src, tgt, fs, d) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            0,
            d.as_ptr() as *const libc::c_void,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("coworkvm-agent: mount {target}: {e}");
        }
    }
}

pub fn mount_pseudo_filesystems() {
    mount("proc", "/proc", "proc", "");
    mount("sysfs", "/sys", "sysfs", "");
    mount("devtmpfs", "/dev", "devtmpfs", "");
    mount("tmpfs", "/tmp", "tmpfs", "mode=1777");
    mount("tmpfs", "/run", "tmpfs", "mode=0755");
}

/// User namespaces each uid may hold at once, everywhere below the
/// guest's initial namespace (`user.max_user_namespaces`).
///
/// Sessions may make user namespaces of their own (Claude Code's Bash-tool
/// sandbox is a nested bwrap), so the session sandbox no longer passes
/// `--disable-userns`. The kernel counts each namespace against its
/// creator's uid in every ancestor namespace up to this one, and every
/// session is its own uid, so this one number bounds each session's
/// nesting (its own sandbox included) without touching the others. The
/// agent's own idmapped-mount namespaces count against root's.
pub const USER_NAMESPACES_PER_UID: u32 = 128;

/// Sets [`USER_NAMESPACES_PER_UID`]. A kernel without the knob (user
/// namespaces built out) has nothing to bound.
pub fn bound_user_namespaces() {
    let knob = "/proc/sys/user/max_user_namespaces";
    if let Err(e) = std::fs::write(knob, USER_NAMESPACES_PER_UID.to_string()) {
        eprintln!("coworkvm-agent: {knob}: {e}");
    }
}

/// cgroup2 at `target` (`/sys/fs/cgroup`), for the per-session groups
/// (`crate::cgroup`). `nsdelegate`: a cgroup namespace is a delegation
/// boundary, so nothing inside a sandbox's namespace can write to the
/// interface files of its own group even where ownership would allow it.
pub fn mount_cgroup2(target: &str) {
    mount("cgroup2", target, "cgroup2", "nsdelegate");
}

/// `oom_score_adj` -1000 for the agent. The kernel never OOM-kills the
/// global init anyway (`oom_unkillable_task`); this says so explicitly and
/// holds should the agent ever run under another init. Children inherit
/// it: every spawn resets its own to 0 (`crate::sandbox::reset_oom_score_adj`).
pub fn protect_from_oom() {
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        eprintln!("coworkvm-agent: oom_score_adj: {e}");
    }
}

/// Loads `/lib/modules/<release>/load-order` (dependencies first) with
/// finit_module; a module already built in or loaded is fine.
pub fn load_modules() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = Path::new("/lib/modules").join(release.trim());
    let Ok(order) = std::fs::read_to_string(dir.join("load-order")) else {
        return;
    };
    for rel in order.lines().filter(|l| !l.trim().is_empty()) {
        let path = dir.join(rel.trim());
        let Ok(f) = std::fs::File::open(&path) else {
            eprintln!("coworkvm-agent: missing module {}", path.display());
            continue;
        };
        use std::os::fd::AsRawFd;
        let params = CString::default();
        // SAFETY: finit_module takes an open fd, a NUL-terminated parameter
        // string that outlives the call, and flags.
        let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                eprintln!("coworkvm-agent: loading {}: {e}", path.display());
            }
        }
    }
}

/// Flushes everything and powers the VM off; never returns.
pub fn power_off() -> ! {
    // SAFETY: sync(2) and reboot(2) take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    std::process::exit(0)
}
