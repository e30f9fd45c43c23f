//! The guest side of the egress proxy (`socket_proto::egress`): each
//! session's network namespace with an HTTP proxy on `127.0.0.1:3128` and
//! a SOCKS5 proxy on `127.0.0.1:1080`, and the relay of every connection
//! they accept to the helper over vsock, tagged with the session's name.
//!
//! A session's namespace is made on its first sandboxed spawn (`netns`)
//! and kept while the session exists (dropped when it is deleted); every
//! spawn of the session enters it (`sandbox::command`'s `setns`), so a
//! session's processes share loopback and reach their own proxies only.
//! The listening sockets belong to the namespace; the agent's threads
//! that accept on them stay in the guest's own.
//!
//! Per connection: a thread reads the proxy request within
//! [`HANDSHAKE_TIME`] (the HTTP head at most [`http::MAX_HEAD`] bytes),
//! dials the host ([`vsock_dialer`]), writes the [`EgressOpen`] line,
//! reads the [`EgressReply`] line within [`REPLY_TIME`], answers the
//! session, and then copies bytes both ways (`stream::splice`). At most
//! [`MAX_PER_SESSION`] connections per session and [`MAX_PER_AGENT`] in
//! all are relayed at once; one more is refused as busy at once.

mod http;
mod netns;
mod socks;
mod stream;
mod target;

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use socket_proto::egress::{
    decode_line, encode_line, EgressOpen, EgressProbeParams, EgressRefusal, EgressReply, LineError,
    Via, EGRESS_VERSION, EGRESS_VSOCK_PORT, MAX_OPEN_LINE, MAX_REPLY_LINE,
};

use crate::conn::DialError;
use crate::lock;
pub use netns::NetnsError;
use stream::{BoundedReadError, DeadlineReader, Socket};

/// The stack of each thread the proxies start: they keep their buffers
/// on the heap.
const THREAD_STACK: usize = 256 * 1024;

/// How long a session has to send its whole proxy request (the HTTP head,
/// or the SOCKS5 greeting and request): a client that trickles bytes is
/// cut off then.
pub const HANDSHAKE_TIME: Duration = Duration::from_secs(10);

/// How long the host has to answer an open line. Longer than the helper's
/// own bounds on resolving (10 s) and connecting (10 s) together, so that
/// its answer (a timeout among them) is the one the session gets.
pub const REPLY_TIME: Duration = Duration::from_secs(25);

/// Connections relayed at once for one session.
pub const MAX_PER_SESSION: usize = 64;
/// Connections relayed at once for every session together.
pub const MAX_PER_AGENT: usize = 256;

/// The bounds of one [`Egress`] (tests shorten them).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub handshake: Duration,
    pub reply: Duration,
    pub per_session: usize,
    pub per_agent: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            handshake: HANDSHAKE_TIME,
            reply: REPLY_TIME,
            per_session: MAX_PER_SESSION,
            per_agent: MAX_PER_AGENT,
        }
    }
}

/// Opens a stream to the host's egress service.
pub type Dialer = Arc<dyn Fn() -> Result<Socket, DialError> + Send + Sync>;

/// The guest's dialer: vsock CID 2, [`EGRESS_VSOCK_PORT`], from a
/// privileged source port (`conn::dial`, as the control connection).
pub fn vsock_dialer() -> Dialer {
    Arc::new(|| {
        crate::conn::dial(libc::VMADDR_CID_HOST, EGRESS_VSOCK_PORT)
            .map(|f| Socket::from(OwnedFd::from(f)))
    })
}

/// Whether this kernel lets the agent make sessions' network namespaces.
pub fn netns_supported() -> Result<(), NetnsError> {
    netns::supported()
}

/// Why an egress request failed.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("session {session}: cannot make its network namespace: {source}")]
    Netns { session: String, source: NetnsError },
    #[error("session {session}: starting its proxy's thread: {source}")]
    Thread { session: String, source: io::Error },
    #[error("cannot reach the host's egress service: {0}")]
    Dial(#[from] DialError),
    #[error("the egress open line is {0} bytes, over the limit of {MAX_OPEN_LINE}")]
    OpenTooLong(usize),
    #[error("writing the egress open line: {0}")]
    Write(io::Error),
    #[error("the host's egress reply: {0}")]
    Reply(BoundedReadError),
    #[error("the host's egress reply: {0}")]
    BadReply(LineError),
}

impl EgressError {
    /// What the session is told when its stream could not be asked for.
    fn refusal(&self) -> EgressRefusal {
        match self {
            Self::Reply(BoundedReadError::TimedOut(_)) => EgressRefusal::Timeout,
            _ => EgressRefusal::Unreachable,
        }
    }
}

