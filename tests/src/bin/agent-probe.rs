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

    // Host -> guest: N MiB through stdin, paced (see `StdinPacer`).
    let in_chunks = (out_bytes as usize) / STDIN_CHUNK;
    let in_bytes = (STDIN_CHUNK * in_chunks) as u64;
    let pacer = StdinPacer::new(in_bytes, STDIN_WINDOW, STDIN_ACK_BYTES)?;
    agent.request(
        "spawn",
        json!({"id": "in", "name": "b", "command": "sh", "isResume": false,
               "args": ["-c", pacer.reader_sh()]}),
    )?;
    let in_s = pace_stdin(agent, "in", pacer)?;
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
            "stdin_window_kib": STDIN_WINDOW >> 10,
            "stdin_ack_kib": STDIN_ACK_BYTES >> 10,
        })
    );
    agent.request("shutdown", json!({})).ok();
    Ok(())
}

/// Bytes of one `stdin` notification in the benchmark.
const STDIN_CHUNK: usize = 64 * 1024;

/// The most stdin bytes the probe keeps sent but not yet acknowledged by
/// the guest's reader. The agent refuses a chunk past
/// [`AGENT_MAX_STDIN_CHUNKS`] chunks or [`AGENT_MAX_STDIN_BYTES`] bytes of
/// unread stdin for one process (with an `error` event: `stdin` is a
/// notification, it has no answer to wait for), so a sender that does not
/// pace itself loses data as soon as it outruns the guest. 3 MiB is 48
/// chunks: under both bounds with room for the chunk the agent is writing,
/// and, at the rig's few MiB/s, about half a second of data in flight, far
/// more than an acknowledgement's round trip, so the pipe never runs dry.
const STDIN_WINDOW: usize = 3 << 20;

/// The guest's reader acknowledges every this many bytes it has read.
const STDIN_ACK_BYTES: usize = 1 << 20;

/// The agent's bounds on one process's unread stdin, as in
/// `guest-agent/src/procs.rs` (`MAX_STDIN_CHUNKS`, `MAX_STDIN_BYTES`; a
/// test checks they still match). Chunks of [`STDIN_CHUNK`] bytes are not
/// joined there (only chunks that together fit 64 KiB are).
const AGENT_MAX_STDIN_CHUNKS: usize = 64;
const AGENT_MAX_STDIN_BYTES: usize = 16 * 1024 * 1024;

/// Flow control for the stdin benchmark: the guest's reader (see
/// [`StdinPacer::reader_sh`]) reads `ack` bytes at a time and prints how
/// many such steps it has read, on its stdout; the probe sends a chunk only
/// while no more than `window` bytes are unacknowledged. The reader reads
/// with `dd` in 64 KiB blocks, as `head -c | wc -c` reads the port on the
/// virtio-serial path, and the bytes it acknowledges have left the agent.
#[derive(Debug)]
struct StdinPacer {
    total: u64,
    window: u64,
    ack: u64,
    sent: u64,
    acked: u64,
    /// The most bytes that were ever unacknowledged.
    max_in_flight: u64,
}

impl StdinPacer {
    fn new(total: u64, window: usize, ack: usize) -> Result<Self, String> {
        let chunk = STDIN_CHUNK as u64;
        let (window, ack) = (window as u64, ack as u64);
        if ack == 0 || ack % chunk != 0 || total % ack != 0 {
            return Err(format!(
                "stdin pacing: {total} bytes must be whole steps of {ack}, whole chunks of {chunk}"
            ));
        }
        // The agent holds at most the window, and one chunk may be with
        // its writer: both must stay inside its bounds.
        let agent_limit = ((AGENT_MAX_STDIN_CHUNKS - 1) * STDIN_CHUNK).min(AGENT_MAX_STDIN_BYTES);
        if window < ack + chunk || window > agent_limit as u64 {
            return Err(format!(
                "stdin pacing: a window of {window} bytes must hold an acknowledgement step and a                  chunk ({} bytes) and stay within the agent's bound ({agent_limit} bytes)",
                ack + chunk
            ));
        }
        Ok(StdinPacer {
            total,
            window,
            ack,
            sent: 0,
            acked: 0,
            max_in_flight: 0,
        })
    }

