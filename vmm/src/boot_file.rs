//! The files a VMM boots from (kernel, initramfs, disks), as open
//! descriptors.
//!
//! `coworkvm boot` takes each as an argument ([`FileArg`]): a PATH the user
//! names, or `fd:N`, a descriptor its parent opened and left open across
//! `exec` (how the helper and `coworkvm run` hand over bundle files they
//! opened with `O_NOFOLLOW` and checked, so the VMM never resolves a bundle
//! path itself). Either way the VMM works from a [`BootFile`]: an owned,
//! close-on-exec descriptor of a regular file or a block device.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why a boot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BootFileError {
    /// The path could not be opened.
    #[error("cannot open {0}: {1}")]
    Open(PathBuf, io::Error),
    /// `fd:N` names no open descriptor (or one given twice).
    #[error("fd:{0} is not an open descriptor inherited by this process: {1}")]
    BadFd(RawFd, io::Error),
    /// `fd:N` names standard input, output or error.
    #[error("fd:{0} is a standard stream, not a boot file (use 3 or above)")]
    StdFd(RawFd),
    /// `fd:N` is given for two files.
    #[error("fd:{0} is given twice")]
    FdTwice(RawFd),
    /// `fd:N` is not open for writing where a writable disk needs it.
    #[error("{0} is not open for reading and writing, as a writable disk needs")]
    NotWritable(String),
    /// Neither a regular file nor a block device (a FIFO, a directory...).
    #[error("{0} is not a regular file or a block device")]
    NotAFile(String),
    /// Not a Unix stream socket where one is needed (vhost-user).
    #[error("{0} is not a Unix stream socket")]
    NotAUnixStream(String),
    /// fstat or fcntl failed.
    #[error("cannot examine {0}: {1}")]
    Stat(String, io::Error),
}

/// An open file to boot from: shared, so the configuration that holds it
/// can be cloned; the descriptor closes when the last clone goes.
#[derive(Debug, Clone)]
pub struct BootFile {
    name: PathBuf,
    file: Arc<File>,
}

impl BootFile {
    /// A file this process opened itself. `name` is for messages (and a
    /// disk's serial number: its last component).
    pub fn new(name: impl Into<PathBuf>, file: File) -> Self {
        Self {
            name: name.into(),
            file: Arc::new(file),
        }
    }

    /// What to call the file.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// An owned duplicate of the descriptor (close-on-exec).
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Opens a path the user named: symbolic links are followed (the user
    /// chose the file), opened non-blocking first so that a FIFO cannot
    /// hang the open, then only a regular file or a block device is taken.
    pub fn open_path(path: &Path, writable: bool) -> Result<Self, BootFileError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| BootFileError::Open(path.to_owned(), e))?;
        let name = path.display().to_string();
        check_kind(&file, &name)?;
        set_blocking(&file, &name)?;
        Ok(Self::new(path, file))
    }

    /// Takes ownership of descriptor `fd`, inherited from the parent
    /// process. It must be open (read-write for a `writable` disk), 3 or
    /// above, named once, and a regular file or a block device. It is made
    /// close-on-exec.
    pub fn from_inherited_fd(fd: RawFd, writable: bool) -> Result<Self, BootFileError> {
        let label = format!("fd:{fd}");
        let (file, flags) = claim_inherited_fd(fd)?;
        if writable && flags & libc::O_ACCMODE != libc::O_RDWR {
            return Err(BootFileError::NotWritable(label));
        }
        if flags & libc::O_ACCMODE == libc::O_WRONLY {
            return Err(BootFileError::Stat(
                label,
                io::Error::new(io::ErrorKind::PermissionDenied, "open for writing only"),
            ));
        }
        check_kind(&file, &label)?;
        set_blocking(&file, &label)?;
        // The path the parent opened, for messages and the disk's serial.
        let name = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .unwrap_or_else(|_| PathBuf::from(&label));
        Ok(Self::new(name, file))
    }
}

