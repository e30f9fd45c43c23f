//! virtio-rng (virtio 1.2 section 5.4): fills guest buffers from the host's
//! `/dev/urandom`, so the guest's entropy pool is seeded at boot.

use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::worker::{next_chain, notify_used, BrokenQueue, DeviceHandler};
use super::{
    ActivateContext, ActivateError, DeviceWorker, VirtioDevice, VirtioInterrupt, TYPE_RNG,
};

pub const QUEUE_SIZE: u16 = 64;
/// The most bytes handed out for one request.
const MAX_REQUEST: usize = 64 * 1024;

pub struct Rng {
    source: Option<File>,
}

impl Rng {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            source: Some(File::open("/dev/urandom")?),
        })
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    /// virtio-rng has no config space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<DeviceWorker, ActivateError> {
        let source = match &self.source {
            Some(f) => f.try_clone().map_err(ActivateError::Worker)?,
            None => {
                return Err(ActivateError::QueueCount {
                    expected: 1,
                    got: 0,
                })
            }
        };
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
            ..
        } = ctx;
        let [queue]: [Queue; 1] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
                    expected: 1,
                    got: q.len(),
                })?;
        let worker_interrupt = interrupt.clone();
        DeviceWorker::start(
            "virtio-rng",
            "virtio-rng".into(),
            queue_events,
            interrupt,
            move |_| {
                Ok(RngWorker {
                    source,
                    mem,
                    queue,
                    interrupt: worker_interrupt,
                })
            },
        )
    }
}

/// Fills each available chain's writable buffers; returns whether any was
/// used. An error is a ring the driver broke (see [`next_chain`]).
pub fn process_queue(
    source: &mut impl Read,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
) -> Result<bool, virtio_queue::Error> {
    let mut used_any = false;
    let mut buf = Vec::new();
    while let Some(chain) = next_chain(queue, mem)? {
        let head = chain.head_index();
        let mut written = 0usize;
        for d in chain.filter(|d| d.is_write_only()) {
            let n = (d.len() as usize).min(MAX_REQUEST - written);
            if n == 0 {
                break;
            }
            buf.resize(n, 0);
            if source.read_exact(&mut buf).is_err() || mem.write_slice(&buf, d.addr()).is_err() {
                break;
            }
            written += n;
        }
        queue.add_used(mem, head, written as u32)?;
        used_any = true;
    }
    Ok(used_any)
}

/// The worker's side of the device: its one queue and the entropy source.
struct RngWorker {
    source: File,
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

impl DeviceHandler for RngWorker {
    type Error = BrokenQueue;

    fn queue_event(&mut self, queue: usize) -> Result<(), BrokenQueue> {
        let broken = |error| BrokenQueue { queue, error };
        if process_queue(&mut self.source, &self.mem, &mut self.queue).map_err(broken)? {
            notify_used(&mut self.queue, &self.mem, &self.interrupt).map_err(broken)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    #[test]
    fn fills_writable_buffers_and_skips_bad_ones() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x8000, 32, 2, 0)),
            // Outside guest memory: nothing written, no panic.
            RawDescriptor::from(SplitDescriptor::new(0xffff_0000, 32, 2, 0)),
        ];
        vq.build_multiple_desc_chains(&descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut src = io::repeat(0x5a);
        assert!(process_queue(&mut src, &m, &mut q).unwrap());
        let mut out = [0u8; 32];
        m.read_slice(&mut out, GuestAddress(0x8000)).unwrap();
        assert_eq!(out, [0x5a; 32]);
        let used_idx: u16 = m.read_obj(vq.used_addr().checked_add(2).unwrap()).unwrap();
        assert_eq!(used_idx, 2);
    }

    #[test]
    fn config_space_is_empty() {
        let dev = Rng::new().unwrap();
        for offset in [0, 1, 7, 0x100, u64::MAX] {
            let mut d = [0xa5u8; 8];
            dev.read_config(offset, &mut d);
            assert_eq!(d, [0; 8]);
        }
    }

    #[test]
    fn a_broken_ring_stops_the_worker_with_needs_reset() {
        use crate::devices::virtio::block::tests::{activate_and_kick, broken_queue, Breakage};
        use crate::devices::virtio::worker::tests::{assert_ends, assert_reported};
        for how in [Breakage::AvailIndexBeyondSize, Breakage::HeadBeyondQueue] {
            let mut dev = Rng::new().unwrap();
            let (m, q) = broken_queue(how);
            let (worker, interrupt) = activate_and_kick(&mut dev, m, q);
            assert_ends(worker);
            assert_reported(&interrupt);
        }
    }

    /// With VIRTIO_F_EVENT_IDX, a driver that set used_event ahead asks for
    /// no interrupt yet; the device must not raise one.
    #[test]
    fn respects_needs_notification() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        vq.build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(0x8000, 32, 2, 0))])
            .unwrap();
        // used_event (after the avail ring's 16 entries): interrupt only
        // once used index 5 is passed.
        let used_event = vq.avail_addr().checked_add(4 + 2 * 16).unwrap();
        m.write_obj(5u16, used_event).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(true);
        let interrupt = VirtioInterrupt::new().unwrap();
        let mut worker = RngWorker {
            source: File::open("/dev/urandom").unwrap(),
            mem: m.clone(),
            queue: q,
            interrupt: Arc::new(interrupt),
        };
        worker.queue_event(0).unwrap();
        let used_idx: u16 = m.read_obj(vq.used_addr().checked_add(2).unwrap()).unwrap();
        assert_eq!(used_idx, 1, "the request was served");
        assert_eq!(worker.interrupt.status(), 0, "no interrupt asked for");
        assert!(worker.interrupt.irqfd().read().is_err());
    }
}
