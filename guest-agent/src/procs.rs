//! The processes the host spawned: their pipes, their exits, and the one
//! reaper that collects every child (PID 1 inherits orphans too).
//!
//! Nothing here makes the connection's reader wait for a session: each
//! process has its own stdin writer thread fed by a bounded queue, and its
//! own output pumps; the reader only queues chunks and looks things up.
//! Every thread is created with `std::thread::Builder`, and a process
//! whose threads cannot all be created is killed and its spawn refused:
//! with `panic = "abort"` a panic here would take PID 1, and so the whole
//! guest, with it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;
use socket_proto::guest::{encode_output_frame, GuestEvent, GuestFrame};
use socket_proto::host::{Signal, SpawnParams, StreamEncoding};

use crate::conn::Sender;
use crate::lock;

/// The most output one `stdout`/`stderr` event carries: one read of the
/// process's pipe, whose buffer is made this big too, so a fast writer's
/// output travels in few large frames (each frame costs the guest a vsock
/// packet or more, a queue notification and VM exits). Far below the
/// protocol's 10 MiB frame limit even when every byte needs a 6-byte JSON
/// escape. A read returns what the pipe holds: small output still goes at
/// once.
pub const OUTPUT_CHUNK: usize = 256 * 1024;

/// The most processes that are starting, running, or still pumping output
/// (all sessions together). Each holds up to four threads and a few
/// descriptors in the agent; a spawn past it is refused.
pub const MAX_PROCESSES: usize = 256;

/// Processes whose exit was reported and whose output is drained that the
/// agent still remembers (`isProcessRunning` answers their exit code, and
/// their ids stay taken); past it the oldest are forgotten.
pub const MAX_FINISHED_PROCESSES: usize = 1024;

/// The most `stdin` chunks waiting for one process's writer (the one being
/// written included); a chunk past it is refused, not dropped silently.
/// Small chunks are joined up to [`STDIN_JOIN_BYTES`], so a burst of short
/// lines takes few.
pub const MAX_STDIN_CHUNKS: usize = 64;

/// Chunks queued for a writer are joined while the result stays this small
/// (a pipe's default buffer).
const STDIN_JOIN_BYTES: usize = 64 * 1024;

/// The most `stdin` bytes waiting for one process's writer.
pub const MAX_STDIN_BYTES: usize = 16 * 1024 * 1024;

/// The most `stdin` bytes waiting for all processes together.
pub const MAX_STDIN_BYTES_TOTAL: usize = 64 * 1024 * 1024;

/// How often a stdin writer waiting on a full pipe looks whether its
/// process has ended (a grandchild may hold the pipe without reading).
const STDIN_POLL: Duration = Duration::from_millis(200);

/// How long after its exit a process's output may still drain before the
/// exit is reported anyway (a background grandchild may hold the pipes).
const DRAIN_GRACE: Duration = Duration::from_millis(300);

/// Why a spawn, a kill or a reservation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("process id {0} is already in use")]
    InUse(String),
    #[error(
        "too many processes: {MAX_PROCESSES} are starting or running in the guest; \
         wait for one to exit"
    )]
    TooMany,
    #[error("cannot run {label}: {source}")]
    Spawn { label: String, source: io::Error },
    #[error("cannot start a thread for process {id}: {source}; the process was killed")]
    Thread { id: String, source: io::Error },
    #[error("no process {0}")]
    NoSuchProcess(String),
    #[error("process {0} is still starting")]
    Starting(String),
    #[error("unknown signal {0}")]
    UnknownSignal(String),
    #[error("kill {id}: {source}")]
    Kill { id: String, source: io::Error },
}

impl From<ProcError> for String {
    fn from(e: ProcError) -> String {
        e.to_string()
    }
}

/// Why a `stdin` chunk was not queued.
#[derive(Debug, thiserror::Error)]
pub enum StdinError {
    #[error("no process {0}")]
    NoSuchProcess(String),
    #[error("stdin of {0} is closed")]
    Closed(String),
    #[error("stdin of {id} is not base64 ({reason}); its stdin is closed after what came before")]
    NotBase64 { id: String, reason: String },
    #[error(
        "stdin of {id} is full: {chunks} chunks ({bytes} bytes) wait for it (at most \
         {MAX_STDIN_CHUNKS} chunks, {MAX_STDIN_BYTES} bytes); the process is not reading its \
         stdin, and this chunk of {len} bytes was not written"
    )]
    Full {
        id: String,
        chunks: usize,
        bytes: usize,
        len: usize,
    },
    #[error(
        "stdin of {id}: the agent already holds {MAX_STDIN_BYTES_TOTAL} bytes of stdin that \
         processes have not read; this chunk of {len} bytes was not written"
    )]
    AgentFull { id: String, len: usize },
}

impl StdinError {
    /// Data was lost: the host must hear of it. (Stdin for a process that
    /// ended or never was is dropped quietly, as a closed pipe would.)
    pub fn loses_data(&self) -> bool {
        matches!(
            self,
            StdinError::NotBase64 { .. } | StdinError::Full { .. } | StdinError::AgentFull { .. }
        )
    }
}

#[derive(Default)]
struct StdinState {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes in `chunks` plus those of the chunk being written.
    bytes: usize,
    /// The writer holds a chunk (counted in the bounds until written).
    writing: Option<usize>,
    /// No data after `chunks`: the writer closes the pipe after them.
    eof: bool,
    /// The pipe is gone (the process ended, or nobody reads it): chunks
    /// are refused and the writer stops.
    closed: bool,
    /// A refusal for being full was logged (once per process).
    full_logged: bool,
}

