//! `coworkvm doctor`: one PASS/WARN/FAIL line per check, in the style of
//! libvirt's `virt-host-validate`, each failing line with its fix. A FAIL
//! of a check that coworkvm needs to run a VM makes the exit status
//! non-zero; with `--client`, so does a FAIL of the desktop client's own
//! probe (which refuses to start any helper when it fails).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use coworkvm_helper::virtiofsd::{version_string, Resolution, HOW_TO_GET, MIN_VERSION};
use coworkvm_vmm::doctor::{DoctorReport, BOOTABLE_MIPS};
use serde::{Deserialize, Serialize};

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Fine.
    Pass,
    /// Works, with less (no shared folders, a weaker sandbox, ...).
    Warn,
    /// Does not work.
    Fail,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

/// Who a check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// coworkvm itself: a FAIL means it cannot run a VM here.
    Coworkvm,
    /// coworkvm runs VMs without it (a FAIL is advice).
    Optional,
    /// The desktop client's own probe (`--client`).
    Client,
}

/// One check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// A stable name for scripts.
    pub id: String,
    /// What is checked, as the line says it.
    pub name: String,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, on WARN and FAIL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    pub scope: Scope,
}

impl Check {
    fn new(id: &str, name: &str, scope: Scope, status: Status, detail: String) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            status,
            detail,
            fix: None,
            scope,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        if self.status != Status::Pass {
            self.fix = Some(fix.into());
        }
        self
    }

    /// `NAME : STATUS (detail)`, and `; fix: ...` on a WARN or FAIL.
    pub fn line(&self) -> String {
        let mut line = format!("{:<44}: {} ({})", self.name, self.status, self.detail);
        if let Some(fix) = &self.fix {
            line.push_str("; fix: ");
            line.push_str(fix);
        }
        line
    }
}

/// `coworkvm doctor --json`: one object. The KVM probe's fields stay at
/// the top level (the test rig reads `can_boot_linux`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    #[serde(flatten)]
    pub kvm: DoctorReport,
    /// The virtiofsd search: `{path, version, rejected}`.
    pub virtiofsd: serde_json::Value,
    pub checks: Vec<Check>,
    /// No FAIL among coworkvm's own checks.
    pub can_run_vms: bool,
    /// With `--client`: no FAIL among the client's checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ready: Option<bool>,
}

impl Report {
    /// The exit status: 0, or 1 when coworkvm cannot run a VM here (or,
    /// with `--client`, the client's probe would refuse this machine).
    pub fn exit_code(&self) -> u8 {
        u8::from(!self.can_run_vms || self.client_ready == Some(false))
    }
}

/// Where things are, for the checks (the real host's, or a test's).
pub struct Host {
    pub dev_kvm: PathBuf,
    pub dev_vhost_vsock: PathBuf,
    pub images_dir: PathBuf,
    pub bundle_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub socket: PathBuf,
    /// `$PATH`, for the client's `qemu-system-x86_64` search.
    pub path: Option<std::ffi::OsString>,
    /// `COWORK_NODE_PATH` (the community build's bwrap backend).
    pub cowork_node_path: Option<PathBuf>,
}

impl Host {
    /// This host, as `coworkvm serve` would see it.
    pub fn current() -> Self {
        Self {
            dev_kvm: "/dev/kvm".into(),
            dev_vhost_vsock: "/dev/vhost-vsock".into(),
            images_dir: coworkvm_bundle::Bundle::default_images_dir(),
            bundle_dir: coworkvm_bundle::Bundle::default_dir(),
            runtime_dir: std::env::var_os("XDG_RUNTIME_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
            socket: coworkvm_helper::default_socket_path(),
            path: std::env::var_os("PATH"),
            cowork_node_path: std::env::var_os("COWORK_NODE_PATH")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        }
    }
}

fn access(path: &Path, mode: libc::c_int) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access reads the NUL-terminated path and nothing else.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}

/// The group `gid`'s name, from /etc/group.
fn group_name(gid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next();
        (f.next()?.parse::<u32>().ok()? == gid).then(|| name.to_owned())
    })
}

