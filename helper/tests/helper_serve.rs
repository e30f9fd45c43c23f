//! `coworkvm serve` driven over its socket exactly as the desktop client
//! drives it, with a test double of the VMM: a "VM" that is a thread playing
//! the guest agent on `RUNDIR/vsock.sock_51234` (guest protocol, real
//! framing). No KVM needed.

use std::collections::{BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use coworkvm_helper::egress::EgressConfig;
use coworkvm_helper::sdk_copy;
use coworkvm_helper::vm::{LaunchSpec, LaunchedVm, VmLauncher, VmManagerError, VmSignal};
use coworkvm_helper::{bind, Helper, HelperConfig, ImageSource, Listener, VmImages};
use coworkvm_tests::client::{connect, is_running, one_shot, recv};
use coworkvm_tests::temp_dir;
use coworkvm_vmm::boot_file::BootFile;
use serde_json::{json, Value};
use socket_proto::frame::{encode_frame, read_frame, write_frame};
use socket_proto::guest::AGENT_VSOCK_PORT;

// ---------------------------------------------------------------------------
// Log capture: secrets must never reach a log line.

#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static LogBuf {
    static LOGS: std::sync::OnceLock<LogBuf> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = LogBuf::default();
        let w = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || w.clone())
            .try_init();
        buf
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned()
}

// ---------------------------------------------------------------------------
// The fake VM: a thread that dials the agent socket and plays the agent.

#[derive(Default)]
struct FakeVm {
    /// Guest requests received, as frames.
    requests: Mutex<Vec<Value>>,
    /// Responses from the host (to the fake's own requests).
    responses: Mutex<Vec<Value>>,
    exit: Mutex<Option<tokio::sync::oneshot::Sender<String>>>,
    conn: Mutex<Option<UnixStream>>,
    powered_off: AtomicBool,
    /// While set, the fake agent does not redial.
    hold_redial: AtomicBool,
    running: Mutex<BTreeSet<String>>,
    /// The SDK transfer: the announced sha256, and the bytes received.
    sdk: Mutex<(Value, Vec<u8>)>,
    /// `installSdk` requests that opened a transfer.
    sdk_opens: AtomicUsize,
    /// Chunks refused for arriving at the wrong offset (the agent aborts
    /// the transfer then).
    sdk_aborts: AtomicUsize,
    /// While set, each chunk takes 300 ms (a transfer at rig speed).
    slow_sdk_chunks: AtomicBool,
    /// While set, every chunk is refused (a guest whose disk is full).
    failing_sdk_chunks: AtomicBool,
    ignore_term: bool,
    no_agent: bool,
    /// The agent does not advertise the session sandbox.
    no_sandbox: bool,
    /// While set, the agent reads nothing (after the frame in hand).
    stop_reading: AtomicBool,
    /// The helper's egress socket (`RUNDIR/vsock.sock_51235`).
    egress_path: PathBuf,
}

impl FakeVm {
    /// The first guest request `pred` accepts (panics if none came).
    fn request_where(&self, pred: impl Fn(&&Value) -> bool) -> Value {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .find(pred)
            .cloned()
            .expect("no such request reached the guest")
    }

    fn power_off(&self, how: &str) {
        self.powered_off.store(true, Ordering::SeqCst);
        self.drop_connection();
        if let Some(tx) = self.exit.lock().unwrap().take() {
            let _ = tx.send(how.to_string());
        }
    }

