//! Method dispatch: one decoded request in, one response out.
//!
//! `subscribeEvents` is not here: it changes what the connection does, so
//! the server handles it.

use std::path::{Component, Path, PathBuf};

use serde_json::Value;
use std::sync::Arc;

use coworkvm_bundle::SESSION_DISK_FILE;
use socket_proto::guest::{
    failed_mount_names, GuestError, GuestFrame, GuestNotification, SHARE_CAPABILITY,
};
use socket_proto::host::{
    ConnectedResult, DeleteSessionDirsResult, HostMethod, HostRequest, InstallSdkParams,
    MountPathParams, NetworkDrivesResult, ProcessRunningResult, PruneSessionCachesResult,
    ReadFileParams, RunningResult, SessionsDiskInfo, SpawnParams, SpawnResult,
};
use socket_proto::redact::Redacted;
use socket_proto::Response;

use super::agent::{AgentClient, AgentError, REQUEST_TIMEOUT, SANDBOX_CAPABILITY};
use super::egress;
use super::grants::{SessionShares, SpawnGrants};
use super::lock;
use super::mounts::{DenyConfig, MountPolicy};
use super::sdk_copy::{Begin, CopyState, SdkCopies};
use super::vm::Sizing;
use super::Helper;
use socket_proto::egress::EGRESS_CAPABILITY;

/// Why `installSdk` could not find a usable SDK on the host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SdkError {
    /// No home directory to resolve `sdkSubpath` against.
    #[error("installSdk: no home directory (HOME is unset)")]
    NoHome,
    /// `sdkSubpath` or `version` would leave the home directory.
    #[error("installSdk: {0:?} must be a path inside the home directory")]
    OutsideHome(String),
    /// The download is not complete: no `.verified` beside the binary.
    #[error("SDK version {version} not verified at {}", .dir.display())]
    NotVerified {
        /// The requested version.
        version: String,
        /// The version directory that lacks `.verified`.
        dir: PathBuf,
    },
    /// `.verified` but no binary.
    #[error("SDK version {version}: no binary at {}", .path.display())]
    NoBinary {
        /// The requested version.
        version: String,
        /// Where the binary should be.
        path: PathBuf,
    },
}

/// Why copying the SDK into the guest failed.
#[derive(Debug, thiserror::Error)]
pub enum SdkUploadError {
    /// The transfer failed (the host file, or the agent's answer).
    #[error("installSdk: {0}")]
    Upload(#[from] socket_proto::sdk::UploadError),
    /// The blocking task that reads and sends the binary died.
    #[error("installSdk: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why `getSessionsDiskInfo` has no host view of the session disk.
#[derive(Debug, thiserror::Error)]
pub enum HostDiskInfoError {
    /// No `createVM` or `startVM` has named a bundle yet.
    #[error(
        "getSessionsDiskInfo: the guest is not connected, and no createVM or startVM \
         has named a bundle yet"
    )]
    NoBundle,
    /// The bundle has no session disk (yet).
    #[error("getSessionsDiskInfo: the guest is not connected, and {} has no {SESSION_DISK_FILE} yet", .0.display())]
    NoDisk(PathBuf),
    /// The session disk is not a regular file (a link is not followed).
    #[error("getSessionsDiskInfo: {} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// `stat` or `statvfs` failed.
    #[error("getSessionsDiskInfo: cannot examine {}: {source}", .path.display())]
    Stat {
        /// What was examined.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// `getSessionsDiskInfo` from the host, for when no guest answers: the
/// bundle's `sessiondata.img` as the host sees it. `totalBytes` is its
/// apparent size (what the guest sees), `freeBytes` that less the bytes
/// the host has allocated to it (`st_blocks` * 512), and never more than
/// the host file system can still give it (a sparse image can promise more
/// than the host has). The file system inside may have freed blocks that
/// the host still holds, so this is a floor on the guest's free space.
/// No per-session list: only the guest can read the sessions.
pub fn host_sessions_disk_info(bundle: &Path) -> Result<SessionsDiskInfo, HostDiskInfoError> {
    use std::os::unix::fs::MetadataExt;
    let path = bundle.join(SESSION_DISK_FILE);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HostDiskInfoError::NoDisk(bundle.to_owned()))
        }
        Err(source) => return Err(HostDiskInfoError::Stat { path, source }),
    };
    if !meta.is_file() {
        return Err(HostDiskInfoError::NotAFile(path));
    }
    let total = meta.size();
    let allocated = meta.blocks().saturating_mul(512);
    let host_free = host_available_bytes(bundle).map_err(|source| HostDiskInfoError::Stat {
        path: bundle.to_owned(),
        source,
    })?;
    Ok(SessionsDiskInfo {
        total_bytes: total,
        free_bytes: total.saturating_sub(allocated).min(host_free),
        sessions: Vec::new(),
    })
}

