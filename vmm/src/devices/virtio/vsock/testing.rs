//! A guest driver for the vsock device's queues, on virtio-queue's
//! `MockSplitQueue`: the muxer's unit tests and its fuzz target drive a real
//! [`Muxer`] with real descriptor chains in guest memory and real host Unix
//! sockets in a private directory.
//!
//! Layout of guest memory: the three rings at the bottom, then one RX buffer
//! slot per RX descriptor, then one TX slot (header and the largest payload)
//! per TX descriptor. Descriptor `i` of a ring always points at slot `i`, so
//! a ring never holds more than [`QUEUE_LEN`] buffers the device has not
//! used, as a real driver would.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::{GuestQueues, Muxer, MuxerError, CONN_BUF_ALLOC, FIRST_HOST_PORT};
use super::packet::{Header, Op, HDR_LEN, HOST_CID, MAX_PKT_PAYLOAD, TYPE_STREAM};
use super::{RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::worker::{EventLoop, Flow, WorkerError};
use crate::devices::virtio::VirtioInterrupt;

/// Why the muxer stopped under the harness: its own error, or its worker
/// loop's epoll.
pub type HarnessError = WorkerError<MuxerError>;

pub const GUEST_CID: u64 = 3;
pub const QUEUE_LEN: u16 = 256;
const RING_BASE: [u64; 3] = [0, 0x1_0000, 0x2_0000];
const RX_BUF_BASE: u64 = 0x10_0000;
/// What Linux posts: a 4 KiB payload buffer after the header.
pub const RX_BUF_LEN: u32 = 4096 + HDR_LEN as u32;
const RX_SLOT: u64 = 0x2000;
const TX_BUF_BASE: u64 = RX_BUF_BASE + QUEUE_LEN as u64 * RX_SLOT;
const TX_SLOT: u64 = 0x1_1000;
pub const MEM_SIZE: u64 = TX_BUF_BASE + QUEUE_LEN as u64 * TX_SLOT;

const F_WRITE: u16 = 2;

/// A header as the guest kernel writes it for a stream packet.
pub fn guest_header(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op: op as u16,
        buf_alloc: CONN_BUF_ALLOC,
        ..Default::default()
    }
}

/// Where one queue's rings are in guest memory; `MockSplitQueue` laid
/// them out and zeroed them once (it zeroes them again whenever one is
/// made, so the harness keeps the addresses, not the mock).
#[derive(Clone, Copy)]
struct Rings {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

impl Rings {
    fn store_desc(&self, mem: &GuestMemoryMmap, i: u16, d: SplitDescriptor) {
        let at = self.desc.unchecked_add(16 * u64::from(i % QUEUE_LEN));
        mem.write_obj(RawDescriptor::from(d), at)
            .expect("descriptor table is guest memory");
    }

    /// Makes `head` available as avail entry `idx`.
    fn make_available(&self, mem: &GuestMemoryMmap, idx: u16, head: u16) {
        let entry = self.avail.unchecked_add(4 + 2 * u64::from(idx % QUEUE_LEN));
        mem.write_obj(head.to_le(), entry)
            .expect("avail ring is guest memory");
        mem.write_obj(idx.wrapping_add(1).to_le(), self.avail.unchecked_add(2))
            .expect("avail ring is guest memory");
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(self.used.unchecked_add(2)).expect("used ring"))
    }

    /// (descriptor id, bytes written) of used entry `i`.
    fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(i % QUEUE_LEN));
        let id: u32 = mem.read_obj(at).expect("used ring");
        let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("used ring");
        (u32::from_le(id), u32::from_le(len))
    }
}

/// A private directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "coworkvm-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A muxer, the worker loop that drives it (on the test's thread) and the
/// guest driving both.
pub struct Harness {
    pub muxer: Muxer,
    pub mem: GuestMemoryMmap,
    /// `<uds>`: host programs connect here; guest streams go to `<uds>_P`.
    pub uds: PathBuf,
    event_loop: EventLoop,
    rings: [Rings; 3],
    kicks: Vec<EventFd>,
    rx_avail: u16,
    rx_used_seen: u16,
    tx_avail: u16,
    _stop: EventFd,
    _dir: TempDir,
}

