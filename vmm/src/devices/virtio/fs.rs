//! virtio-fs (virtio 1.2 section 5.11) with an out-of-process back-end:
//! virtiofsd, spoken to over vhost-user.
//!
//! The VMM only owns the device's face to the driver (id 26, the config
//! space with the tag, two queues: `hiprio` and one request queue) and the
//! control of the back-end. The FUSE requests never pass through the VMM:
//! virtiofsd maps guest RAM (one sealed memfd, see the builder), reads the
//! rings itself, is woken by the queues' ioeventfds (the kick fds) and
//! interrupts the guest by writing the device's irqfd (the call fds).
//!
//! The lifecycle:
//! - [`Fs::new`], while the VMM builds the machine and before it confines
//!   itself: the vhost-user handshake (`SET_OWNER`, features, protocol
//!   features `MQ|REPLY_ACK`, the back-end's queue count). A back-end that
//!   cannot serve the device fails the boot with a reason.
//! - Activation (DRIVER_OK), on the device's worker thread (`virtio-fs`,
//!   whose seccomp list allows `sendmsg`/`recvmsg`; a vCPU's does not):
//!   `SET_FEATURES`, `SET_MEM_TABLE`, then per queue `SET_VRING_NUM`,
//!   `_ADDR`, `_BASE`, `_CALL`, `_KICK`, `_ENABLE`. The worker then only
//!   watches the socket: the back-end sends nothing unasked, so anything
//!   readable there is a hang-up (or a broken back-end), which stops the
//!   device with DEVICE_NEEDS_RESET and a configuration interrupt, as any
//!   failed worker does ([`super::worker`]). The VM and its other devices
//!   go on; the guest sees its shared folders fail.
//! - Driver reset: the worker stops, and on its way out disables the rings
//!   and fetches their bases (`GET_VRING_BASE` stops a ring in the
//!   back-end), so a new activation starts from clean rings.
//!
//! Known limit: a back-end that is alive but never answers a request
//! blocks the worker in `recvmsg` (the vhost crate retries EAGAIN, so a
//! socket timeout does not bound it), and a driver reset, which joins the
//! worker from a vCPU, then blocks that vCPU. A back-end that dies (its
//! socket hangs up) is handled as above: ending a wedged virtiofsd (its
//! owner, the share keeper, can) turns the first case into the second.
//!
//! Interrupts: the Firecracker scheme, not a relay. The back-end gets the
//! device's irqfd (registered with KVM on the device's GSI) as the call fd
//! of every queue, so a completion reaches the guest with no VMM thread in
//! the path (a relay costs one more wake-up and context switch per
//! completion, what QEMU's virtio-mmio pays). Since the back-end cannot
//! set InterruptStatus, the transport reports INT_VRING for this device
//! while it runs ([`VirtioDevice::backend_signals_irqfd`]; see
//! `MmioTransport::interrupt_status`).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, Le32,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{DeviceHandler, FdRegistry};
use super::{
    ActivateContext, ActivateError, DeviceWorker, VirtioDevice, VirtioInterrupt, TYPE_FS,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};

/// The longest tag (`struct virtio_fs_config.tag`); not NUL-terminated
/// when it fills the field.
pub const MAX_TAG_BYTES: usize = 36;
/// The one request queue virtiofsd serves (and Linux uses).
pub const REQUEST_QUEUES: u32 = 1;
/// `hiprio` plus the request queues.
pub const NUM_QUEUES: usize = 1 + REQUEST_QUEUES as usize;
/// QueueNumMax of both queues: Linux sizes a FUSE request's pages by it
/// (`max_pages_limit = queue size - 4`), and virtiofsd accepts up to 32768.
pub const QUEUE_MAX_SIZE: u16 = 1024;
/// The thread name of the device's worker (picks its seccomp list).
pub const WORKER_THREAD: &str = "virtio-fs";

/// The virtio features the guest may see, when the back-end offers them:
/// nothing device-specific (Linux's virtio-fs feature table is empty).
const GUEST_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX;
/// The protocol features the VMM uses: the queue count query, and an
/// acknowledgement of every request (so a refused request is an error
/// here, not a silently broken device).
const PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::MQ.union(VhostUserProtocolFeatures::REPLY_ACK);
/// SET_MEM_TABLE's limit: one descriptor per region in one message.
const MAX_MEMORY_REGIONS: usize = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;
/// Epoll token of the vhost-user socket in the worker's loop.
const SOCKET_TOKEN: u64 = 0;

