//! `coworkvm run -- CMD`: boot a VM with the agent, run one command in it
//! like `ssh host CMD` would, and shut it down.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use socket_proto::frame::{read_frame, write_frame};
use socket_proto::guest::{GuestEvent, GuestFrame, AGENT_VSOCK_PORT};

use coworkvm_vmm::builder::{self, GuestExit, MachineConfig, VsockSpec};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("the VM stopped before its agent connected: {0}")]
    VmEnded(String),
    #[error("the agent did not connect within {0:?}")]
    Timeout(Duration),
    #[error("the agent refused the command: {0}")]
    SpawnRefused(String),
    #[error("the agent connection broke: {0}")]
    Protocol(String),
}

pub struct RunConfig {
    pub machine: MachineConfig,
    pub command: Vec<String>,
    pub connect_timeout: Duration,
    /// Run CMD in this session's sandbox (its own user, bubblewrap,
    /// `/sessions/NAME` as home) instead of as root in the guest.
    pub session: Option<String>,
}

const PROCESS_ID: &str = "run";

fn send(stream: &Mutex, frame: &GuestFrame) -> Result<(), RunError> {
    let mut s = stream.lock().unwrap_or_else(|p| p.into_inner());
    write_frame(&mut *s, frame).map_err(|e| RunError::Protocol(e.to_string()))
}

type Mutex = std::sync::Mutex<UnixStream>;

/// Blocks SIGINT in the calling thread (and the threads it starts), so a
/// dedicated thread can take it with sigwait and forward it to the command.
fn block_sigint() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// The private directory of one `coworkvm run`: `coworkvm-run-XXXXXXXXXXXX`
/// (random) under `$XDG_RUNTIME_DIR`, else `$TMPDIR`, else `/tmp`, made
/// with `mkdir` mode 0700 (mkdtemp semantics: an existing directory is
/// never taken, whoever made it), and removed when dropped unless
/// [`RunDir::keep`] was called.
pub struct RunDir {
    path: PathBuf,
    keep: bool,
}

/// How many random names [`RunDir::create_in`] tries.
const RUN_DIR_ATTEMPTS: usize = 16;

