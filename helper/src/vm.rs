//! VM lifecycle: `createVM`, `startVM`, `stopVM`, `isRunning`,
//! `isGuestConnected`.
//!
//! The VMM runs as a child process (`coworkvm boot ...`, [`ProcessLauncher`])
//! that dies with the helper (`PR_SET_PDEATHSIG(SIGKILL)`). Two seams keep
//! this module testable:
//!
//! - [`ImageSource`]: turns the client's `bundlePath` into the files a VM
//!   boots from ([`VmImages`]). Production uses [`BundleImages`] (the
//!   bundle module); tests use a double.
//! - [`VmLauncher`]: starts the VMM for a [`LaunchSpec`] and reports its
//!   end. Production uses [`ProcessLauncher`]; tests use a double.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket_proto::egress::{EGRESS_CAPABILITY, EGRESS_VSOCK_PORT};
use socket_proto::guest::{GuestRequest, HostProxyConfig, AGENT_VSOCK_PORT, SHARE_TAG};
use socket_proto::host::{CreateVmParams, StartVmParams};
use socket_proto::ClientEvent;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::agent::{AgentClient, SEND_TIMEOUT};
use super::egress::probe::{parse_probe_url, ProbeShared, ProbeUrl, Prober};
use super::egress::{EgressConfig, EgressPolicies, EgressServer};
use super::events::{EventHub, NOT_CONNECTED};
use super::grants::{SessionShares, ShareBackend};
use super::lock;
use socket_proto::manifest::MANIFEST_FILE;

use coworkvm_bundle::Bundle;
use coworkvm_vmm::boot_file::{BootFile, FileArg};
use coworkvm_vmm::config::{ConfigError, DiskConfig, DiskRole, FsConfig, LaunchConfig};
use coworkvm_vmm::MachineUuid;
use coworkvm_vmm::VsockSpec;

/// Guest memory when neither `startVM` nor `configure` says.
pub const DEFAULT_MEM_MIB: u64 = 2048;
/// vCPUs when neither `startVM` nor `configure` says.
pub const DEFAULT_CPUS: u32 = 2;

/// `stopVM`: how long the guest may take to sync and power off after
/// `shutdown`, then how long the VMM gets after SIGTERM, then after SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// See [`SHUTDOWN_GRACE`].
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// See [`SHUTDOWN_GRACE`].
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// `stopVM`: how long the agent may take to answer `shutdown` (sending it
/// takes at most [`SEND_TIMEOUT`] more).
pub const SHUTDOWN_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// `stopVM`: after a failed `shutdown` request, how long the VMM may take
/// to exit on its own (the agent's connection drops as the guest powers
/// off, which fails the request) before SIGTERM.
pub const SHUTDOWN_FAILED_GRACE: Duration = Duration::from_secs(2);

/// The longest `stopVM` takes once it holds the lifecycle lock, SIGKILL
/// included, whatever the agent does (an agent that stopped reading makes
/// the `shutdown` send time out): send ([`SEND_TIMEOUT`], 5 s) + answer
/// ([`SHUTDOWN_REQUEST_TIMEOUT`], 5 s) + power-off ([`SHUTDOWN_GRACE`],
/// 20 s) + SIGTERM ([`TERM_GRACE`], 5 s) + SIGKILL ([`KILL_GRACE`], 5 s) =
/// 40 s. A `createVM` or `startVM` in progress holds the lock first; SIGTERM
/// does not wait for it (see [`VmManager::shutdown`]).
pub const STOP_VM_BOUND: Duration = Duration::from_secs(
    SEND_TIMEOUT.as_secs()
        + SHUTDOWN_REQUEST_TIMEOUT.as_secs()
        + SHUTDOWN_GRACE.as_secs()
        + TERM_GRACE.as_secs()
        + KILL_GRACE.as_secs(),
);

