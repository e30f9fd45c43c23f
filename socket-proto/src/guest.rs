//! The guest protocol: the helper and `coworkvm-agent` in the VM.
//!
//! Every frame has a `type` ([`GuestFrame`]): `request` and `response` go
//! both ways, `notification` goes host to guest, `event` guest to host. Ids
//! are strings on the wire; numbers are accepted on input ([`FrameId`]). A
//! frame without a `type` is not an error: [`GuestFrame::parse`] returns
//! `None` and the caller logs it.
//!
//! The agent's side, per frame:
//!
//! ```
//! use serde_json::json;
//! use socket_proto::guest::{GuestError, GuestFrame, GuestRequest};
//!
//! let obj = serde_json::from_value(
//!     json!({"type": "request", "id": 5, "method": "beamUp", "params": {}}),
//! )
//! .unwrap();
//! let Some(GuestFrame::Request { id, method, params }) = GuestFrame::parse(obj).unwrap() else {
//!     panic!("not a request")
//! };
//! let reply = match GuestRequest::parse(&method, params) {
//!     Ok(GuestRequest::Unknown(name)) => GuestFrame::unknown_method(id, &name),
//!     Ok(_) => GuestFrame::result(id, json!({})),
//!     Err(bad_params) => GuestFrame::error(id, bad_params),
//! };
//! assert_eq!(
//!     serde_json::to_value(&reply).unwrap(),
//!     json!({"type": "response", "id": "5",
//!            "error": {"code": -32601, "message": "unknown method: beamUp"}})
//! );
//! ```

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};

use crate::frame::JsonObject;
use crate::host::{
    AddApprovedOauthTokenParams, ClientEvent, DeleteSessionDirsParams, InstallSdkParams,
    KillParams, MountPathParams, ProcessIdParams, PruneSessionCachesParams, ReadFileParams,
    SendGuestResponseParams, SessionsDiskInfoParams, SetDebugLoggingParams, SpawnParams,
    WriteStdinParams,
};
use crate::params::{decode_params, ParamsError};
use crate::redact::redacted_debug;
use crate::sdk::{InstallSdkChunkParams, InstallSdkCommitParams};

/// The vsock port the agent dials on the host (CID 2).
pub const AGENT_VSOCK_PORT: u32 = 51234;
/// The source ports the agent binds before it dials [`AGENT_VSOCK_PORT`],
/// tried from the highest down: the privileged ones. Linux vsock lets a
/// socket bind a port below 1024 only with `CAP_NET_BIND_SERVICE` in the
/// initial user namespace, which the agent (root, PID 1) has and session
/// processes never do; so the host accepts a guest-initiated stream to the
/// agent's port only from one of these.
pub const AGENT_SOURCE_PORTS: std::ops::RangeInclusive<u32> = 1..=1023;
/// Version of this protocol that `agent.info` reports.
pub const PROTOCOL_VERSION: u32 = 1;
/// The name `coworkvm-agent` reports in `agent.info`.
pub const AGENT_NAME: &str = "coworkvm-agent";
/// JSON-RPC's "method not found".
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC's "invalid params".
pub const INVALID_PARAMS: i64 = -32602;

