//! Finding a usable virtiofsd: the Rust virtio-fs daemon (gitlab.com/virtio-fs/virtiofsd)
//! that the share keeper runs for a VM's shared folders.
//!
//! Candidates, in order: the client's `configure.virtiofsdPath`, `$COWORKVM_VIRTIOFSD`,
//! `/usr/libexec/virtiofsd` (Debian 13's `virtiofsd` package), `/usr/bin/virtiofsd`,
//! `/usr/lib/coworkvm/virtiofsd` (the one coworkvm's package ships, built by `make build`),
//! and `<dir of the running coworkvm>/../lib/coworkvm/virtiofsd` (an unpacked tree). The first
//! that runs and reports at least [`MIN_VERSION`] wins; every candidate passed over keeps its
//! reason, for `coworkvm doctor` and the log.
//!
//! Each candidate is executed (`--version`), so the probe is bounded: an absolute path only (a
//! bare name would go through `$PATH`), an empty environment (the helper's may hold tokens), no
//! stdin, [`VERSION_OUTPUT_MAX`] bytes of output, [`VERSION_TIMEOUT`], and the candidate in its
//! own process group that is killed whole, so a hung or forking binary cannot hold the helper.

use std::fmt;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The oldest virtiofsd we accept: `--translate-uid` / `--translate-gid`, which the share keeper
/// needs to run unprivileged, first appear in 1.13.0.
pub const MIN_VERSION: (u32, u32, u32) = (1, 13, 0);
/// The environment variable naming a virtiofsd to use.
pub const ENV_VAR: &str = "COWORKVM_VIRTIOFSD";
/// Where coworkvm's own package (and the test rig) installs its virtiofsd.
pub const BUNDLED_PATH: &str = "/usr/lib/coworkvm/virtiofsd";
/// The distribution paths probed after the configured ones, then [`BUNDLED_PATH`].
pub const SYSTEM_PATHS: [&str; 2] = ["/usr/libexec/virtiofsd", "/usr/bin/virtiofsd"];
/// How long `virtiofsd --version` may take.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(5);
/// The most output `--version` may produce (a real one prints one short line).
pub const VERSION_OUTPUT_MAX: usize = 4096;
/// What to tell a user who has no usable virtiofsd.
pub const HOW_TO_GET: &str =
    "install coworkvm's Debian package (it ships /usr/lib/coworkvm/virtiofsd), \
     or build one with `make build` (build/virtiofsd/bin/virtiofsd), or on Debian 13 and later \
     `apt install virtiofsd`; or point configure.virtiofsdPath or $COWORKVM_VIRTIOFSD at a \
     virtiofsd >= 1.13.0";

/// A virtiofsd that passed the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Virtiofsd {
    pub path: PathBuf,
    pub version: (u32, u32, u32),
}

/// Where a candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `configure.virtiofsdPath`.
    Configured,
    /// `$COWORKVM_VIRTIOFSD`.
    Env,
    /// A distribution path ([`SYSTEM_PATHS`]).
    System,
    /// coworkvm's own ([`BUNDLED_PATH`] or beside the running executable).
    Bundled,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Configured => "configure.virtiofsdPath",
            Source::Env => "$COWORKVM_VIRTIOFSD",
            Source::System => "system",
            Source::Bundled => "coworkvm's own",
        })
    }
}

/// One path to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    pub source: Source,
}

/// Why a candidate was passed over. Text that came from the candidate is escaped and cut short.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("not an absolute path")]
    NotAbsolute,
    #[error("does not exist")]
    Missing,
    #[error("cannot be inspected: {0}")]
    Inaccessible(std::io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error("not executable")]
    NotExecutable,
    #[error("cannot be run: {0}")]
    Spawn(std::io::Error),
    #[error("`--version` did not finish within {0:?}")]
    Timeout(Duration),
    #[error("`--version` printed more than {VERSION_OUTPUT_MAX} bytes")]
    OutputTooLong,
    #[error("`--version` failed ({status}): {output}")]
    Failed { status: String, output: String },
    #[error(
        "QEMU's legacy C virtiofsd (\"{reported}\"): its options differ; the Rust virtiofsd >= {} is needed",
        version_string(MIN_VERSION)
    )]
    LegacyC { reported: String },
    #[error("virtiofsd {} is too old: >= {} is needed (for --translate-uid)", version_string(*found), version_string(MIN_VERSION))]
    TooOld { found: (u32, u32, u32) },
    #[error("`--version` printed no virtiofsd version: {0}")]
    Unrecognized(String),
}