/// Whether this process has `gid` among its groups.
fn in_group(gid: u32) -> bool {
    // SAFETY: getegid cannot fail.
    if unsafe { libc::getegid() } == gid {
        return true;
    }
    let mut groups = vec![0 as libc::gid_t; 1024];
    // SAFETY: getgroups writes at most `groups.len()` ids into the buffer.
    let n = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
    n > 0 && groups[..n as usize].contains(&gid)
}

/// How the user reaches a device node: read-write for everyone, through
/// its group, or through an ACL (logind's `uaccess` tag gives the seat's
/// user one).
fn device_access(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let group = group_name(meta.gid()).unwrap_or_else(|| meta.gid().to_string());
    if !access(path, libc::R_OK | libc::W_OK) {
        return Err(format!(
            "{} is mode {:o}, group {group}, and not read-write for this user",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    let mode = meta.permissions().mode();
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    Ok(if root {
        "as root".into()
    } else if mode & 0o006 == 0o006 {
        "read-write for every user".into()
    } else if mode & 0o060 == 0o060 && in_group(meta.gid()) {
        format!("through the {group} group")
    } else {
        "through an ACL (logind's uaccess for this seat's user)".into()
    })
}

/// `/dev/kvm` present and accessible.
fn kvm_device(host: &Host) -> Check {
    let name = "/dev/kvm present and accessible";
    if !host.dev_kvm.exists() {
        return Check::new(
            "kvm_device",
            name,
            Scope::Coworkvm,
            Status::Fail,
            format!("{} does not exist", host.dev_kvm.display()),
        )
        .fix(
            "enable virtualization (VT-x/AMD-V) in the firmware settings, then \
             `sudo modprobe kvm_intel` or `sudo modprobe kvm_amd`",
        );
    }
    match device_access(&host.dev_kvm) {
        Ok(how) => Check::new("kvm_device", name, Scope::Coworkvm, Status::Pass, how),
        Err(why) => Check::new("kvm_device", name, Scope::Coworkvm, Status::Fail, why).fix(
            "`sudo usermod -aG kvm $USER`, then log out and in again (or log in at the \
             seat, whose user logind's uaccess ACL lets in)",
        ),
    }
}

/// KVM can boot Linux: the ring-0 speed probe.
fn kvm_boot(report: &DoctorReport) -> Check {
    let name = "KVM can boot Linux";
    if !report.kvm_usable {
        return Check::new(
            "kvm_boot",
            name,
            Scope::Coworkvm,
            Status::Fail,
            report.verdict.clone(),
        )
        .fix("make /dev/kvm usable (see the line above); inside a VM, enable nested virtualization on its host");
    }
    let mips = report.ring0_mips.unwrap_or(0.0);
    if report.can_boot_linux {
        Check::new(
            "kvm_boot",
            name,
            Scope::Coworkvm,
            Status::Pass,
            format!("guest kernel code runs at {mips:.0} MIPS"),
        )
    } else {
        Check::new(
            "kvm_boot",
            name,
            Scope::Coworkvm,
            Status::Fail,
            format!(
                "guest kernel code runs at {mips:.1} MIPS (under {BOOTABLE_MIPS:.0}): KVM emulates \
                 it instruction by instruction, and Linux would take minutes to boot"
            ),
        )
        .fix(
            "run coworkvm on a host with hardware virtualization; inside a VM, have its host \
             expose VT-x/AMD-V to it (nested virtualization: kvm_intel nested=1 or \
             kvm_amd nested=1, and the CPU model passed through)",
        )
    }
}

/// The images and their manifest (sizes, not hashes: hashing gigabytes is
/// `coworkvm bundle prepare`'s job).
fn images(host: &Host) -> Check {
    let name = "coworkvm's images and their manifest";
    let dir = &host.images_dir;
    let fix = "install the coworkvm package (images in /usr/lib/coworkvm/images), or \
               `make build` in a source checkout, or set COWORKVM_IMAGES=DIR";
    let manifest_path = dir.join(socket_proto::manifest::MANIFEST_FILE);
    let loaded = match coworkvm_bundle::load_manifest(&manifest_path) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Check::new(
                "images",
                name,
                Scope::Coworkvm,
                Status::Fail,
                format!("no {}", manifest_path.display()),
            )
            .fix(fix)
        }
        Err(e) => {
            return Check::new("images", name, Scope::Coworkvm, Status::Fail, e.to_string())
                .fix(fix)
        }
    };
    let m = &loaded.manifest;
    let mut problems = Vec::new();
    for (file, entry) in &m.files {
        match std::fs::metadata(dir.join(file)) {
            Ok(meta) if meta.len() == entry.size => {}
            Ok(meta) => problems.push(format!(
                "{file} is {} bytes, the manifest says {}",
                meta.len(),
                entry.size
            )),
            // The uncompressed rootfs is optional beside its .zst.
            Err(_) if file == "rootfs.img" && m.files.contains_key("rootfs.img.zst") => {}
            Err(e) => problems.push(format!("{file}: {e}")),
        }
    }
    if problems.is_empty() {
        Check::new(
            "images",
            name,
            Scope::Coworkvm,
            Status::Pass,
            format!(
                "{}: rootfs {}, kernel {}",
                dir.display(),
                m.rootfs_version,
                m.kernel_version
            ),
        )
    } else {
        Check::new(
            "images",
            name,
            Scope::Coworkvm,
            Status::Fail,
            format!("{}: {}", dir.display(), problems.join("; ")),
        )
        .fix(fix)
    }
}

/// The virtiofsd that would be used.
fn virtiofsd(res: &Resolution) -> Check {
    let name = "virtiofsd for shared folders";
    match &res.chosen {
        Some(v) => Check::new(
            "virtiofsd",
            name,
            Scope::Optional,
            Status::Pass,
            format!("{} {}", v.path.display(), version_string(v.version)),
        ),
        None => {
            use coworkvm_helper::virtiofsd::{Rejection, Source};
            // A distribution path that is simply absent is not worth naming.
            let passed: Vec<String> = res
                .rejected
                .iter()
                .filter(|r| {
                    !(matches!(r.reason, Rejection::Missing)
                        && matches!(r.candidate.source, Source::System | Source::Bundled))
                })
                .map(|r| r.to_string())
                .collect();
            Check::new(
                "virtiofsd",
                name,
                Scope::Optional,
                Status::Warn,
                format!(
                    "none usable (>= {} needed), so VMs run without shared folders{}",
                    version_string(MIN_VERSION),
                    if passed.is_empty() {
                        String::new()
                    } else {
                        format!("; passed over: {}", passed.join(", "))
                    }
                ),
            )
            .fix(HOW_TO_GET)
        }
    }
}

/// Whether an unprivileged process can make a user namespace: tried in a
/// child, which exits at once.
fn userns() -> Check {
    let name = "unprivileged user namespaces";
    // SAFETY: the child only calls unshare and _exit, both async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: unshare takes flags only; _exit ends the child at once.
        unsafe {
            let r = libc::unshare(libc::CLONE_NEWUSER);
            libc::_exit(if r == 0 { 0 } else { 1 });
        }
    }
    let ok = pid > 0 && {
        let mut status = 0;
        // SAFETY: waits for our own child, writing its status to a local.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        waited == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    };
    if ok {
        Check::new(
            "userns",
            name,
            Scope::Optional,
            Status::Pass,
            "available".into(),
        )
    } else {
        let apparmor =
            std::fs::read_to_string("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
                .is_ok_and(|v| v.trim() == "1");
        let debian = std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone")
            .is_ok_and(|v| v.trim() == "0");
        let fix = if apparmor {
            "AppArmor restricts them (kernel.apparmor_restrict_unprivileged_userns=1): allow \
             /usr/bin/coworkvm with an AppArmor profile granting `userns,`"
        } else if debian {
            "`sudo sysctl kernel.unprivileged_userns_clone=1` (and in /etc/sysctl.d/ to keep it)"
        } else {
            "`sudo sysctl user.max_user_namespaces=15000` (and in /etc/sysctl.d/ to keep it)"
        };
        Check::new(
            "userns",
            name,
            Scope::Optional,
            Status::Warn,
            "refused: the VMM's sandbox has no user namespace, and shared folders are \
             unavailable"
                .into(),
        )
        .fix(fix)
    }
}

fn landlock() -> Check {
    let abi = coworkvm_vmm::landlock_abi();
    if abi > 0 {
        Check::new(
            "landlock",
            "Landlock",
            Scope::Optional,
            Status::Pass,
            format!("ABI {abi}"),
        )
    } else {
        Check::new(
            "landlock",
            "Landlock",
            Scope::Optional,
            Status::Warn,
            "not in this kernel: the VMM's file access is confined by the other layers only"
                .into(),
        )
        .fix("boot a kernel with CONFIG_SECURITY_LANDLOCK and `landlock` in the lsm= list (Debian 12's has both)")
    }
}

fn seccomp() -> Check {
    // SAFETY: PR_GET_SECCOMP reads this thread's mode; EINVAL without
    // CONFIG_SECCOMP.
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    let filter = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Seccomp_filters:")));
    if mode >= 0 && filter {
        Check::new(
            "seccomp",
            "seccomp filters",
            Scope::Coworkvm,
            Status::Pass,
            "available".into(),
        )
    } else {
        Check::new(
            "seccomp",
            "seccomp filters",
            Scope::Coworkvm,
            Status::Fail,
            "not in this kernel: the VMM refuses to run without its seccomp filter".into(),
        )
        .fix("boot a kernel with CONFIG_SECCOMP_FILTER (every Debian kernel has it)")
    }
}

/// Below this a new bundle (rootfs, session disk) does not fit.
const MIN_FREE: u64 = 2 << 30;
/// Below this, a rootfs update or a growing session disk may not fit.
const WARN_FREE: u64 = 10 << 30;

fn disk_space(host: &Host) -> Check {
    let name = "free space for bundles";
    let Some(bundle) = &host.bundle_dir else {
        return Check::new(
            "disk_space",
            name,
            Scope::Coworkvm,
            Status::Fail,
            "no bundle directory: neither XDG_DATA_HOME nor HOME is set".into(),
        )
        .fix("set HOME");
    };
    // The bundle may not exist yet: its nearest existing parent.
    let mut at = bundle.as_path();
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    let mut st: libc::statvfs = {
        // SAFETY: statvfs is plain data; zeroes are a valid value.
        unsafe { std::mem::zeroed() }
    };
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(at.as_os_str().as_bytes()).unwrap_or_default();
    // SAFETY: statvfs reads the path and writes one statvfs into `st`.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Check::new(
            "disk_space",
            name,
            Scope::Optional,
            Status::Warn,
            format!("{}: {}", at.display(), std::io::Error::last_os_error()),
        )
        .fix("check that the bundle's file system is mounted");
    }
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let gib = |n: u64| format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30));
    let detail = format!("{} free on {}", gib(free), at.display());
    let fix = format!(
        "free space on {} or point XDG_DATA_HOME elsewhere (a bundle takes a few GiB, and its \
         session disk grows to 10 GiB)",
        at.display()
    );
    if free < MIN_FREE {
        Check::new("disk_space", name, Scope::Coworkvm, Status::Fail, detail).fix(fix)
    } else if free < WARN_FREE {
        Check::new("disk_space", name, Scope::Optional, Status::Warn, detail).fix(fix)
    } else {
        Check::new("disk_space", name, Scope::Coworkvm, Status::Pass, detail)
    }
}