impl Harness {
    pub fn new() -> io::Result<Self> {
        let dir = TempDir::new()?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .map_err(io::Error::other)?;
        let mut queues = Vec::new();
        let mut rings = Vec::new();
        for base in RING_BASE {
            let mock = MockSplitQueue::create(&mem, GuestAddress(base), QUEUE_LEN);
            let mut q: Queue = mock
                .create_queue()
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
            // The mock (0.18) puts the used ring 4 + len bytes after the
            // avail ring, not 6 + 2 * len: from entry len / 2 on, the
            // device's used entries would overwrite the driver's avail
            // entries. Move it past the avail ring (and its used_event).
            let used = mock
                .avail_addr()
                .unchecked_add(6 + 2 * u64::from(QUEUE_LEN))
                .unchecked_align_up(4);
            q.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
            queues.push(q);
            rings.push(Rings {
                desc: mock.desc_table_addr(),
                avail: mock.avail_addr(),
                used,
            });
        }
        let rings = [rings[0], rings[1], rings[2]];
        let queue_events = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let kicks = queue_events
            .iter()
            .map(|e| e.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds)?;
        let guest = GuestQueues {
            mem: mem.clone(),
            queues,
            interrupt: Arc::new(VirtioInterrupt::new()?),
        };
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let event_loop = EventLoop::new(stop.try_clone()?, queue_events)?;
        let muxer = Muxer::new(
            GUEST_CID,
            uds.clone(),
            listener,
            super::muxer::PeerPolicy::current_user(),
            guest,
            event_loop.registry(),
        )?;
        Ok(Self {
            muxer,
            mem,
            uds,
            event_loop,
            rings,
            kicks,
            rx_avail: 0,
            rx_used_seen: 0,
            tx_avail: 0,
            _stop: stop,
            _dir: dir,
        })
    }

