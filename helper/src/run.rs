//! `coworkvm run -- CMD`: boot a VM with the agent, run one command in it
//! like `ssh host CMD` would, and shut it down.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;
use socket_proto::guest::{GuestNotification, GuestRequest, StdinParams, AGENT_VSOCK_PORT};
use socket_proto::host::{KillParams, Signal, SpawnParams, StreamEncoding};

use coworkvm_vmm::boot_file::BootFile;
use coworkvm_vmm::MachineUuid;

use crate::agent::AgentClient;
use crate::events::{EventHub, Next};
use crate::vm::{
    LaunchSpec, LaunchedVm, MachineSize, ProcessLauncher, VmImages, VmLauncher, VmManagerError,
    VmSignal,
};

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
    /// The command is not there (exit status 127, as a shell's).
    #[error("{0}")]
    CommandNotFound(String),
    /// The command is there but cannot be executed (126, as a shell's).
    #[error("{0}")]
    CannotExecute(String),
    #[error("the agent connection broke: {0}")]
    Protocol(String),
    #[error(transparent)]
    Vm(#[from] VmManagerError),
}

/// `coworkvm run`'s exit status when coworkvm itself failed (the VM did
/// not boot, the agent did not connect, ...), as `docker run`'s.
pub const EXIT_RUN_FAILED: u8 = 125;
/// The command was found but cannot be executed (a shell's 126).
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The command was not found (a shell's 127).
pub const EXIT_NOT_FOUND: u8 = 127;

impl RunError {
    /// The exit status `coworkvm run` ends with for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::CommandNotFound(_) => EXIT_NOT_FOUND,
            RunError::CannotExecute(_) => EXIT_CANNOT_EXECUTE,
            _ => EXIT_RUN_FAILED,
        }
    }
}

/// Sorts the agent's refusal of a spawn: the command is missing (its own
/// PATH check, or `execve`'s ENOENT), cannot be executed (EACCES: no
/// execute permission or a directory; ENOEXEC: not a program), or the
/// refusal is coworkvm's own. The guest protocol answers a refusal with
/// text only: these are the agent's `RequestError::NotFound` and Rust's
/// `io::Error` forms.
pub fn classify_spawn_refusal(message: String) -> RunError {
    let has = |s: &str| message.contains(s);
    if has("(os error 2)") || (has("cannot run ") && has(": not found in ")) {
        RunError::CommandNotFound(message)
    } else if has("(os error 13)") || has("(os error 8)") {
        RunError::CannotExecute(message)
    } else {
        RunError::SpawnRefused(message)
    }
}

pub struct RunConfig {
    /// What to boot.
    pub machine: RunMachine,
    pub size: MachineSize,
    /// Keep the guest console here (default: the run directory's).
    pub console: Option<PathBuf>,
    pub command: Vec<String>,
    pub connect_timeout: Duration,
    /// Run CMD in this session's sandbox (its own user, bubblewrap,
    /// `/sessions/NAME` as home) instead of as root in the guest.
    pub session: Option<String>,
    /// Print the boot's progress on stderr once it has taken
    /// [`STATUS_AFTER`] (`false`: `-q`).
    pub progress: bool,
}

/// How long the boot may take before `coworkvm run` says what it waits for.
pub const STATUS_AFTER: Duration = Duration::from_secs(2);

/// What `coworkvm run` boots.
pub enum RunMachine {
    /// A prepared bundle, as `startVM` boots it.
    Bundle(VmImages),
    /// A kernel and an initramfs, no disks.
    Bare {
        kernel: BootFile,
        initrd: BootFile,
        machine_uuid: Option<MachineUuid>,
    },
}

const PROCESS_ID: &str = "run";

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
    let console = match &cfg.console {
        Some(c) => c.clone(),
        None => dir.create_console()?,
    };
    // One thread: the VMM's PR_SET_PDEATHSIG follows the thread that forks
    // it, and this one lives until the VM is gone.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RunError::Io("starting the runtime", e))?;
    let r = rt.block_on(run_in(cfg, &dir, &console));
    if matches!(r, Err(RunError::VmEnded(_) | RunError::Timeout(_))) {
        if dir.path().join("console.log") == console {
            dir.keep();
        }
        eprintln!("coworkvm: the guest console log is {}", console.display());
    }
    r
}

/// How far `coworkvm run`'s output may run ahead of its standard output
/// before the run fails (the hub drops a subscriber past its budget).
const OUTPUT_BUDGET: usize = 1 << 30;
/// How long the agent may take to accept the command.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest may take to power off after the command ended.
const POWER_OFF_GRACE: Duration = Duration::from_secs(60);

