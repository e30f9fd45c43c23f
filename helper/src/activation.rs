//! systemd socket activation (`sd_listen_fds(3)`), implemented directly:
//! the protocol is three environment variables and descriptors from 3 up.
//!
//! `LISTEN_PID` names the process the descriptors are meant for (a child
//! that inherited the environment must not take them), `LISTEN_FDS` counts
//! them, `LISTEN_FDNAMES` (optional) names them, colon-separated. The
//! helper takes exactly one: a listening `AF_UNIX` stream socket bound to
//! a path (the client connects by path, and the VM run directory lives
//! beside it). The variables are removed once read, and the descriptor is
//! made close-on-exec, so the VMMs and virtiofsd the helper starts never
//! hold the client socket.

use std::ffi::OsStr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// The first inherited descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Why an inherited socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID` is not a decimal process id.
    #[error("LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    /// `LISTEN_FDS` is not a decimal count.
    #[error("LISTEN_FDS={0:?} is not a count")]
    BadCount(String),
    /// More than one descriptor was passed.
    #[error(
        "LISTEN_FDS={0}: coworkvm serve takes exactly one socket \
         (ListenStream= once in coworkvm.socket)"
    )]
    Count(usize),
    /// The descriptor is not open.
    #[error("the inherited descriptor {0} is not open")]
    NotOpen(RawFd),
    /// The descriptor is something else than a listening Unix stream socket.
    #[error("the inherited descriptor {fd} is not a listening Unix stream socket ({why})")]
    NotAListener {
        /// The descriptor.
        fd: RawFd,
        /// What it is instead.
        why: &'static str,
    },
    /// The socket has no path (abstract or unnamed).
    #[error(
        "the inherited socket {0} has no file system path; coworkvm serve needs \
         ListenStream=PATH"
    )]
    NoPath(RawFd),
    /// A system call on the descriptor failed.
    #[error("the inherited descriptor {0}: {1}: {2}")]
    Io(RawFd, &'static str, #[source] std::io::Error),
}

/// What the environment says was passed to this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenEnv {
    /// How many descriptors, from [`LISTEN_FDS_START`].
    pub count: usize,
    /// Their names from `LISTEN_FDNAMES`, when given.
    pub names: Vec<String>,
}

/// Reads the three variables for process `pid`: `None` when nothing was
/// passed to it (no `LISTEN_FDS`, zero, or a `LISTEN_PID` of another
/// process: a parent's activation environment that leaked to us).
pub fn parse_listen_env(
    pid: u32,
    listen_pid: Option<&OsStr>,
    listen_fds: Option<&OsStr>,
    names: Option<&OsStr>,
) -> Result<Option<ListenEnv>, ActivationError> {
    let text = |v: &OsStr| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let Some(fds) = listen_fds else {
        return Ok(None);
    };
    // systemd always sets LISTEN_PID; without it the variables may be
    // anybody's, so they are not taken.
    let Some(listen_pid) = listen_pid else {
        return Ok(None);
    };
    let for_pid: u32 = text(listen_pid)
        .parse()
        .map_err(|_| ActivationError::BadPid(text(listen_pid)))?;
    if for_pid != pid {
        return Ok(None);
    }
    let count: usize = text(fds)
        .parse()
        .map_err(|_| ActivationError::BadCount(text(fds)))?;
    if count == 0 {
        return Ok(None);
    }
    if count > 1 {
        return Err(ActivationError::Count(count));
    }
    let names = names
        .map(|n| text(n).split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(Some(ListenEnv { count, names }))
}

/// The listening socket systemd passed.
#[derive(Debug)]
pub struct InheritedSocket {
    /// The descriptor, close-on-exec.
    pub fd: OwnedFd,
    /// The path it is bound to.
    pub path: PathBuf,
    /// Its `LISTEN_FDNAMES` name (`coworkvm.socket` unless the unit sets
    /// `FileDescriptorName=`).
    pub name: Option<String>,
}

/// Takes the socket passed by socket activation, if any, and removes the
/// activation variables from the environment.
///
/// Call before any other thread starts (the environment is changed, and
/// the descriptor taken over).
pub fn take_listen_socket() -> Result<Option<InheritedSocket>, ActivationError> {
    let env = parse_listen_env(
        std::process::id(),
        std::env::var_os("LISTEN_PID").as_deref(),
        std::env::var_os("LISTEN_FDS").as_deref(),
        std::env::var_os("LISTEN_FDNAMES").as_deref(),
    );
    if matches!(env, Ok(Some(_))) {
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
    }
    let Some(env) = env? else {
        return Ok(None);
    };
    let fd = LISTEN_FDS_START;
    let path = check_listener(fd)?;
    // SAFETY: `fd` is open (checked), was passed to this process for it to
    // serve, and nothing else in the process has taken it: this is the one
    // owner from now on.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Some(InheritedSocket {
        fd: owned,
        path,
        name: env.names.into_iter().next().filter(|n| !n.is_empty()),
    }))
}