/// Takes ownership of descriptor `fd`, inherited from the parent process,
/// and makes it close-on-exec: it must be open, 3 or above, and claimed
/// once in this process (whatever it is used for). Returns it with its
/// status flags (`F_GETFL`).
fn claim_inherited_fd(fd: RawFd) -> Result<(File, libc::c_int), BootFileError> {
    static CLAIMED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());
    if fd <= 2 {
        return Err(BootFileError::StdFd(fd));
    }
    // SAFETY: fcntl(F_GETFL) on an integer reads the descriptor table
    // entry only; an unopened number gives EBADF and changes nothing.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(BootFileError::BadFd(fd, io::Error::last_os_error()));
    }
    if !CLAIMED.lock().unwrap_or_else(|p| p.into_inner()).insert(fd) {
        return Err(BootFileError::FdTwice(fd));
    }
    // SAFETY: `fd` is open (F_GETFL succeeded), above the standard
    // streams, and claimed only once (CLAIMED): it was inherited across
    // exec, so no other object in this process owns it, and from here
    // the File is its only owner.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: fcntl(F_SETFD) on the descriptor `file` owns.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(BootFileError::Stat(
            format!("fd:{fd}"),
            io::Error::last_os_error(),
        ));
    }
    Ok((file, flags))
}

/// One `SOL_SOCKET` integer option of the socket `fd`.
fn socket_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (one c_int) into
    // `value`, which lives across the call, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// `file` as the connected Unix stream socket it must be, blocking.
fn unix_stream_from(file: File, name: &str) -> Result<UnixStream, BootFileError> {
    check_unix_stream(&file, name)?;
    set_blocking(&file, name)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(file)))
}

fn check_unix_stream(file: &File, name: &str) -> Result<(), BootFileError> {
    let meta = file
        .metadata()
        .map_err(|e| BootFileError::Stat(name.to_owned(), e))?;
    if !meta.file_type().is_socket() {
        return Err(BootFileError::NotAUnixStream(name.to_owned()));
    }
    let fd = file.as_raw_fd();
    let domain =
        socket_option(fd, libc::SO_DOMAIN).map_err(|e| BootFileError::Stat(name.to_owned(), e))?;
    let kind =
        socket_option(fd, libc::SO_TYPE).map_err(|e| BootFileError::Stat(name.to_owned(), e))?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
        return Err(BootFileError::NotAUnixStream(name.to_owned()));
    }
    Ok(())
}

fn check_kind(file: &File, name: &str) -> Result<(), BootFileError> {
    let meta = file
        .metadata()
        .map_err(|e| BootFileError::Stat(name.to_owned(), e))?;
    let t = meta.file_type();
    if t.is_file() || t.is_block_device() {
        Ok(())
    } else {
        Err(BootFileError::NotAFile(name.to_owned()))
    }
}

/// Clears `O_NONBLOCK` on `file` (set to open a path without hanging on a
/// FIFO, or by the parent): the one place that does it, for boot files and
/// bundle files alike.
pub fn clear_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor `file` owns; no memory
    // is passed.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_blocking(file: &File, name: &str) -> Result<(), BootFileError> {
    clear_nonblocking(file).map_err(|e| BootFileError::Stat(name.to_owned(), e))
}

/// A boot file as `coworkvm boot` takes it: `fd:N` or a path (a file whose
/// name starts with `fd:` is given as `./fd:...`). In a launch
/// configuration: `{"fd": N}` or `{"path": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileArg {
    /// A path the user named.
    Path(PathBuf),
    /// A descriptor inherited from the parent.
    Fd(RawFd),
}

impl std::str::FromStr for FileArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty path".into());
        }
        match s.strip_prefix("fd:") {
            Some(n) => n
                .parse::<RawFd>()
                .ok()
                .filter(|n| *n >= 0)
                .map(FileArg::Fd)
                .ok_or_else(|| format!("fd:{n}: not a descriptor number")),
            None => Ok(FileArg::Path(s.into())),
        }
    }
}

impl FileArg {
    /// Opens (or takes over) the file: see [`BootFile::open_path`] and
    /// [`BootFile::from_inherited_fd`].
    pub fn open(&self, writable: bool) -> Result<BootFile, BootFileError> {
        match self {
            FileArg::Path(p) => BootFile::open_path(p, writable),
            FileArg::Fd(fd) => BootFile::from_inherited_fd(*fd, writable),
        }
    }

    /// A connected Unix stream socket (a vhost-user back-end's): an
    /// inherited descriptor must already be one (connected by the parent);
    /// a path is a listening socket to connect to. Blocking, close-on-exec.
    pub fn open_unix_stream(&self) -> Result<UnixStream, BootFileError> {
        let stream = match self {
            FileArg::Path(p) => {
                UnixStream::connect(p).map_err(|e| BootFileError::Open(p.clone(), e))?
            }
            FileArg::Fd(fd) => {
                let (file, _) = claim_inherited_fd(*fd)?;
                unix_stream_from(file, &format!("fd:{fd}"))?
            }
        };
        Ok(stream)
    }