/// Why a VM operation failed; the text goes to the client as the error.
#[derive(Debug, thiserror::Error)]
pub enum VmManagerError {
    /// A file operation on the bundle or run directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// To which path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The bundle could not be seeded or prepared.
    #[error(transparent)]
    Bundle(#[from] coworkvm_bundle::BundleError),
    /// The VMM could not be started.
    #[error("cannot start the VMM: {0}")]
    Launch(String),
    /// The VMM did not exit even after SIGKILL.
    #[error("the VMM did not exit after SIGKILL")]
    WontDie,
    /// `startVM` without a bundle.
    #[error("startVM needs a bundlePath (none given, and no createVM named one)")]
    NoBundle,
    /// The VM asked for is one the VMM refuses (checked before it starts).
    #[error(transparent)]
    Config(#[from] ConfigError),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> VmManagerError + 'a {
    move |source| VmManagerError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What a VM boots from: open files (the VMM gets the descriptors, never
/// a bundle path to resolve).
#[derive(Debug, Clone)]
pub struct VmImages {
    /// The guest kernel (bzImage).
    pub kernel: BootFile,
    /// The initramfs with `coworkvm-agent` as `/init`.
    pub initrd: BootFile,
    /// The OS disk, attached read-only as vda.
    pub rootfs: BootFile,
    /// The session disk, read-write as vdb.
    pub session_disk: BootFile,
    /// The machine UUID (SMBIOS), when the bundle has one.
    pub machine_uuid: Option<MachineUuid>,
}

/// Turns a bundle directory into [`VmImages`].
pub trait ImageSource: Send + Sync {
    /// Makes the bundle ready to boot (expanding, creating the session disk
    /// when missing) and names its files. Blocking; called off the async
    /// threads.
    fn prepare(&self, bundle: &Path, disk_gb: Option<u64>) -> Result<VmImages, VmManagerError>;
}

/// The production [`ImageSource`]: the bundle module. The client's bundle
/// directory is first seeded from coworkvm's own images (`images_dir`: the
/// installed or built `vmlinuz`, `initrd.img`, `rootfs.img.zst` and
/// `manifest.json`) when it has none or an older rootfs, which is how a
/// package upgrade reaches it; `prepare` then expands a pending
/// `rootfs.img.zst` and makes the identity and the session disk once.
#[derive(Debug, Clone)]
pub struct BundleImages {
    /// Where coworkvm's images are (`Bundle::default_images_dir`).
    pub images_dir: PathBuf,
}

impl ImageSource for BundleImages {
    fn prepare(&self, bundle: &Path, disk_gb: Option<u64>) -> Result<VmImages, VmManagerError> {
        let b = Bundle::open(bundle)?;
        if self.images_dir.join(MANIFEST_FILE).is_file() {
            b.seed_from(&self.images_dir)?;
        } else {
            tracing::warn!(
                "no coworkvm images at {}; booting {} as it is",
                self.images_dir.display(),
                bundle.display()
            );
        }
        let p = b.prepare(disk_gb)?;
        if let Some(e) = &p.expanded {
            tracing::info!("expanded the rootfs in {}: {e:?}", bundle.display());
        }
        let files = p.open_images()?;
        Ok(VmImages {
            kernel: BootFile::new(p.kernel, files.kernel),
            initrd: BootFile::new(p.initrd, files.initrd),
            rootfs: BootFile::new(p.rootfs, files.rootfs),
            session_disk: BootFile::new(p.session_disk, files.session_disk),
            machine_uuid: Some(p.identity.machine_id.uuid()),
        })
    }
}

/// Everything the VMM needs for one boot: a validated [`LaunchConfig`]
/// whose files are descriptors of this process (`fd:N`), and those files,
/// kept open until the VMM has inherited them.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// What the VMM is told, as it is told (`coworkvm boot --config-fd`).
    pub config: LaunchConfig,
    /// The files `config` names by descriptor.
    files: Vec<BootFile>,
    /// The virtio-fs device's connected vhost-user stream, when the VM has
    /// shared folders.
    share_stream: Option<Arc<OwnedFd>>,
}

impl LaunchSpec {
    /// A bundle's VM: the rootfs read-only, the session disk read-write,
    /// the bundle's machine UUID, and the kernel parameters that tell the
    /// agent which disk is which. Validated here, before any fork, so a
    /// request the VMM would refuse fails with the VMM's own reason.
    pub fn bundle(
        images: VmImages,
        cpus: u32,
        mem_mib: u64,
        vsock: PathBuf,
        console: PathBuf,
    ) -> Result<Self, VmManagerError> {
        let disks = vec![
            (DiskRole::Rootfs, images.rootfs, true),
            (DiskRole::Sessions, images.session_disk, false),
        ];
        let mut spec = Self::build(
            images.kernel,
            Some(images.initrd),
            disks,
            MachineSize { cpus, mem_mib },
            vsock,
            console,
            images.machine_uuid,
        )?;
        spec.config.cmdline = guest_cmdline(&spec.config);
        spec.config.validate()?;
        Ok(spec)
    }

    /// A kernel and an initramfs with no disks (`coworkvm run --kernel`),
    /// booted with `cmdline`.
    pub fn bare(
        kernel: BootFile,
        initrd: BootFile,
        cmdline: &str,
        size: MachineSize,
        vsock: PathBuf,
        console: PathBuf,
        machine_uuid: Option<MachineUuid>,
    ) -> Result<Self, VmManagerError> {
        let mut spec = Self::build(
            kernel,
            Some(initrd),
            vec![],
            size,
            vsock,
            console,
            machine_uuid,
        )?;
        spec.config.cmdline = cmdline.to_owned();
        spec.config.validate()?;
        Ok(spec)
    }

    fn build(
        kernel: BootFile,
        initrd: Option<BootFile>,
        disks: Vec<(DiskRole, BootFile, bool)>,
        size: MachineSize,
        vsock: PathBuf,
        console: PathBuf,
        machine_uuid: Option<MachineUuid>,
    ) -> Result<Self, VmManagerError> {
        let fd = |f: &BootFile| FileArg::Fd(f.file().as_raw_fd());
        let cpus = u8::try_from(size.cpus).map_err(|_| ConfigError::Cpus(size.cpus.into()))?;
        let mut config = LaunchConfig::new(fd(&kernel));
        config.initrd = initrd.as_ref().map(fd);
        config.disks = disks
            .iter()
            .map(|(role, file, read_only)| DiskConfig {
                role: *role,
                file: fd(file),
                read_only: *read_only,
            })
            .collect();
        config.cpus = cpus;
        config.mem_mib = size.mem_mib;
        config.console = Some(console);
        config.vsock = Some(VsockSpec {
            guest_cid: GUEST_CID,
            uds: vsock,
        });
        config.machine_uuid = machine_uuid;
        let mut files = vec![kernel];
        files.extend(initrd);
        files.extend(disks.into_iter().map(|(_, f, _)| f));
        Ok(Self {
            config,
            files,
            share_stream: None,
        })
    }

    /// The hybrid vsock's socket; the agent reaches `<vsock>_51234`.
    pub fn vsock(&self) -> &Path {
        let v = self.config.vsock.as_ref();
        v.map(|v| v.uds.as_path()).unwrap_or(Path::new(""))
    }

    /// Where the guest console goes.
    pub fn console(&self) -> &Path {
        self.config.console.as_deref().unwrap_or(Path::new(""))
    }

    /// Gives the VM the shared-folder device, driven over `stream` (a
    /// connected vhost-user socket to the VM's virtiofsd).
    pub fn set_share(&mut self, stream: OwnedFd) -> Result<(), VmManagerError> {
        self.config.fs = Some(FsConfig {
            socket: FileArg::Fd(stream.as_raw_fd()),
            tag: SHARE_TAG.to_owned(),
        });
        self.share_stream = Some(Arc::new(stream));
        self.config.validate()?;
        Ok(())
    }

    /// The descriptors the VMM child inherits: the files of the config.
    pub fn inherited_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.files.iter().map(|f| f.file().as_raw_fd()).collect();
        fds.extend(self.share_stream.as_ref().map(|s| s.as_raw_fd()));
        fds
    }
}

/// vCPUs and memory of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineSize {
    pub cpus: u32,
    pub mem_mib: u64,
}

/// The guest's vsock CID (any above 2; one VM per VMM).
pub const GUEST_CID: u64 = 3;

/// The kernel parameters of a bundle's VM: quiet, and where the agent
/// finds its disks, from their roles in `config`.
fn guest_cmdline(config: &LaunchConfig) -> String {
    let mut line = String::from("quiet");
    for (role, param) in [
        (DiskRole::Rootfs, socket_proto::guest::ROOTFS_PARAM),
        (DiskRole::Sessions, socket_proto::guest::SESSIONS_PARAM),
    ] {
        if let Some(name) = config.guest_disk_name(role) {
            line.push_str(&format!(" {param}{name}"));
        }
    }
    line
}

/// What the supervisor may ask of a running VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmSignal {
    /// SIGTERM.
    Terminate,
    /// SIGKILL.
    Kill,
}