    fn drop_connection(&self) {
        if let Some(c) = self.conn.lock().unwrap().take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn methods(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r["method"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn agent_loop(self: Arc<Self>, path: PathBuf) {
        while !self.powered_off.load(Ordering::SeqCst) {
            if self.hold_redial.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let Ok(s) = UnixStream::connect(&path) else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            *self.conn.lock().unwrap() = Some(s.try_clone().unwrap());
            let w = Arc::new(Mutex::new(s.try_clone().unwrap()));
            let send = |f: Value| {
                let _ = write_frame(&mut *w.lock().unwrap(), &f);
            };
            send(json!({"type": "event", "event": "startupStep",
                        "params": {"step": "mountSessions", "status": "completed"}}));
            send(json!({"type": "event", "event": "ready"}));
            let mut r = std::io::BufReader::new(s);
            loop {
                if self.stop_reading.load(Ordering::SeqCst) {
                    // A hung agent: the connection stays open, unread.
                    if self.powered_off.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                let Ok(Some(obj)) = read_frame(&mut r) else {
                    break;
                };
                let f = Value::Object(obj);
                self.handle(&f, &send, &w);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn handle(&self, f: &Value, send: &dyn Fn(Value), w: &Arc<Mutex<UnixStream>>) {
        let event =
            |name: &str, params: Value| json!({"type": "event", "event": name, "params": params});
        match f["type"].as_str() {
            Some("notification") if f["method"] == "stdin" => {
                let id = f["params"]["id"].as_str().unwrap_or("");
                let data = f["params"]["data"].as_str().unwrap_or("");
                send(event(
                    "stdout",
                    json!({"id": id, "data": format!("echo:{data}")}),
                ));
            }
            Some("response") => self.responses.lock().unwrap().push(f.clone()),
            Some("request") => {
                self.requests.lock().unwrap().push(f.clone());
                let id = f["id"].clone();
                let p = &f["params"];
                let reply = |result: Value| json!({"type": "response", "id": id, "result": result});
                match f["method"].as_str().unwrap_or("") {
                    "agent.info" => {
                        let caps = if self.no_sandbox {
                            json!([])
                        } else {
                            json!(["sandbox", "egress"])
                        };
                        send(reply(json!({"agent": "fake-agent", "version": "0",
                                          "protocol": 1, "capabilities": caps})))
                    }
                    "spawn" => {
                        let pid = p["id"].as_str().unwrap_or("").to_string();
                        let cmd = p["command"].as_str().unwrap_or("");
                        if cmd == "askhost" {
                            send(reply(json!({})));
                            send(json!({"type": "request", "id": "g1", "method": "openUrl",
                                        "params": {"url": "https://example.invalid/"}}));
                            send(event("frobnicated", json!({"id": pid})));
                            send(event("stdout", json!({"id": pid, "data": "after"})));
                            return;
                        }
                        if cmd == "flood" {
                            // args: [count, bytes]; paced so that a client
                            // that reads keeps up.
                            send(reply(json!({})));
                            let n = p["args"][0].as_str().unwrap_or("0").parse().unwrap_or(0);
                            let len = p["args"][1].as_str().unwrap_or("0").parse().unwrap_or(0);
                            let chunk = "y".repeat(len);
                            for i in 0..n {
                                send(event("stdout", json!({"id": pid, "data": chunk, "seq": i})));
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            send(event("stdout", json!({"id": pid, "data": "end"})));
                            return;
                        }
                        if cmd == "slow" {
                            // Answer later, from another thread.
                            let w = w.clone();
                            let r = reply(json!({}));
                            std::thread::spawn(move || {
                                std::thread::sleep(Duration::from_millis(800));
                                let _ = write_frame(&mut *w.lock().unwrap(), &r);
                            });
                            return;
                        }
                        send(reply(json!({"failedMounts": ["guest-side"]})));
                        if cmd == "netlie" {
                            // A guest that claims the network's state.
                            send(event("networkStatus", json!({"status": "NOT_CONNECTED"})));
                            send(event("apiReachability", json!({"status": "UNREACHABLE"})));
                        }
                        self.running.lock().unwrap().insert(pid.clone());
                        send(event(
                            "stdout",
                            json!({"id": pid, "data": format!("hello from {cmd}\n")}),
                        ));
                        if cmd == "echo" {
                            self.running.lock().unwrap().remove(&pid);
                            send(event(
                                "exit",
                                json!({"id": pid, "code": 0, "signal": null, "oomKillCount": 0}),
                            ));
                        }
                    }
                    "kill" => {
                        let pid = p["id"].as_str().unwrap_or("").to_string();
                        send(reply(json!({})));
                        if self.running.lock().unwrap().remove(&pid) {
                            send(event(
                                "exit",
                                json!({"id": pid, "code": null, "signal": p["signal"].clone(), "oomKillCount": 0}),
                            ));
                        }
                    }
                    "isProcessRunning" => {
                        let running = self
                            .running
                            .lock()
                            .unwrap()
                            .contains(p["id"].as_str().unwrap_or(""));
                        send(reply(json!({ "running": running })));
                    }
                    "readFile" => {
                        let text = format!("contents of {}", p["filePath"].as_str().unwrap_or(""));
                        let b64 = base64::engine::general_purpose::STANDARD.encode(text);
                        send(reply(json!({ "content": b64 })));
                    }
                    "installSdk" => {
                        self.sdk_opens.fetch_add(1, Ordering::SeqCst);
                        *self.sdk.lock().unwrap() = (p["sha256"].clone(), Vec::new());
                        send(reply(json!({"cached": false})));
                    }
                    "installSdk.chunk" => {
                        if self.slow_sdk_chunks.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(300));
                        }
                        if self.failing_sdk_chunks.load(Ordering::SeqCst) {
                            send(json!({"type": "response", "id": id, "error":
                                {"code": -32000, "message": "No space left on device; transfer aborted"}}));
                            return;
                        }
                        let data = base64::engine::general_purpose::STANDARD
                            .decode(p["data"].as_str().unwrap_or(""))
                            .unwrap();
                        let mut sdk = self.sdk.lock().unwrap();
                        if p["offset"].as_u64() != Some(sdk.1.len() as u64) {
                            self.sdk_aborts.fetch_add(1, Ordering::SeqCst);
                            sdk.1.clear();
                            send(json!({"type": "response", "id": id, "error":
                                {"code": -32000, "message": "wrong offset; transfer aborted"}}));
                        } else {
                            sdk.1.extend_from_slice(&data);
                            send(reply(json!({"received": sdk.1.len()})));
                        }
                    }
                    "installSdk.commit" => {
                        let v = p["version"].as_str().unwrap_or("");
                        send(reply(
                            json!({"path": format!("/sessions/.coworkvm/sdk/{v}/claude")}),
                        ));
                    }
                    "shutdown" => {
                        send(reply(json!({})));
                        self.power_off("exit status: 0");
                    }
                    "egress.probe" => {
                        // As the agent does: one egress stream with the
                        // nonce, the helper's reply passed back.
                        let line = json!({"v": 1, "probe": p["nonce"], "host": p["host"],
                                          "port": p["port"], "via": "probe"});
                        let path = self.egress_path.clone();
                        let w = w.clone();
                        std::thread::spawn(move || {
                            let answer = match egress_round_trip(&path, &line) {
                                Ok(r) => json!({"type": "response", "id": id, "result": r}),
                                Err(e) => json!({"type": "response", "id": id,
                                    "error": {"code": -32000, "message": e.to_string()}}),
                            };
                            let _ = write_frame(&mut *w.lock().unwrap(), &answer);
                        });
                    }
                    other => send(json!({"type": "response", "id": id,
                        "error": {"code": -32601, "message": format!("unknown method: {other}")}})),
                }
            }
            _ => {}
        }
    }
}

/// Opens one egress stream to the helper, writes `line`, and returns the
/// helper's reply line as JSON.
fn egress_round_trip(path: &Path, line: &Value) -> std::io::Result<Value> {
    use std::io::BufRead;
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut bytes = serde_json::to_vec(line)?;
    bytes.push(b'\n');
    s.write_all(&bytes)?;
    let mut reply = String::new();
    std::io::BufReader::new(s).read_line(&mut reply)?;
    Ok(serde_json::from_str(&reply)?)
}

/// The tests' image source: the bundle directory's files by name (the
/// fake launcher boots nothing), a sparse session disk made when missing.
/// The real one, the bundle module, has its own tests (tests/bundle.rs).
struct BundleFiles;

impl ImageSource for BundleFiles {
    fn prepare(&self, bundle: &Path, disk_gb: Option<u64>) -> Result<VmImages, VmManagerError> {
        for f in ["vmlinuz", "initrd.img", "rootfs.img"] {
            let p = bundle.join(f);
            if !p.is_file() {
                return Err(VmManagerError::Io {
                    what: "the bundle has no",
                    path: p,
                    source: std::io::ErrorKind::NotFound.into(),
                });
            }
        }
        let session_disk = bundle.join("sessiondata.img");
        if !session_disk.exists() {
            let f = std::fs::File::create(&session_disk).unwrap();
            f.set_len(disk_gb.unwrap_or(10) << 30).unwrap();
        }
        let open = |p: PathBuf, writable: bool| {
            let f = coworkvm_bundle::fsutil::open_regular(&p, writable).map_err(|source| {
                VmManagerError::Io {
                    what: "opening",
                    path: p.clone(),
                    source,
                }
            })?;
            Ok::<_, VmManagerError>(BootFile::new(p, f))
        };
        Ok(VmImages {
            kernel: open(bundle.join("vmlinuz"), false)?,
            initrd: open(bundle.join("initrd.img"), false)?,
            rootfs: open(bundle.join("rootfs.img"), false)?,
            session_disk: open(session_disk, true)?,
            machine_uuid: None,
        })
    }
}

#[derive(Default)]
struct FakeLauncher {
    vms: Mutex<Vec<Arc<FakeVm>>>,
    specs: Mutex<Vec<LaunchSpec>>,
    ignore_term: AtomicBool,
    no_agent: AtomicBool,
    no_sandbox: AtomicBool,
}

impl FakeLauncher {
    fn launches(&self) -> usize {
        self.vms.lock().unwrap().len()
    }
    fn last(&self) -> Arc<FakeVm> {
        self.vms.lock().unwrap().last().unwrap().clone()
    }
}

impl VmLauncher for FakeLauncher {
    fn launch(&self, spec: &LaunchSpec) -> Result<LaunchedVm, VmManagerError> {
        let (exit_tx, exited) = tokio::sync::oneshot::channel();
        let (control, mut signals) = tokio::sync::mpsc::unbounded_channel();
        let vm = Arc::new(FakeVm {
            exit: Mutex::new(Some(exit_tx)),
            ignore_term: self.ignore_term.load(Ordering::SeqCst),
            no_agent: self.no_agent.load(Ordering::SeqCst),
            no_sandbox: self.no_sandbox.load(Ordering::SeqCst),
            egress_path: PathBuf::from(format!("{}_51235", spec.vsock().display())),
            ..Default::default()
        });
        let path = PathBuf::from(format!("{}_{AGENT_VSOCK_PORT}", spec.vsock().display()));
        if !vm.no_agent {
            let v = vm.clone();
            std::thread::spawn(move || v.agent_loop(path));
        }
        let v = vm.clone();
        std::thread::spawn(move || {
            while let Some(sig) = signals.blocking_recv() {
                match sig {
                    VmSignal::Terminate if v.ignore_term => {}
                    VmSignal::Terminate => v.power_off("signal: 15 (SIGTERM)"),
                    VmSignal::Kill => v.power_off("signal: 9 (SIGKILL)"),
                }
            }
        });
        self.vms.lock().unwrap().push(vm);
        self.specs.lock().unwrap().push(spec.clone());
        Ok(LaunchedVm {
            name: "fake VM".into(),
            control,
            exited,
        })
    }
}

// ---------------------------------------------------------------------------
// The helper under test, on its own runtime thread.

struct Served {
    socket: PathBuf,
    dir: PathBuf,
    bundle: PathBuf,
    launcher: Arc<FakeLauncher>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The tests' per-subscriber event budget: small, so that going over it
/// takes little output.
const EVENT_BUDGET: usize = 4 << 20;

fn make_bundle(dir: &Path) -> PathBuf {
    let b = dir.join("bundle");
    std::fs::create_dir_all(&b).unwrap();
    for f in ["vmlinuz", "initrd.img", "rootfs.img"] {
        std::fs::write(b.join(f), b"x").unwrap();
    }
    b
}

/// Binds in the runtime thread; the result of the bind comes back.
fn try_serve(
    socket: &Path,
    launcher: Arc<FakeLauncher>,
    home: Option<PathBuf>,
) -> Result<Served, String> {
    try_serve_with(socket, launcher, home, EgressConfig::default())
}

fn try_serve_with(
    socket: &Path,
    launcher: Arc<FakeLauncher>,
    home: Option<PathBuf>,
    egress: EgressConfig,
) -> Result<Served, String> {
    try_serve_idle(
        socket,
        launcher,
        home,
        egress,
        None,
        sdk_copy::ANSWER_WITHIN,
    )
}

/// As [`try_serve_with`], the helper stopping after `idle_exit` with no VM
/// and no connection.
fn try_serve_idle(
    socket: &Path,
    launcher: Arc<FakeLauncher>,
    home: Option<PathBuf>,
    egress: EgressConfig,
    idle_exit: Option<Duration>,
    sdk_answer_within: Duration,
) -> Result<Served, String> {
    logs();
    let dir = socket.parent().unwrap().to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sock = socket.to_owned();
    let l = launcher.clone();
    let run_dir = dir.join("run");
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener: Listener = match bind(&sock) {
                Ok(l) => l.with_idle_exit(idle_exit),
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let helper = Helper::new(HelperConfig {
                images: Arc::new(BundleFiles),
                launcher: l,
                run_dir,
                home,
                debug_switch: None,
                event_budget: EVENT_BUDGET,
                share_launcher: None,
                egress: Arc::new(egress),
                sdk_answer_within,
            });
            let _ = tx.send(Ok(()));
            listener
                .run(helper, async move {
                    let _ = stop_rx.await;
                })
                .await;
        });
    });
    match rx.recv().unwrap() {
        Ok(()) => Ok(Served {
            socket: socket.to_owned(),
            bundle: make_bundle(&dir),
            dir,
            launcher,
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        Err(e) => {
            let _ = thread.join();
            Err(e)
        }
    }
}

fn serve(tag: &str) -> Served {
    let dir = temp_dir(tag);
    try_serve(&dir.join("helper.sock"), Arc::default(), None).unwrap()
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Clients, as the desktop client behaves.

struct Pipe {
    s: UnixStream,
    next: u64,
    stash: VecDeque<Value>,
}

impl Pipe {
    fn open(socket: &Path) -> Self {
        Pipe {
            s: connect(socket),
            next: 1,
            stash: VecDeque::new(),
        }
    }
    fn send(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next;
        self.next += 1;
        write_frame(
            &mut self.s,
            &json!({"method": method, "id": id, "params": params}),
        )
        .unwrap();
        id
    }
    fn wait(&mut self, id: u64) -> Value {
        if let Some(i) = self.stash.iter().position(|r| r["id"] == id) {
            return self.stash.remove(i).unwrap();
        }
        loop {
            let r = recv(&mut self.s).expect("a reply on the pipe");
            if r["id"] == id {
                return r;
            }
            self.stash.push_back(r);
        }
    }
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.send(method, params);
        self.wait(id)
    }
    fn ok(&mut self, method: &str, params: Value) -> Value {
        let r = self.call(method, params);
        assert_eq!(r["success"], true, "{method}: {r}");
        r.get("result").cloned().unwrap_or(Value::Null)
    }
}

struct Subscriber {
    s: UnixStream,
    seen: Vec<Value>,
}

impl Subscriber {
    fn open(socket: &Path) -> Self {
        let mut s = connect(socket);
        write_frame(
            &mut s,
            &json!({"method": "subscribeEvents", "params": {"userDataName": "t", "userDataRoot": "/t"}}),
        )
        .unwrap();
        let ack = recv(&mut s).unwrap();
        assert_eq!(ack, json!({"success": true}));
        Subscriber { s, seen: vec![] }
    }
    fn next(&mut self) -> Value {
        let e = recv(&mut self.s).expect("an event");
        self.seen.push(e.clone());
        e
    }
    fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let e = self.next();
            if pred(&e) {
                return e;
            }
        }
        panic!("no {what} event; saw {:?}", self.seen);
    }
}

fn poll_connected(socket: &Path, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = one_shot(socket, "isGuestConnected", json!({}));
        if r["result"]["connected"] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "isGuestConnected never became {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------

#[test]
fn the_clients_boot_sequence_spawn_streams_and_stop() {
    let h = serve("flow");
    let sock = &h.socket;
    let mut pipe = Pipe::open(sock);
    pipe.ok("configure", json!({"userDataName": "default", "userDataRoot": "/home/u/.config/Claude", "sessionOnly": true}));
    pipe.ok("stopVM", json!({})); // the client's clean-up: a no-op

    let mut sub = Subscriber::open(sock);
    assert_eq!(
        sub.next(),
        json!({"type": "networkStatus", "status": "NOT_CONNECTED"})
    );
    assert_eq!(
        sub.next(),
        json!({"type": "apiReachability", "status": "UNKNOWN"})
    );
    assert!(!is_running(sock));
    assert_eq!(
        one_shot(sock, "isGuestConnected", json!({}))["result"]["connected"],
        false
    );

    let bundle = h.bundle.to_str().unwrap().to_string();
    pipe.ok(
        "startVM",
        json!({"bundlePath": bundle, "memoryGB": 3, "cpuCount": 4}),
    );
    assert!(is_running(sock));
    poll_connected(sock, true);
    let spec = h.launcher.specs.lock().unwrap()[0].clone();
    assert_eq!((spec.config.cpus, spec.config.mem_mib), (4, 3072));
    assert!(
        h.bundle.join("sessiondata.img").exists(),
        "session disk made"
    );
    sub.until("startupStep", |e| {
        e["type"] == "startupStep" && e["step"] == "mountSessions"
    });
    sub.until("networkStatus CONNECTED", |e| {
        e["type"] == "networkStatus" && e["status"] == "CONNECTED"
    });
    // startVM again: nothing new starts.
    pipe.ok("startVM", json!({"bundlePath": bundle}));
    assert_eq!(h.launcher.launches(), 1);

    // A second subscriber is told the current state first.
    let mut sub2 = Subscriber::open(sock);
    assert_eq!(
        sub2.next(),
        json!({"type": "networkStatus", "status": "CONNECTED"})
    );
    assert_eq!(sub2.next()["type"], "apiReachability");

    // spawn: output and exit reach every subscriber, exit with exitCode.
    let r = pipe.call(
        "addApprovedOauthToken",
        json!({"token": "sk-ant-oat-SECRET1"}),
    );
    assert_eq!(
        r["error"], "unknown method: addApprovedOauthToken",
        "forwarded to the agent"
    );
    let r = pipe.ok(
        "spawn",
        json!({"id": "p1", "name": "s1", "command": "echo", "args": ["hi"], "isResume": false,
               "env": {"ANTHROPIC_API_KEY": "sk-SECRET2"}, "oauthToken": "sk-SECRET3",
               "additionalMounts": [{"mountName": "docs", "path": "/home/u/docs", "mode": "rw"}],
               "sandbox": false, "encoding": "base64"}),
    );
    let failed = r["failedMounts"].as_array().unwrap();
    assert_eq!(
        failed,
        &[json!("docs"), json!("guest-side")],
        "the mount names, the agent's own merged: {r}"
    );
    for s in [&mut sub, &mut sub2] {
        let out = s.until("stdout", |e| e["type"] == "stdout");
        assert_eq!(
            out,
            json!({"type": "stdout", "id": "p1", "data": "hello from echo\n"})
        );
        let exit = s.until("exit", |e| e["type"] == "exit");
        assert_eq!(
            exit,
            json!({"type": "exit", "id": "p1", "exitCode": 0, "oomKillCount": 0})
        );
    }
    let vm = h.launcher.last();
    let spawned = vm.request_where(|r| r["method"] == "spawn");
    assert!(
        spawned["params"].get("additionalMounts").is_none(),
        "{spawned}"
    );
    // coworkvm run's extensions: a client of the socket cannot leave the
    // session sandbox or change the output encoding.
    assert!(spawned["params"].get("sandbox").is_none(), "{spawned}");
    assert!(spawned["params"].get("encoding").is_none(), "{spawned}");
    assert_eq!(
        spawned["params"]["env"]["ANTHROPIC_API_KEY"], "sk-SECRET2",
        "secrets reach the guest"
    );
    // The agent runs the egress proxies: the spawn gets their variables
    // and the spawn's own OAuth token.
    let env = &spawned["params"]["env"];
    assert_eq!(env["HTTPS_PROXY"], "http://127.0.0.1:3128", "{env}");
    assert_eq!(env["ALL_PROXY"], "socks5h://127.0.0.1:1080", "{env}");
    assert_eq!(env["CLAUDE_CODE_OAUTH_TOKEN"], "sk-SECRET3");

    // A long-running process: stdin, isProcessRunning, kill.
    pipe.ok(
        "spawn",
        json!({"id": "p2", "name": "s1", "command": "cat", "args": [], "isResume": false}),
    );
    sub.until("stdout p2", |e| e["type"] == "stdout" && e["id"] == "p2");
    // Without its own oauthToken the spawn gets the approved one.
    let p2 = vm.request_where(|r| r["method"] == "spawn" && r["params"]["id"] == "p2");
    assert_eq!(
        p2["params"]["env"]["CLAUDE_CODE_OAUTH_TOKEN"],
        "sk-ant-oat-SECRET1"
    );
    pipe.ok("writeStdin", json!({"id": "p2", "data": "ping\n"}));
    let echo = sub.until("stdin echo", |e| e["type"] == "stdout" && e["id"] == "p2");
    assert_eq!(echo["data"], "echo:ping\n");
    assert_eq!(
        pipe.ok("isProcessRunning", json!({"id": "p2"})),
        json!({"running": true})
    );
    pipe.ok("kill", json!({"id": "p2", "signal": "SIGTERM"}));
    let exit = sub.until("exit p2", |e| e["type"] == "exit" && e["id"] == "p2");
    assert_eq!(exit["signal"], "SIGTERM");
    assert!(exit.get("exitCode").is_none(), "{exit}");
    assert_eq!(
        pipe.ok("isProcessRunning", json!({"id": "p2"})),
        json!({"running": false})
    );

    // readFile through the agent, base64 as the client expects.
    let rf = pipe.ok(
        "readFile",
        json!({"processName": "s1", "filePath": "/sessions/s1/a.txt"}),
    );
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(rf["content"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, b"contents of /sessions/s1/a.txt");
    // A guest error comes back as the client's error text.
    let r = pipe.call("getSessionsDiskInfo", json!({"lowWaterBytes": 1}));
    assert_eq!(r["success"], false);
    assert_eq!(r["error"], "unknown method: getSessionsDiskInfo");

    // Out of order on one pipe: a slow spawn does not hold up isRunning.
    let slow = pipe.send(
        "spawn",
        json!({"id": "p3", "name": "s1", "command": "slow", "isResume": false}),
    );
    let quick = pipe.send("isRunning", json!({}));
    let first = recv(&mut pipe.s).unwrap();
    assert_eq!(first["id"], quick, "the quick reply comes first: {first}");
    assert_eq!(pipe.wait(slow)["success"], true);

    assert_eq!(
        pipe.ok("getNetworkDrives", json!({})),
        json!({"drives": []})
    );
    let r = pipe.call("frobnicate", json!({}));
    assert_eq!(
        r,
        json!({"success": false, "error": "Unknown method: frobnicate", "id": r["id"]})
    );
    let r = pipe.call("kill", json!({"signal": 9}));
    assert_eq!(r["error"], "bad params for kill: missing field `id`");

    // A guest request of a method outside the documented set (all of
    // them: none is documented) and an undocumented event never reach the
    // client: the request is answered "unknown method" to the guest.
    pipe.ok(
        "spawn",
        json!({"id": "p4", "name": "s1", "command": "askhost", "isResume": false}),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.responses.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no answer reached the guest");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        vm.responses.lock().unwrap()[0],
        json!({"type": "response", "id": "g1",
               "error": {"code": -32601, "message": "unknown method: openUrl"}})
    );
    // The event the fake sends after both comes through; nothing before it.
    sub.until("stdout p4", |e| e["type"] == "stdout" && e["id"] == "p4");
    assert!(
        !sub.seen
            .iter()
            .any(|e| e["type"] == "request" || e["type"] == "frobnicated"),
        "{:?}",
        sub.seen
    );
    let text = log_text();
    assert!(
        text.contains("dropped a guest request \"openUrl\""),
        "{text}"
    );
    // The client's sendGuestResponse still goes back as a response frame.
    pipe.ok(
        "sendGuestResponse",
        json!({"id": "g1", "resultJson": "{\"ok\":true}"}),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.responses.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "no response reached the guest");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        vm.responses.lock().unwrap()[1],
        json!({"type": "response", "id": "g1", "result": {"ok": true}})
    );

    // stopVM: shutdown to the agent, the VMM exits, everything reports it.
    pipe.ok("stopVM", json!({}));
    assert!(
        vm.methods().contains(&"shutdown".to_string()),
        "{:?}",
        vm.methods()
    );
    assert!(!is_running(sock));
    assert_eq!(
        one_shot(sock, "isGuestConnected", json!({}))["result"]["connected"],
        false
    );
    sub.until("NOT_CONNECTED", |e| {
        e["type"] == "networkStatus" && e["status"] == "NOT_CONNECTED"
    });
    pipe.ok("stopVM", json!({}));
    assert_eq!(h.launcher.launches(), 1);
    assert_eq!(
        pipe.ok("isProcessRunning", json!({"id": "p2"})),
        json!({"running": false})
    );

    // No secret reached a log line, though the requests were logged.
    let text = log_text();
    assert!(text.contains("spawn p1 in session s1"), "spawns are logged");
    for secret in ["sk-ant-oat-SECRET1", "sk-SECRET2", "sk-SECRET3"] {
        assert!(!text.contains(secret), "{secret} leaked into the log");
    }
}

#[test]
fn the_helpers_probe_owns_network_status_and_api_reachability() {
    use coworkvm_helper::egress::addr::AddressPolicy;
    use coworkvm_helper::egress::config::parse_resolve;
    // The API: a local HTTP server, reached through an override and an
    // allowed loopback block.
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = api.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in api.incoming() {
            let Ok(mut s) = s else { break };
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b);
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        }
    });
    let egress = EgressConfig {
        resolve: vec![parse_resolve("api.probe.test=127.0.0.1").unwrap()],
        addresses: AddressPolicy {
            allow: vec!["127.0.0.1/32".parse().unwrap()],
        },
        file: None,
    };
    let dir = temp_dir("probe");
    let h = try_serve_with(&dir.join("helper.sock"), Arc::default(), None, egress).unwrap();
    let mut sub = Subscriber::open(&h.socket);
    assert_eq!(sub.next()["status"], "NOT_CONNECTED");
    assert_eq!(sub.next()["status"], "UNKNOWN");
    let mut pipe = Pipe::open(&h.socket);
    let bundle = h.bundle.to_str().unwrap().to_string();
    pipe.ok(
        "startVM",
        json!({"bundlePath": bundle, "apiProbeURL": format!("http://api.probe.test:{port}/ping")}),
    );
    sub.until("networkStatus CONNECTED", |e| {
        e["type"] == "networkStatus" && e["status"] == "CONNECTED"
    });
    sub.until("apiReachability REACHABLE", |e| {
        e["type"] == "apiReachability" && e["status"] == "REACHABLE"
    });
    // What the guest says about the network is not passed on.
    pipe.ok(
        "spawn",
        json!({"id": "n1", "name": "s1", "command": "netlie", "args": [], "isResume": false}),
    );
    let e = sub.until("stdout n1", |e| {
        e["type"] == "stdout" || e["type"] == "networkStatus" || e["type"] == "apiReachability"
    });
    assert_eq!(e["type"], "stdout", "{e}");
    // The VM goes: NOT_CONNECTED.
    h.launcher.last().power_off("signal: 9 (SIGKILL)");
    sub.until("NOT_CONNECTED", |e| {
        e["type"] == "networkStatus" && e["status"] == "NOT_CONNECTED"
    });
}

#[test]
fn a_vmm_crash_ends_everything_and_start_works_again() {
    let h = serve("crash");
    let sock = &h.socket;
    let mut pipe = Pipe::open(sock);
    let mut sub = Subscriber::open(sock);
    let bundle = h.bundle.to_str().unwrap().to_string();
    pipe.ok("startVM", json!({"bundlePath": bundle}));
    poll_connected(sock, true);
    // CONNECTED follows the first probe, which may come after
    // isGuestConnected; without it there is no NOT_CONNECTED to wait for.
    sub.until("networkStatus CONNECTED", |e| {
        e["type"] == "networkStatus" && e["status"] == "CONNECTED"
    });
    pipe.ok(
        "spawn",
        json!({"id": "long", "name": "s", "command": "cat", "isResume": false}),
    );
    sub.until("stdout", |e| e["type"] == "stdout" && e["id"] == "long");

    // The agent's connection drops: not connected at once, as if the VM
    // had died (its processes are lost), though the VMM still runs. The
    // agent's redial is refused: one agent connection per boot.
    let vm = h.launcher.last();
    vm.hold_redial.store(true, Ordering::SeqCst);
    vm.drop_connection();
    poll_connected(sock, false);
    assert!(
        !is_running(sock),
        "a VM whose agent channel ended is out of reach: not running"
    );
    let mark = sub.seen.len();
    let exit = sub.until("exit for the lost process", |e| {
        e["type"] == "exit" && e["id"] == "long"
    });
    assert_eq!(exit["signal"], "SIGKILL");
    // NOT_CONNECTED comes before or after the exit.
    let not_connected = |e: &Value| e["type"] == "networkStatus" && e["status"] == "NOT_CONNECTED";
    if !sub.seen[mark..].iter().any(not_connected) {
        sub.until("NOT_CONNECTED", not_connected);
    }
    vm.hold_redial.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log_text().contains("refused another connection on the guest agent's port") {
        assert!(Instant::now() < deadline, "the redial was not refused");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        one_shot(sock, "isGuestConnected", json!({}))["result"]["connected"],
        false,
        "a redial never becomes the agent"
    );

    // The VMM dies.
    vm.power_off("signal: 11 (SIGSEGV) (core dumped)");
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_running(sock) {
        assert!(
            Instant::now() < deadline,
            "isRunning stays true after the crash"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        one_shot(sock, "isGuestConnected", json!({}))["result"]["connected"],
        false
    );
    let r = pipe.call("writeStdin", json!({"id": "long", "data": "x"}));
    assert_eq!(r["error"], "the guest is not connected");
    assert!(log_text().contains("exited unexpectedly"));

    pipe.ok("startVM", json!({"bundlePath": bundle}));
    assert_eq!(h.launcher.launches(), 2);
    poll_connected(sock, true);
    pipe.ok("stopVM", json!({}));
}

/// The agent's connection drops while its VMM still runs (the order in
/// which a SIGKILLed VMM's two ends are seen): the client's next startVM
/// must stop that VMM and boot a new one, not answer "already runs".
#[test]
fn start_after_the_agent_channel_ended_replaces_the_vm() {
    let h = serve("channel-ended");
    let sock = &h.socket;
    let mut pipe = Pipe::open(sock);
    let bundle = h.bundle.to_str().unwrap().to_string();
    pipe.ok("startVM", json!({"bundlePath": bundle}));
    poll_connected(sock, true);
    let vm = h.launcher.last();
    vm.hold_redial.store(true, Ordering::SeqCst);
    vm.drop_connection();
    poll_connected(sock, false);
    assert!(!is_running(sock));
    pipe.ok("startVM", json!({"bundlePath": bundle}));
    assert_eq!(h.launcher.launches(), 2, "a new VMM was started");
    assert!(
        log_text().contains("ended; stopping it first"),
        "the old VMM was stopped first"
    );
    poll_connected(sock, true);
    assert!(is_running(sock));
    pipe.ok("stopVM", json!({}));
}

#[test]
fn stop_escalates_to_sigterm_and_sigkill() {
    let h = serve("escalate");
    let sock = &h.socket;
    let mut pipe = Pipe::open(sock);
    let bundle = h.bundle.to_str().unwrap().to_string();
    // No agent ever connects: stopVM cannot ask the guest, so SIGTERM; the
    // VMM ignores it, so SIGKILL after the grace period.
    h.launcher.no_agent.store(true, Ordering::SeqCst);
    h.launcher.ignore_term.store(true, Ordering::SeqCst);
    pipe.ok("startVM", json!({"bundlePath": bundle}));
    assert!(is_running(sock));
    let t = Instant::now();
    pipe.ok("stopVM", json!({}));
    assert!(
        t.elapsed() >= coworkvm_helper::vm::TERM_GRACE,
        "SIGTERM was given its grace"
    );
    assert!(!is_running(sock));
    let text = log_text();
    assert!(text.contains("ignored SIGTERM; killing it"), "{text}");
}

#[test]
fn start_errors_reach_the_client() {
    let h = serve("starterr");
    let empty = h.dir.join("empty-bundle");
    std::fs::create_dir_all(&empty).unwrap();
    let r = one_shot(&h.socket, "startVM", json!({"bundlePath": empty}));
    assert_eq!(r["success"], false);
    assert!(
        r["error"].as_str().unwrap().contains("the bundle has no ")
            && r["error"].as_str().unwrap().contains("vmlinuz"),
        "{r}"
    );
    assert!(!is_running(&h.socket));
    // No bundlePath and no createVM that named one: the method says so.
    let r = one_shot(&h.socket, "startVM", json!({}));
    assert_eq!(
        r["error"],
        "startVM needs a bundlePath (none given, and no createVM named one)"
    );
    let r = one_shot(
        &h.socket,
        "spawn",
        json!({"id": "p", "name": "n", "command": "c"}),
    );
    assert_eq!(r["error"], "the guest is not connected");
}

/// Before a guest runs, the methods the guest serves answer what the host
/// knows instead of "the guest is not connected": `getSessionsDiskInfo`
/// from the host's view of the bundle's `sessiondata.img`, `kill` (nothing
/// runs), `addApprovedOauthToken` (kept for later spawns), the prunes and
/// deletes (nothing done, each name with its reason). Fields a method can
/// do without may be missing; empty env values never reach the guest.
#[test]
fn without_a_guest_the_host_answers_what_it_knows() {
    let h = serve("noguest");
    let sock = &h.socket;
    let mut pipe = Pipe::open(sock);

    // No bundle named yet: an honest error.
    let r = pipe.call("getSessionsDiskInfo", json!({"lowWaterBytes": 1 << 30}));
    assert_eq!(r["success"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("no createVM or startVM has named a bundle"),
        "{r}"
    );
    assert_eq!(
        pipe.ok("kill", json!({"id": "nobody", "signal": "SIGTERM"})),
        Value::Null
    );
    assert_eq!(pipe.ok("isProcessRunning", json!({}))["running"], false);
    assert_eq!(
        pipe.ok(
            "addApprovedOauthToken",
            json!({"token": "sk-ant-oat-OFFLINE1"})
        ),
        Value::Null
    );
    // No token: nothing changes (the one above stays).
    pipe.ok("addApprovedOauthToken", json!({"token": null}));
    assert_eq!(
        pipe.ok("pruneSessionCaches", json!({"onlyIfFreeBytesBelow": -1})),
        json!({"prunedSessions": [], "skippedSessions": [], "freedBytes": 0, "errors": {}})
    );
    assert_eq!(
        pipe.ok("deleteSessionDirs", json!({"names": ["old-session"]})),
        json!({"deleted": [], "errors": {"old-session": "the guest is not connected"}})
    );
    assert_eq!(
        pipe.ok("deleteSessionDirs", json!({})),
        json!({"deleted": [], "errors": {}})
    );
    pipe.ok("setDebugLogging", json!({}));
    pipe.ok("mountPath", json!({"processId": "p"})); // no subpath: nothing to mount
    pipe.ok("createVM", json!({})); // no bundle: nothing to prepare
    assert!(!h.bundle.join("sessiondata.img").exists());

    // A session disk with 1 MiB written into its 64 MiB.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(h.bundle.join("sessiondata.img")).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&vec![7u8; 1 << 20], 0).unwrap();
        f.sync_all().unwrap();
    }
    pipe.ok(
        "createVM",
        json!({"bundlePath": h.bundle.to_str().unwrap(), "diskSizeGB": -1}),
    );
    let info = pipe.ok("getSessionsDiskInfo", json!({"lowWaterBytes": null}));
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(h.bundle.join("sessiondata.img"))
            .unwrap()
            .blocks()
            * 512
    };
    assert!(allocated >= 1 << 20, "{allocated}");
    assert_eq!(
        info,
        json!({"totalBytes": 64u64 << 20, "freeBytes": (64u64 << 20) - allocated, "sessions": []})
    );

    // startVM without a bundlePath boots createVM's.
    pipe.ok("startVM", json!({"bundlePath": null, "memoryGB": -1}));
    poll_connected(sock, true);
    // The token approved before the guest ran reaches the spawn; empty env
    // values (the client's ANTHROPIC_API_KEY="") and null ones do not.
    pipe.ok(
        "spawn",
        json!({"id": "p1", "name": "s1", "command": "echo", "args": null, "isResume": null,
               "env": {"ANTHROPIC_API_KEY": "", "CLAUDE_CODE_DISABLE_CRON": "", "NULLED": null,
                       "CLAUDE_CONFIG_DIR": "/sessions/s1/mnt/.claude"}}),
    );
    let vm = h.launcher.last();
    let spawn = vm.request_where(|r| r["method"] == "spawn");
    let env = spawn["params"]["env"].as_object().unwrap();
    for gone in ["ANTHROPIC_API_KEY", "CLAUDE_CODE_DISABLE_CRON", "NULLED"] {
        assert!(!env.contains_key(gone), "{gone} forwarded");
    }
    assert_eq!(env["CLAUDE_CONFIG_DIR"], "/sessions/s1/mnt/.claude");
    assert_eq!(env["CLAUDE_CODE_OAUTH_TOKEN"], "sk-ant-oat-OFFLINE1");
    assert_eq!(spawn["params"]["args"], json!([]));
    // readFile without processName: the session comes from the path.
    let r = pipe.ok("readFile", json!({"filePath": "/sessions/s1/out.txt"}));
    assert!(r["content"].is_string(), "{r}");
    let rf = vm.request_where(|r| r["method"] == "readFile");
    assert_eq!(rf["params"]["processName"], "s1");
    let r = pipe.call("readFile", json!({"filePath": "/tmp/x"}));
    assert!(
        r["error"].as_str().unwrap().contains("no processName"),
        "{r}"
    );
    // With a guest connected, the disk question goes to it.
    pipe.call("getSessionsDiskInfo", json!({}));
    assert!(vm.methods().iter().any(|m| m == "getSessionsDiskInfo"));
    pipe.ok("stopVM", json!({}));
    assert!(
        !log_text().contains("sk-ant-oat-OFFLINE1"),
        "a token in the log"
    );
}

/// A helper with a running fake VM and `binary` as SDK `version` under
/// HOME's `.config/Claude/claude-code-vm` (not yet `.verified`).
fn sdk_helper(
    tag: &str,
    version: &str,
    binary: &[u8],
) -> (PathBuf, Arc<FakeLauncher>, Served, Pipe) {
    sdk_helper_within(tag, version, binary, sdk_copy::ANSWER_WITHIN)
}

/// [`sdk_helper`], `installSdk` and runtime spawns waiting `within` for a
/// copy.
fn sdk_helper_within(
    tag: &str,
    version: &str,
    binary: &[u8],
    within: Duration,
) -> (PathBuf, Arc<FakeLauncher>, Served, Pipe) {
    let dir = temp_dir(tag);
    let home = dir.join("home");
    let vdir = home.join(".config/Claude/claude-code-vm").join(version);
    std::fs::create_dir_all(&vdir).unwrap();
    std::fs::write(vdir.join("claude"), binary).unwrap();
    let launcher = Arc::new(FakeLauncher::default());
    let h = try_serve_idle(
        &dir.join("helper.sock"),
        launcher.clone(),
        Some(home),
        EgressConfig::default(),
        None,
        within,
    )
    .unwrap();
    let mut pipe = Pipe::open(&h.socket);
    pipe.ok("startVM", json!({"bundlePath": h.bundle}));
    poll_connected(&h.socket, true);
    (vdir, launcher, h, pipe)
}

#[test]
fn install_sdk_checks_the_host_binary_then_copies_it_into_the_guest() {
    let (vdir, launcher, _served, mut pipe) = sdk_helper("sdk", "2.0.1", b"bin");
    let params = json!({"sdkSubpath": ".config/Claude/claude-code-vm", "version": "2.0.1"});
    let r = pipe.call("installSdk", params.clone());
    assert_eq!(
        r["error"],
        format!("SDK version 2.0.1 not verified at {}", vdir.display())
    );
    std::fs::write(vdir.join(".verified"), b"").unwrap();
    let r = pipe.call("installSdk", params);
    assert!(r.get("error").is_none(), "{r}");
    // The agent got the file's bytes, in order, announced with its hash.
    let (sha, bytes) = launcher.last().sdk.lock().unwrap().clone();
    assert_eq!(bytes, b"bin");
    assert_eq!(
        sha,
        "51a1f05af85e342e3c849b47d387086476282d5f50dc240c19216d6edfb1eb5a"
    );
    pipe.ok("stopVM", json!({}));
}

#[test]
fn install_sdk_retried_after_the_client_gave_up_waits_for_the_transfer_in_flight() {
    // Three chunks at 300 ms each: the first request is mid-transfer when
    // its client goes.
    let binary: Vec<u8> = (0..(10u32 << 20)).map(|i| (i % 251) as u8).collect();
    let (vdir, launcher, h, mut pipe) = sdk_helper("sdk-retry", "2.0.2", &binary);
    std::fs::write(vdir.join(".verified"), b"").unwrap();
    let vm = launcher.last();
    vm.slow_sdk_chunks.store(true, Ordering::SeqCst);
    let params = json!({"sdkSubpath": ".config/Claude/claude-code-vm", "version": "2.0.2"});

    let mut gave_up = Pipe::open(&h.socket);
    gave_up.send("installSdk", params.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.sdk_opens.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the first installSdk never reached the guest"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(gave_up);

    let r = pipe.call("installSdk", params);
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(
        vm.sdk_aborts.load(Ordering::SeqCst),
        0,
        "a second transfer was opened beside the first"
    );
    assert_eq!(
        vm.sdk_opens.load(Ordering::SeqCst),
        1,
        "the retry sent the binary again"
    );
    assert_eq!(
        vm.sdk.lock().unwrap().1,
        binary,
        "the guest has the whole binary"
    );
    pipe.ok("stopVM", json!({}));
}

/// A verified 40 MiB runtime (bytes cycling modulo `modulo`) whose copy
/// takes seconds of 4 MiB chunks, in a helper that waits 300 ms for
/// copies: the binary, its version directory, the launcher, the helper
/// and a pipe to it, with a VM connected.
fn slow_copy_helper(
    tag: &str,
    version: &str,
    modulo: u32,
) -> (Vec<u8>, PathBuf, Arc<FakeLauncher>, Served, Pipe) {
    let binary: Vec<u8> = (0..(40u32 << 20)).map(|i| (i % modulo) as u8).collect();
    let (vdir, launcher, h, pipe) =
        sdk_helper_within(tag, version, &binary, Duration::from_millis(300));
    std::fs::write(vdir.join(".verified"), b"").unwrap();
    (binary, vdir, launcher, h, pipe)
}

/// Spawns the runtime as `id` until the helper no longer says its copy is
/// still running (or 30 s pass): the last answer.
fn spawn_runtime_after_copy(pipe: &mut Pipe, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = pipe.call(
            "spawn",
            json!({"id": id, "name": "s1", "command": "/usr/local/bin/claude"}),
        );
        let err = r["error"].as_str().unwrap_or_default();
        if !err.contains("is still being copied") || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A copy that outlasts the wait: `installSdk` answers with it still
/// running, a spawn of the runtime meanwhile is refused with why, and once
/// the copy is in, the spawn goes to the guest.
#[test]
fn install_sdk_by_a_slow_copy_answers_in_time_and_the_runtime_waits_for_it() {
    // 10 chunks at 300 ms: about 3 s of copy against 300 ms of waiting.
    let (binary, _vdir, launcher, h, mut pipe) = slow_copy_helper("sdk-slow", "2.0.3", 249);
    let vm = launcher.last();
    vm.slow_sdk_chunks.store(true, Ordering::SeqCst);
    let params = json!({"sdkSubpath": ".config/Claude/claude-code-vm", "version": "2.0.3"});
    let t = Instant::now();
    let r = pipe.call("installSdk", params.clone());
    assert!(r.get("error").is_none(), "{r}");
    assert!(
        vm.sdk.lock().unwrap().1.len() < binary.len(),
        "installSdk waited for the whole copy ({:?})",
        t.elapsed()
    );
    let spawn = |pipe: &mut Pipe, id: &str, command: &str| {
        pipe.call(
            "spawn",
            json!({"id": id, "name": "s1", "command": command, "args": ["--version"]}),
        )
    };
    let r = spawn(&mut pipe, "early", "/usr/local/bin/claude");
    let err = r["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        err.contains("2.0.3 is still being copied into the guest"),
        "{r}"
    );
    // Other commands do not wait for the runtime.
    let r = spawn(&mut pipe, "other", "bash");
    assert!(r.get("error").is_none(), "{r}");
    // A retry joins the copy under way: one transfer, never a second.
    let r = pipe.call("installSdk", params);
    assert!(r.get("error").is_none(), "{r}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.sdk.lock().unwrap().1.len() < binary.len() {
        assert!(Instant::now() < deadline, "the copy never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(vm.sdk_opens.load(Ordering::SeqCst), 1);
    assert_eq!(vm.sdk_aborts.load(Ordering::SeqCst), 0);
    // Once the commit is in, the runtime's spawn goes through.
    let r = spawn_runtime_after_copy(&mut pipe, "late");
    assert!(r.get("error").is_none(), "{r}");
    assert!(vm
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|f| f["method"] == "spawn" && f["params"]["id"] == "late"));
    assert!(!vm
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|f| f["method"] == "spawn" && f["params"]["id"] == "early"));
    pipe.ok("stopVM", json!({}));
    drop(h);
}

/// A copy that fails after `installSdk` answered: the runtime's spawn says
/// so, and a new `installSdk` starts a fresh copy.
#[test]
fn a_failed_background_copy_fails_the_runtime_spawn_clearly() {
    let binary: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 247) as u8).collect();
    let (vdir, launcher, _h, mut pipe) =
        sdk_helper_within("sdk-fail", "2.0.4", &binary, Duration::from_millis(100));
    std::fs::write(vdir.join(".verified"), b"").unwrap();
    let vm = launcher.last();
    vm.slow_sdk_chunks.store(true, Ordering::SeqCst);
    vm.failing_sdk_chunks.store(true, Ordering::SeqCst);
    let params = json!({"sdkSubpath": ".config/Claude/claude-code-vm", "version": "2.0.4"});
    let r = pipe.call("installSdk", params.clone());
    assert!(
        r.get("error").is_none(),
        "answered before the copy failed: {r}"
    );
    // Hashing the file and the first chunk take a while: until the copy
    // has failed, the spawn is told it is still running.
    let r = spawn_runtime_after_copy(&mut pipe, "p");
    let err = r["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("2.0.4 could not be copied into the guest") && err.contains("No space left"),
        "{r}"
    );
    // Fixed (the fake's disk has room again): a new install copies.
    vm.failing_sdk_chunks.store(false, Ordering::SeqCst);
    vm.slow_sdk_chunks.store(false, Ordering::SeqCst);
    let r = pipe.call("installSdk", params);
    assert!(r.get("error").is_none(), "{r}");
    // The spawn waits for the copy (or is told it runs still).
    let r = spawn_runtime_after_copy(&mut pipe, "q");
    assert!(r.get("error").is_none(), "{r}");
    assert!(
        vm.sdk.lock().unwrap().1 == binary,
        "the guest has not the whole binary"
    );
    pipe.ok("stopVM", json!({}));
}

/// While one version is being copied, an `installSdk` of another answers
/// within the wait, with why, instead of queueing behind the copy.
#[test]
fn install_sdk_of_another_version_during_a_copy_answers_in_time() {
    let (_binary, vdir, launcher, _h, mut pipe) = slow_copy_helper("sdk-busy", "2.0.5", 245);
    let other = vdir.parent().unwrap().join("2.0.6");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("claude"), b"other").unwrap();
    std::fs::write(other.join(".verified"), b"").unwrap();
    let vm = launcher.last();
    vm.slow_sdk_chunks.store(true, Ordering::SeqCst);
    let sub = ".config/Claude/claude-code-vm";
    let r = pipe.call("installSdk", json!({"sdkSubpath": sub, "version": "2.0.5"}));
    assert!(r.get("error").is_none(), "{r}");
    let t = Instant::now();
    let r = pipe.call("installSdk", json!({"sdkSubpath": sub, "version": "2.0.6"}));
    let err = r["error"].as_str().unwrap_or_default();
    assert!(err.contains("another SDK install is under way"), "{r}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "it waited for the copy: {:?}",
        t.elapsed()
    );
    // Once the first copy is in, the other version installs.
    let r = spawn_runtime_after_copy(&mut pipe, "first");
    assert!(r.get("error").is_none(), "{r}");
    vm.slow_sdk_chunks.store(false, Ordering::SeqCst);
    let r = pipe.call("installSdk", json!({"sdkSubpath": sub, "version": "2.0.6"}));
    assert!(r.get("error").is_none(), "{r}");
    assert!(vm.sdk.lock().unwrap().1 == b"other");
    pipe.ok("stopVM", json!({}));
}

/// A copy that failed within the wait is `installSdk`'s error, and that is
/// the end of it: a later spawn of the runtime is not refused for it (the
/// guest runs what it has).
#[test]
fn a_copy_failure_the_client_was_told_does_not_block_the_runtime() {
    let (vdir, launcher, _h, mut pipe) = sdk_helper("sdk-told", "2.0.7", b"bin");
    std::fs::write(vdir.join(".verified"), b"").unwrap();
    let vm = launcher.last();
    vm.failing_sdk_chunks.store(true, Ordering::SeqCst);
    let r = pipe.call(
        "installSdk",
        json!({"sdkSubpath": ".config/Claude/claude-code-vm", "version": "2.0.7"}),
    );
    let err = r["error"].as_str().unwrap_or_default();
    assert!(err.contains("No space left"), "{r}");
    let r = pipe.call(
        "spawn",
        json!({"id": "after", "name": "s1", "command": "/usr/local/bin/claude"}),
    );
    assert!(r.get("error").is_none(), "{r}");
    pipe.ok("stopVM", json!({}));
}

/// The VM stops while a copy answered as under way runs: in the next VM a
/// spawn of the runtime is refused (what the guest has is not what the
/// client was told) until `installSdk` runs again.
#[test]
fn a_copy_cut_by_a_vm_stop_refuses_the_runtime_in_the_next_vm() {
    let (binary, _vdir, launcher, h, mut pipe) = slow_copy_helper("sdk-cut", "2.0.8", 243);
    launcher
        .last()
        .slow_sdk_chunks
        .store(true, Ordering::SeqCst);
    let params = json!({"sdkSubpath": ".config/Claude/claude-code-vm", "version": "2.0.8"});
    let r = pipe.call("installSdk", params.clone());
    assert!(r.get("error").is_none(), "{r}");
    pipe.ok("stopVM", json!({}));
    pipe.ok("startVM", json!({"bundlePath": h.bundle}));
    poll_connected(&h.socket, true);
    let spawn = |pipe: &mut Pipe, id: &str| {
        pipe.call(
            "spawn",
            json!({"id": id, "name": "s1", "command": "/usr/local/bin/claude"}),
        )
    };
    let r = spawn(&mut pipe, "stale");
    let err = r["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("2.0.8 was still being copied when the VM stopped"),
        "{r}"
    );
    // The cut copy's task ends when it next asks the gone agent (after
    // hashing the file); until then the guest is busy.
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = pipe.call("installSdk", params.clone());
        let err = r["error"].as_str().unwrap_or_default();
        if !err.contains("another SDK install is under way") || Instant::now() > deadline {
            break r;
        }
    };
    assert!(r.get("error").is_none(), "{r}");
    let r = spawn_runtime_after_copy(&mut pipe, "fresh");
    assert!(r.get("error").is_none(), "{r}");
    assert!(launcher.last().sdk.lock().unwrap().1 == binary);
    pipe.ok("stopVM", json!({}));
}

