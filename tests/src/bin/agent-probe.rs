//! Drives coworkvm-agent over the guest protocol from the host side, the way
//! the helper will: starts the VMM given after `--`, accepts the agent on
//! `<uds>_51234`, and checks concurrency, kill, readFile, unknown methods
//! and how fast a dying guest's connection drop is seen.
//!
//! usage: agent-probe UDS -- COWORKVM-COMMAND...
//!        agent-probe --bench [--mib N] UDS -- COWORKVM-COMMAND...
//!        agent-probe --serial-bench [--mib N] SOCK -- QEMU-COMMAND...
//!
//! `--bench` measures the agent path (ready time, spawn latency, N MiB
//! each way through a process's stdout and stdin). `--serial-bench` is the
//! reference for the same payloads over QEMU's virtio-serial: QEMU's
//! `-chardev socket,path=SOCK` connects here, the guest of
//! `tests/guest/serial-bench.init` writes N MiB into the port and reads N
//! MiB back from it.

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use coworkvm_tests::process::kvm_debugfs_exits;
use serde_json::{json, Value};
use socket_proto::frame::{read_frame, write_frame};
use socket_proto::guest::{GuestEvent, GuestFrame};

struct Agent {
    w: UnixStream,
    rx: Receiver<Option<GuestFrame>>,
    next_id: u64,
    /// Events seen while waiting for something else.
    backlog: Vec<GuestEvent>,
}

impl Agent {
    fn request(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        write_frame(
            &mut self.w,
            &GuestFrame::request(id.clone(), method, params),
        )
        .map_err(|e| e.to_string())?;
        loop {
            match self.next(Duration::from_secs(60))? {
                GuestFrame::Response {
                    id: rid,
                    result,
                    error,
                } if rid.0 == id => {
                    return match error {
                        Some(e) => Err(serde_json::to_string(&e).unwrap_or_default()),
                        None => Ok(result.unwrap_or(Value::Null)),
                    };
                }
                GuestFrame::Event { event, params } => {
                    if let Ok(ev) = GuestEvent::parse(&event, params) {
                        self.backlog.push(ev);
                    }
                }
                _ => {}
            }
        }
    }

    fn next(&mut self, timeout: Duration) -> Result<GuestFrame, String> {
        match self.rx.recv_timeout(timeout) {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err("connection closed".into()),
            Err(_) => Err("timed out waiting for the agent".into()),
        }
    }

    fn next_event(&mut self, timeout: Duration) -> Result<GuestEvent, String> {
        if !self.backlog.is_empty() {
            return Ok(self.backlog.remove(0));
        }
        loop {
            if let GuestFrame::Event { event, params } = self.next(timeout)? {
                return GuestEvent::parse(&event, params).map_err(|e| e.to_string());
            }
        }
    }
}

#[derive(Default, Debug)]
struct Outcome {
    stdout: String,
    stderr: String,
    exit: Option<(Option<i32>, Option<Value>)>,
}

/// Collects events until every id in `ids` has exited.
fn collect(agent: &mut Agent, ids: &[String]) -> Result<HashMap<String, Outcome>, String> {
    let mut out: HashMap<String, Outcome> = ids
        .iter()
        .map(|i| (i.clone(), Outcome::default()))
        .collect();
    while out.values().any(|o| o.exit.is_none()) {
        match agent.next_event(Duration::from_secs(60))? {
            GuestEvent::Stdout { id, data } => out.entry(id).or_default().stdout.push_str(&data),
            GuestEvent::Stderr { id, data } => out.entry(id).or_default().stderr.push_str(&data),
            GuestEvent::Exit {
                id, code, signal, ..
            } => {
                out.entry(id).or_default().exit = Some((code, signal));
            }
            _ => {}
        }
    }
    Ok(out)
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    println!("@@AGENT {} {what}", if ok { "pass" } else { "FAIL" });
    if ok {
        Ok(())
    } else {
        Err(what.to_string())
    }
}