async fn run_in(cfg: RunConfig, dir: &RunDir, console: &Path) -> Result<i32, RunError> {
    let vsock = dir.path().join("vsock.sock");
    let agent_path = PathBuf::from(format!("{}_{AGENT_VSOCK_PORT}", vsock.display()));
    let listener =
        AgentClient::listen(&agent_path).map_err(|e| RunError::Io("listening for the agent", e))?;
    let events = Arc::new(EventHub::with_budget(OUTPUT_BUDGET));
    let output = events.subscribe();
    let agent = AgentClient::new(events, None);
    let accept = agent.serve(listener);
    let spec = match cfg.machine {
        RunMachine::Bundle(images) => LaunchSpec::bundle(
            images,
            cfg.size.cpus,
            cfg.size.mem_mib,
            vsock,
            console.into(),
        )?,
        RunMachine::Bare {
            kernel,
            initrd,
            machine_uuid,
        } => LaunchSpec::bare(
            kernel,
            initrd,
            "quiet",
            cfg.size,
            vsock,
            console.into(),
            machine_uuid,
        )?,
    };
    let exe = std::env::current_exe().map_err(|e| RunError::Io("finding coworkvm", e))?;
    let launcher = ProcessLauncher {
        exe,
        inherit_stderr: true,
    };
    let LaunchedVm {
        control,
        mut exited,
        ..
    } = launcher.launch(&spec)?;
    drop(spec);

    // The agent's `ready`, the VMM's end, or the deadline: whichever first.
    // Past STATUS_AFTER, a line says what is awaited, and each boot step
    // the agent reports gets a line of its own (plain lines: a terminal
    // and a log read them alike).
    let booting = std::time::Instant::now();
    let ready = agent.wait_ready(cfg.connect_timeout);
    tokio::pin!(ready);
    let status_at = tokio::time::sleep(STATUS_AFTER);
    tokio::pin!(status_at);
    let mut steps: Vec<(String, String)> = Vec::new();
    let mut status_shown = !cfg.progress;
    loop {
        tokio::select! {
            r = &mut ready => {
                if !r {
                    let _ = control.send(VmSignal::Kill);
                    return Err(RunError::Timeout(cfg.connect_timeout));
                }
                break;
            }
            how = &mut exited => {
                return Err(RunError::VmEnded(how.unwrap_or_else(|_| "it vanished".into())));
            }
            _ = &mut status_at, if !status_shown => {
                status_shown = true;
                eprintln!("coworkvm: {}", boot_status(booting.elapsed(), &steps));
            }
            next = output.next() => {
                let event = match next {
                    Next::Event(e) => e,
                    Next::Overflowed { budget } => {
                        return Err(RunError::Protocol(format!(
                            "the boot's events ran {budget} bytes ahead"
                        )))
                    }
                };
                output.written(event.len());
                if let Some((step, status)) = startup_step(&event) {
                    if status_shown && cfg.progress {
                        eprintln!("coworkvm: boot step {step}: {status}");
                    }
                    steps.push((step, status));
                }
            }
        }
    }
    // Later connections are refused by the accept task (one per boot).
    let _accept = accept;

    let (program, args) = cfg
        .command
        .split_first()
        .ok_or_else(|| RunError::SpawnRefused("no command given".into()))?;
    let spawn = SpawnParams {
        id: PROCESS_ID.into(),
        name: cfg.session.clone().unwrap_or_else(|| "run".into()),
        command: program.clone(),
        args: args.to_vec(),
        encoding: Some(StreamEncoding::Base64),
        sandbox: Some(cfg.session.is_some()),
        ..SpawnParams::default()
    };
    agent
        .request(&GuestRequest::Spawn(Box::new(spawn)), SPAWN_TIMEOUT)
        .await
        .map_err(|e| classify_spawn_refusal(e.to_string()))?;

    // stdin -> the command, EOF included. A blocking reader thread feeds
    // a task that sends; a full channel holds the reader back.
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::channel::<(Vec<u8>, bool)>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = stdin.read(&mut buf).unwrap_or(0);
            if stdin_tx.blocking_send((buf[..n].to_vec(), n == 0)).is_err() || n == 0 {
                return;
            }
        }
    });
    let stdin_agent = agent.clone();
    tokio::spawn(async move {
        while let Some((data, eof)) = stdin_rx.recv().await {
            let n = GuestNotification::Stdin(StdinParams {
                id: PROCESS_ID.into(),
                data: B64.encode(&data),
                eof: Some(eof),
            });
            if stdin_agent.notify(&n).await.is_err() || eof {
                return;
            }
        }
    });

    // One stream for the whole run: a SIGINT that arrives while an output
    // event is being written is kept for the next turn, not lost.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| RunError::Io("listening for SIGINT", e))?;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let code = loop {
        tokio::select! {
            next = output.next() => {
                let event = match next {
                    Next::Event(e) => e,
                    Next::Overflowed { budget } => {
                        return Err(RunError::Protocol(format!(
                            "the command's output ran {budget} bytes ahead of this terminal"
                        )))
                    }
                };
                output.written(event.len());
                // The hub holds each event as its frame: 4 length bytes, JSON.
                let obj: serde_json::Map<String, Value> = event
                    .get(4..)
                    .and_then(|json| serde_json::from_slice(json).ok())
                    .unwrap_or_default();
                if obj.get("id").and_then(Value::as_str) != Some(PROCESS_ID) {
                    continue;
                }
                let data = || obj.get("data").and_then(Value::as_str).unwrap_or("");
                match obj.get("type").and_then(Value::as_str) {
                    Some("stdout") => {
                        let _ = stdout.write_all(&decode_stream(data())?);
                        let _ = stdout.flush();
                    }
                    Some("stderr") => {
                        let _ = stderr.write_all(&decode_stream(data())?);
                    }
                    Some("error") => {
                        let message = obj.get("message").and_then(Value::as_str).unwrap_or("");
                        eprintln!("coworkvm: guest: {message}");
                    }
                    Some("exit") => {
                        let code = obj.get("exitCode").and_then(Value::as_i64).map(|c| c as i32);
                        break exit_code(code, obj.get("signal"));
                    }
                    _ => {}
                }
            }
            _ = sigint.recv() => {
                let kill = GuestRequest::Kill(KillParams {
                    id: PROCESS_ID.into(),
                    signal: Some(Signal::Name("SIGINT".into())),
                });
                let agent = agent.clone();
                tokio::spawn(async move { agent.request(&kill, SPAWN_TIMEOUT).await });
            }
            how = &mut exited => {
                return Err(RunError::VmEnded(how.unwrap_or_else(|_| "it vanished".into())));
            }
        }
    };

    // Clean shutdown: the agent syncs and powers off; the VMM then exits.
    if let Err(e) = agent.request(&GuestRequest::Shutdown, SPAWN_TIMEOUT).await {
        eprintln!("coworkvm: the guest did not take the shutdown: {e}");
    }
    match tokio::time::timeout(POWER_OFF_GRACE, &mut exited).await {
        Ok(Ok(how)) if how.contains("exit status: 0") => {}
        Ok(Ok(how)) => eprintln!("coworkvm: the VM ended: {how}"),
        Ok(Err(_)) => {}
        Err(_) => {
            eprintln!("coworkvm: the VM did not power off in time; killing it");
            let _ = control.send(VmSignal::Kill);
            let _ = exited.await;
        }
    }
    Ok(code)
}