/// The kernel parameter that names the rootfs disk (`coworkvm.rootfs=vda`):
/// the helper writes it from the disk's role in the launch configuration,
/// the agent reads it to find its root; the busybox test initramfs is
/// booted without it.
pub const ROOTFS_PARAM: &str = "coworkvm.rootfs=";
/// The kernel parameter that names the sessions disk
/// (`coworkvm.sessions=vdb`).
pub const SESSIONS_PARAM: &str = "coworkvm.sessions=";
/// The virtio-fs tag of the VM's one shared-folder device (the official
/// stack's tag).
pub const SHARE_TAG: &str = "claudeshared";
/// Where the agent mounts [`SHARE_TAG`] in the guest (root only; no
/// session sandbox binds it).
pub const SHARE_GUEST_ROOT: &str = "/mnt/.virtiofs-root";
/// The directory under the share's root that holds the grants, each at its
/// root-relative host path: host `/home/u/work` is
/// `/mnt/.virtiofs-root/shared/home/u/work` in the guest.
pub const SHARE_GRANTS_DIR: &str = "shared";
/// The guest uid and gid that virtiofsd shows the host user's files as
/// (`--translate-uid host:<uid>:SHARE_OWNER_ID:1`). Outside the session uid
/// range (1001-59999) and below `nobody`; the agent maps it to each
/// session's uid with an idmapped bind where the guest kernel can.
pub const SHARE_OWNER_ID: u32 = 60000;
/// virtiofsd's flags for a VM's share, after `--fd`/`--socket-path` and
/// `--shared-dir`, for a virtiofsd running as `uid`/`gid`: its namespace
/// sandbox, no file handles (they need CAP_DAC_READ_SEARCH), and the
/// ownership translation: whatever the guest creates is owned by the host
/// user; the host user's files appear as [`SHARE_OWNER_ID`] in the guest.
/// The share keeper runs virtiofsd with them, and `make bench` too, so the
/// bench measures the daemon the helper runs.
pub fn virtiofsd_flags(uid: u32, gid: u32) -> Vec<String> {
    // `--flag=value` throughout: clap refuses `--inode-file-handles never`.
    vec![
        "--sandbox=namespace".into(),
        "--inode-file-handles=never".into(),
        "--cache=auto".into(),
        "--announce-submounts".into(),
        format!("--translate-uid=squash-guest:0:{uid}:4294967295"),
        format!("--translate-gid=squash-guest:0:{gid}:4294967295"),
        format!("--translate-uid=host:{uid}:{SHARE_OWNER_ID}:1"),
        format!("--translate-gid=host:{gid}:{SHARE_OWNER_ID}:1"),
    ]
}

/// The capability the agent reports in `agent.info` when it has mounted
/// [`SHARE_TAG`]: the helper forwards mounts only to such an agent.
pub const SHARE_CAPABILITY: &str = "virtiofs";