/// A started VMM: a way to signal it and word of its end.
pub struct LaunchedVm {
    /// What to call it in logs (`pid 1234`).
    pub name: String,
    /// Signals for the VMM.
    pub control: mpsc::UnboundedSender<VmSignal>,
    /// Resolves when the VMM has exited, with how it ended.
    pub exited: oneshot::Receiver<String>,
}

/// Starts VMMs.
pub trait VmLauncher: Send + Sync {
    /// Starts a VMM for `spec`; must be called inside the helper's runtime.
    fn launch(&self, spec: &LaunchSpec) -> Result<LaunchedVm, VmManagerError>;
}

/// Writes `config` as JSON into a sealed-size memfd for the VMM to read
/// (`coworkvm boot --config-fd N`), positioned at its start.
fn config_memfd(config: &LaunchConfig) -> Result<std::fs::File, VmManagerError> {
    use std::io::{Seek, Write};
    use std::os::fd::FromRawFd;
    let json = serde_json::to_vec(config)
        .map_err(|e| VmManagerError::Launch(format!("encoding the launch configuration: {e}")))?;
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new
    // descriptor (or -1); nothing else is touched.
    let fd = unsafe { libc::memfd_create(c"coworkvm-launch".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmManagerError::Launch(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(&json)
        .and_then(|()| file.rewind())
        .map_err(|e| VmManagerError::Launch(format!("writing the launch configuration: {e}")))?;
    Ok(file)
}

/// Runs the VMM as a child process: `EXE boot ...` ([`boot_args`]).
///
/// The child gets `PR_SET_PDEATHSIG(SIGKILL)`. The kernel sends it when the
/// *thread* that forked exits, so `launch` must run on a thread that lives
/// as long as the helper: `coworkvm serve` runs a current-thread runtime on
/// its main thread, where every task (and so every launch) runs.
#[derive(Debug, Clone)]
pub struct ProcessLauncher {
    /// The `coworkvm` binary (`std::env::current_exe()`).
    pub exe: PathBuf,
    /// Where the VMM's own messages go: the helper's log (`false`), or the
    /// terminal the caller runs in (`true`, for `coworkvm run`).
    pub inherit_stderr: bool,
}

impl VmLauncher for ProcessLauncher {
    fn launch(&self, spec: &LaunchSpec) -> Result<LaunchedVm, VmManagerError> {
        use tokio::io::AsyncBufReadExt;

        // Refuses here what the VMM would refuse after the fork.
        spec.config.validate()?;
        let config = config_memfd(&spec.config)?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(["boot", "--config-fd"])
            .arg(config.as_raw_fd().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(if self.inherit_stderr {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::piped()
            })
            .kill_on_drop(false);
        let parent = std::process::id();
        // Opened close-on-exec; the child clears the flag on exactly these
        // (the spec's files and the configuration stay open here until
        // launch returns). Collected before the fork: the child allocates
        // nothing.
        let mut keep = spec.inherited_fds();
        keep.push(config.as_raw_fd());
        // SAFETY: the closure runs in the forked child before exec. It only
        // reads `keep` (allocated before the fork) and makes async-signal-
        // safe calls (fcntl, prctl, getppid); its errors are built from raw
        // errno values, which allocate nothing.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The helper died between fork and prctl: nobody would kill us.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| VmManagerError::Launch(format!("{}: {e}", self.exe.display())))?;
        let pid = child.id().unwrap_or(0);
        let name = format!("VMM pid {pid}");
        if let Some(stderr) = child.stderr.take() {
            let name = name.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!("{name}: {line}");
                }
            });
        }
        let (control, mut signals) = mpsc::unbounded_channel();
        let (exit_tx, exited) = oneshot::channel();
        tokio::spawn(async move {
            // The child is reaped only by `wait` below, in this task, so the
            // pid cannot be reused while a signal is sent to it.
            let status = loop {
                tokio::select! {
                    s = child.wait() => break s,
                    Some(sig) = signals.recv() => match sig {
                        VmSignal::Terminate => {
                            // SAFETY: kill(2) on our unreaped child's pid.
                            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                        }
                        VmSignal::Kill => {
                            let _ = child.start_kill();
                        }
                    },
                }
            };
            let how = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exit_tx.send(how);
        });
        Ok(LaunchedVm {
            name,
            control,
            exited,
        })
    }
}

/// Starts a VM's shared-folder service (the share keeper and its
/// virtiofsd) in the VM's run directory: the grants' backend, and the
/// connected vhost-user stream the VMM's virtio-fs device drives. An error
/// is why this VM has no shared folders; the VM starts without them.
pub trait ShareLauncher: Send + Sync {
    fn start(
        &self,
        run_dir: &Path,
        virtiofsd: Option<&Path>,
    ) -> Result<(Arc<dyn ShareBackend>, OwnedFd), String>;
}

/// One running VM.
struct Instance {
    name: String,
    agent: Arc<AgentClient>,
    control: mpsc::UnboundedSender<VmSignal>,
    /// `Some(how)` once the VMM has exited and the helper cleaned up.
    ended: watch::Receiver<Option<String>>,
    stopping: AtomicBool,
    accept: JoinHandle<()>,
    console: PathBuf,
    /// The sessions' grants, when the VM has shared folders.
    shares: Option<Arc<SessionShares>>,
    /// Why the VM has no shared folders, when it has none.
    no_shares: Option<String>,
    /// Each session's `allowedDomains`, as the egress server applies them.
    egress_policies: Arc<EgressPolicies>,
    /// The egress server's accept loop.
    egress_server: JoinHandle<()>,
    /// What the reachability probe shares with the egress server.
    probe_shared: Arc<ProbeShared>,
    /// `startVM`'s `apiProbeURL`, when it parsed.
    probe_url: Option<ProbeUrl>,
}

/// Sizing defaults from `configure`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sizing {
    /// `configure.memoryMB`.
    pub mem_mib: Option<u64>,
    /// `configure.cpuCount`.
    pub cpus: Option<u32>,
}

