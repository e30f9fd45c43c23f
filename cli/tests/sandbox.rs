//! The VMM's sandbox, proven from inside the VMM's own context: each test
//! runs `coworkvm sandbox-probe`, which sets up exactly what `coworkvm
//! boot` sets up (same functions, same thread layout) and then makes one
//! access from one kind of thread. Every test also runs the probe with
//! `--no-sandbox` and expects the opposite, so it fails if the sandbox
//! does nothing. No guest or KVM is involved: these run on any Linux host.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const SECCOMP_KILL_STATUS: i32 = 159;

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_coworkvm")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("cw-sandbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn probe(home: &Path, extra: &[&str]) -> Output {
    Command::new(exe())
        .arg("sandbox-probe")
        .args(extra)
        .env("HOME", home)
        .stdin(Stdio::null())
        .output()
        .expect("runs coworkvm")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A home with a private key in it, as the user's is.
fn home_with_canary(dir: &Path) -> PathBuf {
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    let key = home.join(".ssh/id_rsa");
    std::fs::write(&key, b"-----BEGIN OPENSSH PRIVATE KEY----- canary\n").unwrap();
    key
}

#[test]
fn the_vmm_cannot_read_the_users_private_key() {
    let dir = TempDir::new("canary");
    let key = home_with_canary(&dir.0);
    let home = dir.0.join("home");
    let open = format!("open:{}", key.display());

    // Control: unconfined, the probe reads it.
    let o = probe(&home, &["--no-sandbox", "--access", &open]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("probe: ok: read"),
        "{}",
        text(&o)
    );

    // Landlock alone (no seccomp filter yet): the open is refused.
    let o = probe(&home, &["--thread", "before-seccomp", "--access", &open]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("probe: error: Permission denied"),
        "Landlock must refuse ~/.ssh/id_rsa\n{}",
        text(&o)
    );

    // With every layer, from a device worker: open is not even a syscall it may make.
    let o = probe(&home, &["--thread", "vsock-worker", "--access", &open]);
    assert_eq!(o.status.code(), Some(SECCOMP_KILL_STATUS), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("the virtio-vsock thread made the forbidden system call openat (257)"),
        "{}",
        text(&o)
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("probe: ok"));
}

#[test]
fn a_forbidden_syscall_kills_the_vmm_and_names_the_call() {
    let dir = TempDir::new("kill");
    let home = dir.0.clone();

    let o = probe(
        &home,
        &[
            "--no-sandbox",
            "--thread",
            "vcpu",
            "--access",
            "socket-inet",
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("probe: ok: socket"),
        "{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let o = probe(&home, &["--thread", "vcpu", "--access", "socket-inet"]);
    assert_eq!(o.status.code(), Some(SECCOMP_KILL_STATUS), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("coworkvm: seccomp: the vcpu thread made the forbidden system call socket (41); the VMM stops"),
        "{}",
        text(&o)
    );

    // The vsock worker may make AF_UNIX sockets only.
    let o = probe(
        &home,
        &["--thread", "vsock-worker", "--access", "socket-inet"],
    );
    assert_eq!(o.status.code(), Some(SECCOMP_KILL_STATUS), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("virtio-vsock thread made the forbidden system call socket (41)"),
        "{}",
        text(&o)
    );

    // Running another program: the main thread may not.
    let o = probe(&home, &["--thread", "main", "--access", "execve"]);
    assert_eq!(o.status.code(), Some(SECCOMP_KILL_STATUS), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("main thread made the forbidden system call execve (59)"),
        "{}",
        text(&o)
    );
    let o = probe(
        &home,
        &["--no-sandbox", "--thread", "main", "--access", "execve"],
    );
    assert_eq!(o.status.code(), Some(0), "exec'd /bin/true\n{}", text(&o));
}

#[test]
fn the_vsock_worker_still_reaches_the_hosts_vsock_sockets() {
    let dir = TempDir::new("vsock");
    let uds = dir.0.join("v.sock");
    let port = dir.0.join("v.sock_1234");
    let _listener = std::os::unix::net::UnixListener::bind(&port).unwrap();
    let o = probe(
        &dir.0,
        &[
            "--vsock",
            uds.to_str().unwrap(),
            "--thread",
            "vsock-worker",
            "--access",
            // As the muxer dials it: by name, in the vsock directory.
            "connect:v.sock_1234",
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("probe: ok: connected"),
        "the muxer's connect to <uds>_PORT must work in the sandbox\n{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// A Unix socket outside the vsock directory, such as the helper's own
/// (which admits the user's uid and so would take a VMM's connection):
/// the sandboxed VMM cannot even name it, since its root is the vsock
/// directory.
#[test]
fn the_vmm_cannot_reach_a_unix_socket_outside_its_vsock_directory() {
    let dir = TempDir::new("outside");
    let vm_dir = dir.0.join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let uds = vm_dir.join("v.sock");
    let helper = dir.0.join("helper.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&helper).unwrap();
    let access = format!("connect:{}", helper.display());
    let args = |sandbox: bool| {
        let mut a = vec!["--vsock", uds.to_str().unwrap()];
        if !sandbox {
            a.push("--no-sandbox");
        }
        a.extend(["--thread", "vsock-worker", "--access", access.as_str()]);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |sandbox: bool| {
        let a = args(sandbox);
        probe(&dir.0, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let control = run(false);
    assert!(
        String::from_utf8_lossy(&control.stdout).contains("probe: ok: connected"),
        "control: unconfined, the socket is reachable\n{}",
        text(&control)
    );
    let o = run(true);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("probe: error") && out.contains("No such file or directory"),
        "the sandboxed VMM reached a socket outside its vsock directory\n{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

fn status_field<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim_start_matches(':').trim())
}

/// Starts a waiting probe, returns it once it said "ready".
fn waiting_probe(home: &Path, extra: &[&str]) -> std::process::Child {
    let mut child = Command::new(exe())
        .arg("sandbox-probe")
        .args(extra)
        .args(["--access", "wait"])
        .env("HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "probe did not start");
    child
}

/// Every thread's `Seccomp` and `NoNewPrivs`, and the process's limits.
fn inspect(pid: u32) -> (Vec<(String, String, String)>, String, String) {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        threads.push((
            status_field(&status, "Name").unwrap_or("").to_string(),
            status_field(&status, "Seccomp").unwrap_or("").to_string(),
            status_field(&status, "NoNewPrivs")
                .unwrap_or("")
                .to_string(),
        ));
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let net = std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    (threads, limits, net)
}

#[test]
fn every_vmm_thread_runs_with_no_new_privs_and_a_seccomp_filter() {
    let dir = TempDir::new("status");
    let own_net = std::fs::read_link("/proc/self/ns/net")
        .unwrap()
        .display()
        .to_string();

    // Control: unconfined threads show no filter.
    let mut child = waiting_probe(&dir.0, &["--no-sandbox"]);
    let (threads, _, net) = inspect(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        threads.iter().all(|(_, seccomp, _)| seccomp == "0"),
        "{threads:?}"
    );
    assert_eq!(net, own_net);

    let mut child = waiting_probe(&dir.0, &[]);
    let (threads, limits, net) = inspect(child.id());
    let main_status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status_field(&main_status, "NoNewPrivs"), Some("1"));
    assert_eq!(status_field(&main_status, "Seccomp"), Some("2"));
    // main, vcpu0, the spawner and a worker.
    assert!(threads.len() >= 4, "{threads:?}");
    for (name, seccomp, nnp) in &threads {
        assert_eq!(seccomp, "2", "thread {name} has no filter: {threads:?}");
        assert_eq!(nnp, "1", "thread {name}: {threads:?}");
    }
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    assert_eq!(limit("Max open files"), "2048 2048", "{limits}");
    assert_eq!(limit("Max core file size"), "0 0", "{limits}");
    assert_eq!(
        limit("Max file size"),
        format!("{0} {0}", 64 << 20),
        "{limits}"
    );
    // A network namespace of its own: no interfaces, no host abstract sockets.
    assert_ne!(net, own_net, "the VMM shares the host's network namespace");
}
