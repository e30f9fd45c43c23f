//! Drives `coworkvm serve` over its Unix socket exactly as the desktop
//! client does (see docs/protocol.md): `configure` on a persistent pipe, a
//! clean-up `stopVM`, `subscribeEvents`, `startVM`, polling
//! `isGuestConnected`, `installSdk`, `addApprovedOauthToken`, spawns with
//! their events, `writeStdin` after the first output, `kill`, `readFile`,
//! the session-disk methods, `stopVM`; then a VMM killed under load and a
//! restart after a vendor rootfs.img.zst is dropped into the bundle. Each check prints `@@CLIENT pass WHAT` or `@@CLIENT fail WHAT:
//! DETAIL`; numbers print as `@@CLIENT NAME VALUE`. Exit status 1 when a
//! check failed.
//!
//! usage: client-probe SOCKET BUNDLE_DIR
//! (HOME must hold the fake SDK that the case script made.)
//!        client-probe --escape SOCKET BUNDLE_DIR
//! a victim and an attacker session in one VM: the adversarial checks of
//! tests/tests/rig/escape.rs.
//!        client-probe --shares SOCKET BUNDLE_DIR HOST_DIR
//! shared folders: the standard mounts, mountPath, and the escape attempts
//! against the share (tests/tests/rig/shares.rs).
//!        client-probe --egress SOCKET BUNDLE_DIR EGRESS_DIR
//! sessions' network through the egress proxy, the OAuth token, and the
//! reachability events (tests/tests/rig/egress.rs).
//!        client-probe --cowork SOCKET BUNDLE_DIR HOST_DIR
//! a Cowork session end to end with the real runtime and a fake Messages
//! API (tests/tests/rig/cowork.rs).
//!        client-probe --cowork-bench N SOCKET BUNDLE_DIR HOST_DIR COPY_SOCKET
//! N rounds of a fresh boot, `installSdk` through the share, the runtime's
//! `--version` and a `claude -p` round trip, then N installs by copy
//! against a helper without virtiofsd; prints `@@COWORK-BENCH {json}`
//! (`coworkvm-rig bench --cowork-only`).
//!        client-probe --egress-bench MIB N SOCKET BUNDLE_DIR EGRESS_DIR
//! a download through a session's proxies vs directly, and N CONNECT
//! set-ups; prints `@@EGRESS-BENCH {json}` (`coworkvm-rig bench`).
//!        client-probe --start SOCKET BUNDLE_DIR
//! only starts the VM and waits until the guest is connected.
//!        client-probe --bench N SOCKET BUNDLE_DIR
//! N times: startVM, poll isGuestConnected (every 50 ms), spawn `echo`,
//! first stdout event, stopVM; prints `@@HELPER-BENCH {json}`.
//!        client-probe --rtt N SOCKET
//! N `isRunning` round trips on one pipe; prints `@@HELPER-RTT {json}`.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;

#[path = "client-probe/cowork.rs"]
mod cowork;
#[path = "client-probe/egress.rs"]
mod egress;
#[path = "client-probe/shares.rs"]
mod shares;
use serde_json::{json, Value};
use socket_proto::frame::{read_frame, write_frame};

const SDK_SUBPATH: &str = ".config/Claude/claude-code-vm";
const SDK_VERSION: &str = "9.9.9";
const TOKEN: &str = "oauth-secret-e2e-7f3a";

fn to_obj(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("frames are objects"),
    }
}

/// A persistent pipe: numbered requests, replies matched by id.
struct Pipe {
    w: UnixStream,
    r: BufReader<UnixStream>,
    next: u64,
}

impl Pipe {
    fn open(socket: &str) -> Pipe {
        let s = UnixStream::connect(socket).expect("connect to the helper");
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        Pipe {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            next: 0,
        }
    }

    /// The reply frame (`success`, `result` or `error`).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let frame = to_obj(json!({"method": method, "id": id, "params": params}));
        write_frame(&mut self.w, &frame).expect("write");
        loop {
            match read_frame(&mut self.r) {
                Ok(Some(obj)) => {
                    let v = Value::Object(obj);
                    if v["id"] == json!(id) {
                        return v;
                    }
                }
                other => return json!({"success": false, "error": format!("pipe: {other:?}")}),
            }
        }
    }
}

/// The event stream, collected by a thread.
#[derive(Default)]
struct Events {
    seen: Mutex<Vec<(Instant, Value)>>,
    cv: Condvar,
}

