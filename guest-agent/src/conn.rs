//! The control connection to the helper: vsock CID 2, port 51234, dialed
//! from a privileged source port and redialed every second while it is
//! down.
//!
//! The connection's reader thread never waits for anything a session
//! controls: requests that touch the disk or start processes run on a
//! small pool of worker threads with a bounded queue (past it: "the agent
//! is busy"), stdin goes to each process's own writer (`procs`), and
//! `readFile` opens by descriptor, without following links, non-blocking,
//! regular files only, size-checked before a byte is read.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use socket_proto::frame::{read_frame, write_frame, FrameError};
use socket_proto::guest::{
    AgentInfo, FrameId, GuestError, GuestEvent, GuestFrame, GuestNotification, GuestRequest,
    AGENT_SOURCE_PORTS, AGENT_VSOCK_PORT, PROTOCOL_VERSION,
};

use crate::agent::{Agent, RequestError};
use crate::lock;

/// Worker threads for the requests that may block (on the disk, or on
/// what a session made): at most this many run at once.
pub const WORKER_THREADS: usize = 8;

/// Requests accepted for the workers and waiting for one; a request past
/// it is answered [`BusyError`] at once instead of queued without bound.
pub const MAX_QUEUED_REQUESTS: usize = 64;

/// The most bytes `readFile` returns: its base64 (4/3 of it) plus the
/// frame's JSON stays under the protocol's 10 MiB frame limit. Checked
/// from the file's size before anything is read.
pub const READ_FILE_MAX_BYTES: u64 = 7 * 1024 * 1024;

/// Serialized writes of whole frames from any thread.
#[derive(Clone)]
pub struct Sender(Arc<Mutex<File>>);

impl Sender {
    /// A sender on any file (tests read the frames from its other end).
    #[cfg(test)]
    pub fn new(f: File) -> Self {
        Sender(Arc::new(Mutex::new(f)))
    }

    /// Writes one whole frame; a frame that cannot be encoded (too large)
    /// is not written at all. Errors are logged here too.
    pub fn send(&self, frame: &GuestFrame) -> Result<(), FrameError> {
        let mut f = lock(&self.0);
        let r = write_frame(&mut *f, frame);
        if let Err(e) = &r {
            eprintln!("coworkvm-agent: sending a frame: {e}");
        }
        let _ = f.flush();
        r
    }

    /// Writes a frame already encoded (length prefix and body), whole.
    pub fn send_encoded(&self, wire: &[u8]) {
        let mut f = lock(&self.0);
        if let Err(e) = f.write_all(wire) {
            eprintln!("coworkvm-agent: sending a frame: {e}");
        }
    }
}

/// Why the agent could not dial the helper.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("creating a vsock socket: {0}")]
    Socket(io::Error),
    #[error("binding vsock source port {port} (a privileged port, which needs CAP_NET_BIND_SERVICE): {source}")]
    Bind { port: u32, source: io::Error },
    #[error("every privileged vsock source port ({}..={}) is in use", .0.start(), .0.end())]
    NoFreePort(RangeInclusive<u32>),
    #[error("connecting to vsock {cid}:{port} from port {from}: {source}")]
    Connect {
        cid: u32,
        port: u32,
        from: u32,
        source: io::Error,
    },
}

