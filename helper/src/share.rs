//! The host side of shared folders: the share keeper (issue 13).
//!
//! One keeper per VM: `coworkvm share-keeper`, a re-exec of this binary,
//! single-threaded, in a mount namespace of its own (and a user namespace
//! of its own when the helper is not root). It mounts a private tmpfs at
//! the staging directory, makes it a shared mount, and runs virtiofsd on it
//! (`--sandbox namespace`: virtiofsd clones the staging tree into its own
//! namespace as a slave of it, so every grant bound later propagates into
//! the tree it serves). Each grant is a bind of one host path at
//! `<staging>/shared/<host path without its leading '/'>`, `nosuid,nodev`,
//! read-only at the host level for `ro`; denied credential stores inside a
//! grant are covered by empty read-only mounts. Nothing is mounted in the
//! helper's own namespace, and `/` is a slave in the keeper's, so nothing
//! propagates back to the host.
//!
//! The helper talks to its keeper over a `SOCK_SEQPACKET` socketpair: one
//! JSON request, one JSON reply, each at most [`MAX_MESSAGE_BYTES`]. The
//! keeper runs as the same user and trusts the helper's plan, but still
//! validates every path it is given (relative, no `..`, resolved beneath its
//! own staging tree without following symlinks) and re-checks the inode of
//! what it binds against the plan.
//!
//! Lifetimes: the keeper dies with the helper thread that spawned it
//! (`PR_SET_PDEATHSIG`; [`Share::start`] spawns it from a dedicated thread
//! that lives as long as the keeper), and also ends when its control socket
//! closes (the [`Share`] is dropped, or the helper dies). virtiofsd dies with
//! the keeper (`PR_SET_PDEATHSIG`, and the keeper kills it when it ends);
//! when virtiofsd dies the keeper exits, and the next request fails with
//! [`ShareError::KeeperGone`].
//!
//! Revocation limit: virtiofsd holds an `O_PATH` descriptor for every inode
//! the guest has looked up, and a detached mount stays usable through
//! them. So a released grant (or one rebound read-only after its last
//! writable holder went) stops being reachable by *new* lookups at once,
//! but what the guest already holds (an open file, a cwd, a cached dentry
//! until it expires: `--cache=auto` gives 1 s) keeps the old bind's access
//! until the guest lets go. The guest agent's per-session binds are the
//! first line there (a session's processes end with it).
//!
//! The [`Share`] API is blocking: each call is one short round trip to the
//! keeper (a few mount syscalls, bounded by [`REPLY_TIMEOUT`]). From async
//! code call it directly when a millisecond stall of the executor is
//! acceptable, or through `tokio::task::spawn_blocking` with an
//! `Arc<Share>`; `Share` is `Send + Sync` and serialises its requests.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::mounts::{MountMode, PlannedMount};

/// A control message (request or reply) is at most this many bytes.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// How long the helper waits for the keeper to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the helper waits for one reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many hidden or absent-denied paths per grant.
pub const MAX_COVERS: usize = 256;
/// A share-relative path is at most this many bytes.
const MAX_REL_BYTES: usize = 4094;
/// The keeper's control socket and listening socket, as it inherits them.
const KEEPER_CONTROL_FD: RawFd = 3;
const KEEPER_LISTEN_FD: RawFd = 4;
/// The listening socket's file name in the host's staging directory, bound
/// and unlinked before the keeper starts.
const SOCKET_NAME: &str = ".vhost-user.sock";
/// The directory under the staging tmpfs that holds the grants
/// (`socket_proto::guest::SHARE_GRANTS_DIR`).
const GRANTS_DIR: &str = socket_proto::guest::SHARE_GRANTS_DIR;
/// The empty file under the staging tmpfs that covers hidden files.
const EMPTY_FILE: &str = ".empty";

/// Why a share operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The staging directory cannot be made or is not ours.
    #[error("staging directory {}: {source}", .path.display())]
    Staging {
        /// The staging directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The vhost-user socket or the control socketpair cannot be made.
    #[error("share socket: {0}")]
    Socket(io::Error),
    /// The keeper cannot be spawned.
    #[error("cannot start the share keeper {}: {source}", .exe.display())]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The keeper did not come up; its reason, or what went wrong waiting.
    #[error("the share keeper did not start: {0}")]
    KeeperStart(String),
    /// The keeper has exited (virtiofsd died, or it was stopped).
    #[error("the share keeper is gone")]
    KeeperGone,
    /// The keeper did not answer within [`REPLY_TIMEOUT`].
    #[error("the share keeper did not answer in {:?}", REPLY_TIMEOUT)]
    Timeout,
    /// A request or reply broke the protocol.
    #[error("share keeper protocol: {0}")]
    Protocol(String),
    /// A request would be larger than [`MAX_MESSAGE_BYTES`].
    #[error("share request is {0} bytes, at most {MAX_MESSAGE_BYTES} are allowed")]
    TooLarge(usize),
    /// The grant's host path is `/` or is not UTF-8 (the share-relative
    /// path travels as a JSON string).
    #[error("{} cannot be shared (the root, or not UTF-8)", .0.display())]
    NotShareable(PathBuf),
    /// More than [`MAX_COVERS`] hidden or absent-denied paths.
    #[error("{0} paths to cover in one grant, at most {MAX_COVERS} are allowed")]
    TooManyCovers(usize),
    /// `release` of something not granted (in that mode).
    #[error("{} is not granted {}", .0.display(), .1)]
    NotGranted(PathBuf, MountMode),
    /// The keeper refused or failed the request.
    #[error("share keeper: {0}")]
    Keeper(String),
}

