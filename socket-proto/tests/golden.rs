//! Golden samples, written from the protocol tables: each decodes to its
//! typed form and encodes back to an equivalent JSON value. There is one
//! test per method, per event and per notification, and enumeration tests
//! that fail if a name of the protocol has no type or no sample.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use socket_proto::guest::{
    self, flatten_event, AgentInfo, FrameId, GuestError, GuestEvent, GuestFrame, GuestNotification,
    GuestRequest,
};
use socket_proto::host::{
    self, ClientEvent, ConnectedResult, DeleteSessionDirsResult, HostMethod, HostRequest,
    MountPathResult, NetworkDrivesResult, ProcessRunningResult, PruneSessionCachesResult,
    ReadFileResult, RequestEnvelope, RequestError, Response, RunningResult,
    SendGuestResponseParams, SessionsDiskInfo, SpawnResult,
};
use socket_proto::JsonObject;

// The protocol's names, copied from the specification's tables (not from the
// crate, so that a name the crate forgot fails here).
const SPEC_HOST_METHODS: &[&str] = &[
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
const SPEC_CLIENT_EVENTS: &[&str] = &[
    "stdout",
    "stderr",
    "exit",
    "error",
    "networkStatus",
    "apiReachability",
    "startupStep",
    "request",
];
const SPEC_GUEST_METHODS: &[&str] = &[
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
const SPEC_GUEST_NOTIFICATIONS: &[&str] = &["stdin", "hostProxyConfig", "staticIPAssignment"];
const SPEC_GUEST_EVENTS: &[&str] = &[
    "ready",
    "stdout",
    "stderr",
    "exit",
    "error",
    "networkStatus",
    "apiReachability",
    "startupStep",
];

fn obj(v: Value) -> JsonObject {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// Decodes `v` as `T` and encodes it back.
fn round_trip<T: DeserializeOwned + Serialize>(v: &Value) -> Value {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"));
    serde_json::to_value(&t).unwrap()
}

type ResultCheck = fn(&Value) -> Value;

struct HostSample {
    method: &'static str,
    params: Value,
    /// The result the client reads, and its typed round trip; `None` when
    /// the method has no result.
    result: Option<(Value, ResultCheck)>,
}

fn host_samples() -> Vec<HostSample> {
    let s = |method, params, result: Option<(Value, ResultCheck)>| HostSample {
        method,
        params,
        result,
    };
    vec![
        s(
            "configure",
            json!({"userDataName": "default", "userDataRoot": "/home/u/.config/app",
                "networkDrives": [], "memoryMB": 4096, "cpuCount": 4, "smolBinPath": "/opt/smol",
                "logDir": "/tmp/logs", "virtiofsdPath": "/usr/libexec/virtiofsd",
                "firmwareCodePath": "/usr/share/OVMF/OVMF_CODE.fd",
                "firmwareVarsTemplatePath": "/usr/share/OVMF/OVMF_VARS.fd"}),
            None,
        ),
        s(
            "subscribeEvents",
            json!({"userDataName": "default", "userDataRoot": "/r"}),
            None,
        ),
        s(
            "createVM",
            json!({"bundlePath": "/b/claudevm.bundle", "diskSizeGB": 10}),
            None,
        ),
        s(
            "startVM",
            json!({"bundlePath": "/b/claudevm.bundle", "memoryGB": 4, "cpuCount": 2,
                "apiProbeURL": "https://api.example.com/probe"}),
            None,
        ),
        s("stopVM", json!({}), None),
        s(
            "isRunning",
            json!({}),
            Some((json!({"running": true}), round_trip::<RunningResult>)),
        ),
        s(
            "isGuestConnected",
            json!({}),
            Some((json!({"connected": false}), round_trip::<ConnectedResult>)),
        ),
        s(
            "spawn",
            json!({"id": "p1", "name": "sess-a", "command": "claude", "args": ["-p", "hi"],
                "isResume": false, "cwd": "/sessions/sess-a", "env": {"API_KEY": "k"},
                "additionalMounts": [{"mountName": "proj", "hostPath": "/home/u/proj", "mode": "rw"}],
                "allowedDomains": ["example.com"], "oneShot": true, "mountSkeletonHome": false,
                "oauthToken": "tok"}),
            Some((json!({"failedMounts": ["proj"]}), round_trip::<SpawnResult>)),
        ),
        s("kill", json!({"id": "p1", "signal": "SIGTERM"}), None),
        s("writeStdin", json!({"id": "p1", "data": "hello\n"}), None),
        s(
            "isProcessRunning",
            json!({"id": "p1"}),
            Some((
                json!({"running": false, "exitCode": 0}),
                round_trip::<ProcessRunningResult>,
            )),
        ),
        s(
            "sendGuestResponse",
            json!({"id": "r-1", "resultJson": "{\"ok\":true}", "error": "denied"}),
            None,
        ),
        s("setDebugLogging", json!({"enabled": true}), None),
        s(
            "mountPath",
            json!({"processId": "p1", "subpath": "work", "mountName": "w", "mode": "ro"}),
            Some((
                json!({"guestPath": "/sessions/sess-a/mnt/w"}),
                round_trip::<MountPathResult>,
            )),
        ),
        s(
            "readFile",
            json!({"processName": "sess-a", "filePath": "/sessions/sess-a/out.txt"}),
            Some((json!({"content": "aGVsbG8="}), round_trip::<ReadFileResult>)),
        ),
        s(
            "getSessionsDiskInfo",
            json!({"lowWaterBytes": 1_000_000}),
            Some((
                json!({"totalBytes": 10_000_000_000u64, "freeBytes": 4_000_000_000u64,
                    "sessions": [{"name": "sess-a", "bytes": 1234}]}),
                round_trip::<SessionsDiskInfo>,
            )),
        ),
        s(
            "deleteSessionDirs",
            json!({"names": ["a", "b"]}),
            Some((
                json!({"deleted": ["a"], "errors": {"b": "busy"}}),
                round_trip::<DeleteSessionDirsResult>,
            )),
        ),
        s(
            "pruneSessionCaches",
            json!({"onlyIfFreeBytesBelow": 5_000_000_000u64,
                "includeSessionTmp": true, "sessionTmpOlderThanSeconds": 3600}),
            Some((
                json!({"prunedSessions": ["a"], "skippedSessions": ["b"], "freedBytes": 4096,
                    "errors": {}}),
                round_trip::<PruneSessionCachesResult>,
            )),
        ),
        s(
            "installSdk",
            json!({"sdkSubpath": ".local/share/sdk", "version": "1.2.3"}),
            None,
        ),
        s("addApprovedOauthToken", json!({"token": "secret"}), None),
        s(
            "getNetworkDrives",
            json!({}),
            Some((
                json!({"drives": [{"name": "share"}]}),
                round_trip::<NetworkDrivesResult>,
            )),
        ),
    ]
}

fn host_sample(method: &str) -> HostSample {
    host_samples()
        .into_iter()
        .find(|s| s.method == method)
        .unwrap_or_else(|| panic!("no golden sample for host method {method}"))
}

/// One host method: the request envelope (pipe form, with an id) decodes to
/// its type and encodes back; the one-shot form too; the result decodes to
/// its type and encodes back; the reply envelope echoes the id.
fn check_host_method(method: &str) {
    let sample = host_sample(method);
    let envelope = json!({"method": method, "id": 41, "params": sample.params});
    let req =
        HostRequest::from_object(obj(envelope.clone())).unwrap_or_else(|e| panic!("{method}: {e}"));
    assert!(
        !matches!(req.method, HostMethod::Unknown(_)),
        "{method} has no type"
    );
    assert_eq!(req.method.name(), method);
    assert_eq!(serde_json::to_value(&req).unwrap(), envelope, "{method}");

    let one_shot = json!({"method": method, "params": sample.params});
    let req1 = HostRequest::from_object(obj(one_shot.clone())).unwrap();
    assert!(req1.is_one_shot());
    assert_eq!(serde_json::to_value(&req1).unwrap(), one_shot);
    assert_eq!(
        serde_json::to_value(req1.ok()).unwrap(),
        json!({"success": true})
    );

    let reply = match &sample.result {
        Some((result, check)) => {
            assert_eq!(&check(result), result, "{method} result round trip");
            req.ok_with(result)
        }
        None => req.ok(),
    };
    let mut expected = json!({"success": true, "id": 41});
    if let Some((result, _)) = &sample.result {
        expected["result"] = result.clone();
    }
    assert_eq!(serde_json::to_value(&reply).unwrap(), expected);
    let back: Response = serde_json::from_value(expected).unwrap();
    assert_eq!(back, reply);
}

macro_rules! per_name {
    ($check:ident: $($test:ident => $name:literal),* $(,)?) => {
        $( #[test] fn $test() { $check($name) } )*
    };
}

per_name! { check_host_method:
    host_configure => "configure",
    host_subscribe_events => "subscribeEvents",
    host_create_vm => "createVM",
    host_start_vm => "startVM",
    host_stop_vm => "stopVM",
    host_is_running => "isRunning",
    host_is_guest_connected => "isGuestConnected",
    host_spawn => "spawn",
    host_kill => "kill",
    host_write_stdin => "writeStdin",
    host_is_process_running => "isProcessRunning",
    host_send_guest_response => "sendGuestResponse",
    host_set_debug_logging => "setDebugLogging",
    host_mount_path => "mountPath",
    host_read_file => "readFile",
    host_get_sessions_disk_info => "getSessionsDiskInfo",
    host_delete_session_dirs => "deleteSessionDirs",
    host_prune_session_caches => "pruneSessionCaches",
    host_install_sdk => "installSdk",
    host_add_approved_oauth_token => "addApprovedOauthToken",
    host_get_network_drives => "getNetworkDrives",
}

fn client_event_sample(name: &str) -> Value {
    let all = [
        json!({"type": "stdout", "id": "p1", "data": "out"}),
        json!({"type": "stderr", "id": "p1", "data": "err"}),
        json!({"type": "exit", "id": "p1", "exitCode": 3, "signal": "SIGKILL", "oomKillCount": 0}),
        json!({"type": "error", "id": "p1", "message": "boom", "fatal": true}),
        json!({"type": "networkStatus", "status": "NOT_CONNECTED"}),
        json!({"type": "apiReachability", "status": "PROBABLY_UNREACHABLE"}),
        json!({"type": "startupStep", "step": "bundle", "status": "running"}),
        json!({"type": "request", "id": "g-1", "method": "askUser", "params": {"q": 1}}),
    ];
    all.into_iter()
        .find(|s| s["type"] == name)
        .unwrap_or_else(|| panic!("no sample for client event {name}"))
}

fn check_client_event(name: &str) {
    let sample = client_event_sample(name);
    let ev = ClientEvent::from_object(obj(sample.clone())).unwrap();
    assert_eq!(ev.name(), name);
    assert_eq!(serde_json::to_value(&ev).unwrap(), sample, "{name}");
    // Optional fields may be left out, unknown ones are ignored.
    let mut lean = obj(sample);
    for optional in ["exitCode", "signal", "oomKillCount", "fatal"] {
        lean.remove(optional);
    }
    lean.insert("future".into(), json!(1));
    let ev = ClientEvent::from_object(lean).unwrap();
    assert_eq!(ev.name(), name);
}

per_name! { check_client_event:
    client_event_stdout => "stdout",
    client_event_stderr => "stderr",
    client_event_exit => "exit",
    client_event_error => "error",
    client_event_network_status => "networkStatus",
    client_event_api_reachability => "apiReachability",
    client_event_startup_step => "startupStep",
    client_event_request => "request",
}

/// Guest request params and results: the host protocol's, plus the two
/// guest-only methods.
fn guest_method_sample(method: &str) -> (Value, Value) {
    match method {
        "agent.info" => (
            json!({}),
            json!({"agent": "coworkvm-agent", "version": "0.1.0", "protocol": 1,
                "capabilities": ["spawn", "stdin"]}),
        ),
        "shutdown" => (json!({}), json!({})),
        // Results the agent sends where the client's table says none.
        "kill" | "mountPath" | "installSdk" | "addApprovedOauthToken" | "setDebugLogging" => {
            (host_sample(method).params, json!({}))
        }
        _ => {
            let s = host_sample(method);
            (s.params, s.result.expect("a result").0)
        }
    }
}

/// One guest method: the request frame decodes to its type and encodes back;
/// its response frame too, and the result decodes to the host's type.
fn check_guest_method(method: &str) {
    let (params, result) = guest_method_sample(method);
    let frame = json!({"type": "request", "id": "7", "method": method, "params": params});
    let parsed = GuestFrame::parse(obj(frame.clone())).unwrap().unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), frame, "{method}");
    let GuestFrame::Request {
        id,
        method: m,
        params,
    } = parsed
    else {
        panic!("{method}: not a request")
    };
    let req = GuestRequest::parse(&m, params).unwrap();
    assert!(
        !matches!(req, GuestRequest::Unknown(_)),
        "{method} has no type"
    );
    assert_eq!(req.name(), method);
    assert_eq!(
        serde_json::to_value(GuestFrame::from_request(id.0.clone(), &req)).unwrap(),
        frame
    );

    // The host method that forwards to it, when there is one.
    if let Ok(host) = HostMethod::parse(method, frame["params"].clone()) {
        if !matches!(host, HostMethod::Unknown(_)) {
            assert_eq!(host.to_guest_request().as_ref(), Some(&req), "{method}");
        }
    }

    let response = json!({"type": "response", "id": "7", "result": result});
    let parsed = GuestFrame::parse(obj(response.clone())).unwrap().unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), response);
    let typed = match method {
        "agent.info" => round_trip::<AgentInfo>(&result),
        "spawn" => round_trip::<SpawnResult>(&result),
        "isProcessRunning" => round_trip::<ProcessRunningResult>(&result),
        "readFile" => round_trip::<ReadFileResult>(&result),
        "getSessionsDiskInfo" => round_trip::<SessionsDiskInfo>(&result),
        "deleteSessionDirs" => round_trip::<DeleteSessionDirsResult>(&result),
        "pruneSessionCaches" => round_trip::<PruneSessionCachesResult>(&result),
        _ => round_trip::<Value>(&result),
    };
    assert_eq!(typed, result, "{method} result");
}

