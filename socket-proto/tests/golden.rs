//! Golden samples, written from the protocol tables: each decodes to its
//! typed form and encodes back to the same JSON. The enumeration tests fail
//! if a method or event of the protocol has no type or no sample.

use serde_json::{json, Value};
use socket_proto::guest::{
    FrameId, GuestError, GuestEvent, GuestFrame, GuestNotification, GuestRequest, GUEST_EVENTS,
    GUEST_METHODS, GUEST_NOTIFICATIONS,
};
use socket_proto::host::{
    ClientEvent, HostMethod, RequestEnvelope, RequestError, Response, SendGuestResponseParams,
    CLIENT_EVENTS, HOST_METHODS,
};

fn host_samples() -> Vec<(&'static str, Value)> {
    vec![
        (
            "configure",
            json!({"userDataName": "default", "userDataRoot": "/home/u/.config/app",
            "networkDrives": [], "memoryMB": 4096, "cpuCount": 4, "smolBinPath": "/opt/smol",
            "logDir": "/tmp/logs", "virtiofsdPath": "/usr/libexec/virtiofsd",
            "firmwareCodePath": "/usr/share/OVMF/OVMF_CODE.fd",
            "firmwareVarsTemplatePath": "/usr/share/OVMF/OVMF_VARS.fd"}),
        ),
        (
            "subscribeEvents",
            json!({"userDataName": "default", "userDataRoot": "/r"}),
        ),
        (
            "createVM",
            json!({"bundlePath": "/b/claudevm.bundle", "diskSizeGB": 10}),
        ),
        (
            "startVM",
            json!({"bundlePath": "/b/claudevm.bundle", "memoryGB": 4, "cpuCount": 2,
            "apiProbeURL": "https://api.example.com/probe"}),
        ),
        ("stopVM", json!({})),
        ("isRunning", json!({})),
        ("isGuestConnected", json!({})),
        (
            "spawn",
            json!({"id": "p1", "name": "sess-a", "command": "claude", "args": ["-p", "hi"],
            "isResume": false, "cwd": "/sessions/sess-a", "env": {"API_KEY": "k"},
            "additionalMounts": [{"mountName": "proj", "hostPath": "/home/u/proj", "mode": "rw"}],
            "allowedDomains": ["example.com"], "oneShot": true, "mountSkeletonHome": false,
            "oauthToken": "tok"}),
        ),
        ("kill", json!({"id": "p1", "signal": "SIGTERM"})),
        ("writeStdin", json!({"id": "p1", "data": "hello\n"})),
        ("isProcessRunning", json!({"id": "p1"})),
        (
            "sendGuestResponse",
            json!({"id": "r-1", "resultJson": "{\"ok\":true}"}),
        ),
        ("setDebugLogging", json!({"enabled": true})),
        (
            "mountPath",
            json!({"processId": "p1", "subpath": "work", "mountName": "w", "mode": "ro"}),
        ),
        (
            "readFile",
            json!({"processName": "sess-a", "filePath": "/sessions/sess-a/out.txt"}),
        ),
        ("getSessionsDiskInfo", json!({"lowWaterBytes": 1_000_000})),
        ("deleteSessionDirs", json!({"names": ["a", "b"]})),
        (
            "pruneSessionCaches",
            json!({"onlyIfFreeBytesBelow": 5_000_000_000u64,
            "includeSessionTmp": true, "sessionTmpOlderThanSeconds": 3600}),
        ),
        (
            "installSdk",
            json!({"sdkSubpath": ".local/share/sdk", "version": "1.2.3"}),
        ),
        ("addApprovedOauthToken", json!({"token": "secret"})),
        ("getNetworkDrives", json!({})),
    ]
}

#[test]
fn every_host_method_has_a_type_and_round_trips() {
    let samples = host_samples();
    for name in HOST_METHODS {
        let (_, params) = samples
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no golden sample for host method {name}"));
        let m = HostMethod::parse(name, params.clone()).unwrap();
        assert!(!matches!(m, HostMethod::Unknown(_)), "{name} has no type");
        let (wire_name, wire_params) = m.to_wire();
        assert_eq!(&wire_name, name);
        assert_eq!(&wire_params, params, "{name} round trip");
    }
    assert_eq!(samples.len(), HOST_METHODS.len());
}

#[test]
fn configure_short_pipe_form() {
    let p = json!({"userDataName": "d", "userDataRoot": "/r", "sessionOnly": true});
    let m = HostMethod::parse("configure", p.clone()).unwrap();
    assert_eq!(m.to_wire().1, p);
}