#[test]
fn stale_socket_is_replaced_and_a_live_helper_is_not() {
    let dir = temp_dir("stale");
    let sock = dir.join("helper.sock");
    // A socket file nobody listens on (a helper that died).
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let h = try_serve(&sock, Arc::default(), None).expect("a stale socket is replaced");
    assert!(!is_running(&sock));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let err = try_serve(&sock, Arc::default(), None)
        .err()
        .expect("refused");
    assert_eq!(err, format!("another helper is serving {}", sock.display()));
    // The first helper is untouched.
    assert!(!is_running(&sock));

    // A regular file is never deleted.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let err = try_serve(&file, Arc::default(), None).err().unwrap();
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    drop(h);
    assert!(
        !sock.exists(),
        "the helper removes its socket when it stops"
    );

    // A missing directory is created 0700.
    let deep = temp_dir("mkdir").join("a/b");
    let h = try_serve(&deep.join("s.sock"), Arc::default(), None).unwrap();
    assert_eq!(
        std::fs::metadata(&deep).unwrap().permissions().mode() & 0o777,
        0o700
    );
    drop(h);
}

#[test]
fn a_peer_with_another_uid_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        coworkvm_tests::skip_or_fail("needs root (to connect as another uid)");
        return;
    }
    let h = serve("peercred");
    use std::os::unix::fs::PermissionsExt;
    // Open the path up so that only SO_PEERCRED stands in the way.
    std::fs::set_permissions(&h.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&h.socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    // Everything the child needs is made before fork (no allocation after).
    let path = std::ffi::CString::new(h.socket.to_str().unwrap()).unwrap();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes_with_nul()) {
        *d = *s as libc::c_char;
    }
    let frame = encode_frame(&json!({"method": "isRunning"})).unwrap();
    let nobody = 65534;
    // SAFETY: the child only makes raw syscalls on data prepared above, then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: async-signal-safe calls only; the process ends in _exit.
        unsafe {
            let code = (|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(nobody) != 0
                    || libc::setuid(nobody) != 0
                {
                    return 10;
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    return 11;
                }
                let tv = libc::timeval {
                    tv_sec: 5,
                    tv_usec: 0,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                if libc::connect(
                    fd,
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_un>() as u32,
                ) != 0
                {
                    return 12; // could not even connect: not what this test is about
                }
                libc::write(fd, frame.as_ptr() as *const libc::c_void, frame.len());
                let mut buf = [0u8; 64];
                let n = libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
                if n <= 0 {
                    0
                } else {
                    13
                } // 0: closed without a reply
            })();
            libc::_exit(code);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status));
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the other uid got a reply (13) or could not connect (12)"
    );
    assert!(log_text().contains("refused a connection from uid 65534"));
    // Still serving its own uid.
    assert!(!is_running(&h.socket));
}

