//! The control connection to the helper: vsock CID 2, port 51234, redialed
//! every second while it is down.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use socket_proto::frame::{read_frame, write_frame};
use socket_proto::guest::{
    AgentInfo, FrameId, GuestError, GuestEvent, GuestFrame, GuestNotification, GuestRequest,
    AGENT_VSOCK_PORT, PROTOCOL_VERSION,
};

use crate::agent::Agent;

/// Serialized writes of whole frames from any thread.
#[derive(Clone)]
pub struct Sender(Arc<Mutex<File>>);

impl Sender {
    /// A sender on any file (tests read the frames from its other end).
    #[cfg(test)]
    pub fn new(f: File) -> Self {
        Sender(Arc::new(Mutex::new(f)))
    }

    pub fn send(&self, frame: &GuestFrame) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = write_frame(&mut *f, frame) {
            eprintln!("coworkvm-agent: sending a frame: {e}");
        }
        let _ = f.flush();
    }

    /// Writes a frame already encoded (length prefix and body), whole.
    pub fn send_encoded(&self, wire: &[u8]) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(wire) {
            eprintln!("coworkvm-agent: sending a frame: {e}");
        }
    }
}

pub fn dial(cid: u32, port: u32) -> std::io::Result<File> {
    // SAFETY: socket(2) with constant arguments returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is new and owned by nothing else; File closes it.
    let f = unsafe { File::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zero is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as u16;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a live sockaddr_vm and the length is its size.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

pub const CAPABILITIES: &[&str] = &[
    "spawn",
    "kill",
    "stdin",
    "readFile",
    "shutdown",
    "base64Streams",
];

/// Serves connections forever.
pub fn serve(mut agent: Agent, steps: Vec<crate::StartupStep>) -> ! {
    let mut announced = false;
    loop {
        let stream = match dial(2, AGENT_VSOCK_PORT) {
            Ok(s) => s,
            Err(e) => {
                if !announced {
                    eprintln!(
                        "coworkvm-agent: host not reachable yet ({e}); retrying every second"
                    );
                    announced = true;
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        announced = false;
        let Ok(write_half) = stream.try_clone() else {
            continue;
        };
        let sender = Sender(Arc::new(Mutex::new(write_half)));
        agent.procs.set_sender(Some(sender.clone()));
        for s in &steps {
            let status = if s.error.is_some() {
                "failed"
            } else {
                "completed"
            };
            sender.send(&GuestFrame::event(&GuestEvent::StartupStep {
                step: s.step.into(),
                status: status.into(),
            }));
            if let Some(e) = &s.error {
                sender.send(&GuestFrame::event(&GuestEvent::Error {
                    id: None,
                    message: format!("{}: {e}", s.step),
                    fatal: None,
                }));
            }
        }
        sender.send(&GuestFrame::event(&GuestEvent::Ready));
        let mut reader = BufReader::new(stream);
        loop {
            match read_frame(&mut reader) {
                Ok(Some(obj)) => match GuestFrame::parse(obj) {
                    Ok(Some(frame)) => handle(&mut agent, &sender, frame),
                    Ok(None) => eprintln!("coworkvm-agent: ignoring a frame without type"),
                    Err(e) => eprintln!("coworkvm-agent: {e}"),
                },
                Ok(None) => break,
                Err(e) if e.is_recoverable() => eprintln!("coworkvm-agent: bad frame: {e}"),
                Err(e) => {
                    eprintln!("coworkvm-agent: connection lost: {e}");
                    break;
                }
            }
        }
        agent.procs.set_sender(None);
    }
}

fn handle(agent: &mut Agent, sender: &Sender, frame: GuestFrame) {
    match frame {
        GuestFrame::Request { id, method, params } => {
            // Names only: params may carry secrets.
            crate::debug!("request {id}: {method}");
            let reply = match GuestRequest::parse(&method, params) {
                Ok(req) => respond(agent, sender, &id, req),
                Err(e) => Err(e),
            };
            match reply {
                Ok(Some(v)) => sender.send(&GuestFrame::result(id, v)),
                Ok(None) => {}
                Err(e) => {
                    crate::debug!("request {id} ({method}) failed: {}", e.message());
                    sender.send(&GuestFrame::error(id, e))
                }
            }
        }
        GuestFrame::Notification { method, params } => {
            let eof = params.get("eof").and_then(Value::as_bool).unwrap_or(false);
            match GuestNotification::parse(&method, params) {
                Ok(GuestNotification::Stdin(s)) => agent.procs.stdin(&s.id, &s.data, eof),
                Ok(_) => {}
                Err(e) => eprintln!("coworkvm-agent: notification {method}: {}", e.message()),
            }
        }
        GuestFrame::Response { .. } | GuestFrame::Event { .. } => {}
    }
}

/// `Ok(None)`: the reply was already sent (shutdown).
fn respond(
    agent: &mut Agent,
    sender: &Sender,
    id: &FrameId,
    req: GuestRequest,
) -> Result<Option<Value>, GuestError> {
    let text = |s: String| GuestError::Text(s);
    let to_json = |v: Result<Value, String>| v.map_err(text);
    Ok(Some(match req {
        GuestRequest::AgentInfo => serde_json::to_value(AgentInfo {
            agent: "coworkvm-agent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            capabilities: agent.capabilities(),
        })
        .unwrap_or(Value::Null),
        GuestRequest::Spawn(p) => to_json(agent.spawn(&p))?,
        GuestRequest::Kill(k) => {
            agent.procs.kill(&k.id, k.signal.as_ref()).map_err(text)?;
            json!({})
        }
        GuestRequest::IsProcessRunning(p) => match agent.procs.running(&p.id) {
            Some((running, Some(code))) => json!({"running": running, "exitCode": code}),
            Some((running, None)) => json!({ "running": running }),
            None => json!({"running": false}),
        },
        GuestRequest::ReadFile(r) => {
            let bytes = read_session_file(agent.sessions_root(), &r.process_name, &r.file_path)
                .map_err(text)?;
            json!({"content": base64::engine::general_purpose::STANDARD.encode(bytes)})
        }
        GuestRequest::MountPath(_) => return Err(text(crate::agent::NO_SHARING.into())),
        GuestRequest::InstallSdk(p) => to_json(agent.install_sdk(&p))?,
        GuestRequest::InstallSdkChunk(c) => to_json(agent.install_sdk_chunk(&c))?,
        GuestRequest::InstallSdkCommit(c) => to_json(agent.install_sdk_commit(&c.version))?,
        GuestRequest::AddApprovedOauthToken(t) => {
            agent.add_oauth_token(t.token);
            json!({})
        }
        GuestRequest::GetSessionsDiskInfo(_) => to_json(agent.disk_info())?,
        GuestRequest::DeleteSessionDirs(d) => to_json(agent.delete_sessions(&d.names))?,
        GuestRequest::PruneSessionCaches(p) => to_json(agent.prune(&p))?,
        GuestRequest::SetDebugLogging(d) => {
            crate::set_debug(d.enabled);
            json!({})
        }
        GuestRequest::Shutdown => {
            sender.send(&GuestFrame::result(id.clone(), json!({})));
            crate::init::power_off();
        }
        GuestRequest::Unknown(m) => return Err(GuestError::unknown_method(&m)),
    }))
}

/// Reads a file that lies inside `<root>/<name>` (after resolving links).
pub fn read_session_file(
    root: &std::path::Path,
    name: &str,
    path: &str,
) -> Result<Vec<u8>, String> {
    crate::sessions::validate_name(name)?;
    let root = root.join(name);
    let root = root
        .canonicalize()
        .map_err(|e| format!("session {name}: {e}"))?;
    let full = std::path::Path::new(path)
        .canonicalize()
        .map_err(|e| format!("{path}: {e}"))?;
    if !full.starts_with(&root) {
        return Err(format!("{path} is outside {}", root.display()));
    }
    std::fs::read(&full).map_err(|e| format!("{path}: {e}"))
}