fn session(agent: &mut Agent) -> Result<(), String> {
    let info = agent.request("agent.info", json!({}))?;
    check(
        info["agent"] == "coworkvm-agent" && info["protocol"] == 1,
        "agent.info",
    )?;

    // 20 concurrent processes, each with its own output and exit code.
    let ids: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        agent.request(
            "spawn",
            json!({"id": id, "name": "s1", "command": "sh", "isResume": false,
                   "args": ["-c", format!("echo out-{i}; echo err-{i} >&2; exit {i}")]}),
        )?;
    }
    let got = collect(agent, &ids)?;
    let all_ok = ids.iter().enumerate().all(|(i, id)| {
        let o = &got[id];
        o.stdout == format!("out-{i}\n")
            && o.stderr == format!("err-{i}\n")
            && o.exit.as_ref().map(|e| e.0) == Some(Some(i as i32))
    });
    if !all_ok {
        println!("@@AGENT detail {got:?}");
    }
    check(
        all_ok,
        "20 concurrent spawns: own output and exit code, nothing crossed",
    )?;

    // kill reaches the whole process group.
    agent.request(
        "spawn",
        json!({"id": "k", "name": "s1", "command": "sh", "isResume": false,
               "args": ["-c", "sleep 1000 & echo started; sleep 1000"]}),
    )?;
    loop {
        if let GuestEvent::Stdout { id, .. } = agent.next_event(Duration::from_secs(60))? {
            if id == "k" {
                break;
            }
        }
    }
    let running = agent.request("isProcessRunning", json!({"id": "k"}))?;
    check(running["running"] == true, "isProcessRunning while it runs")?;
    agent.request("kill", json!({"id": "k", "signal": "SIGKILL"}))?;
    let got = collect(agent, &["k".to_string()])?;
    let sig = got["k"].exit.clone().and_then(|e| e.1);
    check(
        sig == Some(json!("SIGKILL")),
        "kill ends it with the signal reported",
    )?;
    let running = agent.request("isProcessRunning", json!({"id": "k"}))?;
    check(running["running"] == false, "isProcessRunning after kill")?;
    agent.request(
        "spawn",
        json!({"id": "ps", "name": "s1", "command": "sh", "isResume": false,
               "args": ["-c", "ps | grep -c '[s]leep 1000'"]}),
    )?;
    let got = collect(agent, &["ps".to_string()])?;
    check(
        got["ps"].stdout.trim() == "0",
        "the killed process's children are gone too",
    )?;

    // readFile stays inside /sessions/<name>.
    agent.request(
        "spawn",
        json!({"id": "w", "name": "s1", "command": "sh", "isResume": false,
               "args": ["-c", "mkdir -p /sessions/s1 && printf hello > /sessions/s1/f"]}),
    )?;
    collect(agent, &["w".to_string()])?;
    let f = agent.request(
        "readFile",
        json!({"processName": "s1", "filePath": "/sessions/s1/f"}),
    )?;
    check(
        f["content"] == "aGVsbG8=",
        "readFile returns base64 of the file",
    )?;
    let escape = agent.request(
        "readFile",
        json!({"processName": "s1", "filePath": "/sessions/s1/../../proc/version"}),
    );
    check(
        escape.is_err(),
        "readFile refuses a path outside the session",
    )?;
    let unknown = agent.request("frobnicate", json!({}));
    check(
        unknown.as_ref().is_err_and(|e| e.contains("-32601")),
        "unknown method answered with -32601",
    )?;

    // The guest dies: its connection must drop promptly.
    agent.request(
        "spawn",
        json!({"id": "die", "name": "s1", "command": "sh", "isResume": false,
               "args": ["-c", "echo bye; sleep 0.2; echo c > /proc/sysrq-trigger"]}),
    )?;
    loop {
        if let GuestEvent::Stdout { id, .. } = agent.next_event(Duration::from_secs(60))? {
            if id == "die" {
                break;
            }
        }
    }
    let t0 = Instant::now();
    loop {
        match agent.next(Duration::from_secs(60)) {
            Ok(_) => continue,
            Err(e) if e == "connection closed" => break,
            Err(e) => return Err(e),
        }
    }
    println!(
        "@@AGENT drop-seen-ms {}",
        t0.elapsed().as_millis().saturating_sub(200)
    );
    check(true, "connection drop seen after the guest died")
}