impl Events {
    fn subscribe(socket: &str) -> (Arc<Events>, Value) {
        let mut s = UnixStream::connect(socket).expect("connect");
        let frame = to_obj(json!({"method": "subscribeEvents",
            "params": {"userDataName": "e2e", "userDataRoot": "/tmp/e2e"}}));
        write_frame(&mut s, &frame).expect("write");
        let mut r = BufReader::new(s);
        let ack = read_frame(&mut r).ok().flatten().map(Value::Object);
        let ev = Arc::new(Events::default());
        let e = ev.clone();
        std::thread::spawn(move || {
            while let Ok(Some(obj)) = read_frame(&mut r) {
                e.seen
                    .lock()
                    .unwrap()
                    .push((Instant::now(), Value::Object(obj)));
                e.cv.notify_all();
            }
        });
        (ev, ack.unwrap_or(Value::Null))
    }

    /// Waits for the first event after index `from` that `pred` accepts.
    fn wait(&self, from: usize, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = self.seen.lock().unwrap();
        loop {
            if let Some((_, v)) = seen.iter().skip(from).find(|(_, v)| pred(v)) {
                return Some(v.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            seen = self.cv.wait_timeout(seen, deadline - now).unwrap().0;
        }
    }

    fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// All stdout data of process `id` so far.
    fn stdout(&self, id: &str) -> String {
        self.of_kind("stdout", id)
    }

    /// All data of process `id`'s `kind` (`stdout`, `stderr`) events so far.
    fn of_kind(&self, kind: &str, id: &str) -> String {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| v["type"] == kind && v["id"] == id)
            .map(|(_, v)| v["data"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    fn wait_stdout(&self, id: &str, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stdout(id).contains(needle) {
                return true;
            }
            let seen = self.seen.lock().unwrap();
            let _ = self.cv.wait_timeout(seen, Duration::from_millis(200));
        }
        false
    }

    fn exit_of(&self, id: &str, timeout: Duration) -> Option<Value> {
        self.wait(0, timeout, |v| v["type"] == "exit" && v["id"] == id)
    }
}

struct Probe {
    failed: bool,
}

impl Probe {
    fn check(&mut self, what: &str, ok: bool, detail: impl std::fmt::Display) {
        if ok {
            println!("@@CLIENT pass {what}");
        } else {
            println!("@@CLIENT fail {what}: {detail}");
            self.failed = true;
        }
    }
}

fn ok(v: &Value) -> bool {
    v["success"] == true
}

fn one_shot(socket: &str, method: &str) -> Value {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return Value::Null;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let frame = to_obj(json!({"method": method, "params": {}}));
    if write_frame(&mut s, &frame).is_err() {
        return Value::Null;
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut r = BufReader::new(s);
    read_frame(&mut r)
        .ok()
        .flatten()
        .map(Value::Object)
        .unwrap_or(Value::Null)
}

fn connected(socket: &str) -> bool {
    one_shot(socket, "isGuestConnected")["result"]["connected"] == true
}

fn running(socket: &str) -> bool {
    one_shot(socket, "isRunning")["result"]["running"] == true
}

/// Polls `isGuestConnected` as the client does, a few times a second.
fn poll_connected(socket: &str, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if connected(socket) {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    None
}

/// The VMM child of the helper: a `coworkvm boot` whose command line names
/// the bundle's rootfs, or else the only `coworkvm boot` there is (a VMM
/// handed its files as descriptors names no path).
fn vmm_pid(bundle: &str) -> Option<i32> {
    let mut any_boot = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let mut cmdline = String::new();
        if let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/cmdline")) {
            let _ = f.read_to_string(&mut cmdline);
        }
        let args: Vec<&str> = cmdline.split('\0').collect();
        if args.contains(&"boot") && args[0].ends_with("coworkvm") {
            if cmdline.contains(bundle) {
                return Some(pid);
            }
            any_boot.get_or_insert(pid);
        }
    }
    any_boot
}

fn spawn(pipe: &mut Pipe, id: &str, name: &str, command: &str, args: &[&str]) -> Value {
    pipe.call(
        "spawn",
        json!({"id": id, "name": name, "command": command, "args": args, "isResume": false,
               "env": {"E2E_SECRET": TOKEN}, "oauthToken": TOKEN}),
    )
}

fn bench(n: usize, socket: &str, bundle: &str) {
    let mut pipe = Pipe::open(socket);
    let (ev, _) = Events::subscribe(socket);
    let (mut connect, mut first) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t0 = Instant::now();
        let r = pipe.call("startVM", json!({"bundlePath": bundle, "memoryGB": 1}));
        assert!(ok(&r), "startVM: {r}");
        loop {
            if connected(socket) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "never connected");
            std::thread::sleep(Duration::from_millis(50));
        }
        connect.push(t0.elapsed().as_millis() as u64);
        let id = format!("b{i}");
        let t1 = Instant::now();
        let r = spawn(&mut pipe, &id, "bench", "echo", &["x"]);
        assert!(ok(&r), "spawn: {r}");
        assert!(
            ev.wait_stdout(&id, "x", Duration::from_secs(60)),
            "no stdout"
        );
        first.push(t1.elapsed().as_micros() as u64);
        let r = pipe.call("stopVM", json!({}));
        assert!(ok(&r), "stopVM: {r}");
    }
    println!(
        "@@HELPER-BENCH {}",
        json!({"connect_ms": connect, "first_stdout_us": first})
    );
}

fn rtt(n: usize, socket: &str) {
    let mut pipe = Pipe::open(socket);
    let mut us = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = pipe.call("isRunning", json!({}));
        us.push(t.elapsed().as_nanos() as u64 / 1000);
        assert!(ok(&r), "isRunning: {r}");
    }
    us.sort_unstable();
    println!(
        "@@HELPER-RTT {}",
        json!({"n": n, "median_us": us[n / 2], "p95_us": us[n * 95 / 100], "max_us": us[n - 1]})
    );
}