/// Dials, writes `open`, reads the reply line within `reply_time`.
/// Returns the stream, the bytes that followed the reply line (the
/// upstream's first bytes), and the reply.
fn open_stream(
    dialer: &Dialer,
    open: &EgressOpen,
    reply_time: Duration,
) -> Result<(Socket, Vec<u8>, EgressReply), EgressError> {
    let line = encode_line(open);
    if line.len() > MAX_OPEN_LINE {
        return Err(EgressError::OpenTooLong(line.len()));
    }
    let socket = dialer()?;
    (&socket).write_all(&line).map_err(EgressError::Write)?;
    let mut r = DeadlineReader::new(&socket, reply_time);
    let newline = |b: &[u8]| b.iter().position(|&c| c == b'\n').map(|i| i + 1);
    let reply = r
        .until(MAX_REPLY_LINE, newline)
        .map_err(EgressError::Reply)?;
    let reply =
        decode_line::<EgressReply>(&reply, MAX_REPLY_LINE).map_err(EgressError::BadReply)?;
    let rest = r.into_rest();
    Ok((socket, rest, reply))
}

/// Logs `what` unless something was logged this way in the last ten
/// seconds: a session retrying in a loop cannot flood the console.
fn log_sparingly(what: impl FnOnce() -> String) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = lock(&LAST);
    if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
        return;
    }
    *last = Some(Instant::now());
    eprintln!("coworkvm-agent: egress: {}", what());
}

/// Which proxy a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Socks,
}

/// One session's proxies: its name (the tag of its streams), the dialer,
/// and its count of relayed connections.
struct Proxy {
    session: String,
    dialer: Dialer,
    bounds: Bounds,
    active: AtomicUsize,
    agent_active: Arc<AtomicUsize>,
}

