//! The egress server: `RUNDIR/vsock.sock_51235`, where the VMM's hybrid
//! vsock delivers the agent's dials to CID 2 port 51235.
//!
//! Each stream starts with one [`EgressOpen`] line. A session's line is
//! checked against the session's allowlist ([`EgressPolicies`]), the host
//! resolved (a `--egress-resolve` override, else DNS), every address
//! checked against the refused ranges ([`AddressPolicy`]), and a vetted
//! address connected to (never a second resolution). Then one
//! [`EgressReply`] line, and the stream carries the connection's bytes both
//! ways with half-close. A stream to port 443 (any `via`) has its first TLS record
//! read first: a ClientHello naming another server than the host the
//! session asked for is refused (the stream closed). On other ports the
//! session's first bytes are looked at when they come (the server may
//! speak first): a TLS handshake there gets the same check.
//!
//! A probe line (the helper's own reachability probe, via the agent)
//! carries a one-time nonce instead of a session; its connection goes to
//! the prober ([`super::probe`]).
//!
//! Bounds (each hit ends that stream, never the server):
//!
//! | what | bound |
//! |---|---|
//! | streams open at once | [`MAX_STREAMS`]; over it the stream gets `busy` and is closed |
//! | the open line | [`MAX_OPEN_LINE`] bytes within [`OPEN_TIMEOUT`] |
//! | resolution | [`RESOLVE_TIMEOUT`], at most [`MAX_ADDRESSES`] addresses tried |
//! | connection | [`CONNECT_TIMEOUT`] for all addresses together; a probe's resolution and connection together [`PROBE_OPEN_TIMEOUT`] |
//! | the first TLS record | 5 + [`MAX_RECORD_BODY`] bytes within [`SNI_TIMEOUT`] |

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket_proto::egress::{
    decode_line, encode_line, EgressOpen, EgressRefusal, EgressReply, Via, EGRESS_VERSION,
    MAX_OPEN_LINE,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::addr::AddressPolicy;
use super::config::EgressConfig;
use super::policy::{normalise, EgressPolicies, Host};
use super::probe::ProbeShared;
use super::sni::{client_hello_sni, record_body_len, HANDSHAKE, MAX_RECORD_BODY, RECORD_HEADER};
use crate::{lock, LogLimit};

/// Egress streams open at once per VM.
pub const MAX_STREAMS: usize = 256;
/// How long the agent may take to send the open line.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long resolving a host may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting may take, all addresses together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the session may take to send its first TLS record.
pub const SNI_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a probe's resolution and connection may take together: less
/// than the agent waits for a reply line (10 s).
pub const PROBE_OPEN_TIMEOUT: Duration = Duration::from_secs(8);
/// The most addresses of one resolution that are tried.
pub const MAX_ADDRESSES: usize = 16;
/// Streams refused as busy whose `busy` reply is still being written; past
/// this they are closed without one.
const MAX_BUSY_REPLIES: usize = 64;
/// How long a `busy` reply may take to write.
const BUSY_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// (session, host) pairs whose refusal was logged; the set is cleared
/// when full (a flood of names costs at most this much memory).
const REFUSALS_REMEMBERED: usize = 4096;
/// Refusal lines logged per [`REFUSAL_LOG_WINDOW`] at most: a session
/// that asks for ever new names must not write a line for each (the
/// suppressed are counted in the next line).
const REFUSAL_LINES_PER_WINDOW: u64 = 32;
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);

/// The refusals logged: which (session, host) pairs, and this window's
/// line count.
#[derive(Default)]
struct RefusalLog {
    seen: HashSet<(String, String)>,
    window: Option<std::time::Instant>,
    lines: u64,
    suppressed: u64,
}

/// Why the open line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OpenLineError {
    #[error("the open line is longer than {MAX_OPEN_LINE} bytes")]
    TooLong,
    #[error("no complete open line within {OPEN_TIMEOUT:?}")]
    Timeout,
    #[error("the stream ended before the open line did")]
    Closed,
    #[error("reading the open line: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one open line (with its `\n`, at most [`MAX_OPEN_LINE`] bytes)