/// The `failedMounts` of a `spawn` result for `additionalMounts` none of
/// which can be made: the mount names, the shape the Go peer returns and the
/// client reads (`docs/protocol.md`). The client sends a map keyed by mount
/// name; a list (older or hand-written callers) names each entry by its
/// `mountName` or `name`, else by its index. Anything else names no mount.
pub fn failed_mount_names(additional_mounts: &Value) -> Vec<String> {
    match additional_mounts {
        Value::Object(map) => map.keys().cloned().collect(),
        Value::Array(entries) => entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                ["mountName", "name"]
                    .iter()
                    .find_map(|k| match e.get(k) {
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(Value::Null) | None => None,
                        Some(other) => Some(other.to_string()),
                    })
                    .unwrap_or_else(|| i.to_string())
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The four frame types.
pub const FRAME_TYPES: &[&str] = &["request", "response", "notification", "event"];

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

/// coworkvm's own host-to-guest request methods, beyond the protocol's
/// ([`crate::sdk`]: the SDK transfer).
pub const COWORKVM_GUEST_METHODS: &[&str] = &[
    crate::sdk::METHOD_CHUNK,
    crate::sdk::METHOD_COMMIT,
    crate::egress::METHOD_PROBE,
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

/// A request or response id: a string, though numbers are accepted (and
/// kept as their decimal text).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct FrameId(pub String);

impl FrameId {
    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A JSON id (as the client echoes it in `sendGuestResponse`): strings
    /// as they are, anything else as its JSON text.
    pub fn from_value(v: &Value) -> Self {
        match v {
            Value::String(s) => FrameId(s.clone()),
            other => FrameId(other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for FrameId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(FrameId(s)),
            Value::Number(n) => Ok(FrameId(n.to_string())),
            _ => Err(serde::de::Error::custom("id must be a string or a number")),
        }
    }
}

impl fmt::Display for FrameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for FrameId {
    fn from(s: &str) -> Self {
        FrameId(s.to_owned())
    }
}

impl From<String> for FrameId {
    fn from(s: String) -> Self {
        FrameId(s)
    }
}

impl From<u64> for FrameId {
    fn from(n: u64) -> Self {
        FrameId(n.to_string())
    }
}

/// A response error: `{code, message}`, or a plain string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GuestError {
    /// `{code, message}`, JSON-RPC style.
    Coded {
        /// The error code ([`METHOD_NOT_FOUND`], [`INVALID_PARAMS`], ...).
        code: i64,
        /// The text.
        message: String,
    },
    /// A plain string.
    Text(String),
}

impl GuestError {
    /// The error's text.
    pub fn message(&self) -> &str {
        match self {
            GuestError::Coded { message, .. } | GuestError::Text(message) => message,
        }
    }

    /// The code, when the error has one.
    pub fn code(&self) -> Option<i64> {
        match self {
            GuestError::Coded { code, .. } => Some(*code),
            GuestError::Text(_) => None,
        }
    }

    /// The answer to a method the agent does not implement:
    /// `{code: -32601, message: "unknown method: NAME"}`.
    pub fn unknown_method(name: &str) -> Self {
        GuestError::Coded {
            code: METHOD_NOT_FOUND,
            message: format!("unknown method: {name}"),
        }
    }

    /// The answer to params that do not fit: code -32602, a message that
    /// names the method and the field.
    pub fn invalid_params(method: &str, e: &ParamsError) -> Self {
        GuestError::Coded {
            code: INVALID_PARAMS,
            message: format!("bad params for {method}: {e}"),
        }
    }
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::Coded { code, message } => write!(f, "{message} ({code})"),
            GuestError::Text(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for GuestError {}

/// One frame of the guest protocol. Its `Debug` output is redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum GuestFrame {
    /// `{type: "request", id, method, params}`: both directions.
    Request {
        /// Answered under the same id.
        id: FrameId,
        /// The method's name.
        method: String,
        /// Its params (decode with [`GuestRequest::parse`]).
        #[serde(default)]
        params: Value,
    },
    /// `{type: "response", id, result}` or `{type: "response", id, error}`.
    Response {
        /// The request's id.
        id: FrameId,
        /// The result, on success.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        /// The error, on failure.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<GuestError>,
    },
    /// `{type: "notification", method, params}`: host to guest, no reply.
    Notification {
        /// The notification's name.
        method: String,
        /// Its params (decode with [`GuestNotification::parse`]).
        #[serde(default)]
        params: Value,
    },
    /// `{type: "event", event, params}`: guest to host.
    Event {
        /// The event's name.
        event: String,
        /// Its params (decode with [`GuestEvent::parse`]).
        #[serde(default)]
        params: Value,
    },
}

redacted_debug!(GuestFrame);

/// A frame body that is not a guest frame.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GuestFrameError {
    /// `type` is not one of [`FRAME_TYPES`].
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    /// A known type with missing or mistyped fields.
    #[error("malformed {kind} frame: {detail}")]
    Malformed {
        /// The frame type (or `event NAME`).
        kind: String,
        /// What is wrong.
        detail: String,
    },
}

impl GuestFrame {
    /// Parses a frame body. `Ok(None)`: no `type`, to be logged and ignored.
    /// Unknown fields are ignored.
    pub fn parse(obj: JsonObject) -> Result<Option<Self>, GuestFrameError> {
        let kind = match obj.get("type") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(t)) => t.clone(),
            Some(other) => return Err(GuestFrameError::UnknownType(other.to_string())),
        };
        if !FRAME_TYPES.contains(&kind.as_str()) {
            return Err(GuestFrameError::UnknownType(kind));
        }
        serde_json::from_value(Value::Object(obj))
            .map(Some)
            .map_err(|e| GuestFrameError::Malformed {
                kind,
                detail: e.to_string(),
            })
    }

    /// A request frame.
    pub fn request(id: impl Into<String>, method: &str, params: Value) -> Self {
        GuestFrame::Request {
            id: FrameId(id.into()),
            method: method.into(),
            params,
        }
    }

    /// A typed host-to-guest request, as a frame.
    pub fn from_request(id: impl Into<String>, req: &GuestRequest) -> Self {
        let (method, params) = req.to_wire();
        GuestFrame::Request {
            id: FrameId(id.into()),
            method,
            params,
        }
    }

    /// A success response.
    pub fn result(id: FrameId, result: Value) -> Self {
        GuestFrame::Response {
            id,
            result: Some(result),
            error: None,
        }
    }

    /// An error response.
    pub fn error(id: FrameId, error: GuestError) -> Self {
        GuestFrame::Response {
            id,
            result: None,
            error: Some(error),
        }
    }

    /// The response to an unknown method:
    /// `error {code: -32601, message: "unknown method: NAME"}`.
    pub fn unknown_method(id: FrameId, name: &str) -> Self {
        Self::error(id, GuestError::unknown_method(name))
    }

    /// A typed notification, as a frame.
    pub fn notification(n: &GuestNotification) -> Self {
        let (method, params) = n.to_wire();
        GuestFrame::Notification { method, params }
    }

    /// A typed event, as a frame.
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

    /// What the helper pushes to the client's event streams for this frame:
    /// an `event` flattened by [`flatten_event`] (none for `ready`), or a
    /// guest `request` as a `request` event. Other frames give `None`.
    pub fn to_client_frame(&self) -> Option<JsonObject> {
        match self {
            GuestFrame::Event { event, params } => flatten_event(event, params),
            GuestFrame::Request { .. } => match serde_json::to_value(self.to_client_request()?) {
                Ok(Value::Object(m)) => Some(m),
                _ => None,
            },
            _ => None,
        }
    }
}

/// `sendGuestResponse` from the client becomes a `response` frame: the
/// client's `resultJson` is JSON text (kept as a string if it does not
/// parse); `error` wins over `resultJson`; neither gives `result: null`.
impl From<&SendGuestResponseParams> for GuestFrame {
    fn from(p: &SendGuestResponseParams) -> Self {
        let id = FrameId::from_value(&p.id);
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

/// Flattens a guest event into the client's event shape
/// `{type: <event>, ...params}`, as the helper forwards it.
///
/// `exit` is renamed on the way: its `code` becomes the client's
/// `exitCode`, and null `exitCode`/`signal`/`oomKillCount` are left out
/// (the client reads them as optional). `ready` has no client event (it
/// flips `isGuestConnected`): `None`. Events this crate does not know are
/// flattened all the same, so a newer agent's events reach the client.
pub fn flatten_event(event: &str, params: &Value) -> Option<JsonObject> {
    if event == "ready" {
        return None;
    }
    let mut out = Map::new();
    out.insert("type".into(), Value::String(event.to_owned()));
    if let Value::Object(p) = params {
        for (k, v) in p {
            if k == "type" {
                continue;
            }
            let k = if event == "exit" && k == "code" {
                "exitCode"
            } else {
                k.as_str()
            };
            if event == "exit" && v.is_null() {
                continue;
            }
            out.insert(k.to_owned(), v.clone());
        }
    }
    Some(out)
}

/// `agent.info` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentInfo {
    /// `coworkvm-agent` ([`AGENT_NAME`]).
    pub agent: String,
    /// The agent's version.
    pub version: String,
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Optional features the agent has.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// `stdin {id, data}` notification (the client's `writeStdin`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StdinParams {
    /// The process id.
    pub id: String,
    /// UTF-8 text for its stdin.
    pub data: String,
    /// coworkvm extension: close the process's stdin after `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eof: Option<bool>,
}

impl From<&WriteStdinParams> for StdinParams {
    fn from(p: &WriteStdinParams) -> Self {
        StdinParams {
            id: p.id.clone(),
            data: p.data.clone(),
            eof: None,
        }
    }
}

/// `hostProxyConfig {httpProxy, httpsProxy, noProxy, apiProbeURL}`
/// notification.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostProxyConfig {
    /// Proxy for http.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_proxy: Option<String>,
    /// Proxy for https.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_proxy: Option<String>,
    /// Hosts that bypass the proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<String>,
    /// URL probed for `apiReachability`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "apiProbeURL"
    )]
    pub api_probe_url: Option<String>,
}