per_name! { check_guest_method:
    guest_agent_info => "agent.info",
    guest_spawn => "spawn",
    guest_kill => "kill",
    guest_is_process_running => "isProcessRunning",
    guest_read_file => "readFile",
    guest_mount_path => "mountPath",
    guest_install_sdk => "installSdk",
    guest_add_approved_oauth_token => "addApprovedOauthToken",
    guest_get_sessions_disk_info => "getSessionsDiskInfo",
    guest_delete_session_dirs => "deleteSessionDirs",
    guest_prune_session_caches => "pruneSessionCaches",
    guest_set_debug_logging => "setDebugLogging",
    guest_shutdown => "shutdown",
}

fn check_guest_notification(name: &str) {
    let params = match name {
        "stdin" => json!({"id": "p1", "data": "abc"}),
        "hostProxyConfig" => json!({"httpProxy": "http://h:1", "httpsProxy": "http://h:1",
            "noProxy": "localhost", "apiProbeURL": "https://a/p"}),
        "staticIPAssignment" => json!({"ip": "10.0.2.15", "prefixLength": 24,
            "gateway": "10.0.2.2", "dns": ["10.0.2.3"]}),
        other => panic!("no sample for notification {other}"),
    };
    let frame = json!({"type": "notification", "method": name, "params": params});
    let parsed = GuestFrame::parse(obj(frame.clone())).unwrap().unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), frame);
    let GuestFrame::Notification { method, params } = parsed else {
        panic!("{name}: not a notification")
    };
    let n = GuestNotification::parse(&method, params).unwrap();
    assert!(!matches!(n, GuestNotification::Unknown(_)), "{name}");
    assert_eq!(n.name(), name);
    assert_eq!(
        serde_json::to_value(GuestFrame::notification(&n)).unwrap(),
        frame
    );
}