/// within [`OPEN_TIMEOUT`]. Returns the line and any bytes read past it
/// (the stream's first data bytes, which must not be lost).
pub async fn read_open_line<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), OpenLineError> {
    let read = async {
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        loop {
            // Never ask for more than could still belong to the line.
            let room = (MAX_OPEN_LINE + 1 - buf.len()).min(chunk.len());
            let n = r.read(&mut chunk[..room]).await?;
            if n == 0 {
                return Err(OpenLineError::Closed);
            }
            let start = buf.len();
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
                let end = start + i + 1;
                if end > MAX_OPEN_LINE {
                    return Err(OpenLineError::TooLong);
                }
                let rest = buf.split_off(end);
                return Ok((buf, rest));
            }
            if buf.len() >= MAX_OPEN_LINE {
                return Err(OpenLineError::TooLong);
            }
        }
    };
    tokio::time::timeout(OPEN_TIMEOUT, read)
        .await
        .unwrap_or(Err(OpenLineError::Timeout))
}

/// A refusal and its detail for the reply.
type Refused = (EgressRefusal, String);

/// What an open line asks for, once checked.
enum Request {
    Session {
        session: String,
        host: Host,
        port: u16,
        via: Via,
        raw_host: String,
    },
    Probe {
        nonce: String,
        host: String,
        port: u16,
    },
}

/// One VM's egress server.
pub struct EgressServer {
    policies: Arc<EgressPolicies>,
    config: Arc<EgressConfig>,
    probes: Arc<ProbeShared>,
    streams: Arc<Semaphore>,
    max_streams: usize,
    /// The port whose `CONNECT`s get the SNI check: 443 (tests move it to
    /// their local upstream's port).
    pub(crate) tls_port: u16,
    busy_replies: Arc<Semaphore>,
    /// The host's own addresses, listed for each stream (tests replace
    /// it).
    pub(crate) host_addresses: fn() -> std::io::Result<Vec<IpAddr>>,
    refusals_logged: Mutex<RefusalLog>,
    /// Connection-level trouble (foreign uid, busy, bad lines).
    conn_log: LogLimit,
}

impl EgressServer {
    /// A server applying `policies` and `config`, handing probe streams
    /// to `probes`.
    pub fn new(
        policies: Arc<EgressPolicies>,
        config: Arc<EgressConfig>,
        probes: Arc<ProbeShared>,
    ) -> Arc<Self> {
        Arc::new(Self::build(policies, config, probes, MAX_STREAMS))
    }

    /// A server with another stream limit (tests).
    pub(crate) fn build(
        policies: Arc<EgressPolicies>,
        config: Arc<EgressConfig>,
        probes: Arc<ProbeShared>,
        max_streams: usize,
    ) -> Self {
        Self {
            policies,
            config,
            probes,
            streams: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            tls_port: 443,
            busy_replies: Arc::new(Semaphore::new(MAX_BUSY_REPLIES)),
            host_addresses: super::addr::host_addresses,
            refusals_logged: Mutex::new(RefusalLog::default()),
            conn_log: LogLimit::new(),
        }
    }