#[test]
fn unknown_fields_are_ignored_and_missing_ones_named() {
    let m = HostMethod::parse("kill", json!({"id": "p", "signal": 9, "future": 1})).unwrap();
    assert!(matches!(m, HostMethod::Kill(_)));
    let e = HostMethod::parse("writeStdin", json!({"id": "p"})).unwrap_err();
    assert!(
        matches!(&e, RequestError::BadParams { detail, .. } if detail.contains("`data`")),
        "{e}"
    );
    let e = HostMethod::parse("readFile", json!({"processName": 3, "filePath": "x"})).unwrap_err();
    assert!(e.to_string().contains("readFile"), "{e}");
}

#[test]
fn unknown_method_is_a_value() {
    let env = RequestEnvelope::from_object(
        serde_json::from_value(json!({"method": "doTheThing", "id": 3})).unwrap(),
    )
    .unwrap();
    assert_eq!(
        env.method().unwrap(),
        HostMethod::Unknown("doTheThing".into())
    );
    let reply = Response::err(
        env.id.clone(),
        socket_proto::host::unknown_method_message("doTheThing"),
    );
    assert_eq!(
        serde_json::to_value(&reply).unwrap(),
        json!({"success": false, "error": "Unknown method: doTheThing", "id": 3})
    );
    // One-shot requests have no id, and so neither does the reply.
    let reply = Response::ok(None, None);
    assert_eq!(
        serde_json::to_value(&reply).unwrap(),
        json!({"success": true})
    );
}

#[test]
fn envelope_errors() {
    let obj = |v: Value| serde_json::from_value(v).unwrap();
    assert_eq!(
        RequestEnvelope::from_object(obj(json!({"params": {}}))).unwrap_err(),
        RequestError::MissingMethod
    );
    assert_eq!(
        RequestEnvelope::from_object(obj(json!({"method": "x", "params": [1]}))).unwrap_err(),
        RequestError::ParamsNotObject
    );
    let e = RequestEnvelope::from_object(obj(json!({"method": "stopVM"}))).unwrap();
    assert_eq!(e.params, json!({}));
}

fn client_event_samples() -> Vec<Value> {
    vec![
        json!({"type": "stdout", "id": "p1", "data": "out"}),
        json!({"type": "stderr", "id": "p1", "data": "err"}),
        json!({"type": "exit", "id": "p1", "exitCode": 3, "signal": "SIGKILL", "oomKillCount": 0}),
        json!({"type": "error", "id": "p1", "message": "boom", "fatal": true}),
        json!({"type": "networkStatus", "status": "CONNECTED"}),
        json!({"type": "apiReachability", "status": "REACHABLE"}),
        json!({"type": "startupStep", "step": "bundle", "status": "running"}),
        json!({"type": "request", "id": "g-1", "method": "askUser", "params": {"q": 1}}),
    ]
}

#[test]
fn every_client_event_round_trips() {
    let samples = client_event_samples();
    for name in CLIENT_EVENTS {
        let s = samples
            .iter()
            .find(|s| s["type"] == *name)
            .unwrap_or_else(|| panic!("no sample for client event {name}"));
        let e: ClientEvent = serde_json::from_value(s.clone()).unwrap();
        assert_eq!(&serde_json::to_value(&e).unwrap(), s, "{name}");
    }
}