/// Measures the agent path: spawn latency, stdout and stdin throughput.
fn bench_session(agent: &mut Agent, ready: Duration, mib: u64, vmm_pid: u32) -> Result<(), String> {
    let mut lat = Vec::new();
    for i in 0..100 {
        let id = format!("l{i}");
        let t = Instant::now();
        agent.request(
            "spawn",
            json!({"id": id, "name": "b", "command": "echo", "args": ["x"], "isResume": false}),
        )?;
        loop {
            if let GuestEvent::Stdout { id: eid, .. } = agent.next_event(Duration::from_secs(60))? {
                if eid == id {
                    break;
                }
            }
        }
        lat.push(t.elapsed().as_micros() as u64);
        collect(agent, &[id])?;
    }
    lat.sort_unstable();
    let median_us = (lat[49] + lat[50]) / 2;

    // Guest -> host: N MiB of text on stdout.
    let out_bytes: u64 = mib << 20;
    let guest_before = guest_cpu(agent)?;
    let vmm_before = thread_cpu(vmm_pid);
    let exits_before = kvm_debugfs_exits(vmm_pid);
    let probe_before = thread_cpu(std::process::id());
    let t = Instant::now();
    agent.request(
        "spawn",
        json!({"id": "out", "name": "b", "command": "sh", "isResume": false,
               "args": ["-c", format!("{} | head -c {out_bytes}", payload_sh())]}),
    )?;
    let mut got = 0u64;
    let mut frames = 0u64;
    loop {
        match agent.next_event(Duration::from_secs(600))? {
            GuestEvent::Stdout { id, data } if id == "out" => {
                got += data.len() as u64;
                frames += 1;
            }
            GuestEvent::Exit { id, .. } if id == "out" => break,
            _ => {}
        }
    }
    let out_s = t.elapsed().as_secs_f64();
    let vmm_cpu = cpu_delta(&vmm_before, &thread_cpu(vmm_pid));
    let exits = exits_delta(exits_before, kvm_debugfs_exits(vmm_pid));
    let probe_cpu = cpu_delta(&probe_before, &thread_cpu(std::process::id()));
    let guest_after = guest_cpu(agent)?;
    if got != out_bytes {
        return Err(format!("stdout: got {got} of {out_bytes} bytes"));
    }
    // Where the stdout transfer's CPU went (ms): in the rig everything
    // shares L1's one vCPU, so these add up to about the wall time.
    let split = json!({
        "wall": (out_s * 1000.0) as u64,
        "vmm_vcpus": vmm_cpu.0,
        "vmm_vsock_worker": vmm_cpu.1,
        "vmm_other": vmm_cpu.2,
        "host_reader": probe_cpu.0 + probe_cpu.1 + probe_cpu.2,
        "guest_agent": guest_after.0.saturating_sub(guest_before.0),
        "guest_busy": guest_after.1.saturating_sub(guest_before.1),
        "vm_exits": exits,
        "frames": frames,
    });
    println!("@@BENCH-SPLIT {split}");

    // Host -> guest: N MiB through stdin into `wc -c`.
    const IN_CHUNK: usize = 64 * 1024;
    let in_chunks = (out_bytes as usize) / IN_CHUNK;
    agent.request(
        "spawn",
        json!({"id": "in", "name": "b", "command": "wc", "args": ["-c"], "isResume": false}),
    )?;
    let chunk = "b".repeat(IN_CHUNK);
    let t = Instant::now();
    for i in 0..in_chunks {
        let frame = GuestFrame::Notification {
            method: "stdin".into(),
            params: json!({"id": "in", "data": chunk, "eof": i + 1 == in_chunks}),
        };
        write_frame(&mut agent.w, &frame).map_err(|e| e.to_string())?;
    }
    let counted = collect(agent, &["in".to_string()])?;
    let in_s = t.elapsed().as_secs_f64();
    let in_bytes = (IN_CHUNK * in_chunks) as u64;
    if counted["in"].stdout.trim() != in_bytes.to_string() {
        return Err(format!("stdin: wc counted {:?}", counted["in"].stdout));
    }
    println!(
        "@@BENCH {}",
        json!({
            "ready_ms": ready.as_millis() as u64,
            "spawn_first_stdout_median_us": median_us,
            "spawn_first_stdout_min_us": lat[0],
            "spawn_first_stdout_max_us": lat[99],
            "mib": mib,
            "stdout_mib_s": (out_bytes as f64 / (1 << 20) as f64) / out_s,
            "stdin_mib_s": (in_bytes as f64 / (1 << 20) as f64) / in_s,
        })
    );
    agent.request("shutdown", json!({})).ok();
    Ok(())
}

