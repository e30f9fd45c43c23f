//! What the agent holds between requests: the processes, the session disk,
//! the sandbox, the SDK store, the approved tokens; and the requests that
//! use more than one of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::{json, Value};
use socket_proto::host::{InstallSdkParams, PruneSessionCachesParams, SpawnParams, SpawnResult};
use socket_proto::sdk::InstallSdkChunkParams;
use socket_proto::Secret;

use crate::procs::Procs;
use crate::sandbox::{self, SystemEntry};
use crate::sdk::{SdkStore, RUNTIME_COMMANDS};
use crate::sessions::{validate_name, Sessions};

/// The answer to `mountPath` and the reason in `failedMounts`.
pub const NO_SHARING: &str = "folder sharing is not available yet";
/// The most approved tokens kept (the newest win).
const MAX_TOKENS: usize = 32;

pub struct Sandbox {
    pub bwrap: PathBuf,
    pub system: Vec<SystemEntry>,
}

pub struct Agent {
    pub procs: Procs,
    sessions_root: PathBuf,
    sessions: Option<Sessions>,
    sandbox: Option<Sandbox>,
    /// Locked per request: the SDK requests of one transfer come in order.
    sdk: Option<Mutex<SdkStore>>,
    /// `addApprovedOauthToken`: kept in memory only, never logged. The
    /// vendor's guest hands them to its egress proxy (which comes in a
    /// later issue); nothing reads them yet.
    oauth_tokens: Mutex<Vec<Secret<String>>>,
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
    /// The agent as the guest runs it: `/sessions`, `/etc`, `/usr/bin/bwrap`.
    /// Without a mounted session disk or without bwrap (the busybox test
    /// initramfs), spawns run directly as root in `/`, as before; the
    /// reason is logged once, here.
    pub fn detect(procs: Procs) -> Self {
        let root = PathBuf::from("/sessions");
        let sessions = if is_mount_point(&root) {
            match Sessions::open(&root, Path::new("/etc")) {
                Ok(s) => Ok(s),
                Err(e) => Err(format!("the session disk is unusable: {e}")),
            }
        } else {
            Err("no session disk is mounted at /sessions".to_owned())
        };
        let bwrap = Path::new(sandbox::BWRAP);
        // SAFETY: geteuid takes no arguments and cannot fail.
        let root_user = unsafe { libc::geteuid() } == 0;
        let sandbox = if !bwrap.is_file() {
            Err(format!("{} is absent", bwrap.display()))
        } else if !root_user {
            Err("the agent does not run as root".to_owned())
        } else {
            Ok(Sandbox {
                bwrap: bwrap.to_owned(),
                system: sandbox::scan_system(Path::new("/")),
            })
        };
        let mut why = Vec::new();
        if let Err(e) = &sessions {
            why.push(e.clone());
        }
        if let Err(e) = &sandbox {
            why.push(e.clone());
        }
        if why.is_empty() {
            eprintln!(
                "coworkvm-agent: sessions run as their own users under bubblewrap in /sessions/<name>"
            );
        } else {
            eprintln!(
                "coworkvm-agent: spawns run directly as root in /, without a sandbox: {}",
                why.join("; ")
            );
        }
        Self::new(procs, root, sessions.ok(), sandbox.ok())
    }

