//! The host protocol: the desktop client and the helper.
//!
//! A request is `{"method", "id"?, "params"?}` ([`RequestEnvelope`], typed as
//! [`HostRequest`] / [`HostMethod`]); the reply ([`Response`]) is
//! `{"success": true, "result"?}` or `{"success": false, "error": "text"}`,
//! echoing `id` only when the request had one. Event frames pushed to
//! subscribers are flat objects tagged by `type` ([`ClientEvent`]).
//!
//! A server loop, per decoded frame:
//!
//! ```
//! use socket_proto::host::{HostMethod, HostRequest, Response, RunningResult};
//!
//! fn answer(obj: socket_proto::JsonObject) -> Response {
//!     let req = match HostRequest::from_object(obj) {
//!         Ok(req) => req,
//!         // Bad envelope or params: answered, naming the field.
//!         Err(bad) => return bad.to_response(),
//!     };
//!     match &req.method {
//!         HostMethod::IsRunning => req.ok_with(&RunningResult { running: true }),
//!         HostMethod::StopVm => req.ok(),
//!         _ => req.unknown_method(),
//!     }
//! }
//!
//! let obj = serde_json::from_str(r#"{"method": "isRunning", "id": 4}"#).unwrap();
//! assert_eq!(
//!     serde_json::to_value(answer(obj)).unwrap(),
//!     serde_json::json!({"success": true, "result": {"running": true}, "id": 4})
//! );
//! let obj = serde_json::from_str(r#"{"method": "teleport"}"#).unwrap();
//! assert_eq!(
//!     serde_json::to_value(answer(obj)).unwrap(),
//!     serde_json::json!({"success": false, "error": "Unknown method: teleport"})
//! );
//! ```

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::frame::JsonObject;
use crate::guest::GuestRequest;
use crate::params::lenient::{env_map, negative_as_none, non_positive_as_none, null_as_default};
use crate::params::{decode_params, ParamsError};
use crate::redact::{redacted_debug, Secret};

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

/// `networkStatus` values the client knows.
pub const NETWORK_STATUSES: &[&str] = &["CONNECTED", "NOT_CONNECTED"];
/// `apiReachability` values the client knows.
pub const API_REACHABILITY_STATUSES: &[&str] = &[
    "REACHABLE",
    "PROBABLY_UNREACHABLE",
    "UNREACHABLE",
    "UNKNOWN",
];
/// `startupStep` statuses the client knows.
pub const STARTUP_STEP_STATUSES: &[&str] = &["running", "completed", "failed"];

/// The error text compatible helpers answer an unknown method with:
/// `Unknown method: NAME`.
pub fn unknown_method_message(name: &str) -> String {
    format!("Unknown method: {name}")
}

/// Why a request could not be decoded. The text is fit to send back as the
/// reply's `error`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// No `method`, or one that is not a string.
    #[error("request has no \"method\" string")]
    MissingMethod,
    /// `params` is present but not an object (nor null).
    #[error("\"params\" must be an object")]
    ParamsNotObject,
    /// The params do not fit the method's type.
    #[error("bad params for {method}: {detail}")]
    BadParams {
        /// The method's wire name.
        method: String,
        /// The field at fault, when one is.
        field: Option<String>,
        /// What is wrong; names `field` when there is one.
        detail: String,
    },
}

impl RequestError {
    fn bad_params(method: &str, e: ParamsError) -> Self {
        RequestError::BadParams {
            method: method.to_owned(),
            field: e.field,
            detail: e.message,
        }
    }
}

/// A request that could not be decoded, with the `id` to answer it under.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error}")]
pub struct BadRequest {
    /// The request's `id`, when it had a usable one.
    pub id: Option<Value>,
    /// What was wrong.
    pub error: RequestError,
}

impl BadRequest {
    /// The `success: false` reply to send back.
    pub fn to_response(&self) -> Response {
        Response::err(self.id.clone(), self.error.to_string())
    }
}

/// The request envelope as it came off the wire: `{method, id?, params?}`,
/// params still raw. Its `Debug` output is redacted.
#[derive(Clone, PartialEq)]
pub struct RequestEnvelope {
    /// The method's wire name.
    pub method: String,
    /// Present on persistent-pipe requests (a number there); echoed in the
    /// reply. A `null` id counts as none.
    pub id: Option<Value>,
    /// Always an object (`{}` when the request had none).
    pub params: Value,
}