per_name! { check_guest_notification:
    guest_notification_stdin => "stdin",
    guest_notification_host_proxy_config => "hostProxyConfig",
    guest_notification_static_ip_assignment => "staticIPAssignment",
}

/// A guest event's params, and the client event the helper makes of it.
fn guest_event_sample(name: &str) -> (Value, Option<Value>) {
    match name {
        "ready" => (json!({}), None),
        "stdout" => (
            json!({"id": "p1", "data": "x"}),
            Some(json!({"type": "stdout", "id": "p1", "data": "x"})),
        ),
        "stderr" => (
            json!({"id": "p1", "data": "y"}),
            Some(json!({"type": "stderr", "id": "p1", "data": "y"})),
        ),
        "exit" => (
            json!({"id": "p1", "code": 3, "signal": null, "oomKillCount": 0}),
            Some(json!({"type": "exit", "id": "p1", "exitCode": 3, "oomKillCount": 0})),
        ),
        "error" => (
            json!({"id": "p1", "message": "m", "fatal": false}),
            Some(json!({"type": "error", "id": "p1", "message": "m", "fatal": false})),
        ),
        "networkStatus" => (
            json!({"status": "CONNECTED"}),
            Some(json!({"type": "networkStatus", "status": "CONNECTED"})),
        ),
        "apiReachability" => (
            json!({"status": "UNKNOWN"}),
            Some(json!({"type": "apiReachability", "status": "UNKNOWN"})),
        ),
        "startupStep" => (
            json!({"step": "mount", "status": "completed"}),
            Some(json!({"type": "startupStep", "step": "mount", "status": "completed"})),
        ),
        other => panic!("no sample for guest event {other}"),
    }
}

