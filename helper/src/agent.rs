//! The connection to the guest agent: `RUNDIR/vsock.sock_51234`, where the
//! VMM's hybrid vsock delivers the agent's dial to CID 2 port 51234.
//!
//! One [`AgentClient`] per VM boot. It accepts exactly one agent connection per
//! boot (see [`AgentClient::serve`] for why), correlates requests and responses
//! by id, turns guest events into client events on the [`EventHub`] (only
//! the documented ones), and tracks which processes run so that a VM that
//! dies can still report an `exit` for each of them.
//!
//! Bounds (each hit is logged and answered, never a stall):
//!
//! | what | bound |
//! |---|---|
//! | agent connections per boot | 1 ([`AgentClient::serve`]); later ones are closed on arrival |
//! | one send to the agent | [`SEND_TIMEOUT`] for room in the write queue ([`WRITE_QUEUE`] frames, [`WRITE_QUEUE_BYTES`]) |
//! | requests to the agent in flight | [`MAX_PENDING`] |
//! | guest events passed to the client | [`FORWARDED_GUEST_EVENTS`] |
//! | guest requests passed to the client | [`FORWARDED_GUEST_REQUESTS`] (none) |

use crate::lock;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
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
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::events::{EventHub, NOT_CONNECTED};
use super::wire::read_frame;
use super::LogLimit;

/// How long a forwarded request may wait for the agent's answer (the client
/// itself gives up after 30 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one frame may wait for room in the agent's write queue. An agent
/// that stops reading fills the socket and then the queue; every sender
/// (a client method, `stopVM`, SIGTERM's clean stop) then fails after this
/// long instead of waiting for ever.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Start-up steps logged each boot before they count as a flood.
const STARTUP_STEPS_LOGGED: u32 = 16;

/// Frames queued for the agent before a sender waits (back-pressure).
pub const WRITE_QUEUE: usize = 256;

/// Bytes queued for the agent (and being written) at most: 32 MiB, so a
/// client that floods `writeStdin` at an agent that does not read holds
/// that much, not [`WRITE_QUEUE`] frames of up to 10 MiB each.
pub const WRITE_QUEUE_BYTES: usize = 32 << 20;

/// One frame for the agent and its share of [`WRITE_QUEUE_BYTES`],
/// returned once written.
type Outgoing = (Vec<u8>, OwnedSemaphorePermit);

/// Requests to the agent that may await their answer at once; more are
/// refused ([`AgentError::TooManyRequests`]). The client has at most
/// 32 in flight per connection; this bounds the map against many
/// connections.
pub const MAX_PENDING: usize = 1024;

/// How long the agent may take to answer `agent.info` after `ready`.
pub const AGENT_INFO_TIMEOUT: Duration = Duration::from_secs(10);

/// The capability an agent advertises in `agent.info` when it runs every
/// spawn in the session sandbox (its own user under bubblewrap). Without
/// it the helper forwards no `spawn`: a client process would run as root.
pub const SANDBOX_CAPABILITY: &str = "sandbox";

/// Guest events the helper passes on to the client: the documented set
/// (docs/protocol.md, the host protocol's event table) less the two the
/// helper owns ([`HELPER_OWNED_EVENTS`]). `ready` is the helper's own.
/// Anything else is dropped with a (rate-limited) log line: the client
/// never sees an event it did not ask for.
pub const FORWARDED_GUEST_EVENTS: &[&str] = &["stdout", "stderr", "exit", "error", "startupStep"];

/// Events the helper itself reports (its egress probe,
/// [`crate::egress::probe`]): the guest's are ignored, since the guest
/// cannot know whether the host side of its network works, and a guest
/// that says `CONNECTED` must not make it so.
pub const HELPER_OWNED_EVENTS: &[&str] = &["networkStatus", "apiReachability"];

