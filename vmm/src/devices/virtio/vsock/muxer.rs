//! The vsock worker: moves packets between the guest's queues and host
//! Unix sockets.
//!
//! Everything the guest or a host peer can make it hold is bounded, and
//! hitting a bound is answered (RST, or the host socket closed) and logged
//! once ([`Refusals`]), never a crash, a stall or unbounded growth:
//!
//! - guest-initiated streams come only from privileged guest ports
//!   ([`PRIVILEGED_PORT_LIMIT`]): a session cannot dial the helper's agent
//!   port;
//! - at most [`MAX_CONNECTIONS`] live streams, [`MAX_PENDING_HANDSHAKES`]
//!   host sockets still writing their `CONNECT` line, and
//!   [`MAX_CONTROL_PACKETS`] RSTs waiting for RX buffers; every other reply
//!   (RESPONSE, REQUEST, CREDIT_UPDATE, SHUTDOWN) is a flag on its stream,
//!   so it is bounded by the connection count;
//! - each stream buffers at most the credit it granted ([`CONN_BUF_ALLOC`])
//!   towards the host and one read ([`HOST_READ_CHUNK`]) towards the guest;
//! - connecting to `<uds>_P` never blocks the worker (non-blocking connect:
//!   a full backlog is an RST), and running out of file descriptors pauses
//!   the listener instead of spinning on it;
//! - host peers on `<uds>` must be the VMM's own user (or root), checked
//!   with `SO_PEERCRED`.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemoryError,
    WriteVolatile,
};
use vmm_sys_util::epoll::EventSet;

use super::credit::Credit;
use super::handshake::{ok_line, ConnectParser};
use super::packet::{Header, Op, HDR_LEN, MAX_PKT_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::{RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::worker::{next_chain, notify_used, DeviceHandler, FdRegistry};
use crate::devices::virtio::VirtioInterrupt;

/// Receive buffer each stream advertises to the guest. It is also the most
/// guest-to-host bytes a stream ever holds: a guest sending past it breaks
/// flow control and the stream is reset.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// First port handed to host-initiated streams (Firecracker's convention).
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// Most host-to-guest bytes one read of a host socket takes, and so the
/// most a stream holds for the guest.
pub const HOST_READ_CHUNK: usize = 64 * 1024;
/// Most host connections waiting to finish their CONNECT line.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// The privileged-source-port rule: a guest-initiated stream (a REQUEST on
/// the TX queue) is accepted only from a guest port below this; any other
/// is answered with RST and never reaches a host socket.
///
/// Why it holds: Linux lets a vsock socket bind a port up to 1023
/// (`LAST_RESERVED_PORT` in `net/vmw_vsock/af_vsock.c`) only with
/// `CAP_NET_BIND_SERVICE`, checked with `capable()`, that is in the initial
/// user namespace (a bubblewrap user namespace grants nothing here), and it
/// auto-binds a connecting socket to a port above 1023. So a stream from a
/// port below 1024 was opened by guest root, in practice the guest agent,
/// which binds one before it dials; a session process cannot open one and
/// so cannot reach the helper's agent socket `<uds>_51234`. The guest kernel
/// is trusted to fill the source port in (only it writes the TX queue).
pub const PRIVILEGED_PORT_LIMIT: u32 = 1024;

/// Most live streams, both directions together. Each holds one host file
/// descriptor and up to [`CONN_BUF_ALLOC`] + [`HOST_READ_CHUNK`] bytes. A
/// guest REQUEST beyond it gets RST; a host connection beyond it is closed.
pub const MAX_CONNECTIONS: usize = 1024;

/// Most RSTs waiting for an RX buffer (Firecracker bounds its RX queue at
/// 256 too). Only RSTs for streams that are gone wait here; when it is
/// full, new ones are dropped: the guest learns the stream is gone at its
/// next packet on it, which is answered with RST again.
pub const MAX_CONTROL_PACKETS: usize = 256;

/// How long the listener stays out of epoll after `accept` failed for lack
/// of file descriptors or memory: the pending connection keeps it readable,
/// so a level-triggered epoll would spin on it.
pub const LISTENER_BACKOFF: Duration = Duration::from_millis(100);

/// The muxer's epoll tokens in its worker's loop (which keeps the stop
/// and queue events to itself).
const TOKEN_LISTENER: u64 = 0;
const TOKEN_DYNAMIC: u64 = 1;

/// Whether a guest-initiated stream from guest port `port` is accepted
/// ([`PRIVILEGED_PORT_LIMIT`]).
pub fn is_privileged_guest_port(port: u32) -> bool {
    port < PRIVILEGED_PORT_LIMIT
}

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("TX queue is broken: {0}")]
    TxQueue(virtio_queue::Error),
    #[error("RX queue is broken: {0}")]
    RxQueue(virtio_queue::Error),
}

/// Why the muxer could not open the host side of a guest stream.
#[derive(Debug, thiserror::Error)]
pub enum HostConnectError {
    #[error("socket path {0} does not fit a sockaddr_un")]
    PathTooLong(PathBuf),
    #[error("creating a socket: {0}")]
    Socket(io::Error),
    #[error("the listener's backlog is full")]
    BacklogFull,
    #[error("connecting: {0}")]
    Connect(io::Error),
}

/// Connects to the Unix socket `path` without blocking: for Unix sockets
/// connect completes or fails at once; EAGAIN means the listener's backlog
/// is full, which a blocking connect would wait out on the muxer's only
/// thread.
pub fn connect_nonblocking(path: &Path) -> Result<UnixStream, HostConnectError> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Room for the terminating NUL; an embedded NUL would name another path.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(HostConnectError::PathTooLong(path.to_owned()));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; returns a new fd or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(HostConnectError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a live sockaddr_un and `len` is within its size.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        // EINPROGRESS is not expected from a Unix socket; like any other
        // error it refuses the stream rather than parking it half-open.
        return Err(if e.raw_os_error() == Some(libc::EAGAIN) {
            HostConnectError::BacklogFull
        } else {
            HostConnectError::Connect(e)
        });
    }
    Ok(UnixStream::from(fd))
}

/// The user id of the process at the other end of `stream` (`SO_PEERCRED`:
/// the credentials it had when it connected).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is a
    // live ucred of that size; the fd is the stream's own.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Who may connect to `<uds>` and so reach guest ports: the VMM's own user,
/// and root (who could reach into the VMM anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPolicy {
    pub owner_uid: u32,
    pub allow_root: bool,
}

impl PeerPolicy {
    /// The VMM's own user. Taken on the main thread when the device is
    /// made: the vsock worker's seccomp filter has no `geteuid`.
    pub fn current_user() -> Self {
        // SAFETY: geteuid(2) takes nothing and cannot fail.
        let owner_uid = unsafe { libc::geteuid() };
        Self {
            owner_uid,
            allow_root: true,
        }
    }

    pub fn allows(&self, uid: u32) -> bool {
        uid == self.owner_uid || (self.allow_root && uid == 0)
    }
}

/// One kind of refusal: the first is logged with its details, later ones
/// only counted, with a summary line at each 1024th power, so a hostile
/// guest or peer cannot flood the log.
#[derive(Debug, Default)]
pub struct Refusal {
    count: u64,
}