/// A `startupStep` event's step and status (the hub holds each event as
/// its frame: 4 length bytes, then JSON).
fn startup_step(frame: &[u8]) -> Option<(String, String)> {
    let obj: serde_json::Map<String, Value> = serde_json::from_slice(frame.get(4..)?).ok()?;
    if obj.get("type").and_then(Value::as_str) != Some("startupStep") {
        return None;
    }
    let field = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    Some((field("step"), field("status")))
}

/// The line `coworkvm run` prints when the boot takes a while.
pub fn boot_status(elapsed: Duration, steps: &[(String, String)]) -> String {
    let mut line = format!(
        "booting the VM: {:.0} s, waiting for its agent",
        elapsed.as_secs_f64()
    );
    if steps.is_empty() {
        line.push_str(" (no boot step reported yet)");
    } else {
        let seen: Vec<String> = steps.iter().map(|(s, st)| format!("{s} {st}")).collect();
        line.push_str(&format!("; steps so far: {}", seen.join(", ")));
    }
    line
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
    use serde_json::json;

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
    fn a_refused_spawn_gets_the_shells_status() {
        // The unsandboxed spawn's execve errors, as the agent words them.
        let missing =
            "the agent answered: cannot run nosuch: No such file or directory (os error 2)";
        assert_eq!(classify_spawn_refusal(missing.into()).exit_code(), 127);
        // The sandboxed spawn's own PATH check.
        let not_in_path = "cannot run nosuch: not found in /usr/bin:/bin";
        assert_eq!(classify_spawn_refusal(not_in_path.into()).exit_code(), 127);
        let denied = "cannot run /etc/passwd: Permission denied (os error 13)";
        assert_eq!(classify_spawn_refusal(denied.into()).exit_code(), 126);
        let not_a_program = "cannot run /x: Exec format error (os error 8)";
        assert_eq!(
            classify_spawn_refusal(not_a_program.into()).exit_code(),
            126
        );
        // Anything else is coworkvm's failure, not the command's.
        let other = "process id run is already in use";
        assert_eq!(classify_spawn_refusal(other.into()).exit_code(), 125);
        assert_eq!(RunError::Timeout(Duration::from_secs(1)).exit_code(), 125);
        assert_eq!(RunError::VmEnded("exit status: 1".into()).exit_code(), 125);
    }

    #[test]
    fn the_boot_status_line_names_the_steps_seen() {
        let none = boot_status(Duration::from_millis(2100), &[]);
        assert_eq!(
            none,
            "booting the VM: 2 s, waiting for its agent (no boot step reported yet)"
        );
        let frame = |v: Value| {
            let json = serde_json::to_vec(&v).unwrap();
            let mut f = (json.len() as u32).to_be_bytes().to_vec();
            f.extend(json);
            f
        };
        let step = startup_step(&frame(
            json!({"type": "startupStep", "step": "rootfs", "status": "completed"}),
        ))
        .unwrap();
        assert_eq!(step, ("rootfs".to_string(), "completed".to_string()));
        assert!(startup_step(&frame(json!({"type": "stdout", "id": "run"}))).is_none());
        assert!(startup_step(b"ab").is_none());
        let line = boot_status(Duration::from_secs(5), &[step]);
        assert!(line.ends_with("steps so far: rootfs completed"), "{line}");
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