/// One request from the helper to its keeper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
enum Request {
    /// Bind `/<rel>` (which must still have inode `dev:ino`) at
    /// `shared/<rel>`. With `replace`, a bind already there is replaced
    /// (how a grant changes between read-only and writable: mount flags
    /// set with mount_setattr do not propagate to virtiofsd's copy, a new
    /// bind does).
    #[serde(rename_all = "camelCase")]
    Bind {
        rel: String,
        dev: u64,
        ino: u64,
        readonly: bool,
        /// Paths relative to the grant to cover with empty read-only mounts.
        hidden: Vec<String>,
        /// Paths relative to the grant to create empty and cover.
        absent_denied: Vec<AbsentWire>,
        replace: bool,
    },
    /// Detach the grant at `shared/<rel>` and its covers.
    Unbind { rel: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AbsentWire {
    rel: String,
    file: bool,
}

/// One reply from the keeper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "camelCase", deny_unknown_fields)]
enum Reply {
    /// Sent once at start: the namespace, the staging tmpfs and virtiofsd
    /// are up.
    #[serde(rename_all = "camelCase")]
    Ready { virtiofsd_pid: i32 },
    /// The request succeeded.
    Ok,
    /// The request failed, and why.
    Error { message: String },
}

/// How many grants of one host path are live, by kind, and the bind
/// request for it (the latest plan's covers and inode).
#[derive(Debug)]
struct GrantCount {
    readonly: u32,
    writable: u32,
    plan: BindPlan,
}

/// What a bind request says about one host path.
#[derive(Debug, Clone)]
struct BindPlan {
    rel: String,
    inode: (u64, u64),
    hidden: Vec<String>,
    absent_denied: Vec<AbsentWire>,
}

impl BindPlan {
    fn request(&self, readonly: bool, replace: bool) -> Request {
        Request::Bind {
            rel: self.rel.clone(),
            dev: self.inode.0,
            ino: self.inode.1,
            readonly,
            hidden: self.hidden.clone(),
            absent_denied: if readonly {
                Vec::new()
            } else {
                self.absent_denied.clone()
            },
            replace,
        }
    }
}

struct ShareState {
    control: OwnedFd,
    grants: HashMap<PathBuf, GrantCount>,
    gone: bool,
}

/// The helper's handle on a running share keeper.
pub struct Share {
    state: Mutex<ShareState>,
    staging: PathBuf,
    keeper_pid: i32,
    virtiofsd_pid: i32,
    waiter: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("staging", &self.staging)
            .field("keeper_pid", &self.keeper_pid)
            .field("virtiofsd_pid", &self.virtiofsd_pid)
            .finish()
    }
}

impl Share {
    /// Starts a share keeper (`exe share-keeper ...`) serving `staging`
    /// with the virtiofsd at `virtiofsd`, and returns the handle and the
    /// vhost-user stream already connected to virtiofsd, for the VMM
    /// (`LaunchConfig.fs.socket = {"fd": N}`).
    ///
    /// `staging` is created (0700) when missing; it must be a directory of
    /// ours, not a symlink. Blocks until the keeper is ready (at most
    /// [`READY_TIMEOUT`]).
    pub fn start(
        virtiofsd: &Path,
        exe: &Path,
        staging: &Path,
    ) -> Result<(Share, OwnedFd), ShareError> {
        prepare_staging(staging)?;
        let sock_path = staging.join(SOCKET_NAME);
        match std::fs::remove_file(&sock_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ShareError::Socket(e)),
        }
        let listener = UnixListener::bind(&sock_path).map_err(ShareError::Socket)?;
        // Connect before anyone else can: the path is in our 0700 staging
        // directory and gone again right after, and virtiofsd accepts the
        // first connection only.
        let stream = UnixStream::connect(&sock_path);
        let _ = std::fs::remove_file(&sock_path);
        let stream = stream.map_err(ShareError::Socket)?;
        let (helper_end, keeper_end) = seqpacket_pair().map_err(ShareError::Socket)?;