/// A candidate passed over, and why.
#[derive(Debug)]
pub struct Rejected {
    pub candidate: Candidate,
    pub reason: Rejection,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.candidate.path.display(),
            self.candidate.source,
            self.reason
        )
    }
}

/// The outcome of a search: the virtiofsd chosen, if any, and every candidate tried before it.
#[derive(Debug, Default)]
pub struct Resolution {
    pub chosen: Option<Virtiofsd>,
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error(
        "no usable virtiofsd (>= {}){}; {HOW_TO_GET}",
        version_string(MIN_VERSION),
        list_rejected(rejected)
    )]
    NotFound { rejected: Vec<Rejected> },
}

fn list_rejected(rejected: &[Rejected]) -> String {
    rejected.iter().map(|r| format!("; {r}")).collect()
}

impl Resolution {
    pub fn into_result(self) -> Result<Virtiofsd, VirtiofsdError> {
        self.chosen.ok_or(VirtiofsdError::NotFound {
            rejected: self.rejected,
        })
    }
}

/// `"1.13.0"`.
pub fn version_string((a, b, c): (u32, u32, u32)) -> String {
    format!("{a}.{b}.{c}")
}

/// The candidates in search order, duplicates (by path) dropped. `env` is `$COWORKVM_VIRTIOFSD`
/// (empty means unset), `exe` the running executable.
pub fn candidates(
    configured: Option<&Path>,
    env: Option<&Path>,
    exe: Option<&Path>,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut push = |path: PathBuf, source| {
        if !path.as_os_str().is_empty() && !out.iter().any(|c| c.path == path) {
            out.push(Candidate { path, source });
        }
    };
    if let Some(p) = configured {
        push(p.to_path_buf(), Source::Configured);
    }
    if let Some(p) = env {
        push(p.to_path_buf(), Source::Env);
    }
    for p in SYSTEM_PATHS {
        push(PathBuf::from(p), Source::System);
    }
    push(PathBuf::from(BUNDLED_PATH), Source::Bundled);
    if let Some(dir) = exe.and_then(Path::parent) {
        push(dir.join("../lib/coworkvm/virtiofsd"), Source::Bundled);
    }
    out
}

/// Searches for a virtiofsd (see the module doc) and keeps every reason.
pub fn resolve_all(configured: Option<&Path>) -> Resolution {
    let env = std::env::var_os(ENV_VAR).map(PathBuf::from);
    let exe = std::env::current_exe().ok();
    resolve_among(
        &candidates(configured, env.as_deref(), exe.as_deref()),
        VERSION_TIMEOUT,
    )
}

/// The virtiofsd to use, or why there is none. Candidates passed over are logged.
pub fn resolve(configured: Option<&Path>) -> Result<Virtiofsd, VirtiofsdError> {
    let res = resolve_all(configured);
    for r in &res.rejected {
        match (&r.reason, r.candidate.source) {
            (Rejection::Missing, Source::System | Source::Bundled) => {
                tracing::debug!("virtiofsd candidate {r}")
            }
            _ => tracing::warn!("virtiofsd candidate {r}"),
        }
    }
    if let Some(v) = &res.chosen {
        tracing::info!(
            "virtiofsd {} at {}",
            version_string(v.version),
            v.path.display()
        );
    }
    res.into_result()
}

/// Tries `list` in order, each probe bounded by `timeout`; stops at the first usable one.
pub fn resolve_among(list: &[Candidate], timeout: Duration) -> Resolution {
    let mut res = Resolution::default();
    for c in list {
        match probe(&c.path, timeout) {
            Ok(version) => {
                res.chosen = Some(Virtiofsd {
                    path: c.path.clone(),
                    version,
                });
                break;
            }
            Err(reason) => res.rejected.push(Rejected {
                candidate: c.clone(),
                reason,
            }),
        }
    }
    res
}

/// Checks `path` and runs `path --version`; its version when it is a Rust virtiofsd >=
/// [`MIN_VERSION`].
pub fn probe(path: &Path, timeout: Duration) -> Result<(u32, u32, u32), Rejection> {
    if !path.is_absolute() {
        return Err(Rejection::NotAbsolute);
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Rejection::Missing),
        Err(e) => return Err(Rejection::Inaccessible(e)),
    };
    if !meta.is_file() {
        return Err(Rejection::NotAFile);
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(Rejection::NotExecutable);
    }
    let output = run_version(path, timeout)?;
    let version = parse_version(&output)?;
    if version < MIN_VERSION {
        return Err(Rejection::TooOld { found: version });
    }
    Ok(version)
}