/// Why the virtio-fs device cannot be built or cannot run.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the virtio-fs tag must be 1 to {MAX_TAG_BYTES} bytes without NUL, got {0:?}")]
    Tag(String),
    #[error("vhost-user {0} failed: {1}")]
    Request(&'static str, vhost::Error),
    #[error("the vhost-user back-end lacks {0}")]
    Missing(&'static str),
    #[error("the vhost-user back-end serves {0} queues; virtio-fs needs {NUM_QUEUES}")]
    TooFewQueues(u64),
    #[error("guest memory region at {0:#x} is not file-backed; vhost-user needs shared memory")]
    MemoryNotShared(u64),
    #[error("guest memory has {0} regions; vhost-user takes 1 to {MAX_MEMORY_REGIONS}")]
    MemoryRegions(usize),
    #[error("queue {0}'s ring at {1:#x} is not in guest memory")]
    RingAddress(usize, u64),
    #[error("the vhost-user back-end hung up or sent an unrequested message")]
    BackendGone,
}

/// `struct virtio_fs_config` (include/uapi/linux/virtio_fs.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsConfigSpace {
    /// The tag, NUL-padded (no terminator when it is 36 bytes).
    pub tag: [u8; MAX_TAG_BYTES],
    /// Request queues after `hiprio`; Linux refuses the device with 0.
    pub num_request_queues: Le32,
}

impl Default for FsConfigSpace {
    fn default() -> Self {
        Self {
            tag: [0; MAX_TAG_BYTES],
            num_request_queues: 0.into(),
        }
    }
}

// SAFETY: FsConfigSpace is repr(C): a byte array and a little-endian u32
// at offset 36 (4-aligned), 40 bytes with no padding (asserted below), so
// every byte pattern is a valid value and it holds no references.
unsafe impl ByteValued for FsConfigSpace {}
const _: () = assert!(std::mem::size_of::<FsConfigSpace>() == 40);

impl FsConfigSpace {
    pub fn new(tag: &str) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > MAX_TAG_BYTES || tag.contains('\0') {
            return Err(FsError::Tag(tag.to_owned()));
        }
        let mut config = Self {
            num_request_queues: REQUEST_QUEUES.into(),
            ..Self::default()
        };
        config.tag[..tag.len()].copy_from_slice(tag.as_bytes());
        Ok(config)
    }
}

fn request<T>(what: &'static str, result: vhost::Result<T>) -> Result<T, FsError> {
    result.map_err(|e| FsError::Request(what, e))
}

/// The virtio-fs device: its config space and the vhost-user connection
/// to its back-end.
pub struct Fs {
    config: FsConfigSpace,
    frontend: Frontend,
    /// Features offered by the back-end (all of them, for SET_FEATURES).
    backend_features: u64,
    /// What the guest is offered: the back-end's, within GUEST_FEATURES.
    guest_features: u64,
}

impl Fs {
    /// Takes the connected vhost-user socket of the back-end and does the
    /// handshake. Runs before the sandbox: it is the only place the VMM
    /// talks to the back-end from outside the device's worker.
    pub fn new(socket: UnixStream, tag: &str) -> Result<Self, FsError> {
        let config = FsConfigSpace::new(tag)?;
        let mut frontend = Frontend::from_stream(socket, NUM_QUEUES as u64);
        request("SET_OWNER", frontend.set_owner())?;
        let backend_features = request("GET_FEATURES", frontend.get_features())?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::Missing("VIRTIO_F_VERSION_1"));
        }
        // Without it the rings cannot be disabled on a driver reset.
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(FsError::Missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        let offered = request("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
        let protocol = offered & PROTOCOL_FEATURES;
        request(
            "SET_PROTOCOL_FEATURES",
            frontend.set_protocol_features(protocol),
        )?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let queues = request("GET_QUEUE_NUM", frontend.get_queue_num())?;
            if queues < NUM_QUEUES as u64 {
                return Err(FsError::TooFewQueues(queues));
            }
        }
        Ok(Self {
            config,
            frontend,
            backend_features,
            guest_features: backend_features & GUEST_FEATURES,
        })
    }
}

/// The memory table for the back-end: every region of guest RAM with its
/// file and offset in it.
pub fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, FsError> {
    let regions = mem
        .iter()
        .map(|region| {
            let file = region
                .file_offset()
                .ok_or(FsError::MemoryNotShared(region.start_addr().0))?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            })
        })
        .collect::<Result<Vec<_>, FsError>>()?;
    if regions.is_empty() || regions.len() > MAX_MEMORY_REGIONS {
        return Err(FsError::MemoryRegions(regions.len()));
    }
    Ok(regions)
}

/// A guest-physical ring address as the VMM's own virtual address, which
/// is what SET_VRING_ADDR carries (the back-end translates it through the
/// memory table's `userspace_addr`).
fn host_address(mem: &GuestMemoryMmap, queue: usize, addr: u64) -> Result<u64, FsError> {
    mem.get_host_address(GuestAddress(addr))
        .map(|p| p as u64)
        .map_err(|_| FsError::RingAddress(queue, addr))
}

/// Everything activation hands to the worker thread.
struct Activation {
    frontend: Frontend,
    features: u64,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
}