/// One guest event: the frame decodes to its type and encodes back; it
/// flattens into the client's event, through the typed path and through
/// the raw one alike.
fn check_guest_event(name: &str) {
    let (params, client) = guest_event_sample(name);
    let frame = json!({"type": "event", "event": name, "params": params});
    let parsed = GuestFrame::parse(obj(frame.clone())).unwrap().unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), frame);
    let GuestFrame::Event { event, params } = parsed.clone() else {
        panic!("{name}: not an event")
    };
    let ev = GuestEvent::parse(&event, params.clone()).unwrap();
    assert_eq!(ev.name(), name);
    assert_eq!(serde_json::to_value(GuestFrame::event(&ev)).unwrap(), frame);

    let typed = ev
        .to_client_event()
        .map(|c| serde_json::to_value(c).unwrap());
    assert_eq!(typed, client, "{name}: typed flattening");
    let raw = flatten_event(&event, &params).map(Value::Object);
    assert_eq!(raw, client, "{name}: raw flattening");
    assert_eq!(parsed.to_client_frame().map(Value::Object), client);
    if let Some(client) = client {
        // What the helper sends is a valid client event.
        let ce = ClientEvent::from_object(obj(client.clone())).unwrap();
        assert_eq!(serde_json::to_value(ce).unwrap(), client);
    }
}

per_name! { check_guest_event:
    guest_event_ready => "ready",
    guest_event_stdout => "stdout",
    guest_event_stderr => "stderr",
    guest_event_exit => "exit",
    guest_event_error => "error",
    guest_event_network_status => "networkStatus",
    guest_event_api_reachability => "apiReachability",
    guest_event_startup_step => "startupStep",
}

// --- Enumeration: every name of the protocol has a type and a sample. ----

fn same_set(crate_list: &[&str], spec: &[&str], what: &str) {
    let mut a = crate_list.to_vec();
    let mut b = spec.to_vec();
    a.sort();
    b.sort();
    assert_eq!(a, b, "{what}: the crate's list differs from the spec's");
}

#[test]
fn every_spec_host_method_has_a_type_and_a_sample() {
    same_set(host::HOST_METHODS, SPEC_HOST_METHODS, "host methods");
    for m in SPEC_HOST_METHODS {
        let s = host_sample(m);
        let parsed = HostMethod::parse(m, s.params).unwrap();
        assert!(
            !matches!(parsed, HostMethod::Unknown(_)),
            "host method {m} has no type"
        );
        check_host_method(m);
    }
    assert_eq!(host_samples().len(), SPEC_HOST_METHODS.len());
}

#[test]
fn every_spec_client_event_has_a_type_and_a_sample() {
    same_set(host::CLIENT_EVENTS, SPEC_CLIENT_EVENTS, "client events");
    for e in SPEC_CLIENT_EVENTS {
        check_client_event(e);
    }
}

#[test]
fn every_spec_guest_method_has_a_type_and_a_sample() {
    same_set(guest::GUEST_METHODS, SPEC_GUEST_METHODS, "guest methods");
    for m in SPEC_GUEST_METHODS {
        check_guest_method(m);
    }
}

#[test]
fn every_spec_guest_notification_has_a_type_and_a_sample() {
    same_set(
        guest::GUEST_NOTIFICATIONS,
        SPEC_GUEST_NOTIFICATIONS,
        "guest notifications",
    );
    for n in SPEC_GUEST_NOTIFICATIONS {
        check_guest_notification(n);
    }
}

#[test]
fn every_spec_guest_event_has_a_type_and_a_sample() {
    same_set(guest::GUEST_EVENTS, SPEC_GUEST_EVENTS, "guest events");
    for e in SPEC_GUEST_EVENTS {
        check_guest_event(e);
    }
}

// --- Envelopes and errors. ------------------------------------------------

#[test]
fn configure_short_pipe_form() {
    let p = json!({"userDataName": "d", "userDataRoot": "/r", "sessionOnly": true});
    let m = HostMethod::parse("configure", p.clone()).unwrap();
    assert_eq!(m.to_wire().1, p);
}