/// The helper's VM (one per helper).
pub struct VmManager {
    images: Arc<dyn ImageSource>,
    launcher: Arc<dyn VmLauncher>,
    events: Arc<EventHub>,
    run_dir: PathBuf,
    /// Serializes createVM, startVM and stopVM; queries never take it.
    lifecycle: tokio::sync::Mutex<()>,
    current: Mutex<Option<Arc<Instance>>>,
    created: Mutex<Option<CreateVmParams>>,
    /// The bundle of the last `createVM` or `startVM` that prepared one:
    /// where `getSessionsDiskInfo` looks before a guest answers.
    bundle: Mutex<Option<PathBuf>>,
    sizing: Mutex<Sizing>,
    share_launcher: Option<Arc<dyn ShareLauncher>>,
    /// `configure.virtiofsdPath`.
    virtiofsd: Mutex<Option<PathBuf>>,
    /// The egress proxy's settings.
    egress: Arc<EgressConfig>,
}

impl VmManager {
    /// A manager whose VMs live under `run_dir` (created 0700).
    pub fn new(
        images: Arc<dyn ImageSource>,
        launcher: Arc<dyn VmLauncher>,
        events: Arc<EventHub>,
        run_dir: PathBuf,
    ) -> Self {
        Self {
            images,
            launcher,
            events,
            run_dir,
            lifecycle: tokio::sync::Mutex::new(()),
            current: Mutex::new(None),
            created: Mutex::new(None),
            bundle: Mutex::new(None),
            sizing: Mutex::new(Sizing::default()),
            share_launcher: None,
            virtiofsd: Mutex::new(None),
            egress: Arc::new(EgressConfig::default()),
        }
    }