    /// The argument as given (`fd:N` or the path).
    pub fn to_arg(&self) -> std::ffi::OsString {
        match self {
            FileArg::Path(p) => p.clone().into_os_string(),
            FileArg::Fd(fd) => format!("fd:{fd}").into(),
        }
    }
}

/// `--disk`'s argument: `FILE` or `FILE,ro` (also `FILE,rw`), FILE a
/// [`FileArg`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    /// The image.
    pub file: FileArg,
    /// Read-only to the guest.
    pub read_only: bool,
}

impl std::str::FromStr for DiskArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (file, read_only) = match s.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            Some((_, opt)) => return Err(format!("unknown disk option '{opt}' (ro or rw)")),
            None => (s, false),
        };
        if file.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(Self {
            file: file.parse()?,
            read_only,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn disk_and_file_arguments_parse() {
        let d: DiskArg = "/a/b.img,ro".parse().unwrap();
        assert_eq!(
            d,
            DiskArg {
                file: FileArg::Path("/a/b.img".into()),
                read_only: true
            }
        );
        let d: DiskArg = "/a/b.img".parse().unwrap();
        assert!(!d.read_only);
        let d: DiskArg = "/a/b.img,rw".parse().unwrap();
        assert!(!d.read_only);
        let d: DiskArg = "fd:7,ro".parse().unwrap();
        assert_eq!(d.file, FileArg::Fd(7));
        assert!(d.read_only);
        assert!("/a,xx".parse::<DiskArg>().is_err());
        assert!(",ro".parse::<DiskArg>().is_err());
        assert!("fd:x".parse::<FileArg>().is_err());
        assert!("fd:-1".parse::<FileArg>().is_err());
        assert_eq!(
            "./fd:3".parse::<FileArg>().unwrap(),
            FileArg::Path("./fd:3".into())
        );
        assert_eq!(FileArg::Fd(9).to_arg(), "fd:9");
    }

    fn temp(tag: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("coworkvm-bootfile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn inherited_descriptors_are_checked_and_owned_once() {
        let path = temp("fd");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        // Both open before either is claimed: distinct numbers.
        let ro = File::open(&path).unwrap().into_raw_fd();
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap()
            .into_raw_fd();
        let e = BootFile::from_inherited_fd(ro, true).unwrap_err();
        assert!(matches!(e, BootFileError::NotWritable(_)), "{e}");
        // The failed claim owned and closed it: a second claim is refused.
        assert!(BootFile::from_inherited_fd(ro, false).is_err());

        let f = BootFile::from_inherited_fd(rw, true).unwrap();
        assert_eq!(f.name(), path.as_path());
        assert_eq!(f.file().metadata().unwrap().len(), 4096);
        // SAFETY: fcntl(F_GETFD) on the descriptor `f` owns.
        let fdflags = unsafe { libc::fcntl(f.file().as_raw_fd(), libc::F_GETFD) };
        assert_eq!(fdflags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        assert!(matches!(
            BootFile::from_inherited_fd(1, false),
            Err(BootFileError::StdFd(1))
        ));
        drop(f);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_socket_argument_must_be_a_unix_stream() {
        use std::io::{Read, Write};
        // (The descriptors are not claimed as inherited ones here: a
        // claimed number stays claimed for the whole test process.)
        let (ours, mut peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut s = unix_stream_from(File::from(std::os::fd::OwnedFd::from(ours)), "s").unwrap();
        peer.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        // A regular file or a datagram socket is refused by name.
        let file = File::open("/proc/self/status").unwrap();
        let e = unix_stream_from(file, "fd:7").unwrap_err();
        assert!(
            matches!(e, BootFileError::NotAUnixStream(ref n) if n == "fd:7"),
            "{e}"
        );
        let (dgram, _dgram_peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let e = unix_stream_from(File::from(std::os::fd::OwnedFd::from(dgram)), "d").unwrap_err();
        assert_eq!(e.to_string(), "d is not a Unix stream socket");
        // A path is connected to; nobody listening is an error.
        let e = FileArg::Path("/nonexistent/vfs.sock".into())
            .open_unix_stream()
            .unwrap_err();
        assert!(matches!(e, BootFileError::Open(..)), "{e}");
        let dir = temp("listen");
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let _s = FileArg::Path(sock.clone()).open_unix_stream().unwrap();
        assert!(listener.accept().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_is_refused_without_hanging() {
        let path = temp("fifo");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = BootFile::open_path(&path, false).unwrap_err();
        assert!(matches!(e, BootFileError::NotAFile(_)), "{e}");
        std::fs::remove_file(&path).unwrap();
    }
}