// ---------------------------------------------------------------------------
// Issue 11: the agent channel and the helper's bounds.

/// A process in the guest dials the agent's port after the agent: the
/// helper closes that connection on arrival, never hands it the next
/// spawn, and nothing it sends (a forged `exit`, `stdout`) reaches the
/// client.
#[test]
fn a_second_agent_connection_never_replaces_the_first_and_is_not_heard() {
    let h = serve("hijack");
    let sock = &h.socket;
    let mut pipe = Pipe::open(sock);
    let mut sub = Subscriber::open(sock);
    pipe.ok("startVM", json!({"bundlePath": h.bundle}));
    poll_connected(sock, true);
    pipe.ok(
        "spawn",
        json!({"id": "victim", "name": "s1", "command": "cat", "isResume": false}),
    );
    sub.until("stdout victim", |e| {
        e["type"] == "stdout" && e["id"] == "victim"
    });

    let spec = h.launcher.specs.lock().unwrap()[0].clone();
    let port = PathBuf::from(format!("{}_{AGENT_VSOCK_PORT}", spec.vsock().display()));
    let mut hijackers = Vec::new();
    for _ in 0..16 {
        let mut s = UnixStream::connect(&port).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for f in [
            json!({"type": "event", "event": "ready"}),
            json!({"type": "event", "event": "exit",
                   "params": {"id": "victim", "code": 0, "signal": null}}),
            json!({"type": "event", "event": "stdout",
                   "params": {"id": "victim", "data": "FORGED"}}),
        ] {
            // The helper may have closed it already: then the write fails.
            let _ = write_frame(&mut s, &f);
        }
        hijackers.push(s);
    }
    // Each is closed by the helper without a byte.
    for s in &mut hijackers {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a second agent connection got {other:?}"),
        }
    }
    // The agent still serves: the next spawn goes to it, its output comes.
    pipe.ok(
        "spawn",
        json!({"id": "p2", "name": "s1", "command": "echo", "isResume": false,
               "env": {"SECRET": "s3cr3t"}}),
    );
    sub.until("exit p2", |e| e["type"] == "exit" && e["id"] == "p2");
    let vm = h.launcher.last();
    assert_eq!(
        vm.methods().iter().filter(|m| *m == "spawn").count(),
        2,
        "{:?}",
        vm.methods()
    );
    assert!(
        !sub.seen
            .iter()
            .any(|e| e["data"] == "FORGED" || (e["type"] == "exit" && e["id"] == "victim")),
        "a forged event reached the client: {:?}",
        sub.seen
    );
    assert_eq!(
        pipe.ok("isProcessRunning", json!({"id": "victim"})),
        json!({"running": true})
    );
    let text = log_text();
    assert!(
        text.contains("refused another connection on the guest agent's port"),
        "{text}"
    );
    assert!(!text.contains("reconnected"), "{text}");
    pipe.ok("stopVM", json!({}));
}

