//! The client socket: binding it safely, accepting connections, and the
//! three kinds of connection (one-shot, persistent pipe, event stream).
//!
//! Every connection is handled the same way: frames are read one at a time;
//! each request runs as its own task (so a slow `startVM` never holds up an
//! `isRunning` on the same pipe) and its reply goes out through the
//! connection's writer task, under the request's `id` when it had one. A
//! `subscribeEvents` request is acknowledged and turns the connection into
//! an event stream as well. At end of input the connection finishes the
//! replies in flight, then closes (a one-shot client half-closes after its
//! request and still gets its reply).

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use socket_proto::frame::{encode_frame, FrameError};
use socket_proto::host::{HostMethod, HostRequest};
use socket_proto::Response;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::events::{Next, Subscription};
use super::{euid, Helper};

/// Connections served at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 1024;
/// Requests in flight per connection before the helper stops reading it.
pub const MAX_IN_FLIGHT: usize = 32;
/// Frames queued for one connection's writer.
const WRITE_QUEUE: usize = 64;

/// Why the helper cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A live helper answers on the socket already.
    #[error("another helper is serving {0}")]
    AlreadyServing(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    /// The socket's directory belongs to someone else.
    #[error("the socket directory {0} is not owned by uid {1}")]
    ForeignDirectory(PathBuf, u32),
    /// A file operation failed.
    #[error("{0} {1}: {2}")]
    Io(&'static str, PathBuf, #[source] io::Error),
}

/// The bound client socket. Dropping it does not remove the file; use
/// [`Listener::remove`].
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
    /// The inode of the socket file this helper bound; `None` for a socket
    /// it inherited (systemd's), which it never removes.
    ino: Option<u64>,
    /// Stop after this long with no VM and no connection.
    idle_exit: Option<Duration>,
}

/// Binds `path`: its directory is created 0700 when missing (and must be
/// ours), a stale socket (nobody answers a connect) is replaced, a live one
/// is refused ([`ServeError::AlreadyServing`]), and the socket is made 0600.
/// Must be called inside a tokio runtime.
pub fn bind(path: &Path) -> Result<Listener, ServeError> {
    fn io<'a>(what: &'static str, p: &'a Path) -> impl FnOnce(io::Error) -> ServeError + 'a {
        move |e| ServeError::Io(what, p.to_owned(), e)
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io("creating", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("securing", &dir))?;
    }
    let meta = std::fs::metadata(&dir).map_err(io("inspecting", &dir))?;
    let uid = euid();
    if meta.uid() != uid {
        return Err(ServeError::ForeignDirectory(dir, uid));
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(
            "the socket directory {} is mode {:o}; the client expects 0700",
            dir.display(),
            meta.mode() & 0o777
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::AlreadyServing(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("replacing the stale socket {}", path.display());
                std::fs::remove_file(path).map_err(io("removing the stale socket", path))?;
            }
            Err(e) => return Err(ServeError::Io("probing", path.to_owned(), e)),
        },
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ServeError::Io("inspecting", path.to_owned(), e)),
    }
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        // Another helper bound it between our check and our bind.
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            return Err(ServeError::AlreadyServing(path.to_owned()))
        }
        Err(e) => return Err(ServeError::Io("binding", path.to_owned(), e)),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("securing", path))?;
    let ino = std::fs::metadata(path)
        .map_err(io("inspecting", path))?
        .ino();
    Ok(Listener {
        listener,
        path: path.to_owned(),
        ino: Some(ino),
        idle_exit: None,
    })
}

impl Listener {
    /// Serves a listening socket that systemd bound and passed (socket
    /// activation). The file stays when the helper stops: it is systemd's,
    /// and the next connection starts the helper again. Must be called
    /// inside a tokio runtime.
    pub fn inherited(sock: super::activation::InheritedSocket) -> Result<Listener, ServeError> {
        let std_listener = std::os::unix::net::UnixListener::from(sock.fd);
        std_listener
            .set_nonblocking(true)
            .map_err(|e| ServeError::Io("using the inherited socket", sock.path.clone(), e))?;
        let listener = UnixListener::from_std(std_listener)
            .map_err(|e| ServeError::Io("using the inherited socket", sock.path.clone(), e))?;
        Ok(Listener {
            listener,
            path: sock.path,
            ino: None,
            idle_exit: None,
        })
    }