/// coworkvm needs nothing of `configure` but the sizing: a client that
/// leaves out the profile fields (or sends none at all) is answered, not
/// refused.
#[test]
fn configure_without_the_profile_fields_is_accepted() {
    for p in [
        json!({"memoryMB": 2048, "cpuCount": 2}),
        json!({}),
        json!(null),
    ] {
        match HostMethod::parse("configure", p.clone()) {
            Ok(HostMethod::Configure(c)) => {
                assert_eq!((c.user_data_name, c.user_data_root), (None, None), "{p}")
            }
            other => panic!("{p}: {other:?}"),
        }
    }
}

#[test]
fn unknown_fields_are_ignored_and_missing_ones_named() {
    let m = HostMethod::parse("kill", json!({"id": "p", "signal": 9, "future": 1})).unwrap();
    assert!(matches!(m, HostMethod::Kill(_)));
    let e = HostMethod::parse("writeStdin", json!({"data": "x"})).unwrap_err();
    assert!(
        matches!(&e, RequestError::BadParams { field: Some(f), .. } if f == "id"),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "bad params for writeStdin: missing field `id`"
    );
    let e = HostMethod::parse("readFile", json!({"processName": 3, "filePath": "x"})).unwrap_err();
    assert!(
        matches!(&e, RequestError::BadParams { field: Some(f), .. } if f == "processName"),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("readFile") && text.contains("`processName`"),
        "{text}"
    );
}

/// Tolerance, as the client's peers show it (the Go peer decodes into
/// plain structs: missing or `null` is the zero value): every field a
/// method can do without may be missing or `null`, and decodes to its
/// default. Each of these was a "bad params" error before.
#[test]
fn optional_fields_may_be_missing_or_null() {
    use socket_proto::host::{
        AddApprovedOauthTokenParams, CreateVmParams, DeleteSessionDirsParams, MountPathParams,
        ProcessIdParams, ReadFileParams, SetDebugLoggingParams, StartVmParams, WriteStdinParams,
    };
    let parse = |method: &str, p: Value| {
        HostMethod::parse(method, p.clone()).unwrap_or_else(|e| panic!("{method} {p}: {e}"))
    };
    for p in [json!({}), json!({"bundlePath": null, "diskSizeGB": null})] {
        assert_eq!(
            parse("createVM", p),
            HostMethod::CreateVm(CreateVmParams::default())
        );
    }
    for p in [
        json!({}),
        json!({"bundlePath": null, "memoryGB": null, "cpuCount": null, "apiProbeURL": null}),
    ] {
        assert_eq!(
            parse("startVM", p),
            HostMethod::StartVm(StartVmParams::default())
        );
    }
    for p in [json!({}), json!({"enabled": null})] {
        assert_eq!(
            parse("setDebugLogging", p),
            HostMethod::SetDebugLogging(SetDebugLoggingParams { enabled: false })
        );
    }
    for p in [
        json!({}),
        json!({"processId": null, "subpath": null, "mountName": null, "mode": null}),
    ] {
        assert_eq!(
            parse("mountPath", p),
            HostMethod::MountPath(MountPathParams::default())
        );
    }
    for p in [
        json!({"filePath": "/sessions/s/a"}),
        json!({"processName": null, "filePath": "/sessions/s/a"}),
    ] {
        assert_eq!(
            parse("readFile", p),
            HostMethod::ReadFile(ReadFileParams {
                process_name: String::new(),
                file_path: "/sessions/s/a".into(),
            })
        );
    }
    for p in [json!({"id": "p"}), json!({"id": "p", "data": null})] {
        assert_eq!(
            parse("writeStdin", p),
            HostMethod::WriteStdin(WriteStdinParams {
                id: "p".into(),
                data: String::new(),
            })
        );
    }
    for p in [json!({}), json!({"id": null})] {
        assert_eq!(
            parse("isProcessRunning", p),
            HostMethod::IsProcessRunning(ProcessIdParams::default())
        );
    }
    for p in [json!({}), json!({"names": null})] {
        assert_eq!(
            parse("deleteSessionDirs", p),
            HostMethod::DeleteSessionDirs(DeleteSessionDirsParams::default())
        );
    }
    for p in [json!({}), json!({"token": null})] {
        assert_eq!(
            parse("addApprovedOauthToken", p),
            HostMethod::AddApprovedOauthToken(AddApprovedOauthTokenParams::default())
        );
    }
    assert!(matches!(
        parse("kill", json!({"id": "p", "signal": null})),
        HostMethod::Kill(k) if k.signal.is_none()
    ));
    assert!(matches!(
        parse(
            "subscribeEvents",
            json!({"userDataName": null, "userDataRoot": null})
        ),
        HostMethod::SubscribeEvents(_)
    ));
    assert!(matches!(
        parse("getSessionsDiskInfo", json!({"lowWaterBytes": null})),
        HostMethod::GetSessionsDiskInfo(p) if p.low_water_bytes.is_none()
    ));
    assert!(matches!(
        parse("pruneSessionCaches", json!({"onlyIfFreeBytesBelow": null,
            "includeSessionTmp": null, "sessionTmpOlderThanSeconds": null})),
        HostMethod::PruneSessionCaches(p) if p == Default::default()
    ));
}

