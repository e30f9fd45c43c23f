//! Measures one VMM boot for the benchmark, the same way for every VMM:
//! starts the command, watches its output for a marker line, and at the
//! marker records the elapsed time and the VM's exit count (from KVM's
//! debugfs, so any VMM is counted alike); then kills the VMM and records
//! its peak RSS. Prints one JSON object.
//!
//! usage: vmm-timer --marker TEXT --timeout SECS -- CMD [ARGS...]

use coworkvm_tests::process::kvm_debugfs_exits;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut marker = None;
    let mut timeout = 120u64;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--marker" => {
                marker = args.get(i + 1).cloned();
                i += 2;
            }
            "--timeout" => {
                timeout = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(120);
                i += 2;
            }
            "--" => {
                i += 1;
                break;
            }
            other => {
                eprintln!("vmm-timer: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let (Some(marker), Some(program)) = (marker, args.get(i)) else {
        eprintln!("usage: vmm-timer --marker TEXT [--timeout SECS] -- CMD [ARGS...]");
        std::process::exit(2);
    };
    let start = Instant::now();
    let mut child = match Command::new(program)
        .args(&args[i + 1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm-timer: cannot start {program}: {e}");
            std::process::exit(2);
        }
    };
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let want = marker.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(&want) {
                let _ = tx.send(start.elapsed());
            }
        }
    });
    let seen = rx.recv_timeout(Duration::from_secs(timeout)).ok();
    let exits = seen.and_then(|_| kvm_debugfs_exits(pid));
    let _ = child.kill();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (Child::kill does not
    // wait); status and usage point to live locals.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    let max_rss_kib = if r == pid as i32 {
        Some(usage.ru_maxrss)
    } else {
        None
    };
    let json = format!(
        "{{\"marker_ms\": {}, \"vm_exits\": {}, \"max_rss_kib\": {}}}",
        seen.map_or("null".to_string(), |d| d.as_millis().to_string()),
        exits.map_or("null".to_string(), |e| e.to_string()),
        max_rss_kib.map_or("null".to_string(), |k| k.to_string()),
    );
    println!("@@VMM-TIMER {json}");
    std::process::exit(if seen.is_some() { 0 } else { 1 });
}