/// One subscriber never reads while 12 MiB of output flows (the tests'
/// budget is 4 MiB): it is dropped, its connection closed, and the
/// subscriber that reads gets every event.
#[test]
fn an_idle_subscriber_over_its_byte_budget_is_dropped_and_a_busy_one_keeps_its_events() {
    let h = serve("budget");
    let sock = &h.socket;
    let mut pipe = Pipe::open(sock);
    let mut idle = Subscriber::open(sock);
    let mut busy = Subscriber::open(sock);
    pipe.ok("startVM", json!({"bundlePath": h.bundle}));
    poll_connected(sock, true);
    let count = 12usize;
    let len = 1usize << 20;
    assert!(count * len > 2 * EVENT_BUDGET);
    pipe.ok(
        "spawn",
        json!({"id": "f", "name": "s", "command": "flood", "isResume": false,
               "args": [count.to_string(), len.to_string()]}),
    );
    let mut got = 0;
    loop {
        let e = busy.next();
        busy.seen.clear(); // 12 MiB need not stay
        if e["type"] == "stdout" && e["id"] == "f" {
            if e["data"] == "end" {
                break;
            }
            assert_eq!(e["seq"], got, "in order, none lost");
            got += 1;
        }
    }
    assert_eq!(got, count, "the busy subscriber got every event");
    // The idle one: what its socket held, then the end.
    let mut idle_got = 0;
    while let Some(e) = recv(&mut idle.s) {
        if e["type"] == "stdout" && e["data"] == "end" {
            panic!("the idle subscriber was not dropped");
        }
        idle_got += 1;
    }
    assert!(idle_got < count, "{idle_got}");
    assert!(
        log_text().contains("fell over"),
        "the drop is logged: {}",
        log_text()
    );
    // It resubscribes and is told the current state.
    let mut again = Subscriber::open(sock);
    assert_eq!(again.next()["type"], "networkStatus");
    pipe.ok("stopVM", json!({}));
}