/// A spawn's optional fields: `null` is the default, and a `null` env value
/// drops its key (an empty string is kept here; the helper strips it
/// before forwarding).
#[test]
fn spawn_tolerates_null_optional_fields_and_null_env_values() {
    let p = json!({"id": "p", "name": "s", "command": "/usr/local/bin/claude",
        "args": null, "isResume": null, "cwd": null,
        "env": {"CLAUDE_CONFIG_DIR": "/sessions/s/mnt/.claude", "GONE": null, "ANTHROPIC_API_KEY": ""},
        "additionalMounts": null, "allowedDomains": null, "oneShot": null,
        "mountSkeletonHome": null, "oauthToken": null, "sharedCwdPath": "/x"});
    let HostMethod::Spawn(s) = HostMethod::parse("spawn", p).unwrap() else {
        panic!("not a spawn")
    };
    assert!(s.args.is_empty());
    assert!(!s.is_resume);
    assert_eq!(
        (&s.cwd, &s.additional_mounts, &s.allowed_domains),
        (&None, &None, &None)
    );
    assert_eq!((s.one_shot, s.mount_skeleton_home), (None, None));
    assert!(s.oauth_token.is_none());
    let env = s.env.unwrap();
    assert_eq!(
        env.expose().keys().map(String::as_str).collect::<Vec<_>>(),
        ["ANTHROPIC_API_KEY", "CLAUDE_CONFIG_DIR"]
    );
    // The guest side decodes the same params the same way.
    let g = GuestRequest::parse(
        "spawn",
        json!({"id": "p", "name": "s", "command": "c", "args": null, "env": {"A": null}}),
    )
    .unwrap();
    assert!(matches!(g, GuestRequest::Spawn(s) if s.args.is_empty()
        && s.env.as_ref().is_some_and(|e| e.expose().is_empty())));
}