redacted_debug!(RequestEnvelope);

impl RequestEnvelope {
    /// An envelope for sending.
    pub fn new(method: impl Into<String>, id: Option<Value>, params: Value) -> Self {
        Self {
            method: method.into(),
            id,
            params,
        }
    }

    /// Reads the envelope from a decoded frame. Unknown top-level keys are
    /// ignored.
    pub fn from_object(obj: JsonObject) -> Result<Self, RequestError> {
        Self::split(obj).map_err(|bad| bad.error)
    }

    fn split(mut obj: JsonObject) -> Result<Self, BadRequest> {
        let id = obj.remove("id").filter(|v| !v.is_null());
        let fail = |error| BadRequest {
            id: id.clone(),
            error,
        };
        let method = match obj.remove("method") {
            Some(Value::String(m)) => m,
            _ => return Err(fail(RequestError::MissingMethod)),
        };
        let params = match obj.remove("params") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(p @ Value::Object(_)) => p,
            Some(_) => return Err(fail(RequestError::ParamsNotObject)),
        };
        Ok(Self { method, id, params })
    }

    /// Decodes the params for this method.
    pub fn method(&self) -> Result<HostMethod, RequestError> {
        HostMethod::parse(&self.method, self.params.clone())
    }
}

impl Serialize for RequestEnvelope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("method", &self.method)?;
        if let Some(id) = &self.id {
            m.serialize_entry("id", id)?;
        }
        m.serialize_entry("params", &self.params)?;
        m.end()
    }
}

/// A decoded request: its id and its typed method. `Debug` never shows a
/// secret (they are [`Secret`]s).
#[derive(Debug, Clone, PartialEq)]
pub struct HostRequest {
    /// Present on persistent-pipe requests; echoed in the reply.
    pub id: Option<Value>,
    /// The method and its params.
    pub method: HostMethod,
}

impl HostRequest {
    /// A request for sending (by a client or a test).
    pub fn new(id: Option<Value>, method: HostMethod) -> Self {
        Self { id, method }
    }

    /// Decodes a request frame. A method name that isn't in the protocol is
    /// [`HostMethod::Unknown`], not an error; the error keeps the request's
    /// id so that it can be answered ([`BadRequest::to_response`]).
    pub fn from_object(obj: JsonObject) -> Result<Self, BadRequest> {
        Self::from_envelope(RequestEnvelope::split(obj)?)
    }

    /// Decodes the params of an envelope.
    pub fn from_envelope(env: RequestEnvelope) -> Result<Self, BadRequest> {
        match HostMethod::parse(&env.method, env.params) {
            Ok(method) => Ok(Self { id: env.id, method }),
            Err(error) => Err(BadRequest { id: env.id, error }),
        }
    }

    /// The raw envelope, for sending.
    pub fn to_envelope(&self) -> RequestEnvelope {
        let (method, params) = self.method.to_wire();
        RequestEnvelope {
            method,
            id: self.id.clone(),
            params,
        }
    }

    /// A one-shot request (no id): the connection closes after its reply.
    pub fn is_one_shot(&self) -> bool {
        self.id.is_none()
    }

    /// `{"success": true}` under this request's id.
    pub fn ok(&self) -> Response {
        Response::ok(self.id.clone(), None)
    }

    /// `{"success": true, "result": ...}` under this request's id.
    pub fn ok_with<T: Serialize>(&self, result: &T) -> Response {
        Response::ok_with(self.id.clone(), result)
    }

    /// `{"success": false, "error": ...}` under this request's id.
    pub fn err(&self, message: impl Into<String>) -> Response {
        Response::err(self.id.clone(), message)
    }

    /// The answer to a method this helper does not serve:
    /// `Unknown method: NAME`.
    pub fn unknown_method(&self) -> Response {
        Response::unknown_method(self.id.clone(), self.method.name())
    }
}

impl Serialize for HostRequest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_envelope().serialize(s)
    }
}

// ---------------------------------------------------------------------------
// Params. Field names are the spec's, exactly; `?` fields are `Option`.