impl Refusal {
    fn hit(&mut self, what: &str, detail: std::fmt::Arguments<'_>) {
        self.count += 1;
        if self.count == 1 {
            tracing::warn!("vsock: {what}: {detail} (further ones are counted, not logged)");
        } else if self.count.is_power_of_two() && self.count.trailing_zeros() % 10 == 0 {
            tracing::warn!("vsock: {what}: {} times so far", self.count);
        }
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Every rule and bound the muxer enforces, with how often each was hit.
#[derive(Debug, Default)]
pub struct Refusals {
    pub unprivileged_port: Refusal,
    pub connection_limit: Refusal,
    pub control_queue_full: Refusal,
    pub host_connect_failed: Refusal,
    pub handshake_limit: Refusal,
    pub peer_not_allowed: Refusal,
    pub accept_failed: Refusal,
    pub malformed_packet: Refusal,
}

/// A stream, keyed by (host-side port, guest-side port).
type ConnKey = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated; REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    credit: Credit,
    token: u64,
    /// The REQUEST (host-initiated) or RESPONSE (guest-initiated) that opens
    /// the stream, until an RX buffer took it; nothing else of the stream
    /// goes to the guest before it.
    announce: Option<Op>,
    /// The guest asked for our credit (CREDIT_REQUEST).
    credit_update_due: bool,
    /// The host closed its end and all its data reached the guest: a
    /// SHUTDOWN is owed.
    shutdown_due: bool,
    /// Guest-to-host bytes the host socket has not taken yet; never more
    /// than the credit allows ([`Credit::on_received`]).
    to_host: VecDeque<u8>,
    /// Host-to-guest bytes read from the socket (or before the stream was
    /// established) and not yet in the guest: `to_guest[rx_off..rx_end]`.
    /// One read fills it, several RX buffers (the guest's are 4 KiB) empty
    /// it; never more than the guest's credit allowed when it was read.
    to_guest: Vec<u8>,
    rx_off: usize,
    rx_end: usize,
    guest_stopped_sending: bool,
    host_eof: bool,
    /// The host closed its socket; it is out of epoll (a hung-up socket
    /// reports HUP forever) and is drained by `pump_to_guest` until EOF.
    hung_up: bool,
    interest: EventSet,
}

impl Conn {
    /// A connection that owes the guest `announce` and holds nothing but
    /// `early`: host bytes read before the guest accepted it.
    fn new(
        stream: UnixStream,
        state: State,
        credit: Credit,
        token: u64,
        announce: Op,
        early: Vec<u8>,
    ) -> Self {
        Conn {
            stream,
            state,
            credit,
            token,
            announce: Some(announce),
            credit_update_due: false,
            shutdown_due: false,
            to_host: VecDeque::new(),
            rx_off: 0,
            rx_end: early.len(),
            to_guest: early,
            guest_stopped_sending: false,
            host_eof: false,
            hung_up: false,
            interest: EventSet::IN,
        }
    }
}

/// What the next RX buffer of a stream carries.
enum NextForGuest {
    Control(Header),
    Data(Header, usize),
    Nothing,
}

/// What the muxer serves on the guest's side: memory, the three queues
/// (RX, TX, event) and the interrupt.
pub struct GuestQueues {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<VirtioInterrupt>,
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// Set while the listener is out of epoll after `accept` ran out of
    /// descriptors; it goes back in at this instant.
    listener_paused_until: Option<Instant>,
    peer_policy: PeerPolicy,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    /// The host sockets' and the listener's place in the worker's epoll.
    fds: FdRegistry,
    conns: HashMap<ConnKey, Conn>,
    tokens: HashMap<u64, ConnKey>,
    handshakes: HashMap<u64, (UnixStream, ConnectParser)>,
    /// RSTs for streams that are gone, waiting for an RX buffer; at most
    /// [`MAX_CONTROL_PACKETS`].
    control: VecDeque<Header>,
    next_token: u64,
    next_host_port: u32,
    rx_starved: bool,
    used_rx: bool,
    refusals: Refusals,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        peer_policy: PeerPolicy,
        guest: GuestQueues,
        fds: FdRegistry,
    ) -> io::Result<Self> {
        fds.add(listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            listener_paused_until: None,
            peer_policy,
            mem: guest.mem,
            queues: guest.queues,
            interrupt: guest.interrupt,
            fds,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            next_token: TOKEN_DYNAMIC,
            next_host_port: FIRST_HOST_PORT,
            rx_starved: false,
            used_rx: false,
            refusals: Refusals::default(),
        })
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn control_queue_len(&self) -> usize {
        self.control.len()
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn header(&self, key: ConnKey, op: Op) -> Header {
        Header::to_guest(self.guest_cid, key.0, key.1, op)
    }

    /// Queues an RST for `key`, unless [`MAX_CONTROL_PACKETS`] already wait.
    fn queue_rst(&mut self, key: ConnKey) {
        if self.control.len() >= MAX_CONTROL_PACKETS {
            self.refusals.control_queue_full.hit(
                "control queue full, RST dropped",
                format_args!("{MAX_CONTROL_PACKETS} control packets wait for RX buffers"),
            );
            return;
        }
        let h = self.header(key, Op::Rst);
        self.control.push_back(h);
    }

    /// Forgets the stream, if there is one, and tells the guest.
    fn reset(&mut self, key: ConnKey) {
        self.remove_conn(key);
        self.queue_rst(key);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            if c.hung_up {
                return;
            }
            let _ = self.fds.remove(c.stream.as_raw_fd());
        }
    }

    /// Reads every packet the guest queued for the host. A packet's
    /// payload goes from guest memory straight to the host socket when
    /// nothing is queued before it; only what the socket does not take is
    /// copied.
    pub fn process_tx(&mut self) -> Result<(), MuxerError> {
        let mut used = false;
        while let Some(chain) =
            next_chain(&mut self.queues[TX_QUEUE], &self.mem).map_err(MuxerError::TxQueue)?
        {
            let head = chain.head_index();
            let segs: Vec<(GuestAddress, usize)> = chain
                .readable()
                .map(|d| (d.addr(), d.len() as usize))
                .collect();
            // The buffers stay the guest's until add_used: handle first.
            match split_packet(&self.mem, &segs) {
                Some((h, payload)) => self.handle_guest_packet(h, &payload),
                None => self.refusals.malformed_packet.hit(
                    "malformed TX packet dropped",
                    format_args!("header unreadable from {} buffers", segs.len()),
                ),
            }
            self.queues[TX_QUEUE]
                .add_used(&self.mem, head, 0)
                .map_err(MuxerError::TxQueue)?;
            used = true;
        }
        if used {
            notify_used(&mut self.queues[TX_QUEUE], &self.mem, &self.interrupt)
                .map_err(MuxerError::TxQueue)?;
        }
        Ok(())
    }