fn runtime_dir(host: &Host) -> Check {
    let name = "$XDG_RUNTIME_DIR";
    let fix = "log in through a session manager that sets it (systemd-logind does: \
               /run/user/UID)";
    let Some(dir) = &host.runtime_dir else {
        return Check::new(
            "runtime_dir",
            name,
            Scope::Optional,
            Status::Warn,
            format!(
                "not set: the client socket falls back to {}",
                host.socket.display()
            ),
        )
        .fix(fix);
    };
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0 => Check::new(
            "runtime_dir",
            name,
            Scope::Optional,
            Status::Pass,
            format!("{}, ours, mode {:o}", dir.display(), m.mode() & 0o777),
        ),
        Ok(m) => Check::new(
            "runtime_dir",
            name,
            Scope::Optional,
            Status::Warn,
            format!(
                "{} is owned by uid {} with mode {:o}; it should be ours and 0700",
                dir.display(),
                m.uid(),
                m.mode() & 0o777
            ),
        )
        .fix(fix),
        Err(e) => Check::new(
            "runtime_dir",
            name,
            Scope::Optional,
            Status::Warn,
            format!("{}: {e}", dir.display()),
        )
        .fix(fix),
    }
}

/// Who listens on `socket`: the inode of the listening socket bound there
/// (from /proc/net/unix), then the processes of ours that hold it. Nothing
/// connects to it, so a socket unit is not triggered.
pub fn socket_holders(socket: &Path) -> Option<Vec<(u32, String)>> {
    const ACCEPTCON: u32 = 0x0001_0000;
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let want = socket.to_string_lossy();
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path
        let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
        (f.get(7) == Some(&want.as_ref()) && flags & ACCEPTCON != 0).then(|| f[6].to_owned())
    })?;
    let link = format!("socket:[{inode}]");
    let mut holders = Vec::new();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        let holds = fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == link.as_str()));
        if holds {
            let comm = std::fs::read_to_string(proc_entry.path().join("comm"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_default();
            holders.push((pid, comm));
        }
    }
    Some(holders)
}

