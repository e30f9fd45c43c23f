//! The egress tests' local upstream (`egress-upstream`) on this host's
//! loopback, no VM: its CA verifies the names it serves and no other,
//! `GET /` names the TLS server name the client sent (the rig test relies
//! on it to see which name got through), `/bytes/N` sends N bytes, and the
//! down-file takes the listeners away and brings them back.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

struct Upstream(Child);

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn request(s: &mut (impl Read + Write), host: &str, path: &str) -> std::io::Result<Vec<u8>> {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    // The upstream ends a TLS stream with close_notify: rustls would
    // report a bare close as an error.
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    Ok(reply)
}

fn https_get(port: u16, ca: &Path, sni: &str, path: &str) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let reply = request(&mut s, sni, path)?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

fn http_get(port: u16, host: &str, path: &str) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    request(&mut s, host, path)
}

#[test]
fn the_upstream_serves_its_names_and_goes_down_and_up_on_request() {
    let dir = coworkvm_tests::temp_dir("egress-upstream");
    let (http, https) = (free_port(), free_port());
    let (ca, pid, down) = (dir.join("ca.pem"), dir.join("pid"), dir.join("down"));
    let _up = Upstream(
        Command::new(env!("CARGO_BIN_EXE_egress-upstream"))
            .args(["--addr", "127.0.0.1", "--http-port", &http.to_string()])
            .args(["--https-port", &https.to_string()])
            .arg("--ca-out")
            .arg(&ca)
            .arg("--pidfile")
            .arg(&pid)
            .arg("--down-file")
            .arg(&down)
            .args(["--stop-after", "120"])
            .spawn()
            .expect("start egress-upstream"),
    );
    wait_for("the pidfile", Duration::from_secs(20), || pid.exists());
    assert!(std::fs::read_to_string(&ca)
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));

    for name in ["allowed.test", "a.allowed.test", "api.test", "denied.test"] {
        let reply = https_get(https, &ca, name, "/").unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(
            reply.ends_with(&format!("\r\n\r\nhello {name}\n")),
            "{reply}"
        );
    }
    // A name the certificate does not cover fails verification.
    let err = https_get(https, &ca, "other.test", "/").unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");

    let reply = http_get(http, "allowed.test:80", "/").unwrap();
    assert!(reply.ends_with(b"\r\n\r\nhello allowed.test\n"));
    let n = 3 * 1024 * 1024 + 7;
    let reply = http_get(http, "x", &format!("/bytes/{n}")).unwrap();
    let body_at = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&reply[..body_at]);
    assert!(head.contains(&format!("Content-Length: {n}\r\n")), "{head}");
    assert_eq!(reply.len() - body_at, n);
    let reply = http_get(http, "x", "/elsewhere").unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 404 "));

    // Down: connections are refused; up again: served.
    std::fs::write(&down, b"").unwrap();
    wait_for("the listeners to close", Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", http)).is_err()
            && TcpStream::connect(("127.0.0.1", https)).is_err()
    });
    std::fs::remove_file(&down).unwrap();
    wait_for("the listeners to reopen", Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", http)).is_ok()
    });
    let reply = https_get(https, &ca, "api.test", "/").unwrap();
    assert!(reply.ends_with("hello api.test\n"), "{reply}");
    let _ = std::fs::remove_dir_all(&dir);
}