/// `configure`: the long form from the client's start-up, or the short pipe
/// form `{userDataName, userDataRoot, sessionOnly: true}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigureParams {
    /// The client's profile name (coworkvm only logs it: optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_name: Option<String>,
    /// The client's profile directory (coworkvm only logs it: optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_root: Option<String>,
    /// `true` in the short pipe form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_only: Option<bool>,
    /// Network drives to offer (shape owned by the client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_drives: Option<Value>,
    /// Guest memory in MiB (negative: not given).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "memoryMB",
        deserialize_with = "negative_as_none"
    )]
    pub memory_mb: Option<u64>,
    /// Guest vCPUs (negative: not given).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "negative_as_none"
    )]
    pub cpu_count: Option<u32>,
    /// Path of the stock helper's binaries (unused by coworkvm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smol_bin_path: Option<String>,
    /// Where the client wants logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_dir: Option<String>,
    /// Path of a virtiofsd binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtiofsd_path: Option<String>,
    /// UEFI code image (unused by coworkvm's direct kernel boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_code_path: Option<String>,
    /// UEFI variables template (unused by coworkvm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_vars_template_path: Option<String>,
}

/// `subscribeEvents {userDataName, userDataRoot}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscribeEventsParams {
    /// The client's profile name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_name: Option<String>,
    /// The client's profile directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_root: Option<String>,
}

/// `createVM {bundlePath, diskSizeGB}`. Both optional: without a bundle
/// there is nothing to prepare (the helper answers success and does
/// nothing, as the Go peer's KVM backend always does).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateVmParams {
    /// The VM bundle directory; empty when not given.
    #[serde(default, deserialize_with = "null_as_default")]
    pub bundle_path: String,
    /// Size of the session disk, GB (negative: not given).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "diskSizeGB",
        deserialize_with = "negative_as_none"
    )]
    pub disk_size_gb: Option<u64>,
}

/// `startVM {bundlePath, memoryGB?, cpuCount?, apiProbeURL?}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartVmParams {
    /// The VM bundle directory; empty when not given (the helper then uses
    /// the last `createVM`'s, or answers that it needs one).
    #[serde(default, deserialize_with = "null_as_default")]
    pub bundle_path: String,
    /// Guest memory, GB (negative: not given).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "memoryGB",
        deserialize_with = "negative_as_none"
    )]
    pub memory_gb: Option<u64>,
    /// Guest vCPUs (negative: not given).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "negative_as_none"
    )]
    pub cpu_count: Option<u32>,
    /// URL the guest probes to report `apiReachability`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "apiProbeURL"
    )]
    pub api_probe_url: Option<String>,
}

/// `spawn`: a process in a session. Also sent to the guest unchanged.
/// `env` and `oauthToken` are [`Secret`]s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpawnParams {
    /// The process id the client chose; events carry it.
    pub id: String,
    /// The session name: `/sessions/<name>` in the guest.
    pub name: String,
    /// The program.
    pub command: String,
    /// Its arguments (`null`: none).
    #[serde(default, deserialize_with = "null_as_default")]
    pub args: Vec<String>,
    /// Whether this resumes an earlier session (`null`: false). Resume is
    /// carried by `--resume` in `args` and the `.claude` mount.
    #[serde(default, deserialize_with = "null_as_default")]
    pub is_resume: bool,
    /// Working directory in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Environment; carries credentials, never logged. A `null` value
    /// drops its key.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "env_map"
    )]
    pub env: Option<Secret<BTreeMap<String, String>>>,
    /// Host folders to mount at `/sessions/<name>/mnt/<mountName>` (shape
    /// owned by the client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_mounts: Option<Value>,
    /// Domains the egress proxy lets the process reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_domains: Option<Vec<String>>,
    /// Run once and exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_shot: Option<bool>,
    /// Populate a skeleton home directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_skeleton_home: Option<bool>,
    /// OAuth token for the process; never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth_token: Option<Secret<String>>,
    /// coworkvm extension (agent capability `base64Streams`): how the
    /// `data` of this process's stdout, stderr and stdin travels. The
    /// client never sends it and gets UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<StreamEncoding>,
    /// coworkvm extension: `false` runs the command as root in the guest's
    /// own root, outside any session sandbox (`coworkvm run`'s default: it
    /// is `ssh host CMD` for the VM's owner). Absent or `true`: a session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<bool>,
}