        let mut cmd = Command::new(exe);
        cmd.arg("share-keeper")
            .arg("--control-fd")
            .arg(KEEPER_CONTROL_FD.to_string())
            .arg("--listen-fd")
            .arg(KEEPER_LISTEN_FD.to_string())
            .arg("--staging")
            .arg(staging)
            .arg("--virtiofsd")
            .arg(virtiofsd)
            .stdin(Stdio::null());
        let control_raw = keeper_end.as_raw_fd();
        let listen_raw = listener.as_raw_fd();
        // SAFETY: getpid has no preconditions.
        let helper_pid = unsafe { libc::getpid() };
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (dup/dup2/fcntl/close/prctl/getppid/
        // _exit) on descriptors the parent keeps open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                // Move both out of the way first, so that dup2 onto 3 and 4
                // cannot close one of them.
                let control = libc::fcntl(control_raw, libc::F_DUPFD_CLOEXEC, 10);
                let listen = libc::fcntl(listen_raw, libc::F_DUPFD_CLOEXEC, 10);
                if control < 0 || listen < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::dup2(control, KEEPER_CONTROL_FD) < 0
                    || libc::dup2(listen, KEEPER_LISTEN_FD) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                libc::close(control);
                libc::close(listen);
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != helper_pid {
                    libc::_exit(1);
                }
                Ok(())
            });
        }

        // Spawn from a thread that lives exactly as long as the keeper:
        // PR_SET_PDEATHSIG fires when the spawning *thread* ends, so a
        // tokio blocking thread retiring would kill the keeper.
        let (tx, rx) = std::sync::mpsc::channel::<io::Result<i32>>();
        let waiter = std::thread::Builder::new()
            .name("share-keeper".into())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(child.id() as i32));
                match child.wait() {
                    Ok(status) if status.success() => tracing::debug!("share keeper: {status}"),
                    Ok(status) => tracing::warn!("share keeper ended: {status}"),
                    Err(e) => tracing::warn!("share keeper: wait: {e}"),
                }
            })
            .map_err(|source| ShareError::Spawn {
                exe: exe.to_path_buf(),
                source,
            })?;
        let keeper_pid = match rx.recv() {
            Ok(Ok(pid)) => pid,
            Ok(Err(source)) => {
                let _ = waiter.join();
                return Err(ShareError::Spawn {
                    exe: exe.to_path_buf(),
                    source,
                });
            }
            Err(_) => {
                let _ = waiter.join();
                return Err(ShareError::KeeperStart("spawning thread ended".into()));
            }
        };
        drop(keeper_end);
        drop(listener);

        let ready = recv_message(helper_end.as_fd(), READY_TIMEOUT).and_then(|bytes| {
            serde_json::from_slice::<Reply>(&bytes).map_err(|e| ShareError::Protocol(e.to_string()))
        });
        let virtiofsd_pid = match ready {
            Ok(Reply::Ready { virtiofsd_pid }) => virtiofsd_pid,
            other => {
                let why = match other {
                    Ok(Reply::Error { message }) => message,
                    Ok(r) => format!("unexpected first reply {r:?}"),
                    Err(ShareError::KeeperGone) => "it exited (see its log)".into(),
                    Err(e) => e.to_string(),
                };
                // Closing the control socket ends a keeper that hangs.
                drop(helper_end);
                // SAFETY: kill with a pid we spawned and have not reaped
                // (the waiter thread reaps it only after it ends).
                unsafe { libc::kill(keeper_pid, libc::SIGKILL) };
                let _ = waiter.join();
                return Err(ShareError::KeeperStart(why));
            }
        };
        tracing::info!(
            "share keeper {keeper_pid} serving {} with virtiofsd {virtiofsd_pid}",
            staging.display()
        );
        Ok((
            Share {
                state: Mutex::new(ShareState {
                    control: helper_end,
                    grants: HashMap::new(),
                    gone: false,
                }),
                staging: staging.to_path_buf(),
                keeper_pid,
                virtiofsd_pid,
                waiter: Some(waiter),
            },
            OwnedFd::from(stream),
        ))
    }

    /// The keeper's pid (its namespace holds the staging tree:
    /// `/proc/<pid>/root/<staging>`).
    pub fn keeper_pid(&self) -> i32 {
        self.keeper_pid
    }

    /// virtiofsd's pid (the keeper's child).
    pub fn virtiofsd_pid(&self) -> i32 {
        self.virtiofsd_pid
    }

    /// The staging directory.
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// Makes `m` visible to the guest at
    /// `SHARE_GUEST_ROOT/shared/<returned path>`, or adds one more holder
    /// of it. Grants are counted per host path and mode: the bind is
    /// writable while any writable grant of it is live, read-only
    /// otherwise.
    pub fn grant(&self, m: &PlannedMount) -> Result<String, ShareError> {
        let rel = share_relative(&m.host_path)?;
        let covers = m.hidden.len() + m.absent_denied.len();
        if covers > MAX_COVERS {
            return Err(ShareError::TooManyCovers(covers));
        }
        let under = |p: &Path| -> Result<String, ShareError> {
            let r = p
                .strip_prefix(&m.host_path)
                .map_err(|_| ShareError::NotShareable(p.to_path_buf()))?;
            r.to_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| ShareError::NotShareable(p.to_path_buf()))
        };
        let hidden = m
            .hidden
            .iter()
            .map(|h| under(h))
            .collect::<Result<Vec<_>, _>>()?;
        let absent = m
            .absent_denied
            .iter()
            .map(|a| {
                Ok(AbsentWire {
                    rel: under(&a.path)?,
                    file: a.file,
                })
            })
            .collect::<Result<Vec<_>, ShareError>>()?;
        let plan = BindPlan {
            rel: rel.clone(),
            inode: m.inode,
            hidden,
            absent_denied: absent,
        };
        let writable = m.mode.is_writable();
        let mut st = crate::lock(&self.state);
        let (readonly, held) = match st.grants.get(&m.host_path) {
            None => (0, 0),
            Some(c) => (c.readonly, c.writable),
        };
        let request = if readonly + held == 0 {
            Some(plan.request(!writable, false))
        } else if writable && held == 0 {
            // Read-only so far: rebind writable, with this plan's covers.
            Some(plan.request(false, true))
        } else {
            None
        };
        if let Some(req) = request {
            st.call(&req)?;
        }
        let c = st
            .grants
            .entry(m.host_path.clone())
            .or_insert_with(|| GrantCount {
                readonly: 0,
                writable: 0,
                plan: plan.clone(),
            });
        if writable {
            c.writable += 1;
            c.plan = plan;
        } else {
            c.readonly += 1;
        }
        tracing::debug!("share: granted {} {}", m.host_path.display(), m.mode);
        Ok(rel)
    }

    /// Drops one grant of `host_path` in `mode`: the bind goes when its
    /// last grant does, and is rebound read-only when its last writable one
    /// goes (if that fails it stays writable, logged).
    pub fn release(&self, host_path: &Path, mode: MountMode) -> Result<(), ShareError> {
        let rel = share_relative(host_path)?;
        let mut st = crate::lock(&self.state);
        let Some(count) = st.grants.get_mut(host_path) else {
            return Err(ShareError::NotGranted(host_path.to_path_buf(), mode));
        };
        let held = if mode.is_writable() {
            &mut count.writable
        } else {
            &mut count.readonly
        };
        if *held == 0 {
            return Err(ShareError::NotGranted(host_path.to_path_buf(), mode));
        }
        *held -= 1;
        // The count drops even if the keeper fails: a grant that cannot be
        // unbound is gone with the keeper anyway.
        let request = if count.readonly + count.writable == 0 {
            st.grants.remove(host_path);
            Request::Unbind { rel }
        } else if mode.is_writable() && count.writable == 0 {
            count.plan.request(true, true)
        } else {
            return Ok(());
        };
        let r = st.call(&request);
        if let (Err(e), Request::Bind { .. }) = (&r, &request) {
            tracing::warn!(
                "share: {} stays writable until its last grant goes: {e}",
                host_path.display()
            );
        }
        r
    }

    /// Ends the keeper (and with it virtiofsd and every grant) and waits
    /// for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            let mut st = crate::lock(&self.state);
            st.gone = true;
            // Shutting the socket down is the keeper's signal to end
            // (EOF); the descriptor itself closes with the state.
            // SAFETY: shutdown on a socket we own.
            unsafe { libc::shutdown(st.control.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(w) = self.waiter.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl ShareState {
    fn call(&mut self, req: &Request) -> Result<(), ShareError> {
        if self.gone {
            return Err(ShareError::KeeperGone);
        }
        let bytes = serde_json::to_vec(req).map_err(|e| ShareError::Protocol(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(ShareError::TooLarge(bytes.len()));
        }
        let r = send_message(self.control.as_fd(), &bytes)
            .and_then(|()| recv_message(self.control.as_fd(), REPLY_TIMEOUT));
        let bytes = match r {
            Ok(b) => b,
            Err(e) => {
                // A keeper that timed out may answer late; never read that
                // answer as the next request's.
                self.gone = true;
                return Err(e);
            }
        };
        match serde_json::from_slice::<Reply>(&bytes) {
            Ok(Reply::Ok) => Ok(()),
            Ok(Reply::Error { message }) => Err(ShareError::Keeper(message)),
            Ok(other) => {
                self.gone = true;
                Err(ShareError::Protocol(format!("unexpected reply {other:?}")))
            }
            Err(e) => {
                self.gone = true;
                Err(ShareError::Protocol(e.to_string()))
            }
        }
    }
}

/// `home/u/work` for `/home/u/work`.
fn share_relative(host_path: &Path) -> Result<String, ShareError> {
    let rel = host_path
        .strip_prefix("/")
        .map_err(|_| ShareError::NotShareable(host_path.to_path_buf()))?;
    let s = rel
        .to_str()
        .ok_or_else(|| ShareError::NotShareable(host_path.to_path_buf()))?;
    validate_rel(s).map_err(|_| ShareError::NotShareable(host_path.to_path_buf()))?;
    Ok(s.to_owned())
}

fn prepare_staging(staging: &Path) -> Result<(), ShareError> {
    let err = |source| ShareError::Staging {
        path: staging.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(staging) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    let meta = std::fs::symlink_metadata(staging).map_err(err)?;
    if !meta.is_dir() {
        return Err(err(io::Error::other("not a directory")));
    }
    if meta.uid() != crate::euid() {
        return Err(err(io::Error::other(format!(
            "owned by uid {}, not ours",
            meta.uid()
        ))));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, a live array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn send_message(fd: BorrowedFd<'_>, bytes: &[u8]) -> Result<(), ShareError> {
    loop {
        // SAFETY: send reads `bytes.len()` bytes from a live slice.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EPIPE) | Some(libc::ECONNRESET) => return Err(ShareError::KeeperGone),
            _ => return Err(ShareError::Socket(e)),
        }
    }
}

/// One message, waiting at most `timeout` (`None`: forever). An empty
/// read is the peer's end: [`ShareError::KeeperGone`].
fn recv_message(fd: BorrowedFd<'_>, timeout: Duration) -> Result<Vec<u8>, ShareError> {
    match poll_one(fd, Some(timeout)) {
        Ok(true) => {}
        Ok(false) => return Err(ShareError::Timeout),
        Err(e) => return Err(ShareError::Socket(e)),
    }
    match recv_bounded(fd) {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err(ShareError::KeeperGone),
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Err(ShareError::KeeperGone),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            Err(ShareError::Protocol(e.to_string()))
        }
        Err(e) => Err(ShareError::Socket(e)),
    }
}

/// Whether `fd` became readable (or hung up) within `timeout`.
fn poll_one(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                left.as_millis().min(i32::MAX as u128) as i32
            }
        };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd, a live local.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(true);
        }
        if r == 0 {
            return Ok(false);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Reads one datagram of at most [`MAX_MESSAGE_BYTES`]; `None` at EOF. A
/// longer one is an `InvalidData` error (and consumed).
fn recv_bounded(fd: BorrowedFd<'_>) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
    loop {
        // SAFETY: recv writes at most `buf.len()` bytes into a live buffer;
        // MSG_TRUNC makes it return the datagram's real length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        if n == 0 {
            return Ok(None);
        }
        if n > MAX_MESSAGE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message of {n} bytes, at most {MAX_MESSAGE_BYTES} are allowed"),
            ));
        }
        buf.truncate(n);
        return Ok(Some(buf));
    }
}

