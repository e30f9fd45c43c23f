//! virtio devices and their transport.
//!
//! A device implements [`VirtioDevice`]: it describes itself (type, queues,
//! features, config space) and, once the driver sets DRIVER_OK, serves its
//! queues on a worker thread of its own, which is always the loop of
//! [`worker`]. The transport ([`mmio`]) knows nothing about any particular
//! device.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod block;
pub mod fs;
pub mod mmio;
pub mod rng;
pub mod vsock;
pub mod worker;

pub use worker::DeviceWorker;

/// virtio device ids (virtio 1.2, section 5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// Feature bit every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Indirect descriptors (virtio 1.2 section 2.7.5.3).
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// used_event / avail_event notification suppression (section 2.7.10).
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// InterruptStatus bits of the mmio transport.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// The interrupt line of one device: the status bits the driver reads back,
/// and the irqfd that KVM turns into an edge on the device's GSI. It also
/// carries the one piece of device status a worker reports on its own,
/// DEVICE_NEEDS_RESET, which the transport shows in its Status register.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
    needs_reset: AtomicBool,
}

impl VirtioInterrupt {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            irqfd: EventFd::new(EFD_NONBLOCK)?,
            needs_reset: AtomicBool::new(false),
        })
    }

    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(INT_USED_RING)
    }

    pub fn signal(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The device can no longer work until the driver resets it: sets
    /// DEVICE_NEEDS_RESET and, as virtio 1.2 section 2.1.2 requires once
    /// DRIVER_OK is set, sends a configuration change notification.
    pub fn set_needs_reset(&self) -> io::Result<()> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal(INT_CONFIG_CHANGE)
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The driver reset the device (its worker has been joined): nothing
    /// pending, nothing to report.
    pub fn reset(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
    }
}

/// What a device gets when the driver has set it up.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
    /// The features the driver accepted (a subset of the device's).
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device needs {expected} queues, driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("starting the device worker: {0}")]
    Worker(io::Error),
}

/// One virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Config writes; most devices' config space is read-only.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<DeviceWorker, ActivateError>;
    /// Called when the worker was stopped by a reset; flush what must be flushed.
    fn reset(&mut self) {}
    /// Whether an out-of-process (vhost-user) back-end signals used
    /// buffers by writing the device's irqfd itself. It cannot set
    /// [`VirtioInterrupt`]'s status bits, so the transport reports
    /// [`INT_USED_RING`] on its own for such a device while it runs.
    fn backend_signals_irqfd(&self) -> bool {
        false
    }
}

/// Reads `data.len()` bytes of the config space `config` from `offset`: the
/// driver may read at any offset with any width, and what lies beyond the
/// structure reads as zeroes.
pub fn read_config<T: ByteValued>(config: &T, offset: u64, data: &mut [u8]) {
    read_config_bytes(config.as_slice(), offset, data)
}

/// Copies `data.len()` bytes of a config space `config` from `offset`;
/// reads beyond its end return zeroes rather than failing.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Checks a device's config space the way a driver may read it: every
/// offset below `spec.len()` at every width 1-8 gives `spec`'s bytes (and
/// zeroes past its end), and reads far out of range give zeroes.
#[cfg(test)]
pub(crate) fn assert_config_reads(dev: &dyn VirtioDevice, spec: &[u8]) {
    let mut padded = spec.to_vec();
    padded.resize(spec.len() + 8, 0);
    for offset in 0..spec.len() as u64 {
        for len in 1..=8usize {
            let mut got = [0xa5u8; 8];
            dev.read_config(offset, &mut got[..len]);
            let want = &padded[offset as usize..offset as usize + len];
            assert_eq!(&got[..len], want, "offset {offset} len {len}");
        }
    }
    for offset in [0x1000, u32::MAX as u64, u64::MAX - 7, u64::MAX] {
        let mut got = [0xa5u8; 8];
        dev.read_config(offset, &mut got);
        assert_eq!(got, [0; 8], "offset {offset:#x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let i = VirtioInterrupt::new().unwrap();
        i.signal_used_queue().unwrap();
        i.signal(INT_CONFIG_CHANGE).unwrap();
        assert_eq!(i.status(), 3);
        assert_eq!(i.irqfd().read().unwrap(), 2);
        i.ack(INT_USED_RING);
        assert_eq!(i.status(), INT_CONFIG_CHANGE);
    }

    #[test]
    fn needs_reset_raises_the_config_interrupt_until_reset() {
        let i = VirtioInterrupt::new().unwrap();
        assert!(!i.needs_reset());
        i.set_needs_reset().unwrap();
        assert!(i.needs_reset());
        assert_eq!(i.status(), INT_CONFIG_CHANGE);
        assert_eq!(i.irqfd().read().unwrap(), 1);
        // Acknowledging the interrupt leaves the device needing a reset.
        i.ack(INT_CONFIG_CHANGE);
        assert!(i.needs_reset());
        i.reset();
        assert!(!i.needs_reset());
        assert_eq!(i.status(), 0);
    }
}