impl RunDir {
    /// A new run directory under the default base (see [`RunDir`]).
    pub fn create() -> Result<Self, RunError> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        Self::create_in(&base)
    }

    /// A new run directory under `base`.
    pub fn create_in(base: &std::path::Path) -> Result<Self, RunError> {
        use std::os::unix::fs::DirBuilderExt;
        let mut last = None;
        for _ in 0..RUN_DIR_ATTEMPTS {
            let mut salt = [0u8; 6];
            coworkvm_bundle::fsutil::random_bytes(&mut salt)
                .map_err(|e| RunError::Io("choosing a run directory name", e))?;
            let name: String = salt.iter().map(|b| format!("{b:02x}")).collect();
            let path = base.join(format!("coworkvm-run-{name}"));
            // Not recursive: mkdir fails on anything already there.
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(RunDir { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(RunError::Io("creating the run directory", e)),
            }
        }
        Err(RunError::Io(
            "creating the run directory",
            last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()),
        ))
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Creates `console.log` in it: `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600,
    /// so a file or a link that is somehow there already is never written.
    pub fn create_console(&self) -> Result<PathBuf, RunError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path.join("console.log");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| RunError::Io("creating the console log", e))?;
        Ok(path)
    }

    /// Leaves the directory in place (a failed boot's console log).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Runs the command; returns its exit code (128+N when signal N ended it).
/// The run directory goes on every way out, except when the VM ended or
/// stalled before its agent connected: then its console log stays, and
/// the error names it.
pub fn run(cfg: RunConfig) -> Result<i32, RunError> {
    let mut dir = RunDir::create()?;
    let console = match &cfg.machine.console {
        Some(c) => c.clone(),
        None => dir.create_console()?,
    };
    let r = run_in(cfg, &dir, &console);
    if matches!(r, Err(RunError::VmEnded(_) | RunError::Timeout(_))) {
        if dir.path().join("console.log") == console {
            dir.keep();
        }
        eprintln!("coworkvm: the guest console log is {}", console.display());
    }
    r
}

fn run_in(mut cfg: RunConfig, dir: &RunDir, console: &std::path::Path) -> Result<i32, RunError> {
    let uds = dir.path().join("vsock.sock");
    let agent_path = PathBuf::from(format!("{}_{AGENT_VSOCK_PORT}", uds.display()));
    let listener =
        UnixListener::bind(&agent_path).map_err(|e| RunError::Io("listening for the agent", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| RunError::Io("listening for the agent", e))?;
    cfg.machine.vsock = Some(VsockSpec {
        guest_cid: 3,
        uds: uds.clone(),
    });
    cfg.machine.console = Some(console.to_owned());
    let sigset = block_sigint();

    let (vm_tx, vm_rx) = mpsc::channel();
    let machine = cfg.machine.clone();
    std::thread::spawn(move || {
        let r = builder::run(&machine).map(|o| (o.exit, o.console_tail));
        let _ = vm_tx.send(r.map_err(|e| e.to_string()));
    });

    // Wait for the agent to dial in.
    let start = Instant::now();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let stream = loop {
        match listener.accept() {
            // Only the VMM, our own uid, delivers the agent; the first such
            // connection is the agent's (see helper::agent::AgentClient::serve).
            Ok((s, _)) if peer_uid(&s) == Some(uid) => break s,
            Ok(_) => eprintln!("coworkvm: refused a vsock connection from another user"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(RunError::Io("accepting the agent", e)),
        }
        if let Ok(ended) = vm_rx.try_recv() {
            let why = match ended {
                Ok((exit, tail)) => format!("{exit:?}; console:\n{}", tail.join("\n")),
                Err(e) => e,
            };
            return Err(RunError::VmEnded(why));
        }
        if start.elapsed() > cfg.connect_timeout {
            return Err(RunError::Timeout(cfg.connect_timeout));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // No second connection: later dials are refused by the kernel.
    drop(listener);
    let _ = std::fs::remove_file(&agent_path);
    let _ = stream.set_nonblocking(false);
    let writer = std::sync::Arc::new(Mutex::new(
        stream
            .try_clone()
            .map_err(|e| RunError::Io("agent socket", e))?,
    ));

    // Every frame from the agent goes through one channel.
    let (tx, frames) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        loop {
            match read_frame(&mut r) {
                Ok(Some(obj)) => {
                    if let Ok(Some(f)) = GuestFrame::parse(obj) {
                        if tx.send(Ok(f)).is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => {
                    let _ = tx.send(Err("the agent closed the connection".to_string()));
                    return;
                }
                Err(e) if e.is_recoverable() => {}
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    let next = |timeout: Duration| -> Result<GuestFrame, RunError> {
        match frames.recv_timeout(timeout) {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(RunError::Protocol(e)),
            Err(_) => Err(RunError::Protocol("no frame from the agent in time".into())),
        }
    };

    // ready, then spawn.
    loop {
        if let GuestFrame::Event { event, params } = next(cfg.connect_timeout)? {
            match GuestEvent::parse(&event, params) {
                Ok(GuestEvent::Ready) => break,
                // A boot step that failed (rootfs, session disk): the
                // command may still run, but the user must hear why its
                // world looks wrong.
                Ok(GuestEvent::Error { message, .. }) => eprintln!("coworkvm: guest: {message}"),
                _ => {}
            }
        }
    }
    let (program, args) = cfg
        .command
        .split_first()
        .ok_or_else(|| RunError::SpawnRefused("no command given".into()))?;
    send(
        &writer,
        &GuestFrame::request(
            "spawn-1",
            "spawn",
            json!({"id": PROCESS_ID, "name": cfg.session.as_deref().unwrap_or("run"),
                   "command": program, "args": args, "isResume": false,
                   "encoding": "base64", "sandbox": cfg.session.is_some()}),
        ),
    )?;

    // stdin -> the command, EOF included.
    let w = writer.clone();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = stdin.read(&mut buf).unwrap_or(0);
            let data = B64.encode(&buf[..n]);
            let params = json!({"id": PROCESS_ID, "data": data, "eof": n == 0});
            let frame = GuestFrame::Notification {
                method: "stdin".into(),
                params,
            };
            if send(&w, &frame).is_err() || n == 0 {
                return;
            }
        }
    });
    // Ctrl-C -> SIGINT to the command.
    let w = writer.clone();
    std::thread::spawn(move || loop {
        let mut sig = 0;
        // SAFETY: sigwait reads the set built by block_sigint and writes `sig`.
        if unsafe { libc::sigwait(&sigset, &mut sig) } == 0 {
            let kill = GuestFrame::request(
                "kill-sigint",
                "kill",
                json!({"id": PROCESS_ID, "signal": "SIGINT"}),
            );
            let _ = send(&w, &kill);
        }
    });

    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let code = loop {
        match next(Duration::from_secs(24 * 3600))? {
            GuestFrame::Response {
                id, error: Some(e), ..
            } if id.0 == "spawn-1" => {
                return Err(RunError::SpawnRefused(e.message().to_owned()));
            }
            GuestFrame::Event { event, params } => match GuestEvent::parse(&event, params) {
                Ok(GuestEvent::Stdout { data, .. }) => {
                    let _ = stdout.write_all(&decode_stream(&data)?);
                    let _ = stdout.flush();
                }
                Ok(GuestEvent::Stderr { data, .. }) => {
                    let _ = stderr.write_all(&decode_stream(&data)?);
                }
                Ok(GuestEvent::Exit { code, signal, .. }) => {
                    break exit_code(code, signal.as_ref());
                }
                _ => {}
            },
            _ => {}
        }
    };

    // Clean shutdown: the agent syncs and powers off; the VMM then exits.
    let _ = send(
        &writer,
        &GuestFrame::request("shutdown-1", "shutdown", json!({})),
    );
    match vm_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok((GuestExit::PowerOff, _))) => {}
        Ok(Ok((other, _))) => eprintln!("coworkvm: the VM ended with {other:?}"),
        Ok(Err(e)) => eprintln!("coworkvm: the VM failed: {e}"),
        Err(_) => eprintln!("coworkvm: the VM did not power off in time"),
    }
    Ok(code)
}

/// The uid of a Unix socket's peer (SO_PEERCRED).
fn peer_uid(s: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a live
    // local of that size, for the descriptor `s` owns.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

/// Output data of a process spawned with `encoding: base64`.
fn decode_stream(data: &str) -> Result<Vec<u8>, RunError> {
    B64.decode(data)
        .map_err(|e| RunError::Protocol(format!("output that is not base64: {e}")))
}

fn exit_code(code: Option<i32>, signal: Option<&Value>) -> i32 {
    if let Some(c) = code {
        return c;
    }
    let n = match signal {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0) as i32,
        Some(Value::String(s)) => match s.trim_start_matches("SIG") {
            "HUP" => 1,
            "INT" => 2,
            "QUIT" => 3,
            "ABRT" => 6,
            "KILL" => 9,
            "SEGV" => 11,
            "PIPE" => 13,
            "TERM" => 15,
            other => other.parse().unwrap_or(0),
        },
        _ => 0,
    };
    128 + n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attacker who pre-creates `coworkvm-run-*` directories (the old
    /// predictable name among them) with `console.log` linked to a file of
    /// the user's gets nothing: the run directory is a new one, 0700, and
    /// its console log never follows a link.
    #[test]
    fn a_planted_run_directory_is_never_used() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("coworkvm-runbase-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let canary = base.join("canary");
        std::fs::write(&canary, b"secret").unwrap();
        let planted = base.join(format!("coworkvm-run-{}", std::process::id()));
        std::fs::create_dir_all(&planted).unwrap();
        std::os::unix::fs::symlink(&canary, planted.join("console.log")).unwrap();

        let dir = RunDir::create_in(&base).unwrap();
        assert_ne!(dir.path(), planted.as_path());
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with("coworkvm-run-") && name.len() == 25,
            "{name}"
        );
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let console = dir.create_console().unwrap();
        std::fs::write(&console, b"boot log").unwrap();
        // A console.log that is there already (a link) is refused.
        std::fs::remove_file(&console).unwrap();
        std::os::unix::fs::symlink(&canary, &console).unwrap();
        assert!(dir.create_console().is_err());
        assert_eq!(std::fs::read(&canary).unwrap(), b"secret");

        // Removed when dropped; kept when asked.
        let path = dir.path().to_owned();
        drop(dir);
        assert!(!path.exists());
        let mut kept = RunDir::create_in(&base).unwrap();
        kept.keep();
        let path = kept.path().to_owned();
        drop(kept);
        assert!(path.is_dir());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(Some(3), None), 3);
        assert_eq!(exit_code(None, Some(&json!("SIGKILL"))), 137);
        assert_eq!(exit_code(None, Some(&json!("SIGTERM"))), 143);
        assert_eq!(exit_code(None, Some(&json!(2))), 130);
        assert_eq!(exit_code(None, Some(&json!("SIG42"))), 170);
    }
}
