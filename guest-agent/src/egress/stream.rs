//! The byte plumbing of a proxied connection: a connected socket of any
//! family, reads bounded by a deadline and a byte count, and the two-way
//! copy that follows a successful open.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A connected stream socket, whatever its family: TCP from a session's
/// loopback, vsock to the host, a Unix socket pair in tests. Only the
/// socket calls every family has are used.
#[derive(Debug)]
pub struct Socket(File);

impl From<OwnedFd> for Socket {
    fn from(fd: OwnedFd) -> Self {
        Socket(File::from(fd))
    }
}

impl From<TcpStream> for Socket {
    fn from(s: TcpStream) -> Self {
        Socket::from(OwnedFd::from(s))
    }
}

impl From<UnixStream> for Socket {
    fn from(s: UnixStream) -> Self {
        Socket::from(OwnedFd::from(s))
    }
}

impl Socket {
    /// `SO_RCVTIMEO`: a read that waits longer fails with `WouldBlock`.
    /// `None` waits forever. A zero duration is taken as one millisecond
    /// (zero would mean "forever" to the kernel).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            Some(d) => {
                let d = d.max(Duration::from_millis(1));
                libc::timeval {
                    tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
                    tv_usec: d.subsec_micros() as libc::suseconds_t,
                }
            }
        };
        // SAFETY: setsockopt reads `tv`, a live timeval of the size passed,
        // on a descriptor this socket owns.
        let r = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// shutdown(2): `Write` passes our end of input on as a half-close;
    /// `Both` also wakes a thread blocked reading this socket.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown(2) on a descriptor this socket owns.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), how) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0).read(buf)
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a bounded read ended without what it wanted.
#[derive(Debug, thiserror::Error)]
pub enum BoundedReadError {
    #[error("not complete within {0:?}")]
    TimedOut(Duration),
    #[error("longer than {0} bytes")]
    TooLong(usize),
    #[error("the peer closed the connection")]
    Closed,
    #[error("{0}")]
    Io(io::Error),
}

/// Reads from a socket into a buffer, each read bounded by what is left
/// of one deadline: a peer that trickles bytes is cut off when the
/// deadline passes, however often it sends.
pub struct DeadlineReader<'a> {
    socket: &'a Socket,
    deadline: Instant,
    /// The whole time allowed, for the error.
    allowed: Duration,
    /// Read and not yet consumed: `buf[pos..]`.
    buf: Vec<u8>,
    pos: usize,
}

/// Bytes asked for per read.
const CHUNK: usize = 4096;

impl<'a> DeadlineReader<'a> {
    pub fn new(socket: &'a Socket, allowed: Duration) -> Self {
        DeadlineReader {
            socket,
            deadline: Instant::now() + allowed,
            allowed,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// The unconsumed bytes.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Consumes `n` pending bytes.
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }

    /// The unconsumed bytes, owned: what came after the part that was
    /// parsed, to be passed on.
    pub fn into_rest(mut self) -> Vec<u8> {
        self.buf.drain(..self.pos);
        self.buf
    }

    /// Reads once more (at most [`CHUNK`] bytes), waiting no later than
    /// the deadline. `Closed` at end of input.
    pub fn fill(&mut self) -> Result<usize, BoundedReadError> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BoundedReadError::TimedOut(self.allowed));
            }
            self.socket
                .set_read_timeout(Some(left))
                .map_err(BoundedReadError::Io)?;
            let start = self.buf.len();
            self.buf.resize(start + CHUNK, 0);
            let r = (&*self.socket).read(&mut self.buf[start..]);
            self.buf.truncate(start + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(0) => return Err(BoundedReadError::Closed),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(BoundedReadError::Io(e)),
            }
        }
    }

    /// Exactly `n` bytes (consumed), within the deadline.
    pub fn take(&mut self, n: usize) -> Result<Vec<u8>, BoundedReadError> {
        while self.pending().len() < n {
            self.fill()?;
        }
        let v = self.pending()[..n].to_vec();
        self.consume(n);
        Ok(v)
    }

    /// One byte (consumed), within the deadline.
    pub fn byte(&mut self) -> Result<u8, BoundedReadError> {
        Ok(self.take(1)?[0])
    }

    /// Reads until `end(pending)` finds the end of what is wanted (its
    /// length), within the deadline and at most `max` bytes of it.
    /// Returns the wanted bytes (consumed); what follows stays pending.
    pub fn until(
        &mut self,
        max: usize,
        mut end: impl FnMut(&[u8]) -> Option<usize>,
    ) -> Result<Vec<u8>, BoundedReadError> {
        loop {
            if let Some(n) = end(self.pending()) {
                if n > max {
                    return Err(BoundedReadError::TooLong(max));
                }
                let v = self.pending()[..n].to_vec();
                self.consume(n);
                return Ok(v);
            }
            if self.pending().len() >= max {
                return Err(BoundedReadError::TooLong(max));
            }
            self.fill()?;
        }
    }
}