/// `staticIPAssignment {ip, prefixLength, gateway, dns}` notification
/// (inferred from one third-party source).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StaticIpAssignment {
    /// The guest's address.
    pub ip: String,
    /// Its prefix length.
    pub prefix_length: u8,
    /// Default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// DNS server(s): a string or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
}

/// Host-to-guest requests, typed. Params are the host protocol's.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestRequest {
    /// `agent.info`: answered with [`AgentInfo`].
    AgentInfo,
    /// `spawn`
    Spawn(Box<SpawnParams>),
    /// `kill`
    Kill(KillParams),
    /// `isProcessRunning`
    IsProcessRunning(ProcessIdParams),
    /// `readFile`
    ReadFile(ReadFileParams),
    /// `mountPath`
    MountPath(MountPathParams),
    /// `installSdk`
    InstallSdk(InstallSdkParams),
    /// `installSdk.chunk` (coworkvm extension, [`crate::sdk`])
    InstallSdkChunk(InstallSdkChunkParams),
    /// `installSdk.commit` (coworkvm extension, [`crate::sdk`])
    InstallSdkCommit(InstallSdkCommitParams),
    /// `addApprovedOauthToken`
    AddApprovedOauthToken(AddApprovedOauthTokenParams),
    /// `egress.probe` (coworkvm extension, [`crate::egress`])
    EgressProbe(crate::egress::EgressProbeParams),
    /// `getSessionsDiskInfo`
    GetSessionsDiskInfo(SessionsDiskInfoParams),
    /// `deleteSessionDirs`
    DeleteSessionDirs(DeleteSessionDirsParams),
    /// `pruneSessionCaches`
    PruneSessionCaches(PruneSessionCachesParams),
    /// `setDebugLogging`
    SetDebugLogging(SetDebugLoggingParams),
    /// `shutdown`: answered `{}`, then the guest syncs and powers off.
    Shutdown,
    /// A method not in the protocol (its name): answer it with
    /// [`GuestFrame::unknown_method`].
    Unknown(String),
}

