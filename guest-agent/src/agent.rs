//! What the agent holds between requests: the processes, the session disk,
//! the sandbox, the SDK store, the approved tokens; and the requests that
//! use more than one of them.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use socket_proto::egress::{EgressProbeParams, EGRESS_CAPABILITY};
use socket_proto::guest;
use socket_proto::host::{
    InstallSdkParams, MountPathParams, MountPathResult, PruneSessionCachesParams, SpawnParams,
    SpawnResult,
};
use socket_proto::sdk::{InstallSdkChunkParams, InstallSdkResult};
use socket_proto::Secret;

use crate::cgroup::{CgroupError, SessionCgroups};
use crate::egress::{self, Egress, EgressError};
use crate::lock;
use crate::procs::{ProcError, Procs};
use crate::sandbox::{self, SystemEntry};
use crate::sdk::{SdkStore, SdkStoreError};
use crate::seccomp::{self, SeccompError};
use crate::sessions::{validate_name, SessionDir, SessionError, Sessions};
use crate::share::{self, Grant, MountMode, Share, ShareError};
use socket_proto::sdk::RUNTIME_COMMANDS;

/// The most approved tokens kept (the newest win).
const MAX_TOKENS: usize = 32;

pub struct Sandbox {
    pub bwrap: PathBuf,
    pub system: Vec<SystemEntry>,
    /// The session seccomp filter, compiled once, as bwrap reads it.
    seccomp: Vec<u8>,
    /// The per-session cgroups: always in the guest's rootfs; `None` off
    /// the guest (tests) or in the initramfs without cgroup2.
    cgroups: Option<SessionCgroups>,
}

impl Sandbox {
    pub fn new(
        bwrap: PathBuf,
        system: Vec<SystemEntry>,
        cgroups: Option<SessionCgroups>,
    ) -> Result<Self, SeccompError> {
        let seccomp = seccomp::to_bytes(&seccomp::session_filter()?);
        Ok(Sandbox {
            bwrap,
            system,
            seccomp,
            cgroups,
        })
    }
}

/// What a session spawn (one that did not ask for `sandbox: false`) does
/// when the agent has no sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WithoutSandbox {
    /// The busybox test initramfs (no `coworkvm.rootfs=` on the kernel
    /// command line): run directly as root, as the tests of the bare
    /// agent expect.
    RunDirectly,
    /// The Debian rootfs: refuse, with this message. A session never runs
    /// unsandboxed because a disk or bwrap is missing.
    Refuse(String),
}

impl WithoutSandbox {
    /// Refuse with `reasons` in the Debian rootfs; run directly only in
    /// the test initramfs.
    pub fn decide(rootfs: bool, reasons: &[String]) -> Self {
        if rootfs {
            WithoutSandbox::Refuse(format!(
                "sessions are unavailable: {}; refusing to run unsandboxed",
                reasons.join("; ")
            ))
        } else {
            WithoutSandbox::RunDirectly
        }
    }
}

/// Whether the VMM booted the Debian rootfs: the kernel command line names
/// one (`coworkvm.rootfs=`, whatever its value: a malformed one is still
/// not the test initramfs).
pub fn names_a_rootfs(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|w| w.starts_with(guest::ROOTFS_PARAM))
}

