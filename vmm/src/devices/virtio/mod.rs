//! virtio devices and their transport.
//!
//! A device implements [`VirtioDevice`]: it describes itself (type, queues,
//! features, config space) and, once the driver sets DRIVER_OK, takes its
//! queues into a worker thread of its own. The transport ([`mmio`]) knows
//! nothing about any particular device.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod block;
pub mod mmio;
pub mod rng;
pub mod vsock;

/// virtio device ids (virtio 1.2, section 5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// InterruptStatus bits of the mmio transport.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// The interrupt line of one device: the status bits the driver reads back,
/// and the irqfd that KVM turns into an edge on the device's GSI.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            irqfd: EventFd::new(EFD_NONBLOCK)?,
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
}

/// What a device gets when the driver has set it up.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device needs {expected} queues, driver set up {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not valid (bad size or ring addresses)")]
    BadQueue(usize),
    #[error("starting the device worker: {0}")]
    Worker(io::Error),
}

/// A device's running worker thread; dropping it stops the thread.
pub struct DeviceWorker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl DeviceWorker {
    /// Spawns `run(stop)`: the worker must return soon after `stop` becomes readable.
    pub fn spawn<F>(name: String, run: F) -> Result<Self, ActivateError>
    where
        F: FnOnce(EventFd) + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker_stop = stop.try_clone().map_err(ActivateError::Worker)?;
        // Through the sandbox's spawner when the VMM is sandboxed, so the
        // worker gets its own seccomp filter rather than its vCPU's.
        let handle =
            crate::sandbox::spawner::spawn_worker(name, Box::new(move || run(worker_stop)))
                .map_err(ActivateError::Worker)?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
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

/// Waits on a device's queue events and its stop event; shared by the
/// single-purpose workers of blk and rng.
pub struct QueueEventLoop {
    epoll: vmm_sys_util::epoll::Epoll,
}

/// What woke the worker.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    Stop,
    Queue(usize),
}

impl QueueEventLoop {
    pub fn new(stop: &EventFd, queue_events: &[EventFd]) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
        let epoll = vmm_sys_util::epoll::Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::MAX),
        )?;
        for (i, evt) in queue_events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        Ok(Self { epoll })
    }

    /// Blocks until something is ready; consumes the eventfd counters.
    pub fn wait(&self, stop: &EventFd, queue_events: &[EventFd]) -> io::Result<Vec<Wake>> {
        use vmm_sys_util::epoll::EpollEvent;
        let mut events = [EpollEvent::default(); 8];
        let n = loop {
            match self.epoll.wait(-1, &mut events) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        let mut wakes = Vec::with_capacity(n);
        for ev in &events[..n] {
            let data = ev.data();
            if data == u64::MAX {
                let _ = stop.read();
                wakes.push(Wake::Stop);
            } else if let Some(evt) = queue_events.get(data as usize) {
                let _ = evt.read();
                wakes.push(Wake::Queue(data as usize));
            }
        }
        Ok(wakes)
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
    fn worker_stops_on_drop() {
        let (tx, rx) = std::sync::mpsc::channel();
        let w = DeviceWorker::spawn("t".into(), move |stop| {
            let el = QueueEventLoop::new(&stop, &[]).unwrap();
            loop {
                if el.wait(&stop, &[]).unwrap().contains(&Wake::Stop) {
                    tx.send(()).unwrap();
                    return;
                }
            }
        })
        .unwrap();
        drop(w);
        rx.try_recv()
            .expect("worker saw the stop event before join returned");
    }
}