/// One process's stdin: chunks in the order they came, written by the
/// process's own writer thread.
struct StdinQueue {
    state: Mutex<StdinState>,
    ready: Condvar,
    /// Bytes waiting in every queue (shared by all of them).
    total: Arc<AtomicUsize>,
}

impl StdinQueue {
    fn new(total: Arc<AtomicUsize>) -> Arc<Self> {
        Arc::new(StdinQueue {
            state: Mutex::new(StdinState::default()),
            ready: Condvar::new(),
            total,
        })
    }

    /// Queues `bytes` (then the end of the stream when `eof`), or refuses
    /// them whole.
    fn push(&self, id: &str, bytes: Vec<u8>, eof: bool) -> Result<(), StdinError> {
        let mut s = lock(&self.state);
        if s.closed || s.eof {
            return Err(StdinError::Closed(id.to_owned()));
        }
        let len = bytes.len();
        if len > 0 {
            let waiting = s.chunks.len() + usize::from(s.writing.is_some());
            if waiting >= MAX_STDIN_CHUNKS || s.bytes + len > MAX_STDIN_BYTES {
                let e = StdinError::Full {
                    id: id.to_owned(),
                    chunks: waiting,
                    bytes: s.bytes,
                    len,
                };
                if !s.full_logged {
                    s.full_logged = true;
                    eprintln!("coworkvm-agent: {e}");
                }
                // The bytes are refused, but an end of input they carried
                // still ends it: the process is never left waiting for an
                // EOF that was sent.
                s.eof |= eof;
                self.ready.notify_one();
                return Err(e);
            }
            let before = self.total.fetch_add(len, Ordering::Relaxed);
            if before + len > MAX_STDIN_BYTES_TOTAL {
                self.total.fetch_sub(len, Ordering::Relaxed);
                s.eof |= eof;
                self.ready.notify_one();
                return Err(StdinError::AgentFull {
                    id: id.to_owned(),
                    len,
                });
            }
            s.bytes += len;
            match s.chunks.back_mut() {
                Some(last) if last.len() + len <= STDIN_JOIN_BYTES => last.extend(bytes),
                _ => s.chunks.push_back(bytes),
            }
        }
        s.eof |= eof;
        self.ready.notify_one();
        Ok(())
    }

    /// Ends the stream at once: what waits is dropped, later chunks are
    /// refused, the writer stops.
    fn close(&self) {
        let mut s = lock(&self.state);
        s.closed = true;
        let queued: usize = s.chunks.iter().map(Vec::len).sum();
        s.chunks.clear();
        s.bytes -= queued;
        self.total.fetch_sub(queued, Ordering::Relaxed);
        self.ready.notify_all();
    }

    fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// The next chunk to write; `None` when the writer should close the
    /// pipe and stop.
    fn next(&self) -> Option<Vec<u8>> {
        let s = lock(&self.state);
        let mut s = self
            .ready
            .wait_while(s, |s| s.chunks.is_empty() && !s.eof && !s.closed)
            .unwrap_or_else(PoisonError::into_inner);
        if s.closed {
            return None;
        }
        let chunk = s.chunks.pop_front()?;
        s.writing = Some(chunk.len());
        Some(chunk)
    }

    /// The chunk `next` gave is written (or given up).
    fn done_writing(&self) {
        let mut s = lock(&self.state);
        if let Some(len) = s.writing.take() {
            s.bytes -= len;
            self.total.fetch_sub(len, Ordering::Relaxed);
        }
    }
}