    /// The host socket a guest stream to host port `port` connects to.
    pub fn host_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }

    /// A host service listening for guest streams to `port`.
    pub fn listen(&self, port: u32) -> io::Result<UnixListener> {
        let l = UnixListener::bind(self.host_path(port))?;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    /// Runs the muxer's worker loop once, waiting at most `timeout` (what
    /// it has to do now, with a zero timeout). Ok(false): it was stopped.
    pub fn poll(&mut self, timeout: Duration) -> Result<bool, HarnessError> {
        let flow = self.event_loop.poll_once(&mut self.muxer, Some(timeout))?;
        Ok(flow == Flow::Continue)
    }

    fn kick(&mut self, q: usize) -> Result<(), HarnessError> {
        let _ = self.kicks[q].write(1);
        self.poll(Duration::ZERO).map(|_| ())
    }

    /// Puts one packet (header and payload in one buffer) on the TX queue
    /// without telling the device.
    pub fn post_tx(&mut self, h: &Header, payload: &[u8]) {
        let payload = &payload[..payload.len().min(MAX_PKT_PAYLOAD as usize)];
        let slot = self.tx_avail % QUEUE_LEN;
        let addr = TX_BUF_BASE + slot as u64 * TX_SLOT;
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.mem
            .write_slice(&bytes, GuestAddress(addr))
            .expect("TX slot is guest memory");
        self.post_tx_descriptors(&[(slot, SplitDescriptor::new(addr, bytes.len() as u32, 0, 0))]);
    }

    /// Writes `descs` (index, descriptor) into the TX descriptor table and
    /// makes the first one available: any chain shape, valid or not.
    pub fn post_tx_descriptors(&mut self, descs: &[(u16, SplitDescriptor)]) {
        let rings = self.rings[TX_QUEUE];
        for &(i, d) in descs {
            rings.store_desc(&self.mem, i, d);
        }
        let head = descs.first().map_or(0, |d| d.0 % QUEUE_LEN);
        rings.make_available(&self.mem, self.tx_avail, head);
        self.tx_avail = self.tx_avail.wrapping_add(1);
    }

    /// Writes `idx` as queue `q`'s available index, as a driver breaking
    /// its ring would (an index more than [`QUEUE_LEN`] ahead of what the
    /// device has taken), without telling the device.
    pub fn set_avail_index(&mut self, q: usize, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), self.rings[q].avail.unchecked_add(2))
            .expect("avail ring is guest memory");
    }

    /// Tells the device about the TX packets posted and lets it run.
    pub fn kick_tx(&mut self) -> Result<(), HarnessError> {
        self.kick(TX_QUEUE)
    }

    /// Posts one packet and lets the device handle it.
    pub fn send(&mut self, h: &Header, payload: &[u8]) -> Result<(), HarnessError> {
        self.post_tx(h, payload);
        self.kick_tx()
    }

    /// How many TX chains the device returned.
    pub fn tx_used(&self) -> u16 {
        self.rings[TX_QUEUE].used_idx(&self.mem)
    }

    /// Posts `n` RX buffers (as many as fit: the ring holds at most
    /// [`QUEUE_LEN`] unused ones) and lets the device fill them.
    pub fn give_rx(&mut self, n: usize) -> Result<(), HarnessError> {
        let rings = self.rings[RX_QUEUE];
        let used = rings.used_idx(&self.mem);
        let free = QUEUE_LEN - self.rx_avail.wrapping_sub(used);
        for _ in 0..n.min(free as usize) {
            let slot = self.rx_avail % QUEUE_LEN;
            let d =
                SplitDescriptor::new(RX_BUF_BASE + slot as u64 * RX_SLOT, RX_BUF_LEN, F_WRITE, 0);
            rings.store_desc(&self.mem, slot, d);
            rings.make_available(&self.mem, self.rx_avail, slot);
            self.rx_avail = self.rx_avail.wrapping_add(1);
        }
        self.kick(RX_QUEUE)
    }

    /// The packets the device put in RX buffers since the last call.
    pub fn take_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let rings = self.rings[RX_QUEUE];
        let used = rings.used_idx(&self.mem);
        let mut out = Vec::new();
        while self.rx_used_seen != used {
            let (id, len) = rings.used_elem(&self.mem, self.rx_used_seen);
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let addr = RX_BUF_BASE + u64::from(id % u32::from(QUEUE_LEN)) * RX_SLOT;
            let len = (len as usize).min(RX_BUF_LEN as usize);
            if len < HDR_LEN {
                continue;
            }
            let mut bytes = vec![0u8; len];
            self.mem
                .read_slice(&mut bytes, GuestAddress(addr))
                .expect("RX slot is guest memory");
            let h = Header::parse(&bytes).expect("a full header");
            out.push((h, bytes[HDR_LEN..].to_vec()));
        }
        out
    }

    /// Gives RX buffers until the device has nothing more to say; returns
    /// everything it said.
    pub fn drain_rx(&mut self) -> Result<Vec<(Header, Vec<u8>)>, HarnessError> {
        let mut all = Vec::new();
        loop {
            self.give_rx(QUEUE_LEN as usize)?;
            let got = self.take_rx();
            if got.is_empty() {
                return Ok(all);
            }
            all.extend(got);
        }
    }
}

/// A byte reader for the fuzz input: zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
}

/// The host ports the fuzz guest dials: one listened on, one not.
pub const FUZZ_LISTEN_PORT: u32 = 51234;
pub const FUZZ_MISSING_PORT: u32 = 5999;