    /// Applies `config` to the egress streams of the VMs started from now.
    pub fn with_egress(mut self, config: Arc<EgressConfig>) -> Self {
        self.egress = config;
        self
    }

    /// The running VM's session network policies.
    pub fn egress_policies(&self) -> Option<Arc<EgressPolicies>> {
        self.current().map(|i| i.egress_policies.clone())
    }

    /// Gives the VMs shared folders, started by `launcher`.
    pub fn with_shares(mut self, launcher: Arc<dyn ShareLauncher>) -> Self {
        self.share_launcher = Some(launcher);
        self
    }

    /// `configure.virtiofsdPath`: the virtiofsd the client ships, tried
    /// first from the next `startVM` on.
    pub fn set_virtiofsd(&self, path: Option<PathBuf>) {
        *lock(&self.virtiofsd) = path;
    }

    /// The running VM's grants, or why it has none.
    pub fn shares(&self) -> Result<Arc<SessionShares>, String> {
        match self.current() {
            None => Err("no VM is running".into()),
            Some(i) => match (&i.shares, &i.no_shares) {
                (Some(s), _) => Ok(s.clone()),
                (None, why) => Err(why
                    .clone()
                    .unwrap_or_else(|| "shared folders are off".into())),
            },
        }
    }

    /// Remembers `configure`'s sizing for later boots.
    pub fn set_sizing(&self, s: Sizing) {
        let mut cur = lock(&self.sizing);
        if s.mem_mib.is_some() {
            cur.mem_mib = s.mem_mib;
        }
        if s.cpus.is_some() {
            cur.cpus = s.cpus;
        }
    }

    fn current(&self) -> Option<Arc<Instance>> {
        lock(&self.current).clone()
    }

    /// `isRunning`: a VMM runs and its agent channel has not ended. A VM
    /// whose channel ended can never be reached again this boot (the helper
    /// takes one agent connection per boot), so it counts as stopped: the
    /// client's next `startVM` replaces it.
    pub fn is_running(&self) -> bool {
        self.current().is_some_and(|i| !i.agent.channel_ended())
    }

    /// Whether a VMM of this helper's exists (running, starting or not yet
    /// reaped): the socket-activated helper does not stop while one does.
    pub fn has_vm(&self) -> bool {
        self.current().is_some()
    }

    /// `isGuestConnected`.
    pub fn is_guest_connected(&self) -> bool {
        self.current().is_some_and(|i| i.agent.is_connected())
    }

    /// The running VM's agent, if any.
    pub fn agent(&self) -> Option<Arc<AgentClient>> {
        self.current().map(|i| i.agent.clone())
    }

    /// The bundle directory of the last `createVM` or `startVM` that
    /// prepared one, if any.
    pub fn bundle_dir(&self) -> Option<PathBuf> {
        lock(&self.bundle).clone()
    }

    /// `createVM {bundlePath, diskSizeGB}`: prepares the bundle's images
    /// (creating the session disk when missing) and remembers the size.
    /// Without a `bundlePath` there is nothing to prepare: it does nothing
    /// (the Go peer's `createVM` never does anything).
    pub async fn create_vm(&self, p: CreateVmParams) -> Result<(), VmManagerError> {
        if p.bundle_path.is_empty() {
            tracing::info!("createVM without a bundlePath: nothing to prepare");
            return Ok(());
        }
        let _guard = self.lifecycle.lock().await;
        let images = self.images.clone();
        let bundle = PathBuf::from(&p.bundle_path);
        let disk = p.disk_size_gb;
        let dir = bundle.clone();
        run_blocking(move || images.prepare(&bundle, disk)).await?;
        tracing::info!("createVM: bundle {} ready", p.bundle_path);
        *lock(&self.bundle) = Some(dir);
        *lock(&self.created) = Some(p);
        Ok(())
    }

    fn step(&self, step: &str, status: &str) {
        self.events.publish_event(&ClientEvent::StartupStep {
            step: step.into(),
            status: status.into(),
        });
    }

