//! Drives coworkvm-agent over the guest protocol from the host side, the way
//! the helper will: starts the VMM given after `--`, accepts the agent on
//! `<uds>_51234`, and checks concurrency, kill, readFile, unknown methods
//! and how fast a dying guest's connection drop is seen.
//!
//! usage: agent-probe UDS -- COWORKVM-COMMAND...

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

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
fn bench_session(agent: &mut Agent, ready: Duration) -> Result<(), String> {
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

    // Guest -> host: 256 MiB of text on stdout.
    const OUT_BYTES: u64 = 256 << 20;
    let t = Instant::now();
    agent.request(
        "spawn",
        json!({"id": "out", "name": "b", "command": "sh", "isResume": false,
               "args": ["-c", format!("yes {} | head -c {OUT_BYTES}", "a".repeat(63))]}),
    )?;
    let mut got = 0u64;
    loop {
        match agent.next_event(Duration::from_secs(600))? {
            GuestEvent::Stdout { id, data } if id == "out" => got += data.len() as u64,
            GuestEvent::Exit { id, .. } if id == "out" => break,
            _ => {}
        }
    }
    let out_s = t.elapsed().as_secs_f64();
    if got != OUT_BYTES {
        return Err(format!("stdout: got {got} of {OUT_BYTES} bytes"));
    }

    // Host -> guest: 64 MiB through stdin into `wc -c`.
    const IN_CHUNK: usize = 64 * 1024;
    const IN_CHUNKS: usize = 1024;
    agent.request(
        "spawn",
        json!({"id": "in", "name": "b", "command": "wc", "args": ["-c"], "isResume": false}),
    )?;
    let chunk = "b".repeat(IN_CHUNK);
    let t = Instant::now();
    for i in 0..IN_CHUNKS {
        let frame = GuestFrame::Notification {
            method: "stdin".into(),
            params: json!({"id": "in", "data": chunk, "eof": i + 1 == IN_CHUNKS}),
        };
        write_frame(&mut agent.w, &frame).map_err(|e| e.to_string())?;
    }
    let counted = collect(agent, &["in".to_string()])?;
    let in_s = t.elapsed().as_secs_f64();
    let in_bytes = (IN_CHUNK * IN_CHUNKS) as u64;
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
            "stdout_mib_s": (OUT_BYTES as f64 / (1 << 20) as f64) / out_s,
            "stdin_mib_s": (in_bytes as f64 / (1 << 20) as f64) / in_s,
        })
    );
    agent.request("shutdown", json!({})).ok();
    Ok(())
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.first().is_some_and(|a| a == "--bench");
    if bench {
        args.remove(0);
    }
    let Some(sep) = args.iter().position(|a| a == "--") else {
        eprintln!("usage: agent-probe UDS -- COMMAND...");
        std::process::exit(2);
    };
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
        Ok(GuestEvent::Ready) if bench => bench_session(&mut agent, started.elapsed()),
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
