//! `coworkvm` started the way the desktop client starts its helper: under
//! the stock helper's name, with `-socket PATH` and no subcommand.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use socket_proto::frame::{read_frame, write_frame};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cvm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One request on its own connection, as the client's one-shot calls do.
fn one_shot(socket: &Path, method: &str, params: Value) -> Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write_frame(&mut s, &json!({"method": method, "params": params})).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let reply = read_frame(&mut s).unwrap().expect("a reply");
    assert!(
        read_frame(&mut s).unwrap().is_none(),
        "the helper closes after a one-shot reply"
    );
    Value::Object(reply)
}

fn is_running(socket: &Path) -> bool {
    one_shot(socket, "isRunning", json!({}))["result"]["running"]
        .as_bool()
        .unwrap()
}

#[test]
fn the_binary_under_another_name_serves_as_the_client_starts_it_and_stops_on_sigterm() {
    let dir = temp_dir("bin");
    let sock = dir.join("run/claude-cowork-vm.sock");
    // Standing in for the stock helper: a symlink under its name, started
    // as the client starts it, with no subcommand.
    let helper = dir.join("cowork-vm-helper");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_coworkvm"), &helper).unwrap();
    let mut child = std::process::Command::new(&helper)
        .args(["-socket", sock.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env("COWORKVM_IMAGES", dir.join("no-images"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the helper never bound its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_running(&sock));
    let empty = dir.join("bundle");
    std::fs::create_dir_all(&empty).unwrap();
    let r = one_shot(&sock, "startVM", json!({"bundlePath": empty}));
    // The real image source: an empty bundle and no images to seed it from.
    assert!(r["error"].as_str().unwrap().contains("rootfs.img"), "{r}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "socket removed on exit");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("serving"), "{err}");
    assert!(err.contains("SIGTERM: stopping"), "{err}");
    assert!(!err.contains('\x1b'), "no colour codes in the client's log");
    let _ = std::fs::remove_dir_all(&dir);
}