fn params<T: serde::de::DeserializeOwned>(method: &str, v: Value) -> Result<T, GuestError> {
    decode_params(v).map_err(|e| GuestError::invalid_params(method, &e))
}

fn to_value<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

impl GuestRequest {
    /// Decodes a request's params (`null` counts as `{}`); bad params are
    /// an error to send back ([`INVALID_PARAMS`], naming the field).
    pub fn parse(method: &str, p: Value) -> Result<Self, GuestError> {
        Ok(match method {
            "agent.info" => Self::AgentInfo,
            "spawn" => Self::Spawn(Box::new(params(method, p)?)),
            "kill" => Self::Kill(params(method, p)?),
            "isProcessRunning" => Self::IsProcessRunning(params(method, p)?),
            "readFile" => Self::ReadFile(params(method, p)?),
            "mountPath" => Self::MountPath(params(method, p)?),
            "installSdk" => Self::InstallSdk(params(method, p)?),
            "installSdk.chunk" => Self::InstallSdkChunk(params(method, p)?),
            "installSdk.commit" => Self::InstallSdkCommit(params(method, p)?),
            "addApprovedOauthToken" => Self::AddApprovedOauthToken(params(method, p)?),
            crate::egress::METHOD_PROBE => Self::EgressProbe(params(method, p)?),
            "getSessionsDiskInfo" => Self::GetSessionsDiskInfo(params(method, p)?),
            "deleteSessionDirs" => Self::DeleteSessionDirs(params(method, p)?),
            "pruneSessionCaches" => Self::PruneSessionCaches(params(method, p)?),
            "setDebugLogging" => Self::SetDebugLogging(params(method, p)?),
            "shutdown" => Self::Shutdown,
            other => Self::Unknown(other.to_owned()),
        })
    }