/// Bytes an unprivileged user can still write on the file system of `dir`.
fn host_available_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all-zero is a valid `statvfs` (plain integers).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `st`
    // is a valid, writable `statvfs` that the call fills.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // The field types differ by target.
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The session a `readFile` is about: `processName`, else the `<name>` of
/// a `filePath` under `/sessions/<name>/`.
fn read_file_session(p: &ReadFileParams) -> Option<ReadFileParams> {
    if !p.process_name.is_empty() {
        return Some(p.clone());
    }
    let mut parts = Path::new(&p.file_path).components();
    let (Some(Component::RootDir), Some(Component::Normal(top)), Some(Component::Normal(name))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if top != "sessions" {
        return None;
    }
    Some(ReadFileParams {
        process_name: name.to_str()?.to_owned(),
        file_path: p.file_path.clone(),
    })
}

fn plain_relative(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// `$HOME/<sdkSubpath>/<version>/claude`, checked: `sdkSubpath` is relative
/// to home (an absolute path already inside home is taken as is), and the
/// `.verified` file must lie beside the binary.
pub fn resolve_sdk(home: Option<&Path>, p: &InstallSdkParams) -> Result<PathBuf, SdkError> {
    let home = home.ok_or(SdkError::NoHome)?;
    let sub = Path::new(&p.sdk_subpath);
    let base = if sub.is_absolute() {
        match sub.strip_prefix(home) {
            Ok(rest) if plain_relative(rest) => sub.to_owned(),
            _ => return Err(SdkError::OutsideHome(p.sdk_subpath.clone())),
        }
    } else if plain_relative(sub) {
        home.join(sub)
    } else {
        return Err(SdkError::OutsideHome(p.sdk_subpath.clone()));
    };
    let version = Path::new(&p.version);
    if p.version.is_empty() || !plain_relative(version) || version.components().count() != 1 {
        return Err(SdkError::OutsideHome(p.version.clone()));
    }
    let dir = base.join(version);
    if !dir.join(".verified").is_file() {
        return Err(SdkError::NotVerified {
            version: p.version.clone(),
            dir,
        });
    }
    let bin = dir.join("claude");
    if !bin.is_file() {
        return Err(SdkError::NoBinary {
            version: p.version.clone(),
            path: bin,
        });
    }
    Ok(bin)
}

/// Puts the verified SDK binary at `path` into the guest as `version`,
/// through the agent's SDK transfer extension (`installSdk` with its hash
/// and size, then `installSdk.chunk`s, then `installSdk.commit`; see
/// `socket_proto::sdk`). The file is read and hashed on a blocking thread;
/// each request goes through the agent connection like any other. Owns
/// what it uses, so that it can run as a task of its own
/// ([`crate::sdk_copy`]).
pub async fn upload_sdk(
    agent: Arc<AgentClient>,
    path: PathBuf,
    sdk_subpath: String,
    version: String,
) -> Result<(), SdkUploadError> {
    let handle = tokio::runtime::Handle::current();
    let ver = version.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        socket_proto::sdk::upload_sdk(&path, &sdk_subpath, &ver, |req| {
            handle
                .block_on(agent.request(&req, REQUEST_TIMEOUT))
                .map_err(|e| match e {
                    AgentError::Guest(g) => g,
                    other => GuestError::Text(other.to_string()),
                })
        })
    })
    .await??;
    if outcome.cached {
        tracing::info!(
            "installSdk: version {version} already in the guest at {}",
            outcome.guest_path
        );
    } else {
        tracing::info!(
            "installSdk: version {version} copied into the guest ({} bytes in {} chunks) at {}",
            outcome.bytes_sent,
            outcome.chunks,
            outcome.guest_path
        );
    }
    Ok(())
}