/// The agent stops reading while writeStdin floods it: stopVM still
/// answers within its bound (the shutdown request's send times out, then
/// SIGTERM), and so does a query on another connection meanwhile.
#[test]
fn stop_vm_returns_within_its_bound_when_the_agent_stops_reading() {
    let h = serve("hung");
    let sock = h.socket.clone();
    let mut pipe = Pipe::open(&sock);
    pipe.ok("startVM", json!({"bundlePath": h.bundle}));
    poll_connected(&sock, true);
    pipe.ok(
        "spawn",
        json!({"id": "p", "name": "s", "command": "cat", "isResume": false}),
    );
    let vm = h.launcher.last();
    vm.stop_reading.store(true, Ordering::SeqCst);
    // 600 x 64 KiB of stdin: more than the socket, the write queue (256
    // frames) and the requests in flight (32) hold together.
    let chunk = "z".repeat(64 * 1024);
    let (full_tx, full_rx) = std::sync::mpsc::channel();
    let flooder = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let s = UnixStream::connect(&sock).unwrap();
            let mut r = s.try_clone().unwrap();
            // Replies are read as they come: the first "not reading" one
            // says the agent's queue is full.
            std::thread::spawn(move || {
                let _ = r.set_read_timeout(Some(Duration::from_secs(120)));
                while let Some(reply) = recv(&mut r) {
                    let e = reply["error"].as_str().unwrap_or("");
                    if e.contains("not reading") {
                        let _ = full_tx.send(e.to_string());
                    }
                }
            });
            let mut s = s;
            for i in 0..600 {
                let f =
                    json!({"method": "writeStdin", "id": i, "params": {"id": "p", "data": chunk}});
                if write_frame(&mut s, &f).is_err() {
                    return;
                }
            }
        })
    };
    let e = full_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("writeStdin fails once the agent's queue is full");
    assert_eq!(
        e,
        "the guest agent is not reading (no room to send within 5s)"
    );
    assert!(is_running(&sock), "queries still answer");
    let t = Instant::now();
    let mut s = connect(&sock);
    s.set_read_timeout(Some(
        coworkvm_helper::vm::STOP_VM_BOUND + Duration::from_secs(5),
    ))
    .unwrap();
    write_frame(&mut s, &json!({"method": "stopVM", "params": {}})).unwrap();
    let r = recv(&mut s).expect("stopVM answers");
    let took = t.elapsed();
    assert_eq!(r["success"], true, "{r}");
    assert!(
        took <= coworkvm_helper::vm::STOP_VM_BOUND,
        "stopVM took {took:?}"
    );
    assert!(!is_running(&sock));
    let text = log_text();
    assert!(
        text.contains("stopVM: shutdown request: the guest agent is not reading"),
        "the shutdown request found the queue full: {:?}",
        text.lines()
            .filter(|l| l.contains("stopVM") || l.contains("VM exited"))
            .collect::<Vec<_>>()
    );
    drop(flooder);
}

