//! Test peer for the vsock device, on both sides of the VM.
//!
//! Guest side (AF_VSOCK; streams to the host bind a privileged source port
//! first, as the VMM accepts guest streams only from ports below 1024, so
//! these run as root):
//!   vsock-probe guest-echo PORT BYTES STREAMS  send BYTES on each of STREAMS
//!                                              streams to host PORT, expect them echoed
//!   vsock-probe guest-connect-refused PORT     a stream to host PORT is refused
//!   vsock-probe guest-connect-unprivileged PORT
//!                                              a stream from an unprivileged source port
//!                                              (auto-bound, >= 1024) to host PORT is refused
//!   vsock-probe guest-listen PORT              accept one stream, answer a line
//! Host side (hybrid vsock Unix sockets):
//!   vsock-probe echo-server PATH               echo every connection to PATH
//!   vsock-probe host-connect UDS PORT          CONNECT to guest PORT, send a line

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};

fn pattern(stream: usize, i: usize) -> u8 {
    ((i * 31 + stream * 7) % 251) as u8
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as u16;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> std::io::Result<i32> {
    // SAFETY: socket(2) with constant arguments; returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

/// Binds `fd` to a free privileged port (the highest below 1024 not in use),
/// as the guest agent does before dialing the host.
fn bind_privileged(fd: i32) -> std::io::Result<u32> {
    for port in (1..1024).rev() {
        let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a live sockaddr_vm and the length matches it.
        let r = unsafe {
            libc::bind(
                fd,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as u32,
            )
        };
        if r == 0 {
            return Ok(port);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EADDRINUSE) {
            return Err(e);
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::EADDRINUSE))
}

/// A stream to `cid`:`port` from a privileged source port.
fn vsock_connect(cid: u32, port: u32) -> std::io::Result<File> {
    vsock_connect_from(cid, port, true)
}

/// A stream to `cid`:`port`; from a privileged source port, or from the
/// one the kernel picks (always 1024 or above).
fn vsock_connect_from(cid: u32, port: u32, privileged: bool) -> std::io::Result<File> {
    let fd = vsock_socket()?;
    // SAFETY: fd is ours and owned by nothing else; File closes it on error.
    let f = unsafe { File::from_raw_fd(fd) };
    if privileged {
        bind_privileged(fd)?;
    }
    let addr = vsock_addr(cid, port);
    // SAFETY: `addr` is a live sockaddr_vm and the length matches it.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

fn shutdown_write(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on an fd we own; no memory is passed.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
}

fn guest_echo(port: u32, bytes: usize, streams: usize) -> Result<(), String> {
    let handles: Vec<_> = (0..streams)
        .map(|s| {
            std::thread::spawn(move || -> Result<(), String> {
                let f = vsock_connect(2, port).map_err(|e| format!("stream {s}: connect: {e}"))?;
                let mut w = f.try_clone().map_err(|e| e.to_string())?;
                let writer = std::thread::spawn(move || {
                    let data: Vec<u8> = (0..bytes).map(|i| pattern(s, i)).collect();
                    let r = w.write_all(&data);
                    shutdown_write(&w);
                    r
                });
                let mut got = Vec::with_capacity(bytes);
                let mut r = f;
                r.read_to_end(&mut got)
                    .map_err(|e| format!("stream {s}: read: {e}"))?;
                writer
                    .join()
                    .map_err(|_| "writer panicked".to_string())?
                    .map_err(|e| format!("stream {s}: write: {e}"))?;
                if got.len() != bytes {
                    return Err(format!("stream {s}: got {} of {bytes} bytes", got.len()));
                }
                if let Some(i) = (0..bytes).find(|&i| got[i] != pattern(s, i)) {
                    return Err(format!("stream {s}: byte {i} differs"));
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| "stream thread panicked".to_string())??;
    }
    Ok(())
}

fn guest_listen(port: u32) -> Result<String, String> {
    let fd = vsock_socket().map_err(|e| e.to_string())?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a live sockaddr_vm and the length matches it.
    let r = unsafe {
        libc::bind(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        )
    };
    // SAFETY: listen(2) on the fd we just bound.
    if r < 0 || unsafe { libc::listen(fd, 4) } < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    println!("@@VSOCK listening {port}");
    // SAFETY: accept(2) on our listening fd; we do not ask for the peer address.
    let c = unsafe { libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) };
    if c < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: `c` is a fresh fd from accept, owned by nothing else.
    let f = unsafe { File::from_raw_fd(c) };
    let mut line = String::new();
    BufReader::new(f.try_clone().map_err(|e| e.to_string())?)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let mut w = f;
    w.write_all(format!("pong:{line}").as_bytes())
        .map_err(|e| e.to_string())?;
    Ok(line.trim().to_owned())
}

fn echo_server(path: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| e.to_string())?;
    println!("@@VSOCK echo-server ready");
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || {
            let mut r = c.try_clone().expect("clone");
            let _ = std::io::copy(&mut r, &mut c);
            let _ = c.shutdown(std::net::Shutdown::Write);
        });
    }
    Ok(())
}

fn host_connect(uds: &str, port: u32) -> Result<String, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {uds}: {e}"))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut ok = String::new();
    r.read_line(&mut ok).map_err(|e| e.to_string())?;
    if !ok.starts_with("OK ") {
        return Err(format!("handshake answer {ok:?}"));
    }
    s.write_all(b"ping\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    r.read_line(&mut reply).map_err(|e| e.to_string())?;
    Ok(format!("{} {}", ok.trim(), reply.trim()))
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| a.get(i).cloned().unwrap_or_default();
    let num = |i: usize| arg(i).parse::<usize>().unwrap_or(0);
    let result = match arg(0).as_str() {
        "guest-echo" => guest_echo(num(1) as u32, num(2), num(3).max(1))
            .map(|()| format!("echo ok streams={} bytes={}", num(3).max(1), num(2))),
        "guest-connect-refused" => match vsock_connect(2, num(1) as u32) {
            Ok(_) => Err(format!(
                "port {} accepted a stream nobody listens for",
                num(1)
            )),
            Err(e) => Ok(format!("refused port={} ({e})", num(1))),
        },
        "guest-connect-unprivileged" => match vsock_connect_from(2, num(1) as u32, false) {
            Ok(_) => Err(format!(
                "port {} accepted a stream from an unprivileged source port",
                num(1)
            )),
            Err(e) => Ok(format!("unprivileged refused port={} ({e})", num(1))),
        },
        "guest-listen" => guest_listen(num(1) as u32).map(|l| format!("listen got={l}")),
        "echo-server" => echo_server(&arg(1)).map(|()| "echo-server done".into()),
        "host-connect" => host_connect(&arg(1), num(2) as u32).map(|r| format!("host-connect {r}")),
        _ => Err("usage: see the source".into()),
    };
    match result {
        Ok(msg) => println!("@@VSOCK {msg}"),
        Err(e) => {
            println!("@@VSOCK error {e}");
            std::process::exit(1);
        }
    }
}