/// Writes `data` whole to the non-blocking `pipe`, waiting for room in
/// steps of [`STDIN_POLL`] and giving up once `gone()` says nobody will
/// read it.
fn write_all_polling(pipe: &File, mut data: &[u8], gone: impl Fn() -> bool) -> io::Result<()> {
    while !data.is_empty() {
        match (&*pipe).write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if gone() {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the process has ended",
                    ));
                }
                let mut pfd = libc::pollfd {
                    fd: pipe.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: poll(2) on one live pollfd that we own for the call.
                unsafe { libc::poll(&mut pfd, 1, STDIN_POLL.as_millis() as libc::c_int) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The stdin writer thread of one process: blocks only itself.
fn write_stdin(queue: Arc<StdinQueue>, pipe: File) {
    while let Some(chunk) = queue.next() {
        let r = write_all_polling(&pipe, &chunk, || queue.is_closed());
        queue.done_writing();
        if r.is_err() {
            // EPIPE (nobody reads any more) or the process ended.
            queue.close();
            return;
        }
    }
    // Dropping the pipe is the process's EOF.
}

/// Our end of a child's stdin, non-blocking so that its writer can notice
/// the process's end while the pipe is full.
fn nonblocking_stdin(stdin: ChildStdin) -> io::Result<File> {
    let fd = OwnedFd::from(stdin);
    // SAFETY: fcntl(2) F_GETFL on a descriptor we own; no memory involved.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl(2) F_SETFL on a descriptor we own; no memory involved.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(File::from(fd))
}

/// Grows a pipe's buffer to `size` bytes (best effort: the default 64 KiB
/// stays if the kernel refuses).
fn grow_pipe(fd: &impl AsRawFd, size: usize) {
    // SAFETY: fcntl(2) F_SETPIPE_SZ on a pipe fd we own; no memory involved.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int);
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: how many more threads [`start_thread`] may start from this
    /// thread before it fails as a system out of threads does.
    static THREADS_LEFT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Starts a named thread.
fn start_thread(name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    #[cfg(test)]
    if let Some(left) = THREADS_LEFT.get() {
        if left == 0 {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        THREADS_LEFT.set(Some(left - 1));
    }
    std::thread::Builder::new().name(name).spawn(f).map(drop)
}

struct Proc {
    id: String,
    /// The session (`spawn`'s `name`).
    session: String,
    /// The process group the agent made (the child called setsid or got
    /// process_group(0)): the direct child and, when not sandboxed, its tree.
    pgid: i32,
    /// Sandboxed: the sandbox's own process group (bwrap `--new-session`),
    /// once bwrap has reported it on its info fd.
    sandbox_pgid: Option<i32>,
    sandboxed: bool,
    /// The last signal `kill` sent: a sandbox that ends with 128+n after
    /// signal n is reported as ended by that signal.
    last_signal: Option<i32>,
    stdin: Arc<StdinQueue>,
    encoding: StreamEncoding,
    exit: Option<(Option<i32>, Option<i32>)>,
    /// stdout and stderr not at EOF yet (or given up on [`DRAIN_GRACE`]
    /// after the exit); the exit event waits for both.
    open_pipes: u8,
    /// Output pumps still running: they outlive `open_pipes` while a
    /// grandchild holds a pipe, and count towards [`MAX_PROCESSES`].
    pumps: u8,
    exit_sent: bool,
    /// In `Inner::finished`.
    retired: bool,
}

impl Proc {
    /// Holds threads or a process in the guest.
    fn is_live(&self) -> bool {
        self.exit.is_none() || self.pumps > 0
    }
}

/// A spawn accepted but not started yet: stdin that comes meanwhile waits
/// in its queue, in order.
struct Starting {
    session: String,
    encoding: StreamEncoding,
    stdin: Arc<StdinQueue>,
}

#[derive(Clone, Default)]
pub struct Procs {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// Every process the agent remembers, by serial number (ids and pids
    /// are reused; serials never are).
    procs: HashMap<u64, Proc>,
    next_serial: u64,
    /// The process each id names.
    by_id: HashMap<String, u64>,
    /// The process each pid is, until it is reaped.
    by_pid: HashMap<i32, u64>,
    /// Spawns accepted and not started yet, by id.
    starting: HashMap<String, Starting>,
    /// Retired processes, oldest first: at most [`MAX_FINISHED_PROCESSES`].
    finished: VecDeque<u64>,
    /// Stdin bytes waiting in all queues.
    stdin_total: Arc<AtomicUsize>,
    sender: Option<Sender>,
    /// Called (without the lock) with a session's name once its last
    /// process has exited and no spawn of it is starting.
    on_session_idle: Option<SessionIdleHook>,
}

/// What runs when a session has no process left (`Procs::set_session_idle_hook`).
pub type SessionIdleHook = Arc<dyn Fn(&Procs, &str) + Send + Sync>;

impl Inner {
    fn live(&self) -> usize {
        self.starting.len() + self.procs.values().filter(|p| p.is_live()).count()
    }

    /// Whether `session` has no process that has not exited and no spawn
    /// starting.
    fn session_idle(&self, session: &str) -> bool {
        !self
            .procs
            .values()
            .any(|p| p.session == session && p.exit.is_none())
            && !self.starting.values().any(|s| s.session == session)
    }

    fn id_taken(&self, id: &str) -> bool {
        self.by_id.contains_key(id) || self.starting.contains_key(id)
    }

    /// Sends `exit` once the process is gone and its output is drained;
    /// retires it once its pumps have ended too.
    fn settle(&mut self, serial: u64) {
        let Some(p) = self.procs.get_mut(&serial) else {
            return;
        };
        if !p.exit_sent && p.open_pipes == 0 {
            if let Some((code, sig)) = p.exit {
                p.exit_sent = true;
                let ev = GuestEvent::Exit {
                    id: p.id.clone(),
                    code,
                    signal: sig.map(|s| json!(signal_name(s))),
                    oom_kill_count: Some(0),
                };
                if let Some(s) = &self.sender {
                    let _ = s.send(&GuestFrame::event(&ev));
                }
            }
        }
        if p.exit_sent && p.pumps == 0 && !p.retired {
            p.retired = true;
            self.finished.push_back(serial);
            while self.finished.len() > MAX_FINISHED_PROCESSES {
                let Some(old) = self.finished.pop_front() else {
                    break;
                };
                if let Some(p) = self.procs.remove(&old) {
                    if self.by_id.get(&p.id) == Some(&old) {
                        self.by_id.remove(&p.id);
                    }
                }
            }
        }
    }

    /// Forgets a process whose spawn failed after it started.
    fn forget(&mut self, serial: u64) {
        if let Some(p) = self.procs.remove(&serial) {
            if self.by_id.get(&p.id) == Some(&serial) {
                self.by_id.remove(&p.id);
            }
            self.by_pid.retain(|_, s| *s != serial);
            p.stdin.close();
        }
    }
}

fn signal_number(s: Option<&Signal>) -> Result<i32, ProcError> {
    Ok(match s {
        None => libc::SIGTERM,
        Some(Signal::Number(n)) => *n,
        Some(Signal::Name(n)) => match n.trim_start_matches("SIG") {
            "TERM" => libc::SIGTERM,
            "KILL" => libc::SIGKILL,
            "INT" => libc::SIGINT,
            "HUP" => libc::SIGHUP,
            "QUIT" => libc::SIGQUIT,
            "USR1" => libc::SIGUSR1,
            "USR2" => libc::SIGUSR2,
            "STOP" => libc::SIGSTOP,
            "CONT" => libc::SIGCONT,
            other => return Err(ProcError::UnknownSignal(other.to_owned())),
        },
    })
}
fn signal_name(n: i32) -> String {
    match n {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        other => format!("SIG{other}"),
    }
}

/// (code, signal) to report. bwrap ends with 128+n when the command died
/// of signal n; after a `kill` with n, that is reported as signal n.
pub fn exit_of(
    sandboxed: bool,
    last_signal: Option<i32>,
    code: Option<i32>,
    signal: Option<i32>,
) -> (Option<i32>, Option<i32>) {
    match (sandboxed, last_signal, code) {
        (true, Some(s), Some(c)) if c == 128 + s => (None, Some(s)),
        _ => (code, signal),
    }
}

/// The output pipes and stdin of a process just started.
struct Pipes {
    stdin: Option<ChildStdin>,
    stdout: Option<Box<dyn Read + Send>>,
    stderr: Option<Box<dyn Read + Send>>,
    info: Option<OwnedFd>,
}

impl Procs {
    pub fn set_sender(&self, s: Option<Sender>) {
        lock(&self.inner).sender = s;
    }

    /// `hook(session)` runs on the reaper once a session's last process
    /// has exited. It must not call back into a held `Procs` lock (it is
    /// called without it).
    pub fn set_session_idle_hook(&self, hook: SessionIdleHook) {
        lock(&self.inner).on_session_idle = Some(hook);
    }

    /// The session of process `id` while it has not exited.
    pub fn running_session_of(&self, id: &str) -> Option<String> {
        let inner = lock(&self.inner);
        let p = inner.procs.get(inner.by_id.get(id)?)?;
        p.exit.is_none().then(|| p.session.clone())
    }

    /// The unsandboxed command of a spawn (no session disk or no bwrap):
    /// as root, in `/` unless `cwd` says otherwise, in its own process
    /// group, with the agent's environment plus the spawn's `env`.
    pub fn direct_command(p: &SpawnParams, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(&p.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = &p.cwd {
            cmd.current_dir(cwd);
        }
        if let Some(env) = &p.env {
            cmd.envs(env.expose());
        }
        cmd
    }

    /// Whether a process (running or remembered) has this id. A spawn
    /// [`reserve`](Self::reserve)d and not started yet does not count: its
    /// own spawn must go on.
    pub fn is_in_use(&self, id: &str) -> bool {
        lock(&self.inner).by_id.contains_key(id)
    }

    /// Takes `id` for a spawn that starts later (on a worker), within
    /// [`MAX_PROCESSES`]; `stdin` for it queues meanwhile. Either
    /// [`spawn`](Self::spawn) takes the reservation or
    /// [`unreserve`](Self::unreserve) drops it.
    pub fn reserve(
        &self,
        id: &str,
        session: &str,
        encoding: StreamEncoding,
    ) -> Result<(), ProcError> {
        let mut inner = lock(&self.inner);
        if inner.id_taken(id) {
            return Err(ProcError::InUse(id.to_owned()));
        }
        if inner.live() >= MAX_PROCESSES {
            return Err(ProcError::TooMany);
        }
        let stdin = StdinQueue::new(inner.stdin_total.clone());
        inner.starting.insert(
            id.to_owned(),
            Starting {
                session: session.to_owned(),
                encoding,
                stdin,
            },
        );
        Ok(())
    }

    /// Drops `id`'s reservation if its spawn did not take it (it failed).
    pub fn unreserve(&self, id: &str) {
        if let Some(s) = lock(&self.inner).starting.remove(id) {
            s.stdin.close();
        }
    }

    /// Sessions with a process that has not exited or is starting.
    pub fn running_sessions(&self) -> HashSet<String> {
        let inner = lock(&self.inner);
        inner
            .procs
            .values()
            .filter(|p| p.exit.is_none())
            .map(|p| p.session.clone())
            .chain(inner.starting.values().map(|s| s.session.clone()))
            .collect()
    }

    /// Starts `cmd` (stdio piped; a new process group or session made by
    /// the command itself) as process `id` of `session`. `info`: the read
    /// end of a sandbox's bwrap `--info-fd` pipe.
    pub fn spawn(
        &self,
        id: &str,
        session: &str,
        mut cmd: Command,
        encoding: StreamEncoding,
        info: Option<OwnedFd>,
        label: &str,
    ) -> Result<(), ProcError> {
        let sandboxed = info.is_some();
        // Hold the lock across spawn so the reaper cannot see the pid first.
        let mut inner = lock(&self.inner);
        if inner.by_id.contains_key(id) {
            return Err(ProcError::InUse(id.to_owned()));
        }
        let stdin_queue = match inner.starting.remove(id) {
            Some(reserved) => reserved.stdin,
            None if inner.live() >= MAX_PROCESSES => return Err(ProcError::TooMany),
            None => StdinQueue::new(inner.stdin_total.clone()),
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                stdin_queue.close();
                return Err(ProcError::Spawn {
                    label: label.to_owned(),
                    source,
                });
            }
        };
        // The write end of the info pipe (if any) lives in `cmd`'s caller
        // and is closed there; the child holds its own copy.
        let pid = child.id() as i32;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        for fd in stdout.iter() {
            grow_pipe(fd, OUTPUT_CHUNK);
        }
        for fd in stderr.iter() {
            grow_pipe(fd, OUTPUT_CHUNK);
        }
        let pipes = Pipes {
            stdin: child.stdin.take(),
            stdout: stdout.map(|s| Box::new(s) as Box<dyn Read + Send>),
            stderr: stderr.map(|s| Box::new(s) as Box<dyn Read + Send>),
            info,
        };
        // The reaper waits for it; Child is not waited on here.
        drop(child);
        let serial = inner.next_serial;
        inner.next_serial += 1;
        inner.by_id.insert(id.to_owned(), serial);
        inner.by_pid.insert(pid, serial);
        inner.procs.insert(
            serial,
            Proc {
                id: id.to_owned(),
                session: session.to_owned(),
                pgid: pid,
                sandbox_pgid: None,
                sandboxed,
                last_signal: None,
                stdin: stdin_queue.clone(),
                encoding,
                exit: None,
                open_pipes: 2,
                pumps: 2,
                exit_sent: false,
                retired: false,
            },
        );
        drop(inner);
        if let Err(source) = self.start_threads(serial, pid, id, pipes, encoding, stdin_queue) {
            // Forgotten first, so the reaper reaps it as a stranger and no
            // exit is reported for a spawn that failed.
            lock(&self.inner).forget(serial);
            // SAFETY: kill(2) on the process group we created; no memory involved.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            return Err(ProcError::Thread {
                id: id.to_owned(),
                source,
            });
        }
        Ok(())
    }

    /// The process's threads: its two output pumps, its stdin writer, and
    /// (sandboxed) the reader of bwrap's info. Threads that started before
    /// one failed end by themselves once the process is killed.
    fn start_threads(
        &self,
        serial: u64,
        pid: i32,
        id: &str,
        pipes: Pipes,
        encoding: StreamEncoding,
        stdin_queue: Arc<StdinQueue>,
    ) -> io::Result<()> {
        for (pipe, is_err) in [(pipes.stdout, false), (pipes.stderr, true)] {
            let procs = self.clone();
            let id = id.to_owned();
            let name = format!("{}-{pid}", if is_err { "err" } else { "out" });
            start_thread(name, move || procs.pump(serial, id, pipe, is_err, encoding))?;
        }
        match pipes.stdin.map(nonblocking_stdin) {
            Some(Ok(pipe)) => {
                start_thread(format!("in-{pid}"), move || write_stdin(stdin_queue, pipe))?
            }
            Some(Err(e)) => return Err(e),
            None => stdin_queue.close(),
        }
        if let Some(info) = pipes.info {
            let procs = self.clone();
            start_thread(format!("info-{pid}"), move || {
                if let Some(child_pid) = crate::sandbox::read_child_pid(info) {
                    if let Some(p) = lock(&procs.inner).procs.get_mut(&serial) {
                        p.sandbox_pgid = Some(child_pid);
                    }
                }
            })?;
        }
        Ok(())
    }

    fn pump(
        &self,
        serial: u64,
        id: String,
        mut pipe: Option<Box<dyn Read + Send>>,
        is_err: bool,
        encoding: StreamEncoding,
    ) {
        if let (Some(pipe), StreamEncoding::Base64) = (pipe.as_mut(), encoding) {
            let mut buf = vec![0u8; OUTPUT_CHUNK];
            loop {
                let n = match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let data = base64::engine::general_purpose::STANDARD.encode(&buf[..n]);
                self.output(serial, &id, &data, is_err);
            }
        } else if let Some(mut pipe) = pipe {
            // buf[..have]: bytes read and not sent yet; between reads only
            // the start of a UTF-8 character split by the read (<= 3 bytes).
            let mut buf = vec![0u8; OUTPUT_CHUNK];
            let mut have = 0;
            loop {
                let n = match pipe.read(&mut buf[have..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                have += n;
                // Send whole UTF-8 characters; keep a split one for the next
                // read. Valid text (the usual case) is sent without a copy.
                let sent = match std::str::from_utf8(&buf[..have]) {
                    Ok(text) => {
                        self.output(serial, &id, text, is_err);
                        have
                    }
                    Err(e) => {
                        let end = if e.error_len().is_none() {
                            e.valid_up_to()
                        } else {
                            have
                        };
                        self.output(serial, &id, &String::from_utf8_lossy(&buf[..end]), is_err);
                        end
                    }
                };
                buf.copy_within(sent..have, 0);
                have -= sent;
            }
            if have > 0 {
                self.output(serial, &id, &String::from_utf8_lossy(&buf[..have]), is_err);
            }
        }
        let mut inner = lock(&self.inner);
        if let Some(p) = inner.procs.get_mut(&serial) {
            p.open_pipes = p.open_pipes.saturating_sub(1);
            p.pumps = p.pumps.saturating_sub(1);
        }
        inner.settle(serial);
    }

    /// Sends one `stdout`/`stderr` event, encoded straight from `data`.
    fn output(&self, serial: u64, id: &str, data: &str, is_err: bool) {
        if data.is_empty() {
            return;
        }
        let sender = {
            let inner = lock(&self.inner);
            if !inner.procs.contains_key(&serial) {
                // A spawn that failed after it started: nothing to report.
                return;
            }
            inner.sender.clone()
        };
        if let Some(s) = sender {
            match encode_output_frame(is_err, id, data) {
                Ok(wire) => s.send_encoded(&wire),
                Err(e) => eprintln!("coworkvm-agent: encoding output of {id}: {e}"),
            }
        }
    }

    /// Queues `data` (then the end of the stream when `eof`) for process
    /// `id`'s stdin writer; never waits for the process. Over the queue's
    /// bounds the chunk is refused whole and the error says so.
    pub fn stdin(&self, id: &str, data: &str, eof: bool) -> Result<(), StdinError> {
        let (queue, encoding) = {
            let inner = lock(&self.inner);
            if let Some(p) = inner.by_id.get(id).and_then(|s| inner.procs.get(s)) {
                (p.stdin.clone(), p.encoding)
            } else if let Some(s) = inner.starting.get(id) {
                (s.stdin.clone(), s.encoding)
            } else {
                return Err(StdinError::NoSuchProcess(id.to_owned()));
            }
        };
        let bytes = match encoding {
            StreamEncoding::Utf8 => data.as_bytes().to_vec(),
            StreamEncoding::Base64 => {
                match base64::engine::general_purpose::STANDARD.decode(data) {
                    Ok(b) => b,
                    Err(e) => {
                        // Dropping bytes silently would corrupt the stream:
                        // end it instead, so the process sees EOF.
                        let _ = queue.push(id, Vec::new(), true);
                        return Err(StdinError::NotBase64 {
                            id: id.to_owned(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
        };
        queue.push(id, bytes, eof)
    }

    pub fn kill(&self, id: &str, signal: Option<&Signal>) -> Result<(), ProcError> {
        let sig = signal_number(signal)?;
        let mut inner = lock(&self.inner);
        if inner.starting.contains_key(id) {
            return Err(ProcError::Starting(id.to_owned()));
        }
        let serial = *inner
            .by_id
            .get(id)
            .ok_or_else(|| ProcError::NoSuchProcess(id.to_owned()))?;
        let p = inner
            .procs
            .get_mut(&serial)
            .ok_or_else(|| ProcError::NoSuchProcess(id.to_owned()))?;
        if p.exit.is_some() {
            return Ok(());
        }
        p.last_signal = Some(sig);
        // A sandbox: its own group (the command and everything below it,
        // not the outer bwrap, so a handled signal is just that).
        if let Some(g) = p.sandbox_pgid {
            // SAFETY: kill(2) on a process group; no memory involved.
            if unsafe { libc::kill(-g, sig) } == 0 {
                return Ok(());
            }
            // ESRCH: the sandbox's group is gone or not made yet; the
            // outer group below still reaches it.
        }
        // SAFETY: kill(2) on the process group we created; no memory involved.
        if unsafe { libc::kill(-p.pgid, sig) } != 0 {
            return Err(ProcError::Kill {
                id: id.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// (running, exit code) of `id`; a spawn not started yet is running.
    pub fn running(&self, id: &str) -> Option<(bool, Option<i32>)> {
        let inner = lock(&self.inner);
        if inner.starting.contains_key(id) {
            return Some((true, None));
        }
        let p = inner.procs.get(inner.by_id.get(id)?)?;
        Some(match p.exit {
            None => (true, None),
            Some((code, _)) => (false, code),
        })
    }

    /// Reaps every child for good; records the exits of ours. Fails only
    /// when its helper thread (the one that gives up on output
    /// [`DRAIN_GRACE`] after an exit) cannot be started.
    pub fn reap_forever(&self) -> io::Result<Infallible> {
        let (drain_tx, drain_rx) = mpsc::channel::<(u64, Instant)>();
        let procs = self.clone();
        start_thread("agent-drain".into(), move || procs.drain_forever(drain_rx))?;
        loop {
            // Learn of an exit without reaping it yet: a spawn holds the
            // lock across fork and exec, and when the exec fails std reaps
            // that child itself (and panics if it is gone, which in PID 1
            // panics the kernel). So the reaping waits for the lock.
            // SAFETY: an all-zero siginfo_t is a valid value; waitid(2)
            // writes only to `info`, a live local.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let r =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if r < 0 {
                // No children right now: wait for the next one.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            // SAFETY: waitid filled in a child's exit, so si_pid is set.
            let pid = unsafe { info.si_pid() };
            let mut inner = lock(&self.inner);
            let mut status = 0;
            // SAFETY: waitpid(2) writes only to `status`, a live local.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
                // Reaped meanwhile by whoever spawned it.
                continue;
            }
            let es = std::process::ExitStatus::from_raw(status);
            let Some(serial) = inner.by_pid.remove(&pid) else {
                continue;
            };
            let mut session = None;
            if let Some(p) = inner.procs.get_mut(&serial) {
                p.exit = Some(exit_of(p.sandboxed, p.last_signal, es.code(), es.signal()));
                p.stdin.close();
                session = Some(p.session.clone());
            }
            inner.settle(serial);
            let idle = session
                .filter(|s| inner.session_idle(s))
                .zip(inner.on_session_idle.clone());
            drop(inner);
            if let Some((session, hook)) = idle {
                hook(self, &session);
            }
            // A background grandchild may hold the pipes open for ever:
            // give the output a moment to drain, then report the exit.
            let _ = drain_tx.send((serial, Instant::now() + DRAIN_GRACE));
        }
    }

    /// Reports each exit [`DRAIN_GRACE`] after it at the latest (the
    /// deadlines come in order).
    fn drain_forever(&self, deadlines: mpsc::Receiver<(u64, Instant)>) {
        for (serial, deadline) in deadlines {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            let mut inner = lock(&self.inner);
            if let Some(p) = inner.procs.get_mut(&serial) {
                p.open_pipes = 0;
            }
            inner.settle(serial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_exit_after_kill_is_the_signal() {
        // bwrap's 128+n after our SIGTERM: the signal.
        assert_eq!(exit_of(true, Some(15), Some(143), None), (None, Some(15)));
        // Without a kill, or another signal, or unsandboxed: as it is.
        assert_eq!(exit_of(true, None, Some(143), None), (Some(143), None));
        assert_eq!(exit_of(true, Some(9), Some(143), None), (Some(143), None));
        assert_eq!(exit_of(false, Some(15), Some(143), None), (Some(143), None));
        assert_eq!(exit_of(true, Some(9), None, Some(9)), (None, Some(9)));
        assert_eq!(exit_of(true, Some(15), Some(0), None), (Some(0), None));
    }

    use std::io::BufReader;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::Receiver;

    use socket_proto::frame::read_frame;

    /// Procs whose events arrive on the receiver.
    fn procs_with_events() -> (Procs, Receiver<GuestEvent>) {
        let procs = Procs::default();
        let (ours, theirs) = UnixStream::pair().unwrap();
        procs.set_sender(Some(Sender::new(File::from(OwnedFd::from(theirs)))));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(ours);
            while let Ok(Some(obj)) = read_frame(&mut r) {
                if let Ok(Some(GuestFrame::Event { event, params })) = GuestFrame::parse(obj) {
                    if let Ok(ev) = GuestEvent::parse(&event, params) {
                        let _ = tx.send(ev);
                    }
                }
            }
        });
        (procs, rx)
    }

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        cmd
    }

    /// `id`'s stdout until it holds `want` bytes (30 s at most).
    fn stdout_of(events: &Receiver<GuestEvent>, id: &str, want: usize) -> String {
        let mut out = String::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(GuestEvent::Stdout { id: i, data }) if i == id => out.push_str(&data),
                Ok(_) => {}
                Err(_) => panic!("{id}: {} of {want} bytes of stdout came", out.len()),
            }
        }
        out
    }

    /// `id`'s base64 stdout, decoded event by event, until it holds `want`
    /// bytes.
    fn base64_stdout_of(events: &Receiver<GuestEvent>, id: &str, want: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(GuestEvent::Stdout { id: i, data }) if i == id => out.extend(
                    base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .unwrap(),
                ),
                Ok(_) => {}
                Err(_) => panic!("{id}: {} of {want} bytes of stdout came", out.len()),
            }
        }
        out
    }

    /// Whether a process with this exact argument exists (not a zombie:
    /// a zombie's cmdline is empty).
    fn process_with_arg(arg: &str) -> bool {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
        })
    }

    #[test]
    fn a_process_that_never_reads_stdin_blocks_only_its_own_writer() {
        let (procs, events) = procs_with_events();
        procs
            .spawn(
                "deaf",
                "a",
                sh("exec sleep 60"),
                StreamEncoding::Utf8,
                None,
                "sleep",
            )
            .unwrap();
        procs
            .spawn(
                "cat",
                "b",
                sh("exec cat"),
                StreamEncoding::Utf8,
                None,
                "cat",
            )
            .unwrap();
        // 300 x 64 KiB (18.75 MiB) at a process that never reads: each call
        // answers at once; past the bound the chunks are refused, never
        // dropped quietly.
        let feeder = procs.clone();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let chunk = "x".repeat(64 * 1024);
            let results: Vec<_> = (0..300)
                .map(|_| feeder.stdin("deaf", &chunk, false))
                .collect();
            let _ = done_tx.send(results);
        });
        let results = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("writeStdin to a process that does not read blocked the caller");
        // The chunk bound, plus what the pipe's 64 KiB buffer took.
        let accepted = results.iter().filter(|r| r.is_ok()).count();
        assert!(
            (MAX_STDIN_CHUNKS..=MAX_STDIN_CHUNKS + 2).contains(&accepted),
            "{accepted} chunks accepted"
        );
        let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(matches!(refused, StdinError::Full { .. }), "{refused}");
        assert!(refused.loses_data());
        assert!(
            refused.to_string().contains("stdin of deaf is full"),
            "{refused}"
        );
        // Another process's stdin still flows, in order.
        let mut want = String::new();
        for i in 0..200 {
            let line = format!("line {i}\n");
            procs.stdin("cat", &line, false).unwrap();
            want.push_str(&line);
        }
        procs.stdin("cat", "", true).unwrap();
        assert_eq!(stdout_of(&events, "cat", want.len()), want);
        // Nothing more is taken after the end of the stream.
        assert!(matches!(
            procs.stdin("cat", "late", false),
            Err(StdinError::Closed(_))
        ));
        // Killing the deaf process frees its writer and its bytes.
        procs
            .kill("deaf", Some(&Signal::Name("KILL".into())))
            .unwrap();
        let total = lock(&procs.inner).stdin_total.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        while total.load(Ordering::Relaxed) != 0 {
            assert!(
                Instant::now() < deadline,
                "the deaf process's stdin is still held"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn stdin_chunks_are_bounded_in_number_and_bytes() {
        let total = Arc::new(AtomicUsize::new(0));
        let q = StdinQueue::new(total.clone());
        // Large chunks: the byte bound.
        let mib = 1024 * 1024;
        let mut n = 0;
        while q.push("p", vec![0; mib], false).is_ok() {
            n += 1;
        }
        assert_eq!(n, MAX_STDIN_BYTES / mib);
        // A refused chunk that ends the input still ends it.
        assert!(!lock(&q.state).eof);
        assert!(q.push("p", vec![0; mib], true).is_err());
        assert!(lock(&q.state).eof, "the EOF of a refused chunk was lost");
        q.close();
        assert_eq!(total.load(Ordering::Relaxed), 0);
        // Small ones are joined, and the count bounds the unjoinable.
        let q = StdinQueue::new(total.clone());
        for _ in 0..10_000 {
            q.push("p", b"ab".to_vec(), false).unwrap();
        }
        assert_eq!(lock(&q.state).chunks.len(), 1);
        let q = StdinQueue::new(total.clone());
        let mut n = 0;
        while q.push("p", vec![0; STDIN_JOIN_BYTES], false).is_ok() {
            n += 1;
        }
        assert_eq!(n, MAX_STDIN_CHUNKS);
        assert_eq!(
            total.load(Ordering::Relaxed),
            MAX_STDIN_CHUNKS * STDIN_JOIN_BYTES + 20_000
        );
        q.close();
        // All queues together: a third queue hits the agent-wide bound.
        let queues: Vec<_> = (0..MAX_STDIN_BYTES_TOTAL / MAX_STDIN_BYTES)
            .map(|_| StdinQueue::new(total.clone()))
            .collect();
        let e = queues
            .iter()
            .flat_map(|q| (0..16).map(move |_| q.push("p", vec![0; 1024 * 1024], false)))
            .find_map(Result::err)
            .unwrap();
        assert!(matches!(e, StdinError::AgentFull { .. }), "{e}");
        assert!(total.load(Ordering::Relaxed) <= MAX_STDIN_BYTES_TOTAL);
        // Past the end of the stream nothing is taken.
        let q = StdinQueue::new(Arc::new(AtomicUsize::new(0)));
        q.push("p", b"x".to_vec(), true).unwrap();
        assert!(matches!(
            q.push("p", b"y".to_vec(), false),
            Err(StdinError::Closed(_))
        ));
    }

    #[test]
    fn stdin_sent_before_the_spawn_ran_arrives_first_and_in_order() {
        let (procs, events) = procs_with_events();
        procs.reserve("early", "s", StreamEncoding::Base64).unwrap();
        assert_eq!(procs.running("early"), Some((true, None)));
        assert!(matches!(
            procs.kill("early", None),
            Err(ProcError::Starting(_))
        ));
        assert!(matches!(
            procs.reserve("early", "s", StreamEncoding::Utf8),
            Err(ProcError::InUse(_))
        ));
        assert!(procs.running_sessions().contains("s"));
        procs.stdin("early", "b25l", false).unwrap(); // "one"
        procs.stdin("early", "dHdv", true).unwrap(); // "two"
        procs
            .spawn(
                "early",
                "s",
                sh("exec cat"),
                StreamEncoding::Base64,
                None,
                "cat",
            )
            .unwrap();
        procs.unreserve("early"); // taken by the spawn: nothing to drop
        assert_eq!(base64_stdout_of(&events, "early", 6), b"onetwo");
    }

    #[test]
    fn stdin_that_is_not_base64_is_refused_and_ends_the_stream() {
        let (procs, events) = procs_with_events();
        procs
            .spawn(
                "b",
                "s",
                sh("cat; echo END"),
                StreamEncoding::Base64,
                None,
                "cat",
            )
            .unwrap();
        procs.stdin("b", "aGk=", false).unwrap(); // "hi"
        let e = procs.stdin("b", "not base64!", false).unwrap_err();
        assert!(e.loses_data(), "{e}");
        assert_eq!(base64_stdout_of(&events, "b", 6), b"hiEND\n");
    }

    #[test]
    fn processes_are_bounded() {
        let procs = Procs::default();
        for i in 0..MAX_PROCESSES {
            procs
                .reserve(&format!("p{i}"), "s", StreamEncoding::Utf8)
                .unwrap();
        }
        let e = procs
            .reserve("one-more", "s", StreamEncoding::Utf8)
            .unwrap_err();
        assert!(matches!(e, ProcError::TooMany), "{e}");
        assert!(e.to_string().contains("too many processes"));
        // A spawn without a reservation is counted too.
        let e = procs
            .spawn(
                "direct",
                "s",
                sh("true"),
                StreamEncoding::Utf8,
                None,
                "true",
            )
            .unwrap_err();
        assert!(matches!(e, ProcError::TooMany), "{e}");
        procs.unreserve("p0");
        procs
            .reserve("one-more", "s", StreamEncoding::Utf8)
            .unwrap();
    }

    #[test]
    fn finished_processes_are_forgotten_oldest_first() {
        let mut inner = Inner::default();
        let n = MAX_FINISHED_PROCESSES + 10;
        for serial in 0..n as u64 {
            let id = format!("p{serial}");
            inner.by_id.insert(id.clone(), serial);
            inner.procs.insert(
                serial,
                Proc {
                    id,
                    session: "s".into(),
                    pgid: 0,
                    sandbox_pgid: None,
                    sandboxed: false,
                    last_signal: None,
                    stdin: StdinQueue::new(inner.stdin_total.clone()),
                    encoding: StreamEncoding::Utf8,
                    exit: Some((Some(0), None)),
                    open_pipes: 0,
                    pumps: 0,
                    exit_sent: false,
                    retired: false,
                },
            );
            inner.settle(serial);
        }
        assert_eq!(inner.procs.len(), MAX_FINISHED_PROCESSES);
        assert_eq!(inner.by_id.len(), MAX_FINISHED_PROCESSES);
        assert!(!inner.by_id.contains_key("p9"));
        assert!(inner.by_id.contains_key("p10"));
        assert_eq!(inner.live(), 0);
    }

    #[test]
    fn a_spawn_whose_threads_cannot_start_fails_and_its_process_is_killed() {
        let (procs, events) = procs_with_events();
        // Unique, so the test can look for it in /proc.
        let marker = format!("{}.{}", 600 + std::process::id() % 100, std::process::id());
        for threads_left in [0, 1, 2] {
            THREADS_LEFT.set(Some(threads_left));
            let e = procs
                .spawn(
                    "t",
                    "s",
                    sh(&format!("exec sleep {marker}")),
                    StreamEncoding::Utf8,
                    None,
                    "sleep",
                )
                .unwrap_err();
            THREADS_LEFT.set(None);
            assert!(matches!(e, ProcError::Thread { .. }), "{e}");
            assert!(e.to_string().contains("the process was killed"), "{e}");
            // The id is free again and nothing about it is reported.
            assert!(!procs.is_in_use("t"));
            assert_eq!(procs.running("t"), None);
            let deadline = Instant::now() + Duration::from_secs(10);
            while process_with_arg(&marker) {
                assert!(
                    Instant::now() < deadline,
                    "the process outlived its failed spawn"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Zombies may stay unreaped here (no reaper in this test); the
        // agent's reaper reaps strangers. No exit event was sent for them.
        std::thread::sleep(Duration::from_millis(100));
        assert!(events
            .try_iter()
            .all(|e| !matches!(e, GuestEvent::Exit { .. })));
        assert_eq!(lock(&procs.inner).live(), 0);
    }
}
