//! The vsock worker: moves packets between the guest's queues and host
//! Unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
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
    /// Host-to-guest bytes read before the stream was established.
    to_guest_early: Vec<u8>,
    guest_stopped_sending: bool,
    host_eof: bool,
    /// The host closed its socket; it is out of epoll (a hung-up socket
    /// reports HUP forever) and is drained by `pump_to_guest` until EOF.
    hung_up: bool,
    interest: EventSet,
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

    /// Reads every packet the guest queued for the host.
    fn process_tx(&mut self) -> Result<(), virtio_queue::Error> {
        let mut used = false;
        loop {
            let mem = &self.mem;
            let Some(chain) = self.queues[TX_QUEUE].pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let parsed = match chain.reader::<()>(mem) {
                Ok(mut r) => {
                    let mut hdr = [0u8; HDR_LEN];
                    match r.read_exact(&mut hdr) {
                        Ok(()) => {
                            let header = Header::parse(&hdr).ok();
                            let avail = r.available_bytes();
                            let want = header
                                .map_or(0, |h| (h.len.min(MAX_PKT_PAYLOAD) as usize).min(avail));
                            let mut payload = vec![0u8; want];
                            match r.read_exact(&mut payload) {
                                Ok(()) => header.map(|h| (h, payload, avail)),
                                Err(_) => None,
                            }
                        }
                        Err(_) => None,
                    }
                }
                Err(_) => None,
            };
            self.queues[TX_QUEUE].add_used(&self.mem, head, 0)?;
            used = true;
            match parsed {
                Some((h, payload, avail)) => self.handle_guest_packet(h, payload, avail),
                None => tracing::debug!("vsock: dropped an unreadable TX packet"),
            }
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

    fn handle_guest_packet(&mut self, h: Header, payload: Vec<u8>, avail: usize) {
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
                c.to_host.extend(&payload[..h.len as usize]);
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
            Conn {
                stream,
                state: State::Established,
                credit,
                token,
                to_host: VecDeque::new(),
                to_guest_early: Vec::new(),
                guest_stopped_sending: false,
                host_eof: false,
                hung_up: false,
                interest: EventSet::IN,
            },
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
                    Conn {
                        stream,
                        state: State::Connecting,
                        credit,
                        token,
                        to_host: VecDeque::new(),
                        to_guest_early: early,
                        guest_stopped_sending: false,
                        host_eof: false,
                        hung_up: false,
                        interest: EventSet::IN,
                    },
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

    /// Writes one packet into the next RX buffer; false if the guest has none.
    fn deliver(&mut self, mut h: Header, payload: &[u8]) -> bool {
        let mem = &self.mem;
        let Some(chain) = self.queues[RX_QUEUE].pop_descriptor_chain(mem) else {
            self.rx_starved = true;
            return false;
        };
        let head = chain.head_index();
        h.len = payload.len() as u32;
        let written = match chain.writer::<()>(mem) {
            Ok(mut w) if w.available_bytes() >= HDR_LEN + payload.len() => {
                let ok = w.write_all(&h.to_bytes()).is_ok() && w.write_all(payload).is_ok();
                if ok {
                    HDR_LEN + payload.len()
                } else {
                    0
                }
            }
            _ => 0,
        };
        if self.queues[RX_QUEUE]
            .add_used(&self.mem, head, written as u32)
            .is_err()
        {
            self.rx_starved = true;
            return false;
        }
        self.used_rx = true;
        written > 0
    }

    /// Room for payload in the next RX buffer, without taking it.
    fn rx_capacity(&mut self) -> Option<usize> {
        let mem = &self.mem;
        let q = &mut self.queues[RX_QUEUE];
        let chain = q.pop_descriptor_chain(mem)?;
        let cap = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| d.len() as usize)
            .sum::<usize>();
        q.go_to_previous_position();
        Some(cap.saturating_sub(HDR_LEN))
    }

    /// Control packets first, then stream data as credit and buffers allow.
    fn pump_to_guest(&mut self) {
        while let Some(mut h) = self.control.pop_front() {
            if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
                h.buf_alloc = c.credit.buf_alloc();
                h.fwd_cnt = c.credit.fwd_cnt_for_header();
            }
            if !self.deliver(h, &[]) {
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
                let Some(room) = self.rx_capacity() else {
                    self.rx_starved = true;
                    return;
                };
                let Some(c) = self.conns.get_mut(&key) else {
                    break;
                };
                let max = credit.min(room).min(MAX_PKT_PAYLOAD as usize);
                if max == 0 {
                    break;
                }
                let mut buf = vec![0u8; max];
                let n = if !c.to_guest_early.is_empty() {
                    let n = c.to_guest_early.len().min(max);
                    buf[..n].copy_from_slice(&c.to_guest_early[..n]);
                    c.to_guest_early.drain(..n);
                    n
                } else {
                    match c.stream.read(&mut buf) {
                        Ok(0) => {
                            self.host_closed(key);
                            break;
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            self.host_closed(key);
                            break;
                        }
                    }
                };
                c.credit.on_sent_to_guest(n as u32);
                let mut h = Header::to_guest(self.guest_cid, key.0, key.1, Op::Rw);
                h.buf_alloc = c.credit.buf_alloc();
                h.fwd_cnt = c.credit.fwd_cnt_for_header();
                if !self.deliver(h, &buf[..n]) {
                    return;
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
            if c.state == State::Established && !c.host_eof && rx_open && c.credit.peer_free() > 0 {
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