/// One fuzz case: `data` is a program of guest and host actions (TX
/// packets, well-formed or not, raw descriptor chains of any shape, RX
/// buffers, host connections). After each action the muxer's bounds must
/// hold; a panic or a broken bound is a finding. Returns an error only when
/// the harness itself cannot be set up.
pub fn fuzz_one(data: &[u8]) -> io::Result<()> {
    use super::muxer::{MAX_CONNECTIONS, MAX_CONTROL_PACKETS};
    use std::io::Write;
    let mut h = Harness::new()?;
    let service = h.listen(FUZZ_LISTEN_PORT)?;
    let mut host_peers = Vec::new();
    let mut accepted = Vec::new();
    let mut input = Input(data);
    while !input.0.is_empty() {
        let result = match input.u8() % 7 {
            0 => {
                // A stream packet as the guest kernel would write it, with
                // fuzzed op, ports, flow control and payload.
                let op = Op::from_u16(u16::from(input.u8() % 8)).unwrap_or(Op::Rw);
                let src = match input.u8() % 3 {
                    0 => u32::from(input.u16() % 1024),
                    1 => 1024 + u32::from(input.u16()),
                    _ => input.u32(),
                };
                let dst = match input.u8() % 4 {
                    0 => FUZZ_LISTEN_PORT,
                    1 => FUZZ_MISSING_PORT,
                    // The ports of host-initiated streams.
                    2 => FIRST_HOST_PORT + u32::from(input.u8() % 8),
                    _ => input.u32(),
                };
                let mut hdr = guest_header(op, src, dst);
                hdr.flags = u32::from(input.u8() % 4);
                hdr.buf_alloc = input.u32();
                hdr.fwd_cnt = input.u32();
                let len = usize::from(input.u16() % 4096);
                let payload = input.bytes(len).to_vec();
                hdr.len = if op == Op::Rw {
                    payload.len() as u32
                } else {
                    0
                };
                h.send(&hdr, &payload)
            }
            1 => {
                // Any 44 header bytes and a payload.
                let raw = input.bytes(HDR_LEN).to_vec();
                let mut b = [0u8; HDR_LEN];
                b[..raw.len()].copy_from_slice(&raw);
                let hdr = Header::parse(&b).expect("HDR_LEN bytes");
                let len = usize::from(input.u16() % 4096);
                let payload = input.bytes(len).to_vec();
                h.send(&hdr, &payload)
            }
            2 => {
                // A raw descriptor chain: any addresses, lengths, flags
                // (indirect and write-only included) and links.
                let n = 1 + input.u8() % 4;
                let descs: Vec<(u16, SplitDescriptor)> = (0..n)
                    .map(|_| {
                        let i = input.u16();
                        let addr = if input.u8() % 4 == 0 {
                            u64::from(input.u32()) << (input.u8() % 33)
                        } else {
                            TX_BUF_BASE + u64::from(input.u32()) % (QUEUE_LEN as u64 * TX_SLOT)
                        };
                        let len = input.u32() % 0x2_0000;
                        let flags = input.u16() & 7;
                        let next = input.u16();
                        (i, SplitDescriptor::new(addr, len, flags, next))
                    })
                    .collect();
                h.post_tx_descriptors(&descs);
                h.kick_tx()
            }
            3 => {
                let n = usize::from(input.u8() % 64);
                h.give_rx(n)
            }
            4 => {
                h.take_rx();
                Ok(())
            }
            5 => {
                // A host program opens a stream to a guest port.
                if host_peers.len() < 8 {
                    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&h.uds) {
                        let _ = s.set_nonblocking(true);
                        let line = format!("CONNECT {}\n", input.u16());
                        let _ = s.write_all(line.as_bytes());
                        host_peers.push(s);
                    }
                }
                h.poll(Duration::ZERO).map(|_| ())
            }
            _ => {
                // The host service takes its streams and writes to them.
                while let Ok((s, _)) = service.accept() {
                    let _ = s.set_nonblocking(true);
                    accepted.push(s);
                }
                let len = usize::from(input.u8());
                let data = input.bytes(len).to_vec();
                for s in &mut accepted {
                    let _ = s.write(&data);
                }
                if input.u8() % 8 == 0 {
                    accepted.pop();
                }
                h.poll(Duration::ZERO).map(|_| ())
            }
        };
        // The TX and RX queues are well-formed here, so the device must
        // keep serving them.
        if let Err(e) = result {
            panic!("the muxer gave up: {e}");
        }
        assert!(h.muxer.control_queue_len() <= MAX_CONTROL_PACKETS);
        assert!(h.muxer.connection_count() <= MAX_CONNECTIONS);
    }
    Ok(())
}