/// The stdout payload both benchmark paths send: 64-byte lines of text
/// (before `| head -c N`).
fn payload_sh() -> String {
    format!("yes {}", "a".repeat(63))
}

/// CPU time (ms) of a process's threads since they started: (vCPU
/// threads, coworkvm's vsock worker, the rest). vCPU threads are coworkvm's
/// `vcpuN` and QEMU's `CPU N/KVM`; their time includes the guest's.
fn thread_cpu(pid: u32) -> (u64, u64, u64) {
    let mut out = (0, 0, 0);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let f: Vec<u64> = stat[close + 1..]
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // Fields 14 and 15 of stat(5): utime, stime, in clock ticks (100/s).
        let ms = (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) * 10;
        if comm.starts_with("vcpu") || comm.starts_with("CPU ") {
            out.0 += ms;
        } else if comm == "virtio-vsock" {
            out.1 += ms;
        } else {
            out.2 += ms;
        }
    }
    out
}

fn exits_delta(a: Option<u64>, b: Option<u64>) -> serde_json::Value {
    match (a, b) {
        (Some(a), Some(b)) => json!(b.saturating_sub(a)),
        _ => serde_json::Value::Null,
    }
}

fn cpu_delta(a: &(u64, u64, u64), b: &(u64, u64, u64)) -> (u64, u64, u64) {
    (
        b.0.saturating_sub(a.0),
        b.1.saturating_sub(a.1),
        b.2.saturating_sub(a.2),
    )
}

/// The guest's view (ms): CPU time of the agent (PID 1), and the busy time
/// of all guest CPUs together.
fn guest_cpu(agent: &mut Agent) -> Result<(u64, u64), String> {
    let id = format!("cpu{}", agent.next_id);
    agent.request(
        "spawn",
        json!({"id": id, "name": "b", "command": "sh", "isResume": false,
               "args": ["-c", "cat /proc/1/stat; head -n 1 /proc/stat"]}),
    )?;
    let got = collect(agent, std::slice::from_ref(&id))?;
    let text = &got[&id].stdout;
    let mut lines = text.lines();
    let agent_ms = lines
        .next()
        .and_then(|l| l.rfind(')').map(|i| &l[i + 1..]))
        .map(|rest| {
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) * 10
        })
        .unwrap_or(0);
    // cpu  user nice system idle iowait irq softirq steal ...
    let busy_ms = lines
        .next()
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            [0, 1, 2, 5, 6, 7]
                .iter()
                .map(|&i| f.get(i).copied().unwrap_or(0))
                .sum::<u64>()
                * 10
        })
        .unwrap_or(0);
    Ok((agent_ms, busy_ms))
}