/// How stream `data` is carried in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamEncoding {
    /// UTF-8 text; invalid sequences become U+FFFD (lossy for binary).
    #[default]
    Utf8,
    /// Standard base64 of the raw bytes (binary-safe).
    Base64,
}

/// A signal by name (`"SIGTERM"`) or number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Signal {
    /// A signal number.
    Number(i32),
    /// A signal name, with or without the `SIG` prefix.
    Name(String),
}

/// `kill {id, signal}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KillParams {
    /// The process id.
    pub id: String,
    /// The signal; the receiver picks a default (SIGTERM) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<Signal>,
}

/// `writeStdin {id, data}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteStdinParams {
    /// The process id (required: stdin for no process goes nowhere).
    pub id: String,
    /// UTF-8 text for the process's stdin (missing or `null`: none).
    #[serde(default, deserialize_with = "null_as_default")]
    pub data: String,
}

/// `isProcessRunning {id}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessIdParams {
    /// The process id (missing: no process, which does not run).
    #[serde(default, deserialize_with = "null_as_default")]
    pub id: String,
}

/// `sendGuestResponse {id, resultJson?, error?}`: the client's answer to a
/// guest `request` event; see [`GuestFrame::from`](crate::guest::GuestFrame).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendGuestResponseParams {
    /// The guest request's id.
    pub id: Value,
    /// The result, as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_json: Option<String>,
    /// The error: text, or `{code, message}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// `setDebugLogging {enabled}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetDebugLoggingParams {
    /// Turn debug logging on or off (missing or `null`: off, as in the Go
    /// peer).
    #[serde(default, deserialize_with = "null_as_default")]
    pub enabled: bool,
}

/// `mountPath {processId, subpath, mountName, mode}`. Every field may be
/// missing (empty): an empty `subpath` is nothing to mount, an empty
/// `mountName` is taken from `subpath`, an empty `mode` is `ro`; an empty
/// `processId` names no session, which the helper refuses.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountPathParams {
    /// The process whose session gets the mount.
    #[serde(default, deserialize_with = "null_as_default")]
    pub process_id: String,
    /// The host folder, relative to the shared root.
    #[serde(default, deserialize_with = "null_as_default")]
    pub subpath: String,
    /// Appears at `/sessions/<name>/mnt/<mountName>`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub mount_name: String,
    /// `ro`, `rw` or `rwd`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub mode: String,
}

/// `readFile {processName, filePath}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadFileParams {
    /// The session name (missing: taken from `filePath`'s
    /// `/sessions/<name>/`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub process_name: String,
    /// A path inside `/sessions/<processName>` (required).
    pub file_path: String,
}

/// `getSessionsDiskInfo {lowWaterBytes}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionsDiskInfoParams {
    /// Free space under which the disk counts as low (negative: not
    /// given).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "negative_as_none"
    )]
    pub low_water_bytes: Option<u64>,
}

/// `deleteSessionDirs {names}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteSessionDirsParams {
    /// Session names (missing or `null`: none).
    #[serde(default, deserialize_with = "null_as_default")]
    pub names: Vec<String>,
}

/// `pruneSessionCaches {onlyIfFreeBytesBelow, includeSessionTmp,
/// sessionTmpOlderThanSeconds}`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneSessionCachesParams {
    /// Prune only when free space is below this. `0` (the client's menu
    /// cleanup sends it) means prune whatever the free space, and so does a
    /// negative value: both decode as absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_positive_as_none"
    )]
    pub only_if_free_bytes_below: Option<u64>,
    /// Also prune sessions' tmp directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_session_tmp: Option<bool>,
    /// Age above which tmp content goes (negative: not given).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "negative_as_none"
    )]
    pub session_tmp_older_than_seconds: Option<u64>,
}

/// `installSdk {sdkSubpath, version}`; coworkvm's transfer extension adds
/// `sha256` and `size` on the guest connection (see [`crate::sdk`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallSdkParams {
    /// Relative to the user's home.
    pub sdk_subpath: String,
    /// The version directory under it.
    pub version: String,
    /// coworkvm extension, helper to agent: lowercase hex SHA-256 of the
    /// binary the helper is about to send. The client never sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// coworkvm extension, helper to agent: the binary's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// coworkvm extension, helper to agent: the version directory is granted
    /// read-only through the shared-folder device at this share-relative
    /// path (`home/u/.config/.../<version>`, under
    /// `/mnt/.virtiofs-root/shared/`); the agent uses the binary there and
    /// no bytes are copied. The client never sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_path: Option<String>,
}