/// Why the agent could not do what a request asked. The text is the
/// answer the helper gets.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A session request without the session disk (the test initramfs).
    #[error("the session disk is not mounted at /sessions")]
    NoSessionDisk,
    /// `installSdk` without the session disk.
    #[error(
        "installSdk: the session disk is not mounted at /sessions, so there is nowhere to keep \
         the SDK"
    )]
    NoSdkStore,
    /// A spawn under an id a live process holds.
    #[error("process id {0} is already in use")]
    IdInUse(String),
    /// The runtime's absolute path (`/usr/local/bin/claude`) before any
    /// `installSdk`: the guest has no such file of its own.
    #[error(
        "cannot run {0}: no agent runtime is installed in the guest (installSdk must succeed \
         first)"
    )]
    NoRuntime(String),
    /// The command is on no directory of the sandbox's PATH.
    #[error("cannot run {command}: not found in {path}")]
    NotFound { command: String, path: String },
    /// A sandboxed spawn where the sandbox cannot be built (why, from start).
    #[error("{0}")]
    NoSandbox(String),
    /// A sealed file for the sandbox (seccomp filter, passwd, group).
    #[error(transparent)]
    SealedFile(#[from] SeccompError),
    /// The session's cgroup.
    #[error("the session's cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    /// The pipe bwrap reports the sandbox's pid on.
    #[error("info pipe: {0}")]
    InfoPipe(std::io::Error),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Sdk(#[from] SdkStoreError),
    /// Shared folders (`mountPath`, `installSdk` with `sharedPath`).
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    /// `readFile` refused.
    #[error(transparent)]
    ReadFile(#[from] crate::conn::ReadFileError),
    /// The session's network namespace, or the egress channel
    /// (`egress.probe`).
    #[error(transparent)]
    Egress(#[from] EgressError),
    /// A request that does not run on a worker thread reached one.
    #[error("{0} is not a worker's request")]
    NotAWorkersRequest(String),
}

pub struct Agent {
    pub procs: Procs,
    sessions_root: PathBuf,
    sessions: Option<Sessions>,
    sandbox: Option<Sandbox>,
    without_sandbox: WithoutSandbox,
    /// Locked per request: the SDK requests of one transfer come in order.
    sdk: Option<Mutex<SdkStore>>,
    /// `addApprovedOauthToken`: kept in memory only, never logged. The
    /// helper puts the session's token in the spawn's `env` itself and
    /// the egress proxies add no credentials, so nothing here reads them.
    oauth_tokens: Mutex<Vec<Secret<String>>>,
    /// The shared-folder device, when one is mounted.
    share: Option<Arc<Share>>,
    /// The SDK binary an `installSdk` with `sharedPath` bound last: the
    /// runtime until a copied install replaces it.
    shared_sdk: Mutex<Option<PathBuf>>,
    /// The channel to the host's egress service, and (in the guest's
    /// rootfs with the sandbox) each session's network namespace with its
    /// proxies.
    egress: Egress,
}

/// Whether `path` is a mount point: another device than its parent's.
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Ok(parent)) = (
        std::fs::symlink_metadata(path),
        std::fs::metadata(path.join("..")),
    ) else {
        return false;
    };
    me.is_dir() && me.dev() != parent.dev()
}

impl Agent {
    /// The agent as the guest runs it: `/sessions`, `/etc`, `/usr/bin/bwrap`,
    /// cgroup2 at `/sys/fs/cgroup`. In the Debian rootfs, anything missing
    /// means every session spawn is refused (`WithoutSandbox::Refuse`); only
    /// the busybox test initramfs runs them directly as root in `/`. The
    /// reason is logged once, here.
    pub fn detect(procs: Procs) -> Self {
        let pid1 = std::process::id() == 1;
        let rootfs = match std::fs::read_to_string("/proc/cmdline") {
            Ok(cmdline) => names_a_rootfs(&cmdline),
            Err(e) => {
                // Not knowing is not the test initramfs: fail closed.
                eprintln!("coworkvm-agent: /proc/cmdline: {e}");
                pid1
            }
        };
        if pid1 {
            crate::init::protect_from_oom();
        }
        let mut why = Vec::new();
        let root = PathBuf::from("/sessions");
        let sessions = if is_mount_point(&root) {
            Sessions::open(&root, Path::new("/etc"))
                .map_err(|e| why.push(format!("the session disk at /sessions is unusable: {e}")))
                .ok()
        } else {
            why.push("/sessions is not mounted".to_owned());
            None
        };
        // Only PID 1 owns the machine's cgroups: never a host's.
        let cgroups = if pid1 {
            match SessionCgroups::for_guest() {
                Ok(c) => Some(c),
                Err(e) if rootfs => {
                    why.push(format!("per-session cgroups are unavailable: {e}"));
                    None
                }
                Err(e) => {
                    eprintln!(
                        "coworkvm-agent: per-session cgroups are unavailable: {e}; \
                         sessions run without resource limits"
                    );
                    None
                }
            }
        } else {
            None
        };
        let bwrap = Path::new(sandbox::BWRAP);
        // SAFETY: geteuid takes no arguments and cannot fail.
        let root_user = unsafe { libc::geteuid() } == 0;
        let sandbox = if !bwrap.is_file() {
            why.push(format!("{} is absent", bwrap.display()));
            None
        } else if !root_user {
            why.push("the agent does not run as root".to_owned());
            None
        } else if rootfs && cgroups.is_none() {
            None
        } else {
            Sandbox::new(
                bwrap.to_owned(),
                sandbox::scan_system(Path::new("/")),
                cgroups,
            )
            .map_err(|e| why.push(e.to_string()))
            .ok()
        };
        let without_sandbox = WithoutSandbox::decide(rootfs, &why);
        let share = if pid1 {
            match Share::mount_at_boot() {
                Ok(Some(s)) => {
                    eprintln!(
                        "coworkvm-agent: shared folders: {} mounted at {}",
                        guest::SHARE_TAG,
                        guest::SHARE_GUEST_ROOT
                    );
                    Some(Arc::new(s))
                }
                Ok(None) => {
                    eprintln!("coworkvm-agent: shared folders: no virtio-fs device");
                    None
                }
                Err(e) => {
                    eprintln!("coworkvm-agent: shared folders are unavailable: {e}");
                    None
                }
            }
        } else {
            None
        };
        if sessions.is_some() && sandbox.is_some() {
            let limits = sandbox
                .as_ref()
                .and_then(|s| s.cgroups.as_ref())
                .and_then(|c| c.limits())
                .map(|l| {
                    format!(
                        ", each in its cgroup sessions/cowork<uid> (pids.max {}, memory.max {})",
                        l.session_pids, l.session_memory
                    )
                })
                .unwrap_or_default();
            eprintln!(
                "coworkvm-agent: sessions run as their own users under bubblewrap in \
                 /sessions/<name>{limits}"
            );
        } else if let WithoutSandbox::Refuse(msg) = &without_sandbox {
            eprintln!("coworkvm-agent: {msg}");
        } else {
            eprintln!(
                "coworkvm-agent: no rootfs on the kernel command line (the test initramfs): \
                 spawns run directly as root in /, without a sandbox: {}",
                why.join("; ")
            );
        }
        // Sessions' network: their own namespaces with the proxies, where
        // sessions are sandboxed in the rootfs (every sandboxed spawn then
        // enters its session's, or fails). Elsewhere bwrap's empty one.
        let egress = if rootfs && sessions.is_some() && sandbox.is_some() {
            match egress::netns_supported() {
                Ok(()) => {
                    eprintln!(
                        "coworkvm-agent: each session's network: its own namespace with an HTTP \
                         proxy on 127.0.0.1:{} and SOCKS5 on 127.0.0.1:{}, relayed to the host",
                        socket_proto::egress::HTTP_PROXY_PORT,
                        socket_proto::egress::SOCKS_PROXY_PORT
                    );
                    Egress::per_session(egress::vsock_dialer(), egress::Bounds::default())
                }
                Err(e) => {
                    eprintln!(
                        "coworkvm-agent: network namespaces are unavailable ({e}): sessions \
                         have no network"
                    );
                    Egress::channel_only(egress::vsock_dialer())
                }
            }
        } else {
            Egress::channel_only(egress::vsock_dialer())
        };
        let agent = Self::new(procs, root, sessions, sandbox, without_sandbox).with_egress(egress);
        match share {
            Some(s) => agent.with_share(s),
            None => agent,
        }
    }

    /// The agent with the shared-folder device: sandboxed sessions get a
    /// mount tree, detached when their last process has exited.
    pub fn with_share(mut self, share: Arc<Share>) -> Self {
        let s = share.clone();
        self.procs
            .set_session_idle_hook(Arc::new(move |procs: &Procs, session: &str| {
                s.release(session, || procs.running_sessions())
            }));
        self.share = Some(share);
        self
    }

    /// The agent with `egress` instead of the channel only.
    pub fn with_egress(mut self, egress: Egress) -> Self {
        self.egress = egress;
        self
    }

    pub fn new(
        procs: Procs,
        sessions_root: PathBuf,
        sessions: Option<Sessions>,
        sandbox: Option<Sandbox>,
        without_sandbox: WithoutSandbox,
    ) -> Self {
        let sdk = sessions.as_ref().map(|s| {
            let store = SdkStore::new(s.state_dir().join("sdk"));
            store.prune_old_versions();
            Mutex::new(store)
        });
        Agent {
            procs,
            sessions_root,
            sessions,
            sandbox,
            without_sandbox,
            sdk,
            oauth_tokens: Mutex::new(Vec::new()),
            share: None,
            shared_sdk: Mutex::new(None),
            egress: Egress::channel_only(egress::vsock_dialer()),
        }
    }

    pub fn sessions_root(&self) -> &Path {
        self.sessions
            .as_ref()
            .map_or(self.sessions_root.as_path(), |s| s.root())
    }

    pub fn capabilities(&self) -> Vec<String> {
        let mut c: Vec<String> = crate::conn::CAPABILITIES
            .iter()
            .map(|s| s.to_string())
            .collect();
        if self.sessions.is_some() {
            c.push("sessionDisk".into());
        }
        // coworkvm's installSdk transfer (installSdk.chunk, .commit): it
        // caches on the session disk, so only with one.
        if self.sdk.is_some() {
            c.push("sdkTransfer".into());
        }
        if self.sandboxed() {
            c.push("sandbox".into());
        }
        if self.share.is_some() {
            c.push(guest::SHARE_CAPABILITY.into());
        }
        // Sandboxed spawns get their session's proxies.
        if self.sandboxed() && self.egress.serves_sessions() {
            c.push(EGRESS_CAPABILITY.into());
        }
        c
    }

    pub fn sandboxed(&self) -> bool {
        self.sessions.is_some() && self.sandbox.is_some()
    }

    fn sessions(&self) -> Result<&Sessions, RequestError> {
        self.sessions.as_ref().ok_or(RequestError::NoSessionDisk)
    }

    /// `claude` or `/usr/local/bin/claude` (the runtime) is the installed
    /// SDK's binary, once there is one. Before that a bare `claude` is
    /// looked up on PATH like any command, and an absolute runtime path
    /// that the image does not have is a clear error, not bwrap's execvp.
    fn resolve_program(&self, command: &str) -> Result<(String, Option<PathBuf>), RequestError> {
        let current = self.sdk_current();
        let dir = current
            .as_ref()
            .and_then(|b| b.parent().map(Path::to_owned));
        if RUNTIME_COMMANDS.contains(&command) {
            if let Some(bin) = &current {
                return Ok((bin.to_string_lossy().into_owned(), dir));
            }
            if command.starts_with('/') && !Path::new(command).exists() {
                return Err(RequestError::NoRuntime(command.to_owned()));
            }
        }
        Ok((command.to_owned(), dir))
    }

    pub fn spawn(&self, p: &SpawnParams) -> Result<Value, RequestError> {
        validate_name(&p.name)?;
        if self.procs.is_in_use(&p.id) {
            return Err(RequestError::IdInUse(p.id.clone()));
        }
        let encoding = p.encoding.unwrap_or_default();
        // The session counts as running while its mounts are made (a
        // connection's spawn is reserved already), so that no exit of
        // another of its processes detaches its tree meanwhile.
        let reserved_here = self.procs.reserve(&p.id, &p.name, encoding).is_ok();
        let r = self.spawn_reserved(p, encoding);
        if reserved_here {
            self.procs.unreserve(&p.id);
        }
        if r.is_err() {
            self.release_mounts(&p.name);
        }
        r
    }

    /// Detaches `session`'s mount tree if no process of it is left (after
    /// a spawn that failed).
    pub fn release_mounts(&self, session: &str) {
        if let Some(share) = &self.share {
            share.release(session, || self.procs.running_sessions());
        }
    }

    /// The session's mount tree with `asked`'s grants in it, and the
    /// names of those that failed (each logged).
    fn session_mounts(
        &self,
        share: &Share,
        sd: &SessionDir,
        asked: Option<&Value>,
    ) -> (Option<PathBuf>, Vec<String>) {
        let (grants, mut failed) = share::parse_additional_mounts(asked);
        // bwrap binds the tree over `<session>/mnt`: a real directory, not
        // a link or a file the session left there.
        let tree = match crate::sessions::mkdir_beneath(&sd.path, Path::new("mnt"), sd.uid) {
            Ok(()) => {
                let (tree, more) = share.mount_grants(&sd.name, sd.uid, &grants);
                failed.extend(more);
                match tree {
                    Ok(t) => Some(t),
                    Err(e) => {
                        eprintln!("coworkvm-agent: session {}: {e}", sd.name);
                        None
                    }
                }
            }
            Err(e) => {
                eprintln!(
                    "coworkvm-agent: session {}: no shared folders: {e}",
                    sd.name
                );
                failed.extend(grants.into_iter().map(|g| {
                    let source = std::io::Error::from_raw_os_error(libc::ENOTDIR);
                    (
                        g.name.clone(),
                        ShareError::Target {
                            name: g.name,
                            source,
                        },
                    )
                }));
                None
            }
        };
        for (name, e) in &failed {
            eprintln!(
                "coworkvm-agent: session {}: mount {name:?} failed: {e}",
                sd.name
            );
        }
        let mut names: Vec<String> = failed.into_iter().map(|(n, _)| n).collect();
        names.sort();
        (tree, names)
    }

    fn spawn_reserved(
        &self,
        p: &SpawnParams,
        encoding: socket_proto::host::StreamEncoding,
    ) -> Result<Value, RequestError> {
        let mut failed_mounts = failed_mounts(p.additional_mounts.as_ref());
        let (program, sdk_dir) = self.resolve_program(&p.command)?;
        let wants_sandbox = p.sandbox != Some(false);
        match (&self.sessions, &self.sandbox) {
            (Some(sessions), Some(sb)) if wants_sandbox => {
                let sd = sessions.prepare(&p.name)?;
                let cwd = sessions.resolve_cwd(&sd, p.cwd.as_deref())?;
                let mut mounts_tree = None;
                if let Some(share) = &self.share {
                    let (tree, failed) =
                        self.session_mounts(share, &sd, p.additional_mounts.as_ref());
                    mounts_tree = tree;
                    failed_mounts = (!failed.is_empty()).then_some(failed);
                }
                let env: BTreeMap<String, String> = p
                    .env
                    .as_ref()
                    .map(|e| e.expose().clone())
                    .unwrap_or_default();
                // Held until the process is started: its descriptor is the
                // child's setns target.
                let net = self.egress.session_net(&p.name)?;
                let mut spec = sandbox::Spec {
                    session_dir: sd.path.clone(),
                    cwd,
                    sdk_dir,
                    mounts_tree,
                    system: sb.system.clone(),
                    info_fd: None,
                    seccomp_fd: None,
                    passwd_fd: None,
                    group_fd: None,
                    netns_fd: net.as_ref().map(|n| n.netns_fd()),
                };
                if !env.contains_key("PATH") && !program.contains('/') {
                    let path = spec.base_env(sd.uid)["PATH"].clone();
                    if !std::env::split_paths(&path).any(|d| d.join(&program).is_file()) {
                        return Err(RequestError::NotFound {
                            command: p.command.clone(),
                            path,
                        });
                    }
                }
                let memfd = seccomp::sealed_memfd;
                let seccomp_fd = memfd(c"coworkvm-seccomp", &sb.seccomp)?;
                let passwd_fd = memfd(
                    c"coworkvm-passwd",
                    sandbox::passwd(sd.uid, &sd.path).as_bytes(),
                )?;
                let group_fd = memfd(c"coworkvm-group", sandbox::group(sd.uid).as_bytes())?;
                let cgroup_procs = match &sb.cgroups {
                    Some(c) => Some(c.enter_fd(sd.uid)?),
                    None => None,
                };
                let (info_r, info_w) = sandbox::info_pipe().map_err(RequestError::InfoPipe)?;
                spec.info_fd = Some(sandbox::raw(&info_w));
                spec.seccomp_fd = Some(sandbox::raw(&seccomp_fd));
                spec.passwd_fd = Some(sandbox::raw(&passwd_fd));
                spec.group_fd = Some(sandbox::raw(&group_fd));
                let cmd = sandbox::command(
                    &sb.bwrap,
                    &spec,
                    sd.uid,
                    &program,
                    &p.args,
                    &env,
                    cgroup_procs.as_ref().map(sandbox::raw),
                );
                crate::debug!(
                    "spawn {}: session {} uid {} cwd {} command {}",
                    p.id,
                    p.name,
                    sd.uid,
                    spec.cwd.display(),
                    p.command
                );
                let r = self
                    .procs
                    .spawn(&p.id, &p.name, cmd, encoding, Some(info_r), &p.command);
                // Our copies: bwrap holds its own.
                drop((info_w, seccomp_fd, passwd_fd, group_fd, cgroup_procs, net));
                r?;
            }
            _ => {
                if let (true, WithoutSandbox::Refuse(msg)) = (wants_sandbox, &self.without_sandbox)
                {
                    return Err(RequestError::NoSandbox(msg.clone()));
                }
                // The test initramfs, or `sandbox: false`: the VM owner's
                // root command (`coworkvm run`), which the helper never
                // forwards from a client. No session tree: every mount
                // asked for fails by name.
                if let Some(names) = &failed_mounts {
                    eprintln!(
                        "coworkvm-agent: spawn {}: unsandboxed, so no shared folders: {names:?}",
                        p.id
                    );
                }
                crate::debug!("spawn {}: unsandboxed, command {}", p.id, p.command);
                let mut cmd = Procs::direct_command(p, &program);
                // SAFETY: reset_oom_score_adj makes only async-signal-safe
                // system calls on static data.
                unsafe { cmd.pre_exec(sandbox::reset_oom_score_adj) };
                self.procs
                    .spawn(&p.id, &p.name, cmd, encoding, None, &p.command)?;
            }
        }
        Ok(serde_json::to_value(SpawnResult { failed_mounts }).unwrap_or(json!({})))
    }

    pub fn install_sdk(&self, p: &InstallSdkParams) -> Result<Value, RequestError> {
        if let Some(shared_path) = &p.shared_path {
            return self.install_shared_sdk(p, shared_path);
        }
        let mut sdk = self.sdk_store()?;
        let r = sdk.begin(p)?;
        if r.cached {
            *lock(&self.shared_sdk) = None;
        }
        if !r.cached {
            eprintln!(
                "coworkvm-agent: receiving SDK {} ({} bytes)",
                p.version,
                p.size.unwrap_or(0)
            );
        }
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    pub fn install_sdk_chunk(&self, c: &InstallSdkChunkParams) -> Result<Value, RequestError> {
        let r = self.sdk_store()?.chunk(c)?;
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    pub fn install_sdk_commit(&self, version: &str) -> Result<Value, RequestError> {
        let r = self.sdk_store()?.commit(version)?;
        *lock(&self.shared_sdk) = None;
        eprintln!("coworkvm-agent: SDK {version} installed at {}", r.path);
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    /// `installSdk` with `sharedPath`: the version directory granted
    /// through the share becomes the runtime, nothing is copied; answered
    /// as a cached install.
    fn install_shared_sdk(
        &self,
        p: &InstallSdkParams,
        shared_path: &str,
    ) -> Result<Value, RequestError> {
        let share = self.share.as_ref().ok_or(ShareError::NoShare)?;
        // A transfer this replaces is dropped, as a new installSdk does.
        if let Some(sdk) = &self.sdk {
            lock(sdk).abort();
        }
        let bin = share.bind_sdk(&p.version, shared_path)?;
        eprintln!(
            "coworkvm-agent: SDK {} from the shared folder, at {}",
            p.version,
            bin.display()
        );
        *lock(&self.shared_sdk) = Some(bin.clone());
        let r = InstallSdkResult {
            cached: true,
            path: Some(bin.to_string_lossy().into_owned()),
        };
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    /// `mountPath`: one more grant in the running session of `processId`.
    pub fn mount_path(&self, m: &MountPathParams) -> Result<Value, RequestError> {
        let share = self.share.as_ref().ok_or(ShareError::NoShare)?;
        share::validate_mount_name(&m.mount_name)?;
        share::validate_share_path(&m.subpath)?;
        let grant = Grant {
            name: m.mount_name.clone(),
            path: m.subpath.clone(),
            mode: MountMode::parse(&m.mode)?,
        };
        let session = self
            .procs
            .running_session_of(&m.process_id)
            .ok_or_else(|| ShareError::NoSuchProcess(m.process_id.chars().take(128).collect()))?;
        share.mount_into_running(&session, &grant)?;
        let guest_path = self
            .sessions_root()
            .join(&session)
            .join("mnt")
            .join(&grant.name);
        let r = MountPathResult {
            guest_path: Some(guest_path.to_string_lossy().into_owned()),
        };
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    fn sdk_store(&self) -> Result<MutexGuard<'_, SdkStore>, RequestError> {
        let sdk = self.sdk.as_ref().ok_or(RequestError::NoSdkStore)?;
        Ok(lock(sdk))
    }

    /// The installed SDK's binary, if any.
    fn sdk_current(&self) -> Option<PathBuf> {
        if let Some(bin) = lock(&self.shared_sdk).clone() {
            return Some(bin);
        }
        let sdk = self.sdk.as_ref()?;
        lock(sdk).current()
    }

    pub fn add_oauth_token(&self, token: Secret<String>) {
        let mut tokens = lock(&self.oauth_tokens);
        tokens.retain(|t| t.expose() != token.expose());
        tokens.push(token);
        if tokens.len() > MAX_TOKENS {
            tokens.remove(0);
        }
        crate::debug!("approved OAuth tokens held: {}", tokens.len());
    }

    /// `egress.probe`: one probe stream to the host.
    pub fn egress_probe(&self, p: &EgressProbeParams) -> Result<Value, RequestError> {
        Ok(self.egress.probe(p)?)
    }

    pub fn disk_info(&self) -> Result<Value, RequestError> {
        let r = self.sessions()?.disk_info()?;
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    pub fn delete_sessions(&self, names: &[String]) -> Result<Value, RequestError> {
        let running = self.procs.running_sessions();
        let r = self.sessions()?.delete(names, &running);
        if !r.deleted.is_empty() {
            eprintln!("coworkvm-agent: deleted sessions {:?}", r.deleted);
        }
        // A deleted session's namespace and proxies go with it.
        for name in &r.deleted {
            self.egress.forget(name);
        }
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    pub fn prune(&self, p: &PruneSessionCachesParams) -> Result<Value, RequestError> {
        let running = self.procs.running_sessions();
        let r = self.sessions()?.prune(p, &running)?;
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }
}

/// `additionalMounts` (the client's `{mountName: spec}` map, or a list):
/// each one in `failedMounts` by name, for an agent that cannot mount them
/// (no shared-folder device, no sandbox). `None` when none were asked for.
pub fn failed_mounts(m: Option<&Value>) -> Option<Vec<String>> {
    let names = guest::failed_mount_names(m?);
    (!names.is_empty()).then_some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asked_mount_fails_by_name() {
        assert_eq!(failed_mounts(None), None);
        assert_eq!(failed_mounts(Some(&json!({}))), None);
        assert_eq!(failed_mounts(Some(&Value::Null)), None);
        let f = failed_mounts(Some(
            &json!({"outputs": {"path": "/x", "mode": "rw"}, "in": {}}),
        ))
        .unwrap();
        assert_eq!(f, ["in", "outputs"]);
        let r = serde_json::to_value(SpawnResult {
            failed_mounts: Some(f),
        })
        .unwrap();
        assert_eq!(r, json!({"failedMounts": ["in", "outputs"]}));
        assert_eq!(
            serde_json::to_value(SpawnResult {
                failed_mounts: None
            })
            .unwrap(),
            json!({})
        );
    }

    fn agent_on(dir: &Path) -> Agent {
        std::fs::create_dir_all(dir.join("sessions")).unwrap();
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        let s = Sessions::open(&dir.join("sessions"), &dir.join("etc")).unwrap();
        Agent::new(
            Procs::default(),
            dir.join("sessions"),
            Some(s),
            None,
            WithoutSandbox::RunDirectly,
        )
    }

    #[test]
    fn tokens_are_kept_without_duplicates_and_never_printed() {
        let d = tempfile::tempdir().unwrap();
        let a = agent_on(d.path());
        a.add_oauth_token(Secret::new("sk-ant-secret-1".into()));
        a.add_oauth_token(Secret::new("sk-ant-secret-1".into()));
        a.add_oauth_token(Secret::new("sk-ant-secret-2".into()));
        assert_eq!(a.oauth_tokens.lock().unwrap().len(), 2);
        assert!(!format!("{:?}", a.oauth_tokens).contains("sk-ant"));
        for i in 0..100 {
            a.add_oauth_token(Secret::new(format!("t{i}")));
        }
        let tokens = a.oauth_tokens.lock().unwrap();
        assert_eq!(tokens.len(), MAX_TOKENS);
        assert_eq!(tokens.last().unwrap().expose(), "t99");
    }

    #[test]
    fn without_a_session_disk_the_disk_methods_say_so() {
        let a = Agent::new(
            Procs::default(),
            "/nonexistent".into(),
            None,
            None,
            WithoutSandbox::RunDirectly,
        );
        assert!(matches!(a.disk_info(), Err(RequestError::NoSessionDisk)));
        assert!(matches!(
            a.delete_sessions(&["x".into()]),
            Err(RequestError::NoSessionDisk)
        ));
        let e = a.install_sdk(&InstallSdkParams::default()).unwrap_err();
        assert!(matches!(e, RequestError::NoSdkStore), "{e}");
        assert!(e.to_string().contains("not mounted"), "{e}");
        assert!(!a.capabilities().contains(&"sandbox".to_string()));
    }

    #[test]
    fn only_a_rootfs_on_the_command_line_makes_the_sandbox_mandatory() {
        assert!(names_a_rootfs(
            "console=ttyS0 coworkvm.rootfs=vda coworkvm.sessions=vdb"
        ));
        // A value the agent would not mount is still a rootfs boot.
        assert!(names_a_rootfs("coworkvm.rootfs=../x"));
        assert!(names_a_rootfs("coworkvm.rootfs="));
        assert!(!names_a_rootfs("console=ttyS0 coworkvm.sessions=vdb"));
        assert!(!names_a_rootfs("xcoworkvm.rootfs=vda"));
        let why = ["/sessions is not mounted".to_owned()];
        assert_eq!(
            WithoutSandbox::decide(true, &why),
            WithoutSandbox::Refuse(
                "sessions are unavailable: /sessions is not mounted; refusing to run unsandboxed"
                    .into()
            )
        );
        assert_eq!(
            WithoutSandbox::decide(false, &why),
            WithoutSandbox::RunDirectly
        );
    }

    fn spawn_params(id: &str, sandbox: Option<bool>) -> SpawnParams {
        serde_json::from_value(json!({
            "id": id, "name": "alpha", "command": "true", "isResume": false,
            "sandbox": sandbox,
        }))
        .unwrap()
    }

    /// The Debian rootfs without a session disk or bwrap: a session spawn
    /// is refused, never run as root; no `sandbox` capability.
    #[test]
    fn in_the_rootfs_a_session_without_a_sandbox_is_refused() {
        let why = [
            "/sessions is not mounted".to_owned(),
            "/usr/bin/bwrap is absent".to_owned(),
        ];
        let a = Agent::new(
            Procs::default(),
            "/nonexistent".into(),
            None,
            None,
            WithoutSandbox::decide(true, &why),
        );
        for sandbox in [None, Some(true)] {
            let e = a.spawn(&spawn_params("s", sandbox)).unwrap_err();
            assert_eq!(
                e.to_string(),
                "sessions are unavailable: /sessions is not mounted; /usr/bin/bwrap is absent; \
                 refusing to run unsandboxed"
            );
        }
        assert!(!a.procs.is_in_use("s"), "nothing was started");
        assert!(!a.capabilities().contains(&"sandbox".to_string()));
        // With a session disk but no sandbox: refused all the same.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sessions")).unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        let s = Sessions::open(&d.path().join("sessions"), &d.path().join("etc")).unwrap();
        let a = Agent::new(
            Procs::default(),
            d.path().join("sessions"),
            Some(s),
            None,
            WithoutSandbox::decide(true, &["/usr/bin/bwrap is absent".to_owned()]),
        );
        let e = a.spawn(&spawn_params("s", None)).unwrap_err().to_string();
        assert!(e.contains("/usr/bin/bwrap is absent"), "{e}");
        assert!(e.contains("refusing to run unsandboxed"), "{e}");
        assert!(!a.capabilities().contains(&"sandbox".to_string()));
        assert!(!d.path().join("sessions/alpha").exists());
    }

    /// The VM owner's `sandbox: false` (coworkvm run's root command) is not
    /// a session and runs; the test initramfs runs sessions directly.
    #[test]
    fn root_commands_and_the_initramfs_run_directly() {
        let a = Agent::new(
            Procs::default(),
            "/nonexistent".into(),
            None,
            None,
            WithoutSandbox::decide(true, &["/sessions is not mounted".to_owned()]),
        );
        a.spawn(&spawn_params("root", Some(false))).unwrap();
        assert!(a.procs.is_in_use("root"));
        let a = Agent::new(
            Procs::default(),
            "/nonexistent".into(),
            None,
            None,
            WithoutSandbox::decide(false, &["/sessions is not mounted".to_owned()]),
        );
        a.spawn(&spawn_params("initramfs", None)).unwrap();
        assert!(a.procs.is_in_use("initramfs"));
        assert!(!a.capabilities().contains(&"sandbox".to_string()));
    }

    /// Without a shared-folder device: no capability, mountPath and a
    /// shared installSdk say so, and spawn's mounts all fail by name.
    #[test]
    fn without_a_share_mounts_fail_clearly() {
        let d = tempfile::tempdir().unwrap();
        let a = agent_on(d.path());
        assert!(!a
            .capabilities()
            .contains(&guest::SHARE_CAPABILITY.to_string()));
        let e = a
            .mount_path(&MountPathParams {
                process_id: "p".into(),
                subpath: "home/u".into(),
                mount_name: "m".into(),
                mode: "ro".into(),
            })
            .unwrap_err();
        assert!(matches!(e, RequestError::Share(ShareError::NoShare)), "{e}");
        assert!(e.to_string().contains("no shared-folder"), "{e}");
        let e = a
            .install_sdk(&InstallSdkParams {
                version: "1.0".into(),
                shared_path: Some("home/u/sdk/1.0".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(e, RequestError::Share(ShareError::NoShare)), "{e}");
        let mut p = spawn_params("nm", Some(false));
        p.additional_mounts = Some(json!({"work": {"path": "home/u/w", "mode": "rw"}}));
        assert_eq!(a.spawn(&p).unwrap(), json!({"failedMounts": ["work"]}));
    }

    #[test]
    fn claude_resolves_to_the_installed_sdk() {
        let d = tempfile::tempdir().unwrap();
        let a = agent_on(d.path());
        assert_eq!(a.resolve_program("claude").unwrap().0, "claude");
        assert!(matches!(
            a.resolve_program("/usr/local/bin/claude"),
            Err(RequestError::NoRuntime(_))
        ));
        let data = b"#!/bin/sh\necho sdk\n";
        use sha2::Digest;
        a.install_sdk(&InstallSdkParams {
            sdk_subpath: "x".into(),
            version: "3.1".into(),
            sha256: Some(socket_proto::manifest::hex(&sha2::Sha256::digest(data))),
            size: Some(data.len() as u64),
            shared_path: None,
        })
        .unwrap();
        use base64::Engine;
        a.install_sdk_chunk(&InstallSdkChunkParams {
            version: "3.1".into(),
            offset: 0,
            data: base64::engine::general_purpose::STANDARD.encode(data),
        })
        .unwrap();
        a.install_sdk_commit("3.1").unwrap();
        let root = d.path().join("sessions").canonicalize().unwrap();
        // The bare name and the client's absolute path: the same binary.
        for command in ["claude", "/usr/local/bin/claude"] {
            let (prog, dir) = a.resolve_program(command).unwrap();
            assert_eq!(
                prog,
                root.join(".coworkvm/sdk/3.1/claude").to_string_lossy()
            );
            assert_eq!(dir, Some(root.join(".coworkvm/sdk/3.1")));
        }
        // Other commands stay as they are, with the SDK on PATH.
        let (prog, dir) = a.resolve_program("sh").unwrap();
        assert_eq!(prog, "sh");
        assert!(dir.is_some());
    }
}
