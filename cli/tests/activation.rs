//! `coworkvm serve` started the ways it is started outside a terminal:
//! by systemd socket activation (a socket passed in LISTEN_FDS, as
//! `systemd-socket-activate` and the `coworkvm.socket` user unit pass it),
//! and by the community build's bwrap backend
//! (`"$COWORK_NODE_PATH" <resources>/cowork-vm-service.js -socket PATH`).
//! No VM: the helper is driven over its socket with the client's requests.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coworkvm_tests::client::{connect, is_running, one_shot, recv};
use coworkvm_tests::temp_dir;
use serde_json::json;
use socket_proto::frame::write_frame;

const COWORKVM: &str = env!("CARGO_BIN_EXE_coworkvm");

/// Debian's `systemd` package ships it; COWORKVM_TEST_PASS_FD=1 passes the
/// socket by hand even where it is installed.
fn have_socket_activate() -> bool {
    let installed = Path::new("/usr/bin/systemd-socket-activate").exists();
    // CI installs it (scripts/install-deps.sh): there, a run without it
    // would quietly test only the hand-passed descriptor.
    assert!(
        installed || std::env::var_os("CI").is_none(),
        "systemd-socket-activate is missing under CI=true: run scripts/install-deps.sh"
    );
    installed && std::env::var_os("COWORKVM_TEST_PASS_FD").is_none()
}

/// Starts `coworkvm serve ARGS` on `socket` the way systemd does: with
/// `systemd-socket-activate -l SOCKET` when it is installed (it binds the
/// socket and starts the helper on the first connection), else by binding
/// it here and passing it as descriptor 3 with LISTEN_FDS=1 and
/// LISTEN_PID set to the helper's own pid (the shell's `$$`, which the
/// `exec` keeps), keeping a copy as systemd keeps its own (so the socket
/// outlives the helper, and a connection made while no helper runs waits
/// for the next one). stderr goes to `log`; `env` is set for the helper.
fn activate(socket: &Path, args: &[&str], log: &Path, env: &[(&str, String)]) -> Activation {
    activate_on(socket, args, log, env, None)
}

/// A helper started by [`activate`], and the test's copy of the listening
/// socket when the test passed it itself.
struct Activation {
    child: Child,
    systemd_copy: Option<std::os::unix::net::UnixListener>,
}