/// Guest-to-host request methods the helper passes on to the client as
/// `request` events. The protocol documents the mechanism but no method,
/// and coworkvm-agent sends none, so the set is empty: every guest request
/// is answered "unknown method" and dropped with a (rate-limited) log line.
/// A method joins this list once the client contract documents it.
pub const FORWARDED_GUEST_REQUESTS: &[&str] = &[];

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
    /// The agent did not take the frame in time: it stopped reading.
    #[error("the guest agent is not reading (no room to send within {0:?})")]
    SendTimeout(Duration),
    /// Too many requests await the agent's answer.
    #[error("too many requests to the guest agent in flight ({0})")]
    TooManyRequests(usize),
    /// The agent did not advertise the session sandbox.
    #[error(
        "refusing to spawn: the guest agent did not advertise the session sandbox \
         (capability \"{SANDBOX_CAPABILITY}\"), so the process would run unsandboxed"
    )]
    NoSandbox,
    /// The agent answered with an error (its text, as the client sees it).
    #[error("{}", .0.message())]
    Guest(GuestError),
    /// The frame could not be encoded (too large, for one).
    #[error("cannot send to the guest: {0}")]
    Encode(#[from] FrameError),
}

type Pending = oneshot::Sender<Result<Value, GuestError>>;

/// The one live agent connection of a boot, as the senders see it: which
/// connection it is, its write queue, and the budget of frames in flight.
struct AgentConnection {
    generation: u64,
    tx: mpsc::Sender<Outgoing>,
    budget: Arc<Semaphore>,
}

/// The agent channel's state over one boot: it only moves forward.
enum Link {
    /// No agent connection yet.
    Waiting,
    /// The one agent connection of this boot.
    Current(AgentConnection),
    /// The agent's connection dropped: no other is accepted this boot.
    Ended,
}

/// The helper's side of the guest protocol, for one VM.
pub struct AgentClient {
    events: Arc<EventHub>,
    link: Mutex<Link>,
    connected: watch::Sender<bool>,
    /// `agent.info`'s capabilities, once asked (empty when it has none).
    capabilities: Mutex<Vec<String>>,
    pending: Mutex<HashMap<String, Pending>>,
    next_id: AtomicU64,
    generation: AtomicU64,
    running: Mutex<BTreeSet<String>>,
    /// `hostProxyConfig` to send after `ready` (from `startVM`'s `apiProbeURL`).
    proxy_config: Option<HostProxyConfig>,
    /// Set by the first `ready`.
    ready_seen: AtomicBool,
    refused_log: LogLimit,
    dropped_log: LogLimit,
    /// Guest `error` events: their text and their rate are the guest's.
    guest_error_log: LogLimit,
    /// Other guest-driven lines (bad frames, start-up steps, statuses,
    /// exits of unknown ids).
    guest_event_log: LogLimit,
    startup_steps_seen: AtomicU32,
    /// Told each process the client started that has ended (its `exit`, a
    /// fatal `error`, or its spawn failed): the session's grants follow
    /// its processes ([`crate::grants`]).
    process_end_hook: Mutex<Option<ProcessEndHook>>,
}

/// See [`AgentClient::on_process_end`].
pub type ProcessEndHook = Arc<dyn Fn(&str) + Send + Sync>;

impl AgentClient {
    /// An agent with no connection yet.
    pub fn new(events: Arc<EventHub>, proxy_config: Option<HostProxyConfig>) -> Arc<Self> {
        Arc::new(Self {
            events,
            link: Mutex::new(Link::Waiting),
            connected: watch::Sender::new(false),
            capabilities: Mutex::new(Vec::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            generation: AtomicU64::new(0),
            running: Mutex::new(BTreeSet::new()),
            proxy_config,
            ready_seen: AtomicBool::new(false),
            refused_log: LogLimit::new(),
            dropped_log: LogLimit::new(),
            guest_error_log: LogLimit::new(),
            guest_event_log: LogLimit::new(),
            startup_steps_seen: AtomicU32::new(0),
            process_end_hook: Mutex::new(None),
        })
    }

    /// Listens on `path` (a stale file there is replaced). Call before the
    /// VMM starts, so the agent's first dial finds a listener.
    pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
        crate::listen_vsock_port(path)
    }