    /// Makes [`Listener::run`] return after `idle` with no VM and no open
    /// connection (`None`: never).
    pub fn with_idle_exit(mut self, idle: Option<Duration>) -> Self {
        self.idle_exit = idle.filter(|d| !d.is_zero());
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the socket was passed by systemd rather than bound here.
    pub fn is_inherited(&self) -> bool {
        self.ino.is_none()
    }

    /// Removes the socket file, if it still is the one this helper bound
    /// (never an inherited one).
    pub fn remove(&self) {
        let Some(ino) = self.ino else { return };
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Serves connections until `shutdown` resolves (or, with an idle exit,
    /// until nothing happened for that long); then stops the VM and removes
    /// the socket file if this helper bound it.
    pub async fn run(self, helper: Arc<Helper>, shutdown: impl Future<Output = ()>) {
        if self.is_inherited() {
            tracing::info!("serving {} (passed by systemd)", self.path.display());
        } else {
            tracing::info!("serving {}", self.path.display());
        }
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let uid = euid();
        // Idle: no connection open and no VM, checked every `tick`, so the
        // helper stops between `idle` and `idle + tick` after it went idle.
        let tick = self
            .idle_exit
            .map(|d| (d / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)))
            .unwrap_or(Duration::from_secs(3600));
        let mut last_busy = tokio::time::Instant::now();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                a = self.listener.accept() => a,
                _ = tokio::time::sleep(tick), if self.idle_exit.is_some() => {
                    let busy = slots.available_permits() < MAX_CONNECTIONS || helper.vm.has_vm();
                    let now = tokio::time::Instant::now();
                    if busy {
                        last_busy = now;
                    } else if let Some(idle) = self.idle_exit {
                        if now.duration_since(last_busy) >= idle {
                            tracing::info!(
                                "idle for {} s (no VM, no connection): stopping{}",
                                idle.as_secs_f64(),
                                if self.is_inherited() {
                                    "; the socket stays, the next connection starts the helper again"
                                } else {
                                    ""
                                }
                            );
                            break;
                        }
                    }
                    continue;
                }
            };
            last_busy = tokio::time::Instant::now();
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(c) if c.uid() == uid => {}
                Ok(c) => {
                    tracing::warn!(
                        "refused a connection from uid {} (pid {:?}): only uid {uid} may use this helper",
                        c.uid(),
                        c.pid()
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!("refused a connection without peer credentials: {e}");
                    continue;
                }
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!("refused a connection: {MAX_CONNECTIONS} already open");
                continue;
            };
            let helper = helper.clone();
            tokio::spawn(async move {
                serve_connection(helper, stream).await;
                drop(slot);
            });
        }
        tracing::info!("shutting down");
        helper.vm.shutdown().await;
        self.remove();
    }
}

enum Out {
    Frame(Vec<u8>),
    /// From now on, also write this subscription's events.
    Subscribe(Subscription),
}

fn encode_response(r: &Response) -> Vec<u8> {
    encode_frame(r).unwrap_or_else(|e| {
        // A result over the frame limit (a huge readFile): say so instead.
        let fallback = Response::err(r.id.clone(), format!("the reply cannot be sent: {e}"));
        encode_frame(&fallback).unwrap_or_default()
    })
}

/// One client connection, whatever its kind.
pub async fn serve_connection(helper: Arc<Helper>, stream: UnixStream) {
    let (mut rd, mut wr) = stream.into_split();
    let (out, mut out_rx) = mpsc::channel::<Out>(WRITE_QUEUE);
    let writer = tokio::spawn(async move {
        let mut events: Option<Subscription> = None;
        loop {
            let next_event = async {
                match &events {
                    Some(sub) => sub.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Replies first: a flood of events does not delay them.
                biased;
                o = out_rx.recv() => match o {
                    Some(Out::Frame(b)) => {
                        if wr.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                    Some(Out::Subscribe(sub)) => events = Some(sub),
                    None => break,
                },
                n = next_event => match n {
                    Next::Event(f) => {
                        let Some(sub) = &events else { break };
                        // A client that stops reading blocks this write;
                        // going over the budget meanwhile ends it.
                        let written = tokio::select! {
                            r = wr.write_all(&f) => r.is_ok(),
                            budget = sub.dropped() => {
                                tracing::warn!(
                                    "closing an event subscriber that fell over {budget} bytes \
                                     behind; it resubscribes"
                                );
                                false
                            }
                        };
                        sub.written(f.len());
                        if !written {
                            break;
                        }
                    }
                    Next::Overflowed { budget } => {
                        tracing::warn!(
                            "closing an event subscriber that fell over {budget} bytes behind; \
                             it resubscribes"
                        );
                        break;
                    }
                },
            }
        }
        let _ = wr.shutdown().await;
    });
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut subscribed = false;
    loop {
        let obj = match super::wire::read_frame(&mut rd).await {
            Ok(Some(obj)) => obj,
            Ok(None) => break,
            Err(e) => {
                let fatal = !e.is_recoverable();
                if !matches!(e, FrameError::Truncated | FrameError::Io(_)) {
                    tracing::debug!("bad frame from a client: {e}");
                    let _ = out
                        .send(Out::Frame(encode_response(&Response::err(
                            None,
                            e.to_string(),
                        ))))
                        .await;
                }
                if fatal {
                    break;
                }
                continue;
            }
        };
        let req = match HostRequest::from_object(obj) {
            Ok(r) => r,
            Err(bad) => {
                tracing::debug!("bad request: {bad}");
                let _ = out
                    .send(Out::Frame(encode_response(&bad.to_response())))
                    .await;
                continue;
            }
        };
        if let HostMethod::SubscribeEvents(p) = &req.method {
            let _ = out.send(Out::Frame(encode_response(&req.ok()))).await;
            if !subscribed {
                subscribed = true;
                tracing::info!(
                    "event subscriber connected ({})",
                    p.user_data_name.as_deref().unwrap_or("no profile")
                );
                // Ack first (above), then the current state, then every
                // event: the subscription's queue starts with the state.
                let _ = out.send(Out::Subscribe(helper.events.subscribe())).await;
            }
            continue;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let helper = helper.clone();
        let out = out.clone();
        tasks.spawn(async move {
            let reply = super::methods::dispatch(&helper, req).await;
            let _ = out.send(Out::Frame(encode_response(&reply))).await;
            drop(permit);
        });
        // Reap finished tasks so a long pipe does not accumulate them.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    if subscribed {
        // The client closed its side: it is gone (the client never
        // half-closes an event stream).
        tracing::info!("event subscriber disconnected");
    }
    drop(out);
    let _ = writer.await;
}
