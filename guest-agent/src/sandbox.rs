//! Running a session's process under bubblewrap, as the session's user.
//!
//! The agent (root) forks, calls `setsid()` (so nothing below has a
//! controlling terminal and the tree is apart from the agent), sets
//! no_new_privs, drops to the session's uid/gid with no supplementary
//! groups, and executes `bwrap`. bwrap, unprivileged, makes a user namespace
//! that maps only that uid, plus pid, ipc, uts and cgroup namespaces (the
//! network namespace is the session's, entered before bwrap runs),
//! drops every capability and runs the command under its own pid 1:
//!
//! ```text
//! agent ── bwrap (outer, pgid = its pid) ── bwrap init (pid 1 inside; new session:
//!                                          its pid is the sandbox's pgid) ── command ── ...
//! ```
//!
//! `--new-session` puts the sandbox in its own session and process group,
//! whose id bwrap reports on `--info-fd` (`child-pid`). `kill` signals that
//! group: the command gets the signal as it would outside a sandbox (it may
//! handle SIGTERM or SIGINT and go on), the outer bwrap does not. Before the
//! id is known, or once that group is gone, `kill` signals the outer group;
//! the outer bwrap dies and `--die-with-parent` takes the sandbox with it.
//! SIGKILL to the sandbox's group kills its pid 1, and the kernel then kills
//! every process in the pid namespace, including any that left the group.
//!
//! Before it drops root, the forked child moves itself into the session's
//! cgroup (`crate::cgroup`) and resets its `oom_score_adj` to 0 (the agent
//! keeps -1000 for itself), so every process of the sandbox is counted
//! against the session's limits and is the OOM killer's to choose.
//! bwrap installs the session seccomp filter (`crate::seccomp`, handed over
//! as `--seccomp FD`) right before it executes the command.
//!
//! The view of the system: `/usr` and `/etc` read-only, `/bin`, `/sbin`,
//! `/lib*` as the links they are (or read-only binds where they are
//! directories), `/opt` read-only when present, a fresh `/proc`, a minimal
//! `/dev`, an empty tmpfs `/tmp`, and `/sessions/<name>` read-write at the
//! same path: HOME and the default working directory. `/etc/passwd` and
//! `/etc/group` are the session's own, read-only (`--ro-bind-data`): root,
//! nobody and the session's user, so no session learns the others' names
//! and homes from the guest's files. Nothing else of the
//! session disk is visible except the installed SDK, read-only. The network
//! namespace is the session's own (`crate::egress`), entered by the forked
//! child while still root: loopback and the session's two proxies, its only
//! way out. Without one (off the guest), bwrap makes an empty one.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::sessions::user_name;

/// Where Debian's bubblewrap lives.
pub const BWRAP: &str = "/usr/bin/bwrap";

/// One piece of the read-only system view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemEntry {
    /// `--ro-bind P P`
    Bind(PathBuf),
    /// `--symlink TARGET P`
    Symlink { target: PathBuf, at: PathBuf },
}

/// The system view, read from `root` (`/` in the guest): `/usr` and `/etc`,
/// the top-level `bin`, `sbin` and `lib*` as links or directories, `/opt`
/// when it is a directory.
pub fn scan_system(root: &Path) -> Vec<SystemEntry> {
    let mut v = Vec::new();
    for name in [
        "usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt",
    ] {
        let at = Path::new("/").join(name);
        let Ok(md) = std::fs::symlink_metadata(root.join(name)) else {
            continue;
        };
        if md.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(root.join(name)) {
                v.push(SystemEntry::Symlink { target, at });
            }
        } else if md.is_dir() {
            v.push(SystemEntry::Bind(at));
        }
    }
    v
}

/// Everything that decides one sandbox's bwrap command line.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `/sessions/<name>`: bound read-write at the same path, HOME.
    pub session_dir: PathBuf,
    /// Where the command starts (inside `session_dir`).
    pub cwd: PathBuf,
    /// The installed SDK's version directory: bound read-only, first on PATH.
    pub sdk_dir: Option<PathBuf>,
    /// The session's shared-folder mount tree (`crate::share`): bound at
    /// `<session_dir>/mnt`, where grants attached to it later appear too.
    pub mounts_tree: Option<PathBuf>,
    pub system: Vec<SystemEntry>,
    /// The write end of the info pipe, passed as `--info-fd`.
    pub info_fd: Option<i32>,
    /// The compiled session filter (`crate::seccomp`), as `--seccomp`.
    pub seccomp_fd: Option<i32>,
    /// The session's `/etc/passwd` and `/etc/group` (`passwd`, `group`),
    /// as `--ro-bind-data`.
    pub passwd_fd: Option<i32>,
    pub group_fd: Option<i32>,
    /// The session's network namespace (`crate::egress`), entered before
    /// bwrap runs: then bwrap makes none (no `--unshare-net`). `None`:
    /// bwrap's own, with loopback only.
    pub netns_fd: Option<i32>,
}