/// The client's opening for a 2-vCPU, 1 GiB VM: configure on a pipe, the
/// event stream, startVM, then isGuestConnected polled until true; each a
/// check.
fn open_and_start(
    p: &mut Probe,
    socket: &str,
    bundle: &str,
    timeout: Duration,
) -> (Pipe, Arc<Events>) {
    open_and_start_with(
        p,
        socket,
        json!({"bundlePath": bundle, "memoryGB": 1, "cpuCount": 2}),
        timeout,
    )
}

/// [`open_and_start`] with `start` as startVM's parameters.
fn open_and_start_with(
    p: &mut Probe,
    socket: &str,
    start: Value,
    timeout: Duration,
) -> (Pipe, Arc<Events>) {
    let mut pipe = Pipe::open(socket);
    let r = pipe.call(
        "configure",
        json!({"userDataName": "e2e", "userDataRoot": "/tmp/e2e"}),
    );
    p.check("configure", ok(&r), &r);
    let (ev, _) = Events::subscribe(socket);
    let r = pipe.call("startVM", start);
    p.check("startVM", ok(&r), &r);
    p.check(
        "isGuestConnected turns true",
        poll_connected(socket, timeout).is_some(),
        "timed out",
    );
    (pipe, ev)
}

/// `--escape`: one VM, a victim session and an attacker session, driven
/// as the client drives the helper. Every check is something a session
/// could do to another session, to the agent channel or to the guest.
fn escape(socket: &str, bundle: &str) {
    let mut p = Probe { failed: false };
    let long = Duration::from_secs(240);
    let short = Duration::from_secs(60);
    let (mut pipe, ev) = open_and_start(&mut p, socket, bundle, long);

    // The VMM runs confined.
    match vmm_pid(bundle) {
        Some(pid) => {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            p.check(
                "the VMM has no_new_privs",
                field("NoNewPrivs:") == "1",
                field("NoNewPrivs:"),
            );
            p.check(
                "the VMM runs under a seccomp filter",
                field("Seccomp:") == "2",
                field("Seccomp:"),
            );
            // Its root is the directory of its vsock sockets, not `/`.
            let root = std::fs::read_link(format!("/proc/{pid}/root"));
            p.check(
                "the VMM's root is its vsock directory",
                root.as_ref()
                    .is_ok_and(|r| r != std::path::Path::new("/") && r.is_dir()),
                format!("{root:?}"),
            );
        }
        None => p.check("found the VMM process", false, "no coworkvm boot child"),
    }

    // The victim's secret is in its own environment only.
    let victim_secret = "victim-secret-5b1e";
    let r = pipe.call(
        "spawn",
        json!({"id": "v1", "name": "victim", "command": "sh",
               "args": ["-c", "echo v:$VICTIM_SECRET; echo note > /sessions/victim/private.txt"],
               "env": {"VICTIM_SECRET": victim_secret}}),
    );
    p.check("spawn the victim", ok(&r), &r);
    let exit = ev.exit_of("v1", short);
    p.check(
        "the victim runs with its environment",
        exit.is_some_and(|e| e["exitCode"] == 0)
            && ev.stdout("v1").contains(&format!("v:{victim_secret}")),
        ev.stdout("v1"),
    );

    // A victim process that holds its secret while the attacker looks.
    let r = pipe.call(
        "spawn",
        json!({"id": "v-hold", "name": "victim", "command": "sh",
               "args": ["-c", "echo holding; exec sleep 300"],
               "env": {"VICTIM_SECRET": victim_secret}}),
    );
    p.check("spawn a victim that holds its secret", ok(&r), &r);
    ev.wait_stdout("v-hold", "holding", short);

    // The attacker reads every environment it can see, then tries to open
    // the agent's channel: AF_VSOCK (40) to
    // CID 2 port 51234, from an automatic and from a privileged port;
    // then io_uring, which could create sockets behind seccomp's back.
    let attack = r#"
for my $f (glob("/proc/[0-9]*/environ")) {
  open(my $e, "<", $f) or next; local $/; my $env = <$e>; print "environ $f: $env\n"; }
sub vs { my ($src) = @_;
  socket(my $s, 40, 1, 0) or return "socket:" . ($!+0);
  if ($src) { bind($s, pack("SSLLCx3", 40, 0, $src, 0xFFFFFFFF, 0)) or return "bind:" . ($!+0); }
  connect($s, pack("SSLLCx3", 40, 0, 51234, 2, 0)) or return "connect:" . ($!+0);
  return "connected"; }
print "vsock-any=", vs(0), "\n";
print "vsock-priv=", vs(1000), "\n";
socket(my $d, 40, 2, 0) or print "vsock-dgram=denied\n";
socket(my $p, 17, 3, 0) or print "packet=denied\n";
socket(my $i, 2, 1, 0) and print "inet=ok\n";
socket(my $u, 1, 1, 0) and print "unix=ok\n";
my $params = "\0" x 120;
my $r = syscall(425, 8, $params);
print "io_uring=", ($r < 0 ? "denied:" . ($!+0) : "open"), "\n";
"#;
    let r = pipe.call(
        "spawn",
        json!({"id": "a1", "name": "attacker", "command": "perl", "args": ["-e", attack]}),
    );
    p.check("spawn the attacker", ok(&r), &r);
    let exit = ev.exit_of("a1", short);
    let out = ev.stdout("a1");
    println!(
        "@@CLIENT attacker-output {}",
        out.replace(['\n', '\0'], " | ")
    );
    p.check("the attacker ran", exit.is_some(), format!("{exit:?}"));
    // EPERM is 1: seccomp's answer, not the kernel's lack of a device.
    p.check(
        "a session cannot create an AF_VSOCK socket",
        out.contains("vsock-any=socket:1") && out.contains("vsock-priv=socket:1"),
        &out,
    );
    p.check(
        "a session cannot create datagram vsock or packet sockets",
        out.contains("vsock-dgram=denied") && out.contains("packet=denied"),
        &out,
    );
    p.check(
        "a session keeps inet and unix sockets",
        out.contains("inet=ok") && out.contains("unix=ok"),
        &out,
    );
    p.check(
        "a session cannot set up io_uring",
        out.contains("io_uring=denied:1"),
        &out,
    );
    p.check(
        "the attacker read environments, none the victim's",
        out.contains("environ /proc/") && !out.contains(victim_secret),
        &out,
    );
    let r = pipe.call("kill", json!({"id": "v-hold", "signal": "SIGKILL"}));
    p.check("kill the holding victim", ok(&r), &r);

    // The attacker's view of the guest: its own user only.
    let r = pipe.call(
        "spawn",
        json!({"id": "a2", "name": "attacker", "command": "sh",
               "args": ["-c", "cat /etc/passwd; echo; ls /sessions; echo; cat /sessions/victim/private.txt 2>&1; echo end"]}),
    );
    p.check("spawn the attacker's look-around", ok(&r), &r);
    let _ = ev.exit_of("a2", short);
    let seen = ev.stdout("a2");
    let victim_user = victim_user_name(&mut pipe, &ev);
    println!("@@CLIENT victim-user {victim_user:?}");
    p.check(
        "the attacker's passwd does not name the victim's user",
        victim_user
            .as_deref()
            .is_some_and(|u| !seen.contains(u) && seen.contains("root:")),
        &seen,
    );
    p.check(
        "the attacker cannot read the victim's files",
        !seen.contains("note") && seen.contains("end"),
        &seen,
    );

    // readFile as a hostile session would set it up: each answers at
    // once with an error, and the agent goes on serving.
    let r = pipe.call(
        "spawn",
        json!({"id": "a3", "name": "attacker", "command": "sh",
               "args": ["-c", "cd /sessions/attacker && mkfifo fifo && ln -s /sessions/victim/private.txt steal && truncate -s 1G big && echo set"]}),
    );
    p.check("spawn the readFile traps", ok(&r), &r);
    let _ = ev.exit_of("a3", short);
    p.check(
        "the traps are set",
        ev.stdout("a3").contains("set"),
        ev.stdout("a3"),
    );
    for (what, path) in [
        ("a FIFO", "/sessions/attacker/fifo"),
        (
            "a symlink to another session's file",
            "/sessions/attacker/steal",
        ),
        (
            "the agent's users.json through ..",
            "/sessions/attacker/../.coworkvm/users.json",
        ),
        ("a 1 GiB sparse file", "/sessions/attacker/big"),
    ] {
        let t = Instant::now();
        let r = pipe.call(
            "readFile",
            json!({"processName": "attacker", "filePath": path}),
        );
        let took = t.elapsed();
        p.check(
            &format!("readFile of {what} is refused at once"),
            !ok(&r) && took < Duration::from_secs(20) && !r.to_string().contains("note"),
            format!("{r} in {took:?}"),
        );
    }

    // stdin that is never read: 300 x 64 KiB on a pipe of its own, while
    // another session's requests must keep their answers quick.
    let r = spawn(
        &mut pipe,
        "a4",
        "attacker",
        "sh",
        &["-c", "echo deaf; sleep 600"],
    );
    p.check("spawn a process that never reads stdin", ok(&r), &r);
    ev.wait_stdout("a4", "deaf", short);
    let r = spawn(
        &mut pipe,
        "v2",
        "victim",
        "sh",
        &["-c", "echo victim-waits; sleep 600"],
    );
    p.check("spawn a long victim process", ok(&r), &r);
    ev.wait_stdout("v2", "victim-waits", short);
    let flood_socket = socket.to_owned();
    let flood = std::thread::spawn(move || {
        let mut fp = Pipe::open(&flood_socket);
        let chunk = "a".repeat(64 * 1024);
        let mut errors = 0;
        for _ in 0..300 {
            let r = fp.call("writeStdin", json!({"id": "a4", "data": chunk}));
            if !ok(&r) {
                errors += 1;
            }
        }
        errors
    });
    std::thread::sleep(Duration::from_secs(2));
    let mut slowest = Duration::ZERO;
    let mut answered = true;
    for _ in 0..10 {
        let t = Instant::now();
        let r = pipe.call("isProcessRunning", json!({"id": "v2"}));
        slowest = slowest.max(t.elapsed());
        answered &= r["result"]["running"] == true;
        std::thread::sleep(Duration::from_millis(300));
    }
    p.check(
        "another session's isProcessRunning answers during a stdin flood",
        answered && slowest < Duration::from_secs(5),
        format!("slowest {slowest:?}"),
    );
    println!("@@CLIENT flood-rtt-max-ms {}", slowest.as_millis());
    let r = pipe.call("kill", json!({"id": "v2", "signal": "SIGKILL"}));
    p.check("kill of another session during the flood", ok(&r), &r);
    let errors = flood.join().unwrap_or(-1);
    println!("@@CLIENT flood-errors {errors}");
    let r = pipe.call("kill", json!({"id": "a4", "signal": "SIGKILL"}));
    p.check("kill the deaf process", ok(&r), &r);

    // A fork bomb in one session; another session still runs.
    let r = spawn(
        &mut pipe,
        "a5",
        "attacker",
        "bash",
        &["-c", "echo bomb; b() { b | b & }; b; sleep 30"],
    );
    p.check("spawn a fork bomb", ok(&r), &r);
    ev.wait_stdout("a5", "bomb", short);
    std::thread::sleep(Duration::from_secs(10));
    let t = Instant::now();
    let r = spawn(&mut pipe, "v3", "victim", "echo", &["victim-alive"]);
    let alive = ok(&r) && ev.wait_stdout("v3", "victim-alive", Duration::from_secs(90));
    p.check(
        "another session runs while a fork bomb goes off",
        alive,
        format!("{r} after {:?}", t.elapsed()),
    );
    println!("@@CLIENT echo-under-bomb-ms {}", t.elapsed().as_millis());
    let r = pipe.call("kill", json!({"id": "a5", "signal": "SIGKILL"}));
    p.check("kill the fork bomb", ok(&r), &r);
    p.check(
        "the fork bomb's session ends",
        ev.exit_of("a5", short).is_some(),
        "no exit",
    );
    p.check(
        "the guest is still connected",
        connected(socket),
        "disconnected",
    );

    let r = pipe.call("stopVM", json!({}));
    p.check("stopVM", ok(&r), &r);

    // A session disk that is a symlink to a host file: startVM refuses
    // and the file is untouched.
    let disk = std::path::Path::new(bundle).join("sessiondata.img");
    let aside = std::path::Path::new(bundle).join("sessiondata.img.aside");
    let canary = std::path::Path::new(bundle).join("canary");
    let canary_text = b"canary: the guest must never see this\n".repeat(64);
    let set = std::fs::write(&canary, &canary_text)
        .and_then(|()| std::fs::rename(&disk, &aside))
        .and_then(|()| std::os::unix::fs::symlink(&canary, &disk));
    p.check(
        "symlinked the session disk",
        set.is_ok(),
        format!("{set:?}"),
    );
    let r = pipe.call("startVM", json!({"bundlePath": bundle, "memoryGB": 1}));
    let refused = !ok(&r) || poll_connected(socket, Duration::from_secs(30)).is_none();
    let _ = pipe.call("stopVM", json!({}));
    p.check(
        "startVM refuses a symlinked session disk",
        refused && !ok(&r),
        &r,
    );
    p.check(
        "the canary is untouched",
        std::fs::read(&canary).ok().as_deref() == Some(canary_text.as_slice()),
        "changed",
    );
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::rename(&aside, &disk);
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(p.failed));
}