/// An agent that does not advertise the session sandbox gets no spawn.
#[test]
fn spawn_is_refused_when_the_agent_has_no_sandbox() {
    let h = serve("nosandbox");
    let sock = &h.socket;
    h.launcher.no_sandbox.store(true, Ordering::SeqCst);
    let mut pipe = Pipe::open(sock);
    pipe.ok("startVM", json!({"bundlePath": h.bundle}));
    poll_connected(sock, true);
    let r = pipe.call(
        "spawn",
        json!({"id": "p", "name": "s", "command": "echo", "isResume": false,
               "env": {"SECRET": "x"}}),
    );
    assert_eq!(r["success"], false, "{r}");
    assert_eq!(
        r["error"],
        "refusing to spawn: the guest agent did not advertise the session sandbox \
         (capability \"sandbox\"), so the process would run unsandboxed"
    );
    let vm = h.launcher.last();
    assert!(
        !vm.methods().contains(&"spawn".to_string()),
        "{:?}",
        vm.methods()
    );
    pipe.ok("stopVM", json!({}));
}

/// The real launcher hands the VMM its launch configuration on an
/// inherited descriptor (`boot --config-fd N`), and in it the boot files
/// as inherited descriptors: the same open files the image source opened
/// (no path to resolve again), disks by role, the session disk read-write
/// and the rest read-only. The "VMM" here is a script that reports what
/// it got.
#[test]
fn the_launcher_passes_a_typed_config_and_the_boot_files_as_inherited_descriptors() {
    use coworkvm_helper::vm::ProcessLauncher;
    use coworkvm_vmm::boot_file::FileArg;
    use coworkvm_vmm::config::{DiskRole, LaunchConfig};
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("fdpass");
    let script = dir.join("fake-vmm");
    let (config_out, fds_out) = (dir.join("config.json"), dir.join("fds"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1 $2\" = \"boot --config-fd\" ] || exit 9\n\
             cat /proc/$$/fd/$3 > {config}\n\
             for p in /proc/$$/fd/*; do n=${{p##*/}}; \
             echo \"$n $(readlink $p) $(grep flags /proc/$$/fdinfo/$n | tr -d '\\t')\"; \
             done > {fds}\n",
            config = config_out.display(),
            fds = fds_out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bundle = make_bundle(&dir);
    let images = BundleFiles.prepare(&bundle, Some(1)).unwrap();
    let spec = LaunchSpec::bundle(
        images,
        1,
        128,
        dir.join("vsock.sock"),
        dir.join("console.log"),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let how = rt.block_on(async {
        let launcher = ProcessLauncher {
            exe: script,
            inherit_stderr: false,
        };
        let vm = launcher.launch(&spec).unwrap();
        vm.exited.await.unwrap()
    });
    assert_eq!(how, "exit status: 0");
    let config: LaunchConfig =
        serde_json::from_slice(&std::fs::read(&config_out).unwrap()).unwrap();
    assert_eq!(
        config, spec.config,
        "the VMM reads what the helper validated"
    );
    assert_eq!(
        config.cmdline,
        "quiet coworkvm.rootfs=vda coworkvm.sessions=vdb"
    );
    let fds = std::fs::read_to_string(&fds_out).unwrap();
    let fd_line = |n: i32| {
        fds.lines()
            .find(|l| l.split(' ').next() == Some(&n.to_string()))
            .unwrap_or_else(|| panic!("fd {n} not inherited: {fds}"))
            .to_owned()
    };
    let fd_of = |f: &FileArg| match f {
        FileArg::Fd(n) => *n,
        FileArg::Path(p) => panic!("a path reached the VMM: {}", p.display()),
    };
    let mut files = vec![
        ("vmlinuz", fd_of(&config.kernel), true),
        ("initrd.img", fd_of(config.initrd.as_ref().unwrap()), true),
    ];
    let roles: Vec<DiskRole> = config.disks.iter().map(|d| d.role).collect();
    assert_eq!(roles, [DiskRole::Rootfs, DiskRole::Sessions]);
    files.push(("rootfs.img", fd_of(&config.disks[0].file), true));
    files.push(("sessiondata.img", fd_of(&config.disks[1].file), false));
    assert!(config.disks[0].read_only && !config.disks[1].read_only);
    for (file, fd, ro) in files {
        let line = fd_line(fd);
        let path = bundle.join(file);
        assert!(line.contains(&format!(" {} ", path.display())), "{line}");
        // fdinfo flags are octal: O_RDWR is 02, O_RDONLY 00.
        let flags = line.rsplit("flags:").next().unwrap().trim();
        let mode = u32::from_str_radix(flags, 8).unwrap() & 0o3;
        assert_eq!(mode, if ro { 0 } else { 2 }, "{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A VM the VMM would refuse is refused before anything is started, with
/// the VMM's own reason: 64 vCPUs, no memory.
#[test]
fn start_vm_refuses_what_the_vmm_would_refuse_before_it_forks() {
    let h = serve("limits");
    let mut pipe = Pipe::open(&h.socket);
    let r = pipe.call("startVM", json!({"bundlePath": h.bundle, "cpuCount": 64}));
    assert_eq!(r["success"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("vCPUs must be between 1 and 32, got 64"), "{e}");
    let r = pipe.call("startVM", json!({"bundlePath": h.bundle, "memoryGB": 0}));
    assert_eq!(r["success"], false, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("guest memory must be between"), "{e}");
    assert!(
        h.launcher.specs.lock().unwrap().is_empty(),
        "nothing was launched"
    );
    assert!(!is_running(&h.socket));
}

/// The idle exit (`serve --idle-exit`, socket activation's) waits for the
/// VM: a client that started one over a one-shot connection and went away
/// leaves a VM running, which must keep the helper up; once it stops, the
/// helper stops too, and removes the socket it bound.
#[test]
fn the_idle_exit_waits_while_a_vm_runs() {
    let dir = temp_dir("idle-exit");
    let sock = dir.join("helper.sock");
    let mut h = try_serve_idle(
        &sock,
        Arc::default(),
        None,
        EgressConfig::default(),
        Some(Duration::from_millis(300)),
        sdk_copy::ANSWER_WITHIN,
    )
    .unwrap();
    let bundle = h.bundle.to_str().unwrap().to_string();
    let r = one_shot(&sock, "startVM", json!({"bundlePath": bundle}));
    assert_eq!(r["success"], true, "{r}");
    poll_connected(&sock, true);
    // No connection open, a VM running: well past the idle period, it
    // still serves.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !h.thread.as_ref().unwrap().is_finished(),
        "stopped with a VM running"
    );
    assert!(is_running(&sock));
    let r = one_shot(&sock, "stopVM", json!({}));
    assert_eq!(r["success"], true, "{r}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.thread.as_ref().unwrap().is_finished() {
        assert!(
            Instant::now() < deadline,
            "no idle exit after the VM stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    h.thread.take().unwrap().join().unwrap();
    assert!(!sock.exists(), "the socket it bound goes with it");
    assert!(log_text().contains("idle for 0.3 s"), "{}", log_text());
}
