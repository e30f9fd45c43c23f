//! The guest protocol: the helper and `coworkvm-agent` in the VM.
//!
//! Every frame has a `type`: `request` / `response` (both directions),
//! `notification` (host to guest), `event` (guest to host). Ids are strings
//! on the wire; numbers are accepted on input. A frame without a `type` is
//! not an error: [`GuestFrame::parse`] returns `None` and the caller logs it.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};

use crate::frame::JsonObject;
use crate::host::{
    AddApprovedOauthTokenParams, ClientEvent, DeleteSessionDirsParams, InstallSdkParams,
    KillParams, MountPathParams, ProcessIdParams, PruneSessionCachesParams, ReadFileParams,
    SendGuestResponseParams, SessionsDiskInfoParams, SetDebugLoggingParams, SpawnParams,
};

/// The vsock port the agent dials on the host (CID 2).
pub const AGENT_VSOCK_PORT: u32 = 51234;
/// Version of this protocol that `agent.info` reports.
pub const PROTOCOL_VERSION: u32 = 1;
/// JSON-RPC's "method not found".
pub const METHOD_NOT_FOUND: i64 = -32601;

/// Every host-to-guest request method.
pub const GUEST_METHODS: &[&str] = &[
    "agent.info",
    "spawn",
    "kill",
    "isProcessRunning",
    "readFile",
    "mountPath",
    "installSdk",
    "addApprovedOauthToken",
    "getSessionsDiskInfo",
    "deleteSessionDirs",
    "pruneSessionCaches",
    "setDebugLogging",
    "shutdown",
];

/// Every guest-to-host event.
pub const GUEST_EVENTS: &[&str] = &[
    "ready",
    "stdout",
    "stderr",
    "exit",
    "error",
    "networkStatus",
    "apiReachability",
    "startupStep",
];

/// Every host-to-guest notification.
pub const GUEST_NOTIFICATIONS: &[&str] = &["stdin", "hostProxyConfig", "staticIPAssignment"];

/// A request or response id: a string, though numbers are accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct FrameId(pub String);

impl<'de> Deserialize<'de> for FrameId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(FrameId(s)),
            Value::Number(n) => Ok(FrameId(n.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "id must be a string or a number, not {other}"
            ))),
        }
    }
}

impl From<&str> for FrameId {
    fn from(s: &str) -> Self {
        FrameId(s.to_owned())
    }
}

/// A response error: a plain string, or `{code, message}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GuestError {
    Coded { code: i64, message: String },
    Text(String),
}

impl GuestError {
    pub fn message(&self) -> &str {
        match self {
            GuestError::Coded { message, .. } | GuestError::Text(message) => message,
        }
    }

    /// The answer to a method the agent does not implement.
    pub fn unknown_method(name: &str) -> Self {
        GuestError::Coded {
            code: METHOD_NOT_FOUND,
            message: format!("unknown method: {name}"),
        }
    }
}

/// One frame of the guest protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum GuestFrame {
    Request {
        id: FrameId,
        method: String,
        #[serde(default)]
        params: Value,
    },
    Response {
        id: FrameId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<GuestError>,
    },
    Notification {
        method: String,
        #[serde(default)]
        params: Value,
    },
    Event {
        event: String,
        #[serde(default)]
        params: Value,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestFrameError {
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("malformed {kind} frame: {detail}")]
    Malformed { kind: String, detail: String },
}

