//! `coworkvm serve`: the helper the desktop client talks to.
//!
//! | module | what it does |
//! |---|---|
//! | [`activation`] | systemd socket activation: the listening socket passed in `LISTEN_FDS`/`LISTEN_PID` |
//! | [`server`] | binds the client socket (0700 dir, 0600 socket, stale socket replaced, live one refused), checks SO_PEERCRED, serves one-shot, pipe and event-stream connections |
//! | [`events`] | the broadcast of client events, with the current `networkStatus` / `apiReachability` for new subscribers |
//! | [`vm`] | VM lifecycle: images from the bundle ([`vm::ImageSource`]), the VMM child process ([`vm::VmLauncher`]), start, stop, crash handling |
//! | [`egress`] | the sessions' network: the egress proxy's server on `RUNDIR/vsock.sock_51235` (allowlists, address ranges, SNI check), the reachability probe that owns `networkStatus` / `apiReachability`, the `--egress-*` settings |
//! | [`agent`] | the guest agent's connection on `RUNDIR/vsock.sock_51234`: request/response correlation, guest events to client events |
//! | [`methods`] | dispatch of every host-protocol method |
//! | [`grants`] | which host folders each session holds, released when its last process ends |
//! | [`mounts`] | the mount policy: `additionalMounts` / `mountPath` validation, parent-first order, the credential-store deny-list |
//! | [`share`] | the share keeper: a private namespace with a staging tmpfs, virtiofsd on it, each grant bound at `shared/<host path>` |
//! | [`virtiofsd`] | finding a usable virtiofsd (>= 1.13.0, the Rust daemon): configured path, `$COWORKVM_VIRTIOFSD`, distribution paths, coworkvm's own; `--version` probed with a timeout; each rejected candidate's reason kept |
//! | [`wire`] | async frame reading with bounded allocation |

pub mod activation;
pub mod agent;
pub mod egress;
pub mod events;
pub mod grants;
pub mod methods;
pub mod mounts;
pub mod run;
pub mod sdk_copy;
pub mod server;
pub mod share;
pub mod virtiofsd;
pub mod vm;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use server::{bind, Listener, ServeError};
pub use vm::{BundleImages, ImageSource, ProcessLauncher, VmImages, VmLauncher};

/// A lock that a panicking holder cannot poison for the others: the state
/// is still the best there is, and one failed request must not take the
/// helper's later ones down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Turns the helper's own debug logging on (`true`) or back (`false`).
pub type DebugSwitch = Arc<dyn Fn(bool) + Send + Sync>;

/// The socket file's name under `$XDG_RUNTIME_DIR`.
pub const SOCKET_NAME: &str = "claude-cowork-vm.sock";

/// How the helper is put together.
pub struct HelperConfig {
    /// Turns a bundle into bootable images.
    pub images: Arc<dyn ImageSource>,
    /// Starts VMMs.
    pub launcher: Arc<dyn VmLauncher>,
    /// The VM's private directory (vsock sockets, console log).
    pub run_dir: PathBuf,
    /// Home directory for `installSdk`'s `sdkSubpath`.
    pub home: Option<PathBuf>,
    /// Flips the helper's log filter for `setDebugLogging`.
    pub debug_switch: Option<DebugSwitch>,
    /// Bytes of events each subscriber may fall behind
    /// ([`events::EVENT_BUDGET_BYTES`] in production).
    pub event_budget: usize,
    /// Starts each VM's shared folders; `None`: VMs have none (every
    /// mount comes back in `failedMounts`).
    pub share_launcher: Option<Arc<dyn vm::ShareLauncher>>,
    /// The egress proxy's settings (`--egress-resolve`, `--egress-allow`,
    /// the config file).
    pub egress: Arc<egress::EgressConfig>,
    /// How long `installSdk` and a runtime `spawn` wait for an install by
    /// copy ([`sdk_copy::ANSWER_WITHIN`] in production).
    pub sdk_answer_within: std::time::Duration,
}

impl HelperConfig {
    /// Production wiring for a helper serving `socket`: images from the
    /// bundle directory, the VMM as `current_exe() boot ...`, the run
    /// directory beside the socket, `$HOME` for the SDK.
    pub fn production(socket: &Path) -> std::io::Result<Self> {
        Ok(Self {
            images: Arc::new(BundleImages {
                images_dir: coworkvm_bundle::Bundle::default_images_dir(),
            }),
            launcher: Arc::new(ProcessLauncher {
                exe: std::env::current_exe()?,
                inherit_stderr: false,
            }),
            share_launcher: Some(Arc::new(share::KeeperShareLauncher {
                exe: std::env::current_exe()?,
            })),
            run_dir: run_dir_for(socket),
            home: std::env::var_os("HOME").map(PathBuf::from),
            debug_switch: None,
            event_budget: events::EVENT_BUDGET_BYTES,
            egress: Arc::new(egress::EgressConfig::default()),
            sdk_answer_within: sdk_copy::ANSWER_WITHIN,
        })
    }
}

/// The helper's shared state: what every connection and method sees.
pub struct Helper {
    /// Client events.
    pub events: Arc<events::EventHub>,
    /// The VM.
    pub vm: Arc<vm::VmManager>,
    /// See [`HelperConfig::home`].
    pub home: Option<PathBuf>,
    /// See [`HelperConfig::debug_switch`].
    pub debug_switch: Option<DebugSwitch>,
    /// The last `addApprovedOauthToken` token: a spawn without its own
    /// `oauthToken` gets this one (never logged).
    pub approved_token: std::sync::Mutex<Option<socket_proto::Secret<String>>>,
    /// `installSdk`'s installs, one at a time; a copy into the guest runs
    /// on when the request that started it has answered or gone.
    pub sdk_copies: sdk_copy::SdkCopies,
}

