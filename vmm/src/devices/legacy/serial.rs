//! The 8250 UART at COM1 (vm-superio), writing to the console sink.
//!
//! The sink also keeps the last lines the guest printed, so that when the
//! guest dies the VMM can show why on its own stderr.

use std::collections::VecDeque;
use std::io::{self, Write};
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
}