/// A connection's place under the bounds, given back when it ends.
struct Slot(Arc<Proxy>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.agent_active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Proxy {
    fn slot(self: &Arc<Self>) -> Option<Slot> {
        if self.agent_active.fetch_add(1, Ordering::SeqCst) >= self.bounds.per_agent {
            self.agent_active.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.bounds.per_session {
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.agent_active.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(self.clone()))
    }

    /// Asks the host for a stream to `host:port`: the stream and the
    /// upstream's first bytes, or why not.
    fn open(&self, host: String, port: u16, via: Via) -> Result<(Socket, Vec<u8>), EgressRefusal> {
        crate::debug!(
            "egress: session {} asks for {host}:{port} ({via:?})",
            self.session
        );
        let open = EgressOpen {
            v: EGRESS_VERSION,
            session: Some(self.session.clone()),
            probe: None,
            host,
            port,
            via,
        };
        match open_stream(&self.dialer, &open, self.bounds.reply) {
            Ok((s, rest, reply)) if reply.ok => Ok((s, rest)),
            Ok((_, _, reply)) => {
                let why = reply.error.unwrap_or(EgressRefusal::Unreachable);
                crate::debug!(
                    "egress: session {}: {}:{} refused: {}",
                    self.session,
                    open.host,
                    open.port,
                    why.as_str()
                );
                Err(why)
            }
            Err(e) => {
                log_sparingly(|| format!("session {}: {e}", self.session));
                Err(e.refusal())
            }
        }
    }

    /// Serves one accepted connection to its end.
    fn handle(&self, kind: Kind, client: Socket) {
        match kind {
            Kind::Http => self.handle_http(client),
            Kind::Socks => self.handle_socks(client),
        }
    }

    fn handle_http(&self, client: Socket) {
        let mut r = DeadlineReader::new(&client, self.bounds.handshake);
        let head = match r.until(http::MAX_HEAD, http::head_end) {
            Ok(head) => head,
            Err(e @ (BoundedReadError::TimedOut(_) | BoundedReadError::TooLong(_))) => {
                crate::debug!("egress: session {}: request head {e}", self.session);
                return answer(&client, &http::refusal(EgressRefusal::BadRequest));
            }
            // Nobody left to answer.
            Err(BoundedReadError::Closed | BoundedReadError::Io(_)) => return,
        };
        let early = r.into_rest();
        let request = match http::parse(&head) {
            Ok(request) => request,
            Err(e) => {
                crate::debug!("egress: session {}: bad request: {e}", self.session);
                return answer(&client, &http::refusal(EgressRefusal::BadRequest));
            }
        };
        let (host, port, via, forward) = match request {
            http::Request::Tunnel { host, port } => (host, port, Via::Connect, None),
            http::Request::Forward { host, port, head } => (host, port, Via::Http, Some(head)),
        };
        let (egress, from_upstream) = match self.open(host, port, via) {
            Ok(opened) => opened,
            Err(why) => return answer(&client, &http::refusal(why)),
        };
        match forward {
            None => {
                if (&client).write_all(http::CONNECTED).is_err() {
                    return;
                }
                stream::splice(client, egress, &early, &from_upstream);
            }
            Some(mut head) => {
                head.extend_from_slice(&early);
                stream::splice(client, egress, &head, &from_upstream);
            }
        }
    }

    fn handle_socks(&self, client: Socket) {
        let mut r = DeadlineReader::new(&client, self.bounds.handshake);
        let asked = socks::read_greeting(&mut r).and_then(|()| {
            (&client)
                .write_all(&socks::METHOD_SELECTED)
                .map_err(|e| socks::HandshakeError::Read(BoundedReadError::Io(e)))?;
            socks::read_request(&mut r)
        });
        let (host, port) = match asked {
            Ok(asked) => asked,
            Err(e) => {
                crate::debug!("egress: session {}: SOCKS5: {e}", self.session);
                return match e.reply() {
                    socks::FailureReply::Nothing => {}
                    socks::FailureReply::NoMethod => answer(&client, &socks::NO_METHOD),
                    socks::FailureReply::Code(c) => answer(&client, &socks::reply(c)),
                };
            }
        };
        let early = r.into_rest();
        match self.open(host, port, Via::Socks) {
            Ok((egress, from_upstream)) => {
                if (&client).write_all(&socks::reply(0)).is_err() {
                    return;
                }
                stream::splice(client, egress, &early, &from_upstream);
            }
            Err(why) => answer(&client, &socks::reply(why.socks_reply())),
        }
    }
}

/// How long, and for how many bytes, a refused client's remaining input
/// (a request body, say) is read and dropped before the close.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;

/// Writes a final answer and closes the connection, gently: the end of
/// our output first, then what the client still sends is read and dropped
/// (bounded by [`LINGER`] and [`LINGER_BYTES`]), so that a client still
/// sending gets the answer instead of a reset on its write.
fn answer(mut client: &Socket, bytes: &[u8]) {
    if client.write_all(bytes).is_err() || client.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let mut r = DeadlineReader::new(client, LINGER);
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        match r.fill() {
            Ok(n) => {
                dropped += n;
                let all = r.pending().len();
                r.consume(all);
            }
            Err(_) => return,
        }
    }
}

/// Refuses a connection over the bounds without a thread: the busy answer
/// written at once (for SOCKS5 the method selection and a failure reply,
/// which a client reads in order after its greeting and request).
fn refuse_busy(kind: Kind, client: Socket) {
    let answer = match kind {
        Kind::Http => http::refusal(EgressRefusal::Busy),
        Kind::Socks => {
            let mut b = socks::METHOD_SELECTED.to_vec();
            b.extend_from_slice(&socks::reply(EgressRefusal::Busy.socks_reply()));
            b
        }
    };
    // A fresh socket's buffer takes the few bytes at once; the accept
    // thread does not wait for the client.
    let _ = (&client).write_all(&answer);
    let _ = client.shutdown(Shutdown::Write);
}

/// Accepts on `listener` until `stop`; each connection gets a thread (or
/// the busy answer).
fn accept_loop(listener: Arc<TcpListener>, kind: Kind, proxy: Arc<Proxy>, stop: Arc<AtomicBool>) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let client = match accepted {
            Ok((s, _)) => Socket::from(s),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning.
                log_sparingly(|| format!("session {}: accepting: {e}", proxy.session));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(slot) = proxy.slot() else {
            crate::debug!("egress: session {}: busy", proxy.session);
            refuse_busy(kind, client);
            continue;
        };
        let started = std::thread::Builder::new()
            .name("egress-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                slot.0.handle(kind, client);
                drop(slot);
            });
        if let Err(e) = started {
            // The connection went with the closure: it is closed.
            log_sparingly(|| format!("starting a connection's thread: {e}"));
        }
    }
}

/// A session's network namespace and the proxies serving it. Dropping it
/// stops the proxies' accepting; connections already relayed go on.
pub struct SessionNet {
    netns: OwnedFd,
    listeners: [Arc<TcpListener>; 2],
    stop: Arc<AtomicBool>,
}