    /// Listens on `path` (a stale file there is replaced). Call before the
    /// VMM starts, beside the agent's listener.
    pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
        crate::listen_vsock_port(path)
    }

    /// Accepts streams until aborted: each whose peer is our uid
    /// (SO_PEERCRED: the VMM connects on the guest's behalf) is served on
    /// its own task, at most [`MAX_STREAMS`] at once.
    ///
    /// Any guest process could dial port 51235, but sessions cannot create
    /// `AF_VSOCK` sockets (the agent's seccomp/namespace setup) and the
    /// agent dials from a privileged source port; what a stream may do is
    /// decided by the session's policy either way, never by who dialled.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let uid = crate::euid();
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("accepting an egress stream: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                match stream.peer_cred() {
                    Ok(c) if c.uid() == uid => {}
                    other => {
                        if let Some(n) = me.conn_log.allow() {
                            let who = match other {
                                Ok(c) => format!("uid {}", c.uid()),
                                Err(e) => format!("unknown peer ({e})"),
                            };
                            tracing::warn!(
                                "refused an egress stream from {who} (not ours){}",
                                LogLimit::suffix(n)
                            );
                        }
                        continue;
                    }
                }
                me.clone().admit(stream);
            }
        })
    }

    /// Serves `stream` on its own task, or refuses it as busy.
    pub fn admit<S>(self: Arc<Self>, mut stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self.streams.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    self.handle(stream).await;
                    drop(permit);
                });
            }
            Err(_) => {
                if let Some(n) = self.conn_log.allow() {
                    tracing::warn!(
                        "an egress stream was refused: {} streams are open{}",
                        self.max_streams,
                        LogLimit::suffix(n)
                    );
                }
                // The reply is best effort, and so bounded itself.
                let Ok(permit) = self.busy_replies.clone().try_acquire_owned() else {
                    return;
                };
                tokio::spawn(async move {
                    let reply = EgressReply::refused(EgressRefusal::Busy, "too many streams");
                    let _ = tokio::time::timeout(
                        BUSY_REPLY_TIMEOUT,
                        stream.write_all(&encode_line(&reply)),
                    )
                    .await;
                    drop(permit);
                });
            }
        }
    }

    /// One stream, start to end.
    pub async fn handle<S>(self: Arc<Self>, mut guest: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (line, rest) = match read_open_line(&mut guest).await {
            Ok(l) => l,
            Err(e) => {
                if let Some(n) = self.conn_log.allow() {
                    tracing::info!("egress stream dropped: {e}{}", LogLimit::suffix(n));
                }
                if !matches!(e, OpenLineError::Closed | OpenLineError::Io(_)) {
                    let r = EgressReply::refused(EgressRefusal::BadRequest, e.to_string());
                    let _ = reply(&mut guest, &r).await;
                }
                return;
            }
        };
        let request = match self.parse(&line) {
            Ok(r) => r,
            Err((why, msg)) => {
                if let Some(n) = self.conn_log.allow() {
                    tracing::info!("egress stream refused: {msg}{}", LogLimit::suffix(n));
                }
                let _ = reply(&mut guest, &EgressReply::refused(why, msg)).await;
                return;
            }
        };
        match request {
            Request::Probe { nonce, host, port } => self.probe(guest, &nonce, &host, port).await,
            Request::Session {
                session,
                host,
                port,
                via,
                raw_host,
            } => {
                self.session(guest, rest, &session, host, port, via, &raw_host)
                    .await
            }
        }
    }

    fn parse(&self, line: &[u8]) -> Result<Request, Refused> {
        let bad = |m: String| (EgressRefusal::BadRequest, m);
        let open: EgressOpen =
            decode_line(line, MAX_OPEN_LINE).map_err(|e| bad(format!("bad open line: {e}")))?;
        if open.v != EGRESS_VERSION {
            return Err(bad(format!("unknown egress version {}", open.v)));
        }
        match (open.session, open.probe) {
            (Some(session), None) if open.via != Via::Probe => {
                let host = normalise(&open.host).map_err(|e| {
                    (
                        EgressRefusal::BlockedByAllowlist,
                        format!("{:?} is not a host name: {e}", open.host),
                    )
                })?;
                Ok(Request::Session {
                    session,
                    host,
                    port: open.port,
                    via: open.via,
                    raw_host: open.host,
                })
            }
            (None, Some(nonce)) if open.via == Via::Probe => Ok(Request::Probe {
                nonce,
                host: open.host,
                port: open.port,
            }),
            _ => Err(bad(
                "an open line names a session (not via probe) or a probe nonce (via probe)".into(),
            )),
        }
    }

    /// Logs a refusal once per (session, host), at most
    /// [`REFUSAL_LINES_PER_WINDOW`] lines per [`REFUSAL_LOG_WINDOW`].
    /// Returns whether it was logged.
    pub(crate) fn log_refusal(&self, session: &str, host: &str, why: &str) -> bool {
        let mut log = lock(&self.refusals_logged);
        let key = (session.to_owned(), host.to_owned());
        if log.seen.contains(&key) {
            return false;
        }
        let now = std::time::Instant::now();
        if log
            .window
            .is_none_or(|start| now.duration_since(start) >= REFUSAL_LOG_WINDOW)
        {
            log.window = Some(now);
            log.lines = 0;
        }
        if log.lines >= REFUSAL_LINES_PER_WINDOW {
            // Not remembered: it is logged when it comes again later.
            log.suppressed += 1;
            return false;
        }
        log.lines += 1;
        if log.seen.len() >= REFUSALS_REMEMBERED {
            log.seen.clear();
        }
        log.seen.insert(key);
        let suppressed = std::mem::take(&mut log.suppressed);
        // Debug formatting: the names are the session's, escaped.
        tracing::info!(
            "egress: session {session:?} refused {host:?}: {why}{}",
            LogLimit::suffix(suppressed)
        );
        true
    }

    #[allow(clippy::too_many_arguments)]
    async fn session<S>(
        &self,
        mut guest: S,
        mut first: Vec<u8>,
        session: &str,
        host: Host,
        port: u16,
        via: Via,
        raw_host: &str,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let host_text = host.to_string();
        let Some(list) = self.policies.get(session) else {
            self.log_refusal(
                session,
                &host_text,
                "no spawn of this session went through the helper",
            );
            let r = EgressReply::refused(EgressRefusal::BadRequest, "unknown session");
            let _ = reply(&mut guest, &r).await;
            return;
        };
        if !list.allows(&host) {
            self.log_refusal(session, &host_text, "not in the session's allowedDomains");
            let r = EgressReply::refused(
                EgressRefusal::BlockedByAllowlist,
                format!("{raw_host} is not in the session's allowedDomains"),
            );
            let _ = reply(&mut guest, &r).await;
            return;
        }
        let mut upstream = match self.open_upstream(&host, port).await {
            Ok(s) => s,
            Err((why, msg)) => {
                self.log_refusal(session, &host_text, &msg);
                if matches!(
                    why,
                    EgressRefusal::ConnectionRefused
                        | EgressRefusal::Timeout
                        | EgressRefusal::Unreachable
                ) && self.probes.is_probe_host(&host)
                {
                    self.probes.reprobe_now();
                }
                let _ = reply(&mut guest, &EgressReply::refused(why, msg)).await;
                return;
            }
        };
        tracing::debug!("egress: session {session:?} to {host_text}:{port} ({via:?})");
        if reply(&mut guest, &EgressReply::open()).await.is_err() {
            return;
        }
        // Whatever `via` says: a SOCKS5 stream is as good a tunnel as a
        // CONNECT, and `via` is the agent's word.
        if port != self.tls_port {
            if let Err(why) = relay_sniffing(guest, upstream, first, &host).await {
                self.log_refusal(session, &host_text, &why);
            }
            return;
        }
        match check_sni(&mut guest, first, &host).await {
            Ok(bytes) => first = bytes,
            Err(why) => {
                self.log_refusal(session, &host_text, &why);
                return;
            }
        }
        if !first.is_empty() && upstream.write_all(&first).await.is_err() {
            return;
        }
        if let Err(e) = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await {
            tracing::debug!("egress: session {session:?} to {host_text}:{port} ended: {e}");
        }
    }

    async fn probe<S>(&self, mut guest: S, nonce: &str, host: &str, port: u16)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // One use: the slot is gone whatever follows.
        let Some(slot) = self.probes.take(nonce) else {
            let r = EgressReply::refused(EgressRefusal::BadRequest, "unknown probe");
            let _ = reply(&mut guest, &r).await;
            return;
        };
        let Some(target) = slot.target.clone() else {
            // No probe URL: the stream itself was the test of the channel.
            let r = EgressReply::refused(EgressRefusal::BadRequest, "no probe target");
            let _ = reply(&mut guest, &r).await;
            return;
        };
        if target.host != host || target.port != port {
            let r = EgressReply::refused(EgressRefusal::BadRequest, "not this probe's target");
            let _ = reply(&mut guest, &r).await;
            let _ = slot
                .conn
                .send(Err((EgressRefusal::BadRequest, "wrong target".into())));
            return;
        }
        // Within the agent's own wait for the reply, so that a slow
        // upstream reads as the upstream's failure, not the channel's.
        let result = match normalise(host) {
            Ok(h) => tokio::time::timeout(PROBE_OPEN_TIMEOUT, self.open_upstream(&h, port))
                .await
                .unwrap_or_else(|_| {
                    Err((
                        EgressRefusal::Timeout,
                        format!("resolving and connecting took over {PROBE_OPEN_TIMEOUT:?}"),
                    ))
                }),
            Err(e) => Err((EgressRefusal::DnsFailure, e.to_string())),
        };
        let answer = match &result {
            Ok(_) => EgressReply::open(),
            Err((why, msg)) => EgressReply::refused(*why, msg.clone()),
        };
        let _ = slot.conn.send(result);
        let _ = reply(&mut guest, &answer).await;
    }

    /// Resolves `host` and connects to a vetted address of it.
    pub async fn open_upstream(&self, host: &Host, port: u16) -> Result<TcpStream, Refused> {
        let addrs = self.resolve(host, port).await?;
        let policy: &AddressPolicy = &self.config.addresses;
        // Listed now: interfaces come and go.
        let own = (self.host_addresses)().map_err(|e| {
            (
                EgressRefusal::BlockedAddress,
                format!("cannot list the host's own addresses to refuse them: {e}"),
            )
        })?;
        let mut vetted = Vec::new();
        let mut refused = None;
        for a in addrs.into_iter().take(MAX_ADDRESSES) {
            match policy.check_not_own(a.ip(), &own) {
                Ok(()) => vetted.push(a),
                Err(range) => refused = refused.or(Some((a.ip(), range))),
            }
        }
        if vetted.is_empty() {
            let (ip, range) = refused.unwrap_or((IpAddr::from([0, 0, 0, 0]), "no address"));
            return Err((
                EgressRefusal::BlockedAddress,
                format!("{host} is at {ip}, in the refused range {range}"),
            ));
        }
        connect_any(&vetted, host).await
    }

    async fn resolve(&self, host: &Host, port: u16) -> Result<Vec<SocketAddr>, Refused> {
        let name = match host {
            Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, port)]),
            Host::Name(n) => n,
        };
        if let Some(ip) = self.config.resolve_override(name, port) {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        match tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((name.as_str(), port)),
        )
        .await
        {
            Err(_) => Err((
                EgressRefusal::Timeout,
                format!("resolving {name} took over {RESOLVE_TIMEOUT:?}"),
            )),
            Ok(Err(e)) => Err((
                EgressRefusal::DnsFailure,
                format!("{name} does not resolve: {e}"),
            )),
            Ok(Ok(addrs)) => {
                let v: Vec<SocketAddr> = addrs.take(MAX_ADDRESSES).collect();
                if v.is_empty() {
                    Err((EgressRefusal::DnsFailure, format!("{name} has no address")))
                } else {
                    Ok(v)
                }
            }
        }
    }
}