/// Checks a share-relative path: non-empty, relative, normal components
/// only, no NUL, at most [`MAX_REL_BYTES`].
fn validate_rel(rel: &str) -> Result<(), String> {
    if rel.is_empty() || rel.len() > MAX_REL_BYTES {
        return Err(format!("path of {} bytes", rel.len()));
    }
    if rel.contains('\0') || rel.starts_with('/') {
        return Err("absolute path or NUL".into());
    }
    if rel
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("empty, '.' or '..' component".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The keeper.

/// The keeper's command line (`coworkvm share-keeper ...`).
#[derive(Debug, Clone)]
pub struct KeeperArgs {
    /// The control socket (SOCK_SEQPACKET) from the helper.
    pub control_fd: RawFd,
    /// The listening vhost-user socket, for virtiofsd.
    pub listen_fd: RawFd,
    /// The staging directory (a tmpfs is mounted over it).
    pub staging: PathBuf,
    /// The virtiofsd executable.
    pub virtiofsd: PathBuf,
}

impl KeeperArgs {
    /// Parses `--control-fd N --listen-fd M --staging DIR --virtiofsd PATH`
    /// (any order), for callers without clap (tests).
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, String> {
        let mut it = args.into_iter();
        let (mut control, mut listen, mut staging, mut virtiofsd) = (None, None, None, None);
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("{} needs a value", flag.to_string_lossy()))?;
            let fd = |v: &OsString| {
                v.to_str()
                    .and_then(|s| s.parse::<RawFd>().ok())
                    .ok_or_else(|| format!("bad descriptor {}", v.to_string_lossy()))
            };
            match flag.to_str() {
                Some("--control-fd") => control = Some(fd(&value)?),
                Some("--listen-fd") => listen = Some(fd(&value)?),
                Some("--staging") => staging = Some(PathBuf::from(value)),
                Some("--virtiofsd") => virtiofsd = Some(PathBuf::from(value)),
                _ => return Err(format!("unknown argument {}", flag.to_string_lossy())),
            }
        }
        Ok(Self {
            control_fd: control.ok_or("--control-fd is required")?,
            listen_fd: listen.ok_or("--listen-fd is required")?,
            staging: staging.ok_or("--staging is required")?,
            virtiofsd: virtiofsd.ok_or("--virtiofsd is required")?,
        })
    }
}

/// Errors inside the keeper (reported to the helper as text).
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// A setup step failed.
    #[error("{step}: {source}")]
    Setup {
        /// What was being done.
        step: String,
        /// Why it failed.
        source: io::Error,
    },
    /// A request was refused.
    #[error("{0}")]
    Refused(String),
}

fn setup(step: impl Into<String>) -> impl FnOnce(io::Error) -> KeeperError {
    let step = step.into();
    move |source| KeeperError::Setup { step, source }
}

/// The share keeper: sets up its namespace and staging tmpfs, runs
/// virtiofsd, then serves the helper's requests until the control socket
/// closes or virtiofsd ends. Returns the process exit code. Must run in a
/// single-threaded process (unshare(CLONE_NEWUSER) requires it).
pub fn keeper_main(args: &KeeperArgs) -> i32 {
    // SAFETY: the descriptors were inherited for us (the helper dup2'd
    // them to these numbers before exec); nothing else in this process owns
    // them.
    let control = unsafe { OwnedFd::from_raw_fd(args.control_fd) };
    // SAFETY: as above.
    let listen = unsafe { OwnedFd::from_raw_fd(args.listen_fd) };
    for fd in [&control, &listen] {
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let mut keeper = match Keeper::setup(args, listen) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!("share keeper: {e}");
            let _ = send_reply(
                control.as_fd(),
                &Reply::Error {
                    message: e.to_string(),
                },
            );
            return 1;
        }
    };
    if send_reply(
        control.as_fd(),
        &Reply::Ready {
            virtiofsd_pid: keeper.virtiofsd_pid,
        },
    )
    .is_err()
    {
        keeper.kill_virtiofsd();
        return 1;
    }
    let code = keeper.serve(control.as_fd());
    keeper.kill_virtiofsd();
    code
}