/// Copies both ways between `client` and `egress` until both directions
/// have ended, after first passing on the bytes already read past the
/// handshakes (`to_egress`, `to_client`). The end of one side's input is
/// passed on as a half-close of the other; an error on either side closes
/// both. Spawns one thread; the other direction runs on the caller's.
pub fn splice(client: Socket, egress: Socket, to_egress: &[u8], to_client: &[u8]) {
    let (client, egress) = (Arc::new(client), Arc::new(egress));
    let close_both = |a: &Socket, b: &Socket| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    for s in [&client, &egress] {
        if s.set_read_timeout(None).is_err() {
            return close_both(&client, &egress);
        }
    }
    if (&*egress).write_all(to_egress).is_err() || (&*client).write_all(to_client).is_err() {
        return close_both(&client, &egress);
    }
    let back = {
        let (client, egress) = (client.clone(), egress.clone());
        std::thread::Builder::new()
            .name("egress-splice".into())
            .stack_size(super::THREAD_STACK)
            .spawn(move || pump(&egress, &client))
    };
    if back.is_err() {
        return close_both(&client, &egress);
    }
    pump(&client, &egress);
    if let Ok(t) = back {
        let _ = t.join();
    }
}

/// One direction of [`splice`].
fn pump(from: &Socket, to: &Socket) {
    let mut buf = vec![0u8; 64 * 1024];
    let r = loop {
        match (&*from).read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = (&*to).write_all(&buf[..n]) {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    match r {
        Ok(()) => {
            // The other side may still answer: half-close only.
            if to.shutdown(Shutdown::Write).is_err() {
                let _ = from.shutdown(Shutdown::Both);
            }
        }
        Err(_) => {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Socket, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Socket::from(a), b)
    }

    #[test]
    fn a_trickling_peer_is_cut_off_at_the_deadline() {
        let (ours, mut theirs) = pair();
        let t = std::thread::spawn(move || {
            // One byte every 20 ms, forever (until the read side closes).
            while theirs.write_all(b"x").is_ok() {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let started = Instant::now();
        let mut r = DeadlineReader::new(&ours, Duration::from_millis(300));
        let e = r.until(1 << 20, |_| None).unwrap_err();
        let took = started.elapsed();
        assert!(matches!(e, BoundedReadError::TimedOut(_)), "{e}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        drop(r);
        drop(ours);
        t.join().unwrap();
    }

    #[test]
    fn a_silent_peer_is_cut_off_at_the_deadline() {
        let (ours, _theirs) = pair();
        let started = Instant::now();
        let mut r = DeadlineReader::new(&ours, Duration::from_millis(200));
        assert!(matches!(r.byte(), Err(BoundedReadError::TimedOut(_))));
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn reads_are_bounded_in_bytes_and_keep_what_follows() {
        let (ours, mut theirs) = pair();
        theirs.write_all(b"abc|def").unwrap();
        let mut r = DeadlineReader::new(&ours, Duration::from_secs(5));
        let got = r
            .until(16, |b| b.iter().position(|&c| c == b'|').map(|i| i + 1))
            .unwrap();
        assert_eq!(got, b"abc|");
        assert_eq!(r.into_rest(), b"def");
        theirs.write_all(&[b'y'; 100]).unwrap();
        let mut r = DeadlineReader::new(&ours, Duration::from_secs(5));
        assert!(matches!(
            r.until(10, |_| None),
            Err(BoundedReadError::TooLong(10))
        ));
        drop(theirs);
        let mut r = DeadlineReader::new(&ours, Duration::from_secs(5));
        assert!(matches!(r.take(1000), Err(BoundedReadError::Closed)));
    }

    #[test]
    fn splice_copies_both_ways_and_passes_half_closes_on() {
        let (client, mut session) = pair();
        let (egress, mut helper) = pair();
        let t = std::thread::spawn(move || splice(client, egress, b"early>", b"<late"));
        session.write_all(b"request").unwrap();
        session.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        helper.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"early>request");
        helper.write_all(b" answer").unwrap();
        helper.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        session.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"<late answer");
        t.join().unwrap();
    }

    #[test]
    fn splice_closes_both_when_one_side_fails() {
        let (client, session) = pair();
        let (egress, mut helper) = pair();
        let t = std::thread::spawn(move || splice(client, egress, b"", b""));
        // The session goes away entirely; the helper's bytes then fail to
        // be written, and the helper sees its stream closed.
        drop(session);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(Instant::now() < deadline, "the egress side stayed open");
            if helper.write_all(&[0u8; 4096]).is_err() {
                break;
            }
            let mut b = [0u8; 16];
            helper.set_nonblocking(true).unwrap();
            if let Ok(0) = helper.read(&mut b) {
                break;
            }
            helper.set_nonblocking(false).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        t.join().unwrap();
    }
}
