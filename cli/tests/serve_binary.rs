//! `coworkvm` started the way the desktop client starts its helper: under
//! the stock helper's name, with `-socket PATH` and no subcommand.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use coworkvm_tests::client::{connect, is_running, one_shot, recv};
use coworkvm_tests::temp_dir;
use serde_json::{json, Value};
use socket_proto::frame::{encode_frame, read_frame, write_frame};

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

/// The real helper (`coworkvm serve`) in a process of its own, so that what
/// is measured of it (its RSS) is the helper's alone, not this test
/// binary's, whose other tests run alongside. Killed when dropped.
struct HelperProcess {
    child: std::process::Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl HelperProcess {
    fn start(tag: &str) -> Self {
        let dir = temp_dir(tag);
        let socket = dir.join("helper.sock");
        let log = std::fs::File::create(dir.join("helper.log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_coworkvm"))
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .env("COWORKVM_IMAGES", dir.join("no-images"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let h = HelperProcess { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the helper never bound its socket: {}",
                h.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("helper.log")).unwrap_or_default()
    }

    /// The helper's resident set, from `/proc/<helper pid>/status`.
    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn is_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// splitmix64: a seeded, reproducible stream.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn random_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 2 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 1),
        2 => json!(rng.next() as i64),
        3 => json!(-(rng.below(1000) as i64)),
        4 => {
            let n = rng.below(20) as usize;
            Value::String(String::from_utf8_lossy(&rng.bytes(n)).into_owned())
        }
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let keys = [
                "id",
                "name",
                "command",
                "args",
                "data",
                "signal",
                "filePath",
                "processName",
                "x",
            ];
            Value::Object(
                (0..rng.below(5))
                    .map(|_| {
                        (
                            keys[rng.below(keys.len() as u64) as usize].to_string(),
                            random_value(rng, depth + 1),
                        )
                    })
                    .collect(),
            )
        }
    }
}

/// One random frame body, with a valid length prefix: every one of these
/// must get exactly one reply.
fn random_frame(rng: &mut Rng) -> Vec<u8> {
    // Methods safe to throw junk at (nothing that starts, stops or creates
    // a VM on disk, and no subscribeEvents, which turns the stream).
    const METHODS: &[&str] = &[
        "isRunning",
        "isGuestConnected",
        "spawn",
        "kill",
        "writeStdin",
        "isProcessRunning",
        "readFile",
        "mountPath",
        "sendGuestResponse",
        "getNetworkDrives",
        "configure",
        "getSessionsDiskInfo",
        "deleteSessionDirs",
        "pruneSessionCaches",
        "addApprovedOauthToken",
        "nope",
        "",
    ];
    let body: Vec<u8> = match rng.below(6) {
        0 => {
            let n = 1 + rng.below(64) as usize;
            rng.bytes(n) // junk bytes
        }
        1 => serde_json::to_vec(&random_value(rng, 3)).unwrap(), // JSON, mostly not an object
        2 => {
            let mut b = serde_json::to_vec(&json!({"method": "isRunning"})).unwrap();
            b.truncate(rng.below(b.len() as u64) as usize + 1); // cut JSON
            b
        }
        _ => {
            let mut obj = serde_json::Map::new();
            if rng.below(8) != 0 {
                let m = METHODS[rng.below(METHODS.len() as u64) as usize];
                obj.insert(
                    "method".into(),
                    if rng.below(10) == 0 {
                        json!(5)
                    } else {
                        json!(m)
                    },
                );
            }
            if rng.below(2) == 0 {
                obj.insert("id".into(), random_value(rng, 3));
            }
            if rng.below(4) != 0 {
                obj.insert("params".into(), random_value(rng, 1));
            }
            serde_json::to_vec(&Value::Object(obj)).unwrap()
        }
    };
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    f
}

#[test]
fn malformed_input_floods_and_hostile_clients_cost_nothing_lasting() {
    let mut h = HelperProcess::start("robust");
    let sock = h.socket.clone();
    // Warm up (first connections, runtime growth) before measuring.
    for _ in 0..20 {
        assert!(!is_running(&sock));
    }
    let rss_before = h.rss_kib();

    // 10,000 random frames over 10 connections; each gets exactly one
    // well-formed reply and the connection goes on.
    let mut rng = Rng(0x00C0_FFEE_2025);
    let mut replies_total = 0;
    for _conn in 0..10 {
        let frames: Vec<Vec<u8>> = (0..1000).map(|_| random_frame(&mut rng)).collect();
        let mut s = connect(&sock);
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut n = 0;
            while let Ok(Some(obj)) = read_frame(&mut r) {
                assert!(obj.get("success").is_some_and(Value::is_boolean), "{obj:?}");
                if obj["success"] == false {
                    assert!(
                        obj["error"].as_str().is_some_and(|e| !e.is_empty()),
                        "{obj:?}"
                    );
                }
                n += 1;
            }
            n
        });
        for f in &frames {
            s.write_all(f).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let n = reader.join().unwrap();
        assert_eq!(n, 1000, "every frame is answered once");
        replies_total += n;
    }
    assert_eq!(replies_total, 10_000);

    // An announced 4 GiB: an error reply, then the connection closes.
    let mut s = connect(&sock);
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    s.write_all(b"{\"method\":").unwrap();
    let r = recv(&mut s).expect("an error frame");
    assert_eq!(r["success"], false);
    assert!(r["error"].as_str().unwrap().contains("exceeds"), "{r}");
    assert!(recv(&mut s).is_none(), "closed after a bad length");
    // A zero length: the same.
    let mut s = connect(&sock);
    s.write_all(&0u32.to_be_bytes()).unwrap();
    assert_eq!(recv(&mut s).unwrap()["error"], "frame length is zero");

    // Half a frame, then gone (a few hundred times).
    for _ in 0..300 {
        let mut s = UnixStream::connect(&sock).unwrap();
        let full = encode_frame(&json!({"method": "isRunning", "id": 1})).unwrap();
        s.write_all(&full[..full.len() / 2]).unwrap();
        // Also: a 10 MiB frame announced, a few bytes sent, then gone.
        let mut s2 = UnixStream::connect(&sock).unwrap();
        s2.write_all(&(10u32 << 20).to_be_bytes()).unwrap();
        s2.write_all(b"{\"a\":").unwrap();
    }

    // 200 concurrent connections, each a one-shot isRunning and an unknown
    // method on a pipe, all open at once.
    let mut conns: Vec<UnixStream> = (0..200).map(|_| connect(&sock)).collect();
    for (i, s) in conns.iter_mut().enumerate() {
        write_frame(s, &json!({"method": "isRunning", "id": i})).unwrap();
        write_frame(s, &json!({"method": "noSuchThing", "id": i + 1000})).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut got = [recv(s).unwrap(), recv(s).unwrap()];
        got.sort_by_key(|r| r["id"].as_u64());
        assert_eq!(
            got[0],
            json!({"success": true, "result": {"running": false}, "id": i})
        );
        assert_eq!(
            got[1],
            json!({"success": false, "error": "Unknown method: noSuchThing", "id": i + 1000})
        );
    }
    drop(conns);

    // Still serving, and nothing piled up.
    assert!(!is_running(&sock));
    let r = one_shot(&sock, "frobnicate", json!({}));
    assert_eq!(
        r,
        json!({"success": false, "error": "Unknown method: frobnicate"})
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(h.is_alive(), "the helper died: {}", h.log());
    let rss_after = h.rss_kib();
    println!(
        "helper RSS: before {rss_before} KiB, after {rss_after} KiB (+{} KiB)",
        rss_after.saturating_sub(rss_before)
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}