fn socket_owner(host: &Host) -> Check {
    let name = "client socket served by";
    let path = host.socket.display();
    let enable = "`systemctl --user enable --now coworkvm.socket` (the client then finds \
                  coworkvm on its socket and starts no helper of its own)";
    match socket_holders(&host.socket) {
        None if host.socket.exists() => Check::new(
            "socket",
            name,
            Scope::Optional,
            Status::Warn,
            format!("nobody ({path} is left over from a helper that is gone)"),
        )
        .fix(enable),
        None => Check::new(
            "socket",
            name,
            Scope::Optional,
            Status::Warn,
            format!("nobody ({path}): the client will start its own helper"),
        )
        .fix(enable),
        Some(holders) => {
            let is = |n: &str| holders.iter().any(|(_, c)| c == n);
            let list: Vec<String> = holders.iter().map(|(p, c)| format!("{c} ({p})")).collect();
            if is("coworkvm") {
                Check::new(
                    "socket",
                    name,
                    Scope::Optional,
                    Status::Pass,
                    format!("coworkvm on {path}: {}", list.join(", ")),
                )
            } else if is("systemd") {
                Check::new(
                    "socket",
                    name,
                    Scope::Optional,
                    Status::Pass,
                    format!("systemd's coworkvm.socket on {path}; coworkvm starts on the first connection"),
                )
            } else if holders.is_empty() {
                Check::new(
                    "socket",
                    name,
                    Scope::Optional,
                    Status::Warn,
                    format!("a process of another user on {path}"),
                )
                .fix(enable)
            } else {
                Check::new(
                    "socket",
                    name,
                    Scope::Optional,
                    Status::Warn,
                    format!("another helper on {path}: {}", list.join(", ")),
                )
                .fix(format!("quit the client, stop that helper, then {enable}"))
            }
        }
    }
}