fn send_reply(fd: BorrowedFd<'_>, reply: &Reply) -> Result<(), ShareError> {
    let mut bytes = serde_json::to_vec(reply).map_err(|e| ShareError::Protocol(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        bytes = serde_json::to_vec(&Reply::Error {
            message: "reply too large".into(),
        })
        .map_err(|e| ShareError::Protocol(e.to_string()))?;
    }
    send_message(fd, &bytes)
}

/// What the keeper knows about one bound grant.
#[derive(Debug)]
struct Bound {
    /// Whether the grant is a directory.
    dir: bool,
}

struct Keeper {
    /// `<staging>/shared`, O_PATH, in the tmpfs.
    shared: OwnedFd,
    /// `<staging>/.empty`, O_PATH, the empty file that covers hidden files.
    empty_file: OwnedFd,
    /// The tmpfs's st_dev: directories are created and removed only where
    /// the parent is on it, never inside a grant.
    tmpfs_dev: u64,
    virtiofsd_pid: i32,
    virtiofsd_pidfd: OwnedFd,
    reaped: bool,
    bound: HashMap<String, Bound>,
}

impl Keeper {
    fn setup(args: &KeeperArgs, listen: OwnedFd) -> Result<Self, KeeperError> {
        // SAFETY: geteuid/getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if uid != 0 {
            // SAFETY: unshare with constant flags; this process is
            // single-threaded, as CLONE_NEWUSER requires.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) } != 0 {
                return Err(setup("unshare(CLONE_NEWUSER|CLONE_NEWNS)")(
                    io::Error::last_os_error(),
                ));
            }
            std::fs::write("/proc/self/setgroups", "deny").map_err(setup("setgroups deny"))?;
            std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))
                .map_err(setup("uid_map"))?;
            std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))
                .map_err(setup("gid_map"))?;
        } else {
            // SAFETY: unshare with a constant flag.
            if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
                return Err(setup("unshare(CLONE_NEWNS)")(io::Error::last_os_error()));
            }
        }
        mount(None, c"/", None, libc::MS_REC | libc::MS_SLAVE, None)
            .map_err(setup("make / rslave"))?;
        let staging = cpath(&args.staging).map_err(setup("staging path"))?;
        mount(
            Some(c"coworkvm-share"),
            &staging,
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(c"mode=0755,size=4m,nr_inodes=16384"),
        )
        .map_err(setup("tmpfs at the staging directory"))?;
        mount(None, &staging, None, libc::MS_SHARED, None)
            .map_err(setup("make the staging tmpfs shared"))?;
        let root = open_path(libc::AT_FDCWD, &staging, libc::O_DIRECTORY)
            .map_err(setup("open the staging tmpfs"))?;
        let tmpfs_dev = fstat(root.as_fd())
            .map_err(setup("stat the staging tmpfs"))?
            .st_dev;
        create_entry(root.as_fd(), GRANTS_DIR, Entry::Dir(0o755)).map_err(setup("mkdir shared"))?;
        let shared = open_beneath(root.as_fd(), GRANTS_DIR, libc::O_DIRECTORY)
            .map_err(setup("open shared"))?;
        create_entry(root.as_fd(), EMPTY_FILE, Entry::File(0o444))
            .map_err(setup("create the cover file"))?;
        let empty_file =
            open_beneath(root.as_fd(), EMPTY_FILE, 0).map_err(setup("open the cover file"))?;
        // What virtiofsd serves is a read-only peer of the tmpfs stacked on
        // it: the guest (squashed to this user, who owns the tmpfs) cannot
        // create, rename or remove anything in the scaffolding around the
        // grants (e.g. plant a symlink where a later grant's mountpoint
        // goes). The keeper works on the writable one underneath through
        // `root` and `shared`; every mount made there propagates to the
        // peer, and from it to virtiofsd's slave copy.
        let upper =
            open_tree(root.as_fd(), OPEN_TREE_CLONE).map_err(setup("clone the staging tmpfs"))?;
        mount_setattr(
            upper.as_fd(),
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            0,
            false,
        )
        .map_err(setup("make the staging view read-only"))?;
        move_mount(upper.as_fd(), root.as_fd())
            .map_err(setup("stack the read-only staging view"))?;

        let listen_raw = listen.as_raw_fd();
        let mut cmd = Command::new(&args.virtiofsd);
        cmd.arg(format!("--fd={listen_raw}"))
            .arg("--shared-dir")
            .arg(&args.staging)
            .args(virtiofsd_flags(uid, gid))
            .stdin(Stdio::null());
        // SAFETY: getpid has no preconditions.
        let keeper_pid = unsafe { libc::getpid() };
        // SAFETY: runs between fork and exec; only async-signal-safe calls
        // (fcntl, prctl, getppid, _exit) on a descriptor we keep open until
        // spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(listen_raw, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != keeper_pid {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        tracing::debug!("share keeper: {cmd:?}");
        let child = cmd.spawn().map_err(setup(format!(
            "start virtiofsd {}",
            args.virtiofsd.display()
        )))?;
        drop(listen);
        let pid = child.id() as i32;
        // The pidfd is how the keeper watches virtiofsd; std's Child is not
        // needed (waitpid reaps it).
        std::mem::forget(child);
        // SAFETY: pidfd_open with a child pid we have not reaped.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: kill/waitpid on our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(setup("pidfd_open(virtiofsd)")(e));
        }
        // SAFETY: pidfd_open returned a new descriptor that nobody else owns.
        let virtiofsd_pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        Ok(Self {
            shared,
            empty_file,
            tmpfs_dev,
            virtiofsd_pid: pid,
            virtiofsd_pidfd,
            reaped: false,
            bound: HashMap::new(),
        })
    }

    fn kill_virtiofsd(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: our own child, not yet reaped, so the pid is still its.
        unsafe {
            libc::kill(self.virtiofsd_pid, libc::SIGKILL);
            libc::waitpid(self.virtiofsd_pid, std::ptr::null_mut(), 0);
        }
        self.reaped = true;
    }

    /// Serves requests until the control socket closes (exit 0) or
    /// virtiofsd ends (exit 1).
    fn serve(&mut self, control: BorrowedFd<'_>) -> i32 {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: control.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.virtiofsd_pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll on two live pollfds.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                tracing::error!("share keeper: poll: {e}");
                return 1;
            }
            if fds[1].revents != 0 {
                let mut status = 0;
                // SAFETY: waitpid on our own child, with a live status word.
                unsafe { libc::waitpid(self.virtiofsd_pid, &mut status, 0) };
                self.reaped = true;
                tracing::error!(
                    "share keeper: virtiofsd {} ended (wait status {status:#x})",
                    self.virtiofsd_pid
                );
                return 1;
            }
            if fds[0].revents == 0 {
                continue;
            }
            let bytes = match recv_bounded(control) {
                Ok(Some(b)) => b,
                Ok(None) => return 0,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    let _ = send_reply(
                        control,
                        &Reply::Error {
                            message: e.to_string(),
                        },
                    );
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return 0,
                Err(e) => {
                    tracing::error!("share keeper: control socket: {e}");
                    return 1;
                }
            };
            let reply = match serde_json::from_slice::<Request>(&bytes) {
                Ok(req) => match self.handle(req) {
                    Ok(()) => Reply::Ok,
                    Err(e) => {
                        tracing::warn!("share keeper: {e}");
                        Reply::Error {
                            message: e.to_string(),
                        }
                    }
                },
                Err(e) => Reply::Error {
                    message: format!("bad request: {e}"),
                },
            };
            if send_reply(control, &reply).is_err() {
                return 0;
            }
        }
    }

    fn handle(&mut self, req: Request) -> Result<(), KeeperError> {
        match req {
            Request::Bind {
                rel,
                dev,
                ino,
                readonly,
                hidden,
                absent_denied,
                replace,
            } => {
                if replace && self.bound.contains_key(&rel) {
                    self.rebind(&rel, (dev, ino), readonly, &hidden, &absent_denied)
                } else {
                    self.bind(&rel, (dev, ino), readonly, &hidden, &absent_denied)
                }
            }
            Request::Unbind { rel } => self.unbind(&rel),
        }
    }

    fn bind(
        &mut self,
        rel: &str,
        inode: (u64, u64),
        readonly: bool,
        hidden: &[String],
        absent: &[AbsentWire],
    ) -> Result<(), KeeperError> {
        validate_rel(rel).map_err(|e| KeeperError::Refused(format!("grant {rel:?}: {e}")))?;
        check_covers(
            hidden
                .iter()
                .map(String::as_str)
                .chain(absent.iter().map(|a| a.rel.as_str())),
        )?;
        if self.bound.contains_key(rel) {
            return Err(KeeperError::Refused(format!("{rel} is bound already")));
        }
        let host = format!("/{rel}");
        let source = open_path_no_symlinks(&host)
            .map_err(|e| KeeperError::Refused(format!("{host}: {e}")))?;
        let st = fstat(source.as_fd()).map_err(|e| KeeperError::Refused(format!("{host}: {e}")))?;
        if (st.st_dev, st.st_ino) != inode {
            return Err(KeeperError::Refused(format!(
                "{host} changed since it was planned (inode {}:{} is now {}:{})",
                inode.0, inode.1, st.st_dev, st.st_ino
            )));
        }
        let dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if !dir && st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(KeeperError::Refused(format!(
                "{host} is neither a directory nor a regular file"
            )));
        }
        // Grants already bound inside this one: lifted off and put back on
        // top, else the new bind would hide them.
        let children = self.top_children(rel);
        let mut lifted = Vec::with_capacity(children.len());
        for child in &children {
            let top = open_beneath(self.shared.as_fd(), child, 0)
                .map_err(|e| KeeperError::Refused(format!("lift {child}: {e}")))?;
            let clone = open_tree(top.as_fd(), OPEN_TREE_CLONE | AT_RECURSIVE)
                .map_err(|e| KeeperError::Refused(format!("clone {child}: {e}")))?;
            lifted.push((child.clone(), clone, top));
        }
        let target = self.make_mountpoint(rel, dir)?;
        let result = (|| {
            let mnt = open_tree(source.as_fd(), OPEN_TREE_CLONE)
                .map_err(|e| KeeperError::Refused(format!("clone {host}: {e}")))?;
            let mut attr = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
            if readonly {
                attr |= MOUNT_ATTR_RDONLY;
            }
            mount_setattr(mnt.as_fd(), attr, 0, false)
                .map_err(|e| KeeperError::Refused(format!("mount_setattr {host}: {e}")))?;
            move_mount(mnt.as_fd(), target.as_fd())
                .map_err(|e| KeeperError::Refused(format!("bind {host}: {e}")))?;
            Ok(())
        })();
        if let Err(e) = result {
            self.prune(rel);
            return Err(e);
        }
        // From here on a failure unbinds the grant again.
        let covered = (|| {
            let grant = open_beneath(self.shared.as_fd(), rel, 0)
                .map_err(|e| KeeperError::Refused(format!("open {rel}: {e}")))?;
            if !readonly {
                self.cover_absent(&grant, &source, &host, absent)?;
            }
            for h in hidden {
                self.cover_existing(&grant, h)?;
            }
            for (child, clone, old) in &lifted {
                detach(old.as_fd())
                    .map_err(|e| KeeperError::Refused(format!("lift {child}: {e}")))?;
                let at = open_beneath(self.shared.as_fd(), child, 0)
                    .map_err(|e| KeeperError::Refused(format!("restack {child}: {e}")))?;
                move_mount(clone.as_fd(), at.as_fd())
                    .map_err(|e| KeeperError::Refused(format!("restack {child}: {e}")))?;
            }
            Ok(())
        })();
        if let Err(e) = covered {
            if let Ok(grant) = open_beneath(self.shared.as_fd(), rel, 0) {
                let _ = detach(grant.as_fd());
            }
            self.prune(rel);
            return Err(e);
        }
        // The lifted grants' own tmpfs mountpoints are now under this bind,
        // their directories stay (shadowed) until this grant goes.
        self.bound.insert(rel.to_owned(), Bound { dir });
        tracing::info!(
            "share keeper: bound {host} ({})",
            if readonly { "ro" } else { "rw" }
        );
        Ok(())
    }

    /// Replaces the bind at `rel` with a new one: the new source is
    /// checked first, so that a swapped path leaves the old bind in place.
    fn rebind(
        &mut self,
        rel: &str,
        inode: (u64, u64),
        readonly: bool,
        hidden: &[String],
        absent: &[AbsentWire],
    ) -> Result<(), KeeperError> {
        validate_rel(rel).map_err(|e| KeeperError::Refused(format!("grant {rel:?}: {e}")))?;
        let host = format!("/{rel}");
        let source = open_path_no_symlinks(&host)
            .map_err(|e| KeeperError::Refused(format!("{host}: {e}")))?;
        let st = fstat(source.as_fd()).map_err(|e| KeeperError::Refused(format!("{host}: {e}")))?;
        if (st.st_dev, st.st_ino) != inode {
            return Err(KeeperError::Refused(format!(
                "{host} changed since it was planned; the bind there stays as it was"
            )));
        }
        self.unbind(rel)?;
        self.bind(rel, inode, readonly, hidden, absent)
    }

    fn unbind(&mut self, rel: &str) -> Result<(), KeeperError> {
        validate_rel(rel).map_err(|e| KeeperError::Refused(format!("grant {rel:?}: {e}")))?;
        if !self.bound.contains_key(rel) {
            return Err(KeeperError::Refused(format!("{rel} is not bound")));
        }
        // Grants inside this one survive it: lifted off, put back in the
        // tmpfs after.
        let children = self.top_children(rel);
        let mut lifted = Vec::with_capacity(children.len());
        for child in &children {
            let top = open_beneath(self.shared.as_fd(), child, 0)
                .map_err(|e| KeeperError::Refused(format!("lift {child}: {e}")))?;
            let clone = open_tree(top.as_fd(), OPEN_TREE_CLONE | AT_RECURSIVE)
                .map_err(|e| KeeperError::Refused(format!("clone {child}: {e}")))?;
            lifted.push((child.clone(), clone));
        }
        let grant = open_beneath(self.shared.as_fd(), rel, 0)
            .map_err(|e| KeeperError::Refused(format!("open {rel}: {e}")))?;
        detach(grant.as_fd()).map_err(|e| KeeperError::Refused(format!("unmount {rel}: {e}")))?;
        drop(grant);
        self.bound.remove(rel);
        self.prune(rel);
        let mut failed = Vec::new();
        for (child, clone) in lifted {
            let dir = self.bound.get(&child).is_none_or(|c| c.dir);
            let placed = self.make_mountpoint(&child, dir).and_then(|at| {
                match move_mount(clone.as_fd(), at.as_fd()) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        self.prune(&child);
                        Err(KeeperError::Refused(format!("restack {child}: {e}")))
                    }
                }
            });
            if let Err(e) = placed {
                tracing::error!("share keeper: {e}; that grant is gone");
                self.bound.remove(&child);
                failed.push(child);
            }
        }
        tracing::info!("share keeper: unbound /{rel}");
        if failed.is_empty() {
            Ok(())
        } else {
            Err(KeeperError::Refused(format!(
                "unbound /{rel}, but lost the grants inside it: {}",
                failed.join(", ")
            )))
        }
    }

    /// Bound grants strictly inside `rel`, outermost only.
    fn top_children(&self, rel: &str) -> Vec<String> {
        let inside: Vec<&String> = self
            .bound
            .keys()
            .filter(|k| Path::new(k.as_str()).starts_with(rel) && k.as_str() != rel)
            .collect();
        let mut top: Vec<String> = inside
            .iter()
            .filter(|k| {
                !inside.iter().any(|o| {
                    o.as_str() != k.as_str() && Path::new(k.as_str()).starts_with(o.as_str())
                })
            })
            .map(|k| (*k).clone())
            .collect();
        top.sort();
        top
    }

    /// The mountpoint `shared/<rel>`: existing components are walked
    /// without following symlinks; missing ones are created, but only in
    /// the keeper's tmpfs (inside a grant a missing mountpoint is an
    /// error: it would be created on the host). Returns the target (O_PATH).
    /// On failure what it created is pruned again.
    fn make_mountpoint(&self, rel: &str, dir: bool) -> Result<OwnedFd, KeeperError> {
        let parts: Vec<&str> = rel.split('/').collect();
        let mut created: Vec<String> = Vec::new();
        let mut cur = dup_fd(self.shared.as_fd())
            .map_err(|e| KeeperError::Refused(format!("mountpoint {rel}: {e}")))?;
        let fail = |created: &[String], msg: String| {
            if !created.is_empty() {
                self.prune(rel);
            }
            KeeperError::Refused(msg)
        };
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let sofar = parts[..=i].join("/");
            match open_beneath(cur.as_fd(), part, 0) {
                Ok(next) => {
                    cur = next;
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(fail(&created, format!("mountpoint {sofar}: {e}"))),
            }
            let parent_dev = fstat(cur.as_fd())
                .map_err(|e| fail(&created, format!("mountpoint {sofar}: {e}")))?
                .st_dev;
            if parent_dev != self.tmpfs_dev {
                return Err(fail(
                    &created,
                    format!("mountpoint {sofar} is missing inside a bound grant"),
                ));
            }
            let entry = if last && !dir {
                Entry::File(0o444)
            } else {
                Entry::Dir(0o755)
            };
            create_entry(cur.as_fd(), part, entry)
                .map_err(|e| fail(&created, format!("mountpoint {sofar}: {e}")))?;
            created.push(sofar.clone());
            cur = open_beneath(cur.as_fd(), part, 0)
                .map_err(|e| fail(&created, format!("mountpoint {sofar}: {e}")))?;
        }
        Ok(cur)
    }

    /// Removes the mountpoint scaffolding of `shared/<rel>` that is left
    /// unused: `rel` itself and then each ancestor, innermost first, while
    /// it is in the tmpfs (its parent is on it), empty and not a
    /// mountpoint (the kernel refuses the last two). Never touches a
    /// directory inside a grant.
    fn prune(&self, rel: &str) {
        let parts: Vec<&str> = rel.split('/').collect();
        for depth in (1..=parts.len()).rev() {
            let name = parts[depth - 1];
            let parent_fd = if depth == 1 {
                dup_fd(self.shared.as_fd())
            } else {
                open_beneath(self.shared.as_fd(), &parts[..depth - 1].join("/"), 0)
            };
            let Ok(parent_fd) = parent_fd else {
                return;
            };
            if fstat(parent_fd.as_fd()).map(|s| s.st_dev).ok() != Some(self.tmpfs_dev) {
                return;
            }
            let Ok(cname) = CString::new(name) else {
                return;
            };
            // SAFETY: unlinkat with a live directory descriptor and C string.
            let r = unsafe {
                libc::unlinkat(parent_fd.as_raw_fd(), cname.as_ptr(), libc::AT_REMOVEDIR)
            };
            if r != 0 {
                let leaf_file = depth == parts.len()
                    && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTDIR);
                if !leaf_file {
                    return;
                }
                // SAFETY: as above; a file mountpoint (the leaf only).
                if unsafe { libc::unlinkat(parent_fd.as_raw_fd(), cname.as_ptr(), 0) } != 0 {
                    return;
                }
            }
        }
    }

    /// Covers `rel` (relative to the grant) with an empty read-only mount:
    /// a tmpfs for a directory, the empty file for anything else.
    fn cover_existing(&self, grant: &OwnedFd, rel: &str) -> Result<(), KeeperError> {
        let target = match open_beneath(grant.as_fd(), rel, 0) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                // A symlink now: the guest resolves it in its own tree, so
                // it cannot lead into the store; nothing to cover.
                tracing::warn!("share keeper: {rel} is a symlink now; not covered");
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(KeeperError::Refused(format!("cover {rel}: {e}"))),
        };
        let st =
            fstat(target.as_fd()).map_err(|e| KeeperError::Refused(format!("cover {rel}: {e}")))?;
        self.cover(target.as_fd(), st.st_mode & libc::S_IFMT == libc::S_IFDIR)
            .map_err(|e| KeeperError::Refused(format!("cover {rel}: {e}")))
    }

    fn cover(&self, target: BorrowedFd<'_>, dir: bool) -> io::Result<()> {
        let at = proc_fd_path(target);
        if dir {
            mount(
                Some(c"coworkvm-cover"),
                &at,
                Some(c"tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(c"mode=0500,size=4k,nr_inodes=2"),
            )
        } else {
            let mnt = open_tree(self.empty_file.as_fd(), OPEN_TREE_CLONE)?;
            mount_setattr(
                mnt.as_fd(),
                MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                0,
                false,
            )?;
            move_mount(mnt.as_fd(), target)
        }
    }

    /// For a writable grant of `host` (`source`, O_PATH of the host
    /// directory; `grant`, the bind's root): creates each absent denied
    /// path's first missing component on the host (an empty 0700 directory,
    /// or an empty 0600 file when that is the entry's last component and
    /// the entry is a file) and covers it in the bind.
    fn cover_absent(
        &self,
        grant: &OwnedFd,
        source: &OwnedFd,
        host: &str,
        absent: &[AbsentWire],
    ) -> Result<(), KeeperError> {
        // What this call covered: an entry inside it is hidden already
        // (and its path no longer resolves in the bind).
        let mut covered: Vec<String> = Vec::new();
        for a in absent {
            if covered
                .iter()
                .any(|c| Path::new(&a.rel).starts_with(c.as_str()))
            {
                continue;
            }
            let parts: Vec<&str> = a.rel.split('/').collect();
            let mut cur = dup_fd(source.as_fd())
                .map_err(|e| KeeperError::Refused(format!("cover {}: {e}", a.rel)))?;
            let mut done = false;
            for (i, part) in parts.iter().enumerate() {
                match open_beneath(cur.as_fd(), part, 0) {
                    Ok(next) => {
                        cur = next;
                        continue;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                        // A symlink on the way: the guest resolves it in
                        // its own tree, not into the host store.
                        tracing::warn!(
                            "share keeper: {host}/{} has a symlink on the way; not covered",
                            a.rel
                        );
                        done = true;
                        break;
                    }
                    Err(e) => return Err(KeeperError::Refused(format!("cover {}: {e}", a.rel))),
                }
                let file = a.file && i + 1 == parts.len();
                let made = parts[..=i].join("/");
                let entry = if file {
                    Entry::File(0o600)
                } else {
                    Entry::Dir(0o700)
                };
                create_entry(cur.as_fd(), part, entry).map_err(|e| {
                    KeeperError::Refused(format!("create {host}/{made} to cover it: {e}"))
                })?;
                tracing::info!(
                    "share keeper: created empty {host}/{made} ({}) so that the guest cannot create the credential store {host}/{}",
                    if file { "file 0600" } else { "directory 0700" },
                    a.rel
                );
                let target = open_beneath(grant.as_fd(), &made, 0)
                    .map_err(|e| KeeperError::Refused(format!("cover {made}: {e}")))?;
                self.cover(target.as_fd(), !file)
                    .map_err(|e| KeeperError::Refused(format!("cover {made}: {e}")))?;
                covered.push(made);
                done = true;
                break;
            }
            if !done {
                // Exists by now (made by the user since the plan): cover it.
                self.cover_existing(grant, &a.rel)?;
            }
        }
        Ok(())
    }
}

