//! The vsock worker: moves packets between the guest's queues and host
//! Unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemoryError,
    WriteVolatile,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::credit::Credit;
use super::handshake::{ok_line, ConnectParser};
use super::packet::{Header, Op, HDR_LEN, MAX_PKT_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::{RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::{ActivateContext, VirtioInterrupt};

/// Receive buffer each stream advertises to the guest.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// First port handed to host-initiated streams (Firecracker's convention).
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// Most host-to-guest bytes one read of a host socket takes.
const HOST_READ_CHUNK: usize = 64 * 1024;
/// Most host connections waiting to finish their CONNECT line.
const MAX_PENDING_HANDSHAKES: usize = 64;

const TOKEN_STOP: u64 = 0;
const TOKEN_QUEUE_BASE: u64 = 1; // 1, 2, 3: rx, tx, event queues
const TOKEN_LISTENER: u64 = 4;
const TOKEN_DYNAMIC: u64 = 16;

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
    /// Guest-to-host bytes the host socket has not taken yet.
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
    /// A connection with nothing queued but `early`: host bytes read before
    /// the guest accepted it.
    fn new(stream: UnixStream, state: State, credit: Credit, token: u64, early: Vec<u8>) -> Self {
        Conn {
            stream,
            state,
            credit,
            token,
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

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    stop: EventFd,
    epoll: Epoll,
    conns: HashMap<ConnKey, Conn>,
    tokens: HashMap<u64, ConnKey>,
    handshakes: HashMap<u64, (UnixStream, ConnectParser)>,
    /// Control packets waiting for an RX buffer.
    control: VecDeque<Header>,
    next_token: u64,
    next_host_port: u32,
    rx_starved: bool,
    used_rx: bool,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        ctx: ActivateContext,
        stop: EventFd,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        for (i, evt) in ctx.queue_events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_QUEUE_BASE + i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            mem: ctx.mem,
            queues: ctx.queues,
            queue_events: ctx.queue_events,
            interrupt: ctx.interrupt,
            stop,
            epoll,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            next_token: TOKEN_DYNAMIC,
            next_host_port: FIRST_HOST_PORT,
            rx_starved: false,
            used_rx: false,
        })
    }

    pub fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => {
                        let _ = self.stop.read();
                        return;
                    }
                    t if (TOKEN_QUEUE_BASE..TOKEN_QUEUE_BASE + 3).contains(&t) => {
                        let q = (t - TOKEN_QUEUE_BASE) as usize;
                        let _ = self.queue_events[q].read();
                        match q {
                            RX_QUEUE => self.rx_starved = false,
                            TX_QUEUE => {
                                if let Err(e) = self.process_tx() {
                                    tracing::error!("vsock: TX queue unusable: {e:?}");
                                    return;
                                }
                            }
                            // The event queue only carries transport resets,
                            // which coworkvm never sends.
                            _ => {}
                        }
                    }
                    TOKEN_LISTENER => self.accept_host_connections(),
                    t => self.socket_event(t, ev.event_set()),
                }
            }
            self.pump_to_guest();
            self.update_interest();
            if self.used_rx {
                self.used_rx = false;
                let _ = self.interrupt.signal_used_queue();
            }
        }
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn reply(&self, key: ConnKey, op: Op) -> Header {
        Header::to_guest(self.guest_cid, key.0, key.1, op)
    }

    fn push_rst(&mut self, key: ConnKey) {
        let h = self.reply(key, Op::Rst);
        self.control.push_back(h);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            if c.hung_up {
                return;
            }
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn register(&self, fd: i32, token: u64, set: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
    }

    /// Reads every packet the guest queued for the host. A packet's
    /// payload goes from guest memory straight to the host socket when
    /// nothing is queued before it; only what the socket does not take is
    /// copied.
    fn process_tx(&mut self) -> Result<(), virtio_queue::Error> {
        let mut used = false;
        while let Some(chain) = self.queues[TX_QUEUE].pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let segs: Vec<(GuestAddress, usize)> = chain
                .readable()
                .map(|d| (d.addr(), d.len() as usize))
                .collect();
            // The buffers stay the guest's until add_used: handle first.
            match split_packet(&self.mem, &segs) {
                Some((h, payload)) => self.handle_guest_packet(h, &payload),
                None => tracing::debug!("vsock: dropped an unreadable TX packet"),
            }
            self.queues[TX_QUEUE].add_used(&self.mem, head, 0)?;
            used = true;
        }
        if used
            && self.queues[TX_QUEUE]
                .needs_notification(&self.mem)
                .unwrap_or(true)
        {
            let _ = self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn handle_guest_packet(&mut self, h: Header, payload: &[(GuestAddress, usize)]) {
        let avail = payload.iter().map(|s| s.1).sum();
        let op = match h.validate_from_guest(self.guest_cid, avail) {
            Ok(op) => op,
            Err(e) => {
                tracing::debug!("vsock: malformed packet: {e}");
                // Answer with RST when the packet names a stream at all.
                if h.op != Op::Rst as u16 && h.src_cid == self.guest_cid {
                    self.push_rst((h.dst_port, h.src_port));
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
                    Some(c) if c.state == State::Connecting => {
                        c.state = State::Established;
                        // A fresh socket's buffer always takes these few
                        // bytes; they are not guest data, so they stay out
                        // of the stream's credit accounting.
                        c.stream.write_all(ok_line(key.0).as_bytes()).is_ok()
                    }
                    _ => false,
                };
                if !established {
                    self.remove_conn(key);
                    self.push_rst(key);
                }
            }
            Op::Rw => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.push_rst(key);
                    return;
                };
                if c.state != State::Established || c.credit.on_received(h.len).is_err() {
                    tracing::debug!("vsock: stream {key:?} broke flow control");
                    self.remove_conn(key);
                    self.push_rst(key);
                    return;
                }
                if forward(&self.mem, c, payload, h.len as usize).is_err() {
                    self.remove_conn(key);
                    self.push_rst(key);
                    return;
                }
                self.flush_to_host(key);
            }
            Op::CreditUpdate => {
                if !self.conns.contains_key(&key) {
                    self.push_rst(key);
                }
            }
            Op::CreditRequest => {
                if let Some(c) = self.conns.get_mut(&key) {
                    let mut r = Header::to_guest(self.guest_cid, key.0, key.1, Op::CreditUpdate);
                    r.buf_alloc = c.credit.buf_alloc();
                    r.fwd_cnt = c.credit.fwd_cnt_for_header();
                    self.control.push_back(r);
                } else {
                    self.push_rst(key);
                }
            }
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
                        self.remove_conn(key);
                        self.push_rst(key);
                    } else if c.guest_stopped_sending && c.to_host.is_empty() {
                        let _ = c.stream.shutdown(std::net::Shutdown::Write);
                    }
                } else {
                    self.push_rst(key);
                }
            }
            Op::Rst => self.remove_conn(key),
        }
    }

    /// The guest dials host port `key.0`: connect to `<uds>_<port>`.
    fn guest_connects(&mut self, key: ConnKey, h: &Header) {
        if self.conns.contains_key(&key) {
            self.remove_conn(key);
            self.push_rst(key);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                tracing::debug!("vsock: nobody listens on {}", path.display());
                self.push_rst(key);
                return;
            }
        };
        let token = self.new_token();
        if self
            .register(stream.as_raw_fd(), token, EventSet::IN)
            .is_err()
        {
            self.push_rst(key);
            return;
        }
        let mut credit = Credit::new(CONN_BUF_ALLOC);
        credit.update_peer(h.buf_alloc, h.fwd_cnt);
        self.tokens.insert(token, key);
        self.conns.insert(
            key,
            Conn::new(stream, State::Established, credit, token, Vec::new()),
        );
        let r = self.reply(key, Op::Response);
        self.control.push_back(r);
    }

    fn accept_host_connections(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_PENDING_HANDSHAKES
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropped: closes the socket
                    }
                    let token = self.new_token();
                    if self
                        .register(stream.as_raw_fd(), token, EventSet::IN)
                        .is_ok()
                    {
                        self.handshakes
                            .insert(token, (stream, ConnectParser::default()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::debug!("vsock: accept: {e}");
                    return;
                }
            }
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
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        c.stream.as_raw_fd(),
                        EpollEvent::default(),
                    );
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
        match done {
            Ok(None) => {
                self.handshakes.insert(token, (stream, parser));
            }
            Err(()) => {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            Ok(Some((guest_port, early))) => {
                let host_port = self.next_host_port;
                self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
                let key = (host_port, guest_port);
                let credit = Credit::new(CONN_BUF_ALLOC);
                let mut req = self.reply(key, Op::Request);
                req.buf_alloc = credit.buf_alloc();
                self.control.push_back(req);
                self.tokens.insert(token, key);
                self.conns.insert(
                    key,
                    Conn::new(stream, State::Connecting, credit, token, early),
                );
            }
        }
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
            self.remove_conn(key);
            self.push_rst(key);
            return;
        }
        if c.guest_stopped_sending && c.to_host.is_empty() {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if c.credit.needs_update() {
            let mut u = Header::to_guest(self.guest_cid, key.0, key.1, Op::CreditUpdate);
            u.buf_alloc = c.credit.buf_alloc();
            u.fwd_cnt = c.credit.fwd_cnt_for_header();
            self.control.push_back(u);
        }
    }

    fn host_closed(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.host_eof {
                c.host_eof = true;
                let mut s = Header::to_guest(self.guest_cid, key.0, key.1, Op::Shutdown);
                s.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                self.control.push_back(s);
            }
        }
    }

    /// Writes one packet into the next RX buffer: the header and up to
    /// `max` bytes of `payload` (`max` also bounds it; a control packet has
    /// none). Returns the payload bytes written, or None if the guest has
    /// no buffer (or the queue is broken). A buffer too small for the
    /// header is returned to the guest empty.
    fn deliver(&mut self, mut h: Header, payload: &[u8]) -> Option<usize> {
        let mem = &self.mem;
        let Some(chain) = self.queues[RX_QUEUE].pop_descriptor_chain(mem) else {
            self.rx_starved = true;
            return None;
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
        if self.queues[RX_QUEUE]
            .add_used(&self.mem, head, written as u32)
            .is_err()
        {
            self.rx_starved = true;
            return None;
        }
        self.used_rx = true;
        (written > 0).then_some(sent)
    }

    /// Control packets first, then stream data as credit and buffers allow.
    fn pump_to_guest(&mut self) {
        while let Some(mut h) = self.control.pop_front() {
            if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
                h.buf_alloc = c.credit.buf_alloc();
                h.fwd_cnt = c.credit.fwd_cnt_for_header();
            }
            if self.deliver(h, &[]).is_none() {
                if self.rx_starved {
                    self.control.push_front(h);
                }
                return;
            }
        }
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            loop {
                if self.rx_starved {
                    return;
                }
                let Some(c) = self.conns.get_mut(&key) else {
                    break;
                };
                if c.state != State::Established || c.host_eof {
                    break;
                }
                let credit = c.credit.peer_free() as usize;
                if credit == 0 {
                    break;
                }
                if c.rx_off == c.rx_end {
                    // One read for as many RX buffers as the credit allows.
                    if c.to_guest.len() < HOST_READ_CHUNK {
                        c.to_guest.resize(HOST_READ_CHUNK, 0);
                    }
                    let want = credit.min(c.to_guest.len());
                    match c.stream.read(&mut c.to_guest[..want]) {
                        Ok(0) => {
                            self.host_closed(key);
                            break;
                        }
                        Ok(n) => (c.rx_off, c.rx_end) = (0, n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            self.host_closed(key);
                            break;
                        }
                    }
                }
                let n = (c.rx_end - c.rx_off)
                    .min(credit)
                    .min(MAX_PKT_PAYLOAD as usize);
                let mut h = Header::to_guest(self.guest_cid, key.0, key.1, Op::Rw);
                h.buf_alloc = c.credit.buf_alloc();
                h.fwd_cnt = c.credit.fwd_cnt_for_header();
                // The buffer moves out for the call and back after it.
                let buf = std::mem::take(&mut c.to_guest);
                let (off, end) = (c.rx_off, c.rx_off + n);
                let sent = self.deliver(h, &buf[off..end]);
                let Some(c) = self.conns.get_mut(&key) else {
                    break;
                };
                c.to_guest = buf;
                match sent {
                    Some(sent) => {
                        c.rx_off += sent;
                        c.credit.on_sent_to_guest(sent as u32);
                    }
                    None => return,
                }
            }
        }
        // Host-closed streams queued a SHUTDOWN above; send it now.
        if !self.control.is_empty() && !self.rx_starved {
            self.pump_to_guest();
        }
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
                let _ = self.epoll.ctl(
                    ControlOperation::Modify,
                    c.stream.as_raw_fd(),
                    EpollEvent::new(want, c.token),
                );
                c.interest = want;
            }
        }
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
}