/// The official client's probe, as its users' reports describe it
/// (anthropics/claude-code#74605, #73589, #80884): `qemu-system-x86_64` on
/// PATH, OVMF at two fixed paths (with its VARS file beside it), virtiofsd
/// at two fixed paths, `/dev/kvm` and `/dev/vhost-vsock` read-write.
/// Any miss: Cowork is "unsupported" and no helper is started.
fn client_checks(host: &Host) -> Vec<Check> {
    let mut checks = Vec::new();
    let qemu = host.path.as_ref().and_then(|p| {
        std::env::split_paths(p)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|c| access(c, libc::X_OK))
    });
    checks.push(match qemu {
        Some(q) => Check::new(
            "client_qemu",
            "client: qemu-system-x86_64 on PATH",
            Scope::Client,
            Status::Pass,
            q.display().to_string(),
        ),
        None => Check::new(
            "client_qemu",
            "client: qemu-system-x86_64 on PATH",
            Scope::Client,
            Status::Fail,
            "not found (the client's probe wants it, though coworkvm never runs it)".into(),
        )
        .fix("sudo apt install qemu-system-x86"),
    });
    const FIRMWARE: [&str; 2] = [
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_CODE.fd",
    ];
    let firmware = FIRMWARE.iter().map(Path::new).find(|p| p.is_file());
    checks.push(match firmware {
        Some(code) => {
            let vars = PathBuf::from(code.to_string_lossy().replace("OVMF_CODE", "OVMF_VARS"));
            if vars.is_file() {
                Check::new(
                    "client_firmware",
                    "client: OVMF firmware at its probed paths",
                    Scope::Client,
                    Status::Pass,
                    format!("{} and {}", code.display(), vars.display()),
                )
            } else {
                Check::new(
                    "client_firmware",
                    "client: OVMF firmware at its probed paths",
                    Scope::Client,
                    Status::Fail,
                    format!("{} without {}", code.display(), vars.display()),
                )
                .fix("sudo apt install --reinstall ovmf")
            }
        }
        None => Check::new(
            "client_firmware",
            "client: OVMF firmware at its probed paths",
            Scope::Client,
            Status::Fail,
            format!("none of {}", FIRMWARE.join(", ")),
        )
        .fix("sudo apt install ovmf (elsewhere: link the distribution's OVMF_CODE/OVMF_VARS pair there)"),
    });
    const VIRTIOFSD: [&str; 2] = ["/usr/libexec/virtiofsd", "/usr/bin/virtiofsd"];
    let vfsd = VIRTIOFSD
        .iter()
        .map(Path::new)
        .find(|p| access(p, libc::R_OK));
    checks.push(match vfsd {
        Some(v) => Check::new(
            "client_virtiofsd",
            "client: virtiofsd at its probed paths",
            Scope::Client,
            Status::Pass,
            v.display().to_string(),
        ),
        None => Check::new(
            "client_virtiofsd",
            "client: virtiofsd at its probed paths",
            Scope::Client,
            Status::Fail,
            format!(
                "none of {} (Debian 12's qemu puts the old C one at /usr/lib/qemu/virtiofsd, \
                 which the client does not look at)",
                VIRTIOFSD.join(", ")
            ),
        )
        .fix(
            "sudo apt install virtiofsd (Debian 13; on Debian 12 from bookworm-backports), or \
             `sudo ln -s /usr/lib/coworkvm/virtiofsd /usr/bin/virtiofsd`",
        ),
    });
    for (id, name, dev, fix) in [
        (
            "client_kvm",
            "client: /dev/kvm read-write",
            &host.dev_kvm,
            "`sudo usermod -aG kvm $USER`, then log in again",
        ),
        (
            "client_vsock",
            "client: /dev/vhost-vsock read-write",
            &host.dev_vhost_vsock,
            "`sudo modprobe vhost_vsock` (and `echo vhost_vsock | sudo tee \
             /etc/modules-load.d/vhost_vsock.conf`); it gets no uaccess ACL, so also \
             `sudo usermod -aG kvm $USER` and log in again",
        ),
    ] {
        checks.push(match device_access(dev) {
            Ok(how) => Check::new(id, name, Scope::Client, Status::Pass, how),
            Err(why) => Check::new(id, name, Scope::Client, Status::Fail, why).fix(fix),
        });
    }
    // The community build (aaddrick/claude-desktop-debian) with
    // COWORK_VM_BACKEND=bwrap runs "$COWORK_NODE_PATH" cowork-vm-service.js
    // -socket PATH instead; coworkvm serves that command line.
    let name = "client: community build's COWORK_NODE_PATH";
    let is_coworkvm = host.cowork_node_path.as_ref().is_some_and(|p| {
        let ours = std::env::current_exe()
            .ok()
            .and_then(|e| e.canonicalize().ok());
        p.canonicalize()
            .ok()
            .is_some_and(|p| Some(&p) == ours.as_ref())
            || p.file_name().is_some_and(|n| n == "coworkvm")
    });
    let fix = "for the community build's bwrap backend: launch it with \
               COWORK_VM_BACKEND=bwrap COWORK_NODE_PATH=/usr/bin/coworkvm (the official \
               client needs nothing: the socket unit serves it)";
    checks.push(match &host.cowork_node_path {
        Some(p) if is_coworkvm => Check::new(
            "client_community",
            name,
            Scope::Optional,
            Status::Pass,
            format!(
                "{} (coworkvm serves its cowork-vm-service.js command line)",
                p.display()
            ),
        ),
        Some(p) => Check::new(
            "client_community",
            name,
            Scope::Optional,
            Status::Warn,
            format!(
                "{}: not coworkvm, so its bwrap backend runs the Node stub",
                p.display()
            ),
        )
        .fix(fix),
        None => Check::new(
            "client_community",
            name,
            Scope::Optional,
            Status::Warn,
            "not set in this environment".into(),
        )
        .fix(fix),
    });
    checks
}

