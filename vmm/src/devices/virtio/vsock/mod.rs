//! virtio-vsock in userspace, with Firecracker's "hybrid vsock" host side:
//! guest streams to the host (CID 2) port P arrive as connections to the
//! Unix socket `<uds>_P`; host programs reach guest port P by connecting to
//! `<uds>` and writing `CONNECT P\n` ([`handshake`]).
//!
//! No `/dev/vhost-vsock` is needed. One worker thread multiplexes every
//! stream ([`muxer`]); all host sockets are non-blocking and every stream's
//! buffering is bounded by the credit it grants ([`credit`]), so a stalled
//! reader stalls only its own stream.
//!
//! A guest stream reaches `<uds>_P` only from a privileged guest port
//! (below [`muxer::PRIVILEGED_PORT_LIMIT`], which only guest root can bind):
//! a session process cannot dial the helper's agent socket. Connections,
//! queued control packets and pending handshakes are bounded, and host
//! peers on `<uds>` must be the VMM's user or root ([`muxer`]).

pub mod credit;
pub mod handshake;
pub mod muxer;
pub mod packet;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use vm_memory::{ByteValued, Le64};

use super::{read_config, ActivateContext, ActivateError, DeviceWorker, VirtioDevice, TYPE_VSOCK};

pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (must be 3 or more)")]
    BadCid(u64),
    #[error("binding the vsock socket {0}: {1}")]
    Bind(PathBuf, std::io::Error),
}

/// `struct virtio_vsock_config` (virtio 1.2 section 5.10.4).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: Le64,
}

// SAFETY: VsockConfig is repr(C) with one little-endian u64 and no padding
// (asserted below): every byte pattern is a valid value, no references.
unsafe impl ByteValued for VsockConfig {}
const _: () = assert!(std::mem::size_of::<VsockConfig>() == 8);

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Bound at creation so host programs can connect as soon as the VMM runs.
    listener: Option<UnixListener>,
    /// Who may connect to `uds_path`, decided before any sandbox.
    peer_policy: muxer::PeerPolicy,
    config: VsockConfig,
}

impl Vsock {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid < 3 {
            return Err(VsockError::BadCid(guest_cid));
        }
        // A stale socket from an earlier run would make bind fail.
        if std::fs::symlink_metadata(uds_path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            let _ = std::fs::remove_file(uds_path);
        }
        let listener =
            UnixListener::bind(uds_path).map_err(|e| VsockError::Bind(uds_path.to_owned(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Bind(uds_path.to_owned(), e))?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener: Some(listener),
            peer_policy: muxer::PeerPolicy::current_user(),
            config: VsockConfig {
                guest_cid: guest_cid.into(),
            },
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config(&self.config, offset, data)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<DeviceWorker, ActivateError> {
        if ctx.queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: ctx.queues.len(),
            });
        }
        let listener = match &self.listener {
            Some(l) => l.try_clone().map_err(ActivateError::Worker)?,
            None => {
                return Err(ActivateError::QueueCount {
                    expected: 3,
                    got: 0,
                })
            }
        };
        let cid = self.guest_cid;
        let uds = self.uds_path.clone();
        let peer_policy = self.peer_policy;
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
            ..
        } = ctx;
        let guest = muxer::GuestQueues {
            mem,
            queues,
            interrupt: interrupt.clone(),
        };
        DeviceWorker::start(
            "virtio-vsock",
            format!("virtio-vsock (cid {cid})"),
            queue_events,
            interrupt,
            move |fds| muxer::Muxer::new(cid, uds, listener, peer_policy, guest, fds),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::muxer::MuxerError;
    use super::packet::Op;
    use super::testing::{guest_header, Harness, TempDir, QUEUE_LEN};
    use super::*;
    use crate::devices::virtio::worker::tests::{assert_ends, assert_reported};
    use crate::devices::virtio::worker::WorkerError;
    use crate::devices::virtio::VirtioInterrupt;
    use std::sync::Arc;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn config_reads_at_every_offset_and_width() {
        let dir = TempDir::new().unwrap();
        let cid = 0x0102_0304_0506_0708u64;
        let dev = Vsock::new(cid, &dir.path().join("v.sock")).unwrap();
        assert_eq!(std::mem::offset_of!(VsockConfig, guest_cid), 0);
        let mut spec = cid.to_le_bytes().to_vec();
        spec.resize(24, 0);
        crate::devices::virtio::assert_config_reads(&dev, &spec);
    }

    #[test]
    fn a_broken_tx_ring_stops_the_muxer() {
        let mut h = Harness::new().unwrap();
        h.set_avail_index(TX_QUEUE, QUEUE_LEN + 1);
        match h.kick_tx() {
            Err(WorkerError::Device(MuxerError::TxQueue(_))) => {}
            other => panic!("expected a broken TX queue, got {other:?}"),
        }
    }

    #[test]
    fn a_broken_rx_ring_stops_the_muxer() {
        let mut h = Harness::new().unwrap();
        h.set_avail_index(RX_QUEUE, QUEUE_LEN + 1);
        // An unprivileged REQUEST is answered with an RST, which needs an
        // RX buffer.
        match h.send(&guest_header(Op::Request, 5000, 51234), &[]) {
            Err(WorkerError::Device(MuxerError::RxQueue(_))) => {}
            other => panic!("expected a broken RX queue, got {other:?}"),
        }
    }

    #[test]
    fn a_broken_ring_stops_the_device_with_needs_reset() {
        let dir = TempDir::new().unwrap();
        let mut dev = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let queues: Vec<Queue> = [0u64, 0x1_0000, 0x2_0000]
            .iter()
            .map(|&base| {
                MockSplitQueue::create(&mem, GuestAddress(base), 16)
                    .create_queue()
                    .unwrap()
            })
            .collect();
        // The driver runs TX's available index past the queue size.
        let tx_avail_idx = GuestAddress(queues[TX_QUEUE].avail_ring() + 2);
        mem.write_obj(17u16, tx_avail_idx).unwrap();
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let tx_kick = evts[TX_QUEUE].try_clone().unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let worker = dev
            .activate(ActivateContext {
                mem,
                queues,
                queue_events: evts,
                interrupt: interrupt.clone(),
                acked_features: 0,
            })
            .unwrap();
        tx_kick.write(1).unwrap();
        assert_ends(worker);
        assert_reported(&interrupt);
    }
}