/// `installSdk`'s answer for the copy `state`, waited for until
/// `deadline`: its outcome, or success while it runs on (a runtime spawn
/// then waits for it).
async fn answer_copy(
    req: &HostRequest,
    copies: &SdkCopies,
    version: &str,
    state: tokio::sync::watch::Receiver<CopyState>,
    deadline: tokio::time::Instant,
) -> Response {
    let now = copies.wait(state.clone(), deadline).await;
    copies.answered(&state, &now);
    match now {
        CopyState::Done => req.ok(),
        CopyState::Failed(e) => req.err(e),
        CopyState::Running => {
            tracing::info!(
                "installSdk: {version} is still being copied into the guest; answered now, and a \
                 spawn of the runtime waits for the copy"
            );
            req.ok()
        }
    }
}

fn from_agent(req: &HostRequest, r: Result<Value, AgentError>) -> Response {
    match r {
        Ok(Value::Null) => req.ok(),
        Ok(v) if v.as_object().is_some_and(|m| m.is_empty()) => req.ok(),
        Ok(v) => Response::ok(req.id.clone(), Some(v)),
        Err(e) => req.err(e.to_string()),
    }
}

async fn spawn(helper: &Helper, req: &HostRequest, p: &SpawnParams) -> Response {
    let Some(agent) = helper.vm.agent().filter(|a| a.is_connected()) else {
        return req.err(AgentError::NotConnected.to_string());
    };
    // Fail closed: an agent that cannot sandbox the process would run it
    // as root in the guest, beside every other session.
    if !agent.has_capability(SANDBOX_CAPABILITY) {
        tracing::warn!("spawn {} refused: {}", p.id, AgentError::NoSandbox);
        return req.err(AgentError::NoSandbox.to_string());
    }
    // The runtime may still be on its way in (installSdk by copy answers
    // before a slow copy ends).
    if socket_proto::sdk::RUNTIME_COMMANDS.contains(&p.command.as_str()) {
        if let Err(why) = helper.sdk_copies.ready_for_spawn(&agent).await {
            tracing::info!("spawn {} refused: {why}", p.id);
            return req.err(why);
        }
    }
    let mut forwarded = p.clone();
    let (mut ours, shares) = match &p.additional_mounts {
        None => (Vec::new(), None),
        Some(requested) => match grant_spawn_mounts(helper, &agent, p, requested) {
            Ok((g, shares)) => {
                forwarded.additional_mounts =
                    (!g.forward.is_empty()).then_some(Value::Object(g.forward));
                (g.failed, Some(shares))
            }
            Err(why) => {
                let names = failed_mount_names(requested);
                if !names.is_empty() {
                    tracing::info!("spawn {}: mounts {names:?} failed: {why}", p.id);
                }
                forwarded.additional_mounts = None;
                (names, None)
            }
        },
    };
    // coworkvm's own spawn extensions are for `coworkvm run` only: a client
    // of this socket never runs outside the session sandbox.
    forwarded.sandbox = None;
    forwarded.encoding = None;
    // The session's network: its policy is in place before any of its
    // processes can open a stream, and the spawn gets the proxy variables
    // (and the OAuth token) when the agent runs the proxies.
    if let Some(policies) = helper.vm.egress_policies() {
        policies.record(&p.name, p.allowed_domains.as_deref());
    }
    let approved = lock(&helper.approved_token).clone();
    forwarded.env = egress::spawn_env(
        p.env.as_ref(),
        agent.has_capability(EGRESS_CAPABILITY),
        p.oauth_token.as_ref().or(approved.as_ref()),
    );
    tracing::info!(
        "spawn {} in session {}: {} ({} args)",
        p.id,
        p.name,
        p.command,
        p.args.len()
    );
    let guest = socket_proto::GuestRequest::Spawn(Box::new(forwarded));
    agent.process_starting(&p.id);
    match agent.request(&guest, REQUEST_TIMEOUT).await {
        Ok(v) => {
            let theirs: SpawnResult = serde_json::from_value(v).unwrap_or_default();
            ours.extend(theirs.failed_mounts.unwrap_or_default());
            let result = SpawnResult {
                failed_mounts: (!ours.is_empty()).then_some(ours),
            };
            req.ok_with(&result)
        }
        Err(e) => {
            agent.process_not_started(&p.id);
            if let Some(s) = shares {
                // An agent that never tracked the process releases nothing.
                s.process_ended(&p.id);
            }
            tracing::warn!("spawn {}: {e}", p.id);
            req.err(e.to_string())
        }
    }
}