/// Runs every check.
pub fn run(host: &Host, kvm: DoctorReport, shares: &Resolution, client: bool) -> Report {
    let mut checks = vec![
        kvm_device(host),
        kvm_boot(&kvm),
        images(host),
        virtiofsd(shares),
        userns(),
        landlock(),
        seccomp(),
        disk_space(host),
        runtime_dir(host),
        socket_owner(host),
    ];
    let can_run_vms = !checks
        .iter()
        .any(|c| c.scope == Scope::Coworkvm && c.status == Status::Fail);
    let client_ready = client.then(|| {
        let client_checks = client_checks(host);
        let ready = !client_checks
            .iter()
            .any(|c| c.scope == Scope::Client && c.status == Status::Fail);
        checks.extend(client_checks);
        ready
    });
    Report {
        virtiofsd: super::virtiofsd_json(shares),
        kvm,
        checks,
        can_run_vms,
        client_ready,
    }
}

/// The text form: one line per check, then the verdict.
pub fn text(report: &Report) -> Vec<String> {
    let mut lines: Vec<String> = report.checks.iter().map(Check::line).collect();
    lines.push(if report.can_run_vms {
        "coworkvm can run VMs here".into()
    } else {
        "coworkvm cannot run VMs here: fix the FAIL lines above".into()
    });
    match report.client_ready {
        Some(true) => lines.push("the desktop client's own probe should pass".into()),
        Some(false) => lines.push(
            "the desktop client's own probe would refuse this machine (its client: FAIL lines); \
             it may still refuse it (its yukonSilver evaluator has refused machines with every \
             prerequisite, anthropics/claude-code#73568)"
                .into(),
        ),
        None => {}
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slow_kvm() -> DoctorReport {
        DoctorReport {
            kvm_device: true,
            kvm_usable: true,
            kvm_error: None,
            ring0_instructions: 600_003,
            ring0_elapsed_us: Some(600_000),
            ring0_mips: Some(1.0),
            can_boot_linux: false,
            verdict: "slow".into(),
        }
    }

    fn scratch_host(dir: &Path) -> Host {
        Host {
            dev_kvm: dir.join("no-kvm"),
            dev_vhost_vsock: dir.join("no-vsock"),
            images_dir: dir.join("images"),
            bundle_dir: Some(dir.join("bundle")),
            runtime_dir: Some(dir.to_owned()),
            socket: dir.join("s.sock"),
            path: Some(std::ffi::OsString::from(dir.join("bin"))),
            cowork_node_path: Some("/usr/bin/coworkvm".into()),
        }
    }

    #[test]
    fn failing_lines_carry_their_fix_and_the_verdict_the_exit_status() {
        let dir = std::env::temp_dir().join(format!("cvm-doctor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let host = scratch_host(&dir);
        let shares = Resolution {
            chosen: None,
            rejected: vec![],
        };
        let report = run(&host, slow_kvm(), &shares, true);
        let by_id = |id: &str| report.checks.iter().find(|c| c.id == id).unwrap();
        assert_eq!(by_id("kvm_device").status, Status::Fail);
        assert_eq!(by_id("kvm_boot").status, Status::Fail);
        assert!(by_id("kvm_boot").line().contains("; fix: "));
        assert_eq!(by_id("images").status, Status::Fail);
        assert_eq!(by_id("virtiofsd").status, Status::Warn);
        assert_eq!(by_id("client_qemu").status, Status::Fail);
        assert_eq!(by_id("client_community").status, Status::Pass);
        for c in &report.checks {
            let line = c.line();
            assert!(
                line.contains(&format!(": {} (", c.status)),
                "one status per line: {line}"
            );
            assert_eq!(
                c.status == Status::Pass,
                c.fix.is_none(),
                "a fix on exactly the failing lines: {line}"
            );
            assert!(!line.contains('\n'), "{line}");
        }
        assert!(!report.can_run_vms);
        assert_eq!(report.client_ready, Some(false));
        assert_eq!(report.exit_code(), 1);

        // One object that reads back as the same report.
        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["can_boot_linux"], false,
            "the rig reads this at the top level"
        );
        assert_eq!(v["checks"][1]["status"], "FAIL");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_virtiofsd_line_names_it_or_says_how_to_get_one() {
        use coworkvm_helper::virtiofsd::{
            Candidate, Rejected, Rejection, Resolution, Source, Virtiofsd,
        };
        let rejected = |path: &str, source, reason| Rejected {
            candidate: Candidate {
                path: path.into(),
                source,
            },
            reason,
        };
        let found = Resolution {
            chosen: Some(Virtiofsd {
                path: "/usr/lib/coworkvm/virtiofsd".into(),
                version: (1, 14, 0),
            }),
            rejected: vec![rejected(
                "/usr/libexec/virtiofsd",
                Source::System,
                Rejection::Missing,
            )],
        };
        let c = virtiofsd(&found);
        assert_eq!(c.status, Status::Pass);
        assert!(
            c.line().contains("/usr/lib/coworkvm/virtiofsd 1.14.0"),
            "{}",
            c.line()
        );
        let json = super::super::virtiofsd_json(&found);
        assert_eq!(json["version"], "1.14.0");

        let none = Resolution {
            chosen: None,
            rejected: vec![
                rejected(
                    "/usr/bin/virtiofsd",
                    Source::System,
                    Rejection::TooOld { found: (1, 10, 1) },
                ),
                rejected("/usr/libexec/virtiofsd", Source::System, Rejection::Missing),
                rejected(
                    "/opt/qemu-virtiofsd",
                    Source::Configured,
                    Rejection::LegacyC {
                        reported: "virtiofsd version 7.2.22".into(),
                    },
                ),
            ],
        };
        let c = virtiofsd(&none);
        let line = c.line();
        assert_eq!(c.status, Status::Warn);
        assert!(line.contains("none usable (>= 1.13.0 needed)"), "{line}");
        assert!(line.contains("1.10.1 is too old"), "{line}");
        assert!(
            line.contains("/opt/qemu-virtiofsd (configure.virtiofsdPath)"),
            "{line}"
        );
        assert!(
            !line.contains("/usr/libexec/virtiofsd"),
            "a missing system path is quiet: {line}"
        );
        assert!(
            line.contains("make build") && line.contains("virtiofsdPath"),
            "{line}"
        );
        assert!(super::super::virtiofsd_json(&none)["path"].is_null());
    }

    #[test]
    fn the_socket_owner_is_found_without_connecting() {
        let dir = std::env::temp_dir().join(format!("cvm-doctor-s-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let host = scratch_host(&dir);
        assert_eq!(socket_owner(&host).status, Status::Warn);
        let listener = std::os::unix::net::UnixListener::bind(&host.socket).unwrap();
        let holders = socket_holders(&host.socket).expect("a listener");
        assert!(
            holders.iter().any(|(pid, _)| *pid == std::process::id()),
            "{holders:?}"
        );
        // Nothing connected: the listener has no pending connection.
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err());
        drop(listener);
        let c = socket_owner(&host);
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("left over"), "{}", c.detail);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