    fn handle_guest_packet(&mut self, h: Header, payload: &[(GuestAddress, usize)]) {
        let avail = payload.iter().map(|s| s.1).sum();
        let op = match h.validate_from_guest(self.guest_cid, avail) {
            Ok(op) => op,
            Err(e) => {
                self.refusals
                    .malformed_packet
                    .hit("malformed TX packet", format_args!("{e}"));
                // Answer with RST when the packet names a stream at all.
                if h.op != Op::Rst as u16 && h.src_cid == self.guest_cid {
                    self.reset((h.dst_port, h.src_port));
                }
                return;
            }
        };
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.credit.update_peer(h.buf_alloc, h.fwd_cnt);
        }
        match op {
            Op::Request => self.guest_connects(key, &h),
            Op::Response => {
                let established = match self.conns.get_mut(&key) {
                    // Before the REQUEST went out the guest cannot know
                    // the host port: such a RESPONSE is forged.
                    Some(c) if c.state == State::Connecting && c.announce.is_none() => {
                        c.state = State::Established;
                        // A fresh socket's buffer always takes these few
                        // bytes; they are not guest data, so they stay out
                        // of the stream's credit accounting.
                        c.stream.write_all(ok_line(key.0).as_bytes()).is_ok()
                    }
                    _ => false,
                };
                if !established {
                    self.reset(key);
                }
            }
            Op::Rw => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.queue_rst(key);
                    return;
                };
                if c.state != State::Established || c.credit.on_received(h.len).is_err() {
                    tracing::debug!("vsock: stream {key:?} broke flow control");
                    self.reset(key);
                    return;
                }
                // Data after the guest's own SHUTDOWN(SEND) would reach a
                // host peer that was told the stream's input had ended.
                if c.guest_stopped_sending {
                    tracing::debug!("vsock: stream {key:?} sent data after it shut down sending");
                    self.reset(key);
                    return;
                }
                if forward(&self.mem, c, payload, h.len as usize).is_err() {
                    self.reset(key);
                    return;
                }
                self.flush_to_host(key);
            }
            Op::CreditUpdate => {
                if !self.conns.contains_key(&key) {
                    self.queue_rst(key);
                }
            }
            Op::CreditRequest => match self.conns.get_mut(&key) {
                Some(c) => c.credit_update_due = true,
                None => self.queue_rst(key),
            },
            Op::Shutdown => {
                let full = h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND;
                if let Some(c) = self.conns.get_mut(&key) {
                    if h.flags & SHUTDOWN_SEND != 0 {
                        c.guest_stopped_sending = true;
                    }
                    if full {
                        // Let the host have what the guest already sent.
                        let pending: Vec<u8> = c.to_host.drain(..).collect();
                        let _ = c.stream.write_all(&pending);
                        let _ = c.stream.shutdown(std::net::Shutdown::Both);
                        self.reset(key);
                    } else if c.guest_stopped_sending && c.to_host.is_empty() {
                        let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    }
                } else {
                    self.queue_rst(key);
                }
            }
            Op::Rst => self.remove_conn(key),
        }
    }

    /// The guest dials host port `key.0` from guest port `key.1`: connect
    /// to `<uds>_<port>`, if the rules and bounds allow it.
    fn guest_connects(&mut self, key: ConnKey, h: &Header) {
        if self.conns.contains_key(&key) {
            self.reset(key);
            return;
        }
        if !is_privileged_guest_port(key.1) {
            self.refusals.unprivileged_port.hit(
                "refused a guest stream from an unprivileged port",
                format_args!(
                    "guest port {} to host port {} (only ports below {PRIVILEGED_PORT_LIMIT} may dial the host)",
                    key.1, key.0
                ),
            );
            self.queue_rst(key);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.refusals.connection_limit.hit(
                "refused a guest stream",
                format_args!("{MAX_CONNECTIONS} streams are open"),
            );
            self.queue_rst(key);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                self.refusals.host_connect_failed.hit(
                    "refused a guest stream",
                    format_args!("{}: {e}", path.display()),
                );
                self.queue_rst(key);
                return;
            }
        };
        let token = self.new_token();
        if self
            .fds
            .add(stream.as_raw_fd(), token, EventSet::IN)
            .is_err()
        {
            self.queue_rst(key);
            return;
        }
        let mut credit = Credit::new(CONN_BUF_ALLOC);
        credit.update_peer(h.buf_alloc, h.fwd_cnt);
        self.tokens.insert(token, key);
        self.conns.insert(
            key,
            Conn::new(
                stream,
                State::Established,
                credit,
                token,
                Op::Response,
                Vec::new(),
            ),
        );
    }

    fn accept_host_connections(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit_host_connection(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The peer gave up before we took it: try the next one.
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) =>
                {
                    continue
                }
                Err(e) => {
                    self.accept_failed(e);
                    return;
                }
            }
        }
    }

    /// accept(2) failed with the connection still pending, for want of
    /// descriptors (EMFILE, ENFILE) or memory: the listener stays readable,
    /// so it leaves epoll for [`LISTENER_BACKOFF`] instead of waking the
    /// worker at once, forever.
    fn accept_failed(&mut self, e: io::Error) {
        self.refusals.accept_failed.hit(
            "cannot accept host connections",
            format_args!("{e}; pausing the listener for {LISTENER_BACKOFF:?}"),
        );
        if self.listener_paused_until.is_none() {
            let _ = self.fds.remove(self.listener.as_raw_fd());
        }
        self.listener_paused_until = Some(Instant::now() + LISTENER_BACKOFF);
    }

    fn resume_listener_if_due(&mut self) {
        if self
            .listener_paused_until
            .is_some_and(|until| Instant::now() >= until)
        {
            self.listener_paused_until = None;
            if let Err(e) = self
                .fds
                .add(self.listener.as_raw_fd(), TOKEN_LISTENER, EventSet::IN)
            {
                // Try again after another pause rather than lose the listener.
                self.accept_failed(e);
            }
        }
    }

    /// A host program connected to `<uds>`: it must be an allowed user, and
    /// there must be room for its handshake.
    fn admit_host_connection(&mut self, stream: UnixStream) {
        match peer_uid(&stream) {
            Ok(uid) if self.peer_policy.allows(uid) => {}
            Ok(uid) => {
                self.refusals.peer_not_allowed.hit(
                    "refused a host connection",
                    format_args!(
                        "peer uid {uid}, only uid {} (and root) may connect",
                        self.peer_policy.owner_uid
                    ),
                );
                return; // dropped: closes the socket
            }
            Err(e) => {
                self.refusals.peer_not_allowed.hit(
                    "refused a host connection",
                    format_args!("SO_PEERCRED: {e}"),
                );
                return;
            }
        }
        if self.handshakes.len() >= MAX_PENDING_HANDSHAKES {
            self.refusals.handshake_limit.hit(
                "refused a host connection",
                format_args!("{MAX_PENDING_HANDSHAKES} are still writing their CONNECT line"),
            );
            return;
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let token = self.new_token();
        if self
            .fds
            .add(stream.as_raw_fd(), token, EventSet::IN)
            .is_ok()
        {
            self.handshakes
                .insert(token, (stream, ConnectParser::default()));
        }
    }

    fn socket_event(&mut self, token: u64, set: EventSet) {
        if self.handshakes.contains_key(&token) {
            self.handshake_readable(token);
            return;
        }
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        if set.contains(EventSet::OUT) {
            self.flush_to_host(key);
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Data may still sit in the socket: keep reading it as credit
            // allows, until read() says EOF.
            if let Some(c) = self.conns.get_mut(&key) {
                if !c.hung_up {
                    c.hung_up = true;
                    let _ = self.fds.remove(c.stream.as_raw_fd());
                }
            }
        }
        // Readable data is pulled in pump_to_guest, as credit and RX buffers allow.
    }

    fn handshake_readable(&mut self, token: u64) {
        let Some((mut stream, mut parser)) = self.handshakes.remove(&token) else {
            return;
        };
        let mut buf = [0u8; 64];
        let done = match stream.read(&mut buf) {
            Ok(0) => Err(()),
            Ok(n) => match parser.feed(&buf[..n]) {
                Ok(Some(done)) => Ok(Some(done)),
                Ok(None) => Ok(None),
                Err(e) => {
                    tracing::debug!("vsock: bad handshake: {e}");
                    Err(())
                }
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(_) => Err(()),
        };
        let (guest_port, early) = match done {
            Ok(None) => {
                self.handshakes.insert(token, (stream, parser));
                return;
            }
            Err(()) => {
                self.deregister(&stream);
                return;
            }
            Ok(Some(line)) => line,
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            self.refusals.connection_limit.hit(
                "closed a host connection",
                format_args!("{MAX_CONNECTIONS} streams are open"),
            );
            self.deregister(&stream);
            return;
        }
        // Host ports wrap within [FIRST_HOST_PORT, 2^32); skip one still in
        // use (at most MAX_CONNECTIONS are).
        let mut key = (self.take_host_port(), guest_port);
        while self.conns.contains_key(&key) {
            key.0 = self.take_host_port();
        }
        let credit = Credit::new(CONN_BUF_ALLOC);
        self.tokens.insert(token, key);
        self.conns.insert(
            key,
            Conn::new(stream, State::Connecting, credit, token, Op::Request, early),
        );
    }

    fn take_host_port(&mut self) -> u32 {
        let port = self.next_host_port;
        self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        port
    }

    fn deregister(&self, stream: &UnixStream) {
        let _ = self.fds.remove(stream.as_raw_fd());
    }

    fn flush_to_host(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut broken = false;
        while !c.to_host.is_empty() {
            let (a, _) = c.to_host.as_slices();
            match c.stream.write(a) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.credit.on_forwarded(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            self.reset(key);
            return;
        }
        if c.guest_stopped_sending && c.to_host.is_empty() {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        // A CREDIT_UPDATE goes out from pump_to_guest once
        // `credit.needs_update()`.
    }

    fn host_closed(c: &mut Conn) {
        if !c.host_eof {
            c.host_eof = true;
            c.shutdown_due = true;
        }
    }

    /// Writes one packet into the next RX buffer: the header and up to
    /// `max` bytes of `payload` (`max` also bounds it; a control packet has
    /// none). Returns the payload bytes written, or None if the guest has
    /// no buffer; an error if the driver broke the queue. A buffer too small
    /// for the header is returned to the guest empty.
    fn deliver(&mut self, mut h: Header, payload: &[u8]) -> Result<Option<usize>, MuxerError> {
        let mem = &self.mem;
        let Some(chain) =
            next_chain(&mut self.queues[RX_QUEUE], mem).map_err(MuxerError::RxQueue)?
        else {
            self.rx_starved = true;
            return Ok(None);
        };
        let head = chain.head_index();
        let (written, sent) = match chain.writer::<()>(mem) {
            Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                let n = payload.len().min(w.available_bytes() - HDR_LEN);
                h.len = n as u32;
                if w.write_all(&h.to_bytes()).is_ok() && w.write_all(&payload[..n]).is_ok() {
                    (HDR_LEN + n, n)
                } else {
                    (0, 0)
                }
            }
            _ => (0, 0),
        };
        self.queues[RX_QUEUE]
            .add_used(&self.mem, head, written as u32)
            .map_err(MuxerError::RxQueue)?;
        self.used_rx = true;
        Ok(Some(sent))
    }

    /// RSTs first, then each stream's own packets (its REQUEST or RESPONSE,
    /// credit updates, data as credit allows, its SHUTDOWN), as RX buffers
    /// allow.
    fn pump_to_guest(&mut self) -> Result<(), MuxerError> {
        while let Some(h) = self.control.front().copied() {
            if self.rx_starved || self.deliver(h, &[])?.is_none() {
                return Ok(());
            }
            self.control.pop_front();
        }
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            loop {
                if self.rx_starved {
                    return Ok(());
                }
                let next = match self.conns.get_mut(&key) {
                    Some(c) => Self::next_for_guest(self.guest_cid, key, c),
                    None => NextForGuest::Nothing,
                };
                let (h, payload_len) = match next {
                    NextForGuest::Nothing => break,
                    NextForGuest::Control(h) => (h, 0),
                    NextForGuest::Data(h, n) => (h, n),
                };
                let Some(c) = self.conns.get_mut(&key) else {
                    break;
                };
                // The buffer moves out for the call and back after it.
                let buf = std::mem::take(&mut c.to_guest);
                let (off, end) = (c.rx_off, c.rx_off + payload_len);
                let sent = self.deliver(h, &buf[off..end]);
                let Some(c) = self.conns.get_mut(&key) else {
                    break;
                };
                c.to_guest = buf;
                let Some(sent) = sent? else {
                    return Ok(());
                };
                c.credit.fwd_cnt_for_header();
                match Op::from_u16(h.op) {
                    Some(Op::Rw) => {
                        c.rx_off += sent;
                        c.credit.on_sent_to_guest(sent as u32);
                    }
                    Some(Op::Request | Op::Response) => c.announce = None,
                    Some(Op::CreditUpdate) => c.credit_update_due = false,
                    Some(Op::Shutdown) => c.shutdown_due = false,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The next packet stream `key` owes the guest, reading the host socket
    /// when the stream may send data and holds none.
    fn next_for_guest(guest_cid: u64, key: ConnKey, c: &mut Conn) -> NextForGuest {
        let header = |op: Op, c: &Conn| {
            let mut h = Header::to_guest(guest_cid, key.0, key.1, op);
            h.buf_alloc = c.credit.buf_alloc();
            // The fwd_cnt as it stands; marked as told once delivered.
            h.fwd_cnt = c.credit.fwd_cnt();
            h
        };
        if let Some(op) = c.announce {
            return NextForGuest::Control(header(op, c));
        }
        if c.credit_update_due || c.credit.needs_update() {
            return NextForGuest::Control(header(Op::CreditUpdate, c));
        }
        if c.state != State::Established {
            return NextForGuest::Nothing;
        }
        if c.shutdown_due {
            let mut h = header(Op::Shutdown, c);
            h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            return NextForGuest::Control(h);
        }
        if c.host_eof {
            return NextForGuest::Nothing;
        }
        let credit = c.credit.peer_free() as usize;
        if credit == 0 {
            return NextForGuest::Nothing;
        }
        while c.rx_off == c.rx_end {
            // One read for as many RX buffers as the credit allows.
            if c.to_guest.len() < HOST_READ_CHUNK {
                c.to_guest.resize(HOST_READ_CHUNK, 0);
            }
            let want = credit.min(c.to_guest.len());
            match c.stream.read(&mut c.to_guest[..want]) {
                Ok(n) if n > 0 => (c.rx_off, c.rx_end) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return NextForGuest::Nothing,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EOF or a broken socket: the guest hears SHUTDOWN next.
                _ => {
                    Self::host_closed(c);
                    let mut h = header(Op::Shutdown, c);
                    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                    return NextForGuest::Control(h);
                }
            }
        }
        let n = (c.rx_end - c.rx_off)
            .min(credit)
            .min(MAX_PKT_PAYLOAD as usize);
        NextForGuest::Data(header(Op::Rw, c), n)
    }

    /// Watch a host socket for reading only while its data could move
    /// (level-triggered epoll would spin otherwise), for writing only while
    /// guest data waits for it.
    fn update_interest(&mut self) {
        let rx_open = !self.rx_starved;
        for c in self.conns.values_mut().filter(|c| !c.hung_up) {
            let mut want = EventSet::empty();
            if c.state == State::Established
                && !c.host_eof
                && rx_open
                && c.credit.peer_free() > 0
                && c.rx_off == c.rx_end
            {
                want |= EventSet::IN;
            }
            if !c.to_host.is_empty() {
                want |= EventSet::OUT;
            }
            if want != c.interest {
                let _ = self.fds.modify(c.stream.as_raw_fd(), c.token, want);
                c.interest = want;
            }
        }
    }
}

impl DeviceHandler for Muxer {
    type Error = MuxerError;

    fn queue_event(&mut self, queue: usize) -> Result<(), MuxerError> {
        match queue {
            RX_QUEUE => self.rx_starved = false,
            TX_QUEUE => self.process_tx()?,
            // The event queue only carries transport resets, which
            // coworkvm never sends.
            _ => {}
        }
        Ok(())
    }

    fn fd_event(&mut self, token: u64, events: EventSet) -> Result<(), MuxerError> {
        match token {
            TOKEN_LISTENER => self.accept_host_connections(),
            t => self.socket_event(t, events),
        }
        Ok(())
    }

    /// What follows every wait: the listener back if its pause is over,
    /// the guest gets what can move, epoll interest follows the streams'
    /// state, one interrupt.
    fn after_events(&mut self) -> Result<(), MuxerError> {
        self.resume_listener_if_due();
        self.pump_to_guest()?;
        self.update_interest();
        if self.used_rx {
            self.used_rx = false;
            notify_used(&mut self.queues[RX_QUEUE], &self.mem, &self.interrupt)
                .map_err(MuxerError::RxQueue)?;
        }
        Ok(())
    }

    /// While the listener is paused, the wait ends when the pause does.
    fn wait_limit(&self) -> Option<Duration> {
        self.listener_paused_until
            .map(|until| until.saturating_duration_since(Instant::now()))
    }
}

/// Splits a TX chain's readable buffers into the packet header and the
/// payload's pieces of guest memory. None when the header does not fit or
/// cannot be read.
fn split_packet(
    mem: &GuestMemoryMmap,
    segs: &[(GuestAddress, usize)],
) -> Option<(Header, Vec<(GuestAddress, usize)>)> {
    let mut hdr = [0u8; HDR_LEN];
    let mut got = 0;
    let mut payload = Vec::with_capacity(segs.len());
    for &(addr, len) in segs {
        let take = (HDR_LEN - got).min(len);
        if take > 0 {
            mem.read_slice(&mut hdr[got..got + take], addr).ok()?;
            got += take;
        }
        if len > take {
            payload.push((addr.checked_add(take as u64)?, len - take));
        }
    }
    if got < HDR_LEN {
        return None;
    }
    Some((Header::parse(&hdr).ok()?, payload))
}

/// Passes `len` bytes of a packet's payload on to the host: written from
/// guest memory straight to the socket while it takes them and nothing is
/// queued before them, the rest copied to the stream's queue. The caller
/// has checked `len` against the payload. Err: the socket is broken, or
/// the guest's buffers are not guest memory.
fn forward(
    mem: &GuestMemoryMmap,
    c: &mut Conn,
    payload: &[(GuestAddress, usize)],
    mut len: usize,
) -> Result<(), ()> {
    let mut direct = c.to_host.is_empty();
    for &(addr, seg_len) in payload {
        if len == 0 {
            break;
        }
        let take = seg_len.min(len);
        len -= take;
        let slice = mem.get_slice(addr, take).map_err(|_| ())?;
        let mut done = 0;
        while direct && done < take {
            match c
                .stream
                .write_volatile(&slice.offset(done).map_err(|_| ())?)
            {
                Ok(0) => return Err(()),
                Ok(n) => {
                    done += n;
                    c.credit.on_forwarded(n as u32);
                }
                Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    direct = false
                }
                Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        if done < take {
            let mut rest = vec![0u8; take - done];
            let at = addr.checked_add(done as u64).ok_or(())?;
            mem.read_slice(&mut rest, at).map_err(|_| ())?;
            c.to_host.extend(&rest);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn conn(stream: UnixStream) -> Conn {
        let mut credit = Credit::new(CONN_BUF_ALLOC);
        credit.update_peer(CONN_BUF_ALLOC, 0);
        Conn::new(
            stream,
            State::Established,
            credit,
            TOKEN_DYNAMIC,
            Op::Response,
            Vec::new(),
        )
    }

    #[test]
    fn header_split_over_buffers_and_payload_pieces() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut h = Header::to_guest(3, 1, 2, Op::Rw);
        h.len = 10;
        let bytes = h.to_bytes();
        mem.write_slice(&bytes[..20], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&bytes[20..], GuestAddress(0x2000)).unwrap();
        // Second buffer: the header's last 24 bytes, then 6 payload bytes.
        let segs = [
            (GuestAddress(0x1000), 20),
            (GuestAddress(0x2000), HDR_LEN - 20 + 6),
            (GuestAddress(0x3000), 4),
        ];
        let (parsed, payload) = split_packet(&mem, &segs).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(
            payload,
            [(GuestAddress(0x2000 + 24), 6), (GuestAddress(0x3000), 4)]
        );
        assert!(split_packet(&mem, &[(GuestAddress(0x1000), 20)]).is_none());
        assert!(split_packet(&mem, &[(GuestAddress(0xfff0), HDR_LEN)]).is_none());
    }

    #[test]
    fn payload_goes_straight_to_the_socket_and_the_rest_is_queued() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let data: Vec<u8> = (0..0xc_0000u32).map(|i| (i * 7) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x1000)).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = conn(a);
        // Two pieces; the socket's buffer cannot take all of it at once.
        let payload = [
            (GuestAddress(0x1000), 0x1_0000),
            (GuestAddress(0x1_1000), 0xb_0000),
        ];
        let len = 0xb_8000;
        c.credit = Credit::new(1 << 20);
        c.credit.on_received(len as u32).unwrap();
        forward(&mem, &mut c, &payload, len).unwrap();
        let queued = c.to_host.len();
        assert!(queued > 0 && queued < len, "{queued} of {len} queued");
        assert_eq!(c.credit.buffered() as usize, queued);
        // Read everything on the other side while the rest is flushed.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        b.set_nonblocking(true).unwrap();
        while got.len() < len {
            match b.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let (s, _) = c.to_host.as_slices();
                    let n = c.stream.write(s).unwrap_or(0);
                    c.to_host.drain(..n);
                    c.credit.on_forwarded(n as u32);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, data[..len]);
        assert_eq!(c.credit.buffered(), 0);
        // Once something is queued, later data queues behind it.
        c.to_host.push_back(b'x');
        c.credit.on_received(4).unwrap();
        forward(&mem, &mut c, &payload, 4).unwrap();
        assert_eq!(
            c.to_host.iter().copied().collect::<Vec<_>>(),
            [b'x', data[0], data[1], data[2], data[3]]
        );
        // Memory outside the guest's is refused.
        assert!(forward(&mem, &mut c, &[(GuestAddress(0xf_fff0), 0x20)], 0x20).is_err());
    }

    // ---- The muxer driven through its queues (testing::Harness) ----

    use super::super::testing::{guest_header, Harness, FUZZ_LISTEN_PORT, GUEST_CID};
    use std::io::ErrorKind;

    const AGENT_PORT: u32 = 51234;
    const ZERO: Duration = Duration::ZERO;

    /// (op, host port, guest port) of each packet the guest received.
    fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<(Op, u32, u32)> {
        pkts.iter()
            .map(|(h, _)| {
                assert_eq!((h.src_cid, h.dst_cid), (2, GUEST_CID));
                (Op::from_u16(h.op).unwrap(), h.src_port, h.dst_port)
            })
            .collect()
    }

    fn harness() -> Harness {
        Harness::new().unwrap()
    }

    fn request(h: &mut Harness, guest_port: u32, host_port: u32) {
        h.send(&guest_header(Op::Request, guest_port, host_port), &[])
            .unwrap();
    }

    /// Takes the one connection waiting on `l`.
    fn accept_one(l: &UnixListener) -> UnixStream {
        let (s, _) = l.accept().expect("the muxer connected");
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// The muxer closed `s` without answering (an RST when it left the
    /// peer's bytes unread).
    fn assert_closed(s: &mut UnixStream) {
        match s.read(&mut [0u8; 8]) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("expected the socket closed, got {other:?}"),
        }
    }

    fn nothing_waits(l: &UnixListener) -> bool {
        matches!(l.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock)
    }

    /// A guest stream from privileged port `guest_port` to `AGENT_PORT`,
    /// accepted on both sides.
    fn open_stream(h: &mut Harness, l: &UnixListener, guest_port: u32) -> UnixStream {
        request(h, guest_port, AGENT_PORT);
        let host = accept_one(l);
        assert_eq!(
            ops(&h.drain_rx().unwrap()),
            [(Op::Response, AGENT_PORT, guest_port)]
        );
        host
    }

    #[test]
    fn the_privileged_port_rule() {
        assert!(is_privileged_guest_port(0));
        assert!(is_privileged_guest_port(1023));
        assert!(!is_privileged_guest_port(1024));
        assert!(!is_privileged_guest_port(u32::MAX));
    }

    #[test]
    fn unprivileged_source_port_gets_rst_and_no_host_connect() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        for _ in 0..10 {
            request(&mut h, 2000, AGENT_PORT);
        }
        assert!(nothing_waits(&agent), "the host socket was never dialed");
        assert_eq!(h.muxer.connection_count(), 0);
        assert_eq!(
            ops(&h.drain_rx().unwrap()),
            [(Op::Rst, AGENT_PORT, 2000); 10]
        );
        // Logged once, then counted.
        assert_eq!(h.muxer.refusals().unprivileged_port.count(), 10);
        // Data on the refused stream goes nowhere either.
        let mut rw = guest_header(Op::Rw, 2000, AGENT_PORT);
        rw.len = 5;
        h.send(&rw, b"hello").unwrap();
        assert!(nothing_waits(&agent));
        assert_eq!(ops(&h.drain_rx().unwrap()), [(Op::Rst, AGENT_PORT, 2000)]);
    }

    #[test]
    fn privileged_source_port_connects_and_gets_response() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        request(&mut h, 1000, AGENT_PORT);
        let _host = accept_one(&agent);
        let rx = h.drain_rx().unwrap();
        assert_eq!(ops(&rx), [(Op::Response, AGENT_PORT, 1000)]);
        assert_eq!(rx[0].0.buf_alloc, CONN_BUF_ALLOC);
        assert_eq!(h.muxer.connection_count(), 1);
        assert_eq!(h.muxer.refusals().unprivileged_port.count(), 0);
    }

    #[test]
    fn the_rule_applies_at_1023_and_1024_exactly() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        request(&mut h, 1023, AGENT_PORT);
        request(&mut h, 1024, AGENT_PORT);
        let _host = accept_one(&agent);
        assert!(nothing_waits(&agent));
        let mut got = ops(&h.drain_rx().unwrap());
        got.sort_by_key(|o| o.2);
        assert_eq!(
            got,
            [
                (Op::Response, AGENT_PORT, 1023),
                (Op::Rst, AGENT_PORT, 1024)
            ]
        );
    }

    #[test]
    fn missing_host_socket_is_an_rst() {
        let mut h = harness();
        request(&mut h, 1000, 5999);
        assert_eq!(ops(&h.drain_rx().unwrap()), [(Op::Rst, 5999, 1000)]);
        assert_eq!(h.muxer.connection_count(), 0);
        assert_eq!(h.muxer.refusals().host_connect_failed.count(), 1);
    }

    #[test]
    fn full_listener_backlog_is_an_rst_and_the_muxer_goes_on() {
        let mut h = harness();
        let l = h.listen(7100).unwrap();
        // SAFETY: listen(2) on a listening socket we own only lowers its
        // backlog: one pending connection fills it.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        let _filler = UnixStream::connect(h.host_path(7100)).unwrap();
        // A blocking connect would hang the worker here.
        request(&mut h, 1000, 7100);
        assert_eq!(ops(&h.drain_rx().unwrap()), [(Op::Rst, 7100, 1000)]);
        assert_eq!(h.muxer.refusals().host_connect_failed.count(), 1);
        // Once the service takes its connection, the next stream gets in.
        let _ = accept_one(&l);
        request(&mut h, 1001, 7100);
        let _host = accept_one(&l);
        assert_eq!(ops(&h.drain_rx().unwrap()), [(Op::Response, 7100, 1001)]);
    }

    #[test]
    fn connect_nonblocking_refuses_paths_sockaddr_un_cannot_hold() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        assert!(matches!(
            connect_nonblocking(&long),
            Err(HostConnectError::PathTooLong(_))
        ));
        assert!(matches!(
            connect_nonblocking(Path::new("/nonexistent/v.sock_1")),
            Err(HostConnectError::Connect(_))
        ));
    }

    #[test]
    fn a_million_tx_packets_without_rx_buffers_keep_the_control_queue_bounded() {
        let mut h = harness();
        let total = 1_000_000u32;
        let mut posted = 0u32;
        while posted < total {
            for _ in 0..QUEUE_BATCH.min(total - posted) {
                let i = posted;
                // RSTs owed for unknown streams, refused REQUESTs, credit
                // requests and malformed packets, each on a new key.
                let op = [Op::Rw, Op::Request, Op::CreditRequest, Op::Shutdown][i as usize % 4];
                let mut p = guest_header(op, 1024 + (i % 60000), 5000 + i / 60000);
                let payload: &[u8] = if op == Op::Rw { b"x" } else { &[] };
                p.len = payload.len() as u32;
                if i % 7 == 0 {
                    p.len = 9; // does not match the buffer: malformed
                }
                h.post_tx(&p, payload);
                posted += 1;
            }
            h.kick_tx().unwrap();
            assert!(h.muxer.control_queue_len() <= MAX_CONTROL_PACKETS);
        }
        assert_eq!(h.tx_used(), total as u16, "every TX chain was returned");
        assert_eq!(h.muxer.control_queue_len(), MAX_CONTROL_PACKETS);
        assert!(h.muxer.refusals().control_queue_full.count() >= u64::from(total) - 256);
        assert_eq!(h.muxer.connection_count(), 0);
        // The queued RSTs go out once the guest posts buffers, then nothing.
        let rx = h.drain_rx().unwrap();
        assert_eq!(rx.len(), MAX_CONTROL_PACKETS);
        assert!(rx.iter().all(|(p, _)| p.op == Op::Rst as u16));
        assert_eq!(h.muxer.control_queue_len(), 0);
    }

    const QUEUE_BATCH: u32 = super::super::testing::QUEUE_LEN as u32;

    #[test]
    fn a_full_control_queue_still_answers_new_streams() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        for i in 0..300 {
            h.post_tx(&guest_header(Op::CreditRequest, 100, 9000 + i), &[]);
            if i % 200 == 199 {
                h.kick_tx().unwrap();
            }
        }
        h.kick_tx().unwrap();
        assert_eq!(h.muxer.control_queue_len(), MAX_CONTROL_PACKETS);
        // A RESPONSE belongs to its stream, not to the bounded queue.
        request(&mut h, 1000, AGENT_PORT);
        let _host = accept_one(&agent);
        let rx = ops(&h.drain_rx().unwrap());
        assert_eq!(rx.len(), MAX_CONTROL_PACKETS + 1);
        assert_eq!(rx[MAX_CONTROL_PACKETS], (Op::Response, AGENT_PORT, 1000));
    }

    /// Streams from privileged guest ports to two services: `n` of them.
    fn fill_connections(h: &mut Harness, services: &[(u32, &UnixListener)], n: usize) {
        let mut opened = 0;
        'outer: for &(port, _) in services {
            for guest_port in 1..PRIVILEGED_PORT_LIMIT {
                if opened == n {
                    break 'outer;
                }
                h.post_tx(&guest_header(Op::Request, guest_port, port), &[]);
                opened += 1;
                if opened % 128 == 0 {
                    h.kick_tx().unwrap();
                }
            }
        }
        h.kick_tx().unwrap();
    }

    /// The test opens MAX_CONNECTIONS sockets; make sure it may.
    fn ensure_fd_room(needed: u64) {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the live struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        if lim.rlim_cur < needed && lim.rlim_max >= needed {
            lim.rlim_cur = needed;
            // SAFETY: setrlimit reads the live struct we pass; raising the
            // soft limit within the hard one only affects this test binary.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        }
    }

    #[test]
    fn connections_beyond_the_limit_are_refused_both_ways() {
        ensure_fd_room(4096);
        let mut h = harness();
        let a = h.listen(7000).unwrap();
        let b = h.listen(7001).unwrap();
        fill_connections(&mut h, &[(7000, &a), (7001, &b)], MAX_CONNECTIONS);
        assert_eq!(h.muxer.connection_count(), MAX_CONNECTIONS);
        // One more guest stream: RST.
        request(&mut h, 500, 7002);
        assert_eq!(h.muxer.connection_count(), MAX_CONNECTIONS);
        assert_eq!(h.muxer.refusals().connection_limit.count(), 1);
        let rx = ops(&h.drain_rx().unwrap());
        assert_eq!(rx.len(), MAX_CONNECTIONS + 1);
        assert!(rx.contains(&(Op::Rst, 7002, 500)));
        // One more host stream: its socket is closed.
        let mut host = UnixStream::connect(&h.uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.write_all(b"CONNECT 6000\n").unwrap();
        for _ in 0..3 {
            h.poll(Duration::from_millis(20)).unwrap();
        }
        assert_closed(&mut host);
        assert_eq!(h.muxer.refusals().connection_limit.count(), 2);
        assert!(h.drain_rx().unwrap().is_empty(), "no REQUEST went out");
        // Closing one stream makes room again.
        h.send(&guest_header(Op::Rst, 1, 7000), &[]).unwrap();
        request(&mut h, 500, 7002);
        assert_eq!(ops(&h.drain_rx().unwrap()), [(Op::Rst, 7002, 500)]);
        assert_eq!(h.muxer.refusals().host_connect_failed.count(), 1);
    }

    #[test]
    fn guest_rst_removes_the_connection_and_closes_the_host_socket() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        let mut host = open_stream(&mut h, &agent, 1000);
        h.send(&guest_header(Op::Rst, 1000, AGENT_PORT), &[])
            .unwrap();
        assert_eq!(h.muxer.connection_count(), 0);
        assert!(h.muxer.tokens.is_empty());
        assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0);
        assert!(h.drain_rx().unwrap().is_empty(), "an RST is not answered");
    }

    #[test]
    fn guest_full_shutdown_hands_over_data_and_resets() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        let mut host = open_stream(&mut h, &agent, 1000);
        let mut rw = guest_header(Op::Rw, 1000, AGENT_PORT);
        rw.len = 4;
        h.send(&rw, b"data").unwrap();
        let mut sd = guest_header(Op::Shutdown, 1000, AGENT_PORT);
        sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        h.send(&sd, &[]).unwrap();
        assert_eq!(h.muxer.connection_count(), 0);
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"data");
        assert_eq!(ops(&h.drain_rx().unwrap()), [(Op::Rst, AGENT_PORT, 1000)]);
    }

    #[test]
    fn host_close_sends_shutdown_and_the_guest_rst_ends_it() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        let host = open_stream(&mut h, &agent, 1000);
        drop(host);
        h.poll(Duration::from_millis(100)).unwrap();
        let rx = h.drain_rx().unwrap();
        assert_eq!(ops(&rx), [(Op::Shutdown, AGENT_PORT, 1000)]);
        assert_eq!(rx[0].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
        assert_eq!(h.muxer.connection_count(), 1, "until the guest answers");
        h.send(&guest_header(Op::Rst, 1000, AGENT_PORT), &[])
            .unwrap();
        assert_eq!(h.muxer.connection_count(), 0);
        assert!(h.drain_rx().unwrap().is_empty());
    }

    #[test]
    fn data_flows_both_ways_within_credit() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        let mut host = open_stream(&mut h, &agent, 1000);
        let mut rw = guest_header(Op::Rw, 1000, AGENT_PORT);
        rw.len = 5;
        h.send(&rw, b"hello").unwrap();
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        host.write_all(b"world").unwrap();
        h.poll(Duration::from_millis(100)).unwrap();
        let rx = h.drain_rx().unwrap();
        assert_eq!(ops(&rx), [(Op::Rw, AGENT_PORT, 1000)]);
        assert_eq!(rx[0].1, b"world");
        assert_eq!(rx[0].0.fwd_cnt, 5, "the host took the guest's 5 bytes");
    }

    #[test]
    fn host_data_to_the_guest_is_bounded_by_the_guest_credit() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        let mut req = guest_header(Op::Request, 1000, AGENT_PORT);
        req.buf_alloc = 1000;
        h.send(&req, &[]).unwrap();
        let mut host = accept_one(&agent);
        host.write_all(&[7u8; 100_000]).unwrap();
        h.poll(Duration::from_millis(100)).unwrap();
        let data: usize = h
            .drain_rx()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.op == Op::Rw as u16)
            .map(|(_, d)| d.len())
            .sum();
        assert_eq!(data, 1000, "no more than the guest has room for");
        let c = &h.muxer.conns[&(AGENT_PORT, 1000)];
        assert!(c.to_guest.len() <= HOST_READ_CHUNK);
        assert_eq!(c.rx_end - c.rx_off, 0, "read only what credit allowed");
        // The guest consumed it: 1000 more.
        let mut upd = guest_header(Op::CreditUpdate, 1000, AGENT_PORT);
        upd.buf_alloc = 1000;
        upd.fwd_cnt = 1000;
        h.send(&upd, &[]).unwrap();
        let more: usize = h.drain_rx().unwrap().iter().map(|(_, d)| d.len()).sum();
        assert_eq!(more, 1000);
    }

    #[test]
    fn guest_data_for_the_host_is_bounded_by_the_credit_granted() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        // The host service never reads.
        let _host = open_stream(&mut h, &agent, 1000);
        let chunk = vec![1u8; MAX_PKT_PAYLOAD as usize];
        let mut sent = 0usize;
        let mut rw = guest_header(Op::Rw, 1000, AGENT_PORT);
        rw.len = chunk.len() as u32;
        while h.muxer.connection_count() == 1 {
            h.send(&rw, &chunk).unwrap();
            sent += chunk.len();
            if let Some(c) = h.muxer.conns.get(&(AGENT_PORT, 1000)) {
                assert!(c.to_host.len() <= CONN_BUF_ALLOC as usize);
                assert_eq!(c.to_host.len(), c.credit.buffered() as usize);
            }
            assert!(sent < 64 << 20, "the stream never ran out of credit");
        }
        assert!(ops(&h.drain_rx().unwrap()).contains(&(Op::Rst, AGENT_PORT, 1000)));
    }

    #[test]
    fn credit_request_is_answered_with_an_update() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        let _host = open_stream(&mut h, &agent, 1000);
        h.send(&guest_header(Op::CreditRequest, 1000, AGENT_PORT), &[])
            .unwrap();
        let rx = h.drain_rx().unwrap();
        assert_eq!(ops(&rx), [(Op::CreditUpdate, AGENT_PORT, 1000)]);
        assert_eq!(rx[0].0.buf_alloc, CONN_BUF_ALLOC);
    }

    #[test]
    fn duplicate_request_and_forged_response_are_reset() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        let _host = open_stream(&mut h, &agent, 1000);
        request(&mut h, 1000, AGENT_PORT);
        assert_eq!(h.muxer.connection_count(), 0);
        h.send(&guest_header(Op::Response, 1001, AGENT_PORT), &[])
            .unwrap();
        assert_eq!(
            ops(&h.drain_rx().unwrap()),
            [(Op::Rst, AGENT_PORT, 1000), (Op::Rst, AGENT_PORT, 1001)]
        );
    }

    #[test]
    fn malformed_packet_on_a_stream_resets_it() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        let _host = open_stream(&mut h, &agent, 1000);
        let mut rw = guest_header(Op::Rw, 1000, AGENT_PORT);
        rw.len = 100; // the buffer holds 3
        h.send(&rw, b"abc").unwrap();
        assert_eq!(h.muxer.connection_count(), 0);
        assert_eq!(ops(&h.drain_rx().unwrap()), [(Op::Rst, AGENT_PORT, 1000)]);
        assert_eq!(h.muxer.refusals().malformed_packet.count(), 1);
    }

    #[test]
    fn host_connect_handshake_reaches_the_guest() {
        let mut h = harness();
        let mut host = UnixStream::connect(&h.uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.write_all(b"CONNECT 6000\nearly").unwrap();
        for _ in 0..3 {
            h.poll(Duration::from_millis(20)).unwrap();
        }
        let rx = h.drain_rx().unwrap();
        assert_eq!(ops(&rx), [(Op::Request, FIRST_HOST_PORT, 6000)]);
        // Early bytes wait for the guest's RESPONSE.
        h.send(&guest_header(Op::Response, 6000, FIRST_HOST_PORT), &[])
            .unwrap();
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        let rx = h.drain_rx().unwrap();
        assert_eq!(ops(&rx), [(Op::Rw, FIRST_HOST_PORT, 6000)]);
        assert_eq!(rx[0].1, b"early");
    }

    #[test]
    fn guest_refusing_a_host_stream_closes_the_host_socket() {
        let mut h = harness();
        let mut host = UnixStream::connect(&h.uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.write_all(
            b"CONNECT 7777
",
        )
        .unwrap();
        for _ in 0..3 {
            h.poll(Duration::from_millis(20)).unwrap();
        }
        assert_eq!(
            ops(&h.drain_rx().unwrap()),
            [(Op::Request, FIRST_HOST_PORT, 7777)]
        );
        // Nobody listens on guest port 7777.
        h.send(&guest_header(Op::Rst, 7777, FIRST_HOST_PORT), &[])
            .unwrap();
        assert_eq!(h.muxer.connection_count(), 0);
        assert_closed(&mut host);
    }

    #[test]
    fn guest_half_close_reaches_the_host_as_eof_and_the_host_may_answer() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        let mut host = open_stream(&mut h, &agent, 1000);
        let mut rw = guest_header(Op::Rw, 1000, AGENT_PORT);
        rw.len = 3;
        h.send(&rw, b"req").unwrap();
        let mut sd = guest_header(Op::Shutdown, 1000, AGENT_PORT);
        sd.flags = SHUTDOWN_SEND;
        h.send(&sd, &[]).unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"req");
        assert_eq!(h.muxer.connection_count(), 1, "half closed only");
        host.write_all(b"answer").unwrap();
        h.poll(Duration::from_millis(100)).unwrap();
        let rx = h.drain_rx().unwrap();
        assert_eq!(ops(&rx), [(Op::Rw, AGENT_PORT, 1000)]);
        assert_eq!(rx[0].1, b"answer");
    }

    /// The guest shuts down sending while the host peer has not read all
    /// it sent (so the host's EOF is still pending in the muxer), then sends
    /// more: that data must never reach the host as if it came before the
    /// end of the input; the stream is reset instead.
    #[test]
    fn data_after_the_guests_own_send_shutdown_resets_the_stream() {
        let mut h = harness();
        let agent = h.listen(AGENT_PORT).unwrap();
        let mut host = open_stream(&mut h, &agent, 1000);
        // Nearly the whole credit, more than the host socket buffers while
        // the host reads nothing: the rest waits in the muxer.
        let total = CONN_BUF_ALLOC as usize - 16;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        for chunk in data.chunks(MAX_PKT_PAYLOAD as usize) {
            let mut rw = guest_header(Op::Rw, 1000, AGENT_PORT);
            rw.len = chunk.len() as u32;
            h.send(&rw, chunk).unwrap();
        }
        let mut sd = guest_header(Op::Shutdown, 1000, AGENT_PORT);
        sd.flags = SHUTDOWN_SEND;
        h.send(&sd, &[]).unwrap();
        let mut rw = guest_header(Op::Rw, 1000, AGENT_PORT);
        rw.len = 5;
        h.send(&rw, b"after").unwrap();
        assert_eq!(h.muxer.connection_count(), 0, "the stream is reset");
        // Credit updates for what the host took may come first.
        let rx = ops(&h.drain_rx().unwrap());
        assert_eq!(rx.last(), Some(&(Op::Rst, AGENT_PORT, 1000)), "{rx:?}");
        assert_eq!(rx.iter().filter(|o| o.0 == Op::Rst).count(), 1, "{rx:?}");
        host.set_nonblocking(false).unwrap();
        let mut got = Vec::new();
        let _ = host.read_to_end(&mut got);
        assert!(
            !got.ends_with(b"after"),
            "data sent after SHUTDOWN(SEND) reached the host"
        );
        assert!(
            data.starts_with(&got),
            "the host got a prefix of what was sent"
        );
    }

    #[test]
    fn every_packet_to_an_unknown_stream_gets_exactly_one_rst_and_an_rst_none() {
        let mut h = harness();
        let _agent = h.listen(AGENT_PORT).unwrap();
        // No stream 1000 -> AGENT_PORT exists: each packet that expects a
        // live stream is answered by one RST; an RST is never answered.
        for op in [Op::Rw, Op::CreditUpdate, Op::CreditRequest, Op::Shutdown] {
            let mut hdr = guest_header(op, 1000, AGENT_PORT);
            let payload: &[u8] = if op == Op::Rw { b"x" } else { &[] };
            hdr.len = payload.len() as u32;
            if op == Op::Shutdown {
                hdr.flags = SHUTDOWN_SEND;
            }
            h.send(&hdr, payload).unwrap();
            assert_eq!(
                ops(&h.drain_rx().unwrap()),
                [(Op::Rst, AGENT_PORT, 1000)],
                "{op:?} to an unknown stream"
            );
        }
        h.send(&guest_header(Op::Rst, 1000, AGENT_PORT), &[])
            .unwrap();
        assert!(h.drain_rx().unwrap().is_empty(), "an RST is not answered");
        assert_eq!(h.muxer.connection_count(), 0);
    }

    #[test]
    fn host_peer_of_another_user_is_refused() {
        let mut h = harness();
        // SAFETY: geteuid(2) takes nothing and cannot fail.
        let me = unsafe { libc::geteuid() };
        h.muxer.peer_policy = PeerPolicy {
            owner_uid: me.wrapping_add(1),
            allow_root: false,
        };
        let mut host = UnixStream::connect(&h.uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.write_all(b"CONNECT 6000\n").unwrap();
        for _ in 0..3 {
            h.poll(Duration::from_millis(20)).unwrap();
        }
        assert_closed(&mut host);
        assert_eq!(h.muxer.refusals().peer_not_allowed.count(), 1);
        assert!(h.drain_rx().unwrap().is_empty());
        assert!(PeerPolicy::current_user().allows(me));
        assert!(PeerPolicy::current_user().allows(0));
    }

    #[test]
    fn pending_handshakes_are_bounded() {
        let mut h = harness();
        let mut silent = Vec::new();
        for _ in 0..MAX_PENDING_HANDSHAKES + 1 {
            silent.push(UnixStream::connect(&h.uds).unwrap());
            h.poll(ZERO).unwrap();
        }
        assert_eq!(h.muxer.handshakes.len(), MAX_PENDING_HANDSHAKES);
        let last = silent.last_mut().unwrap();
        last.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_closed(last);
        assert_eq!(h.muxer.refusals().handshake_limit.count(), 1);
    }

    #[test]
    fn running_out_of_descriptors_pauses_the_listener_instead_of_spinning() {
        let mut h = harness();
        let _pending = UnixStream::connect(&h.uds).unwrap();
        // What accept(2) says when the process is at RLIMIT_NOFILE; the
        // connection stays in the backlog and the listener readable.
        h.muxer
            .accept_failed(io::Error::from_raw_os_error(libc::EMFILE));
        assert_eq!(h.muxer.refusals().accept_failed.count(), 1);
        let t = Instant::now();
        h.poll(Duration::from_secs(5)).unwrap();
        let waited = t.elapsed();
        assert!(
            waited >= LISTENER_BACKOFF.mul_f32(0.9),
            "returned after {waited:?}: the readable listener woke the worker"
        );
        assert!(waited < Duration::from_secs(4), "the pause ended");
        assert!(h.muxer.handshakes.is_empty());
        // Back in epoll: the pending connection is taken.
        h.poll(Duration::from_millis(100)).unwrap();
        assert_eq!(h.muxer.handshakes.len(), 1);
    }

    #[test]
    fn fuzz_entry_point_holds_on_pseudo_random_programs() {
        // A quick, deterministic stand-in for `make fuzz`.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in [0usize, 1, 16, 64, 256, 1024, 4096] {
            for _ in 0..8 {
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                super::super::testing::fuzz_one(&data).unwrap();
            }
        }
        let _ = FUZZ_LISTEN_PORT;
    }
}
