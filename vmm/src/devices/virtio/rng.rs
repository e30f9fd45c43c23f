//! virtio-rng (virtio 1.2 section 5.4): fills guest buffers from the host's
//! `/dev/urandom`, so the guest's entropy pool is seeded at boot.

use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, ActivateError, DeviceWorker, QueueEventLoop, VirtioDevice, VirtioInterrupt,
    Wake, TYPE_RNG,
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
        DeviceWorker::spawn("virtio-rng".into(), move |stop| {
            run_worker(source, mem, queue, queue_events, interrupt, stop)
        })
    }
}

/// Fills each available chain's writable buffers; returns whether any was used.
pub fn process_queue(
    source: &mut impl Read,
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
) -> Result<bool, virtio_queue::Error> {
    let mut used_any = false;
    let mut buf = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
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

fn run_worker(
    mut source: File,
    mem: GuestMemoryMmap,
    mut queue: Queue,
    queue_events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    stop: EventFd,
) {
    let Ok(events) = QueueEventLoop::new(&stop, &queue_events) else {
        tracing::error!("virtio-rng: epoll set-up failed");
        return;
    };
    loop {
        match events.wait(&stop, &queue_events) {
            Ok(w) if w.contains(&Wake::Stop) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::error!("virtio-rng: waiting for queue events: {e}");
                return;
            }
        }
        match process_queue(&mut source, &mem, &mut queue) {
            Ok(true) => {
                let _ = interrupt.signal_used_queue();
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!("virtio-rng: queue is unusable: {e:?}");
                return;
            }
        }
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
}