impl GuestFrame {
    /// Parses a frame body. `Ok(None)`: no `type`, to be logged and ignored.
    pub fn parse(obj: JsonObject) -> Result<Option<Self>, GuestFrameError> {
        let kind = match obj.get("type") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(t)) => t.clone(),
            Some(other) => return Err(GuestFrameError::UnknownType(other.to_string())),
        };
        if !["request", "response", "notification", "event"].contains(&kind.as_str()) {
            return Err(GuestFrameError::UnknownType(kind));
        }
        serde_json::from_value(Value::Object(obj))
            .map(Some)
            .map_err(|e| GuestFrameError::Malformed {
                kind,
                detail: e.to_string(),
            })
    }

    pub fn request(id: impl Into<String>, method: &str, params: Value) -> Self {
        GuestFrame::Request {
            id: FrameId(id.into()),
            method: method.into(),
            params,
        }
    }

    pub fn result(id: FrameId, result: Value) -> Self {
        GuestFrame::Response {
            id,
            result: Some(result),
            error: None,
        }
    }

    pub fn error(id: FrameId, error: GuestError) -> Self {
        GuestFrame::Response {
            id,
            result: None,
            error: Some(error),
        }
    }

    pub fn event(event: &GuestEvent) -> Self {
        let (name, params) = event.to_wire();
        GuestFrame::Event {
            event: name.into(),
            params,
        }
    }

    /// A guest-to-host request, as the client's `request` event.
    pub fn to_client_request(&self) -> Option<ClientEvent> {
        match self {
            GuestFrame::Request { id, method, params } => Some(ClientEvent::Request {
                id: Value::String(id.0.clone()),
                method: method.clone(),
                params: params.clone(),
            }),
            _ => None,
        }
    }
}

/// `sendGuestResponse` from the client becomes a `response` frame: the
/// client's `resultJson` is a JSON text (kept as a string if it is not).
impl From<&SendGuestResponseParams> for GuestFrame {
    fn from(p: &SendGuestResponseParams) -> Self {
        let id = match &p.id {
            Value::String(s) => FrameId(s.clone()),
            other => FrameId(other.to_string()),
        };
        let error = p.error.as_ref().map(|e| match e {
            Value::String(s) => GuestError::Text(s.clone()),
            other => serde_json::from_value(other.clone())
                .unwrap_or_else(|_| GuestError::Text(other.to_string())),
        });
        let result = match (&error, &p.result_json) {
            (Some(_), _) => None,
            (None, Some(text)) => {
                Some(serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone())))
            }
            (None, None) => Some(Value::Null),
        };
        GuestFrame::Response { id, result, error }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    pub agent: String,
    pub version: String,
    pub protocol: u32,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StdinParams {
    pub id: String,
    pub data: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostProxyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_proxy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_proxy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "apiProbeURL"
    )]
    pub api_probe_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StaticIpAssignment {
    pub ip: String,
    pub prefix_length: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
}

/// Host-to-guest requests, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestRequest {
    AgentInfo,
    Spawn(Box<SpawnParams>),
    Kill(KillParams),
    IsProcessRunning(ProcessIdParams),
    ReadFile(ReadFileParams),
    MountPath(MountPathParams),
    InstallSdk(InstallSdkParams),
    AddApprovedOauthToken(AddApprovedOauthTokenParams),
    GetSessionsDiskInfo(SessionsDiskInfoParams),
    DeleteSessionDirs(DeleteSessionDirsParams),
    PruneSessionCaches(PruneSessionCachesParams),
    SetDebugLogging(SetDebugLoggingParams),
    Shutdown,
    Unknown(String),
}

fn params<T: serde::de::DeserializeOwned>(method: &str, v: Value) -> Result<T, GuestError> {
    let v = if v.is_null() {
        Value::Object(Map::new())
    } else {
        v
    };
    serde_json::from_value(v).map_err(|e| GuestError::Coded {
        code: -32602,
        message: format!("bad params for {method}: {e}"),
    })
}

impl GuestRequest {
    /// Decodes a request's params; bad params are an error to send back.
    pub fn parse(method: &str, p: Value) -> Result<Self, GuestError> {
        Ok(match method {
            "agent.info" => Self::AgentInfo,
            "spawn" => Self::Spawn(Box::new(params(method, p)?)),
            "kill" => Self::Kill(params(method, p)?),
            "isProcessRunning" => Self::IsProcessRunning(params(method, p)?),
            "readFile" => Self::ReadFile(params(method, p)?),
            "mountPath" => Self::MountPath(params(method, p)?),
            "installSdk" => Self::InstallSdk(params(method, p)?),
            "addApprovedOauthToken" => Self::AddApprovedOauthToken(params(method, p)?),
            "getSessionsDiskInfo" => Self::GetSessionsDiskInfo(params(method, p)?),
            "deleteSessionDirs" => Self::DeleteSessionDirs(params(method, p)?),
            "pruneSessionCaches" => Self::PruneSessionCaches(params(method, p)?),
            "setDebugLogging" => Self::SetDebugLogging(params(method, p)?),
            "shutdown" => Self::Shutdown,
            other => Self::Unknown(other.to_owned()),
        })
    }
}