/// Connects to the first of `addrs` that answers, within
/// [`CONNECT_TIMEOUT`] for all of them.
async fn connect_any(addrs: &[SocketAddr], host: &Host) -> Result<TcpStream, Refused> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut last = (EgressRefusal::Unreachable, format!("{host}: no address"));
    for a in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => {
                let why = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => EgressRefusal::ConnectionRefused,
                    std::io::ErrorKind::TimedOut => EgressRefusal::Timeout,
                    _ => EgressRefusal::Unreachable,
                };
                last = (why, format!("connecting to {host} at {a}: {e}"));
            }
            Err(_) => {
                return Err((
                    EgressRefusal::Timeout,
                    format!("connecting to {host} took over {CONNECT_TIMEOUT:?}"),
                ))
            }
        }
    }
    Err(last)
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, r: &EgressReply) -> std::io::Result<()> {
    // The agent reads the reply at once; one that does not read has its
    // stream dropped with the send buffer full.
    tokio::time::timeout(OPEN_TIMEOUT, async {
        w.write_all(&encode_line(r)).await?;
        w.flush().await
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// For a stream to `host:443`: reads the session's first TLS record (`first`
/// holds what was read already) and returns the bytes read, to be sent on
/// unchanged, when it may pass: not a TLS record (not TLS: passed
/// through), or a ClientHello that names no server or names `want`. `Err`
/// says why the stream is refused.
pub async fn check_sni<R: AsyncRead + Unpin>(
    r: &mut R,
    mut first: Vec<u8>,
    want: &Host,
) -> Result<Vec<u8>, String> {
    let read = async {
        fill(r, &mut first, 1).await?;
        // Another TLS record first (an alert, which some servers drop
        // before the ClientHello, or any other) would let a fronted
        // ClientHello follow unread: refused. Other bytes are not TLS.
        if NOT_HANDSHAKE_RECORDS.contains(&first[0]) {
            return Err(format!(
                "refused a TLS stream that starts with a record of type {:#04x}, not a \
                 ClientHello",
                first[0]
            ));
        }
        if first[0] != HANDSHAKE {
            return Ok(first);
        }
        fill(r, &mut first, RECORD_HEADER).await?;
        let header: [u8; RECORD_HEADER] = first[..RECORD_HEADER]
            .try_into()
            .map_err(|_| "short record header".to_owned())?;
        let body = record_body_len(&header).map_err(|e| e.to_string())?;
        fill(r, &mut first, RECORD_HEADER + body).await?;
        let name = client_hello_sni(&first[..RECORD_HEADER + body])
            .map_err(|e| format!("refused a TLS stream: {e}"))?;
        match name {
            None => Ok(first),
            Some(n) => match normalise(&n) {
                Ok(h) if &h == want => Ok(first),
                _ => Err(format!(
                    "refused a TLS stream whose ClientHello names {n:?}, not {want}"
                )),
            },
        }
    };
    tokio::time::timeout(SNI_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err(format!("no TLS ClientHello within {SNI_TIMEOUT:?}")))
}

/// Relays a stream to a port other than 443, where the session may speak
/// anything and the server may speak first (SMTP, MySQL, SSH banners):
/// the upstream's bytes flow to the session at once, and the session's
/// first bytes are looked at when they come, however late. If they begin
/// a TLS handshake, its ClientHello must name `host` or no server (as on
/// 443: TLS fronting through an allowed host on 8443 is refused too);
/// anything else passes. `Err` says why the stream was refused.
pub async fn relay_sniffing<S>(
    guest: S,
    upstream: TcpStream,
    mut first: Vec<u8>,
    host: &Host,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_guest, mut to_guest) = tokio::io::split(guest);
    let (mut from_upstream, mut to_upstream) = upstream.into_split();
    let down = async {
        let r = tokio::io::copy(&mut from_upstream, &mut to_guest).await;
        let _ = to_guest.shutdown().await;
        r.map(|_| ())
            .map_err(|e| format!("upstream to session: {e}"))
    };
    let up = async {
        if first.is_empty() {
            let mut chunk = [0u8; 4096];
            // No time bound: the session may wait for the server forever,
            // as it could on a direct connection.
            let n = from_guest
                .read(&mut chunk)
                .await
                .map_err(|e| format!("session to upstream: {e}"))?;
            first.extend_from_slice(&chunk[..n]);
        }
        if first.first() == Some(&HANDSHAKE) {
            first = check_sni(&mut from_guest, first, host).await?;
        }
        let r = async {
            to_upstream.write_all(&first).await?;
            tokio::io::copy(&mut from_guest, &mut to_upstream).await?;
            to_upstream.shutdown().await
        };
        r.await.map_err(|e| format!("session to upstream: {e}"))
    };
    // A refusal on the way up ends the way down too (both halves dropped).
    tokio::try_join!(up, down).map(|_| ())
}

/// The TLS record types other than handshake (change_cipher_spec, alert,
/// application_data, heartbeat): never a client's first record.
const NOT_HANDSHAKE_RECORDS: [u8; 4] = [0x14, 0x15, 0x17, 0x18];

/// Reads until `buf` holds at least `want` bytes (never more than the
/// largest record at once).
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    want: usize,
) -> Result<(), String> {
    debug_assert!(want <= RECORD_HEADER + MAX_RECORD_BODY);
    let mut chunk = [0u8; 4096];
    while buf.len() < want {
        let room = (want - buf.len()).min(chunk.len());
        match r.read(&mut chunk[..room]).await {
            Ok(0) => return Err("the stream ended inside the first TLS record".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading the first TLS record: {e}")),
        }
    }
    Ok(())
}