    /// The wire name.
    pub fn name(&self) -> &str {
        match self {
            Self::AgentInfo => "agent.info",
            Self::Spawn(_) => "spawn",
            Self::Kill(_) => "kill",
            Self::IsProcessRunning(_) => "isProcessRunning",
            Self::ReadFile(_) => "readFile",
            Self::MountPath(_) => "mountPath",
            Self::InstallSdk(_) => "installSdk",
            Self::InstallSdkChunk(_) => crate::sdk::METHOD_CHUNK,
            Self::InstallSdkCommit(_) => crate::sdk::METHOD_COMMIT,
            Self::AddApprovedOauthToken(_) => "addApprovedOauthToken",
            Self::EgressProbe(_) => crate::egress::METHOD_PROBE,
            Self::GetSessionsDiskInfo(_) => "getSessionsDiskInfo",
            Self::DeleteSessionDirs(_) => "deleteSessionDirs",
            Self::PruneSessionCaches(_) => "pruneSessionCaches",
            Self::SetDebugLogging(_) => "setDebugLogging",
            Self::Shutdown => "shutdown",
            Self::Unknown(name) => name,
        }
    }

    /// The wire name and params (`{}` for methods without params).
    pub fn to_wire(&self) -> (String, Value) {
        let params = match self {
            Self::Spawn(x) => to_value(x),
            Self::Kill(x) => to_value(x),
            Self::IsProcessRunning(x) => to_value(x),
            Self::ReadFile(x) => to_value(x),
            Self::MountPath(x) => to_value(x),
            Self::InstallSdk(x) => to_value(x),
            Self::InstallSdkChunk(x) => to_value(x),
            Self::InstallSdkCommit(x) => to_value(x),
            Self::AddApprovedOauthToken(x) => to_value(x),
            Self::EgressProbe(x) => to_value(x),
            Self::GetSessionsDiskInfo(x) => to_value(x),
            Self::DeleteSessionDirs(x) => to_value(x),
            Self::PruneSessionCaches(x) => to_value(x),
            Self::SetDebugLogging(x) => to_value(x),
            Self::AgentInfo | Self::Shutdown | Self::Unknown(_) => Value::Object(Map::new()),
        };
        (self.name().to_owned(), params)
    }
}

/// Host-to-guest notifications, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestNotification {
    /// `stdin {id, data}`
    Stdin(StdinParams),
    /// `hostProxyConfig`
    HostProxyConfig(HostProxyConfig),
    /// `staticIPAssignment`
    StaticIpAssignment(StaticIpAssignment),
    /// A notification not in the protocol (its name): ignore it.
    Unknown(String),
}

impl GuestNotification {
    /// Decodes a notification's params (`null` counts as `{}`).
    pub fn parse(method: &str, p: Value) -> Result<Self, GuestError> {
        Ok(match method {
            "stdin" => Self::Stdin(params(method, p)?),
            "hostProxyConfig" => Self::HostProxyConfig(params(method, p)?),
            "staticIPAssignment" => Self::StaticIpAssignment(params(method, p)?),
            other => Self::Unknown(other.to_owned()),
        })
    }

    /// The wire name.
    pub fn name(&self) -> &str {
        match self {
            Self::Stdin(_) => "stdin",
            Self::HostProxyConfig(_) => "hostProxyConfig",
            Self::StaticIpAssignment(_) => "staticIPAssignment",
            Self::Unknown(name) => name,
        }
    }

    /// The wire name and params.
    pub fn to_wire(&self) -> (String, Value) {
        let params = match self {
            Self::Stdin(x) => to_value(x),
            Self::HostProxyConfig(x) => to_value(x),
            Self::StaticIpAssignment(x) => to_value(x),
            Self::Unknown(_) => Value::Object(Map::new()),
        };
        (self.name().to_owned(), params)
    }
}

/// The client's `writeStdin` becomes the guest's `stdin` notification.
impl From<&WriteStdinParams> for GuestNotification {
    fn from(p: &WriteStdinParams) -> Self {
        GuestNotification::Stdin(p.into())
    }
}