/// `addApprovedOauthToken {token}`; the token is a [`Secret`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddApprovedOauthTokenParams {
    /// Never logged. Missing, `null` or empty: no token (nothing changes).
    #[serde(default, deserialize_with = "null_as_default")]
    pub token: Secret<String>,
}

/// A decoded host method with its typed params. A method this helper does
/// not know is [`HostMethod::Unknown`], answered with
/// [`unknown_method_message`].
#[derive(Debug, Clone, PartialEq)]
pub enum HostMethod {
    /// `configure`
    Configure(ConfigureParams),
    /// `subscribeEvents`
    SubscribeEvents(SubscribeEventsParams),
    /// `createVM`
    CreateVm(CreateVmParams),
    /// `startVM`
    StartVm(StartVmParams),
    /// `stopVM`
    StopVm,
    /// `isRunning`
    IsRunning,
    /// `isGuestConnected`
    IsGuestConnected,
    /// `spawn`
    Spawn(Box<SpawnParams>),
    /// `kill`
    Kill(KillParams),
    /// `writeStdin`
    WriteStdin(WriteStdinParams),
    /// `isProcessRunning`
    IsProcessRunning(ProcessIdParams),
    /// `sendGuestResponse`
    SendGuestResponse(SendGuestResponseParams),
    /// `setDebugLogging`
    SetDebugLogging(SetDebugLoggingParams),
    /// `mountPath`
    MountPath(MountPathParams),
    /// `readFile`
    ReadFile(ReadFileParams),
    /// `getSessionsDiskInfo`
    GetSessionsDiskInfo(SessionsDiskInfoParams),
    /// `deleteSessionDirs`
    DeleteSessionDirs(DeleteSessionDirsParams),
    /// `pruneSessionCaches`
    PruneSessionCaches(PruneSessionCachesParams),
    /// `installSdk`
    InstallSdk(InstallSdkParams),
    /// `addApprovedOauthToken`
    AddApprovedOauthToken(AddApprovedOauthTokenParams),
    /// `getNetworkDrives`
    GetNetworkDrives,
    /// A method not in the protocol (its name).
    Unknown(String),
}