fn check_covers<'a>(rels: impl Iterator<Item = &'a str>) -> Result<(), KeeperError> {
    for (n, r) in rels.enumerate() {
        if n >= MAX_COVERS {
            return Err(KeeperError::Refused(format!(
                "more than {MAX_COVERS} paths to cover"
            )));
        }
        validate_rel(r).map_err(|e| KeeperError::Refused(format!("cover {r:?}: {e}")))?;
    }
    Ok(())
}

impl crate::grants::ShareBackend for Share {
    fn grant(&self, m: &PlannedMount) -> Result<String, String> {
        Share::grant(self, m).map_err(|e| e.to_string())
    }

    fn release(&self, m: &PlannedMount) {
        if let Err(e) = Share::release(self, &m.host_path, m.mode) {
            tracing::warn!("releasing {}: {e}", m.host_path.display());
        }
    }
}

/// The production [`crate::vm::ShareLauncher`]: virtiofsd found by
/// [`crate::virtiofsd::resolve`], the keeper re-executed from `exe`
/// (`coworkvm share-keeper`), its staging directory `RUNDIR/share`.
pub struct KeeperShareLauncher {
    /// The `coworkvm` binary.
    pub exe: std::path::PathBuf,
}

impl crate::vm::ShareLauncher for KeeperShareLauncher {
    fn start(
        &self,
        run_dir: &std::path::Path,
        virtiofsd: Option<&std::path::Path>,
    ) -> Result<(std::sync::Arc<dyn crate::grants::ShareBackend>, OwnedFd), String> {
        let v = crate::virtiofsd::resolve(virtiofsd).map_err(|e| e.to_string())?;
        let (share, stream) =
            Share::start(&v.path, &self.exe, &run_dir.join("share")).map_err(|e| e.to_string())?;
        tracing::info!(
            "shared folders: virtiofsd {}.{}.{} at {}, keeper pid {}",
            v.version.0,
            v.version.1,
            v.version.2,
            v.path.display(),
            share.keeper_pid()
        );
        Ok((std::sync::Arc::new(share), stream))
    }
}

