//! The 8250 UART at COM1 (vm-superio), writing to the console sink.
//!
//! The sink also keeps the last lines the guest printed, so that when the
//! guest dies the VMM can show why on its own stderr.
//!
//! The console is bounded ([`BoundedConsole`]): guest root can print
//! without end (`cat /dev/urandom > /dev/ttyS0`), and the console file
//! lives in the user's runtime directory.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the UART's interrupt through an irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The last `capacity` complete lines of console output, plus the line in progress.
#[derive(Debug, Default)]
pub struct ConsoleTail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    capacity: usize,
    /// The first "Kernel panic" line, kept even after it scrolls out of the
    /// tail (the panic's stack trace alone can be longer than the tail).
    panic_line: Option<String>,
}

impl ConsoleTail {
    pub fn new(capacity: usize) -> Self {
        Self {
            lines: VecDeque::with_capacity(capacity),
            partial: Vec::new(),
            capacity,
            panic_line: None,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_owned();
                self.partial.clear();
                if self.panic_line.is_none() && line.contains("Kernel panic") {
                    self.panic_line = Some(line.clone());
                }
                if self.lines.len() == self.capacity {
                    self.lines.pop_front();
                }
                self.lines.push_back(line);
            } else if self.partial.len() < 4096 {
                self.partial.push(b);
            }
        }
    }

    pub fn panic_line(&self) -> Option<&str> {
        self.panic_line.as_deref()
    }

    /// The remembered lines, oldest first, including an unfinished last line.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            v.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        v
    }
}

/// Where the guest's console goes: a file or the VMM's stdout, and the tail.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    tail: Arc<Mutex<ConsoleTail>>,
}

impl ConsoleSink {
    pub fn new(out: Box<dyn Write + Send>, tail: Arc<Mutex<ConsoleTail>>) -> Self {
        Self { out, tail }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Ok(mut t) = self.tail.lock() {
            t.push(buf);
        }
        // A console that went away (closed pipe, full disk) must not stop the guest.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Most bytes of guest output the console file holds: 8 MiB.
pub const CONSOLE_BOUND: u64 = 8 << 20;
/// Longest marker line [`BoundedConsole`] writes.
pub const CONSOLE_MARKER_MAX: u64 = 128;

/// Opens (creating or truncating) the console log at `path` for the VMM:
/// never through a symlink (`O_NOFOLLOW`), never a FIFO or socket that
/// could block the VMM or the guest (opened non-blocking, then checked),
/// mode 0600, close-on-exec. A character device (`/dev/null`, a tty) is
/// accepted as the user's explicit choice.
pub fn open_console(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() && !kind.is_char_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or a terminal",
        ));
    }
    // Back to blocking writes: a full disk or a slow tty is an error or a
    // wait, as for any console, not a dropped byte.
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor this function owns; no memory passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an integer on a descriptor this function owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Where the console's bytes go.
pub enum ConsoleOut {
    /// A file the VMM opened: truncated and continued at the bound.
    File(File),
    /// A stream (the VMM's stdout): cut at the bound.
    Stream(Box<dyn Write + Send>),
}

/// A console writer that never holds more than `bound` bytes of guest
/// output.
///
/// A console file that reaches the bound is truncated to zero and
/// continues with a marker line saying how many bytes were dropped so far:
/// the file always holds the newest output (at most `bound` bytes plus the
/// marker), which is what explains a failure late in a long-lived VM; the
/// VMM's last-lines tail ([`ConsoleTail`]) is kept regardless. A stream
/// (stdout, a pipe), or a file that cannot be truncated, keeps the first
/// `bound` bytes, then gets one marker line and nothing more.
pub struct BoundedConsole {
    out: ConsoleOut,
    bound: u64,
    /// Guest bytes in the current generation of the file (or the stream).
    written: u64,
    /// Guest bytes dropped by truncations, or after the stream was cut.
    dropped: u64,
    cut: bool,
}

impl BoundedConsole {
    pub fn new(out: ConsoleOut, bound: u64) -> Self {
        Self {
            out,
            bound,
            written: 0,
            dropped: 0,
            cut: false,
        }
    }

    fn restart_file(f: &mut File, dropped: u64) -> io::Result<()> {
        f.set_len(0)?;
        f.seek(io::SeekFrom::Start(0))?;
        let marker = format!(
            "[coworkvm: console log truncated at its bound; {dropped} bytes of older output dropped]\n"
        );
        f.write_all(marker.as_bytes())
    }
}

#[cfg(test)]
impl BoundedConsole {
    /// Bytes of guest output dropped so far.
    fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Write for BoundedConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cut {
            self.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        let len = buf.len() as u64;
        if self.written + len > self.bound {
            let truncated = match &mut self.out {
                ConsoleOut::File(f) => Self::restart_file(f, self.dropped + self.written).is_ok(),
                ConsoleOut::Stream(_) => false,
            };
            if truncated {
                self.dropped += self.written;
                self.written = 0;
            } else {
                let marker = format!(
                    "\n[coworkvm: console output reached its bound of {} bytes; the rest is dropped]\n",
                    self.bound
                );
                let out: &mut dyn Write = match &mut self.out {
                    ConsoleOut::File(f) => f,
                    ConsoleOut::Stream(s) => s,
                };
                let _ = out.write_all(marker.as_bytes());
                self.cut = true;
                self.dropped += len;
                return Ok(buf.len());
            }
        }
        // A single write larger than the bound keeps only its end.
        let keep = &buf[buf.len().saturating_sub(self.bound as usize)..];
        self.dropped += (buf.len() - keep.len()) as u64;
        let out: &mut dyn Write = match &mut self.out {
            ConsoleOut::File(f) => f,
            ConsoleOut::Stream(s) => s,
        };
        out.write_all(keep)?;
        self.written += keep.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            ConsoleOut::File(f) => f.flush(),
            ConsoleOut::Stream(s) => s.flush(),
        }
    }
}