impl Activation {
    /// The vring setup, on the worker thread. Returns the indices of the
    /// rings the back-end now serves.
    fn run(&self) -> Result<Vec<usize>, FsError> {
        let f = &self.frontend;
        request("SET_FEATURES", f.set_features(self.features))?;
        request("SET_MEM_TABLE", f.set_mem_table(&memory_table(&self.mem)?))?;
        let mut started = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            // A driver may leave a queue unused; it gets no ring.
            if !q.ready() {
                continue;
            }
            request("SET_VRING_NUM", f.set_vring_num(i, q.size()))?;
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host_address(&self.mem, i, q.desc_table())?,
                used_ring_addr: host_address(&self.mem, i, q.used_ring())?,
                avail_ring_addr: host_address(&self.mem, i, q.avail_ring())?,
                log_addr: None,
            };
            request("SET_VRING_ADDR", f.set_vring_addr(i, &config))?;
            request("SET_VRING_BASE", f.set_vring_base(i, q.next_avail()))?;
            request(
                "SET_VRING_CALL",
                f.set_vring_call(i, self.interrupt.irqfd()),
            )?;
            request("SET_VRING_KICK", f.set_vring_kick(i, &self.kicks[i]))?;
            started.push(i);
        }
        let mut f = self.frontend.clone();
        for &i in &started {
            request("SET_VRING_ENABLE", f.set_vring_enable(i, true))?;
        }
        Ok(started)
    }
}

/// The running device's worker: watches the vhost-user socket.
struct FsWorker {
    frontend: Frontend,
    /// Rings the back-end serves, to stop on the way out.
    rings: Vec<usize>,
    /// The back-end failed: nothing more is said to it.
    failed: bool,
}

impl DeviceHandler for FsWorker {
    type Error = FsError;

    /// The queues' notifications go to the back-end, never to this loop.
    fn queue_event(&mut self, _queue: usize) -> Result<(), FsError> {
        Ok(())
    }

    fn fd_event(&mut self, _token: u64, _events: EventSet) -> Result<(), FsError> {
        // Between requests the back-end has nothing to say: readable
        // means it hung up (EOF, HUP) or broke the protocol.
        self.failed = true;
        Err(FsError::BackendGone)
    }
}

impl Drop for FsWorker {
    /// A driver reset (or the VMM's end): stop the rings in the back-end.
    fn drop(&mut self) {
        if self.failed {
            return;
        }
        for &i in &self.rings {
            let stopped = self
                .frontend
                .set_vring_enable(i, false)
                .and_then(|()| self.frontend.get_vring_base(i));
            if let Err(e) = stopped {
                tracing::warn!("virtio-fs: stopping ring {i} in the back-end: {e}");
                return;
            }
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        self.guest_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config(&self.config, offset, data)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<DeviceWorker, ActivateError> {
        if ctx.queues.len() != NUM_QUEUES || ctx.queue_events.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: ctx.queues.len(),
            });
        }
        // The protocol-features bit is the VMM's to ack, not the guest's.
        let features = (ctx.acked_features & self.guest_features)
            | (self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        let activation = Activation {
            frontend: self.frontend.clone(),
            features,
            mem: ctx.mem,
            queues: ctx.queues,
            kicks: ctx.queue_events,
            interrupt: ctx.interrupt.clone(),
        };
        // The loop gets no queue events: the kicks are the back-end's.
        DeviceWorker::start(
            WORKER_THREAD,
            "virtio-fs".into(),
            Vec::new(),
            ctx.interrupt,
            move |fds: FdRegistry| {
                let rings = activation.run().map_err(io::Error::other)?;
                let worker = FsWorker {
                    frontend: activation.frontend.clone(),
                    rings,
                    failed: false,
                };
                fds.add(
                    worker.frontend.as_raw_fd(),
                    SOCKET_TOKEN,
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                )?;
                Ok(worker)
            },
        )
    }

    fn backend_signals_irqfd(&self) -> bool {
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{
        MmioTransport, REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_INTERRUPT_ACK,
        REG_INTERRUPT_STATUS, REG_QUEUE_DESC_HIGH, REG_QUEUE_DESC_LOW, REG_QUEUE_DEVICE_HIGH,
        REG_QUEUE_DEVICE_LOW, REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DRIVER_LOW, REG_QUEUE_NUM,
        REG_QUEUE_READY, REG_QUEUE_SEL, REG_STATUS, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET,
        STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    };
    use crate::devices::virtio::{INT_CONFIG_CHANGE, INT_USED_RING};
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use vhost::vhost_user::message::{
        VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
        VhostUserInflight, VhostUserLog, VhostUserMemoryRegion, VhostUserShMemConfig,
        VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags,
        VhostUserVringState,
    };
    use vhost::vhost_user::{
        BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
        VhostUserBackendReqHandlerMut,
    };
    use vhost::VhostUserMemoryRegionBase;
    use vm_memory::GuestAddress;

    /// Bit 26: dirty logging, which virtiofsd offers and the guest must not see.
    const F_LOG_ALL: u64 = 1 << 26;
    /// What virtiofsd 1.14 offers (src/vhost_user.rs).
    const VIRTIOFSD_FEATURES: u64 = VIRTIO_F_VERSION_1
        | VIRTIO_F_RING_INDIRECT_DESC
        | VIRTIO_F_RING_EVENT_IDX
        | F_LOG_ALL
        | (1 << 30);

    /// One SET_MEM_TABLE region as the back-end received it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct Region {
        pub gpa: u64,
        pub size: u64,
        pub user_addr: u64,
        pub offset: u64,
    }