    /// Accepts the agent's connection until aborted: the FIRST connection
    /// of this boot whose peer is our uid (SO_PEERCRED; the VMM connects on
    /// the guest's behalf) becomes the agent's, once and for all.
    ///
    /// Why one per boot, even after the agent's connection drops: inside
    /// the guest any session process could dial vsock port 51234 (vsock has
    /// no network namespace), and the VMM delivers every such dial here as
    /// a connection from our own uid, so nothing on this side tells the
    /// agent from a session. The agent dials first, at boot, before any
    /// session exists; from then on a new connection is an impostor, and
    /// the agent's own connection drops in practice only when the VM dies.
    /// Accepting a redial would let a session that can break the agent's
    /// connection take its place and receive every later `spawn` (its
    /// `env`, `oauthToken`). So a dropped agent connection ends the
    /// channel: the VM is reported `NOT_CONNECTED` as if dead, its
    /// processes as lost, and the client restarts the VM.
    ///
    /// Every later connection is closed on arrival with one (rate-limited)
    /// log line; none gets a task or a buffer, so connection floods cost
    /// one accept each and never grow the helper.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let uid = super::euid();
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!("accepting the guest agent: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                match stream.peer_cred() {
                    Ok(c) if c.uid() == uid => {}
                    Ok(c) => {
                        if let Some(n) = me.refused_log.allow() {
                            tracing::warn!(
                                "refused a vsock connection from uid {} (not ours){}",
                                c.uid(),
                                LogLimit::suffix(n)
                            );
                        }
                        continue;
                    }
                    Err(e) => {
                        if let Some(n) = me.refused_log.allow() {
                            tracing::warn!(
                                "refused a vsock connection: no peer credentials: {e}{}",
                                LogLimit::suffix(n)
                            );
                        }
                        continue;
                    }
                }
                let Some((generation, rx)) = me.admit() else {
                    if let Some(n) = me.refused_log.allow() {
                        tracing::warn!(
                            "refused another connection on the guest agent's port: the agent \
                             connects once per boot{}",
                            LogLimit::suffix(n)
                        );
                    }
                    drop(stream);
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move { me.run_connection(stream, generation, rx).await });
            }
        })
    }

    /// Makes a new connection the agent's, when this boot has none yet.
    fn admit(&self) -> Option<(u64, mpsc::Receiver<Outgoing>)> {
        let mut link = lock(&self.link);
        if !matches!(*link, Link::Waiting) {
            return None;
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel::<Outgoing>(WRITE_QUEUE);
        let budget = Arc::new(Semaphore::new(WRITE_QUEUE_BYTES));
        *link = Link::Current(AgentConnection {
            generation,
            tx,
            budget,
        });
        Some((generation, rx))
    }

    fn is_current(&self, generation: u64) -> bool {
        matches!(&*lock(&self.link), Link::Current(c) if c.generation == generation)
    }

    /// True between the agent's `ready` (and its `agent.info`) and the loss
    /// of its connection.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Whether this boot's agent connection came and dropped: no other is
    /// accepted, so the VM is out of reach until it restarts.
    pub fn channel_ended(&self) -> bool {
        matches!(&*lock(&self.link), Link::Ended)
    }

    /// Waits until the agent is ready, or `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether the agent advertised `capability` in `agent.info`.
    pub fn has_capability(&self, capability: &str) -> bool {
        lock(&self.capabilities).iter().any(|c| c == capability)
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
        self.process_ended(id);
    }

    /// Calls `hook` with the id of each process the client started once it
    /// has ended.
    pub fn on_process_end(&self, hook: ProcessEndHook) {
        *lock(&self.process_end_hook) = Some(hook);
    }

    fn process_ended(&self, id: &str) {
        let hook = lock(&self.process_end_hook).clone();
        if let Some(hook) = hook {
            hook(id);
        }
    }

    /// Drops the current connection (the VM is gone): pending requests fail
    /// and `isGuestConnected` turns false.
    pub fn disconnect(&self) {
        let generation = match &*lock(&self.link) {
            Link::Current(c) => Some(c.generation),
            _ => None,
        };
        match generation {
            // The caller reports the processes, with its own reason.
            Some(g) => self.connection_lost(g, None),
            None => *lock(&self.link) = Link::Ended,
        }
    }

    async fn send_bytes(&self, bytes: Vec<u8>) -> Result<(), AgentError> {
        let (tx, budget) = match &*lock(&self.link) {
            Link::Current(c) => (c.tx.clone(), c.budget.clone()),
            _ => return Err(AgentError::NotConnected),
        };
        let share = bytes.len().min(WRITE_QUEUE_BYTES) as u32;
        let send = async move {
            let permit = budget
                .acquire_many_owned(share)
                .await
                .map_err(|_| AgentError::NotConnected)?;
            tx.send((bytes, permit))
                .await
                .map_err(|_| AgentError::NotConnected)
        };
        match tokio::time::timeout(SEND_TIMEOUT, send).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::SendTimeout(SEND_TIMEOUT)),
        }
    }

    /// Sends one frame as it is (waits at most [`SEND_TIMEOUT`]).
    pub async fn send_frame(&self, frame: &GuestFrame) -> Result<(), AgentError> {
        self.send_bytes(encode_frame(frame)?).await
    }

    /// Sends a notification (no reply).
    pub async fn notify(&self, n: &GuestNotification) -> Result<(), AgentError> {
        self.send_frame(&GuestFrame::notification(n)).await
    }

    /// Sends a request and waits for its response's `result`: at most
    /// [`SEND_TIMEOUT`] to send, then `timeout` for the answer.
    pub async fn request(
        &self,
        req: &GuestRequest,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let id = format!("h{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let bytes = encode_frame(&GuestFrame::from_request(id.clone(), req))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if pending.len() >= MAX_PENDING {
                tracing::warn!(
                    "refused a request to the guest agent: {MAX_PENDING} already await an answer"
                );
                return Err(AgentError::TooManyRequests(MAX_PENDING));
            }
            pending.insert(id.clone(), tx);
        }
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

    async fn run_connection(
        self: Arc<Self>,
        stream: UnixStream,
        generation: u64,
        mut rx: mpsc::Receiver<Outgoing>,
    ) {
        let (mut rd, mut wr) = stream.into_split();
        tracing::info!("guest agent connected");
        let writer = tokio::spawn(async move {
            while let Some((bytes, _share)) = rx.recv().await {
                if let Err(e) = wr.write_all(&bytes).await {
                    tracing::debug!("writing to the guest agent: {e}");
                    break;
                }
            }
        });
        loop {
            let frame = match read_frame(&mut rd).await {
                Ok(Some(obj)) => obj,
                Ok(None) => break,
                Err(e) if e.is_recoverable() => {
                    if let Some(n) = self.guest_event_log.allow() {
                        tracing::warn!("bad frame from the guest: {e}{}", LogLimit::suffix(n));
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!("guest agent connection broken: {e}");
                    break;
                }
            };
            // Only the current connection speaks for the guest.
            if !self.is_current(generation) {
                break;
            }
            match GuestFrame::parse(frame) {
                Ok(Some(frame)) => self.handle(frame),
                Ok(None) => {
                    if let Some(n) = self.guest_event_log.allow() {
                        tracing::warn!(
                            "ignoring a guest frame without a type{}",
                            LogLimit::suffix(n)
                        );
                    }
                }
                Err(e) => {
                    if let Some(n) = self.guest_event_log.allow() {
                        tracing::warn!("ignoring a bad guest frame: {e}{}", LogLimit::suffix(n));
                    }
                }
            }
        }
        writer.abort();
        self.connection_lost(generation, Some("the guest agent's connection dropped"));
    }

    fn fail_pending(&self) {
        // Dropping the senders wakes every waiter with "disconnected".
        lock(&self.pending).clear();
    }

    /// The current connection is gone; `lost` says why its processes
    /// are reported ended (`None`: the caller reports them).
    fn connection_lost(&self, generation: u64, lost: Option<&str>) {
        {
            let mut link = lock(&self.link);
            if !matches!(&*link, Link::Current(c) if c.generation == generation) {
                return;
            }
            *link = Link::Ended;
        }
        self.fail_pending();
        let was_connected = self.connected.send_replace(false);
        tracing::info!(
            "guest agent disconnected; no other connection is accepted until the VM restarts"
        );
        if was_connected {
            tracing::debug!("isGuestConnected is false from now on");
        }
        self.events.set_network_status(NOT_CONNECTED);
        // Nothing can reach the guest's processes any more.
        if let Some(why) = lost {
            self.report_lost_processes(why);
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
            f @ GuestFrame::Request { .. } => self.handle_guest_request(f),
            GuestFrame::Notification { method, .. } => {
                tracing::debug!("ignoring a notification {method} from the guest");
            }
        }
    }

    /// A guest request for the client: passed on when its method is in
    /// [`FORWARDED_GUEST_REQUESTS`]; otherwise answered "unknown method"
    /// (without waiting for room: a full queue drops the answer) and
    /// dropped.
    fn handle_guest_request(&self, f: GuestFrame) {
        let GuestFrame::Request { id, method, .. } = &f else {
            return;
        };
        if FORWARDED_GUEST_REQUESTS.contains(&method.as_str()) {
            tracing::debug!("guest request for the client: {}", Redacted(&f));
            if let Some(obj) = f.to_client_frame() {
                self.events.publish(obj);
            }
            return;
        }
        if let Some(n) = self.dropped_log.allow() {
            tracing::warn!(
                "dropped a guest request {method:?}: not a request the client takes{}",
                LogLimit::suffix(n)
            );
        }
        let answer = GuestFrame::unknown_method(id.clone(), method);
        if let (Ok(bytes), Link::Current(c)) = (encode_frame(&answer), &*lock(&self.link)) {
            let share = bytes.len().min(WRITE_QUEUE_BYTES) as u32;
            if let Ok(permit) = c.budget.clone().try_acquire_many_owned(share) {
                let _ = c.tx.try_send((bytes, permit));
            }
        }
    }

    fn handle_event(self: &Arc<Self>, event: String, params: Value) {
        if event == "ready" {
            self.observe(&event, params);
            return;
        }
        if HELPER_OWNED_EVENTS.contains(&event.as_str()) {
            tracing::debug!("ignoring the guest's {event}: the helper's probe reports it");
            return;
        }
        if !FORWARDED_GUEST_EVENTS.contains(&event.as_str()) {
            if let Some(n) = self.dropped_log.allow() {
                tracing::warn!(
                    "dropped a guest event {event:?}: not an event the client takes{}",
                    LogLimit::suffix(n)
                );
            }
            return;
        }
        // Output is the hot path and the helper only passes it on: no typed
        // parse (a copy of every chunk) for it.
        if event != "stdout" && event != "stderr" {
            self.observe(&event, params.clone());
        }
        if let Some(obj) = flatten_event(&event, &params) {
            self.events.publish(obj);
        }
    }

    /// What the helper itself does with a guest event: state and logs.
    fn observe(self: &Arc<Self>, event: &str, params: Value) {
        match GuestEvent::parse(event, params) {
            Ok(GuestEvent::Ready) => {
                // Once per boot: a repeated `ready` starts nothing.
                if self.ready_seen.swap(true, Ordering::SeqCst) {
                    tracing::debug!("ignoring a repeated ready from the guest");
                    return;
                }
                let me = self.clone();
                tokio::spawn(async move { me.after_ready().await });
            }
            Ok(GuestEvent::Exit {
                id, code, signal, ..
            }) => {
                // One line per process the client started; exits for ids
                // it did not start are the guest's to repeat, so limited.
                let known = lock(&self.running).remove(&id);
                if known {
                    self.process_ended(&id);
                }
                let suffix = if known {
                    Some(String::new())
                } else {
                    self.guest_event_log.allow().map(LogLimit::suffix)
                };
                if let Some(suffix) = suffix {
                    match (code, signal) {
                        (Some(c), _) => {
                            tracing::info!("process {id:?} exited with code {c}{suffix}")
                        }
                        (None, Some(s)) => {
                            tracing::info!("process {id:?} ended by signal {s:?}{suffix}")
                        }
                        (None, None) => tracing::info!("process {id:?} exited{suffix}"),
                    }
                }
            }
            Ok(GuestEvent::Error { id, message, fatal }) => {
                if fatal == Some(true) {
                    if let Some(id) = &id {
                        if lock(&self.running).remove(id) {
                            self.process_ended(id);
                        }
                    }
                }
                if let Some(n) = self.guest_error_log.allow() {
                    // Debug formatting escapes the guest's control characters.
                    let about = id.map(|i| format!(" (process {i:?})")).unwrap_or_default();
                    tracing::warn!("guest error{about}: {message:?}{}", LogLimit::suffix(n));
                }
            }
            Ok(GuestEvent::StartupStep { step, status }) => {
                // A boot has a handful of steps, each worth its line; past
                // STARTUP_STEPS_LOGGED they are the guest's flood.
                let nth = self.startup_steps_seen.fetch_add(1, Ordering::Relaxed);
                let limited = if nth < STARTUP_STEPS_LOGGED {
                    Some(0)
                } else {
                    self.guest_event_log.allow()
                };
                if let Some(n) = limited {
                    tracing::info!(
                        "guest start-up step {step:?}: {status:?}{}",
                        LogLimit::suffix(n)
                    );
                }
            }
            // Never reach here (HELPER_OWNED_EVENTS).
            Ok(GuestEvent::NetworkStatus { .. } | GuestEvent::ApiReachability { .. }) => {}
            Ok(GuestEvent::Stdout { .. } | GuestEvent::Stderr { .. }) => {}
            Err(e) => tracing::debug!("a guest event this helper cannot read: {e}"),
        }
    }

    /// After `ready`: the proxy configuration, then `agent.info` for the
    /// agent's capabilities, then `isGuestConnected` turns true. In that
    /// order, so that the client's first `spawn` (it waits for
    /// `isGuestConnected`) finds the capabilities known. `networkStatus`
    /// is the egress probe's to set ([`crate::egress::probe`]).
    async fn after_ready(self: Arc<Self>) {
        if let Some(cfg) = &self.proxy_config {
            let n = GuestNotification::HostProxyConfig(cfg.clone());
            if let Err(e) = self.notify(&n).await {
                tracing::debug!("hostProxyConfig: {e}");
            }
        }
        let capabilities = match self
            .request(&GuestRequest::AgentInfo, AGENT_INFO_TIMEOUT)
            .await
        {
            Ok(v) => {
                let field = |k: &str| v.get(k).map(|x| x.to_string()).unwrap_or_default();
                let (agent, version, protocol) =
                    (field("agent"), field("version"), field("protocol"));
                let caps: Vec<String> = v
                    .get("capabilities")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                tracing::info!(
                    "guest agent: {agent} {version} (protocol {protocol}; capabilities {})",
                    caps.join(", ")
                );
                caps
            }
            Err(e) => {
                tracing::info!(
                    "the guest agent has no agent.info ({e}); assuming a vendor-compatible \
                     agent without the session sandbox"
                );
                Vec::new()
            }
        };
        if !capabilities.iter().any(|c| c == SANDBOX_CAPABILITY) {
            // Info, not a warning: `coworkvm run` boots such guests on
            // purpose (the bare initramfs), and its terminal shows warnings.
            tracing::info!(
                "the guest agent does not advertise the session sandbox; the client's spawns \
                 will be refused"
            );
        }
        *lock(&self.capabilities) = capabilities;
        // The connection may have dropped meanwhile: then it stays down.
        let still = matches!(&*lock(&self.link), Link::Current(_));
        if still && !self.connected.send_replace(true) {
            tracing::info!("guest agent ready");
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// An agent whose connection is one end of a socket pair; the other end
    /// is read and never answered.
    async fn silent_agent() -> (Arc<AgentClient>, Arc<EventHub>) {
        let hub = Arc::new(EventHub::new());
        let agent = AgentClient::new(hub.clone(), None);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (generation, rx) = agent.admit().unwrap();
        assert!(agent.admit().is_none(), "one connection per boot");
        tokio::spawn(agent.clone().run_connection(ours, generation, rx));
        tokio::spawn(async move {
            let mut theirs = theirs;
            let mut buf = vec![0u8; 64 * 1024];
            while theirs.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        (agent, hub)
    }

    #[test]
    fn requests_in_flight_are_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (agent, _hub) = silent_agent().await;
            let mut waiting = Vec::new();
            for _ in 0..MAX_PENDING {
                let a = agent.clone();
                waiting.push(tokio::spawn(async move {
                    a.request(&GuestRequest::AgentInfo, Duration::from_secs(600))
                        .await
                }));
            }
            while lock(&agent.pending).len() < MAX_PENDING {
                tokio::task::yield_now().await;
            }
            let e = agent
                .request(&GuestRequest::AgentInfo, Duration::from_secs(1))
                .await
                .unwrap_err();
            assert!(matches!(e, AgentError::TooManyRequests(MAX_PENDING)), "{e}");
            // The VM goes: every waiter learns it, and the map is empty.
            agent.disconnect();
            for w in waiting {
                assert!(matches!(w.await.unwrap(), Err(AgentError::Disconnected(_))));
            }
            assert!(lock(&agent.pending).is_empty());
            assert!(matches!(
                agent
                    .request(&GuestRequest::AgentInfo, Duration::from_secs(1))
                    .await,
                Err(AgentError::NotConnected)
            ));
        });
    }
}