/// Host-to-guest notifications, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestNotification {
    Stdin(StdinParams),
    HostProxyConfig(HostProxyConfig),
    StaticIpAssignment(StaticIpAssignment),
    Unknown(String),
}

impl GuestNotification {
    pub fn parse(method: &str, p: Value) -> Result<Self, GuestError> {
        Ok(match method {
            "stdin" => Self::Stdin(params(method, p)?),
            "hostProxyConfig" => Self::HostProxyConfig(params(method, p)?),
            "staticIPAssignment" => Self::StaticIpAssignment(params(method, p)?),
            other => Self::Unknown(other.to_owned()),
        })
    }
}

/// Guest-to-host events, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "params", rename_all = "camelCase")]
pub enum GuestEvent {
    Ready,
    Stdout {
        id: String,
        data: String,
    },
    Stderr {
        id: String,
        data: String,
    },
    #[serde(rename_all = "camelCase")]
    Exit {
        id: String,
        #[serde(default)]
        code: Option<i32>,
        #[serde(default)]
        signal: Option<Value>,
        #[serde(default)]
        oom_kill_count: Option<u64>,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fatal: Option<bool>,
    },
    NetworkStatus {
        status: String,
    },
    ApiReachability {
        status: String,
    },
    StartupStep {
        step: String,
        status: String,
    },
}

impl GuestEvent {
    /// Decodes an `event` frame's name and params.
    pub fn parse(event: &str, params: Value) -> Result<Self, GuestFrameError> {
        let params = if params.is_null() && event == "ready" {
            Value::Null
        } else {
            params
        };
        let v = if event == "ready" {
            json!({ "event": "ready" })
        } else {
            json!({ "event": event, "params": params })
        };
        serde_json::from_value(v).map_err(|e| GuestFrameError::Malformed {
            kind: format!("event {event}"),
            detail: e.to_string(),
        })
    }

    pub fn to_wire(&self) -> (&'static str, Value) {
        let v = serde_json::to_value(self).unwrap_or(Value::Null);
        let name = match self {
            GuestEvent::Ready => "ready",
            GuestEvent::Stdout { .. } => "stdout",
            GuestEvent::Stderr { .. } => "stderr",
            GuestEvent::Exit { .. } => "exit",
            GuestEvent::Error { .. } => "error",
            GuestEvent::NetworkStatus { .. } => "networkStatus",
            GuestEvent::ApiReachability { .. } => "apiReachability",
            GuestEvent::StartupStep { .. } => "startupStep",
        };
        (
            name,
            v.get("params")
                .cloned()
                .unwrap_or(Value::Object(Map::new())),
        )
    }

    /// The client's flat event for this guest event (`ready` has none):
    /// `exit`'s `code` becomes the client's `exitCode`.
    pub fn to_client_event(&self) -> Option<ClientEvent> {
        Some(match self.clone() {
            GuestEvent::Ready => return None,
            GuestEvent::Stdout { id, data } => ClientEvent::Stdout { id, data },
            GuestEvent::Stderr { id, data } => ClientEvent::Stderr { id, data },
            GuestEvent::Exit {
                id,
                code,
                signal,
                oom_kill_count,
            } => ClientEvent::Exit {
                id,
                exit_code: code,
                signal: signal.filter(|s| !s.is_null()),
                oom_kill_count,
            },
            GuestEvent::Error { id, message, fatal } => ClientEvent::Error { id, message, fatal },
            GuestEvent::NetworkStatus { status } => ClientEvent::NetworkStatus { status },
            GuestEvent::ApiReachability { status } => ClientEvent::ApiReachability { status },
            GuestEvent::StartupStep { step, status } => ClientEvent::StartupStep { step, status },
        })
    }
}