    pub fn new(
        procs: Procs,
        sessions_root: PathBuf,
        sessions: Option<Sessions>,
        sandbox: Option<Sandbox>,
    ) -> Self {
        let sdk = sessions
            .as_ref()
            .map(|s| Mutex::new(SdkStore::new(s.state_dir().join("sdk"))));
        Agent {
            procs,
            sessions_root,
            sessions,
            sandbox,
            sdk,
            oauth_tokens: Mutex::new(Vec::new()),
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
        c
    }

    pub fn sandboxed(&self) -> bool {
        self.sessions.is_some() && self.sandbox.is_some()
    }

    fn sessions(&self) -> Result<&Sessions, String> {
        self.sessions
            .as_ref()
            .ok_or_else(|| "the session disk is not mounted at /sessions".to_owned())
    }

    /// `claude` (the runtime) is the installed SDK's binary, once there is one.
    fn resolve_program(&self, command: &str) -> (String, Option<PathBuf>) {
        if RUNTIME_COMMANDS.contains(&command) {
            if let Some(bin) = self.sdk_current() {
                let dir = bin.parent().map(Path::to_owned);
                return (bin.to_string_lossy().into_owned(), dir);
            }
        }
        let dir = self
            .sdk_current()
            .and_then(|b| b.parent().map(Path::to_owned));
        (command.to_owned(), dir)
    }

    pub fn spawn(&self, p: &SpawnParams) -> Result<Value, String> {
        validate_name(&p.name)?;
        if self.procs.is_in_use(&p.id) {
            return Err(format!("process id {} is already in use", p.id));
        }
        let failed_mounts = failed_mounts(p.additional_mounts.as_ref());
        let (program, sdk_dir) = self.resolve_program(&p.command);
        let encoding = p.encoding.unwrap_or_default();
        let wants_sandbox = p.sandbox != Some(false);
        match (&self.sessions, &self.sandbox) {
            (Some(sessions), Some(sb)) if wants_sandbox => {
                let sd = sessions.prepare(&p.name)?;
                let cwd = sessions.resolve_cwd(&sd, p.cwd.as_deref())?;
                let env: BTreeMap<String, String> = p
                    .env
                    .as_ref()
                    .map(|e| e.expose().clone())
                    .unwrap_or_default();
                let mut spec = sandbox::Spec {
                    session_dir: sd.path.clone(),
                    cwd,
                    sdk_dir,
                    system: sb.system.clone(),
                    info_fd: None,
                };
                if !env.contains_key("PATH") && !program.contains('/') {
                    let path = spec.base_env(sd.uid)["PATH"].clone();
                    if !std::env::split_paths(&path).any(|d| d.join(&program).is_file()) {
                        return Err(format!("cannot run {}: not found in {path}", p.command));
                    }
                }
                let (info_r, info_w) =
                    sandbox::info_pipe().map_err(|e| format!("info pipe: {e}"))?;
                spec.info_fd = Some(sandbox::raw(&info_w));
                let cmd = sandbox::command(&sb.bwrap, &spec, sd.uid, &program, &p.args, &env);
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
                // Our copy of the write end: bwrap holds its own.
                drop(info_w);
                r?;
            }
            _ => {
                crate::debug!("spawn {}: unsandboxed, command {}", p.id, p.command);
                let cmd = Procs::direct_command(p, &program);
                self.procs
                    .spawn(&p.id, &p.name, cmd, encoding, None, &p.command)?;
            }
        }
        Ok(serde_json::to_value(SpawnResult { failed_mounts }).unwrap_or(json!({})))
    }

    pub fn install_sdk(&self, p: &InstallSdkParams) -> Result<Value, String> {
        let mut sdk = self.sdk_store()?;
        let r = sdk.begin(p)?;
        if !r.cached {
            eprintln!(
                "coworkvm-agent: receiving SDK {} ({} bytes)",
                p.version,
                p.size.unwrap_or(0)
            );
        }
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    pub fn install_sdk_chunk(&self, c: &InstallSdkChunkParams) -> Result<Value, String> {
        let r = self.sdk_store()?.chunk(c)?;
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    pub fn install_sdk_commit(&self, version: &str) -> Result<Value, String> {
        let r = self.sdk_store()?.commit(version)?;
        eprintln!("coworkvm-agent: SDK {version} installed at {}", r.path);
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    fn sdk_store(&self) -> Result<MutexGuard<'_, SdkStore>, String> {
        let sdk = self.sdk.as_ref().ok_or_else(|| {
            "installSdk: the session disk is not mounted at /sessions, so there is nowhere \
             to keep the SDK"
                .to_owned()
        })?;
        Ok(sdk.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The installed SDK's binary, if any.
    fn sdk_current(&self) -> Option<PathBuf> {
        let sdk = self.sdk.as_ref()?;
        sdk.lock().unwrap_or_else(PoisonError::into_inner).current()
    }

    pub fn add_oauth_token(&self, token: Secret<String>) {
        let mut tokens = self
            .oauth_tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        tokens.retain(|t| t.expose() != token.expose());
        tokens.push(token);
        if tokens.len() > MAX_TOKENS {
            tokens.remove(0);
        }
        crate::debug!("approved OAuth tokens held: {}", tokens.len());
    }

    pub fn disk_info(&self) -> Result<Value, String> {
        let r = self.sessions()?.disk_info()?;
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    pub fn delete_sessions(&self, names: &[String]) -> Result<Value, String> {
        let running = self.procs.running_sessions();
        let r = self.sessions()?.delete(names, &running);
        if !r.deleted.is_empty() {
            eprintln!("coworkvm-agent: deleted sessions {:?}", r.deleted);
        }
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }

    pub fn prune(&self, p: &PruneSessionCachesParams) -> Result<Value, String> {
        let running = self.procs.running_sessions();
        let r = self.sessions()?.prune(p, &running)?;
        Ok(serde_json::to_value(r).unwrap_or(Value::Null))
    }
}

/// `additionalMounts` (the client's `{mountName: spec}` map, or a list):
/// each one in `failedMounts` as `{mountName, error}`, since folder sharing
/// comes later. `None` when none were asked for.
pub fn failed_mounts(m: Option<&Value>) -> Option<Vec<Value>> {
    let entry = |name: Value| json!({"mountName": name, "error": NO_SHARING});
    let v: Vec<Value> = match m? {
        Value::Object(map) => map.keys().map(|k| entry(json!(k))).collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let name = ["mountName", "name"]
                    .iter()
                    .find_map(|k| e.get(k).cloned())
                    .unwrap_or(json!(i));
                entry(name)
            })
            .collect(),
        Value::Null => Vec::new(),
        _ => vec![json!({"error": NO_SHARING})],
    };
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asked_mount_fails_with_the_reason() {
        assert_eq!(failed_mounts(None), None);
        assert_eq!(failed_mounts(Some(&json!({}))), None);
        assert_eq!(failed_mounts(Some(&Value::Null)), None);
        let f = failed_mounts(Some(
            &json!({"outputs": {"path": "/x", "mode": "rw"}, "in": {}}),
        ))
        .unwrap();
        assert_eq!(
            f,
            [
                json!({"mountName": "in", "error": NO_SHARING}),
                json!({"mountName": "outputs", "error": NO_SHARING})
            ]
        );
        let f = failed_mounts(Some(&json!([{"mountName": "a"}, {"x": 1}]))).unwrap();
        assert_eq!(f[0]["mountName"], "a");
        assert_eq!(f[1]["mountName"], 1);
        let r = serde_json::to_value(SpawnResult {
            failed_mounts: Some(f),
        })
        .unwrap();
        assert_eq!(r["failedMounts"][0]["error"], NO_SHARING);
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
        Agent::new(Procs::default(), dir.join("sessions"), Some(s), None)
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
        let a = Agent::new(Procs::default(), "/nonexistent".into(), None, None);
        assert!(a.disk_info().unwrap_err().contains("not mounted"));
        assert!(a
            .delete_sessions(&["x".into()])
            .unwrap_err()
            .contains("not mounted"));
        assert!(a
            .install_sdk(&InstallSdkParams::default())
            .unwrap_err()
            .contains("not mounted"));
        assert!(!a.capabilities().contains(&"sandbox".to_string()));
    }

    #[test]
    fn claude_resolves_to_the_installed_sdk() {
        let d = tempfile::tempdir().unwrap();
        let a = agent_on(d.path());
        assert_eq!(a.resolve_program("claude").0, "claude");
        let data = b"#!/bin/sh\necho sdk\n";
        use sha2::Digest;
        a.install_sdk(&InstallSdkParams {
            sdk_subpath: "x".into(),
            version: "3.1".into(),
            sha256: Some(socket_proto::sdk::hex(&sha2::Sha256::digest(data))),
            size: Some(data.len() as u64),
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
        let (prog, dir) = a.resolve_program("claude");
        let root = d.path().join("sessions").canonicalize().unwrap();
        assert_eq!(
            prog,
            root.join(".coworkvm/sdk/3.1/claude").to_string_lossy()
        );
        assert_eq!(dir, Some(root.join(".coworkvm/sdk/3.1")));
        // Other commands stay as they are, with the SDK on PATH.
        let (prog, dir) = a.resolve_program("sh");
        assert_eq!(prog, "sh");
        assert!(dir.is_some());
    }
}