pub type SerialDevice = Serial<EventFdTrigger, NoEvents, ConsoleSink>;

/// Port I/O front end of the UART: eight registers from the base port.
pub struct SerialPort {
    serial: SerialDevice,
}

impl SerialPort {
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger::new(irq), sink),
        }
    }

    pub fn read(&mut self, offset: u16, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(off);
        }
    }

    pub fn write(&mut self, offset: u16, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, v) {
                tracing::debug!("serial: {e:?}");
            }
        }
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        let mut t = ConsoleTail::new(2);
        t.push(b"one\r\ntwo\nthr");
        t.push(b"ee\nfour");
        assert_eq!(t.lines(), ["two", "three", "four"]);
        assert_eq!(t.panic_line(), None);
        t.push(b"\n[ 1.0] Kernel panic - not syncing: x\n");
        for _ in 0..5 {
            t.push(b"trace\n");
        }
        assert_eq!(t.panic_line(), Some("[ 1.0] Kernel panic - not syncing: x"));
    }

    #[test]
    fn uart_transmits_to_sink_and_tail() {
        let tail = Arc::new(Mutex::new(ConsoleTail::new(4)));
        let buf = Arc::new(Mutex::new(Vec::new()));
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = ConsoleSink::new(Box::new(Shared(buf.clone())), tail.clone());
        let mut port = SerialPort::new(EventFd::new(0).unwrap(), sink);
        for b in b"hi\n" {
            port.write(0, &[*b]);
        }
        assert_eq!(&*buf.lock().unwrap(), b"hi\n");
        assert_eq!(tail.lock().unwrap().lines(), vec!["hi".to_string()]);
        // Line status register says the transmitter is empty.
        let mut lsr = [0u8];
        port.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[derive(Clone, Default)]
    struct SharedVec(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedVec {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Guest output far past the bound, byte by byte as the UART sends it.
    fn flood(port: &mut SerialPort, bytes: usize) {
        for i in 0..bytes {
            let b = if i % 64 == 63 {
                b'\n'
            } else {
                b'a' + (i % 26) as u8
            };
            port.write(0, &[b]);
        }
    }

    #[test]
    fn console_file_stays_within_its_bound_and_keeps_the_newest_output() {
        let dir = std::env::temp_dir().join(format!("cw-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let bound = 4096u64;
        let file = open_console(&path).unwrap();
        let tail = Arc::new(Mutex::new(ConsoleTail::new(4)));
        let sink = ConsoleSink::new(
            Box::new(BoundedConsole::new(ConsoleOut::File(file), bound)),
            tail.clone(),
        );
        let mut port = SerialPort::new(EventFd::new(0).unwrap(), sink);
        let total = 10 * bound as usize + 100;
        flood(&mut port, total);
        port.write(0, b"E");
        port.flush();
        let data = std::fs::read(&path).unwrap();
        assert!(
            data.len() as u64 <= bound + CONSOLE_MARKER_MAX,
            "console file is {} bytes, bound {bound}",
            data.len()
        );
        let text = String::from_utf8_lossy(&data);
        assert!(
            text.starts_with("[coworkvm: console log truncated"),
            "{text:.200}"
        );
        assert_eq!(
            text.matches("[coworkvm:").count(),
            1,
            "one marker per generation"
        );
        assert!(text.ends_with('E'), "the newest byte is kept");
        // The tail still has the last lines whatever the file kept.
        let last = tail.lock().unwrap().lines().last().cloned().unwrap();
        assert!(last.ends_with('E'), "{last}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_console_stream_is_cut_at_its_bound_with_one_marker() {
        let shared = SharedVec::default();
        let tail = Arc::new(Mutex::new(ConsoleTail::new(4)));
        let bound = 1000u64;
        let mut console = BoundedConsole::new(ConsoleOut::Stream(Box::new(shared.clone())), bound);
        for _ in 0..50 {
            console.write_all(&[b'x'; 100]).unwrap();
        }
        assert_eq!(console.dropped(), 5000 - bound);
        let sink = ConsoleSink::new(Box::new(console), tail);
        let mut port = SerialPort::new(EventFd::new(0).unwrap(), sink);
        flood(&mut port, 10_000);
        let data = shared.0.lock().unwrap().clone();
        assert!(
            data.len() as u64 <= bound + CONSOLE_MARKER_MAX,
            "{}",
            data.len()
        );
        assert!(data[..bound as usize].iter().all(|&b| b == b'x'));
        let text = String::from_utf8_lossy(&data[bound as usize..]);
        assert!(text.contains("reached its bound of 1000 bytes"), "{text}");
    }

    #[test]
    fn the_console_is_never_opened_through_a_symlink_or_a_fifo() {
        let dir = std::env::temp_dir().join(format!("cw-console-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let canary = dir.join("canary");
        std::fs::write(&canary, b"keep me").unwrap();
        let link = dir.join("console.log");
        std::os::unix::fs::symlink(&canary, &link).unwrap();
        let err = open_console(&link).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert_eq!(std::fs::read(&canary).unwrap(), b"keep me");

        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No reader: a blocking open would hang here; this one fails at once.
        assert!(open_console(&fifo).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