impl Drop for Activation {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn activate_on(
    socket: &Path,
    args: &[&str],
    log: &Path,
    env: &[(&str, String)],
    listener: Option<std::os::unix::net::UnixListener>,
) -> Activation {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    if have_socket_activate() {
        // Its socket ends with the helper it execs: a new run binds anew.
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.arg("-l").arg(socket);
        for (k, v) in env {
            cmd.arg("-E").arg(format!("{k}={v}"));
        }
        cmd.arg(COWORKVM).arg("serve").args(args);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        // It binds before it waits for a connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "systemd-socket-activate never bound"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Activation {
            child,
            systemd_copy: None,
        }
    } else {
        let listener = listener.unwrap_or_else(|| {
            let _ = std::fs::remove_file(socket);
            std::os::unix::net::UnixListener::bind(socket).unwrap()
        });
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=coworkvm.socket exec \"$@\"")
            .arg("sh")
            .arg(COWORKVM)
            .arg("serve")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)));
        // SAFETY: dup2 and fcntl are async-signal-safe; the closure only
        // moves the listening socket to descriptor 3, inheritable.
        unsafe {
            cmd.pre_exec(move || {
                if fd != 3 && libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Activation {
            child,
            systemd_copy: Some(listener),
        }
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn images_env(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("RUST_LOG", "info".into()),
        (
            "COWORKVM_IMAGES",
            dir.join("no-images").display().to_string(),
        ),
    ]
}

#[test]
fn a_socket_activated_helper_answers_stops_when_idle_and_leaves_the_socket() {
    let dir = temp_dir("act");
    let socket = dir.join("claude-cowork-vm.sock");
    let log = dir.join("helper.log");
    let env = images_env(&dir);
    let mut child = activate(&socket, &["--idle-exit", "1"], &log, &env);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();

    // The client's first requests, through the inherited socket.
    assert!(!is_running(&socket));
    let empty = dir.join("bundle");
    std::fs::create_dir_all(&empty).unwrap();
    let r = one_shot(&socket, "startVM", json!({"bundlePath": empty}));
    assert!(
        r["error"].as_str().unwrap().contains("rootfs.img"),
        "{r}\n{}",
        text()
    );

    // Idle (no VM, no connection) for a second: it stops, cleanly, and
    // the socket it was given stays for the next activation.
    let status = wait_exit(&mut child.child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no idle exit\n{}", text()));
    assert!(status.success(), "{status}\n{}", text());
    assert!(socket.exists(), "the inherited socket stays\n{}", text());
    let first = text();
    assert!(first.contains("(passed by systemd)"), "{first}");
    assert!(first.contains("idle for 1 s"), "{first}");
    assert!(
        !first.contains("replacing the stale socket"),
        "it never bound the path itself: {first}"
    );

    // A second activation on the same path works. Where the test holds
    // systemd's copy, a client that connects while no helper runs is
    // answered by the next one.
    let mut second = match child.systemd_copy.take() {
        Some(copy) => {
            let mut early = connect(&socket);
            write_frame(&mut early, &json!({"method": "isRunning", "params": {}})).unwrap();
            early.shutdown(std::net::Shutdown::Write).unwrap();
            let second = activate_on(&socket, &["--idle-exit", "0"], &log, &env, Some(copy));
            let reply = recv(&mut early).expect("the next helper answers");
            assert_eq!(reply["result"]["running"], false, "{reply}");
            second
        }
        None => activate(&socket, &["--idle-exit", "0"], &log, &env),
    };
    assert!(!is_running(&socket));
    // SAFETY: signalling our own child (systemd-socket-activate exec'd the
    // helper in place, or the shell did).
    unsafe { libc::kill(second.child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut second.child, Duration::from_secs(20)).expect("SIGTERM stops it");
    assert!(status.success(), "{status}\n{}", text());
    assert!(
        socket.exists(),
        "a helper never unlinks a socket it did not create\n{}",
        text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_open_connection_holds_off_the_idle_exit() {
    let dir = temp_dir("act-hold");
    let socket = dir.join("claude-cowork-vm.sock");
    let log = dir.join("helper.log");
    let mut child = activate(&socket, &["--idle-exit", "1"], &log, &images_env(&dir));
    // The client's event stream stays open while the app runs.
    let mut events = connect(&socket);
    write_frame(
        &mut events,
        &json!({"method": "subscribeEvents", "id": 1, "params": {}}),
    )
    .unwrap();
    assert_eq!(recv(&mut events).expect("the ack")["id"], 1);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "stopped with a connection open\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    drop(events);
    let status =
        wait_exit(&mut child.child, Duration::from_secs(20)).expect("idle exit after the close");
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn journal_lines_carry_a_priority_and_no_timestamp() {
    let dir = temp_dir("act-journal");
    let socket = dir.join("claude-cowork-vm.sock");
    let log = dir.join("helper.log");
    std::fs::write(&log, b"").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    // systemd sets JOURNAL_STREAM to the device and inode of the stream
    // it connects stderr to; here that is the log file.
    let mut env = images_env(&dir);
    env.push(("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino())));
    let mut child = activate(&socket, &["--idle-exit", "1"], &log, &env);
    assert!(!is_running(&socket));
    wait_exit(&mut child.child, Duration::from_secs(20)).expect("idle exit");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        // systemd-socket-activate's own lines.
        .filter(|l| {
            !l.starts_with("Listening on")
                && !l.starts_with("Communication attempt")
                && !l.starts_with("Execing")
        })
        .collect();
    assert!(lines.iter().any(|l| l.starts_with("<6>serving ")), "{text}");
    for l in &lines {
        assert!(
            l.len() > 3 && l.starts_with('<') && l.as_bytes()[2] == b'>',
            "a priority prefix on every line: {l:?}"
        );
        let digit = l.as_bytes()[1];
        assert!(matches!(digit, b'3' | b'4' | b'6' | b'7'), "{l:?}");
        assert!(
            !l.contains("INFO") && !l.contains("WARN") && !l.contains("Z "),
            "no level word, no timestamp: {l:?}"
        );
        assert!(!l.contains('\x1b'), "no colour: {l:?}");
    }

    // A JOURNAL_STREAM that names another stream (inherited, but stderr is
    // not the journal): plain lines.
    let plain_log = dir.join("plain.log");
    let mut env = images_env(&dir);
    env.push(("JOURNAL_STREAM", "1:1".into()));
    let mut child = activate(&socket, &["--idle-exit", "1"], &plain_log, &env);
    assert!(!is_running(&socket));
    wait_exit(&mut child.child, Duration::from_secs(20)).expect("idle exit");
    let plain = std::fs::read_to_string(&plain_log).unwrap();
    assert!(plain.contains(" INFO "), "{plain}");
    assert!(!plain.contains("<6>"), "{plain}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_socket_not_listening_is_refused_with_the_reason() {
    // Descriptor 3 is a plain file: the helper must not serve it, and says
    // why, instead of binding somewhere else.
    let dir = temp_dir("act-bad");
    let file = std::fs::File::create(dir.join("not-a-socket")).unwrap();
    let fd = file.as_raw_fd();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$@\"")
        .arg("sh")
        .arg(COWORKVM)
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("s.sock"));
    // SAFETY: dup2 and fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a listening Unix stream socket"), "{err}");
    assert!(!dir.join("s.sock").exists(), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The community build's spawn, exactly: `"$COWORK_NODE_PATH"
/// <resources>/cowork-vm-service.js -socket <path>` with every stdio a
/// pipe, COWORK_NODE_PATH pointing at coworkvm.
#[test]
fn the_community_builds_node_command_line_serves() {
    let dir = temp_dir("act-js");
    let socket = dir.join("run/claude-cowork-vm.sock");
    let script = PathBuf::from("/usr/lib/claude-desktop/resources/cowork-vm-service.js");
    let mut child = Activation {
        child: Command::new(COWORKVM)
            .arg(&script)
            .arg("-socket")
            .arg(&socket)
            .env("RUST_LOG", "info")
            .env("COWORKVM_IMAGES", dir.join("no-images"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        systemd_copy: None,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(s) = child.child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("exited {s}: {err}");
        }
        assert!(Instant::now() < deadline, "never bound its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_running(&socket));
    let empty = dir.join("bundle");
    std::fs::create_dir_all(&empty).unwrap();
    let r = one_shot(&socket, "startVM", json!({"bundlePath": empty}));
    assert!(r["error"].as_str().unwrap().contains("rootfs.img"), "{r}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child.child, Duration::from_secs(20)).expect("SIGTERM stops it");
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "a socket it bound itself is removed");
    let mut err = String::new();
    child
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("serving"), "{err}");
    assert!(!err.contains("passed by systemd"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