    /// `startVM`: returns once the VMM runs (the agent connects later; the
    /// client polls `isGuestConnected`). Already running: does nothing.
    pub async fn start_vm(self: &Arc<Self>, mut p: StartVmParams) -> Result<(), VmManagerError> {
        let _guard = self.lifecycle.lock().await;
        if let Some(inst) = self.current() {
            if !inst.agent.channel_ended() {
                tracing::info!("startVM: the VM already runs");
                return Ok(());
            }
            tracing::info!(
                "startVM: the guest agent's channel of {} ended; stopping it first",
                inst.name
            );
            self.stop_instance(inst).await?;
        }
        if p.bundle_path.is_empty() {
            // The client always names it; another client may rely on its
            // createVM's.
            match lock(&self.created).as_ref() {
                Some(c) => p.bundle_path = c.bundle_path.clone(),
                None => return Err(VmManagerError::NoBundle),
            }
            tracing::info!(
                "startVM without a bundlePath: using createVM's {}",
                p.bundle_path
            );
        }
        let bundle = PathBuf::from(&p.bundle_path);
        let disk_gb = lock(&self.created)
            .as_ref()
            .filter(|c| c.bundle_path == p.bundle_path)
            .and_then(|c| c.disk_size_gb);
        tracing::info!("startVM: preparing bundle {}", bundle.display());
        self.step("prepareBundle", "running");
        let images = self.images.clone();
        let prepared = run_blocking(move || images.prepare(&bundle, disk_gb)).await;
        let images = match prepared {
            Ok(i) => i,
            Err(e) => {
                self.step("prepareBundle", "failed");
                tracing::error!("startVM: {e}");
                return Err(e);
            }
        };
        self.step("prepareBundle", "completed");
        *lock(&self.bundle) = Some(PathBuf::from(&p.bundle_path));

        self.step("bootVM", "running");
        let share = self.start_share().await;
        match self.launch(images, &p, share) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.step("bootVM", "failed");
                tracing::error!("startVM: {e}");
                Err(e)
            }
        }
    }

    /// Starts the shared-folder service for the next VM, off the runtime's
    /// thread (finding virtiofsd runs it; the keeper takes a moment to
    /// come up). `Err` is why the VM will have no shared folders.
    async fn start_share(&self) -> Result<(Arc<dyn ShareBackend>, OwnedFd), String> {
        let Some(l) = self.share_launcher.clone() else {
            return Err("shared folders are off in this helper".into());
        };
        let dir = self.run_dir.clone();
        let configured = lock(&self.virtiofsd).clone();
        let r = tokio::task::spawn_blocking(move || {
            ensure_private_dir(&dir).map_err(|e| e.to_string())?;
            l.start(&dir, configured.as_deref())
        })
        .await
        .unwrap_or_else(|e| Err(format!("the share's start-up task failed: {e}")));
        if let Err(why) = &r {
            tracing::warn!("startVM: this VM gets no shared folders: {why}");
        }
        r
    }

    fn launch(
        self: &Arc<Self>,
        images: VmImages,
        p: &StartVmParams,
        share: Result<(Arc<dyn ShareBackend>, OwnedFd), String>,
    ) -> Result<(), VmManagerError> {
        let sizing = *lock(&self.sizing);
        let mem_mib = p
            .memory_gb
            .map(|g| g.saturating_mul(1024))
            .or(sizing.mem_mib)
            .unwrap_or(DEFAULT_MEM_MIB);
        let cpus = p.cpu_count.or(sizing.cpus).unwrap_or(DEFAULT_CPUS);
        let dir = &self.run_dir;
        ensure_private_dir(dir)?;
        let vsock = dir.join("vsock.sock");
        let _ = std::fs::remove_file(&vsock);
        let agent_path = PathBuf::from(format!("{}_{AGENT_VSOCK_PORT}", vsock.display()));
        let listener = AgentClient::listen(&agent_path)
            .map_err(io_err("listening for the guest agent on", &agent_path))?;
        let egress_path = PathBuf::from(format!("{}_{EGRESS_VSOCK_PORT}", vsock.display()));
        let egress_listener = EgressServer::listen(&egress_path)
            .map_err(io_err("listening for egress streams on", &egress_path))?;
        let probe_url = p
            .api_probe_url
            .as_deref()
            .and_then(|u| match parse_probe_url(u) {
                Ok(url) => Some(url),
                Err(e) => {
                    tracing::warn!("startVM: apiProbeURL is not probed: {e}");
                    None
                }
            });
        let probe_shared = ProbeShared::new(probe_url.as_ref().map(|u| u.normal.clone()));
        let egress_policies = Arc::new(EgressPolicies::default());
        let proxy = p.api_probe_url.as_ref().map(|u| HostProxyConfig {
            api_probe_url: Some(u.clone()),
            ..Default::default()
        });
        let mut spec = LaunchSpec::bundle(images, cpus, mem_mib, vsock, dir.join("console.log"))?;
        let (shares, no_shares) = match share {
            Ok((backend, stream)) => {
                spec.set_share(stream)?;
                (Some(Arc::new(SessionShares::new(backend))), None)
            }
            Err(why) => (None, Some(why)),
        };
        let agent = AgentClient::new(self.events.clone(), proxy);
        if let Some(s) = &shares {
            let s = s.clone();
            agent.on_process_end(Arc::new(move |id| s.process_ended(id)));
        }
        let accept = agent.serve(listener);
        let egress_server = EgressServer::new(
            egress_policies.clone(),
            self.egress.clone(),
            probe_shared.clone(),
        )
        .serve(egress_listener);
        let launched = match self.launcher.launch(&spec) {
            Ok(l) => l,
            Err(e) => {
                accept.abort();
                egress_server.abort();
                return Err(e);
            }
        };
        tracing::info!(
            "startVM: {} booting ({cpus} vCPUs, {mem_mib} MiB, console {})",
            launched.name,
            spec.console().display()
        );
        let (ended_tx, ended) = watch::channel(None);
        let inst = Arc::new(Instance {
            name: launched.name,
            agent,
            control: launched.control,
            ended,
            stopping: AtomicBool::new(false),
            accept,
            console: spec.console().to_owned(),
            shares,
            no_shares,
            egress_policies,
            egress_server,
            probe_shared,
            probe_url,
        });
        *lock(&self.current) = Some(inst.clone());
        let me = self.clone();
        let exited = launched.exited;
        tokio::spawn(async move { me.supervise(inst, exited, ended_tx).await });
        Ok(())
    }

    async fn supervise(
        self: Arc<Self>,
        inst: Arc<Instance>,
        exited: oneshot::Receiver<String>,
        ended_tx: watch::Sender<Option<String>>,
    ) {
        let ready = {
            let agent = inst.agent.clone();
            let me = self.clone();
            let prober = Prober {
                agent: agent.clone(),
                events: self.events.clone(),
                shared: inst.probe_shared.clone(),
                url: inst.probe_url.clone(),
            };
            tokio::spawn(async move {
                if !agent.wait_ready(Duration::from_secs(24 * 3600)).await {
                    return;
                }
                me.step("bootVM", "completed");
                if agent.has_capability(EGRESS_CAPABILITY) {
                    // Runs until the agent's channel ends or the VM does.
                    prober.run().await;
                } else {
                    tracing::info!(
                        "the guest agent has no egress proxy (capability \"{EGRESS_CAPABILITY}\"): \
                         sessions have no network and networkStatus stays NOT_CONNECTED"
                    );
                }
            })
        };
        let how = exited
            .await
            .unwrap_or_else(|_| "its supervisor went away".into());
        ready.abort();
        inst.accept.abort();
        inst.egress_server.abort();
        let was_ready = inst.agent.is_connected();
        inst.agent.disconnect();
        let expected = inst.stopping.load(Ordering::SeqCst);
        if expected {
            tracing::info!("{} exited ({how})", inst.name);
            inst.agent.report_lost_processes("the VM was stopped");
        } else {
            tracing::error!("{} exited unexpectedly ({how})", inst.name);
            log_console_tail(&inst.console);
            if !was_ready {
                self.step("bootVM", "failed");
            }
            inst.agent
                .report_lost_processes("the VM stopped unexpectedly");
        }
        self.events.set_network_status(NOT_CONNECTED);
        {
            let mut cur = lock(&self.current);
            if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, &inst)) {
                *cur = None;
            }
        }
        let _ = ended_tx.send(Some(how));
    }

    /// The helper's own stop (SIGTERM, SIGINT): [`stop_vm`](Self::stop_vm)
    /// within [`STOP_VM_BOUND`], lifecycle lock included; past that (a
    /// `startVM` still preparing holds the lock), SIGKILL to the VMM at
    /// once. Either way the VMM is dead or killed when this returns, and it
    /// dies with the helper in any case (`PR_SET_PDEATHSIG`).
    pub async fn shutdown(&self) {
        match tokio::time::timeout(STOP_VM_BOUND, self.stop_vm()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("stopping the VM: {e}"),
            Err(_) => {
                if let Some(inst) = self.current() {
                    tracing::warn!(
                        "the VM did not stop within {STOP_VM_BOUND:?}; killing {}",
                        inst.name
                    );
                    inst.stopping.store(true, Ordering::SeqCst);
                    let _ = inst.control.send(VmSignal::Kill);
                    let mut ended = inst.ended.clone();
                    let _ = tokio::time::timeout(KILL_GRACE, ended.wait_for(|v| v.is_some())).await;
                }
            }
        }
    }

    /// `stopVM`: asks the agent to shut down, waits for the VMM, then
    /// SIGTERM, then SIGKILL: at most [`STOP_VM_BOUND`] once it holds the
    /// lifecycle lock. Nothing running: does nothing.
    pub async fn stop_vm(&self) -> Result<(), VmManagerError> {
        let _guard = self.lifecycle.lock().await;
        let Some(inst) = self.current() else {
            return Ok(());
        };
        self.stop_instance(inst).await
    }

    /// Stops one VMM: the guest's shutdown, SIGTERM, SIGKILL, each with its
    /// grace; the caller holds the lifecycle lock.
    async fn stop_instance(&self, inst: Arc<Instance>) -> Result<(), VmManagerError> {
        inst.stopping.store(true, Ordering::SeqCst);
        tracing::info!("stopVM: stopping {}", inst.name);
        let ended = inst.ended.clone();
        let wait = |t: Duration| {
            let mut e = ended.clone();
            async move {
                tokio::time::timeout(t, e.wait_for(|v| v.is_some()))
                    .await
                    .is_ok()
            }
        };
        if inst.agent.is_connected() {
            match inst
                .agent
                .request(&GuestRequest::Shutdown, SHUTDOWN_REQUEST_TIMEOUT)
                .await
            {
                Ok(_) => {
                    tracing::info!("stopVM: the guest is shutting down");
                    if wait(SHUTDOWN_GRACE).await {
                        return Ok(());
                    }
                    tracing::warn!("stopVM: the guest did not power off in {SHUTDOWN_GRACE:?}");
                }
                // The agent's connection may drop as the guest powers off.
                Err(e) => {
                    tracing::warn!("stopVM: shutdown request: {e}");
                    if wait(SHUTDOWN_FAILED_GRACE).await {
                        return Ok(());
                    }
                }
            }
        }
        let _ = inst.control.send(VmSignal::Terminate);
        if wait(TERM_GRACE).await {
            return Ok(());
        }
        tracing::warn!("stopVM: {} ignored SIGTERM; killing it", inst.name);
        let _ = inst.control.send(VmSignal::Kill);
        if wait(KILL_GRACE).await {
            return Ok(());
        }
        Err(VmManagerError::WontDie)
    }
}

