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

use super::{
    read_config_bytes, ActivateContext, ActivateError, DeviceWorker, VirtioDevice, TYPE_VSOCK,
};

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

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Bound at creation so host programs can connect as soon as the VMM runs.
    listener: Option<UnixListener>,
    /// Who may connect to `uds_path`, decided before any sandbox.
    peer_policy: muxer::PeerPolicy,
    config: [u8; 8],
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
            config: guest_cid.to_le_bytes(),
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
        read_config_bytes(&self.config, offset, data)
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
        DeviceWorker::spawn("virtio-vsock".into(), move |stop| {
            match muxer::Muxer::new(cid, uds, listener, ctx, stop, peer_policy) {
                Ok(mut m) => m.run(),
                Err(e) => tracing::error!("vsock: cannot start: {e}"),
            }
        })
    }
}