    /// The guest's reader: `dd` reads one step (fullblock: a short read
    /// from the pipe does not end a block early), then the shell's own
    /// `echo` acknowledges it; dd's `N+M records in` line on stderr shows
    /// whether each step was whole.
    fn reader_sh(&self) -> String {
        format!(
            "i=0; while [ $i -lt {steps} ]; do dd bs={STDIN_CHUNK} count={blocks} \
             iflag=fullblock of=/dev/null || exit 1; i=$((i+1)); echo $i; done",
            steps = self.total / self.ack,
            blocks = self.ack / STDIN_CHUNK as u64,
        )
    }

    /// dd's stderr line for one whole step.
    fn whole_step_line(&self) -> String {
        format!("{}+0 records in", self.ack / STDIN_CHUNK as u64)
    }

    /// Whether the next chunk may go now.
    fn may_send(&self) -> bool {
        self.sent < self.total && self.sent + STDIN_CHUNK as u64 <= self.acked + self.window
    }

    /// The next chunk went; it is the last one when this says so.
    fn sent_chunk(&mut self) -> bool {
        self.sent += STDIN_CHUNK as u64;
        self.max_in_flight = self.max_in_flight.max(self.sent - self.acked);
        self.sent == self.total
    }

    /// One line of the reader's stdout: the number of steps it has read.
    fn ack_line(&mut self, line: &str) -> Result<(), String> {
        let steps: u64 = line
            .trim()
            .parse()
            .map_err(|_| format!("stdin reader printed {line:?}, not a step count"))?;
        let acked = steps * self.ack;
        if acked != self.acked + self.ack || acked > self.sent {
            return Err(format!(
                "stdin reader acknowledged {acked} bytes after {} ({} sent)",
                self.acked, self.sent
            ));
        }
        self.acked = acked;
        Ok(())
    }

    fn done(&self) -> bool {
        self.acked == self.total
    }
}