fn sockopt(
    fd: RawFd,
    opt: libc::c_int,
    what: &'static str,
) -> Result<libc::c_int, ActivationError> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a live local
    // of that size; a descriptor that is no socket gives ENOTSOCK.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            return Err(ActivationError::NotAListener {
                fd,
                why: "not a socket",
            });
        }
        return Err(ActivationError::Io(fd, what, e));
    }
    Ok(v)
}

/// Checks that `fd` is a listening `AF_UNIX` stream socket bound to a
/// path, marks it close-on-exec, and returns the path.
pub fn check_listener(fd: RawFd) -> Result<PathBuf, ActivationError> {
    // SAFETY: F_GETFD only reads the descriptor table; a closed number
    // gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(ActivationError::NotOpen(fd));
    }
    // SAFETY: F_SETFD changes only this descriptor's close-on-exec flag.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } != 0 {
        return Err(ActivationError::Io(
            fd,
            "setting close-on-exec",
            std::io::Error::last_os_error(),
        ));
    }
    if sockopt(fd, libc::SO_TYPE, "reading SO_TYPE")? != libc::SOCK_STREAM {
        return Err(ActivationError::NotAListener {
            fd,
            why: "not a stream socket",
        });
    }
    if sockopt(fd, libc::SO_ACCEPTCONN, "reading SO_ACCEPTCONN")? == 0 {
        return Err(ActivationError::NotAListener {
            fd,
            why: "not listening",
        });
    }
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`, a live
    // local of that size, and the length it used into `len`.
    let r =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    if r != 0 {
        return Err(ActivationError::Io(
            fd,
            "reading its address",
            std::io::Error::last_os_error(),
        ));
    }
    if addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return Err(ActivationError::NotAListener {
            fd,
            why: "not a Unix socket",
        });
    }
    let offset = std::mem::size_of::<libc::sa_family_t>();
    let path_len = (len as usize)
        .saturating_sub(offset)
        .min(addr.sun_path.len());
    let raw: Vec<u8> = addr.sun_path[..path_len].iter().map(|&c| c as u8).collect();
    // Unnamed (no bytes) or abstract (a leading NUL): no path to serve.
    if raw.first().is_none_or(|&b| b == 0) {
        return Err(ActivationError::NoPath(fd));
    }
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Ok(PathBuf::from(OsStr::from_bytes(&raw[..end])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn the_environment_is_taken_only_for_this_process() {
        assert_eq!(parse_listen_env(42, None, None, None).unwrap(), None);
        // Another process's variables (leaked from a parent) are not ours.
        assert_eq!(parse_listen_env(42, os("41"), os("1"), None).unwrap(), None);
        // No LISTEN_PID: not taken either.
        assert_eq!(parse_listen_env(42, None, os("1"), None).unwrap(), None);
        assert_eq!(parse_listen_env(42, os("42"), os("0"), None).unwrap(), None);
        assert_eq!(
            parse_listen_env(42, os("42"), os("1"), os("coworkvm.socket")).unwrap(),
            Some(ListenEnv {
                count: 1,
                names: vec!["coworkvm.socket".into()]
            })
        );
        assert!(matches!(
            parse_listen_env(42, os("x42"), os("1"), None),
            Err(ActivationError::BadPid(_))
        ));
        assert!(matches!(
            parse_listen_env(42, os("42"), os("-1"), None),
            Err(ActivationError::BadCount(_))
        ));
        // A count that would make the helper take descriptors it does not
        // own is refused, however large.
        assert!(matches!(
            parse_listen_env(42, os("42"), os("2"), None),
            Err(ActivationError::Count(2))
        ));
        assert!(matches!(
            parse_listen_env(42, os("42"), os("99999999999999999999999"), None),
            Err(ActivationError::BadCount(_))
        ));
    }

    #[test]
    fn only_a_listening_unix_stream_socket_with_a_path_is_taken() {
        let dir = std::env::temp_dir().join(format!("cvm-act-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(check_listener(l.as_raw_fd()).unwrap(), path);
        // SAFETY: F_GETFD only reads the descriptor table.
        let flags = unsafe { libc::fcntl(l.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);

        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            check_listener(file.as_raw_fd()),
            Err(ActivationError::NotAListener {
                why: "not a socket",
                ..
            })
        ));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            check_listener(a.as_raw_fd()),
            Err(ActivationError::NotAListener {
                why: "not listening",
                ..
            })
        ));
        let dgram = std::os::unix::net::UnixDatagram::bind(dir.join("d.sock")).unwrap();
        assert!(matches!(
            check_listener(dgram.as_raw_fd()),
            Err(ActivationError::NotAListener {
                why: "not a stream socket",
                ..
            })
        ));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(matches!(
            check_listener(tcp.as_raw_fd()),
            Err(ActivationError::NotAListener {
                why: "not a Unix socket",
                ..
            })
        ));
        assert!(matches!(
            check_listener(9999),
            Err(ActivationError::NotOpen(9999))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