impl Helper {
    /// A helper with no VM yet.
    pub fn new(cfg: HelperConfig) -> Arc<Self> {
        let events = Arc::new(events::EventHub::with_budget(cfg.event_budget));
        let mut vm = vm::VmManager::new(cfg.images, cfg.launcher, events.clone(), cfg.run_dir)
            .with_egress(cfg.egress);
        if let Some(s) = cfg.share_launcher {
            vm = vm.with_shares(s);
        }
        let vm = Arc::new(vm);
        Arc::new(Self {
            events,
            vm,
            home: cfg.home,
            debug_switch: cfg.debug_switch,
            approved_token: std::sync::Mutex::new(None),
            sdk_copies: sdk_copy::SdkCopies::new(cfg.sdk_answer_within),
        })
    }
}

/// `$XDG_RUNTIME_DIR/claude-cowork-vm.sock`, or without XDG_RUNTIME_DIR a
/// private directory `/tmp/coworkvm-UID/`.
pub fn default_socket_path() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join(SOCKET_NAME),
        None => PathBuf::from(format!("/tmp/coworkvm-{}", euid())).join(SOCKET_NAME),
    }
}

/// The VM run directory for a helper on `socket`: `SOCKET.d` beside it
/// (short, so `RUNDIR/vsock.sock_51234` fits a Unix socket path).
pub fn run_dir_for(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".d");
    PathBuf::from(s)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so that the client
/// can always connect: the helper's own descriptors are bounded elsewhere
/// ([`server::MAX_CONNECTIONS`] client connections, one agent connection
/// per VM), and the soft default (often 1024) is below what those bounds
/// allow together. Failure is logged, not fatal.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!("RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads one rlimit from `raised`, a live local.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(
            "raising RLIMIT_NOFILE to {}: {}",
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    } else {
        tracing::debug!("RLIMIT_NOFILE {} -> {}", lim.rlim_cur, lim.rlim_max);
    }
}

/// The current soft `RLIMIT_NOFILE`.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, a live local.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur
}

/// Listens on a host vsock port's socket (`RUNDIR/vsock.sock_PORT`, where
/// the VMM delivers guest dials to that port), replacing a stale file
/// there. Call before the VMM starts, so the guest's first dial finds it.
pub(crate) fn listen_vsock_port(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::net::UnixListener::bind(path)
}

/// The effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// How long a socket-activated helper waits with no VM and no connection
/// before it stops (`coworkvm serve --idle-exit`'s default then).
pub const DEFAULT_IDLE_EXIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Where the client socket comes from.
pub enum SocketSource {
    /// Bind this path ([`bind`]); the file goes when the helper stops.
    Bind(PathBuf),
    /// Serve the socket systemd passed ([`activation::take_listen_socket`]);
    /// the file stays.
    Inherited(activation::InheritedSocket),
}

impl SocketSource {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        match self {
            SocketSource::Bind(p) => p,
            SocketSource::Inherited(s) => &s.path,
        }
    }
}

/// Runs the helper on `source` until SIGTERM or SIGINT (or, with
/// `idle_exit`, until it was idle that long), then stops the VM cleanly.
/// Blocks the calling thread (a current-thread runtime: every VMM is
/// forked from this thread, which `PR_SET_PDEATHSIG` relies on). `egress`
/// is the egress proxy's settings ([`egress::config::load`]).
pub fn serve(
    source: SocketSource,
    debug_switch: Option<DebugSwitch>,
    egress: egress::EgressConfig,
    idle_exit: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    tracing::info!("egress settings: {}", egress.describe());
    raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut cfg = HelperConfig::production(source.path())?;
        cfg.debug_switch = debug_switch;
        cfg.egress = Arc::new(egress);
        let listener = match source {
            SocketSource::Bind(path) => bind(&path)?,
            SocketSource::Inherited(sock) => Listener::inherited(sock)?,
        }
        .with_idle_exit(idle_exit);
        let helper = Helper::new(cfg);
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = int.recv() => tracing::info!("SIGINT: stopping"),
            }
        };
        listener.run(helper, shutdown).await;
        Ok(())
    })
}

/// A log line allowed at most once per [`LogLimit::INTERVAL`]: what a guest
/// or a client can trigger at will (refused connections, dropped events)
/// must not flood the log.
pub struct LogLimit {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimit {
    /// At most one line per this long.
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

    /// A limit that allows its first line.
    pub const fn new() -> Self {
        Self {
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` the lines suppressed
    /// since the last one; `None` (and one more suppressed) otherwise.
    pub fn allow(&self) -> Option<u64> {
        let mut st = lock(&self.state);
        let now = std::time::Instant::now();
        match st.0 {
            Some(last) if now.duration_since(last) < Self::INTERVAL => {
                st.1 += 1;
                None
            }
            _ => {
                st.0 = Some(now);
                Some(std::mem::take(&mut st.1))
            }
        }
    }

    /// `" (N more like it suppressed)"`, or nothing for 0.
    pub fn suffix(suppressed: u64) -> String {
        if suppressed == 0 {
            String::new()
        } else {
            format!(" ({suppressed} more like it suppressed)")
        }
    }
}