/// The whole frame of a `stdout` (or, with `stderr`, `stderr`) event,
/// encoded straight from borrowed text: what
/// `encode_frame(&GuestFrame::event(&GuestEvent::Stdout { id, data }))`
/// gives, without the copies of the generic path (the agent's hot loop).
pub fn encode_output_frame(
    stderr: bool,
    id: &str,
    data: &str,
) -> Result<Vec<u8>, crate::frame::FrameError> {
    #[derive(Serialize)]
    struct Params<'a> {
        id: &'a str,
        data: &'a str,
    }
    #[derive(Serialize)]
    struct Frame<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        event: &'static str,
        params: Params<'a>,
    }
    let frame = Frame {
        kind: "event",
        event: if stderr { "stderr" } else { "stdout" },
        params: Params { id, data },
    };
    // Text needs little escaping; an eighth more covers most of it.
    crate::frame::encode_frame_with_capacity(&frame, 96 + id.len() + data.len() + data.len() / 8)
}

/// Guest-to-host events, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "params", rename_all = "camelCase")]
pub enum GuestEvent {
    /// `ready`: disks and mounts are prepared; no params.
    Ready,
    /// `stdout {id, data}`
    Stdout {
        /// The process id.
        id: String,
        /// UTF-8 output.
        data: String,
    },
    /// `stderr {id, data}`
    Stderr {
        /// The process id.
        id: String,
        /// UTF-8 output.
        data: String,
    },
    /// `exit {id, code, signal, oomKillCount}`
    #[serde(rename_all = "camelCase")]
    Exit {
        /// The process id.
        id: String,
        /// Exit status; null when a signal ended it.
        #[serde(default)]
        code: Option<i32>,
        /// The signal that ended it (name or number), or null.
        #[serde(default)]
        signal: Option<Value>,
        /// OOM kills seen.
        #[serde(default)]
        oom_kill_count: Option<u64>,
    },
    /// `error {id?, message, fatal?}`
    Error {
        /// The process id, when the error is about one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The text.
        message: String,
        /// Whether the process is gone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fatal: Option<bool>,
    },
    /// `networkStatus {status}`
    NetworkStatus {
        /// `CONNECTED` or `NOT_CONNECTED`.
        status: String,
    },
    /// `apiReachability {status}`
    ApiReachability {
        /// `REACHABLE`, `PROBABLY_UNREACHABLE`, `UNREACHABLE` or `UNKNOWN`.
        status: String,
    },
    /// `startupStep {step, status}`
    StartupStep {
        /// The step's name.
        step: String,
        /// `running`, `completed` or `failed`.
        status: String,
    },
}

impl GuestEvent {
    /// Decodes an `event` frame's name and params (`ready` ignores its
    /// params). Unknown fields are ignored.
    pub fn parse(event: &str, params: Value) -> Result<Self, GuestFrameError> {
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

    /// The wire name.
    pub fn name(&self) -> &'static str {
        match self {
            GuestEvent::Ready => "ready",
            GuestEvent::Stdout { .. } => "stdout",
            GuestEvent::Stderr { .. } => "stderr",
            GuestEvent::Exit { .. } => "exit",
            GuestEvent::Error { .. } => "error",
            GuestEvent::NetworkStatus { .. } => "networkStatus",
            GuestEvent::ApiReachability { .. } => "apiReachability",
            GuestEvent::StartupStep { .. } => "startupStep",
        }
    }

    /// The wire name and params (`{}` for `ready`).
    pub fn to_wire(&self) -> (&'static str, Value) {
        let v = serde_json::to_value(self).unwrap_or(Value::Null);
        (
            self.name(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_mounts_are_the_mount_names() {
        let map = json!({"outputs": {"path": "/x", "mode": "rw"}, ".claude/skills": {}});
        assert_eq!(failed_mount_names(&map), [".claude/skills", "outputs"]);
        let list =
            json!([{"mountName": "a", "path": "/x"}, {"name": "b"}, {"x": 1}, {"mountName": 7}]);
        assert_eq!(failed_mount_names(&list), ["a", "b", "2", "7"]);
        for nothing in [Value::Null, json!({}), json!([]), json!("docs"), json!(3)] {
            assert!(failed_mount_names(&nothing).is_empty(), "{nothing}");
        }
    }
}