/// The victim session's user name as the guest's own passwd has it, seen
/// through `id -un` in the victim's session.
fn victim_user_name(pipe: &mut Pipe, ev: &Events) -> Option<String> {
    let r = spawn(pipe, "v-id", "victim", "id", &["-un"]);
    if !ok(&r) {
        return None;
    }
    ev.exit_of("v-id", Duration::from_secs(60))?;
    let name = ev.stdout("v-id").trim().to_owned();
    (!name.is_empty()).then_some(name)
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if let [_, flag, socket, bundle] = argv.as_slice() {
        if flag == "--escape" {
            return escape(socket, bundle);
        }
        if flag == "--start" {
            let mut pipe = Pipe::open(socket);
            let r = pipe.call("startVM", json!({"bundlePath": bundle, "memoryGB": 1}));
            let up = ok(&r) && poll_connected(socket, Duration::from_secs(240)).is_some();
            println!("@@CLIENT started {up}");
            std::process::exit(i32::from(!up));
        }
    }
    if let [_, flag, socket, bundle, host_dir] = argv.as_slice() {
        if flag == "--shares" {
            return shares::shares(socket, bundle, host_dir);
        }
        if flag == "--egress" {
            return egress::egress(socket, bundle, host_dir);
        }
        if flag == "--cowork" {
            return cowork::cowork(socket, bundle, host_dir);
        }
    }
    if let [_, flag, n, socket, bundle, host_dir] = argv.as_slice() {
        if flag == "--cowork-bench" {
            let n: usize = n.parse().expect("N");
            return cowork::bench(n, socket, bundle, host_dir);
        }
    }
    if let [_, flag, n, copy_socket, bundle] = argv.as_slice() {
        if flag == "--cowork-copy-bench" {
            let n: usize = n.parse().expect("N");
            return cowork::copy_bench(n, copy_socket, bundle);
        }
    }
    if let [_, flag, mib, n, socket, bundle, dir] = argv.as_slice() {
        if flag == "--egress-bench" {
            let mib: u64 = mib.parse().expect("MIB");
            let n: usize = n.parse().expect("N");
            return egress::bench(mib, n, socket, bundle, dir);
        }
    }
    if let [_, flag, n, socket, rest @ ..] = argv.as_slice() {
        let n: usize = n.parse().expect("N");
        match (flag.as_str(), rest) {
            ("--bench", [bundle]) => return bench(n, socket, bundle),
            ("--rtt", []) => return rtt(n, socket),
            _ => {}
        }
    }
    let (socket, bundle) = match argv.as_slice() {
        [_, s, b] => (s.as_str(), b.as_str()),
        _ => {
            eprintln!("usage: client-probe SOCKET BUNDLE_DIR");
            std::process::exit(2)
        }
    };
    let mut p = Probe { failed: false };
    let long = Duration::from_secs(240);
    let short = Duration::from_secs(60);

    // 1. The client's opening: configure on the pipe, clean-up stopVM,
    // then the event stream.
    let mut pipe = Pipe::open(socket);
    let r = pipe.call(
        "configure",
        json!({"userDataName": "e2e", "userDataRoot": "/tmp/e2e", "sessionOnly": true}),
    );
    p.check("configure", ok(&r), &r);
    let r = pipe.call("stopVM", json!({}));
    p.check("stopVM when nothing runs", ok(&r), &r);
    let (ev, ack) = Events::subscribe(socket);
    p.check("subscribeEvents acknowledged", ok(&ack), &ack);
    let first = ev.wait(0, short, |v| v["type"] == "apiReachability");
    let net = ev.wait(0, short, |v| v["type"] == "networkStatus");
    p.check(
        "a new subscriber gets networkStatus and apiReachability",
        first.is_some() && net.is_some(),
        format!("{first:?} {net:?}"),
    );

    // 2. startVM, then poll isGuestConnected.
    let t0 = Instant::now();
    let r = pipe.call(
        "startVM",
        json!({"bundlePath": bundle, "memoryGB": 1, "cpuCount": 1}),
    );
    p.check("startVM", ok(&r), &r);
    let up = poll_connected(socket, long);
    p.check("isGuestConnected turns true", up.is_some(), "timed out");
    if let Some(_d) = up {
        println!(
            "@@CLIENT start-to-connected-ms {}",
            t0.elapsed().as_millis()
        );
    }
    let steps = ev.wait(0, short, |v| v["type"] == "startupStep");
    p.check("startupStep events", steps.is_some(), "none");
    let r = pipe.call("startVM", json!({"bundlePath": bundle}));
    p.check("startVM again is a no-op", ok(&r) && connected(socket), &r);

    // 3. The SDK and the token.
    let r = pipe.call(
        "installSdk",
        json!({"sdkSubpath": SDK_SUBPATH, "version": SDK_VERSION}),
    );
    p.check("installSdk", ok(&r), &r);
    let r = pipe.call("addApprovedOauthToken", json!({"token": TOKEN}));
    p.check("addApprovedOauthToken", ok(&r), &r);

    // 4. A session runs the SDK as its own user, in its own directory.
    let r = spawn(&mut pipe, "p1", "sess1", "claude", &["hello"]);
    p.check("spawn the SDK", ok(&r), &r);
    let exit = ev.exit_of("p1", short);
    let out = ev.stdout("p1");
    p.check(
        "the SDK runs and exits 0 (exitCode)",
        exit.as_ref().is_some_and(|e| e["exitCode"] == 0) && out.contains("sdk-ok hello"),
        format!("{exit:?} stdout={out:?}"),
    );
    let uid: Option<u32> = out
        .lines()
        .find_map(|l| l.strip_prefix("uid="))
        .and_then(|u| u.trim().parse().ok());
    p.check(
        "the session runs as its own unprivileged user",
        uid.is_some_and(|u| u >= 1001),
        &out,
    );
    p.check(
        "its cwd is /sessions/<name>",
        out.lines().any(|l| l.trim() == "cwd=/sessions/sess1"),
        &out,
    );

    // 5. stdin after the first output; readFile of what it wrote.
    let r = spawn(
        &mut pipe,
        "p2",
        "sess1",
        "sh",
        &[
            "-c",
            "echo first; read line; echo got:$line; echo $line > /sessions/sess1/note.txt",
        ],
    );
    p.check("spawn sh", ok(&r), &r);
    let first_out = ev.wait_stdout("p2", "first", short);
    p.check("first stdout event", first_out, ev.stdout("p2"));
    let r = pipe.call("writeStdin", json!({"id": "p2", "data": "hi-there\n"}));
    p.check("writeStdin", ok(&r), &r);
    let exit = ev.exit_of("p2", short);
    p.check(
        "stdin reached the process",
        ev.stdout("p2").contains("got:hi-there") && exit.is_some_and(|e| e["exitCode"] == 0),
        ev.stdout("p2"),
    );
    let r = pipe.call(
        "readFile",
        json!({"processName": "sess1", "filePath": "/sessions/sess1/note.txt"}),
    );
    let content = r["result"]["content"]
        .as_str()
        .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok());
    p.check(
        "readFile returns the file's bytes in base64",
        content.as_deref() == Some(b"hi-there\n".as_slice()),
        &r,
    );

    // 6. kill.
    let r = spawn(
        &mut pipe,
        "p3",
        "sess2",
        "sh",
        &["-c", "echo started; sleep 1000"],
    );
    p.check("spawn sleep", ok(&r), &r);
    ev.wait_stdout("p3", "started", short);
    let r = pipe.call("isProcessRunning", json!({"id": "p3"}));
    p.check(
        "isProcessRunning: running",
        r["result"]["running"] == true,
        &r,
    );
    let r = pipe.call("kill", json!({"id": "p3", "signal": "SIGTERM"}));
    p.check("kill", ok(&r), &r);
    let exit = ev.exit_of("p3", short);
    p.check(
        "kill ends it with the signal reported",
        exit.as_ref().is_some_and(|e| !e["signal"].is_null()),
        format!("{exit:?}"),
    );
    let r = pipe.call("isProcessRunning", json!({"id": "p3"}));
    p.check(
        "isProcessRunning: not running",
        r["result"]["running"] == false,
        &r,
    );

    // 7. The session disk.
    let r = pipe.call("getSessionsDiskInfo", json!({"lowWaterBytes": 0}));
    let names: Vec<&str> = r["result"]["sessions"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    p.check(
        "getSessionsDiskInfo",
        r["result"]["totalBytes"].as_u64().is_some_and(|t| t > 0) && names.contains(&"sess1"),
        &r,
    );
    let r = pipe.call(
        "pruneSessionCaches",
        json!({"onlyIfFreeBytesBelow": u64::MAX / 2, "includeSessionTmp": true,
               "sessionTmpOlderThanSeconds": 0}),
    );
    p.check(
        "pruneSessionCaches",
        r["result"]["prunedSessions"].is_array() && r["result"]["freedBytes"].is_u64(),
        &r,
    );
    let r = pipe.call("deleteSessionDirs", json!({"names": ["sess2"]}));
    let deleted = r["result"]["deleted"]
        .as_array()
        .is_some_and(|d| d.iter().any(|n| n == "sess2"));
    p.check("deleteSessionDirs", deleted, &r);
    let r = pipe.call("getSessionsDiskInfo", json!({"lowWaterBytes": 0}));
    p.check(
        "a deleted session is gone",
        !r.to_string().contains("\"sess2\""),
        &r,
    );
    let r = pipe.call("noSuchMethod", json!({}));
    p.check(
        "unknown method",
        r["error"] == "Unknown method: noSuchMethod",
        &r,
    );

    // 8. stopVM.
    let r = pipe.call("stopVM", json!({}));
    p.check("stopVM", ok(&r), &r);
    p.check(
        "not running, not connected after stopVM",
        !running(socket) && !connected(socket),
        "",
    );

    // 9. The client drops its vendor's rootfs.img.zst (for Apple's VM, no
    // coworkvm agent) into the bundle: the next start must ignore it, boot
    // coworkvm's own rootfs and leave no stranger's image behind.
    let vendor = std::path::Path::new(bundle).join("rootfs.img.zst");
    let junk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let wrote = std::fs::write(&vendor, &junk);
    p.check(
        "dropped a vendor rootfs.img.zst",
        wrote.is_ok(),
        format!("{wrote:?}"),
    );
    // Then a VMM killed under load, and a restart.
    let r = pipe.call("startVM", json!({"bundlePath": bundle, "memoryGB": 1}));
    p.check("startVM after stopVM", ok(&r), &r);
    let up = poll_connected(socket, long);
    p.check("connected again", up.is_some(), "timed out");
    p.check(
        "the vendor rootfs.img.zst was removed, not applied",
        !vendor.exists(),
        "still there",
    );
    let r = spawn(
        &mut pipe,
        "p4",
        "sess1",
        "sh",
        &["-c", "echo loading; while :; do :; done"],
    );
    p.check("spawn a busy loop", ok(&r), &r);
    ev.wait_stdout("p4", "loading", short);
    let mark = ev.len();
    match vmm_pid(bundle) {
        Some(pid) => {
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let t = Instant::now();
            let gone = ev.wait(mark, short, |v| {
                v["type"] == "networkStatus" && v["status"] == "NOT_CONNECTED"
            });
            p.check(
                "NOT_CONNECTED after the VMM died",
                gone.is_some(),
                "no event",
            );
            println!("@@CLIENT crash-seen-ms {}", t.elapsed().as_millis());
            let lost = ev.wait(mark, short, |v| {
                (v["type"] == "exit" || (v["type"] == "error" && v["fatal"] == true))
                    && v["id"] == "p4"
            });
            p.check(
                "the running process is reported ended",
                lost.is_some(),
                "none",
            );
            p.check(
                "isRunning and isGuestConnected false after the crash",
                !running(socket) && !connected(socket),
                "",
            );
        }
        None => p.check("found the VMM process", false, "no coworkvm boot child"),
    }
    let r = pipe.call("startVM", json!({"bundlePath": bundle, "memoryGB": 1}));
    p.check("startVM after the crash", ok(&r), &r);
    let up = poll_connected(socket, long);
    p.check("connected after the crash", up.is_some(), "timed out");
    let r = spawn(
        &mut pipe,
        "p5",
        "sess1",
        "cat",
        &["/sessions/sess1/note.txt"],
    );
    let exit = ev.exit_of("p5", short);
    p.check(
        "the session disk survived the crash",
        ok(&r) && ev.stdout("p5").contains("hi-there") && exit.is_some(),
        ev.stdout("p5"),
    );
    let r = pipe.call("stopVM", json!({}));
    p.check("final stopVM", ok(&r), &r);
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(p.failed));
}