/// Binds the first port of `ports` that is free, from the highest down,
/// with `bind`; a port in use is skipped, any other error ends the search.
pub fn bind_first_free(
    ports: RangeInclusive<u32>,
    mut bind: impl FnMut(u32) -> io::Result<()>,
) -> Result<u32, DialError> {
    for port in ports.clone().rev() {
        match bind(port) {
            Ok(()) => return Ok(port),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
            Err(source) => return Err(DialError::Bind { port, source }),
        }
    }
    Err(DialError::NoFreePort(ports))
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; zero is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as u16;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

/// Connects to vsock `cid:port` from a source port in
/// [`AGENT_SOURCE_PORTS`]: the host takes a stream to the agent's port
/// only from a privileged port, which no session process can bind.
pub fn dial(cid: u32, port: u32) -> Result<File, DialError> {
    // SAFETY: socket(2) with constant arguments returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(DialError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: fd is new and owned by nothing else; File closes it.
    let f = unsafe { File::from_raw_fd(fd) };
    let from = bind_first_free(AGENT_SOURCE_PORTS, |p| {
        let local = vsock_addr(libc::VMADDR_CID_ANY, p);
        // SAFETY: `local` is a live sockaddr_vm and the length is its size.
        let r = unsafe {
            libc::bind(
                f.as_raw_fd(),
                &local as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as u32,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    })?;
    let addr = vsock_addr(cid, port);
    // SAFETY: `addr` is a live sockaddr_vm and the length is its size.
    let r = unsafe {
        libc::connect(
            f.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        )
    };
    if r < 0 {
        return Err(DialError::Connect {
            cid,
            port,
            from,
            source: io::Error::last_os_error(),
        });
    }
    Ok(f)
}

pub const CAPABILITIES: &[&str] = &[
    "spawn",
    "kill",
    "stdin",
    "readFile",
    "shutdown",
    "base64Streams",
];

/// The answer to a request the workers cannot take now.
#[derive(Debug, thiserror::Error)]
#[error(
    "the agent is busy: {WORKER_THREADS} requests are running and {MAX_QUEUED_REQUESTS} \
     wait; try again later"
)]
pub struct BusyError;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed pool of worker threads with a bounded queue.
pub struct Workers {
    jobs: SyncSender<Job>,
}

impl Workers {
    /// Starts `threads` workers (named `agent-worker-N`) sharing a queue of
    /// `queue` jobs.
    pub fn start(threads: usize, queue: usize) -> io::Result<Self> {
        let (jobs, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("agent-worker-{i}"))
                .spawn(move || loop {
                    let job = lock(&rx).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Workers { jobs })
    }

    /// Queues `job`, or refuses it when the queue is full.
    pub fn run(&self, job: Job) -> Result<(), BusyError> {
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            // Disconnected cannot happen while `self` holds the sender and
            // the workers hold the receiver; either way nothing runs it.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(BusyError),
        }
    }
}

/// Serves connections forever.
pub fn serve(
    agent: Agent,
    workers: Workers,
    steps: Vec<crate::StartupStep>,
    mut timeline: crate::BootTimeline,
) -> ! {
    let agent = Arc::new(agent);
    let mut announced = false;
    let mut first = true;
    loop {
        let stream = match dial(2, AGENT_VSOCK_PORT) {
            Ok(s) => s,
            Err(e) => {
                if !announced {
                    eprintln!(
                        "coworkvm-agent: host not reachable yet ({e}); retrying every second"
                    );
                    announced = true;
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        announced = false;
        if first {
            first = false;
            timeline.mark("connected");
            eprintln!("coworkvm-agent: {}", timeline.line());
        }
        let Ok(write_half) = stream.try_clone() else {
            continue;
        };
        let sender = Sender(Arc::new(Mutex::new(write_half)));
        agent.procs.set_sender(Some(sender.clone()));
        for s in &steps {
            let status = if s.error.is_some() {
                "failed"
            } else {
                "completed"
            };
            let _ = sender.send(&GuestFrame::event(&GuestEvent::StartupStep {
                step: s.step.into(),
                status: status.into(),
            }));
            if let Some(e) = &s.error {
                let _ = sender.send(&GuestFrame::event(&GuestEvent::Error {
                    id: None,
                    message: format!("{}: {e}", s.step),
                    fatal: None,
                }));
            }
        }
        let _ = sender.send(&GuestFrame::event(&GuestEvent::Ready));
        let mut reader = BufReader::new(stream);
        loop {
            match read_frame(&mut reader) {
                Ok(Some(obj)) => match GuestFrame::parse(obj) {
                    Ok(Some(frame)) => handle(&agent, &workers, &sender, frame),
                    Ok(None) => eprintln!("coworkvm-agent: ignoring a frame without type"),
                    Err(e) => eprintln!("coworkvm-agent: {e}"),
                },
                Ok(None) => break,
                Err(e) if e.is_recoverable() => eprintln!("coworkvm-agent: bad frame: {e}"),
                Err(e) => {
                    eprintln!("coworkvm-agent: connection lost: {e}");
                    break;
                }
            }
        }
        agent.procs.set_sender(None);
        // The helper takes one agent connection per boot and closes any
        // later one at once: redialing without a pause would spin.
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Whether a request may block on the disk, on a session's files or on
/// starting a process: it runs on a worker. The others only look at
/// memory or signal, and are answered on the reader thread.
pub fn runs_on_worker(req: &GuestRequest) -> bool {
    match req {
        GuestRequest::Spawn(_)
        | GuestRequest::ReadFile(_)
        | GuestRequest::InstallSdk(_)
        | GuestRequest::InstallSdkChunk(_)
        | GuestRequest::InstallSdkCommit(_)
        | GuestRequest::GetSessionsDiskInfo(_)
        | GuestRequest::DeleteSessionDirs(_)
        | GuestRequest::PruneSessionCaches(_)
        // Mounting waits on the shared-folder device (the host's virtiofsd).
        | GuestRequest::MountPath(_)
        // Dials the host and waits for its reply.
        | GuestRequest::EgressProbe(_) => true,
        GuestRequest::AgentInfo
        | GuestRequest::Kill(_)
        | GuestRequest::IsProcessRunning(_)
        | GuestRequest::AddApprovedOauthToken(_)
        | GuestRequest::SetDebugLogging(_)
        | GuestRequest::Shutdown
        | GuestRequest::Unknown(_) => false,
    }
}

/// Sends a request's answer; `Ok(None)`: already sent. An answer too large
/// for a frame becomes an error, so the request is never left unanswered.
fn answer(sender: &Sender, id: &FrameId, method: &str, reply: Result<Option<Value>, GuestError>) {
    match reply {
        Ok(Some(v)) => {
            if let Err(e @ FrameError::TooLarge(_)) =
                sender.send(&GuestFrame::result(id.clone(), v))
            {
                let message = format!("{method}: the answer does not fit in a frame: {e}");
                let _ = sender.send(&GuestFrame::error(id.clone(), GuestError::Text(message)));
            }
        }
        Ok(None) => {}
        Err(e) => {
            crate::debug!("request {id} ({method}) failed: {}", e.message());
            let _ = sender.send(&GuestFrame::error(id.clone(), e));
        }
    }
}

fn handle(agent: &Arc<Agent>, workers: &Workers, sender: &Sender, frame: GuestFrame) {
    match frame {
        GuestFrame::Request { id, method, params } => {
            // Names only: params may carry secrets.
            crate::debug!("request {id}: {method}");
            let req = match GuestRequest::parse(&method, params) {
                Ok(req) => req,
                Err(e) => return answer(sender, &id, &method, Err(e)),
            };
            if !runs_on_worker(&req) {
                let reply = respond_inline(agent, sender, &id, req);
                return answer(sender, &id, &method, reply);
            }
            // A spawn takes its id now, so stdin sent right after it waits
            // for the process in order instead of finding no process.
            let spawn_id = match &req {
                GuestRequest::Spawn(p) => {
                    let encoding = p.encoding.unwrap_or_default();
                    if let Err(e) = agent.procs.reserve(&p.id, &p.name, encoding) {
                        return answer(sender, &id, &method, Err(GuestError::Text(e.into())));
                    }
                    Some(p.id.clone())
                }
                _ => None,
            };
            let job = {
                let (agent, sender, id, method) =
                    (agent.clone(), sender.clone(), id.clone(), method.clone());
                Box::new(move || {
                    let reply =
                        respond_on_worker(&agent, req).map_err(|e| GuestError::Text(e.to_string()));
                    answer(&sender, &id, &method, reply.map(Some));
                })
            };
            if let Err(busy) = workers.run(job) {
                if let Some(pid) = spawn_id {
                    agent.procs.unreserve(&pid);
                }
                eprintln!("coworkvm-agent: {method}: {busy}");
                answer(
                    sender,
                    &id,
                    &method,
                    Err(GuestError::Text(busy.to_string())),
                );
            }
        }
        GuestFrame::Notification { method, params } => {
            let eof = params.get("eof").and_then(Value::as_bool).unwrap_or(false);
            match GuestNotification::parse(&method, params) {
                Ok(GuestNotification::Stdin(s)) => {
                    if let Err(e) = agent.procs.stdin(&s.id, &s.data, eof) {
                        if e.loses_data() {
                            // A notification has no answer: the host hears
                            // of the lost chunk as an error event.
                            let _ = sender.send(&GuestFrame::event(&GuestEvent::Error {
                                id: Some(s.id.clone()),
                                message: e.to_string(),
                                fatal: Some(false),
                            }));
                        } else {
                            crate::debug!("{e}");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => eprintln!("coworkvm-agent: notification {method}: {}", e.message()),
            }
        }
        GuestFrame::Response { .. } | GuestFrame::Event { .. } => {}
    }
}

/// The requests answered on the reader thread. `Ok(None)`: the reply was
/// already sent (shutdown).
fn respond_inline(
    agent: &Agent,
    sender: &Sender,
    id: &FrameId,
    req: GuestRequest,
) -> Result<Option<Value>, GuestError> {
    let text = |s: String| GuestError::Text(s);
    Ok(Some(match req {
        GuestRequest::AgentInfo => serde_json::to_value(AgentInfo {
            agent: "coworkvm-agent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            capabilities: agent.capabilities(),
        })
        .unwrap_or(Value::Null),
        GuestRequest::Kill(k) => {
            agent
                .procs
                .kill(&k.id, k.signal.as_ref())
                .map_err(|e| text(e.into()))?;
            json!({})
        }
        GuestRequest::IsProcessRunning(p) => match agent.procs.running(&p.id) {
            Some((running, Some(code))) => json!({"running": running, "exitCode": code}),
            Some((running, None)) => json!({ "running": running }),
            None => json!({"running": false}),
        },
        GuestRequest::AddApprovedOauthToken(t) => {
            agent.add_oauth_token(t.token);
            json!({})
        }
        GuestRequest::SetDebugLogging(d) => {
            crate::set_debug(d.enabled);
            json!({})
        }
        GuestRequest::Shutdown => {
            let _ = sender.send(&GuestFrame::result(id.clone(), json!({})));
            crate::init::power_off();
        }
        GuestRequest::Unknown(m) => return Err(GuestError::unknown_method(&m)),
        // Not reached: `handle` sends these to the workers.
        other => respond_on_worker(agent, other).map_err(|e| text(e.to_string()))?,
    }))
}

/// The requests that run on a worker.
fn respond_on_worker(agent: &Agent, req: GuestRequest) -> Result<Value, RequestError> {
    match req {
        GuestRequest::Spawn(p) => {
            let r = agent.spawn(&p);
            // Taken by the process when it started; dropped if it did not.
            agent.procs.unreserve(&p.id);
            if r.is_err() {
                // Its mount tree, if nothing else of the session holds it.
                agent.release_mounts(&p.name);
            }
            r
        }
        GuestRequest::MountPath(m) => agent.mount_path(&m),
        GuestRequest::ReadFile(r) => {
            let bytes = read_session_file(agent.sessions_root(), &r.process_name, &r.file_path)?;
            Ok(json!({"content": base64::engine::general_purpose::STANDARD.encode(bytes)}))
        }
        GuestRequest::InstallSdk(p) => agent.install_sdk(&p),
        GuestRequest::InstallSdkChunk(c) => agent.install_sdk_chunk(&c),
        GuestRequest::InstallSdkCommit(c) => agent.install_sdk_commit(&c.version),
        GuestRequest::GetSessionsDiskInfo(_) => agent.disk_info(),
        GuestRequest::DeleteSessionDirs(d) => agent.delete_sessions(&d.names),
        GuestRequest::PruneSessionCaches(p) => agent.prune(&p),
        GuestRequest::EgressProbe(p) => agent.egress_probe(&p),
        other => Err(RequestError::NotAWorkersRequest(other.name().to_owned())),
    }
}

/// Why `readFile` refused.
#[derive(Debug, thiserror::Error)]
pub enum ReadFileError {
    #[error(transparent)]
    BadSession(#[from] crate::sessions::SessionError),
    #[error("session {name}: {source}")]
    SessionDir { name: String, source: io::Error },
    #[error("{path} is outside {dir}")]
    Outside { path: String, dir: String },
    #[error("{path} is or passes through a symbolic link, which readFile does not follow")]
    Symlink { path: String },
    #[error("{path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("{path} is {kind}, not a regular file")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path} is {size} bytes, over readFile's limit of {READ_FILE_MAX_BYTES} bytes")]
    TooLarge { path: String, size: u64 },
    #[error("{path} grew past readFile's limit of {READ_FILE_MAX_BYTES} bytes while it was read")]
    Grew { path: String },
    #[error("{path} is a hard link to a file its session does not own")]
    ForeignLink { path: String },
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
}

/// openat2(2) of `path` beneath `dir`: no symlink followed anywhere, no
/// `..` above `dir`, no magic link.
fn open_beneath(dir: &OwnedFd, path: &Path, flags: i32) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: open_how is plain data; zero is a valid start (and the
    // required value of every field we do not set).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated `c_path` and `how` (of the
    // size passed), both live for the call; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is new and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The path `path` names relative to the session directory `dir`
/// (`<root>/<name>`): the client names `/sessions/<name>/...`; a relative
/// path is taken as relative to the session directory. `..` is left for
/// the kernel to hold beneath the directory.
fn relative_to_session(dir: &Path, path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let rel = if p.is_absolute() {
        p.strip_prefix(dir).ok()?
    } else {
        p
    };
    let rel: PathBuf = rel
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    Some(if rel.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        rel
    })
}

fn file_kind(ft: libc::mode_t) -> &'static str {
    match ft & libc::S_IFMT {
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symbolic link",
        _ => "not a regular file",
    }
}

/// `readFile`: the bytes of a regular file inside `<root>/<name>`, opened
/// by descriptor without following any link (a link swapped in after a
/// check cannot redirect it), non-blocking (a FIFO cannot hang it), its
/// size checked against [`READ_FILE_MAX_BYTES`] before reading.
pub fn read_session_file(root: &Path, name: &str, path: &str) -> Result<Vec<u8>, ReadFileError> {
    crate::sessions::validate_name(name).map_err(ReadFileError::BadSession)?;
    let dir_path = root.join(name);
    let session_err = |source| ReadFileError::SessionDir {
        name: name.to_owned(),
        source,
    };
    let rel = relative_to_session(&dir_path, path).ok_or_else(|| ReadFileError::Outside {
        path: path.to_owned(),
        dir: dir_path.display().to_string(),
    })?;
    // The root is the agent's (`/sessions`); the session's own directory
    // is opened beneath it like the file, so a link there is refused too.
    let root_fd = File::open(root).map(OwnedFd::from).map_err(session_err)?;
    let dir = open_beneath(&root_fd, Path::new(name), libc::O_PATH | libc::O_DIRECTORY)
        .map_err(session_err)?;
    let file = open_beneath(&dir, &rel, libc::O_RDONLY | libc::O_NONBLOCK).map_err(|source| {
        let path = path.to_owned();
        match source.raw_os_error() {
            Some(libc::ELOOP) => ReadFileError::Symlink { path },
            Some(libc::EXDEV) => ReadFileError::Outside {
                path,
                dir: dir_path.display().to_string(),
            },
            // Opening a socket file.
            Some(libc::ENXIO) => ReadFileError::NotRegular {
                path,
                kind: "a socket",
            },
            _ => ReadFileError::Open { path, source },
        }
    })?;
    let file = File::from(file);
    let read_err = |source| ReadFileError::Read {
        path: path.to_owned(),
        source,
    };
    let md = file.metadata().map_err(read_err)?;
    if !md.file_type().is_file() {
        return Err(ReadFileError::NotRegular {
            path: path.to_owned(),
            kind: file_kind(md.mode() as libc::mode_t),
        });
    }
    // A second name of a file the session could not read itself (made
    // with link(2) from elsewhere on the disk) is not the session's.
    if md.nlink() > 1 {
        let dir_md = File::from(dir).metadata().map_err(read_err)?;
        if md.uid() != dir_md.uid() {
            return Err(ReadFileError::ForeignLink {
                path: path.to_owned(),
            });
        }
    }
    if md.len() > READ_FILE_MAX_BYTES {
        return Err(ReadFileError::TooLarge {
            path: path.to_owned(),
            size: md.len(),
        });
    }
    // The file may grow meanwhile: read one byte past the limit at most.
    let mut bytes = Vec::with_capacity(md.len() as usize);
    file.take(READ_FILE_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > READ_FILE_MAX_BYTES {
        return Err(ReadFileError::Grew {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::Receiver;
    use std::time::Instant;

    #[test]
    fn the_source_port_is_the_highest_free_privileged_one() {
        assert!(AGENT_SOURCE_PORTS.end() < &1024 && AGENT_SOURCE_PORTS.start() > &0);
        let in_use = |p: u32| p >= 1021;
        let mut tried = Vec::new();
        let got = bind_first_free(AGENT_SOURCE_PORTS, |p| {
            tried.push(p);
            if in_use(p) {
                Err(io::Error::from_raw_os_error(libc::EADDRINUSE))
            } else {
                Ok(())
            }
        })
        .unwrap();
        assert_eq!(got, 1020);
        assert_eq!(tried, [1023, 1022, 1021, 1020]);
        // Not allowed to bind a privileged port (a session would be): no
        // fallback to an unprivileged one, the search stops.
        let mut calls = 0;
        let e = bind_first_free(AGENT_SOURCE_PORTS, |_| {
            calls += 1;
            Err(io::Error::from_raw_os_error(libc::EACCES))
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(matches!(e, DialError::Bind { port: 1023, .. }), "{e}");
        // Every one in use.
        let mut tried = Vec::new();
        let e = bind_first_free(AGENT_SOURCE_PORTS, |p| {
            tried.push(p);
            Err(io::Error::from_raw_os_error(libc::EADDRINUSE))
        })
        .unwrap_err();
        assert!(matches!(e, DialError::NoFreePort(_)), "{e}");
        assert_eq!(tried.len(), 1023);
        assert!(tried.iter().all(|p| AGENT_SOURCE_PORTS.contains(p)));
    }

    /// `<tmp>/sessions/{s1,s2,.coworkvm}` with a file in each.
    fn session_disk() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("sessions");
        for dir in ["s1", "s2", ".coworkvm"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(root.join("s1/f"), b"hello").unwrap();
        std::fs::create_dir(root.join("s1/sub")).unwrap();
        std::fs::write(root.join("s1/sub/g"), b"deep").unwrap();
        std::fs::write(root.join("s2/secret"), b"s2's").unwrap();
        std::fs::write(root.join(".coworkvm/users.json"), b"{}").unwrap();
        (d, root)
    }

    /// `read_session_file` on another thread: a hang fails the test
    /// instead of stalling it.
    fn read_within(root: &Path, name: &str, path: &str) -> Result<Vec<u8>, ReadFileError> {
        let (root, name, owned) = (root.to_owned(), name.to_owned(), path.to_owned());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_session_file(&root, &name, &owned));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("readFile of {path} hung"))
    }

    #[test]
    fn read_file_returns_a_regular_files_bytes() {
        let (_d, root) = session_disk();
        let abs = |p: &str| root.join(p).to_string_lossy().into_owned();
        assert_eq!(read_within(&root, "s1", &abs("s1/f")).unwrap(), b"hello");
        assert_eq!(read_within(&root, "s1", &abs("s1/sub/g")).unwrap(), b"deep");
        assert_eq!(
            read_within(&root, "s1", &abs("s1/./sub/../f")).unwrap(),
            b"hello"
        );
        // Relative to the session directory.
        assert_eq!(read_within(&root, "s1", "sub/g").unwrap(), b"deep");
        std::fs::write(root.join("s1/empty"), b"").unwrap();
        assert_eq!(read_within(&root, "s1", "empty").unwrap(), b"");
    }

    #[test]
    fn read_file_of_a_fifo_fails_at_once() {
        let (_d, root) = session_disk();
        let fifo = root.join("s1/fifo");
        let c = CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, live for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = Instant::now();
        let e = read_within(&root, "s1", fifo.to_str().unwrap()).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(e, ReadFileError::NotRegular { kind: "a FIFO", .. }),
            "{e}"
        );
        let e = read_within(&root, "s1", root.join("s1/sub").to_str().unwrap()).unwrap_err();
        assert!(
            e.to_string().contains("is a directory, not a regular file"),
            "{e}"
        );
        let e = read_within(&root, "s1", root.join("s1").to_str().unwrap()).unwrap_err();
        assert!(matches!(e, ReadFileError::NotRegular { .. }), "{e}");
    }

    #[test]
    fn read_file_follows_no_link_into_another_session() {
        let (_d, root) = session_disk();
        let s1 = root.join("s1");
        std::os::unix::fs::symlink(root.join("s2/secret"), s1.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../s2/secret", s1.join("rel-link")).unwrap();
        std::os::unix::fs::symlink("f", s1.join("inner-link")).unwrap();
        std::os::unix::fs::symlink(root.join("s2"), s1.join("dir-link")).unwrap();
        for p in ["abs-link", "rel-link", "inner-link", "dir-link/secret"] {
            let e = read_within(&root, "s1", s1.join(p).to_str().unwrap()).unwrap_err();
            assert!(matches!(e, ReadFileError::Symlink { .. }), "{p}: {e}");
            assert!(e.to_string().contains("symbolic link"), "{p}: {e}");
        }
        // The session directory itself swapped for a link to another one.
        std::os::unix::fs::symlink(root.join("s2"), root.join("s3")).unwrap();
        let e = read_within(&root, "s3", root.join("s3/secret").to_str().unwrap()).unwrap_err();
        assert!(matches!(e, ReadFileError::SessionDir { .. }), "{e}");
    }

    #[test]
    fn read_file_cannot_climb_out_of_the_session() {
        let (_d, root) = session_disk();
        let s1 = root.join("s1");
        for p in [
            s1.join("../.coworkvm/users.json"),
            s1.join("sub/../../s2/secret"),
            PathBuf::from("../.coworkvm/users.json"),
            PathBuf::from("sub/../../../etc/passwd"),
            root.join("s2/secret"),
            PathBuf::from("/etc/passwd"),
            PathBuf::from("/proc/self/environ"),
        ] {
            let e = read_within(&root, "s1", p.to_str().unwrap()).unwrap_err();
            assert!(
                matches!(e, ReadFileError::Outside { .. }),
                "{}: {e}",
                p.display()
            );
            assert!(e.to_string().contains("is outside"), "{e}");
        }
        for name in ["..", ".coworkvm/..", "", "a/b"] {
            assert!(read_within(&root, name, "f").is_err(), "{name:?}");
        }
    }

    #[test]
    fn read_file_refuses_a_huge_file_without_reading_it() {
        let (_d, root) = session_disk();
        let huge = root.join("s1/huge");
        let f = File::create(&huge).unwrap();
        f.set_len(1 << 30).unwrap(); // sparse: costs no disk
        drop(f);
        let started = Instant::now();
        let e = read_within(&root, "s1", huge.to_str().unwrap()).unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(
            matches!(e, ReadFileError::TooLarge { size, .. } if size == 1 << 30),
            "{e}"
        );
        let text = e.to_string();
        assert!(text.contains(&(1u64 << 30).to_string()), "{text}");
        assert!(text.contains(&READ_FILE_MAX_BYTES.to_string()), "{text}");
        // At the limit it is read; one byte over, not.
        std::fs::write(root.join("s1/max"), vec![7u8; READ_FILE_MAX_BYTES as usize]).unwrap();
        assert_eq!(
            read_within(&root, "s1", "max").unwrap().len() as u64,
            READ_FILE_MAX_BYTES
        );
        File::options()
            .append(true)
            .open(root.join("s1/max"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        assert!(matches!(
            read_within(&root, "s1", "max"),
            Err(ReadFileError::TooLarge { .. })
        ));
        // And the largest answer still fits in one frame.
        let content =
            base64::engine::general_purpose::STANDARD
                .encode(vec![0u8; READ_FILE_MAX_BYTES as usize]);
        let frame = GuestFrame::result(FrameId("x".repeat(1000)), json!({ "content": content }));
        socket_proto::frame::encode_frame(&frame).unwrap();
    }

    #[test]
    fn read_file_refuses_a_hard_link_to_a_file_its_session_does_not_own() {
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            coworkvm_tests::skip_or_fail("needs root to give the session directory away");
            return;
        }
        let (_d, root) = session_disk();
        std::os::unix::fs::chown(root.join("s1"), Some(1001), Some(1001)).unwrap();
        std::fs::hard_link(root.join(".coworkvm/users.json"), root.join("s1/users")).unwrap();
        let e = read_within(&root, "s1", "users").unwrap_err();
        assert!(matches!(e, ReadFileError::ForeignLink { .. }), "{e}");
        // The session's own file with a second name is its own.
        std::fs::write(root.join("s1/mine"), b"m").unwrap();
        std::os::unix::fs::chown(root.join("s1/mine"), Some(1001), Some(1001)).unwrap();
        std::fs::hard_link(root.join("s1/mine"), root.join("s1/mine2")).unwrap();
        assert_eq!(read_within(&root, "s1", "mine2").unwrap(), b"m");
    }

    #[test]
    fn the_worker_queue_is_bounded_and_answers_busy() {
        let workers = Workers::start(1, 1).unwrap();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (ran_tx, ran_rx) = mpsc::channel::<u32>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let job = |n: u32| -> Job {
            let (release_rx, ran_tx) = (release_rx.clone(), ran_tx.clone());
            Box::new(move || {
                let _ = release_rx.lock().unwrap().recv();
                let _ = ran_tx.send(n);
            })
        };
        workers.run(job(1)).unwrap();
        // The one worker is busy with job 1 once the queue is empty again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while workers.run(job(2)).is_err() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let e = workers.run(job(3)).unwrap_err();
        assert!(e.to_string().starts_with("the agent is busy"), "{e}");
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        let mut ran: Vec<u32> = (0..2)
            .map(|_| ran_rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        ran.sort();
        assert_eq!(ran, [1, 2]);
    }

    /// An agent on `<tmp>/sessions` whose frames come back on the receiver.
    fn agent_and_frames() -> (
        tempfile::TempDir,
        Arc<Agent>,
        Sender,
        Receiver<socket_proto::JsonObject>,
    ) {
        let (d, root) = session_disk();
        let agent = Agent::new(
            crate::procs::Procs::default(),
            root,
            None,
            None,
            crate::agent::WithoutSandbox::RunDirectly,
        );
        let (ours, theirs) = UnixStream::pair().unwrap();
        let sender = Sender::new(File::from(OwnedFd::from(theirs)));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(ours);
            while let Ok(Some(obj)) = read_frame(&mut r) {
                let _ = tx.send(obj);
            }
        });
        (d, Arc::new(agent), sender, rx)
    }

    fn request(id: &str, method: &str, params: Value) -> GuestFrame {
        GuestFrame::Request {
            id: FrameId(id.into()),
            method: method.into(),
            params,
        }
    }

    fn response(frames: &Receiver<socket_proto::JsonObject>, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = frames
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer to {id}"));
            if f.get("id").and_then(Value::as_str) == Some(id) {
                return Value::Object(f);
            }
        }
    }

    /// `egress.probe` runs on a worker and is the agent's to answer: an
    /// answer from the host's egress service, or (here, with no host) an
    /// error saying it could not be reached, never "not a worker's".
    #[test]
    fn the_egress_probe_is_answered_by_the_egress_channel() {
        let (_d, agent, sender, frames) = agent_and_frames();
        let workers = Workers::start(1, 1).unwrap();
        let probe = json!({"nonce": "n1", "host": "api.test", "port": 443});
        handle(
            &agent,
            &workers,
            &sender,
            request("p1", "egress.probe", probe),
        );
        let r = response(&frames, "p1");
        let e = r["error"].to_string();
        assert!(e.contains("cannot reach the host's egress service"), "{r}");
        assert!(!agent
            .capabilities()
            .contains(&socket_proto::egress::EGRESS_CAPABILITY.to_string()));
    }

    #[test]
    fn with_every_worker_stuck_quick_requests_are_still_answered() {
        let (_d, agent, sender, frames) = agent_and_frames();
        let workers = Workers::start(1, 1).unwrap();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        // Occupy the worker and fill the queue.
        let stuck = || -> Job {
            let r = release_rx.clone();
            Box::new(move || {
                let _ = r.lock().unwrap().recv();
            })
        };
        workers.run(stuck()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while workers.run(stuck()).is_err() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let read = json!({"processName": "s1", "filePath": "f"});
        handle(
            &agent,
            &workers,
            &sender,
            request("r1", "readFile", read.clone()),
        );
        let r = response(&frames, "r1");
        assert!(r["error"].to_string().contains("the agent is busy"), "{r}");
        // A spawn refused as busy gives its id back.
        let spawn =
            json!({"id": "p", "name": "s1", "command": "true", "args": [], "isResume": false});
        handle(&agent, &workers, &sender, request("r2", "spawn", spawn));
        assert!(response(&frames, "r2")["error"]
            .to_string()
            .contains("busy"));
        assert!(!agent.procs.is_in_use("p"));
        assert_eq!(agent.procs.running("p"), None);
        handle(
            &agent,
            &workers,
            &sender,
            request("r3", "isProcessRunning", json!({"id": "p"})),
        );
        assert_eq!(response(&frames, "r3")["result"], json!({"running": false}));
        handle(
            &agent,
            &workers,
            &sender,
            request("r4", "agent.info", json!({})),
        );
        assert_eq!(response(&frames, "r4")["result"]["agent"], "coworkvm-agent");
        // Once the workers are free, the same readFile is answered.
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            handle(
                &agent,
                &workers,
                &sender,
                request("r5", "readFile", read.clone()),
            );
            let r = response(&frames, "r5");
            if r["result"]["content"] == "aGVsbG8=" {
                break;
            }
            assert!(Instant::now() < deadline, "{r}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