fn guest_request_samples() -> Vec<(&'static str, Value)> {
    let mut v: Vec<(&'static str, Value)> = host_samples()
        .into_iter()
        .filter(|(n, _)| GUEST_METHODS.contains(n))
        .collect();
    v.push(("agent.info", json!({})));
    v.push(("shutdown", json!({})));
    v
}

#[test]
fn every_guest_method_has_a_type() {
    let samples = guest_request_samples();
    for name in GUEST_METHODS {
        let (_, params) = samples
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no sample for guest method {name}"));
        let frame = json!({"type": "request", "id": "7", "method": name, "params": params});
        let parsed = GuestFrame::parse(serde_json::from_value(frame.clone()).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            frame,
            "{name} frame round trip"
        );
        let GuestFrame::Request { method, params, .. } = parsed else {
            panic!()
        };
        let r = GuestRequest::parse(&method, params).unwrap();
        assert!(!matches!(r, GuestRequest::Unknown(_)), "{name} has no type");
    }
    assert!(matches!(
        GuestRequest::parse("nope", json!({})).unwrap(),
        GuestRequest::Unknown(_)
    ));
    let e = GuestError::unknown_method("nope");
    assert_eq!(
        serde_json::to_value(&e).unwrap(),
        json!({"code": -32601, "message": "unknown method: nope"})
    );
}

#[test]
fn every_guest_notification_has_a_type() {
    let samples = [
        ("stdin", json!({"id": "p1", "data": "abc"})),
        (
            "hostProxyConfig",
            json!({"httpProxy": "http://h:1", "httpsProxy": "http://h:1",
            "noProxy": "localhost", "apiProbeURL": "https://a/p"}),
        ),
        (
            "staticIPAssignment",
            json!({"ip": "10.0.2.15", "prefixLength": 24,
            "gateway": "10.0.2.2", "dns": ["10.0.2.3"]}),
        ),
    ];
    for name in GUEST_NOTIFICATIONS {
        let (_, p) = samples.iter().find(|(n, _)| n == name).unwrap();
        let n = GuestNotification::parse(name, p.clone()).unwrap();
        assert!(!matches!(n, GuestNotification::Unknown(_)), "{name}");
    }
}

fn guest_event_samples() -> Vec<(&'static str, Value)> {
    vec![
        ("ready", json!({})),
        ("stdout", json!({"id": "p1", "data": "x"})),
        ("stderr", json!({"id": "p1", "data": "y"})),
        (
            "exit",
            json!({"id": "p1", "code": 3, "signal": null, "oomKillCount": 0}),
        ),
        ("error", json!({"id": "p1", "message": "m", "fatal": false})),
        ("networkStatus", json!({"status": "CONNECTED"})),
        ("apiReachability", json!({"status": "UNKNOWN"})),
        (
            "startupStep",
            json!({"step": "mount", "status": "completed"}),
        ),
    ]
}

#[test]
fn every_guest_event_round_trips_and_flattens() {
    let samples = guest_event_samples();
    for name in GUEST_EVENTS {
        let (_, params) = samples
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no sample for guest event {name}"));
        let ev = GuestEvent::parse(name, params.clone()).unwrap();
        let (wire_name, wire_params) = ev.to_wire();
        assert_eq!(wire_name, *name);
        assert_eq!(&wire_params, params, "{name}");
        match ev.to_client_event() {
            None => assert_eq!(*name, "ready"),
            Some(ce) => {
                let flat = serde_json::to_value(&ce).unwrap();
                assert_eq!(flat["type"], *name);
            }
        }
    }
    // The exit code is renamed for the client.
    let exit = GuestEvent::parse(
        "exit",
        json!({"id": "p", "code": 0, "signal": null, "oomKillCount": 0}),
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(exit.to_client_event().unwrap()).unwrap(),
        json!({"type": "exit", "id": "p", "exitCode": 0, "oomKillCount": 0})
    );
    // "ready" may come without params.
    assert_eq!(
        GuestEvent::parse("ready", Value::Null).unwrap(),
        GuestEvent::Ready
    );
}

#[test]
fn frames_ids_and_conversions() {
    // Numeric ids are accepted.
    let f = GuestFrame::parse(
        serde_json::from_value(json!({"type": "response", "id": 12, "result": {}})).unwrap(),
    )
    .unwrap()
    .unwrap();
    assert!(matches!(f, GuestFrame::Response { id: FrameId(ref s), .. } if s == "12"));
    // No type: ignored, not fatal. Unknown type: an error.
    assert_eq!(
        GuestFrame::parse(serde_json::from_value(json!({"x": 1})).unwrap()).unwrap(),
        None
    );
    assert!(GuestFrame::parse(serde_json::from_value(json!({"type": "bogus"})).unwrap()).is_err());
    // Error responses: text or coded.
    for e in [json!("nope"), json!({"code": 1, "message": "m"})] {
        let v = json!({"type": "response", "id": "1", "error": e});
        let f = GuestFrame::parse(serde_json::from_value(v.clone()).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(serde_json::to_value(&f).unwrap(), v);
    }
    // A guest request becomes the client's `request` event.
    let req = GuestFrame::request("g-9", "askUser", json!({"q": "?"}));
    assert_eq!(
        serde_json::to_value(req.to_client_request().unwrap()).unwrap(),
        json!({"type": "request", "id": "g-9", "method": "askUser", "params": {"q": "?"}})
    );
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
}

#[test]
fn debug_output_never_shows_secrets() {
    let spawn = HostMethod::parse("spawn", host_samples()[7].1.clone()).unwrap();
    let dbg = format!("{spawn:?}");
    assert!(
        !dbg.contains("API_KEY") && !dbg.contains("\"tok\""),
        "{dbg}"
    );
    let tok = HostMethod::parse("addApprovedOauthToken", json!({"token": "secret"})).unwrap();
    assert!(!format!("{tok:?}").contains("secret"));
}
