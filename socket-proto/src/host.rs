//! The host protocol: the desktop client and the helper.
//!
//! A request is `{"method", "id"?, "params"?}`; the reply is
//! `{"success": true, "result"?}` or `{"success": false, "error": "text"}`,
//! echoing `id` only when the request had one. Event frames (on subscribed
//! connections) are flat objects tagged by `type`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::frame::JsonObject;
use crate::redact::Secret;

/// Every method of the host protocol, by wire name.
pub const HOST_METHODS: &[&str] = &[
    "configure",
    "subscribeEvents",
    "createVM",
    "startVM",
    "stopVM",
    "isRunning",
    "isGuestConnected",
    "spawn",
    "kill",
    "writeStdin",
    "isProcessRunning",
    "sendGuestResponse",
    "setDebugLogging",
    "mountPath",
    "readFile",
    "getSessionsDiskInfo",
    "deleteSessionDirs",
    "pruneSessionCaches",
    "installSdk",
    "addApprovedOauthToken",
    "getNetworkDrives",
];

/// Every event type the helper sends to the client.
pub const CLIENT_EVENTS: &[&str] = &[
    "stdout",
    "stderr",
    "exit",
    "error",
    "networkStatus",
    "apiReachability",
    "startupStep",
    "request",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request has no \"method\" string")]
    MissingMethod,
    #[error("\"params\" must be an object")]
    ParamsNotObject,
    #[error("bad params for {method}: {detail}")]
    BadParams { method: String, detail: String },
}

/// The request envelope as it came off the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestEnvelope {
    pub method: String,
    /// Present on persistent-pipe requests; echoed in the reply.
    pub id: Option<Value>,
    pub params: Value,
}

impl RequestEnvelope {
    pub fn from_object(mut obj: JsonObject) -> Result<Self, RequestError> {
        let method = match obj.remove("method") {
            Some(Value::String(m)) => m,
            _ => return Err(RequestError::MissingMethod),
        };
        let id = obj.remove("id").filter(|v| !v.is_null());
        let params = match obj.remove("params") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(p @ Value::Object(_)) => p,
            Some(_) => return Err(RequestError::ParamsNotObject),
        };
        Ok(Self { method, id, params })
    }

    /// Decodes the params for this method.
    pub fn method(&self) -> Result<HostMethod, RequestError> {
        HostMethod::parse(&self.method, self.params.clone())
    }
}

/// `configure`: the long form from the client's start-up, or the short pipe
/// form `{userDataName, userDataRoot, sessionOnly: true}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigureParams {
    pub user_data_name: String,
    pub user_data_root: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_drives: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "memoryMB")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smol_bin_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtiofsd_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_code_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_vars_template_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscribeEventsParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_root: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateVmParams {
    pub bundle_path: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "diskSizeGB"
    )]
    pub disk_size_gb: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartVmParams {
    pub bundle_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "memoryGB")]
    pub memory_gb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "apiProbeURL"
    )]
    pub api_probe_url: Option<String>,
}

/// A host folder to appear at `/sessions/<name>/mnt/<mountName>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdditionalMount {
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpawnParams {
    pub id: String,
    pub name: String,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub is_resume: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Credentials live here: never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Secret<BTreeMap<String, String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_mounts: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_domains: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_shot: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_skeleton_home: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth_token: Option<Secret<String>>,
}