/// The mount policy for this helper's user.
fn mount_policy(helper: &Helper) -> Result<MountPolicy, String> {
    let home = helper
        .home
        .clone()
        .ok_or_else(|| "no home directory (HOME is unset)".to_owned())?;
    MountPolicy::new(home, &DenyConfig::default()).map_err(|e| e.to_string())
}

/// Plans and grants a spawn's `additionalMounts`; `Err` is why none of
/// them can be made (no shared folders in this VM, an agent that cannot
/// mount them).
fn grant_spawn_mounts(
    helper: &Helper,
    agent: &AgentClient,
    p: &SpawnParams,
    requested: &Value,
) -> Result<(SpawnGrants, Arc<SessionShares>), String> {
    let shares = helper.vm.shares()?;
    if !agent.has_capability(SHARE_CAPABILITY) {
        return Err("the guest agent has no shared-folder device mounted".into());
    }
    let policy = mount_policy(helper)?;
    let plan = policy.plan_additional_mounts(requested);
    let g = shares.grant_for_spawn(&p.name, &p.id, &plan);
    if !g.failed.is_empty() {
        tracing::info!("spawn {}: mounts {:?} failed", p.id, g.failed);
    }
    Ok((g, shares))
}

/// `mountPath`'s params with its defaults filled in; `None` when there is
/// nothing to mount (no `subpath`).
fn mount_path_defaults(p: &MountPathParams) -> Option<MountPathParams> {
    if p.subpath.is_empty() {
        return None;
    }
    let mut p = p.clone();
    // No name: the folder's own (the JS peer's `mountName || subpath`,
    // kept to one component, which the policy then validates).
    if p.mount_name.is_empty() {
        p.mount_name = Path::new(&p.subpath)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
    // No mode: read-only. The peers make it read-write; a folder the client
    // did not say may be written is not.
    if p.mode.is_empty() {
        p.mode = "ro".into();
    }
    Some(p)
}

/// `mountPath`: one more grant for the session of a running process, then
/// the agent's bind of it.
async fn mount_path(helper: &Helper, req: &HostRequest, p: &MountPathParams) -> Response {
    // Nothing to mount: done (the Go peer answers the same).
    let Some(p) = mount_path_defaults(p) else {
        tracing::info!("mountPath without a subpath: nothing to mount");
        return req.ok();
    };
    let p = &p;
    let Some(agent) = helper.vm.agent().filter(|a| a.is_connected()) else {
        return req.err(AgentError::NotConnected.to_string());
    };
    let shares = match helper.vm.shares() {
        Ok(s) if agent.has_capability(SHARE_CAPABILITY) => s,
        Ok(_) => return req.err("mountPath: the guest agent has no shared-folder device mounted"),
        Err(why) => return req.err(format!("mountPath: {why}")),
    };
    let Some(session) = shares.session_of(&p.process_id) else {
        return req.err(format!("mountPath: no running process {:?}", p.process_id));
    };
    let policy = match mount_policy(helper) {
        Ok(pol) => pol,
        Err(why) => return req.err(format!("mountPath: {why}")),
    };
    let planned = match policy.plan_mount_path(p, &shares.mounted(&session)) {
        Ok(m) => m,
        Err(e) => return req.err(format!("mountPath: {e}")),
    };
    let share_path = match shares.grant_to_session(&session, &planned) {
        Ok(sp) => sp,
        Err(e) => {
            tracing::warn!("mountPath {:?}: {e}", p.mount_name);
            return req.err(format!("mountPath: {e}"));
        }
    };
    let mut forwarded = p.clone();
    forwarded.subpath = share_path;
    forwarded.mode = planned.mode.as_str().to_owned();
    tracing::info!(
        "mountPath {:?} for session {session:?}: {}",
        p.mount_name,
        planned.host_path.display()
    );
    from_agent(
        req,
        agent
            .request(
                &socket_proto::GuestRequest::MountPath(forwarded),
                REQUEST_TIMEOUT,
            )
            .await,
    )
}

/// `installSdk` through the share: the version directory granted
/// read-only to the VM, the agent told where it is. `Err` is why not (the
/// caller copies the binary instead).
async fn install_sdk_shared(
    helper: &Helper,
    agent: &AgentClient,
    p: &InstallSdkParams,
    bin: &Path,
) -> Result<(), String> {
    let shares = helper.vm.shares()?;
    if !agent.has_capability(SHARE_CAPABILITY) {
        return Err("the guest agent did not mount the share".into());
    }
    let dir = bin.parent().ok_or("the SDK binary has no directory")?;
    let policy = mount_policy(helper)?;
    let rel = dir.to_string_lossy().trim_start_matches('/').to_owned();
    let plan =
        policy.plan_additional_mounts(&serde_json::json!({"sdk": {"path": rel, "mode": "ro"}}));
    let Some(m) = plan.mounts.first() else {
        let why = plan.failed.first().map(|f| f.reason.to_string());
        return Err(why.unwrap_or_else(|| "the SDK directory cannot be shared".into()));
    };
    let share_path = shares.grant_to_vm(m)?;
    let guest = socket_proto::GuestRequest::InstallSdk(InstallSdkParams {
        shared_path: Some(share_path.clone()),
        sha256: None,
        size: None,
        ..p.clone()
    });
    agent
        .request(&guest, REQUEST_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        "installSdk: version {} shared read-only into the guest from {}",
        p.version,
        dir.display()
    );
    Ok(())
}

/// The answer, with no guest connected, of a method the guest serves.
fn without_guest(helper: &Helper, req: &HostRequest) -> Response {
    let not_connected = AgentError::NotConnected.to_string();
    match &req.method {
        // Nothing runs without a guest, so there is nothing to signal: done,
        // as the Go peer's KVM backend answers (and the JS peer for an
        // unknown id).
        HostMethod::Kill(k) => {
            tracing::info!("kill {}: no guest is connected, nothing runs", k.id);
            req.ok()
        }
        HostMethod::GetSessionsDiskInfo(_) => {
            let Some(bundle) = helper.vm.bundle_dir() else {
                return req.err(HostDiskInfoError::NoBundle.to_string());
            };
            match host_sessions_disk_info(&bundle) {
                Ok(info) => req.ok_with(&info),
                Err(e) => req.err(e.to_string()),
            }
        }
        // Nothing pruned: the sessions' caches are in the guest.
        HostMethod::PruneSessionCaches(_) => req.ok_with(&PruneSessionCachesResult::default()),
        // Each name fails with the reason; the sessions are in the guest.
        HostMethod::DeleteSessionDirs(d) => req.ok_with(&DeleteSessionDirsResult {
            deleted: Vec::new(),
            errors: d
                .names
                .iter()
                .take(MAX_OFFLINE_DELETE_NAMES)
                .map(|n| (n.chars().take(256).collect(), not_connected.clone()))
                .collect(),
        }),
        _ => req.err(not_connected),
    }
}

/// The most names a `deleteSessionDirs` without a guest answers for (the
/// frame bound limits the request; this bounds the answer's work).
const MAX_OFFLINE_DELETE_NAMES: usize = 1024;

/// Answers one request (anything but `subscribeEvents`).
pub async fn dispatch(helper: &Helper, req: HostRequest) -> Response {
    tracing::debug!("request {}", Redacted(&req));
    let vm = &helper.vm;
    match &req.method {
        HostMethod::Configure(c) => {
            vm.set_virtiofsd(c.virtiofsd_path.as_ref().map(PathBuf::from));
            vm.set_sizing(Sizing {
                mem_mib: c.memory_mb,
                cpus: c.cpu_count,
            });
            tracing::info!(
                "configure: profile {} at {}",
                c.user_data_name.as_deref().unwrap_or("(unnamed)"),
                c.user_data_root
                    .as_deref()
                    .unwrap_or("(no directory given)")
            );
            req.ok()
        }
        HostMethod::SubscribeEvents(_) => req.err("subscribeEvents is handled by the connection"),
        HostMethod::CreateVm(p) => match vm.create_vm(p.clone()).await {
            Ok(()) => req.ok(),
            Err(e) => req.err(e.to_string()),
        },
        HostMethod::StartVm(p) => match vm.start_vm(p.clone()).await {
            Ok(()) => req.ok(),
            Err(e) => req.err(e.to_string()),
        },
        HostMethod::StopVm => match vm.stop_vm().await {
            Ok(()) => req.ok(),
            Err(e) => req.err(e.to_string()),
        },
        HostMethod::IsRunning => req.ok_with(&RunningResult {
            running: vm.is_running(),
        }),
        HostMethod::IsGuestConnected => req.ok_with(&ConnectedResult {
            connected: vm.is_guest_connected(),
        }),
        HostMethod::Spawn(p) => spawn(helper, &req, p).await,
        HostMethod::WriteStdin(p) => match vm.agent() {
            Some(agent) => match agent.notify(&GuestNotification::from(p)).await {
                Ok(()) => req.ok(),
                Err(e) => req.err(e.to_string()),
            },
            None => req.err(AgentError::NotConnected.to_string()),
        },
        HostMethod::IsProcessRunning(p) => match vm.agent().filter(|a| a.is_connected()) {
            // No VM, or no guest yet or any more: nothing runs (a guest's
            // processes are reported lost when its channel ends). No id:
            // no process.
            _ if p.id.is_empty() => req.ok_with(&ProcessRunningResult {
                running: false,
                exit_code: None,
            }),
            None => req.ok_with(&ProcessRunningResult {
                running: false,
                exit_code: None,
            }),
            Some(agent) => {
                let guest = req.method.to_guest_request();
                match guest {
                    Some(g) => from_agent(&req, agent.request(&g, REQUEST_TIMEOUT).await),
                    None => req.err(format!("isProcessRunning {}: not forwardable", p.id)),
                }
            }
        },
        HostMethod::SendGuestResponse(p) => match vm.agent() {
            Some(agent) => match agent.send_frame(&GuestFrame::from(p)).await {
                Ok(()) => req.ok(),
                Err(e) => req.err(e.to_string()),
            },
            None => req.err(AgentError::NotConnected.to_string()),
        },
        HostMethod::SetDebugLogging(p) => {
            if let Some(switch) = &helper.debug_switch {
                switch(p.enabled);
            }
            tracing::info!("debug logging {}", if p.enabled { "on" } else { "off" });
            if let Some(agent) = vm.agent().filter(|a| a.is_connected()) {
                if let Some(g) = req.method.to_guest_request() {
                    // An agent without debug logging is no reason to fail.
                    if let Err(e) = agent.request(&g, REQUEST_TIMEOUT).await {
                        tracing::debug!("setDebugLogging in the guest: {e}");
                    }
                }
            }
            req.ok()
        }
        HostMethod::InstallSdk(p) => {
            let bin = match resolve_sdk(helper.home.as_deref(), p) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("{e}");
                    return req.err(e.to_string());
                }
            };
            let Some(agent) = vm.agent() else {
                return req.err(AgentError::NotConnected.to_string());
            };
            let copies = &helper.sdk_copies;
            let deadline = copies.deadline();
            let held = match copies.begin(&agent, &p.version, deadline).await {
                Begin::Install(held) => held,
                // A retry of a copy under way (the client gave up on the
                // first request): a second transfer would abort the first.
                Begin::Join(state) => {
                    tracing::info!(
                        "installSdk: {} is being copied already; waiting for it",
                        p.version
                    );
                    return answer_copy(&req, copies, &p.version, state, deadline).await;
                }
                Begin::Busy => {
                    return req.err(format!(
                        "installSdk {}: another SDK install is under way (a copy into the guest); \
                         installSdk again when it is done",
                        p.version
                    ))
                }
            };
            if copies.copied(&agent, &p.version) {
                return req.ok();
            }
            match install_sdk_shared(helper, &agent, p, &bin).await {
                Ok(()) => {
                    copies.forget();
                    return req.ok();
                }
                Err(why) => tracing::info!("installSdk: copying the binary ({why})"),
            }
            let copy = upload_sdk(agent.clone(), bin, p.sdk_subpath.clone(), p.version.clone());
            let state = copies.start(&agent, &p.version, held, async move {
                copy.await.map_err(|e| e.to_string())
            });
            answer_copy(&req, copies, &p.version, state, deadline).await
        }
        HostMethod::MountPath(p) => mount_path(helper, &req, p).await,
        HostMethod::AddApprovedOauthToken(p) => {
            if p.token.expose().is_empty() {
                tracing::info!("addApprovedOauthToken without a token: nothing changes");
                return req.ok();
            }
            // Kept for the spawns that carry no oauthToken of their own
            // (CLAUDE_CODE_OAUTH_TOKEN), then passed to the agent when one
            // is connected. Before the guest runs, keeping it is the whole
            // job: every later spawn gets it (as in both peers).
            *lock(&helper.approved_token) = Some(p.token.clone());
            match (
                req.method.to_guest_request(),
                vm.agent().filter(|a| a.is_connected()),
            ) {
                (Some(g), Some(agent)) => {
                    from_agent(&req, agent.request(&g, REQUEST_TIMEOUT).await)
                }
                (_, None) => req.ok(),
                (None, _) => req.err("addApprovedOauthToken is not forwardable"),
            }
        }
        HostMethod::ReadFile(p) => {
            let Some(p) = read_file_session(p) else {
                return req.err(format!(
                    "readFile: no processName, and filePath {:?} is not under /sessions/<name>/",
                    p.file_path.chars().take(256).collect::<String>()
                ));
            };
            match vm.agent() {
                Some(agent) => from_agent(
                    &req,
                    agent
                        .request(&socket_proto::GuestRequest::ReadFile(p), REQUEST_TIMEOUT)
                        .await,
                ),
                None => req.err(AgentError::NotConnected.to_string()),
            }
        }
        HostMethod::GetNetworkDrives => req.ok_with(&NetworkDrivesResult { drives: vec![] }),
        HostMethod::Unknown(name) => {
            tracing::warn!("unknown method {name:?}");
            req.unknown_method()
        }
        // kill and the session-disk methods: to the agent as they are
        // when one is connected; without one, what the host can say.
        m => match (
            m.to_guest_request(),
            vm.agent().filter(|a| a.is_connected()),
        ) {
            (Some(g), Some(agent)) => {
                if let HostMethod::Kill(k) = m {
                    tracing::info!("kill {} ({:?})", k.id, k.signal);
                }
                from_agent(&req, agent.request(&g, REQUEST_TIMEOUT).await)
            }
            (Some(_), None) => without_guest(helper, &req),
            (None, _) => req.err(format!("{} is not served by this helper", m.name())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdk(sub: &str, version: &str) -> InstallSdkParams {
        InstallSdkParams {
            sdk_subpath: sub.into(),
            version: version.into(),
            ..Default::default()
        }
    }

    #[test]
    fn mount_path_defaults_its_name_and_mode() {
        let mp = |sub: &str, name: &str, mode: &str| MountPathParams {
            process_id: "p".into(),
            subpath: sub.into(),
            mount_name: name.into(),
            mode: mode.into(),
        };
        assert_eq!(mount_path_defaults(&mp("", "x", "rw")), None);
        assert_eq!(
            mount_path_defaults(&mp("home/u/docs", "", "")),
            Some(mp("home/u/docs", "docs", "ro"))
        );
        assert_eq!(
            mount_path_defaults(&mp("home/u/docs", "d", "rw")),
            Some(mp("home/u/docs", "d", "rw"))
        );
        // No last component: the name stays empty and the policy refuses it.
        assert_eq!(
            mount_path_defaults(&mp("..", "", "rw")),
            Some(mp("..", "", "rw"))
        );
    }

    #[test]
    fn read_file_takes_the_session_from_the_path() {
        let rf = |name: &str, path: &str| ReadFileParams {
            process_name: name.into(),
            file_path: path.into(),
        };
        assert_eq!(
            read_file_session(&rf("", "/sessions/s1/mnt/outputs/a.txt")),
            Some(rf("s1", "/sessions/s1/mnt/outputs/a.txt"))
        );
        assert_eq!(
            read_file_session(&rf("own", "/anything")),
            Some(rf("own", "/anything"))
        );
        for bad in [
            "/tmp/s1/a",
            "sessions/s1/a",
            "/sessions",
            "/sessions/../etc/x",
            "",
        ] {
            assert_eq!(read_file_session(&rf("", bad)), None, "{bad}");
        }
    }

    #[test]
    fn the_host_view_of_the_session_disk() {
        use std::os::unix::fs::{symlink, FileExt, MetadataExt};
        let dir = std::env::temp_dir().join(format!("coworkvm-diskinfo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            host_sessions_disk_info(&dir),
            Err(HostDiskInfoError::NoDisk(_))
        ));
        let img = dir.join(SESSION_DISK_FILE);
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(32 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.sync_all().unwrap();
        let allocated = std::fs::metadata(&img).unwrap().blocks() * 512;
        let info = host_sessions_disk_info(&dir).unwrap();
        assert_eq!(info.total_bytes, 32 << 20);
        assert_eq!(info.free_bytes, (32 << 20) - allocated);
        assert!(info.sessions.is_empty());
        // Fully allocated (more than its size, with metadata): 0 free.
        let f = std::fs::File::create(&img).unwrap();
        f.write_all_at(&[1u8; 8192], 0).unwrap();
        f.set_len(100).unwrap();
        f.sync_all().unwrap();
        assert_eq!(host_sessions_disk_info(&dir).unwrap().free_bytes, 0);
        // A link in its place is not followed.
        std::fs::remove_file(&img).unwrap();
        symlink("/etc/passwd", &img).unwrap();
        assert!(matches!(
            host_sessions_disk_info(&dir),
            Err(HostDiskInfoError::NotAFile(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sdk_paths_resolve_inside_home_and_need_verified() {
        let home = std::env::temp_dir().join(format!("coworkvm-home-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        let vdir = home.join(".local/sdk/1.2.3");
        std::fs::create_dir_all(&vdir).unwrap();
        std::fs::write(vdir.join("claude"), b"bin").unwrap();

        let e = resolve_sdk(Some(&home), &sdk(".local/sdk", "1.2.3")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("SDK version 1.2.3 not verified at {}", vdir.display())
        );
        std::fs::write(vdir.join(".verified"), b"").unwrap();
        let want = vdir.join("claude");
        assert_eq!(
            resolve_sdk(Some(&home), &sdk(".local/sdk", "1.2.3")).unwrap(),
            want
        );
        // Already inside home: taken as is.
        let abs = home.join(".local/sdk");
        assert_eq!(
            resolve_sdk(Some(&home), &sdk(abs.to_str().unwrap(), "1.2.3")).unwrap(),
            want
        );
        for (sub, v) in [
            ("/etc", "1.2.3"),
            ("../x", "1.2.3"),
            (".local/sdk", "../1.2.3"),
            (".local/sdk", ""),
        ] {
            assert!(
                matches!(
                    resolve_sdk(Some(&home), &sdk(sub, v)),
                    Err(SdkError::OutsideHome(_))
                ),
                "{sub} {v}"
            );
        }
        assert_eq!(
            resolve_sdk(None, &sdk(".local/sdk", "1.2.3")),
            Err(SdkError::NoHome)
        );
        std::fs::remove_dir_all(&home).unwrap();
    }
}