impl HostMethod {
    /// Decodes `params` (`null` counts as `{}`) for the method named
    /// `method`. Unknown fields are ignored; a missing or mistyped field is
    /// a [`RequestError::BadParams`] naming it.
    pub fn parse(method: &str, params: Value) -> Result<Self, RequestError> {
        fn p<T: serde::de::DeserializeOwned>(method: &str, v: Value) -> Result<T, RequestError> {
            decode_params(v).map_err(|e| RequestError::bad_params(method, e))
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

    /// The wire name.
    pub fn name(&self) -> &str {
        match self {
            Self::Configure(_) => "configure",
            Self::SubscribeEvents(_) => "subscribeEvents",
            Self::CreateVm(_) => "createVM",
            Self::StartVm(_) => "startVM",
            Self::StopVm => "stopVM",
            Self::IsRunning => "isRunning",
            Self::IsGuestConnected => "isGuestConnected",
            Self::Spawn(_) => "spawn",
            Self::Kill(_) => "kill",
            Self::WriteStdin(_) => "writeStdin",
            Self::IsProcessRunning(_) => "isProcessRunning",
            Self::SendGuestResponse(_) => "sendGuestResponse",
            Self::SetDebugLogging(_) => "setDebugLogging",
            Self::MountPath(_) => "mountPath",
            Self::ReadFile(_) => "readFile",
            Self::GetSessionsDiskInfo(_) => "getSessionsDiskInfo",
            Self::DeleteSessionDirs(_) => "deleteSessionDirs",
            Self::PruneSessionCaches(_) => "pruneSessionCaches",
            Self::InstallSdk(_) => "installSdk",
            Self::AddApprovedOauthToken(_) => "addApprovedOauthToken",
            Self::GetNetworkDrives => "getNetworkDrives",
            Self::Unknown(name) => name,
        }
    }

    /// The wire name and params, for sending (a client or a test). Methods
    /// without params get `{}`.
    pub fn to_wire(&self) -> (String, Value) {
        fn v<T: Serialize>(t: &T) -> Value {
            serde_json::to_value(t).unwrap_or(Value::Null)
        }
        let params = match self {
            Self::Configure(x) => v(x),
            Self::SubscribeEvents(x) => v(x),
            Self::CreateVm(x) => v(x),
            Self::StartVm(x) => v(x),
            Self::Spawn(x) => v(x),
            Self::Kill(x) => v(x),
            Self::WriteStdin(x) => v(x),
            Self::IsProcessRunning(x) => v(x),
            Self::SendGuestResponse(x) => v(x),
            Self::SetDebugLogging(x) => v(x),
            Self::MountPath(x) => v(x),
            Self::ReadFile(x) => v(x),
            Self::GetSessionsDiskInfo(x) => v(x),
            Self::DeleteSessionDirs(x) => v(x),
            Self::PruneSessionCaches(x) => v(x),
            Self::InstallSdk(x) => v(x),
            Self::AddApprovedOauthToken(x) => v(x),
            Self::StopVm
            | Self::IsRunning
            | Self::IsGuestConnected
            | Self::GetNetworkDrives
            | Self::Unknown(_) => Value::Object(Map::new()),
        };
        (self.name().to_owned(), params)
    }

    /// The guest request that serves this method, for the methods the
    /// helper forwards to the agent unchanged (`spawn`, `kill`,
    /// `isProcessRunning`, `readFile`, `mountPath`, `installSdk`,
    /// `addApprovedOauthToken`, the three session-disk methods and
    /// `setDebugLogging`). `writeStdin` becomes a notification instead
    /// ([`GuestNotification`](crate::guest::GuestNotification)`::from`).
    pub fn to_guest_request(&self) -> Option<GuestRequest> {
        Some(match self {
            Self::Spawn(p) => GuestRequest::Spawn(p.clone()),
            Self::Kill(p) => GuestRequest::Kill(p.clone()),
            Self::IsProcessRunning(p) => GuestRequest::IsProcessRunning(p.clone()),
            Self::ReadFile(p) => GuestRequest::ReadFile(p.clone()),
            Self::MountPath(p) => GuestRequest::MountPath(p.clone()),
            Self::InstallSdk(p) => GuestRequest::InstallSdk(p.clone()),
            Self::AddApprovedOauthToken(p) => GuestRequest::AddApprovedOauthToken(p.clone()),
            Self::GetSessionsDiskInfo(p) => GuestRequest::GetSessionsDiskInfo(p.clone()),
            Self::DeleteSessionDirs(p) => GuestRequest::DeleteSessionDirs(p.clone()),
            Self::PruneSessionCaches(p) => GuestRequest::PruneSessionCaches(p.clone()),
            Self::SetDebugLogging(p) => GuestRequest::SetDebugLogging(p.clone()),
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------
// Results the client reads.

/// `isRunning` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningResult {
    /// Whether the VM runs.
    pub running: bool,
}

/// `isGuestConnected` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectedResult {
    /// True between the agent's `ready` and the loss of its connection.
    pub connected: bool,
}

/// `spawn` result.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpawnResult {
    /// The names of the mounts that could not be made
    /// ([`crate::guest::failed_mount_names`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_mounts: Option<Vec<String>>,
}

/// `isProcessRunning` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRunningResult {
    /// Whether the process still runs.
    pub running: bool,
    /// Its exit code once it has exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// `mountPath` result: none is needed; a `guestPath` is harmless.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountPathResult {
    /// Where the mount appeared in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_path: Option<String>,
}

/// `readFile` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadFileResult {
    /// Base64 of the file's bytes.
    pub content: String,
}

/// `getSessionsDiskInfo` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionsDiskInfo {
    /// Size of the session disk.
    pub total_bytes: u64,
    /// Free space on it.
    pub free_bytes: u64,
    /// Per-session entries (shape owned by the client).
    pub sessions: Vec<Value>,
}

/// The `getSessionsDiskInfo` result, by its method-based name.
pub type SessionsDiskInfoResult = SessionsDiskInfo;

/// `deleteSessionDirs` result.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DeleteSessionDirsResult {
    /// Names deleted.
    pub deleted: Vec<String>,
    /// Name to error text, for those that could not be.
    pub errors: BTreeMap<String, String>,
}

