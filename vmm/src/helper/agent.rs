//! The connection to the guest agent: `RUNDIR/vsock.sock_51234`, where the
//! VMM's hybrid vsock delivers the agent's dial to CID 2 port 51234.
//!
//! One [`Agent`] per VM. It accepts the agent's connections (the agent
//! redials whenever its connection drops; the newest connection wins),
//! correlates requests and responses by id, turns guest events into client
//! events on the [`EventHub`], and tracks which processes run so that a VM
//! that dies can still report an `exit` for each of them.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use socket_proto::frame::{encode_frame, FrameError};
use socket_proto::guest::{
    flatten_event, GuestError, GuestEvent, GuestFrame, GuestNotification, GuestRequest,
    HostProxyConfig,
};
use socket_proto::redact::Redacted;
use socket_proto::ClientEvent;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::events::{EventHub, CONNECTED, NOT_CONNECTED};
use super::wire::read_frame;

/// How long a forwarded request may wait for the agent's answer (the client
/// itself gives up after 30 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Frames queued for the agent before a sender waits (back-pressure).
const WRITE_QUEUE: usize = 256;

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No agent connection.
    #[error("the guest is not connected")]
    NotConnected,
    /// The connection dropped before the answer came.
    #[error("the guest agent disconnected before answering {0}")]
    Disconnected(String),
    /// No answer in time.
    #[error("the guest agent did not answer {0} within {1:?}")]
    Timeout(String, Duration),
    /// The agent answered with an error (its text, as the client sees it).
    #[error("{}", .0.message())]
    Guest(GuestError),
    /// The frame could not be encoded (too large, for one).
    #[error("cannot send to the guest: {0}")]
    Encode(#[from] FrameError),
}

type Pending = oneshot::Sender<Result<Value, GuestError>>;

struct Conn {
    generation: u64,
    tx: mpsc::Sender<Vec<u8>>,
}

/// The helper's side of the guest protocol, for one VM.
pub struct Agent {
    events: Arc<EventHub>,
    conn: Mutex<Option<Conn>>,
    connected: watch::Sender<bool>,
    pending: Mutex<HashMap<String, Pending>>,
    next_id: AtomicU64,
    generation: AtomicU64,
    running: Mutex<BTreeSet<String>>,
    /// `hostProxyConfig` to send after `ready` (from `startVM`'s `apiProbeURL`).
    proxy_config: Option<HostProxyConfig>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// An agent with no connection yet.
    pub fn new(events: Arc<EventHub>, proxy_config: Option<HostProxyConfig>) -> Arc<Self> {
        Arc::new(Self {
            events,
            conn: Mutex::new(None),
            connected: watch::Sender::new(false),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            running: Mutex::new(BTreeSet::new()),
            proxy_config,
        })
    }