/// Makes `dir` (and its parents) and leaves it 0700.
fn ensure_private_dir(dir: &Path) -> Result<(), VmManagerError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("creating the run directory", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("securing the run directory", dir))
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VmManagerError> + Send + 'static,
) -> Result<T, VmManagerError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(VmManagerError::Launch(format!(
            "a preparation task failed: {e}"
        )))
    })
}

/// How much of the console log's end is read to log its last lines: the
/// guest writes the file, so it is never read whole.
const CONSOLE_TAIL_BYTES: u64 = 64 * 1024;

fn log_console_tail(console: &Path) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = coworkvm_bundle::fsutil::open_regular(console, false) else {
        return;
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL_BYTES)))
        .is_err()
    {
        return;
    }
    let mut text = Vec::new();
    if file
        .take(CONSOLE_TAIL_BYTES)
        .read_to_end(&mut text)
        .is_err()
    {
        return;
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(20);
    for line in &lines[from..] {
        tracing::error!("  console | {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_spec_names_its_files_by_descriptor_and_its_disks_by_role() {
        let dir = std::env::temp_dir().join(format!("coworkvm-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str| {
            let p = dir.join(name);
            std::fs::write(&p, b"x").unwrap();
            BootFile::new(&p, std::fs::File::open(&p).unwrap())
        };
        let images = || VmImages {
            kernel: file("vmlinuz"),
            initrd: file("initrd.img"),
            rootfs: file("rootfs.img"),
            session_disk: file("sessiondata.img"),
            machine_uuid: Some(MachineUuid::parse("12345678-9abc-def0-1234-56789abcdef0").unwrap()),
        };
        let spec = LaunchSpec::bundle(
            images(),
            2,
            2048,
            "/r/vsock.sock".into(),
            "/r/console.log".into(),
        )
        .unwrap();
        let c = &spec.config;
        let fds = spec.inherited_fds();
        let named: Vec<FileArg> = [Some(&c.kernel), c.initrd.as_ref()]
            .into_iter()
            .flatten()
            .chain(c.disks.iter().map(|d| &d.file))
            .cloned()
            .collect();
        assert_eq!(
            named,
            fds.iter().map(|&n| FileArg::Fd(n)).collect::<Vec<_>>()
        );
        assert_eq!(c.guest_disk_name(DiskRole::Rootfs).as_deref(), Some("vda"));
        assert_eq!(
            c.guest_disk_name(DiskRole::Sessions).as_deref(),
            Some("vdb")
        );
        assert_eq!(c.cmdline, "quiet coworkvm.rootfs=vda coworkvm.sessions=vdb");
        assert_eq!(spec.vsock(), Path::new("/r/vsock.sock"));
        assert_eq!(spec.console(), Path::new("/r/console.log"));
        // The JSON the VMM reads gives back the same configuration.
        let json = serde_json::to_string(c).unwrap();
        assert!(
            json.contains(r#""machine_uuid":"12345678-9abc-def0-1234-56789abcdef0""#),
            "{json}"
        );
        assert_eq!(&serde_json::from_str::<LaunchConfig>(&json).unwrap(), c);
        // Sizes the VMM refuses are refused here.
        for (cpus, mem) in [(0, 2048), (33, 2048), (256, 2048), (1, 0), (1, 63)] {
            let r = LaunchSpec::bundle(images(), cpus, mem, "/v".into(), "/c".into());
            assert!(
                matches!(r, Err(VmManagerError::Config(_))),
                "{cpus} {mem}: {r:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