impl SessionNet {
    /// The namespace's descriptor, for the spawn's `setns` (close-on-exec:
    /// `setns` runs before the exec).
    pub fn netns_fd(&self) -> i32 {
        self.netns.as_raw_fd()
    }
}

impl Drop for SessionNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for l in &self.listeners {
            // SAFETY: shutdown(2) on a listening socket we own wakes the
            // thread blocked in accept on it (which then sees `stop`).
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// The agent's egress: the channel to the host (for the probe and the
/// sessions' streams) and, in the guest, each session's namespace.
pub struct Egress {
    dialer: Dialer,
    bounds: Bounds,
    agent_active: Arc<AtomicUsize>,
    /// `None`: sessions get no namespace of ours (bwrap makes an empty one
    /// with `--unshare-net`): off the guest, or without the sandbox.
    sessions: Option<Mutex<HashMap<String, Arc<SessionNet>>>>,
}

impl Egress {
    /// The channel only: `egress.probe` works, sessions have no proxies.
    pub fn channel_only(dialer: Dialer) -> Self {
        Egress {
            dialer,
            bounds: Bounds::default(),
            agent_active: Arc::new(AtomicUsize::new(0)),
            sessions: None,
        }
    }

    /// Each session in its own namespace with its proxies.
    pub fn per_session(dialer: Dialer, bounds: Bounds) -> Self {
        Egress {
            dialer,
            bounds,
            agent_active: Arc::new(AtomicUsize::new(0)),
            sessions: Some(Mutex::new(HashMap::new())),
        }
    }

    /// Whether sessions get their namespace and proxies (the `egress`
    /// capability).
    pub fn serves_sessions(&self) -> bool {
        self.sessions.is_some()
    }

    /// `session`'s namespace, made (with its proxies started) on first
    /// use; `None` when sessions get none ([`Egress::channel_only`]).
    pub fn session_net(&self, session: &str) -> Result<Option<Arc<SessionNet>>, EgressError> {
        let Some(sessions) = &self.sessions else {
            return Ok(None);
        };
        let mut sessions = lock(sessions);
        if let Some(net) = sessions.get(session) {
            return Ok(Some(net.clone()));
        }
        let ns = netns::create().map_err(|source| EgressError::Netns {
            session: session.to_owned(),
            source,
        })?;
        let net = Arc::new(self.serve(session, ns)?);
        sessions.insert(session.to_owned(), net.clone());
        Ok(Some(net))
    }

    /// Starts the proxies on `ns`'s listeners.
    fn serve(&self, session: &str, ns: netns::Namespace) -> Result<SessionNet, EgressError> {
        let proxy = Arc::new(Proxy {
            session: session.to_owned(),
            dialer: self.dialer.clone(),
            bounds: self.bounds,
            active: AtomicUsize::new(0),
            agent_active: self.agent_active.clone(),
        });
        let (http, socks) = (Arc::new(ns.http), Arc::new(ns.socks));
        let net = SessionNet {
            netns: ns.fd,
            listeners: [http.clone(), socks.clone()],
            stop: Arc::new(AtomicBool::new(false)),
        };
        for (listener, kind) in [(http, Kind::Http), (socks, Kind::Socks)] {
            let (proxy, stop) = (proxy.clone(), net.stop.clone());
            std::thread::Builder::new()
                .name("egress-accept".into())
                .stack_size(THREAD_STACK)
                .spawn(move || accept_loop(listener, kind, proxy, stop))
                // Dropping `net` stops a thread already started.
                .map_err(|source| EgressError::Thread {
                    session: session.to_owned(),
                    source,
                })?;
        }
        Ok(net)
    }

    /// The session is gone (deleted): its namespace is dropped once no
    /// spawn holds it, its proxies stop accepting.
    pub fn forget(&self, session: &str) {
        if let Some(sessions) = &self.sessions {
            lock(sessions).remove(session);
        }
    }

    /// `egress.probe`: opens a probe stream, reads the host's reply and
    /// closes it. `{"ok": bool, "error"?: refusal}`; an error only when
    /// the host could not be reached or did not answer.
    pub fn probe(&self, p: &EgressProbeParams) -> Result<Value, EgressError> {
        let open = EgressOpen {
            v: EGRESS_VERSION,
            session: None,
            probe: Some(p.nonce.clone()),
            host: p.host.clone(),
            port: p.port,
            via: Via::Probe,
        };
        let (_stream, _, reply) = open_stream(&self.dialer, &open, self.bounds.reply)?;
        let mut v = json!({ "ok": reply.ok });
        if let Some(e) = reply.error {
            v["error"] = json!(e.as_str());
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests;