/// `pruneSessionCaches` result.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneSessionCachesResult {
    /// Sessions pruned.
    pub pruned_sessions: Vec<String>,
    /// Sessions left alone.
    pub skipped_sessions: Vec<String>,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Session name to error text.
    pub errors: BTreeMap<String, String>,
}

/// `getNetworkDrives` result.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NetworkDrivesResult {
    /// The drives (shape owned by the client).
    pub drives: Vec<Value>,
}

/// The reply envelope. Its `Debug` output is redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the method succeeded.
    pub success: bool,
    /// The result, on success, when the method has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error text, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Echoed only when the request carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

redacted_debug!(Response);

impl Response {
    /// Success, with an optional result.
    pub fn ok(id: Option<Value>, result: Option<Value>) -> Self {
        Self {
            success: true,
            result,
            error: None,
            id,
        }
    }

    /// Success with a typed result.
    pub fn ok_with<T: Serialize + ?Sized>(id: Option<Value>, result: &T) -> Self {
        Self::ok(id, serde_json::to_value(result).ok())
    }

    /// Failure with an error text.
    pub fn err(id: Option<Value>, message: impl Into<String>) -> Self {
        Self {
            success: false,
            result: None,
            error: Some(message.into()),
            id,
        }
    }

    /// `{"success": false, "error": "Unknown method: NAME"}`.
    pub fn unknown_method(id: Option<Value>, name: &str) -> Self {
        Self::err(id, unknown_method_message(name))
    }

    /// The result decoded as `T` (a client or a test reading a reply).
    /// A missing result decodes as `{}`.
    pub fn result_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, ParamsError> {
        decode_params(self.result.clone().unwrap_or(Value::Null))
    }
}

/// An event frame pushed to subscribers: `{type, ...}`. Its `Debug` output
/// is redacted.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ClientEvent {
    /// `{type: "stdout", id, data}`
    Stdout {
        /// The process id.
        id: String,
        /// UTF-8 output.
        data: String,
    },
    /// `{type: "stderr", id, data}`
    Stderr {
        /// The process id.
        id: String,
        /// UTF-8 output.
        data: String,
    },
    /// `{type: "exit", id, exitCode?, signal?, oomKillCount?}`
    #[serde(rename_all = "camelCase")]
    Exit {
        /// The process id.
        id: String,
        /// Exit status, when it exited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        /// The signal that ended it (name or number).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<Value>,
        /// OOM kills seen in its session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oom_kill_count: Option<u64>,
    },
    /// `{type: "error", id, message, fatal?}`
    Error {
        /// The process id, when the error is about one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The text (the field is `message`, not `error`).
        message: String,
        /// Whether the process is gone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fatal: Option<bool>,
    },
    /// `{type: "networkStatus", status}`: see [`NETWORK_STATUSES`].
    NetworkStatus {
        /// `CONNECTED` or `NOT_CONNECTED`.
        status: String,
    },
    /// `{type: "apiReachability", status}`: see [`API_REACHABILITY_STATUSES`].
    ApiReachability {
        /// `REACHABLE`, `PROBABLY_UNREACHABLE`, `UNREACHABLE` or `UNKNOWN`.
        status: String,
    },
    /// `{type: "startupStep", step, status}`.
    StartupStep {
        /// The step's name.
        step: String,
        /// `running`, `completed` or `failed`.
        status: String,
    },
    /// `{type: "request", id, method, params}`: a guest request, answered
    /// with `sendGuestResponse`.
    Request {
        /// The guest request's id.
        id: Value,
        /// The guest request's method.
        method: String,
        /// Its params.
        #[serde(default)]
        params: Value,
    },
}

redacted_debug!(ClientEvent);

impl ClientEvent {
    /// The event's `type`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Stdout { .. } => "stdout",
            Self::Stderr { .. } => "stderr",
            Self::Exit { .. } => "exit",
            Self::Error { .. } => "error",
            Self::NetworkStatus { .. } => "networkStatus",
            Self::ApiReachability { .. } => "apiReachability",
            Self::StartupStep { .. } => "startupStep",
            Self::Request { .. } => "request",
        }
    }

    /// Decodes an event frame (a client or a test reading events).
    pub fn from_object(obj: JsonObject) -> Result<Self, serde_json::Error> {
        serde_json::from_value(Value::Object(obj))
    }
}