/// Negative numbers where the peers' `int`s take them count as the field
/// being absent; the bounds stay: too large for the field, or not an
/// integer, is still an error naming the field.
#[test]
fn negative_sizes_count_as_absent_and_bounds_stay() {
    let HostMethod::Configure(c) =
        HostMethod::parse("configure", json!({"memoryMB": -1, "cpuCount": -4})).unwrap()
    else {
        panic!()
    };
    assert_eq!((c.memory_mb, c.cpu_count), (None, None));
    let HostMethod::StartVm(s) = HostMethod::parse(
        "startVM",
        json!({"bundlePath": "/b", "memoryGB": -2, "cpuCount": 2}),
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!((s.memory_gb, s.cpu_count), (None, Some(2)));
    let HostMethod::CreateVm(c) =
        HostMethod::parse("createVM", json!({"bundlePath": "/b", "diskSizeGB": -10})).unwrap()
    else {
        panic!()
    };
    assert_eq!(c.disk_size_gb, None);
    let HostMethod::PruneSessionCaches(p) = HostMethod::parse(
        "pruneSessionCaches",
        json!({"onlyIfFreeBytesBelow": -1, "sessionTmpOlderThanSeconds": -1, "includeSessionTmp": true}),
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(
        (p.only_if_free_bytes_below, p.session_tmp_older_than_seconds),
        (None, None)
    );
    // The client's menu cleanup sends (0, true, 0): 0 is "prune whatever
    // the free space", i.e. no threshold (the agent would read a 0
    // threshold as "never"); a positive one stays.
    for (sent, want) in [
        (json!(0), None),
        (json!(1_073_741_824u64), Some(1u64 << 30)),
    ] {
        let HostMethod::PruneSessionCaches(p) = HostMethod::parse(
            "pruneSessionCaches",
            json!({"onlyIfFreeBytesBelow": sent, "includeSessionTmp": true, "sessionTmpOlderThanSeconds": 0}),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(p.only_if_free_bytes_below, want, "{sent}");
        assert_eq!(p.session_tmp_older_than_seconds, Some(0));
    }
    let HostMethod::GetSessionsDiskInfo(g) =
        HostMethod::parse("getSessionsDiskInfo", json!({"lowWaterBytes": -1})).unwrap()
    else {
        panic!()
    };
    assert_eq!(g.low_water_bytes, None);
    for (method, p, field) in [
        ("configure", json!({"cpuCount": 1u64 << 40}), "cpuCount"),
        (
            "startVM",
            json!({"bundlePath": "/b", "cpuCount": 5_000_000_000u64}),
            "cpuCount",
        ),
        ("configure", json!({"memoryMB": 1.5}), "memoryMB"),
        ("createVM", json!({"diskSizeGB": "10"}), "diskSizeGB"),
        ("deleteSessionDirs", json!({"names": "a"}), "names"),
        ("setDebugLogging", json!({"enabled": "yes"}), "enabled"),
    ] {
        let e = HostMethod::parse(method, p.clone()).unwrap_err();
        assert!(
            matches!(&e, RequestError::BadParams { field: Some(f), .. } if f == field),
            "{method} {p}: {e}"
        );
    }
}

/// What a method truly needs stays required, with an error naming it.
#[test]
fn what_a_method_needs_stays_required() {
    for (method, p, field) in [
        ("spawn", json!({"id": "p", "name": "s"}), "command"),
        ("spawn", json!({"name": "s", "command": "c"}), "id"),
        ("spawn", json!({"id": "p", "command": "c"}), "name"),
        ("kill", json!({"signal": "SIGTERM"}), "id"),
        ("writeStdin", json!({"data": "x"}), "id"),
        ("readFile", json!({"processName": "s"}), "filePath"),
        ("sendGuestResponse", json!({"resultJson": "{}"}), "id"),
        ("installSdk", json!({"version": "1"}), "sdkSubpath"),
        ("installSdk", json!({"sdkSubpath": "x"}), "version"),
    ] {
        let e = HostMethod::parse(method, p.clone()).unwrap_err();
        assert!(
            matches!(&e, RequestError::BadParams { field: Some(f), .. } if f == field),
            "{method} {p}: {e}"
        );
    }
    // A non-string env value is still refused, without quoting it.
    let e = HostMethod::parse(
        "spawn",
        json!({"id": "p", "name": "s", "command": "c", "env": {"K": 7}}),
    )
    .unwrap_err();
    assert!(
        matches!(&e, RequestError::BadParams { field: Some(f), .. } if f == "env"),
        "{e}"
    );
}

#[test]
fn bad_secret_values_are_not_quoted_in_errors() {
    for params in [
        json!({"id": "p", "name": "n", "command": "c", "env": "API_KEY=sk-9"}),
        json!({"id": "p", "name": "n", "command": "c", "oauthToken": ["sk-9"]}),
        json!({"id": "p", "name": "n", "command": "c", "env": {"API_KEY": ["sk-9"]}}),
    ] {
        let e = HostMethod::parse("spawn", params.clone()).unwrap_err();
        assert!(!e.to_string().contains("sk-9"), "{e}");
        let g = GuestRequest::parse("spawn", params).unwrap_err();
        assert!(!g.message().contains("sk-9"), "{g}");
        assert_eq!(g.code(), Some(guest::INVALID_PARAMS));
    }
    let e = HostMethod::parse("addApprovedOauthToken", json!({"token": 5})).unwrap_err();
    assert!(
        matches!(&e, RequestError::BadParams { field: Some(f), .. } if f == "token"),
        "{e}"
    );
}

#[test]
fn unknown_method_is_a_value() {
    let req = HostRequest::from_object(obj(json!({"method": "doTheThing", "id": 3}))).unwrap();
    assert_eq!(req.method, HostMethod::Unknown("doTheThing".into()));
    assert_eq!(
        serde_json::to_value(req.unknown_method()).unwrap(),
        json!({"success": false, "error": "Unknown method: doTheThing", "id": 3})
    );
    let env = RequestEnvelope::from_object(obj(json!({"method": "doTheThing", "id": 3}))).unwrap();
    let reply = Response::err(env.id.clone(), host::unknown_method_message("doTheThing"));
    assert_eq!(reply, req.unknown_method());
    // One-shot requests have no id, and so neither does the reply.
    assert_eq!(
        serde_json::to_value(Response::unknown_method(None, "x")).unwrap(),
        json!({"success": false, "error": "Unknown method: x"})
    );
}

#[test]
fn envelope_errors_keep_the_id() {
    let e = HostRequest::from_object(obj(json!({"params": {}, "id": 5}))).unwrap_err();
    assert_eq!(e.error, RequestError::MissingMethod);
    assert_eq!(
        serde_json::to_value(e.to_response()).unwrap(),
        json!({"success": false, "error": "request has no \"method\" string", "id": 5})
    );
    let e = HostRequest::from_object(obj(json!({"method": "x", "params": [1]}))).unwrap_err();
    assert_eq!(e.error, RequestError::ParamsNotObject);
    assert_eq!(e.id, None);
    let e = HostRequest::from_object(obj(json!({"method": "kill", "id": 6, "params": {}})))
        .unwrap_err();
    assert_eq!(e.id, Some(json!(6)));
    assert_eq!(
        e.to_response().error.unwrap(),
        "bad params for kill: missing field `id`"
    );
    // No params and null params are both `{}`; a null id is no id.
    let env = RequestEnvelope::from_object(obj(json!({"method": "stopVM", "id": null}))).unwrap();
    assert_eq!(env.params, json!({}));
    assert_eq!(env.id, None);
    let r = HostRequest::from_object(obj(
        json!({"method": "getSessionsDiskInfo", "params": null}),
    ))
    .unwrap();
    assert!(matches!(r.method, HostMethod::GetSessionsDiskInfo(_)));
}

#[test]
fn response_results_decode() {
    let r: Response = serde_json::from_value(
        json!({"success": true, "result": {"running": true, "extra": 1}, "id": 2}),
    )
    .unwrap();
    assert!(r.result_as::<RunningResult>().unwrap().running);
    let r: Response = serde_json::from_value(json!({"success": false, "error": "no"})).unwrap();
    assert_eq!(r.error.as_deref(), Some("no"));
    assert_eq!(r.id, None);
}

// --- Guest frames and conversions. ---------------------------------------

#[test]
fn frames_ids_and_conversions() {
    // Numeric ids are accepted.
    let f = GuestFrame::parse(obj(json!({"type": "response", "id": 12, "result": {}})))
        .unwrap()
        .unwrap();
    assert!(matches!(f, GuestFrame::Response { id: FrameId(ref s), .. } if s == "12"));
    // No type: ignored, not fatal. Unknown type: an error.
    assert_eq!(GuestFrame::parse(obj(json!({"x": 1}))).unwrap(), None);
    assert!(GuestFrame::parse(obj(json!({"type": "bogus"}))).is_err());
    assert!(GuestFrame::parse(obj(json!({"type": "request", "id": [1]}))).is_err());
    // Error responses: text or coded.
    for e in [json!("nope"), json!({"code": 1, "message": "m"})] {
        let v = json!({"type": "response", "id": "1", "error": e});
        let f = GuestFrame::parse(obj(v.clone())).unwrap().unwrap();
        assert_eq!(serde_json::to_value(&f).unwrap(), v);
    }
    // A guest request becomes the client's `request` event.
    let req = GuestFrame::request("g-9", "askUser", json!({"q": "?"}));
    let expected =
        json!({"type": "request", "id": "g-9", "method": "askUser", "params": {"q": "?"}});
    assert_eq!(
        serde_json::to_value(req.to_client_request().unwrap()).unwrap(),
        expected
    );
    assert_eq!(req.to_client_frame().map(Value::Object), Some(expected));
    // sendGuestResponse becomes a response frame.
    let p: SendGuestResponseParams =
        serde_json::from_value(json!({"id": "g-9", "resultJson": "{\"a\":1}"})).unwrap();
    assert_eq!(
        serde_json::to_value(GuestFrame::from(&p)).unwrap(),
        json!({"type": "response", "id": "g-9", "result": {"a": 1}})
    );
    let p: SendGuestResponseParams =
        serde_json::from_value(json!({"id": "g-9", "error": "denied"})).unwrap();
    assert_eq!(
        serde_json::to_value(GuestFrame::from(&p)).unwrap(),
        json!({"type": "response", "id": "g-9", "error": "denied"})
    );
    let p: SendGuestResponseParams = serde_json::from_value(
        json!({"id": "g-9", "error": {"code": 4, "message": "no"}, "resultJson": "1"}),
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(GuestFrame::from(&p)).unwrap(),
        json!({"type": "response", "id": "g-9", "error": {"code": 4, "message": "no"}})
    );
    // writeStdin becomes the stdin notification.
    let m = HostMethod::parse("writeStdin", json!({"id": "p1", "data": "hi"})).unwrap();
    let HostMethod::WriteStdin(w) = m else {
        panic!()
    };
    assert_eq!(
        serde_json::to_value(GuestFrame::notification(&GuestNotification::from(&w))).unwrap(),
        json!({"type": "notification", "method": "stdin", "params": {"id": "p1", "data": "hi"}})
    );
    // Methods the helper answers itself have no guest request.
    assert_eq!(HostMethod::IsRunning.to_guest_request(), None);
}

#[test]
fn unknown_guest_methods_and_events() {
    assert!(matches!(
        GuestRequest::parse("nope", json!({})).unwrap(),
        GuestRequest::Unknown(_)
    ));
    assert_eq!(
        serde_json::to_value(GuestError::unknown_method("nope")).unwrap(),
        json!({"code": -32601, "message": "unknown method: nope"})
    );
    assert_eq!(
        serde_json::to_value(GuestFrame::unknown_method("3".into(), "nope")).unwrap(),
        json!({"type": "response", "id": "3",
            "error": {"code": -32601, "message": "unknown method: nope"}})
    );
    // An event this crate does not know still flattens for the client.
    assert!(GuestEvent::parse("newThing", json!({"a": 1})).is_err());
    assert_eq!(
        flatten_event("newThing", &json!({"a": 1})).map(Value::Object),
        Some(json!({"type": "newThing", "a": 1}))
    );
    // A signalled exit: no exitCode.
    assert_eq!(
        flatten_event(
            "exit",
            &json!({"id": "p", "code": null, "signal": "SIGKILL", "oomKillCount": 1})
        )
        .map(Value::Object),
        Some(json!({"type": "exit", "id": "p", "signal": "SIGKILL", "oomKillCount": 1}))
    );
    // "ready" may come without params.
    assert_eq!(
        GuestEvent::parse("ready", Value::Null).unwrap(),
        GuestEvent::Ready
    );
}

// --- Redaction. -----------------------------------------------------------

#[test]
fn debug_output_never_shows_secrets() {
    let spawn_params = host_sample("spawn").params;
    let envelope = json!({"method": "spawn", "id": 1, "params": spawn_params});
    let secrets = ["API_KEY", "\"tok\""];
    let check = |what: &str, dbg: String| {
        for s in secrets {
            assert!(!dbg.contains(s), "{what} leaks {s}: {dbg}");
        }
        assert!(dbg.contains("claude"), "{what} prints the rest: {dbg}");
    };
    let req = HostRequest::from_object(obj(envelope.clone())).unwrap();
    check("HostRequest", format!("{req:?}"));
    check("HostMethod", format!("{:?}", req.method));
    check(
        "RequestEnvelope",
        format!(
            "{:?}",
            RequestEnvelope::from_object(obj(envelope.clone())).unwrap()
        ),
    );
    let frame = GuestFrame::from_request("1", &req.method.to_guest_request().unwrap());
    check("GuestFrame", format!("{frame:?}"));
    let GuestFrame::Request { params, .. } = &frame else {
        panic!()
    };
    check(
        "GuestRequest",
        format!(
            "{:?}",
            GuestRequest::parse("spawn", params.clone()).unwrap()
        ),
    );
    check(
        "ClientEvent",
        format!("{:?}", frame.to_client_request().unwrap()),
    );
    check(
        "Response",
        format!("{:?}", Response::ok(None, Some(envelope))),
    );

    let tok = HostMethod::parse("addApprovedOauthToken", json!({"token": "secret"})).unwrap();
    assert!(!format!("{tok:?}").contains("secret"));
    let tok = GuestRequest::parse("addApprovedOauthToken", json!({"token": "secret"})).unwrap();
    assert!(!format!("{tok:?}").contains("secret"));
    // The secrets are still sent, of course.
    let (_, wire) = req.method.to_wire();
    assert_eq!(wire["env"]["API_KEY"], "k");
    assert_eq!(wire["oauthToken"], "tok");
}