/// The passwd of a session's sandbox: root, nobody, and the session's user
/// with `home`. Unmapped ids show as 65534 inside the user namespace.
pub fn passwd(uid: u32, home: &Path) -> String {
    let home = home.to_string_lossy();
    // passwd's fields are ':'-separated lines.
    let home = if home.contains([':', '\n']) {
        "/nonexistent".into()
    } else {
        home
    };
    format!(
        "root:x:0:0:root:/root:/bin/bash\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
         {user}:x:{uid}:{uid}:coworkvm session:{home}:/bin/bash\n",
        user = user_name(uid)
    )
}

/// The group file of a session's sandbox: root, nogroup, the session's.
pub fn group(uid: u32) -> String {
    format!(
        "root:x:0:\nnogroup:x:65534:\n{user}:x:{uid}:\n",
        user = user_name(uid)
    )
}

impl Spec {
    /// bwrap's arguments, up to and including the command and its args.
    pub fn args(&self, program: &str, args: &[String]) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |xs: &[&dyn AsRef<std::ffi::OsStr>]| {
            for x in xs {
                a.push(x.as_ref().to_owned());
            }
        };
        // No `--disable-userns`: the runtime's own sandbox (bwrap + socat)
        // needs a user namespace inside this one. The agent bounds how many
        // a session may hold (`init::USER_NAMESPACES_PER_UID`), and the
        // seccomp filter, which every nested namespace inherits, keeps
        // AF_VSOCK and netfilter out of reach.
        push(&[&"--unshare-user", &"--unshare-pid"]);
        if self.netns_fd.is_none() {
            push(&[&"--unshare-net"]);
        }
        push(&[
            &"--unshare-ipc",
            &"--unshare-uts",
            &"--unshare-cgroup-try",
            &"--hostname",
            &"coworkvm",
            &"--die-with-parent",
            &"--new-session",
            &"--cap-drop",
            &"ALL",
        ]);
        for e in &self.system {
            match e {
                SystemEntry::Bind(p) => push(&[&"--ro-bind", p, p]),
                SystemEntry::Symlink { target, at } => push(&[&"--symlink", target, at]),
            }
        }
        // After the system view: these are bound over its /etc's files.
        for (fd, at) in [
            (self.passwd_fd, "/etc/passwd"),
            (self.group_fd, "/etc/group"),
        ] {
            if let Some(fd) = fd {
                push(&[&"--perms", &"0644", &"--ro-bind-data", &fd.to_string(), &at]);
            }
        }
        push(&[&"--proc", &"/proc", &"--dev", &"/dev", &"--tmpfs", &"/tmp"]);
        push(&[&"--bind", &self.session_dir, &self.session_dir]);
        // Read-write bind: `--ro-bind` would make the rw grants inside
        // read-only; the tree's own directories are root's anyway.
        if let Some(tree) = &self.mounts_tree {
            push(&[&"--bind", tree, &self.session_dir.join("mnt")]);
        }
        if let Some(sdk) = &self.sdk_dir {
            push(&[&"--ro-bind", sdk, sdk]);
        }
        push(&[&"--chdir", &self.cwd]);
        if let Some(fd) = self.info_fd {
            push(&[&"--info-fd", &fd.to_string()]);
        }
        if let Some(fd) = self.seccomp_fd {
            push(&[&"--seccomp", &fd.to_string()]);
        }
        push(&[&"--", &program]);
        for x in args {
            a.push(x.into());
        }
        a
    }

    /// The environment the command starts with (before the spawn's `env`).
    pub fn base_env(&self, uid: u32) -> BTreeMap<String, String> {
        let mut path = String::new();
        if let Some(sdk) = &self.sdk_dir {
            path.push_str(&sdk.to_string_lossy());
            path.push(':');
        }
        path.push_str("/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin");
        let user = user_name(uid);
        BTreeMap::from([
            ("PATH".into(), path),
            (
                "HOME".into(),
                self.session_dir.to_string_lossy().into_owned(),
            ),
            ("USER".into(), user.clone()),
            ("LOGNAME".into(), user),
            ("SHELL".into(), "/bin/bash".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TMPDIR".into(), "/tmp".into()),
        ])
    }
}