/// Sends `pacer.total` bytes to process `id`'s stdin as `stdin`
/// notifications, paced by the reader's acknowledgements, and waits for
/// the reader to exit. Returns the seconds from the first chunk to the
/// exit. Fails on an `error` event for `id` (a refused chunk), a short or
/// missing step, or a reader that fails.
fn pace_stdin(agent: &mut Agent, id: &str, mut pacer: StdinPacer) -> Result<f64, String> {
    let chunk = "b".repeat(STDIN_CHUNK);
    let (mut out, mut err) = (String::new(), String::new());
    let t = Instant::now();
    let code = loop {
        while pacer.may_send() {
            let eof = pacer.sent_chunk();
            let frame = GuestFrame::Notification {
                method: "stdin".into(),
                params: json!({"id": id, "data": chunk, "eof": eof}),
            };
            write_frame(&mut agent.w, &frame).map_err(|e| e.to_string())?;
        }
        match agent.next_event(Duration::from_secs(120))? {
            GuestEvent::Stdout { id: eid, data } if eid == id => {
                out.push_str(&data);
                while let Some(nl) = out.find('\n') {
                    let line: String = out.drain(..=nl).collect();
                    pacer.ack_line(&line)?;
                }
            }
            GuestEvent::Stderr { id: eid, data } if eid == id => err.push_str(&data),
            GuestEvent::Error {
                id: Some(eid),
                message,
                ..
            } if eid == id => return Err(format!("stdin: the agent refused a chunk: {message}")),
            GuestEvent::Exit { id: eid, code, .. } if eid == id => break code,
            _ => {}
        }
    };
    let in_s = t.elapsed().as_secs_f64();
    let whole = err.matches(&pacer.whole_step_line()).count() as u64;
    if code != Some(0) || !pacer.done() || whole != pacer.total / pacer.ack {
        return Err(format!(
            "stdin: reader exited with {code:?} after acknowledging {} of {} bytes, {whole} \
             whole steps; its stderr: {err}",
            pacer.acked, pacer.total
        ));
    }
    eprintln!(
        "agent-probe: stdin paced, at most {} KiB unacknowledged",
        pacer.max_in_flight >> 10
    );
    Ok(in_s)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that reads what arrived in `ack`-byte steps, as the agent's
    /// writer hands it on; returns the most bytes the agent ever held.
    fn run_against_agent(mut p: StdinPacer) -> u64 {
        let mut agent_holds = 0u64;
        let mut most = 0u64;
        let mut read = 0u64;
        while !p.done() {
            while p.may_send() {
                p.sent_chunk();
                agent_holds += STDIN_CHUNK as u64;
                most = most.max(agent_holds);
            }
            // The reader takes one step (the agent's queue drains into it)
            // and acknowledges it.
            let step = p.ack.min(agent_holds);
            assert_eq!(step, p.ack, "the window always covers a whole step");
            agent_holds -= step;
            read += step;
            p.ack_line(&format!("{}\n", read / p.ack)).unwrap();
        }
        assert_eq!(read, p.total);
        most
    }

    #[test]
    fn the_stdin_bench_never_holds_more_than_the_agent_accepts() {
        let p = StdinPacer::new(64 << 20, STDIN_WINDOW, STDIN_ACK_BYTES).unwrap();
        let most = run_against_agent(p);
        assert_eq!(most, STDIN_WINDOW as u64);
        // What the agent's queue would count: the chunks it holds, plus the
        // one its writer may have taken; both bounds hold.
        let chunks = most as usize / STDIN_CHUNK + 1;
        assert!(chunks <= AGENT_MAX_STDIN_CHUNKS, "{chunks} chunks");
        assert!(most as usize + STDIN_CHUNK <= AGENT_MAX_STDIN_BYTES);
    }

    /// Unpaced, as the bench was: the whole payload in flight, past the
    /// agent's bound; such a window is refused before anything is sent.
    #[test]
    fn a_window_past_the_agent_bound_is_refused() {
        let e = StdinPacer::new(64 << 20, 64 << 20, STDIN_ACK_BYTES).unwrap_err();
        assert!(e.contains("agent's bound"), "{e}");
        let e = StdinPacer::new(
            64 << 20,
            AGENT_MAX_STDIN_CHUNKS * STDIN_CHUNK,
            STDIN_ACK_BYTES,
        )
        .unwrap_err();
        assert!(e.contains("agent's bound"), "{e}");
        // A window that cannot hold a step would stall.
        assert!(StdinPacer::new(64 << 20, STDIN_ACK_BYTES, STDIN_ACK_BYTES).is_err());
        assert!(StdinPacer::new(3 << 19, STDIN_WINDOW, STDIN_ACK_BYTES).is_err());
    }

    #[test]
    fn acknowledgements_must_count_up_by_one_step() {
        let mut p = StdinPacer::new(8 << 20, STDIN_WINDOW, STDIN_ACK_BYTES).unwrap();
        while p.may_send() {
            p.sent_chunk();
        }
        assert_eq!(p.sent, STDIN_WINDOW as u64);
        assert!(p.ack_line("2").is_err(), "a skipped step");
        assert!(p.ack_line("x").is_err());
        p.ack_line("1\n").unwrap();
        assert!(p.may_send());
        assert!(p.ack_line("1").is_err(), "a repeated step");
        p.ack_line("2").unwrap();
        p.ack_line("3").unwrap();
        assert!(p.ack_line("4").is_err(), "more acknowledged than sent");
        assert_eq!(p.whole_step_line(), "16+0 records in");
        let sh = p.reader_sh();
        assert!(
            sh.contains("while [ $i -lt 8 ]; do dd bs=65536 count=16 iflag=fullblock"),
            "{sh}"
        );
    }

    /// The agent's bounds this probe paces against are the agent's own.
    #[test]
    fn agent_bounds_match_the_agent() {
        let src = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-agent/src/procs.rs"),
        )
        .unwrap();
        assert!(src.contains(&format!(
            "pub const MAX_STDIN_CHUNKS: usize = {AGENT_MAX_STDIN_CHUNKS};"
        )));
        assert!(src.contains("pub const MAX_STDIN_BYTES: usize = 16 * 1024 * 1024;"));
        assert_eq!(AGENT_MAX_STDIN_BYTES, 16 * 1024 * 1024);
        assert!(src.contains("const STDIN_JOIN_BYTES: usize = 64 * 1024;"));
        assert_eq!(STDIN_CHUNK, 64 * 1024, "chunks this size are never joined");
    }
}
