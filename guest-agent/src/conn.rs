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

use crate::procs::Procs;

/// Serialized writes of whole frames from any thread.
#[derive(Clone)]
pub struct Sender(Arc<Mutex<File>>);

impl Sender {
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
pub fn serve(procs: Procs, steps: Vec<crate::StartupStep>) -> ! {
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
        procs.set_sender(Some(sender.clone()));
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
                    Ok(Some(frame)) => handle(&procs, &sender, frame),
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
        procs.set_sender(None);
    }
}

fn handle(procs: &Procs, sender: &Sender, frame: GuestFrame) {
    match frame {
        GuestFrame::Request { id, method, params } => {
            let reply = match GuestRequest::parse(&method, params) {
                Ok(req) => respond(procs, sender, &id, req),
                Err(e) => Err(e),
            };
            match reply {
                Ok(Some(v)) => sender.send(&GuestFrame::result(id, v)),
                Ok(None) => {}
                Err(e) => sender.send(&GuestFrame::error(id, e)),
            }
        }
        GuestFrame::Notification { method, params } => {
            let eof = params.get("eof").and_then(Value::as_bool).unwrap_or(false);
            match GuestNotification::parse(&method, params) {
                Ok(GuestNotification::Stdin(s)) => procs.stdin(&s.id, &s.data, eof),
                Ok(_) => {}
                Err(e) => eprintln!("coworkvm-agent: notification {method}: {}", e.message()),
            }
        }
        GuestFrame::Response { .. } | GuestFrame::Event { .. } => {}
    }
}

/// `Ok(None)`: the reply was already sent (shutdown).
fn respond(
    procs: &Procs,
    sender: &Sender,
    id: &FrameId,
    req: GuestRequest,
) -> Result<Option<Value>, GuestError> {
    let text = |s: String| GuestError::Text(s);
    Ok(Some(match req {
        GuestRequest::AgentInfo => serde_json::to_value(AgentInfo {
            agent: "coworkvm-agent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            capabilities: CAPABILITIES.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap_or(Value::Null),
        GuestRequest::Spawn(p) => {
            procs.spawn(&p).map_err(text)?;
            json!({})
        }
        GuestRequest::Kill(k) => {
            procs.kill(&k.id, k.signal.as_ref()).map_err(text)?;
            json!({})
        }
        GuestRequest::IsProcessRunning(p) => match procs.running(&p.id) {
            Some((running, Some(code))) => json!({"running": running, "exitCode": code}),
            Some((running, None)) => json!({ "running": running }),
            None => json!({"running": false}),
        },
        GuestRequest::ReadFile(r) => {
            let bytes = read_session_file(&r.process_name, &r.file_path).map_err(text)?;
            json!({"content": base64::engine::general_purpose::STANDARD.encode(bytes)})
        }
        GuestRequest::Shutdown => {
            sender.send(&GuestFrame::result(id.clone(), json!({})));
            crate::init::power_off();
        }
        GuestRequest::Unknown(m) => return Err(GuestError::unknown_method(&m)),
        other => {
            return Err(text(format!(
                "{} is not supported by coworkvm-agent {} yet",
                request_name(&other),
                env!("CARGO_PKG_VERSION")
            )))
        }
    }))
}

fn request_name(r: &GuestRequest) -> &'static str {
    match r {
        GuestRequest::MountPath(_) => "mountPath",
        GuestRequest::InstallSdk(_) => "installSdk",
        GuestRequest::AddApprovedOauthToken(_) => "addApprovedOauthToken",
        GuestRequest::GetSessionsDiskInfo(_) => "getSessionsDiskInfo",
        GuestRequest::DeleteSessionDirs(_) => "deleteSessionDirs",
        GuestRequest::PruneSessionCaches(_) => "pruneSessionCaches",
        GuestRequest::SetDebugLogging(_) => "setDebugLogging",
        _ => "this request",
    }
}

/// Reads a file that lies inside `/sessions/<name>` (after resolving links).
pub fn read_session_file(name: &str, path: &str) -> Result<Vec<u8>, String> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!("bad session name {name:?}"));
    }
    let root = std::path::Path::new("/sessions").join(name);
    let root = root
        .canonicalize()
        .map_err(|e| format!("session {name}: {e}"))?;
    let full = std::path::Path::new(path)
        .canonicalize()
        .map_err(|e| format!("{path}: {e}"))?;
    if !full.starts_with(&root) {
        return Err(format!("{path} is outside /sessions/{name}"));
    }
    std::fs::read(&full).map_err(|e| format!("{path}: {e}"))
}