/// Reads a `--version` output: `"virtiofsd 1.14.0"` (the Rust daemon, clap's format) gives its
/// version; `"virtiofsd version 7.2.22 (Debian ...)"` is QEMU's C daemon.
pub fn parse_version(output: &str) -> Result<(u32, u32, u32), Rejection> {
    let line = output.lines().next().unwrap_or("").trim();
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("virtiofsd"), Some("version")) => Err(Rejection::LegacyC {
            reported: excerpt(line),
        }),
        (Some("virtiofsd"), Some(v)) => {
            parse_triple(v).ok_or_else(|| Rejection::Unrecognized(excerpt(line)))
        }
        _ => Err(Rejection::Unrecognized(excerpt(line))),
    }
}

/// `"1.14.0"`, `"1.13.2-dirty"`, `"1.14"` (patch 0); nothing else.
fn parse_triple(v: &str) -> Option<(u32, u32, u32)> {
    let core = v.split(['-', '+']).next()?;
    let num = |p: &str| -> Option<u32> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    let parts: Vec<&str> = core.split('.').collect();
    let (major, minor, patch) = match parts[..] {
        [a, b] => (num(a)?, num(b)?, 0),
        [a, b, c] => (num(a)?, num(b)?, num(c)?),
        _ => return None,
    };
    Some((major, minor, patch))
}