/// A pipe for bwrap's `--info-fd`: (read end, write end), both close-on-exec
/// in the agent; the child clears the flag on the write end only.
pub fn info_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, a live array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The `Command` that runs `program` in the sandbox as `uid`: stdio piped,
/// environment `base_env` + `env`. `cgroup_procs`: the session group's
/// `cgroup.procs`, open for writing (`crate::cgroup::SessionCgroups::enter_fd`).
pub fn command(
    bwrap: &Path,
    spec: &Spec,
    uid: u32,
    program: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    cgroup_procs: Option<i32>,
) -> Command {
    let mut cmd = Command::new(bwrap);
    cmd.args(spec.args(program, args))
        .env_clear()
        .envs(spec.base_env(uid))
        .envs(env)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let inherited = [spec.info_fd, spec.seccomp_fd, spec.passwd_fd, spec.group_fd];
    let netns_fd = spec.netns_fd;
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe system calls (write, open, close, setsid,
    // setns, setgroups, setgid, setuid, prctl, fcntl) on integers, a static
    // string and stack buffers; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            // Into the session's group while still root (the group and its
            // cgroup.procs belong to root), before bwrap forks anything.
            if let Some(fd) = cgroup_procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            reset_oom_score_adj()?;
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Into the session's network namespace while still root (it
            // takes CAP_SYS_ADMIN); the descriptor stays close-on-exec.
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The session's user, no supplementary groups.
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for fd in inherited.into_iter().flatten() {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Sets the calling process's `oom_score_adj` to 0: the agent runs at
/// -1000 (the OOM killer never picks PID 1), which its children would
/// inherit, leaving the killer nothing to pick in a session's group. Run
/// as root, this also makes 0 the floor the session cannot go below.
/// Async-signal-safe: for `pre_exec`.
pub fn reset_oom_score_adj() -> std::io::Result<()> {
    // SAFETY: open, write and close on a static NUL-terminated path and a
    // static buffer; the descriptor is closed before returning.
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if !ok {
            return Err(err);
        }
    }
    Ok(())
}

/// Reads bwrap's info JSON from `fd` until it parses; returns `child-pid`.
pub fn read_child_pid(fd: OwnedFd) -> Option<i32> {
    use std::io::Read;
    let mut f = std::fs::File::from(fd);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&buf) {
            return v.get("child-pid")?.as_i64().map(|p| p as i32);
        }
        match f.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
    }
}