/// virtiofsd's flags for the share (the keeper's command line).
pub use socket_proto::guest::virtiofsd_flags;

// ---------------------------------------------------------------------------
// Syscall wrappers.

const OPEN_TREE_CLONE: u32 = 1;
const OPEN_TREE_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
const AT_RECURSIVE: u32 = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: u32 = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn openat2(dirfd: RawFd, path: &CStr, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    loop {
        // SAFETY: openat2 reads a live C string and an open_how of the
        // size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a new descriptor, owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) && e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// `O_PATH | O_NOFOLLOW | extra` of an absolute path, no symlink anywhere
/// on the way.
fn open_path_no_symlinks(path: &str) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    openat2(
        libc::AT_FDCWD,
        &c,
        libc::O_PATH | libc::O_NOFOLLOW,
        RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    )
}

fn open_path(dirfd: RawFd, path: &CStr, extra: i32) -> io::Result<OwnedFd> {
    openat2(dirfd, path, libc::O_PATH | libc::O_NOFOLLOW | extra, 0)
}

/// `O_PATH` of `rel` beneath `dir`, without following symlinks.
fn open_beneath(dir: BorrowedFd<'_>, rel: &str, extra: i32) -> io::Result<OwnedFd> {
    let c = CString::new(rel).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    openat2(
        dir.as_raw_fd(),
        &c,
        libc::O_PATH | libc::O_NOFOLLOW | extra,
        RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    )
}

fn dup_fd(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into a live local.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let p = |c: Option<&CStr>| c.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: mount reads live C strings (or null where allowed).
    let r = unsafe { libc::mount(p(source), target.as_ptr(), p(fstype), flags, p(data).cast()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_tree(fd: BorrowedFd<'_>, flags: u32) -> io::Result<OwnedFd> {
    // SAFETY: open_tree reads a live empty C string; AT_EMPTY_PATH makes
    // it act on `fd`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags | OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// What [`create_entry`] makes.
#[derive(Clone, Copy)]
enum Entry {
    Dir(libc::mode_t),
    File(libc::mode_t),
}

/// Creates `name` in `dir` (a new directory or an empty file, never
/// following or reusing what is there: `O_EXCL | O_NOFOLLOW`).
fn create_entry(dir: BorrowedFd<'_>, name: &str, entry: Entry) -> io::Result<()> {
    let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    match entry {
        Entry::Dir(mode) => {
            // SAFETY: mkdirat with a live directory descriptor and C string.
            if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Entry::File(mode) => {
            // SAFETY: openat with a live directory descriptor and C string.
            let fd = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_WRONLY
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    libc::c_uint::from(mode),
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: just opened, owned by nobody else.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    Ok(())
}

fn move_mount(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: move_mount reads two live empty C strings; the EMPTY_PATH
    // flags make it act on the descriptors.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            from.as_raw_fd(),
            c"".as_ptr(),
            to.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn mount_setattr(fd: BorrowedFd<'_>, set: u64, clear: u64, recursive: bool) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH as u32;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: mount_setattr reads a live empty C string and a mount_attr
    // of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lazily unmounts the mount whose root `fd` is (and everything under it).
fn detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let at = proc_fd_path(fd);
    // SAFETY: umount2 reads a live C string.
    if unsafe { libc::umount2(at.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_relative_paths() {
        assert_eq!(
            share_relative(Path::new("/home/u/work")).unwrap(),
            "home/u/work"
        );
        assert!(share_relative(Path::new("/")).is_err());
        assert!(share_relative(Path::new("home/u")).is_err());
        assert!(share_relative(Path::new("/home/../etc")).is_err());
    }

    #[test]
    fn rel_paths_are_validated() {
        for ok in ["a", "a/b", ".ssh", "a/.b/c..d"] {
            assert!(validate_rel(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/a", "a/../b", "..", ".", "a//b", "a/", "a\0b"] {
            assert!(validate_rel(bad).is_err(), "{bad:?}");
        }
        assert!(validate_rel(&"a".repeat(MAX_REL_BYTES + 1)).is_err());
    }

    #[test]
    fn keeper_args_parse() {
        let a = KeeperArgs::parse(
            [
                "--control-fd",
                "3",
                "--listen-fd",
                "4",
                "--staging",
                "/s",
                "--virtiofsd",
                "/v",
            ]
            .map(OsString::from),
        )
        .unwrap();
        assert_eq!((a.control_fd, a.listen_fd), (3, 4));
        assert!(KeeperArgs::parse(["--control-fd"].map(OsString::from)).is_err());
        assert!(KeeperArgs::parse(["--bogus", "1"].map(OsString::from)).is_err());
    }

    #[test]
    fn requests_refuse_unknown_fields_and_bounded_messages_are_enforced() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"unbind","rel":"a","x":1}"#).is_err());
        let (a, b) = seqpacket_pair().unwrap();
        send_message(a.as_fd(), &vec![b'x'; MAX_MESSAGE_BYTES + 1]).unwrap();
        let e = recv_message(b.as_fd(), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ShareError::Protocol(_)), "{e:?}");
        send_message(a.as_fd(), b"{}").unwrap();
        assert_eq!(
            recv_message(b.as_fd(), Duration::from_secs(1)).unwrap(),
            b"{}"
        );
        drop(a);
        assert!(matches!(
            recv_message(b.as_fd(), Duration::from_secs(1)),
            Err(ShareError::KeeperGone)
        ));
    }

    #[test]
    fn virtiofsd_flags_match_the_contract() {
        let f = virtiofsd_flags(1000, 1001).join(" ");
        assert_eq!(
            f,
            "--sandbox=namespace --inode-file-handles=never --cache=auto --announce-submounts \
             --translate-uid=squash-guest:0:1000:4294967295 --translate-gid=squash-guest:0:1001:4294967295 \
             --translate-uid=host:1000:60000:1 --translate-gid=host:1001:60000:1"
        );
    }
}