    /// A vhost-user back-end that does what virtiofsd does at the protocol
    /// level and records every request.
    #[derive(Default)]
    pub(crate) struct FakeBackend {
        pub features: u64,
        pub queue_num: u64,
        pub log: Vec<String>,
        pub regions: Vec<Region>,
        pub memory_files: Vec<File>,
        pub calls: Vec<Option<File>>,
        pub kicks: Vec<Option<File>>,
        pub vring_addrs: Vec<(u32, u64, u64, u64)>,
        /// Answer SET_MEM_TABLE with an error.
        pub refuse_mem_table: bool,
    }

    impl FakeBackend {
        pub(crate) fn virtiofsd() -> Self {
            Self {
                features: VIRTIOFSD_FEATURES,
                queue_num: 2,
                calls: vec![None, None],
                kicks: vec![None, None],
                ..Self::default()
            }
        }
    }

    fn unsupported<T>() -> VuResult<T> {
        Err(VuError::InvalidOperation("not used by virtio-fs"))
    }

    impl VhostUserBackendReqHandlerMut for FakeBackend {
        fn set_owner(&mut self) -> VuResult<()> {
            self.log.push("SET_OWNER".into());
            Ok(())
        }
        fn reset_owner(&mut self) -> VuResult<()> {
            unsupported()
        }
        fn reset_device(&mut self) -> VuResult<()> {
            unsupported()
        }
        fn get_features(&mut self) -> VuResult<u64> {
            self.log.push("GET_FEATURES".into());
            Ok(self.features)
        }
        fn set_features(&mut self, features: u64) -> VuResult<()> {
            self.log.push(format!("SET_FEATURES {features:#x}"));
            Ok(())
        }
        fn set_mem_table(
            &mut self,
            ctx: &[VhostUserMemoryRegion],
            files: Vec<File>,
            _postcopy_listening: Option<bool>,
        ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
            self.log.push("SET_MEM_TABLE".into());
            if self.refuse_mem_table {
                return Err(VuError::InvalidParam);
            }
            self.regions = ctx
                .iter()
                .map(|r| Region {
                    gpa: r.guest_phys_addr,
                    size: r.memory_size,
                    user_addr: r.user_addr,
                    offset: r.mmap_offset,
                })
                .collect();
            self.memory_files = files;
            Ok(None)
        }
        fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
            self.log.push(format!("SET_VRING_NUM {index} {num}"));
            Ok(())
        }
        fn set_vring_addr(
            &mut self,
            index: u32,
            _flags: VhostUserVringAddrFlags,
            descriptor: u64,
            used: u64,
            available: u64,
            _log: u64,
        ) -> VuResult<()> {
            self.log.push(format!("SET_VRING_ADDR {index}"));
            self.vring_addrs.push((index, descriptor, available, used));
            Ok(())
        }
        fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
            self.log.push(format!("SET_VRING_BASE {index} {base}"));
            Ok(())
        }
        fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
            self.log.push(format!("GET_VRING_BASE {index}"));
            Ok(VhostUserVringState::new(index, 0))
        }
        fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
            self.log.push(format!("SET_VRING_KICK {index}"));
            self.kicks[index as usize] = fd;
            Ok(())
        }
        fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
            self.log.push(format!("SET_VRING_CALL {index}"));
            self.calls[index as usize] = fd;
            Ok(())
        }
        fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
            unsupported()
        }
        fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
            self.log.push("GET_PROTOCOL_FEATURES".into());
            Ok(VhostUserProtocolFeatures::all())
        }
        fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
            self.log
                .push(format!("SET_PROTOCOL_FEATURES {features:#x}"));
            Ok(())
        }
        fn get_queue_num(&mut self) -> VuResult<u64> {
            self.log.push("GET_QUEUE_NUM".into());
            Ok(self.queue_num)
        }
        fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
            self.log.push(format!("SET_VRING_ENABLE {index} {enable}"));
            Ok(())
        }
        fn get_config(&mut self, _: u32, _: u32, _: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
            unsupported()
        }
        fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> VuResult<()> {
            unsupported()
        }
        fn set_gpu_socket(&mut self, _: GpuBackend) -> VuResult<()> {
            unsupported()
        }
        fn get_shared_object(&mut self, _: VhostUserSharedMsg) -> VuResult<File> {
            unsupported()
        }
        fn get_inflight_fd(
            &mut self,
            _: &VhostUserInflight,
        ) -> VuResult<(VhostUserInflight, File)> {
            unsupported()
        }
        fn set_inflight_fd(&mut self, _: &VhostUserInflight, _: File) -> VuResult<()> {
            unsupported()
        }
        fn get_max_mem_slots(&mut self) -> VuResult<u64> {
            unsupported()
        }
        fn add_mem_region(
            &mut self,
            _: &VhostUserSingleMemoryRegion,
            _: File,
            _: Option<bool>,
        ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
            unsupported()
        }
        fn remove_mem_region(&mut self, _: &VhostUserSingleMemoryRegion) -> VuResult<()> {
            unsupported()
        }
        fn set_device_state_fd(
            &mut self,
            _: VhostTransferStateDirection,
            _: VhostTransferStatePhase,
            _: File,
        ) -> VuResult<Option<File>> {
            unsupported()
        }
        fn check_device_state(&mut self) -> VuResult<()> {
            unsupported()
        }
        fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
            unsupported()
        }
        fn set_log_base(&mut self, _: &VhostUserLog, _: File) -> VuResult<()> {
            unsupported()
        }
    }

    /// A fake back-end serving one end of a socket pair on its own thread;
    /// `hang_up` closes its end (as a dying virtiofsd would).
    pub(crate) struct Served {
        pub backend: Arc<Mutex<FakeBackend>>,
        connection: UnixStream,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Served {
        pub(crate) fn log(&self) -> Vec<String> {
            self.backend.lock().unwrap().log.clone()
        }

        /// Waits (10 s at most) until the log has a line `line`.
        pub(crate) fn wait_for(&self, line: &str) -> bool {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.log().iter().any(|l| l == line) {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            true
        }

        pub(crate) fn hang_up(&mut self) {
            let _ = self.connection.shutdown(std::net::Shutdown::Both);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.hang_up();
        }
    }

    /// Serves `backend` on one end of a new socket pair; returns the other.
    pub(crate) fn serve(backend: FakeBackend) -> (UnixStream, Served) {
        let (frontend, backend_end) = UnixStream::pair().unwrap();
        let backend = Arc::new(Mutex::new(backend));
        let mut handler = BackendReqHandler::from_stream(backend_end, backend.clone());
        let connection = handler.try_clone_connection().unwrap();
        let thread = std::thread::spawn(move || while handler.handle_request().is_ok() {});
        (
            frontend,
            Served {
                backend,
                connection,
                thread: Some(thread),
            },
        )
    }

    #[test]
    fn the_config_space_is_the_tag_and_one_request_queue() {
        let c = FsConfigSpace::new("claudeshared").unwrap();
        let mut want = [0u8; 40];
        want[..12].copy_from_slice(b"claudeshared");
        want[36] = 1;
        assert_eq!(c.as_slice(), want);
        // 36 bytes fill the field with no terminator, as the driver allows.
        let full = "a".repeat(MAX_TAG_BYTES);
        assert_eq!(FsConfigSpace::new(&full).unwrap().tag, [b'a'; 36]);
        for bad in ["", "a\0b", &"a".repeat(MAX_TAG_BYTES + 1)] {
            assert!(
                matches!(FsConfigSpace::new(bad), Err(FsError::Tag(_))),
                "{bad:?}"
            );
        }
        // As the driver reads it, through the device.
        let (socket, _served) = serve(FakeBackend::virtiofsd());
        let dev = Fs::new(socket, "claudeshared").unwrap();
        crate::devices::virtio::assert_config_reads(&dev, &want);
    }

    #[test]
    fn the_handshake_negotiates_what_virtio_fs_needs_and_no_more() {
        let (socket, served) = serve(FakeBackend::virtiofsd());
        let dev = Fs::new(socket, "t").unwrap();
        let want_protocol =
            (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK).bits();
        assert_eq!(
            served.log(),
            [
                "SET_OWNER".to_string(),
                "GET_FEATURES".into(),
                "GET_PROTOCOL_FEATURES".into(),
                format!("SET_PROTOCOL_FEATURES {want_protocol:#x}"),
                "GET_QUEUE_NUM".into(),
            ]
        );
        // The guest sees the ring features only: not dirty logging, not
        // the vhost-user protocol bit.
        assert_eq!(
            dev.features(),
            VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX
        );
        assert_eq!(dev.device_type(), 26);
        assert_eq!(dev.queue_max_sizes(), [1024, 1024]);
        assert!(dev.backend_signals_irqfd());
    }

    #[test]
    fn a_backend_that_cannot_serve_the_device_is_refused_at_build() {
        let refused = |backend: FakeBackend, want: &str| {
            let (socket, _served) = serve(backend);
            let e = Fs::new(socket, "t").err().expect("refused").to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        };
        refused(
            FakeBackend {
                queue_num: 1,
                ..FakeBackend::virtiofsd()
            },
            "serves 1 queues; virtio-fs needs 2",
        );
        refused(
            FakeBackend {
                features: VIRTIOFSD_FEATURES & !VIRTIO_F_VERSION_1,
                ..FakeBackend::virtiofsd()
            },
            "lacks VIRTIO_F_VERSION_1",
        );
        refused(
            FakeBackend {
                features: VIRTIOFSD_FEATURES & !(1 << 30),
                ..FakeBackend::virtiofsd()
            },
            "lacks VHOST_USER_F_PROTOCOL_FEATURES",
        );
        // A back-end that is gone before the handshake.
        let (socket, mut served) = serve(FakeBackend::virtiofsd());
        served.hang_up();
        let e = Fs::new(socket, "t").err().expect("refused").to_string();
        assert!(e.contains("SET_OWNER failed"), "{e}");
    }

    #[test]
    fn anonymous_guest_memory_cannot_be_shared() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        assert!(matches!(
            memory_table(&mem),
            Err(FsError::MemoryNotShared(0))
        ));
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    const RING_BASE: [u64; NUM_QUEUES] = [0x1_0000, 0x2_0000];
    const RING_SIZE: u16 = 16;
    const DRIVER_OK: u32 =
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    /// A transport with the device, driven by a Linux-like driver up to
    /// DRIVER_OK (VERSION_1 and EVENT_IDX accepted, both queues set up).
    fn running(backend: FakeBackend) -> (MmioTransport, GuestMemoryMmap, Served) {
        let (socket, served) = serve(backend);
        let (t, mem) = running_on(socket);
        (t, mem, served)
    }

    fn running_on(socket: UnixStream) -> (MmioTransport, GuestMemoryMmap) {
        let dev = Fs::new(socket, "claudeshared").unwrap();
        let mem = crate::builder::shared_guest_memory(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut t = MmioTransport::new(Box::new(dev), mem.clone()).unwrap();
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(
            &mut t,
            REG_DRIVER_FEATURES,
            (VIRTIO_F_RING_EVENT_IDX | F_LOG_ALL) as u32,
        );
        wr(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        for (i, base) in RING_BASE.iter().enumerate() {
            wr(&mut t, REG_QUEUE_SEL, i as u32);
            wr(&mut t, REG_QUEUE_NUM, u32::from(RING_SIZE));
            wr(&mut t, REG_QUEUE_DESC_LOW, *base as u32);
            wr(&mut t, REG_QUEUE_DESC_HIGH, 0);
            wr(&mut t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
            wr(&mut t, REG_QUEUE_DRIVER_HIGH, 0);
            wr(&mut t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
            wr(&mut t, REG_QUEUE_DEVICE_HIGH, 0);
            wr(&mut t, REG_QUEUE_READY, 1);
        }
        wr(&mut t, REG_STATUS, DRIVER_OK);
        assert!(t.is_activated());
        (t, mem)
    }

    /// Waits (10 s at most) for the Status register to show DEVICE_NEEDS_RESET.
    fn wait_needs_reset(t: &mut MmioTransport) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while rd(t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET == 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    #[test]
    fn activation_hands_the_backend_memory_rings_and_eventfds_and_reset_stops_them() {
        let (mut t, mem, served) = running(FakeBackend::virtiofsd());
        assert!(
            served.wait_for("SET_VRING_ENABLE 1 true"),
            "{:?}",
            served.log()
        );
        let protocol = 1u64 << 30;
        let acked = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | protocol;
        let mut want = vec![format!("SET_FEATURES {acked:#x}"), "SET_MEM_TABLE".into()];
        for i in 0..NUM_QUEUES {
            want.extend([
                format!("SET_VRING_NUM {i} {RING_SIZE}"),
                format!("SET_VRING_ADDR {i}"),
                format!("SET_VRING_BASE {i} 0"),
                format!("SET_VRING_CALL {i}"),
                format!("SET_VRING_KICK {i}"),
            ]);
        }
        want.extend([
            "SET_VRING_ENABLE 0 true".into(),
            "SET_VRING_ENABLE 1 true".into(),
        ]);
        assert_eq!(served.log()[5..], want[..]);

        {
            let b = served.backend.lock().unwrap();
            // The memory table: guest RAM with its address in the VMM, and
            // the memfd itself (the same inode) to map.
            let region = mem.iter().next().unwrap();
            assert_eq!(
                b.regions,
                [Region {
                    gpa: 0,
                    size: 0x10_0000,
                    user_addr: region.as_ptr() as u64,
                    offset: 0,
                }]
            );
            let ours = region.file_offset().unwrap().file().metadata().unwrap();
            let theirs = b.memory_files[0].metadata().unwrap();
            assert_eq!((theirs.dev(), theirs.ino()), (ours.dev(), ours.ino()));
            // Ring addresses are the VMM's virtual addresses of the rings.
            let hva = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
            for (i, base) in RING_BASE.iter().enumerate() {
                assert_eq!(
                    b.vring_addrs[i],
                    (i as u32, hva(*base), hva(base + 0x1000), hva(base + 0x2000))
                );
            }
            // A kick reaches the back-end directly: the kick fd is the
            // queue's ioeventfd, which KVM signals on QueueNotify.
            t.queue_events()[1].write(1).unwrap();
            let mut counter = [0u8; 8];
            std::io::Read::read_exact(&mut b.kicks[1].as_ref().unwrap(), &mut counter).unwrap();
            assert_eq!(u64::from_ne_bytes(counter), 1);
        }

        // Nothing pending: nothing reported.
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS) & INT_CONFIG_CHANGE, 0);

        // The driver resets the device: the rings stop in the back-end.
        wr(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
        let log = served.log();
        let tail: Vec<&str> = log[log.len() - 4..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "SET_VRING_ENABLE 0 false",
                "GET_VRING_BASE 0",
                "SET_VRING_ENABLE 1 false",
                "GET_VRING_BASE 1"
            ]
        );
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(
            rd(&mut t, REG_INTERRUPT_STATUS),
            0,
            "no ring bit once reset"
        );
    }

    #[test]
    fn interrupt_status_shows_the_ring_bit_when_the_backend_signals() {
        let (mut t, _mem, served) = running(FakeBackend::virtiofsd());
        assert!(served.wait_for("SET_VRING_ENABLE 1 true"));
        // The back-end used buffers of the request queue and writes its
        // call fd, which is the device's irqfd (KVM's edge on the GSI).
        {
            let b = served.backend.lock().unwrap();
            std::io::Write::write_all(&mut b.calls[1].as_ref().unwrap(), &1u64.to_ne_bytes())
                .unwrap();
        }
        assert_eq!(
            t.interrupt().irqfd().read().unwrap(),
            1,
            "the call fd is the irqfd"
        );
        // Linux's vm_interrupt reads InterruptStatus and services the
        // rings only if INT_VRING is set.
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        wr(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        // A config change (the device failing) is reported with it.
        t.interrupt().signal(INT_CONFIG_CHANGE).unwrap();
        assert_eq!(
            rd(&mut t, REG_INTERRUPT_STATUS),
            INT_USED_RING | INT_CONFIG_CHANGE
        );
    }

    #[test]
    fn a_backend_hang_up_stops_the_device_alone_with_needs_reset() {
        let (mut t, _mem, mut served) = running(FakeBackend::virtiofsd());
        assert!(served.wait_for("SET_VRING_ENABLE 1 true"));
        assert_eq!(rd(&mut t, REG_STATUS), DRIVER_OK);
        served.hang_up();
        assert!(
            wait_needs_reset(&mut t),
            "DEVICE_NEEDS_RESET after the hang-up"
        );
        assert_ne!(rd(&mut t, REG_INTERRUPT_STATUS) & INT_CONFIG_CHANGE, 0);
        assert!(
            t.interrupt().irqfd().read().is_ok(),
            "the config interrupt fired"
        );
        // The driver's reset joins the ended worker without talking to the
        // dead back-end, and a new activation fails the same way.
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        let (mut t2, _mem2, _served2) = running(FakeBackend::virtiofsd());
        assert!(_served2.wait_for("SET_VRING_ENABLE 1 true"));
        assert_eq!(rd(&mut t2, REG_STATUS), DRIVER_OK, "other devices go on");
    }

    #[test]
    fn a_backend_that_refuses_a_request_fails_activation_with_needs_reset() {
        let (mut t, _mem, served) = running(FakeBackend {
            refuse_mem_table: true,
            ..FakeBackend::virtiofsd()
        });
        assert!(wait_needs_reset(&mut t));
        // REPLY_ACK made the refusal visible: no ring was set up after it.
        let log = served.log();
        assert_eq!(
            log.last().map(String::as_str),
            Some("SET_MEM_TABLE"),
            "{log:?}"
        );
        assert_ne!(rd(&mut t, REG_INTERRUPT_STATUS) & INT_CONFIG_CHANGE, 0);
    }

    /// A virtiofsd to test against: `$VIRTIOFSD`, else the one `make
    /// build` produces, else an installed one.
    fn find_virtiofsd() -> Option<std::path::PathBuf> {
        let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../build/virtiofsd/bin/virtiofsd");
        std::env::var_os("VIRTIOFSD")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain([
                built,
                "/usr/lib/coworkvm/virtiofsd".into(),
                "/usr/libexec/virtiofsd".into(),
            ])
            .find(|p| p.is_file())
    }

    /// The real back-end end to end, without a guest: the handshake, the
    /// vring setup, then one FUSE_INIT request written into the request
    /// ring as a driver would. virtiofsd reads it from the shared memfd
    /// (kicked through the queue's ioeventfd), answers into guest memory,
    /// and interrupts through the device's irqfd, and InterruptStatus
    /// shows the ring bit the guest's handler needs.
    #[test]
    #[ignore = "needs virtiofsd (>= 1.13): VIRTIOFSD=/path cargo test -p coworkvm-vmm -- --ignored real_virtiofsd"]
    fn real_virtiofsd_answers_fuse_init_through_shared_memory_and_the_irqfd() {
        use std::process::{Command, Stdio};
        use vm_memory::Bytes;
        let bin = find_virtiofsd().expect(
            "no virtiofsd: set $VIRTIOFSD, or run `make build` (build/virtiofsd/bin/virtiofsd)",
        );
        let dir = std::env::temp_dir().join(format!("coworkvm-vfsd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        let socket_path = dir.join("vfsd.sock");
        let mut child = Command::new(&bin)
            .arg(format!("--socket-path={}", socket_path.display()))
            .arg(format!("--shared-dir={}", dir.join("shared").display()))
            .args(["--sandbox=none", "--log-level=error"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let socket = loop {
            match UnixStream::connect(&socket_path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => panic!("virtiofsd's socket: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let (mut t, mem) = running_on(socket);

        // Request queue (1): desc 0 = in header + fuse_init_in (read by
        // the device), desc 1 = room for the reply (written by it).
        let (desc, avail, used) = (RING_BASE[1], RING_BASE[1] + 0x1000, RING_BASE[1] + 0x2000);
        let (req, reply) = (0x8_0000u64, 0x9_0000u64);
        const FUSE_INIT: u32 = 26;
        let unique = 0x1234_5678u64;
        let mut request = Vec::new();
        request.extend_from_slice(&(40u32 + 16).to_le_bytes()); // len
        request.extend_from_slice(&FUSE_INIT.to_le_bytes());
        request.extend_from_slice(&unique.to_le_bytes());
        request.extend_from_slice(&[0u8; 8 + 4 + 4 + 4 + 2 + 2]); // nodeid..padding
        request.extend_from_slice(&7u32.to_le_bytes()); // major
        request.extend_from_slice(&31u32.to_le_bytes()); // minor
        request.extend_from_slice(&[0u8; 8]); // max_readahead, flags
        mem.write_slice(&request, GuestAddress(req)).unwrap();
        let descriptor = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = Vec::new();
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            d
        };
        mem.write_slice(
            &descriptor(req, request.len() as u32, 1, 1),
            GuestAddress(desc),
        )
        .unwrap();
        mem.write_slice(&descriptor(reply, 256, 2, 0), GuestAddress(desc + 16))
            .unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap(); // ring[0] = head 0
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap(); // idx
        t.queue_events()[1].write(1).unwrap();

        let deadline = Instant::now() + Duration::from_secs(10);
        while t.interrupt().irqfd().read().is_err() {
            assert!(Instant::now() < deadline, "no interrupt from virtiofsd");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(rd(&mut t, REG_INTERRUPT_STATUS) & INT_USED_RING, 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
        let written: u32 = mem.read_obj(GuestAddress(used + 8)).unwrap();
        let out_len: u32 = mem.read_obj(GuestAddress(reply)).unwrap();
        let error: i32 = mem.read_obj(GuestAddress(reply + 4)).unwrap();
        let out_unique: u64 = mem.read_obj(GuestAddress(reply + 8)).unwrap();
        let major: u32 = mem.read_obj(GuestAddress(reply + 16)).unwrap();
        assert_eq!((error, out_unique, major), (0, unique, 7));
        assert_eq!(written, out_len);

        // The driver resets the device; virtiofsd answers the ring stops.
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        drop(t);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The vring setup and teardown make only the syscalls the virtio-fs
    /// worker's seccomp list allows: run on a thread confined by it, a
    /// missing one kills the test process with SIGSYS.
    #[test]
    fn the_vring_setup_and_teardown_run_under_the_fs_workers_filter() {
        use crate::sandbox::seccomp::{ThreadFilter, ThreadKind};
        let (socket, served) = serve(FakeBackend::virtiofsd());
        let dev = Fs::new(socket, "t").unwrap();
        let mem = crate::builder::shared_guest_memory(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let queues = RING_BASE
            .iter()
            .map(|base| {
                let mut q = Queue::new(QUEUE_MAX_SIZE).unwrap();
                q.set_size(RING_SIZE);
                q.set_desc_table_address(Some(*base as u32), Some(0));
                q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
                q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
                q.set_ready(true);
                q
            })
            .collect();
        let activation = Activation {
            frontend: dev.frontend.clone(),
            features: VIRTIO_F_VERSION_1 | (1 << 30),
            mem,
            queues,
            kicks: (0..NUM_QUEUES)
                .map(|_| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt: Arc::new(VirtioInterrupt::new().unwrap()),
        };
        let filter = ThreadFilter::compile(ThreadKind::FsWorker).unwrap();
        let rings = std::thread::spawn(move || {
            filter.install().unwrap();
            let rings = activation.run().unwrap();
            drop(FsWorker {
                frontend: activation.frontend.clone(),
                rings: rings.clone(),
                failed: false,
            });
            rings
        })
        .join()
        .unwrap();
        assert_eq!(rings, [0, 1]);
        assert_eq!(
            served.log().last().map(String::as_str),
            Some("GET_VRING_BASE 1")
        );
    }
}
