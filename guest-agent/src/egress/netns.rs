//! A session's network namespace: loopback up and the two proxy
//! listeners bound in it, made by a short-lived thread so that no thread
//! of the agent stays in it.

use std::ffi::CStr;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use socket_proto::egress::{HTTP_PROXY_PORT, SOCKS_PROXY_PORT};

/// Why a session's network namespace could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("starting the thread that makes it: {0}")]
    Thread(io::Error),
    #[error("the thread that makes it panicked")]
    Panicked,
    #[error("unshare(CLONE_NEWNET): {0}")]
    Unshare(io::Error),
    #[error("bringing loopback up: {0}")]
    Loopback(io::Error),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("opening /proc/thread-self/ns/net: {0}")]
    Open(io::Error),
}

/// A new network namespace with its loopback up and the proxies'
/// listening sockets (which belong to it whichever thread accepts on
/// them).
#[derive(Debug)]
pub struct Namespace {
    /// `/proc/thread-self/ns/net` of the namespace, close-on-exec: the
    /// spawn's `setns` target.
    pub fd: OwnedFd,
    /// `127.0.0.1:`[`HTTP_PROXY_PORT`].
    pub http: TcpListener,
    /// `127.0.0.1:`[`SOCKS_PROXY_PORT`].
    pub socks: TcpListener,
}

/// Makes a [`Namespace`] on a thread of its own, which ends once it is
/// made (the namespace lives on in its descriptor and sockets).
pub fn create() -> Result<Namespace, NetnsError> {
    std::thread::Builder::new()
        .name("egress-netns".into())
        .stack_size(super::THREAD_STACK)
        .spawn(create_here)
        .map_err(NetnsError::Thread)?
        .join()
        .map_err(|_| NetnsError::Panicked)?
}

/// Moves the calling thread into a new network namespace and sets it up.
/// Only for a thread that ends afterwards.
fn create_here() -> Result<Namespace, NetnsError> {
    // SAFETY: unshare with a constant flag; it changes only this thread's
    // namespaces (network namespaces may be unshared per thread).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::Unshare(io::Error::last_os_error()));
    }
    loopback_up().map_err(NetnsError::Loopback)?;
    let listen = |port| {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        TcpListener::bind(addr).map_err(|source| NetnsError::Listen { addr, source })
    };
    let http = listen(HTTP_PROXY_PORT)?;
    let socks = listen(SOCKS_PROXY_PORT)?;
    let path: &CStr = c"/proc/thread-self/ns/net";
    // SAFETY: open reads the static NUL-terminated path; it returns a new
    // descriptor or -1.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(NetnsError::Open(io::Error::last_os_error()));
    }
    // SAFETY: fd is new and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Namespace { fd, http, socks })
}

/// `ip link set lo up` in the calling thread's network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is new and owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zero is a valid start.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into
    // `req`, a live ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled `ifru_flags`, the union's member read here.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the name and flags from `req`, a live ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this kernel lets the agent make network namespaces: one is
/// made and dropped on a thread of its own.
pub fn supported() -> Result<(), NetnsError> {
    std::thread::Builder::new()
        .name("egress-netns".into())
        .stack_size(super::THREAD_STACK)
        .spawn(|| {
            // SAFETY: as in `create_here`: this thread only, and it ends.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Unshare(io::Error::last_os_error()));
            }
            loopback_up().map_err(NetnsError::Loopback)
        })
        .map_err(NetnsError::Thread)?
        .join()
        .map_err(|_| NetnsError::Panicked)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Root only (this machine's tests run as root): the namespace is
    /// real, its loopback answers, and it is not the test's.
    #[test]
    fn a_namespace_has_loopback_and_the_proxy_listeners() {
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            coworkvm_tests::skip_or_fail("making a network namespace needs root");
            return;
        }
        let ns = create().unwrap();
        let ours = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        let theirs = std::fs::File::from(ns.fd.try_clone().unwrap())
            .metadata()
            .unwrap()
            .ino();
        assert_ne!(ours, theirs, "the namespace is the test's own");
        assert_eq!(
            ns.http.local_addr().unwrap(),
            SocketAddr::from(([127, 0, 0, 1], HTTP_PROXY_PORT))
        );
        assert_eq!(
            ns.socks.local_addr().unwrap(),
            SocketAddr::from(([127, 0, 0, 1], SOCKS_PROXY_PORT))
        );
        // The descriptor is close-on-exec.
        // SAFETY: fcntl F_GETFD on a live descriptor.
        let flags = unsafe { libc::fcntl(ns.fd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        // From inside: loopback is up and the listener takes connections.
        let fd = ns.fd.as_raw_fd();
        let inside = std::thread::spawn(move || {
            // SAFETY: setns on a live namespace descriptor; this thread ends.
            assert_eq!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }, 0);
            std::net::TcpStream::connect(("127.0.0.1", HTTP_PROXY_PORT)).map(|_| ())
        });
        inside.join().unwrap().unwrap();
        let (_conn, peer) = ns.http.accept().unwrap();
        assert!(peer.ip().is_loopback());
        supported().unwrap();
    }
}
