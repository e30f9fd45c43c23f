//! Stream flow control (virtio 1.2 section 5.10.6.3): each side tells the
//! other how much buffer it has (`buf_alloc`) and how much it has consumed
//! (`fwd_cnt`); a sender may have at most `buf_alloc - (tx_cnt - fwd_cnt)`
//! bytes in flight. Counters wrap at 2^32, as the spec's do.

use std::num::Wrapping;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    #[error("guest sent {sent} bytes with only {free} bytes of credit")]
    Overrun { sent: u32, free: u32 },
}

#[derive(Debug, Clone)]
pub struct Credit {
    /// Our receive buffer, as advertised to the guest.
    buf_alloc: u32,
    /// Bytes from the guest that we have passed on to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    fwd_cnt_told: Wrapping<u32>,
    /// Bytes from the guest that we hold but have not passed on yet.
    buffered: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we have sent to the guest.
    tx_cnt: Wrapping<u32>,
}

impl Credit {
    pub fn new(buf_alloc: u32) -> Self {
        Self {
            buf_alloc,
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            buffered: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
        }
    }

    pub fn buf_alloc(&self) -> u32 {
        self.buf_alloc
    }

    /// Bytes passed on to the host so far (wrapping).
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    /// The `fwd_cnt` to put in a header; remembers that the guest was told.
    pub fn fwd_cnt_for_header(&mut self) -> u32 {
        self.fwd_cnt_told = self.fwd_cnt;
        self.fwd_cnt.0
    }

    /// Takes the guest's view of its buffer from any header it sends.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many bytes we may send to the guest now. A guest claiming to
    /// have consumed more than we sent gets no extra credit.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn on_sent_to_guest(&mut self, n: u32) {
        self.tx_cnt += Wrapping(n);
    }

    /// Bytes arrived from the guest; more than our free buffer is a
    /// protocol violation.
    pub fn on_received(&mut self, n: u32) -> Result<(), CreditError> {
        let free = self.buf_alloc - self.buffered;
        if n > free {
            return Err(CreditError::Overrun { sent: n, free });
        }
        self.buffered += n;
        Ok(())
    }

    /// Bytes passed on to the host socket.
    pub fn on_forwarded(&mut self, n: u32) {
        let n = n.min(self.buffered);
        self.buffered -= n;
        self.fwd_cnt += Wrapping(n);
    }

    #[cfg(test)]
    pub fn buffered(&self) -> u32 {
        self.buffered
    }

    /// Whether the guest should hear our `fwd_cnt` now: once it has consumed
    /// half of what it may have in flight without being told, it could stall.
    pub fn needs_update(&self) -> bool {
        (self.fwd_cnt - self.fwd_cnt_told).0 >= self.buf_alloc / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sending_is_bounded_by_the_peer_buffer() {
        let mut c = Credit::new(1000);
        assert_eq!(c.peer_free(), 0, "no credit before the peer speaks");
        c.update_peer(4096, 0);
        assert_eq!(c.peer_free(), 4096);
        c.on_sent_to_guest(4000);
        assert_eq!(c.peer_free(), 96);
        c.update_peer(4096, 3000);
        assert_eq!(c.peer_free(), 3096);
    }

    #[test]
    fn counters_wrap() {
        let mut c = Credit::new(1000);
        c.tx_cnt = Wrapping(u32::MAX - 10);
        c.update_peer(100, u32::MAX - 10);
        c.on_sent_to_guest(50);
        assert_eq!(c.peer_free(), 50);
    }

    #[test]
    fn lying_peer_gains_nothing() {
        let mut c = Credit::new(1000);
        c.on_sent_to_guest(10);
        // Claims to have consumed more than was ever sent.
        c.update_peer(100, 5000);
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn receive_overrun_and_updates() {
        let mut c = Credit::new(1000);
        c.on_received(600).unwrap();
        assert_eq!(
            c.on_received(500),
            Err(CreditError::Overrun {
                sent: 500,
                free: 400
            })
        );
        assert!(!c.needs_update());
        c.on_forwarded(600);
        assert_eq!(c.buffered(), 0);
        assert!(c.needs_update());
        assert_eq!(c.fwd_cnt_for_header(), 600);
        assert!(!c.needs_update());
        c.on_received(1000).unwrap();
        // Forwarding more than is buffered cannot push fwd_cnt past reality.
        c.on_forwarded(5000);
        assert_eq!(c.fwd_cnt_for_header(), 1600);
    }
}