    /// Listens on `path` (a stale file there is replaced). Call before the
    /// VMM starts, so the agent's first dial finds a listener.
    pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        UnixListener::bind(path)
    }

    /// Accepts the agent's connections until aborted.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let uid = super::euid();
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("accepting the guest agent: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                match stream.peer_cred() {
                    Ok(c) if c.uid() == uid => {}
                    Ok(c) => {
                        tracing::warn!(
                            "refused a vsock connection from uid {} (not ours)",
                            c.uid()
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("refused a vsock connection: no peer credentials: {e}");
                        continue;
                    }
                }
                let me = me.clone();
                tokio::spawn(async move { me.run_connection(stream).await });
            }
        })
    }

    /// True between the agent's `ready` and the loss of its connection.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until the agent is ready, or `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Forgets the running processes and returns them (the VM is gone).
    pub fn take_running_processes(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.running))
            .into_iter()
            .collect()
    }

    /// Records a process about to be spawned. Before the request goes out:
    /// a fast process's `exit` can arrive right behind the spawn's reply,
    /// and must find it here to remove.
    pub fn process_starting(&self, id: &str) {
        lock(&self.running).insert(id.to_owned());
    }

    /// Forgets a process whose spawn failed.
    pub fn process_not_started(&self, id: &str) {
        lock(&self.running).remove(id);
    }

    /// Drops the current connection (the VM is gone): pending requests fail
    /// and `isGuestConnected` turns false.
    pub fn disconnect(&self) {
        let generation = lock(&self.conn).as_ref().map(|c| c.generation);
        if let Some(g) = generation {
            self.connection_lost(g);
        }
    }

    async fn send_bytes(&self, bytes: Vec<u8>) -> Result<(), AgentError> {
        let tx = lock(&self.conn)
            .as_ref()
            .map(|c| c.tx.clone())
            .ok_or(AgentError::NotConnected)?;
        tx.send(bytes).await.map_err(|_| AgentError::NotConnected)
    }

    /// Sends one frame as it is.
    pub async fn send_frame(&self, frame: &GuestFrame) -> Result<(), AgentError> {
        self.send_bytes(encode_frame(frame)?).await
    }

    /// Sends a notification (no reply).
    pub async fn notify(&self, n: &GuestNotification) -> Result<(), AgentError> {
        self.send_frame(&GuestFrame::notification(n)).await
    }

    /// Sends a request and waits for its response's `result`.
    pub async fn request(
        &self,
        req: &GuestRequest,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let id = format!("h{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let bytes = encode_frame(&GuestFrame::from_request(id.clone(), req))?;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id.clone(), tx);
        if let Err(e) = self.send_bytes(bytes).await {
            lock(&self.pending).remove(&id);
            return Err(e);
        }
        let method = req.name().to_owned();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(AgentError::Guest(e)),
            Ok(Err(_)) => Err(AgentError::Disconnected(method)),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(AgentError::Timeout(method, timeout))
            }
        }
    }

    async fn run_connection(self: Arc<Self>, stream: UnixStream) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
        let replaced = lock(&self.conn).replace(Conn { generation, tx });
        if let Some(old) = replaced {
            tracing::info!("the guest agent reconnected; dropping its old connection");
            self.fail_pending();
            drop(old);
        }
        tracing::info!("guest agent connected (connection {generation})");
        let writer = tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if let Err(e) = wr.write_all(&bytes).await {
                    tracing::debug!("writing to the guest agent: {e}");
                    break;
                }
            }
        });
        loop {
            match read_frame(&mut rd).await {
                Ok(Some(obj)) => match GuestFrame::parse(obj) {
                    Ok(Some(frame)) => self.handle(frame),
                    Ok(None) => tracing::warn!("ignoring a guest frame without a type"),
                    Err(e) => tracing::warn!("ignoring a bad guest frame: {e}"),
                },
                Ok(None) => break,
                Err(e) if e.is_recoverable() => tracing::warn!("bad frame from the guest: {e}"),
                Err(e) => {
                    tracing::warn!("guest agent connection broken: {e}");
                    break;
                }
            }
        }
        writer.abort();
        self.connection_lost(generation);
    }

    fn fail_pending(&self) {
        // Dropping the senders wakes every waiter with "disconnected".
        lock(&self.pending).clear();
    }

    fn connection_lost(&self, generation: u64) {
        let mut conn = lock(&self.conn);
        if conn.as_ref().map(|c| c.generation) != Some(generation) {
            return; // an older connection; a newer one is current
        }
        *conn = None;
        drop(conn);
        self.fail_pending();
        if self.connected.send_replace(false) {
            tracing::info!("guest agent disconnected");
            self.events.set_network_status(NOT_CONNECTED);
        }
    }

    fn handle(self: &Arc<Self>, frame: GuestFrame) {
        match frame {
            GuestFrame::Response { id, result, error } => {
                let Some(waiter) = lock(&self.pending).remove(id.as_str()) else {
                    tracing::debug!("a guest response to unknown request {id}");
                    return;
                };
                let _ = waiter.send(match error {
                    Some(e) => Err(e),
                    None => Ok(result.unwrap_or(Value::Null)),
                });
            }
            GuestFrame::Event { event, params } => self.handle_event(event, params),
            f @ GuestFrame::Request { .. } => {
                tracing::debug!("guest request for the client: {}", Redacted(&f));
                if let Some(obj) = f.to_client_frame() {
                    self.events.publish(obj);
                }
            }
            GuestFrame::Notification { method, .. } => {
                tracing::debug!("ignoring a notification {method} from the guest");
            }
        }
    }

    fn handle_event(self: &Arc<Self>, event: String, params: Value) {
        // Output is the hot path and the helper only passes it on: no typed
        // parse (a copy of every chunk) for it.
        if event != "stdout" && event != "stderr" {
            self.observe(&event, params.clone());
        }
        // `ready` is the helper's own; it flattens to nothing.
        if let Some(obj) = flatten_event(&event, &params) {
            self.events.publish(obj);
        }
    }

    /// What the helper itself does with a guest event: state and logs.
    fn observe(self: &Arc<Self>, event: &str, params: Value) {
        match GuestEvent::parse(event, params) {
            Ok(GuestEvent::Ready) => {
                if !self.connected.send_replace(true) {
                    tracing::info!("guest agent ready");
                    if self.events.network_status() == NOT_CONNECTED {
                        self.events.set_network_status(CONNECTED);
                    }
                    let me = self.clone();
                    tokio::spawn(async move { me.after_ready().await });
                }
            }
            Ok(GuestEvent::Exit {
                id, code, signal, ..
            }) => {
                lock(&self.running).remove(&id);
                match (code, signal) {
                    (Some(c), _) => tracing::info!("process {id} exited with code {c}"),
                    (None, Some(s)) => tracing::info!("process {id} ended by signal {s}"),
                    (None, None) => tracing::info!("process {id} exited"),
                }
            }
            Ok(GuestEvent::Error { id, message, fatal }) => {
                if fatal == Some(true) {
                    if let Some(id) = &id {
                        lock(&self.running).remove(id);
                    }
                }
                let about = id.map(|i| format!(" (process {i})")).unwrap_or_default();
                tracing::warn!("guest error{about}: {message}");
            }
            Ok(GuestEvent::StartupStep { step, status }) => {
                tracing::info!("guest start-up step {step}: {status}");
            }
            Ok(GuestEvent::NetworkStatus { status }) => {
                tracing::info!("guest network status: {status}")
            }
            Ok(GuestEvent::ApiReachability { status }) => {
                tracing::info!("guest API reachability: {status}")
            }
            Ok(GuestEvent::Stdout { .. } | GuestEvent::Stderr { .. }) => {}
            Err(e) => tracing::debug!("passing on a guest event this helper does not know: {e}"),
        }
    }

    async fn after_ready(self: Arc<Self>) {
        if let Some(cfg) = &self.proxy_config {
            let n = GuestNotification::HostProxyConfig(cfg.clone());
            if let Err(e) = self.notify(&n).await {
                tracing::debug!("hostProxyConfig: {e}");
            }
        }
        match self
            .request(&GuestRequest::AgentInfo, Duration::from_secs(10))
            .await
        {
            Ok(v) => {
                let field = |k: &str| v.get(k).map(|x| x.to_string()).unwrap_or_default();
                let (agent, version, protocol) =
                    (field("agent"), field("version"), field("protocol"));
                tracing::info!("guest agent: {agent} {version} (protocol {protocol})");
            }
            Err(e) => tracing::info!(
                "the guest agent has no agent.info ({e}); assuming a vendor-compatible agent"
            ),
        }
    }

    /// Reports every process still running as ended: the VM is gone.
    pub fn report_lost_processes(&self, why: &str) {
        for id in self.take_running_processes() {
            tracing::warn!("process {id} lost: {why}");
            self.events.publish_event(&ClientEvent::Exit {
                id,
                exit_code: None,
                signal: Some(Value::String("SIGKILL".into())),
                oom_kill_count: None,
            });
        }
    }
}
