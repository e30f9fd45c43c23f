//! virtio-vsock packet headers (virtio 1.2 section 5.10.6).
//!
//! Every field a guest sends is checked here before the muxer acts on it:
//! wrong socket type, unknown op, a length that is not what the descriptor
//! chain holds, or a payload above the limit make the packet malformed.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The most payload one packet may carry (Linux sends at most 64 KiB).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// The host's CID.
pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("header shorter than {HDR_LEN} bytes")]
    ShortHeader,
    #[error("socket type {0} is not a stream")]
    NotStream(u16),
    #[error("unknown op {0}")]
    UnknownOp(u16),
    #[error("payload length {0} exceeds {MAX_PKT_PAYLOAD}")]
    TooLong(u32),
    #[error("header says {said} payload bytes, the buffers hold {have}")]
    LengthMismatch { said: u32, have: usize },
    #[error("packet from CID {src} to CID {dst}: not guest to host")]
    WrongAddress { src: u64, dst: u64 },
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Self, PacketError> {
        if b.len() < HDR_LEN {
            return Err(PacketError::ShortHeader);
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Ok(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a packet the guest put on its TX queue: a stream packet with a
    /// known op, from `guest_cid` to the host, whose length matches the
    /// payload bytes the chain carries.
    pub fn validate_from_guest(
        &self,
        guest_cid: u64,
        payload_have: usize,
    ) -> Result<Op, PacketError> {
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::NotStream(self.type_));
        }
        let op = Op::from_u16(self.op).ok_or(PacketError::UnknownOp(self.op))?;
        if self.src_cid != guest_cid || self.dst_cid != HOST_CID {
            return Err(PacketError::WrongAddress {
                src: self.src_cid,
                dst: self.dst_cid,
            });
        }
        if self.len > MAX_PKT_PAYLOAD {
            return Err(PacketError::TooLong(self.len));
        }
        let expected = if op == Op::Rw { self.len as usize } else { 0 };
        if (op == Op::Rw && payload_have < expected) || (op != Op::Rw && self.len != 0) {
            return Err(PacketError::LengthMismatch {
                said: self.len,
                have: payload_have,
            });
        }
        Ok(op)
    }

    /// A reply from the host to the guest for connection (host port, guest port).
    pub fn to_guest(guest_cid: u64, host_port: u32, guest_port: u32, op: Op) -> Self {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            type_: TYPE_STREAM,
            op: op as u16,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_hdr(op: Op, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1025,
            dst_port: 51234,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn header_round_trip() {
        let h = guest_hdr(Op::Rw, 100);
        assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
        assert_eq!(Header::parse(&[0; 10]), Err(PacketError::ShortHeader));
    }

    #[test]
    fn hostile_fields_are_refused() {
        assert_eq!(
            guest_hdr(Op::Rw, 100).validate_from_guest(3, 100),
            Ok(Op::Rw)
        );
        assert_eq!(
            guest_hdr(Op::Request, 0).validate_from_guest(3, 0),
            Ok(Op::Request)
        );
        let mut h = guest_hdr(Op::Rw, 100);
        h.type_ = 2;
        assert_eq!(
            h.validate_from_guest(3, 100),
            Err(PacketError::NotStream(2))
        );
        let mut h = guest_hdr(Op::Rw, 100);
        h.op = 99;
        assert_eq!(
            h.validate_from_guest(3, 100),
            Err(PacketError::UnknownOp(99))
        );
        assert_eq!(
            guest_hdr(Op::Rw, 100).validate_from_guest(3, 50),
            Err(PacketError::LengthMismatch {
                said: 100,
                have: 50
            })
        );
        assert!(matches!(
            guest_hdr(Op::Rw, u32::MAX).validate_from_guest(3, usize::MAX),
            Err(PacketError::TooLong(_))
        ));
        assert!(matches!(
            guest_hdr(Op::Request, 5).validate_from_guest(3, 5),
            Err(PacketError::LengthMismatch { .. })
        ));
        // Spoofed source CID, or a packet not addressed to the host.
        assert!(matches!(
            guest_hdr(Op::Rw, 1).validate_from_guest(4, 1),
            Err(PacketError::WrongAddress { .. })
        ));
        let mut h = guest_hdr(Op::Rw, 1);
        h.dst_cid = 7;
        assert!(matches!(
            h.validate_from_guest(3, 1),
            Err(PacketError::WrongAddress { .. })
        ));
    }
}