/// The raw fd number of a descriptor, for `Spec::info_fd`.
pub fn raw(fd: &OwnedFd) -> i32 {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            session_dir: "/sessions/s1".into(),
            cwd: "/sessions/s1/work".into(),
            sdk_dir: Some("/sessions/.coworkvm/sdk/2.0".into()),
            mounts_tree: None,
            system: vec![
                SystemEntry::Bind("/usr".into()),
                SystemEntry::Bind("/etc".into()),
                SystemEntry::Symlink {
                    target: "usr/bin".into(),
                    at: "/bin".into(),
                },
            ],
            info_fd: Some(7),
            seccomp_fd: Some(8),
            passwd_fd: Some(9),
            group_fd: Some(10),
            netns_fd: None,
        }
    }

    fn strings(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    /// Whether `seq` appears contiguously in `args`.
    fn has(args: &[String], seq: &[&str]) -> bool {
        args.windows(seq.len()).any(|w| w == seq)
    }

    #[test]
    fn bwrap_arguments() {
        let a = strings(&spec().args("sh", &["-c".into(), "echo hi".into()]));
        for flag in [
            "--unshare-user",
            "--unshare-pid",
            "--unshare-net",
            "--die-with-parent",
            "--new-session",
        ] {
            assert!(a.contains(&flag.to_string()), "{flag} missing: {a:?}");
        }
        // Nested user namespaces stay possible (bounded by the agent).
        assert!(!a.contains(&"--disable-userns".to_string()), "{a:?}");
        assert!(has(&a, &["--cap-drop", "ALL"]));
        assert!(has(&a, &["--ro-bind", "/usr", "/usr"]));
        assert!(has(&a, &["--ro-bind", "/etc", "/etc"]));
        assert!(has(&a, &["--symlink", "usr/bin", "/bin"]));
        assert!(has(&a, &["--proc", "/proc"]));
        assert!(has(&a, &["--dev", "/dev"]));
        assert!(has(&a, &["--tmpfs", "/tmp"]));
        assert!(has(&a, &["--bind", "/sessions/s1", "/sessions/s1"]));
        assert!(has(
            &a,
            &[
                "--ro-bind",
                "/sessions/.coworkvm/sdk/2.0",
                "/sessions/.coworkvm/sdk/2.0"
            ]
        ));
        assert!(has(&a, &["--chdir", "/sessions/s1/work"]));
        assert!(has(&a, &["--info-fd", "7"]));
        assert!(has(&a, &["--seccomp", "8"]));
        // The session's passwd and group, over the system /etc's, read-only.
        let at = |seq: &[&str]| a.windows(seq.len()).position(|w| w == seq);
        let etc = at(&["--ro-bind", "/etc", "/etc"]).unwrap();
        let pw = at(&["--perms", "0644", "--ro-bind-data", "9", "/etc/passwd"]).unwrap();
        let gr = at(&["--perms", "0644", "--ro-bind-data", "10", "/etc/group"]).unwrap();
        assert!(etc < pw && etc < gr, "{a:?}");
        // The command comes last, after `--`, its args untouched.
        assert_eq!(&a[a.len() - 4..], ["--", "sh", "-c", "echo hi"]);
        // Nothing binds the whole session disk or the root read-write.
        assert!(!has(&a, &["--bind", "/sessions", "/sessions"]));
        assert!(!a.iter().any(|x| x == "--dev-bind" || x == "--share-net"));
        // The only read-write bind is the session's directory.
        let rw: Vec<_> = a
            .windows(2)
            .filter(|w| w[0] == "--bind")
            .map(|w| w[1].clone())
            .collect();
        assert_eq!(rw, ["/sessions/s1"]);
        // A command that looks like an option is still the command.
        let a = strings(&spec().args("--version", &[]));
        assert_eq!(&a[a.len() - 2..], ["--", "--version"]);
    }

    /// With the session's namespace entered before bwrap, bwrap makes no
    /// network namespace of its own (which would hide the proxies), and
    /// shares none either: the namespace is the one the spawn entered.
    #[test]
    fn a_session_namespace_replaces_unshare_net() {
        let mut s = spec();
        s.netns_fd = Some(11);
        let a = strings(&s.args("sh", &[]));
        assert!(!a.iter().any(|x| x == "--unshare-net"), "{a:?}");
        assert!(!a.iter().any(|x| x == "--share-net" || x == "11"), "{a:?}");
        for flag in [
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
        ] {
            assert!(a.contains(&flag.to_string()), "{flag} missing: {a:?}");
        }
        // Without it, bwrap's own.
        let a = strings(&spec().args("sh", &[]));
        assert!(a.contains(&"--unshare-net".to_string()));
    }

    #[test]
    fn the_mount_tree_is_bound_read_write_at_mnt_after_the_session() {
        let mut s = spec();
        s.mounts_tree = Some("/run/coworkvm/mnt/s1".into());
        let a = strings(&s.args("sh", &[]));
        let at = |seq: &[&str]| a.windows(seq.len()).position(|w| w == seq);
        let session = at(&["--bind", "/sessions/s1", "/sessions/s1"]).unwrap();
        let tree = at(&["--bind", "/run/coworkvm/mnt/s1", "/sessions/s1/mnt"]).unwrap();
        // Over the session's own directory, so after it.
        assert!(session < tree, "{a:?}");
        assert!(!has(
            &a,
            &["--ro-bind", "/run/coworkvm/mnt/s1", "/sessions/s1/mnt"]
        ));
        // Without a tree nothing is bound there.
        let a = strings(&spec().args("sh", &[]));
        assert!(!a.iter().any(|x| x.ends_with("/mnt")), "{a:?}");
    }

    #[test]
    fn accounts_name_only_the_session() {
        let p = passwd(1001, Path::new("/sessions/alpha"));
        assert_eq!(
            p,
            "root:x:0:0:root:/root:/bin/bash\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
             cowork1001:x:1001:1001:coworkvm session:/sessions/alpha:/bin/bash\n"
        );
        assert_eq!(
            group(1001),
            "root:x:0:\nnogroup:x:65534:\ncowork1001:x:1001:\n"
        );
        // A home that would add a field or a line is not written.
        for bad in ["/sessions/a:b", "/sessions/a\nevil:x:0:0::/:/bin/sh"] {
            let p = passwd(1002, Path::new(bad));
            assert_eq!(p.lines().count(), 3, "{p}");
            assert!(p.ends_with(":/nonexistent:/bin/bash\n"), "{p}");
        }
    }

    #[test]
    fn environment() {
        let env = spec().base_env(1001);
        assert_eq!(env["HOME"], "/sessions/s1");
        assert_eq!(env["USER"], "cowork1001");
        assert!(env["PATH"].starts_with("/sessions/.coworkvm/sdk/2.0:/usr/local/bin:"));
        let mut s = spec();
        s.sdk_dir = None;
        assert!(s.base_env(1001)["PATH"].starts_with("/usr/local/bin:"));
    }

    #[test]
    fn system_view_follows_the_root() {
        let d = tempfile::tempdir().unwrap();
        for dir in ["usr/bin", "etc", "lib64", "home"] {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
        }
        std::os::unix::fs::symlink("usr/bin", d.path().join("bin")).unwrap();
        std::fs::write(d.path().join("opt"), "not a dir").unwrap();
        let v = scan_system(d.path());
        assert_eq!(
            v,
            [
                SystemEntry::Bind("/usr".into()),
                SystemEntry::Bind("/etc".into()),
                SystemEntry::Symlink {
                    target: "usr/bin".into(),
                    at: "/bin".into()
                },
                SystemEntry::Bind("/lib64".into()),
            ]
        );
    }
}