/// A candidate's text fit for a log line or a terminal: escaped, at most 120 characters.
fn excerpt(s: &str) -> String {
    const MAX: usize = 120;
    let escaped: String = s.chars().flat_map(char::escape_debug).collect();
    if escaped.chars().count() > MAX {
        let mut cut: String = escaped.chars().take(MAX).collect();
        cut.push('…');
        cut
    } else if escaped.is_empty() {
        "(nothing)".into()
    } else {
        escaped
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, a live local of the right size.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Spawns, retrying briefly on ETXTBSY: a package upgrade (or a test) may still hold the file
/// open for writing for a moment.
fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Kills the child's whole process group, then reaps the child. Called while the child is
/// unreaped (or a zombie), so its pid, which is the group's id, cannot have been reused.
fn kill_and_reap(child: &mut Child) {
    // SAFETY: kill has no memory effects; the group is the one the child leads (see above).
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let _ = child.wait();
}

/// Whether the child has exited, without reaping it (WNOWAIT), so its process group can still
/// be killed safely.
fn exited(child: &Child) -> std::io::Result<bool> {
    // SAFETY: a zeroed siginfo_t is a valid value for waitid to overwrite.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes one siginfo_t into `info`, a live local; WNOWAIT leaves the child
    // unreaped, so `Child` still owns it.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            child.id(),
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info`; with WNOHANG and no state change si_pid is 0.
    Ok(unsafe { info.si_pid() } != 0)
}

/// Runs `path --version` within `timeout`; its stdout and stderr together, at most
/// [`VERSION_OUTPUT_MAX`] bytes.
fn run_version(path: &Path, timeout: Duration) -> Result<String, Rejection> {
    let deadline = Instant::now() + timeout;
    let (read_end, write_end) = pipe().map_err(Rejection::Spawn)?;
    let write_end2 = write_end.try_clone().map_err(Rejection::Spawn)?;
    let mut cmd = Command::new(path);
    cmd.arg("--version")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_end2))
        .process_group(0);
    let spawned = spawn(&mut cmd);
    // The Command holds the write ends: drop it so the pipe reports EOF when the child is done.
    drop(cmd);
    let mut child = spawned.map_err(Rejection::Spawn)?;

    let mut reader = std::fs::File::from(read_end);
    // SAFETY: F_SETFL on a descriptor we own; no memory is passed.
    unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut out = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            kill_and_reap(&mut child);
            return Err(Rejection::Timeout(timeout));
        }
        let mut pfd = libc::pollfd {
            fd: reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: poll reads and writes one pollfd, a live local.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            kill_and_reap(&mut child);
            return Err(Rejection::Spawn(e));
        }
        if rc == 0 {
            continue;
        }
        match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&chunk[..n]);
                if out.len() > VERSION_OUTPUT_MAX {
                    kill_and_reap(&mut child);
                    return Err(Rejection::OutputTooLong);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                kill_and_reap(&mut child);
                return Err(Rejection::Spawn(e));
            }
        }
    }
    // EOF: every writer is gone; wait (bounded) for the exit itself.
    loop {
        match exited(&child) {
            Ok(true) => break,
            Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(false) => {
                kill_and_reap(&mut child);
                return Err(Rejection::Timeout(timeout));
            }
            Err(e) => {
                kill_and_reap(&mut child);
                return Err(Rejection::Spawn(e));
            }
        }
    }
    // Anything it left behind in its group goes too; then reap.
    // SAFETY: as in kill_and_reap: the child is a zombie, its group id not reusable.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let status = child.wait().map_err(Rejection::Spawn)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    if !status.success() {
        return Err(Rejection::Failed {
            status: status.to_string(),
            output: excerpt(text.lines().next().unwrap_or("")),
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A private directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "coworkvm-virtiofsd-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir(&p).unwrap();
            Self(p)
        }

        /// An executable `#!/bin/sh` script named `name` with `body`.
        fn script(&self, name: &str, body: &str) -> PathBuf {
            let p = self.0.join(name);
            let mut f = std::fs::File::create(&p).unwrap();
            writeln!(f, "#!/bin/sh\n{body}").unwrap();
            f.set_permissions(std::fs::Permissions::from_mode(0o755))
                .unwrap();
            drop(f);
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const QUICK: Duration = Duration::from_secs(10);

    #[test]
    fn parses_the_rust_daemon_and_refuses_the_c_one() {
        assert_eq!(parse_version("virtiofsd 1.14.0\n").unwrap(), (1, 14, 0));
        assert_eq!(parse_version("virtiofsd 1.13.2-dirty").unwrap(), (1, 13, 2));
        assert_eq!(parse_version("virtiofsd 1.14").unwrap(), (1, 14, 0));
        let c = "virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b2)\n\
                 using FUSE kernel interface version 7.36\n";
        assert!(matches!(parse_version(c), Err(Rejection::LegacyC { .. })));
        for bad in [
            "",
            "virtiofsd",
            "virtiofsd x.y.z",
            "virtiofsd 1.2.3.4",
            "virtiofsd 1..3",
            "virtiofsd +1.2.3",
            "virtiofsd 99999999999.0.0",
            "qemu 1.14.0",
        ] {
            assert!(
                matches!(parse_version(bad), Err(Rejection::Unrecognized(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn search_order_and_duplicates() {
        let got = candidates(
            Some(Path::new("/opt/v")),
            Some(Path::new("/usr/bin/virtiofsd")),
            Some(Path::new("/usr/bin/coworkvm")),
        );
        let paths: Vec<_> = got
            .iter()
            .map(|c| (c.path.to_str().unwrap(), c.source))
            .collect();
        assert_eq!(
            paths,
            [
                ("/opt/v", Source::Configured),
                ("/usr/bin/virtiofsd", Source::Env),
                ("/usr/libexec/virtiofsd", Source::System),
                (BUNDLED_PATH, Source::Bundled),
                ("/usr/bin/../lib/coworkvm/virtiofsd", Source::Bundled),
            ]
        );
        // An empty $COWORKVM_VIRTIOFSD counts as unset.
        let got = candidates(None, Some(Path::new("")), None);
        assert_eq!(got[0].path, Path::new(SYSTEM_PATHS[0]));
    }

    #[test]
    fn first_good_candidate_wins_and_every_reason_is_kept() {
        let d = TempDir::new();
        let c = |path: PathBuf, source| Candidate { path, source };
        let list = [
            c(d.0.join("missing"), Source::Configured),
            c(PathBuf::from("relative/virtiofsd"), Source::Env),
            c(d.script("old", "echo 'virtiofsd 1.12.0'"), Source::System),
            c(
                d.script(
                    "qemu",
                    "echo 'virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b2)'",
                ),
                Source::System,
            ),
            c(
                d.script("garbage", "head -c 64 /dev/urandom"),
                Source::System,
            ),
            c(d.script("fails", "echo oops >&2; exit 3"), Source::System),
            c(d.0.clone(), Source::System),
            c(d.script("good", "echo 'virtiofsd 1.14.0'"), Source::Bundled),
            c(
                d.script("later", "echo 'virtiofsd 1.15.0'"),
                Source::Bundled,
            ),
        ];
        let res = resolve_among(&list, QUICK);
        let chosen = res.chosen.as_ref().expect("the good one");
        assert_eq!(chosen.path, d.0.join("good"));
        assert_eq!(chosen.version, (1, 14, 0));
        let reasons: Vec<_> = res.rejected.iter().map(|r| &r.reason).collect();
        assert_eq!(reasons.len(), 7, "{reasons:?}");
        assert!(matches!(reasons[0], Rejection::Missing));
        assert!(matches!(reasons[1], Rejection::NotAbsolute));
        assert!(matches!(
            reasons[2],
            Rejection::TooOld { found: (1, 12, 0) }
        ));
        assert!(matches!(reasons[3], Rejection::LegacyC { .. }));
        assert!(matches!(reasons[4], Rejection::Unrecognized(_)));
        assert!(matches!(reasons[5], Rejection::Failed { .. }));
        assert!(matches!(reasons[6], Rejection::NotAFile));
        // The messages say what is needed.
        assert!(
            reasons[3].to_string().contains(">= 1.13.0"),
            "{}",
            reasons[3]
        );
        assert!(reasons[2].to_string().contains("1.12.0 is too old"));
        assert!(reasons[5].to_string().contains("oops"));
    }

    #[test]
    fn nothing_usable_is_an_error_that_lists_each_candidate_and_the_way_out() {
        let d = TempDir::new();
        let qemu = d.script("qemu", "echo 'virtiofsd version 7.2.22'");
        let res = resolve_among(
            &[Candidate {
                path: qemu.clone(),
                source: Source::Configured,
            }],
            QUICK,
        );
        let msg = res.into_result().unwrap_err().to_string();
        assert!(msg.contains(&qemu.display().to_string()), "{msg}");
        assert!(msg.contains("configure.virtiofsdPath"), "{msg}");
        assert!(msg.contains("legacy C virtiofsd"), "{msg}");
        assert!(msg.contains("make build"), "{msg}");
    }

    #[test]
    fn not_executable_is_not_run() {
        let d = TempDir::new();
        let p = d.script("plain", "echo 'virtiofsd 1.14.0'");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(probe(&p, QUICK), Err(Rejection::NotExecutable)));
    }

    /// A hung binary, and one that backgrounds a child holding the output pipe open, both end
    /// within the timeout, and the whole process group is gone afterwards.
    #[test]
    fn a_hung_candidate_is_killed_at_the_timeout() {
        let d = TempDir::new();
        let marker = d.0.join("still-running");
        for body in [
            "exec sleep 60".to_string(),
            format!(
                "(sleep 3; touch {}) & echo 'virtiofsd 1.14.0'; exit 0",
                marker.display()
            ),
        ] {
            let p = d.script("hang", &body);
            let t = Instant::now();
            let got = probe(&p, Duration::from_millis(500));
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
            assert!(matches!(got, Err(Rejection::Timeout(_))), "{body}: {got:?}");
            std::fs::remove_file(&p).unwrap();
        }
        // The background child was killed with its group: it never touches the marker.
        std::thread::sleep(Duration::from_millis(3500));
        assert!(!marker.exists(), "a leftover of the probe kept running");
    }

    #[test]
    fn endless_output_is_cut_off() {
        let d = TempDir::new();
        let p = d.script("yes", "exec yes virtiofsd");
        let t = Instant::now();
        assert!(matches!(probe(&p, QUICK), Err(Rejection::OutputTooLong)));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_probe_gets_an_empty_environment() {
        // The helper's environment may hold tokens; a candidate is a program we do not trust.
        assert!(
            std::env::var_os("HOME").is_some(),
            "the test needs HOME set"
        );
        let d = TempDir::new();
        let p = d.script(
            "env",
            "if [ -z \"$HOME\" ]; then echo 'virtiofsd 1.14.0'; else echo \"leaked HOME\"; fi",
        );
        assert_eq!(probe(&p, QUICK).unwrap(), (1, 14, 0));
    }

    #[test]
    fn hostile_output_is_escaped_and_short() {
        let s = format!("virtiofsd \u{1b}[2J{}", "x".repeat(500));
        let Err(Rejection::Unrecognized(text)) = parse_version(&s) else {
            panic!("accepted");
        };
        assert!(!text.contains('\u{1b}'));
        assert!(text.chars().count() <= 121);
    }
}
