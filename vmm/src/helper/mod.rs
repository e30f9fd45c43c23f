//! `coworkvm serve`: the helper the desktop client talks to.
//!
//! | module | what it does |
//! |---|---|
//! | [`server`] | binds the client socket (0700 dir, 0600 socket, stale socket replaced, live one refused), checks SO_PEERCRED, serves one-shot, pipe and event-stream connections |
//! | [`events`] | the broadcast of client events, with the current `networkStatus` / `apiReachability` for new subscribers |
//! | [`vm`] | VM lifecycle: images from the bundle ([`vm::ImageSource`]), the VMM child process ([`vm::VmLauncher`]), start, stop, crash handling |
//! | [`agent`] | the guest agent's connection on `RUNDIR/vsock.sock_51234`: request/response correlation, guest events to client events |
//! | [`methods`] | dispatch of every host-protocol method |
//! | [`wire`] | async frame reading with bounded allocation |

pub mod agent;
pub mod events;
pub mod methods;
pub mod server;
pub mod vm;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use server::{bind, Listener, ServeError};
pub use vm::{BundleImages, ImageSource, ProcessLauncher, VmImages, VmLauncher};

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
}

impl HelperConfig {
    /// Production wiring for a helper serving `socket`: images from the
    /// bundle directory, the VMM as `current_exe() boot ...`, the run
    /// directory beside the socket, `$HOME` for the SDK.
    pub fn production(socket: &Path) -> std::io::Result<Self> {
        Ok(Self {
            images: Arc::new(BundleImages {
                images_dir: crate::bundle::Bundle::default_images_dir(),
            }),
            launcher: Arc::new(ProcessLauncher {
                exe: std::env::current_exe()?,
            }),
            run_dir: run_dir_for(socket),
            home: std::env::var_os("HOME").map(PathBuf::from),
            debug_switch: None,
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
}

impl Helper {
    /// A helper with no VM yet.
    pub fn new(cfg: HelperConfig) -> Arc<Self> {
        let events = Arc::new(events::EventHub::new());
        let vm = Arc::new(vm::VmManager::new(
            cfg.images,
            cfg.launcher,
            events.clone(),
            cfg.run_dir,
        ));
        Arc::new(Self {
            events,
            vm,
            home: cfg.home,
            debug_switch: cfg.debug_switch,
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

/// The effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Runs the helper on `socket` until SIGTERM or SIGINT, then stops the VM
/// cleanly. Blocks the calling thread (a current-thread runtime: every VMM
/// is forked from this thread, which `PR_SET_PDEATHSIG` relies on).
pub fn serve(socket: &Path, debug_switch: Option<DebugSwitch>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut cfg = HelperConfig::production(socket)?;
        cfg.debug_switch = debug_switch;
        let listener = bind(socket)?;
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