/// The reference path: QEMU's virtio-serial port, raw bytes both ways.
fn serial_bench(sock: &str, mib: u64, cmd: &[String]) -> Result<(), String> {
    use std::io::{BufRead, Read, Write};
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock).map_err(|e| format!("bind {sock}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut vmm = Command::new(&cmd[0])
        .args(&cmd[1..])
        .spawn()
        .map_err(|e| format!("start {}: {e}", cmd[0]))?;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Ok(Some(st)) = vmm.try_wait() {
                    return Err(format!("QEMU exited ({st}) before connecting"));
                }
                if started.elapsed() > Duration::from_secs(60) {
                    let _ = vmm.kill();
                    return Err("QEMU did not connect its chardev".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = std::io::BufReader::with_capacity(256 * 1024, stream);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        let _ = vmm.kill();
        return Err(format!("guest said {line:?}, not ready"));
    }
    let ready = started.elapsed();
    let bytes = mib << 20;

    // Guest -> host.
    let before = thread_cpu(vmm.id());
    let exits_before = kvm_debugfs_exits(vmm.id());
    let probe_before = thread_cpu(std::process::id());
    let t = Instant::now();
    writeln!(w, "{bytes}").map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        match r.read(&mut buf) {
            Ok(0) => return Err(format!("port closed after {got} of {bytes} bytes")),
            Ok(n) => got += n as u64,
            Err(e) => return Err(format!("after {got} bytes: {e}")),
        }
    }
    let out_s = t.elapsed().as_secs_f64();
    let qemu_cpu = cpu_delta(&before, &thread_cpu(vmm.id()));
    let exits = exits_delta(exits_before, kvm_debugfs_exits(vmm.id()));
    let probe_cpu = cpu_delta(&probe_before, &thread_cpu(std::process::id()));
    if got != bytes {
        return Err(format!("got {got} bytes, {} more than sent", got - bytes));
    }
    println!(
        "@@BENCH-SPLIT {}",
        json!({
            "wall": (out_s * 1000.0) as u64,
            "vmm_vcpus": qemu_cpu.0,
            "vmm_other": qemu_cpu.1 + qemu_cpu.2,
            "host_reader": probe_cpu.0 + probe_cpu.1 + probe_cpu.2,
            "vm_exits": exits,
        })
    );

    // Host -> guest.
    let chunk = vec![b'b'; 64 * 1024];
    let t = Instant::now();
    for _ in 0..bytes / chunk.len() as u64 {
        w.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    line.clear();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let in_s = t.elapsed().as_secs_f64();
    if line.trim() != format!("in {bytes}") {
        let _ = vmm.kill();
        return Err(format!("guest answered {line:?}"));
    }
    println!(
        "@@BENCH-SERIAL {}",
        json!({
            "ready_ms": ready.as_millis() as u64,
            "mib": mib,
            "stdout_mib_s": mib as f64 / out_s,
            "stdin_mib_s": mib as f64 / in_s,
        })
    );
    let _ = vmm.kill();
    let _ = vmm.wait();
    Ok(())
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut mode = "";
    let mut mib = 64u64;
    loop {
        match args.first().map(String::as_str) {
            Some("--bench") => mode = "bench",
            Some("--serial-bench") => mode = "serial",
            Some("--mib") if args.len() > 1 => {
                mib = args[1].parse().expect("--mib N");
                args.remove(0);
            }
            _ => break,
        }
        args.remove(0);
    }
    let bench = mode == "bench";
    let Some(sep) = args.iter().position(|a| a == "--") else {
        eprintln!("usage: agent-probe [--bench|--serial-bench] [--mib N] UDS -- COMMAND...");
        std::process::exit(2);
    };
    if mode == "serial" {
        match serial_bench(&args[0], mib, &args[sep + 1..]) {
            Ok(()) => println!("@@AGENT done"),
            Err(e) => {
                println!("@@AGENT error {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let uds = &args[0];
    let path = format!("{uds}_51234");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind the agent socket");
    let started = Instant::now();
    let mut vmm = Command::new(&args[sep + 1])
        .args(&args[sep + 2..])
        .spawn()
        .expect("start the VMM");
    let (stream, _) = listener.accept().expect("agent connects");
    let (tx, rx) = mpsc::channel();
    let r = stream.try_clone().expect("clone");
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        while let Ok(Some(obj)) = read_frame(&mut r) {
            if let Ok(Some(f)) = GuestFrame::parse(obj) {
                if tx.send(Some(f)).is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(None);
    });
    let mut agent = Agent {
        w: stream,
        rx,
        next_id: 0,
        backlog: Vec::new(),
    };
    let result = match agent.next_event(Duration::from_secs(120)) {
        Ok(GuestEvent::Ready) if bench => {
            bench_session(&mut agent, started.elapsed(), mib, vmm.id())
        }
        Ok(GuestEvent::Ready) => session(&mut agent),
        Ok(other) => Err(format!("first event was {other:?}, not ready")),
        Err(e) => Err(e),
    };
    let status = vmm.wait();
    println!("@@AGENT vmm-exit {:?}", status.ok().and_then(|s| s.code()));
    match result {
        Ok(()) => println!("@@AGENT done"),
        Err(e) => {
            println!("@@AGENT error {e}");
            std::process::exit(1);
        }
    }
}