/// A signal by name (`"SIGTERM"`) or number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Signal {
    Number(i32),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KillParams {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<Signal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteStdinParams {
    pub id: String,
    pub data: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessIdParams {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendGuestResponseParams {
    pub id: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_json: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetDebugLoggingParams {
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountPathParams {
    pub process_id: String,
    pub subpath: String,
    pub mount_name: String,
    pub mode: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadFileParams {
    pub process_name: String,
    pub file_path: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionsDiskInfoParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_water_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteSessionDirsParams {
    pub names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneSessionCachesParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_if_free_bytes_below: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_session_tmp: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_tmp_older_than_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallSdkParams {
    pub sdk_subpath: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddApprovedOauthTokenParams {
    pub token: Secret<String>,
}

/// A decoded host request. A method this helper does not know is
/// [`HostMethod::Unknown`], answered with [`unknown_method_message`].
#[derive(Debug, Clone, PartialEq)]
pub enum HostMethod {
    Configure(ConfigureParams),
    SubscribeEvents(SubscribeEventsParams),
    CreateVm(CreateVmParams),
    StartVm(StartVmParams),
    StopVm,
    IsRunning,
    IsGuestConnected,
    Spawn(Box<SpawnParams>),
    Kill(KillParams),
    WriteStdin(WriteStdinParams),
    IsProcessRunning(ProcessIdParams),
    SendGuestResponse(SendGuestResponseParams),
    SetDebugLogging(SetDebugLoggingParams),
    MountPath(MountPathParams),
    ReadFile(ReadFileParams),
    GetSessionsDiskInfo(SessionsDiskInfoParams),
    DeleteSessionDirs(DeleteSessionDirsParams),
    PruneSessionCaches(PruneSessionCachesParams),
    InstallSdk(InstallSdkParams),
    AddApprovedOauthToken(AddApprovedOauthTokenParams),
    GetNetworkDrives,
    Unknown(String),
}

/// The error text compatible helpers answer an unknown method with.
pub fn unknown_method_message(name: &str) -> String {
    format!("Unknown method: {name}")
}

impl HostMethod {
    pub fn parse(method: &str, params: Value) -> Result<Self, RequestError> {
        fn p<T: serde::de::DeserializeOwned>(method: &str, v: Value) -> Result<T, RequestError> {
            serde_json::from_value(v).map_err(|e| RequestError::BadParams {
                method: method.to_owned(),
                detail: e.to_string(),
            })
        }
        Ok(match method {
            "configure" => Self::Configure(p(method, params)?),
            "subscribeEvents" => Self::SubscribeEvents(p(method, params)?),
            "createVM" => Self::CreateVm(p(method, params)?),
            "startVM" => Self::StartVm(p(method, params)?),
            "stopVM" => Self::StopVm,
            "isRunning" => Self::IsRunning,
            "isGuestConnected" => Self::IsGuestConnected,
            "spawn" => Self::Spawn(Box::new(p(method, params)?)),
            "kill" => Self::Kill(p(method, params)?),
            "writeStdin" => Self::WriteStdin(p(method, params)?),
            "isProcessRunning" => Self::IsProcessRunning(p(method, params)?),
            "sendGuestResponse" => Self::SendGuestResponse(p(method, params)?),
            "setDebugLogging" => Self::SetDebugLogging(p(method, params)?),
            "mountPath" => Self::MountPath(p(method, params)?),
            "readFile" => Self::ReadFile(p(method, params)?),
            "getSessionsDiskInfo" => Self::GetSessionsDiskInfo(p(method, params)?),
            "deleteSessionDirs" => Self::DeleteSessionDirs(p(method, params)?),
            "pruneSessionCaches" => Self::PruneSessionCaches(p(method, params)?),
            "installSdk" => Self::InstallSdk(p(method, params)?),
            "addApprovedOauthToken" => Self::AddApprovedOauthToken(p(method, params)?),
            "getNetworkDrives" => Self::GetNetworkDrives,
            other => Self::Unknown(other.to_owned()),
        })
    }

    /// The wire name and params, for sending (the tests and a client use it).
    pub fn to_wire(&self) -> (String, Value) {
        fn v<T: Serialize>(t: &T) -> Value {
            serde_json::to_value(t).unwrap_or(Value::Null)
        }
        let empty = || Value::Object(Map::new());
        let (name, params) = match self {
            Self::Configure(x) => ("configure", v(x)),
            Self::SubscribeEvents(x) => ("subscribeEvents", v(x)),
            Self::CreateVm(x) => ("createVM", v(x)),
            Self::StartVm(x) => ("startVM", v(x)),
            Self::StopVm => ("stopVM", empty()),
            Self::IsRunning => ("isRunning", empty()),
            Self::IsGuestConnected => ("isGuestConnected", empty()),
            Self::Spawn(x) => ("spawn", v(x)),
            Self::Kill(x) => ("kill", v(x)),
            Self::WriteStdin(x) => ("writeStdin", v(x)),
            Self::IsProcessRunning(x) => ("isProcessRunning", v(x)),
            Self::SendGuestResponse(x) => ("sendGuestResponse", v(x)),
            Self::SetDebugLogging(x) => ("setDebugLogging", v(x)),
            Self::MountPath(x) => ("mountPath", v(x)),
            Self::ReadFile(x) => ("readFile", v(x)),
            Self::GetSessionsDiskInfo(x) => ("getSessionsDiskInfo", v(x)),
            Self::DeleteSessionDirs(x) => ("deleteSessionDirs", v(x)),
            Self::PruneSessionCaches(x) => ("pruneSessionCaches", v(x)),
            Self::InstallSdk(x) => ("installSdk", v(x)),
            Self::AddApprovedOauthToken(x) => ("addApprovedOauthToken", v(x)),
            Self::GetNetworkDrives => ("getNetworkDrives", empty()),
            Self::Unknown(name) => return (name.clone(), empty()),
        };
        (name.to_owned(), params)
    }
}

// Results the client reads.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningResult {
    pub running: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectedResult {
    pub connected: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpawnResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_mounts: Option<Vec<Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRunningResult {
    pub running: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadFileResult {
    /// Base64 of the file's bytes.
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionsDiskInfo {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub sessions: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeleteSessionDirsResult {
    pub deleted: Vec<String>,
    pub errors: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneSessionCachesResult {
    pub pruned_sessions: Vec<String>,
    pub skipped_sessions: Vec<String>,
    pub freed_bytes: u64,
    pub errors: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NetworkDrivesResult {
    pub drives: Vec<Value>,
}

/// The reply envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Echoed only when the request carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl Response {
    pub fn ok(id: Option<Value>, result: Option<Value>) -> Self {
        Self {
            success: true,
            result,
            error: None,
            id,
        }
    }

    pub fn ok_with<T: Serialize>(id: Option<Value>, result: &T) -> Self {
        Self::ok(id, serde_json::to_value(result).ok())
    }

    pub fn err(id: Option<Value>, message: impl Into<String>) -> Self {
        Self {
            success: false,
            result: None,
            error: Some(message.into()),
            id,
        }
    }
}

/// An event frame pushed to subscribers, `{type, ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ClientEvent {
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
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
    Request {
        id: Value,
        method: String,
        #[serde(default)]
        params: Value,
    },
}
