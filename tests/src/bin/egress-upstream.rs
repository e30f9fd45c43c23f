//! `egress-upstream`: the local upstream of the egress rig test and
//! benchmark, the stand-in for the internet a session reaches through the
//! helper's egress proxy (tests/tests/rig/egress.rs, `coworkvm-rig bench
//! --egress-only`).
//!
//! usage: egress-upstream --addr IP --ca-out PATH [--http-port N]
//!        [--https-port N] [--pidfile PATH] [--down-file PATH]
//!        [--stop-after SECS]
//!
//! At start it makes a CA and one leaf certificate for [`NAMES`] (rcgen,
//! ECDSA P-256) and writes the CA's PEM to `--ca-out` (the test installs
//! it for the helper's probe and in the session). It then serves plain
//! HTTP on `IP:--http-port` (default 80) and TLS (rustls, ring) on
//! `IP:--https-port` (default 443), one request per connection:
//! - `GET /` answers 200 `hello <name>`, where name is the TLS server name
//!   (SNI) the client sent, or else the `Host` header without its port;
//! - `GET /bytes/N` answers 200 with N bytes (at most [`MAX_BYTES`]);
//! - `POST /v1/messages` (any query, any name) is the fake Anthropic
//!   Messages API of [`coworkvm_tests::fakeapi`]: the body (at most
//!   [`fakeapi::MAX_BODY`], `Content-Length` or chunked) gets a canned
//!   tool call or final message, streamed or not as the request asks;
//! - anything else 404.
//!
//! Each request is logged on stderr as `egress-upstream: <tls|http>
//! sni=<name> host=<host> <method> <path> -> <status>`, so a test can
//! tell which names ever reached it; a Messages request adds what it was
//! answered, after the kind of credential it carried (never its value):
//! `auth=bearer stream=true tool_use=Write`, `auth=x-api-key stream=false
//! end_turn="RESULT ok: ..."`, `auth=none error=413 ...`.
//!
//! The pidfile is written once both listeners are bound (a test waits for
//! it). While `--down-file` exists the listeners are closed, so a new
//! connection is refused as if the server were gone; when the file is
//! removed they are bound again. The rig test uses this to take the
//! upstream away and bring it back from a process of another user (the
//! client probe runs as uid 1000, the upstream as root on ports 80 and
//! 443). The process ends by itself after `--stop-after` seconds (default
//! 3600), or at SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use coworkvm_tests::egress::UPSTREAM_NAMES as NAMES;
use coworkvm_tests::fakeapi::{self, Framing};
/// The longest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// The largest `/bytes/N` served: 16 GiB.
const MAX_BYTES: u64 = 16 << 30;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the down-file and the stop time are checked.
const POLL_MS: i32 = 100;

struct Options {
    addr: IpAddr,
    http_port: u16,
    https_port: u16,
    ca_out: PathBuf,
    pidfile: Option<PathBuf>,
    down_file: Option<PathBuf>,
    stop_after: Duration,
}

fn parse_args(args: &[String]) -> Result<Options> {
    let mut addr = None;
    let mut ca_out = None;
    let mut o = Options {
        addr: IpAddr::from([127, 0, 0, 1]),
        http_port: 80,
        https_port: 443,
        ca_out: PathBuf::new(),
        pidfile: None,
        down_file: None,
        stop_after: Duration::from_secs(3600),
    };
    let mut i = 0;
    while i < args.len() {
        let value = args
            .get(i + 1)
            .with_context(|| format!("{} needs a value", args[i]))?;
        match args[i].as_str() {
            "--addr" => addr = Some(value.parse().context("--addr IP")?),
            "--http-port" => o.http_port = value.parse().context("--http-port N")?,
            "--https-port" => o.https_port = value.parse().context("--https-port N")?,
            "--ca-out" => ca_out = Some(PathBuf::from(value)),
            "--pidfile" => o.pidfile = Some(PathBuf::from(value)),
            "--down-file" => o.down_file = Some(PathBuf::from(value)),
            "--stop-after" => {
                o.stop_after = Duration::from_secs(value.parse().context("--stop-after SECS")?)
            }
            other => bail!("unknown argument {other}"),
        }
        i += 2;
    }
    o.addr = addr.context("--addr IP is required")?;
    o.ca_out = ca_out.context("--ca-out PATH is required")?;
    Ok(o)
}

/// The CA's PEM and the server's TLS configuration.
fn make_tls() -> Result<(String, Arc<rustls::ServerConfig>)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "coworkvm egress test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    leaf.distinguished_name.push(DnType::CommonName, NAMES[0]);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let chain = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    Ok((ca_cert.pem(), Arc::new(config)))
}

/// Writes `data` to `path` whole (a temporary file renamed into place), so
/// a reader never sees half of it.
fn write_whole(path: &std::path::Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// One parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    /// The `Host` header without a port, lower case; empty if none.
    host: String,
    /// How the body is framed.
    framing: Framing,
    /// Which credential the request carried, never its value:
    /// `bearer` (`Authorization: Bearer`, Claude Code's OAuth mode),
    /// `x-api-key` (API key mode), or `none`.
    auth: &'static str,
}

/// Parses a request head (up to and without the blank line).
fn parse_head(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path, version) = (first.next()?, first.next()?, first.next()?);
    if first.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let mut host = String::new();
    let mut framing = Framing::Empty;
    let mut auth = "none";
    for l in lines {
        let (name, value) = l.split_once(':')?;
        if name.eq_ignore_ascii_case("host") {
            let value = value.trim();
            // `[v6]:port`, `name:port` or a bare name.
            host = match value.rsplit_once(':') {
                Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
                _ => value,
            }
            .to_ascii_lowercase();
        } else if name.eq_ignore_ascii_case("authorization") {
            let scheme = value.trim().split(' ').next().unwrap_or("");
            auth = if scheme.eq_ignore_ascii_case("bearer") {
                "bearer"
            } else {
                "other"
            };
        } else if name.eq_ignore_ascii_case("x-api-key") && auth == "none" {
            auth = "x-api-key";
        } else if name.eq_ignore_ascii_case("content-length") {
            framing = match (framing, value.trim().parse::<u64>()) {
                (Framing::Empty, Ok(n)) => Framing::Length(n),
                (Framing::Length(m), Ok(n)) if m == n => Framing::Length(n),
                (Framing::Chunked, Ok(_)) => Framing::Chunked,
                _ => Framing::Invalid,
            };
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked wins over a Content-Length (RFC 9112 6.3); any other
            // coding is not understood.
            framing = if value.trim().eq_ignore_ascii_case("chunked") && framing != Framing::Invalid
            {
                Framing::Chunked
            } else {
                Framing::Invalid
            };
        }
    }
    Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        host,
        framing,
        auth,
    })
}

/// Reads a request head, at most [`MAX_HEAD`] bytes.
fn read_head(r: &mut impl BufRead) -> Option<String> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r
            .take((MAX_HEAD - head.len()) as u64)
            .read_until(b'\n', &mut line)
            .ok()?;
        if n == 0 || !line.ends_with(b"\n") {
            return None;
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        head.extend_from_slice(&line);
    }
    let text = String::from_utf8(head).ok()?;
    Some(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// What to answer: status, reason, and the body (text of a content type,
/// or N bytes).
enum Body {
    Text(String),
    Typed(&'static str, String),
    Bytes(u64),
}

/// Whether `req` is for the fake Messages API.
fn is_messages(req: &Request) -> bool {
    req.method == "POST" && req.path.split('?').next() == Some(fakeapi::MESSAGES_PATH)
}

/// Message ids: unique within the process.
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

fn answer(req: &Request, name: &str) -> (u16, &'static str, Body) {
    if req.method != "GET" {
        return (405, "Method Not Allowed", Body::Text(String::new()));
    }
    if req.path == "/" {
        return (200, "OK", Body::Text(format!("hello {name}\n")));
    }
    if let Some(n) = req.path.strip_prefix("/bytes/") {
        return match n.parse::<u64>() {
            Ok(n) if n <= MAX_BYTES => (200, "OK", Body::Bytes(n)),
            _ => (400, "Bad Request", Body::Text("bad size\n".into())),
        };
    }
    (404, "Not Found", Body::Text(String::new()))
}

/// Reads one request from `s` and answers it.
fn serve(s: &mut (impl Read + Write), tls_name: Option<String>) -> Option<String> {
    // One reader for the head and the body: its buffer may already hold
    // the start of the body.
    let mut reader = BufReader::new(&mut *s);
    let head = read_head(&mut reader)?;
    let req = parse_head(&head)?;
    let name = tls_name.clone().unwrap_or_else(|| req.host.clone());
    let mut note = String::new();
    let (status, reason, body) = if is_messages(&req) {
        let body = fakeapi::read_body(&mut reader, req.framing);
        let id = format!("fake{:04}", NEXT_ID.fetch_add(1, Ordering::SeqCst));
        let r = fakeapi::reply(body, &id);
        note = format!(" auth={} {}", req.auth, r.summary);
        (r.status, r.reason, Body::Typed(r.content_type, r.body))
    } else {
        answer(&req, &name)
    };
    drop(reader);
    let len = match &body {
        Body::Text(t) | Body::Typed(_, t) => t.len() as u64,
        Body::Bytes(n) => *n,
    };
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {len}\r\nContent-Type: {}\r\n\
         Connection: close\r\n\r\n",
        match body {
            Body::Text(_) => "text/plain",
            Body::Typed(t, _) => t,
            Body::Bytes(_) => "application/octet-stream",
        }
    );
    s.write_all(reply.as_bytes()).ok()?;
    match body {
        Body::Text(t) | Body::Typed(_, t) => s.write_all(t.as_bytes()).ok()?,
        Body::Bytes(mut n) => {
            let chunk = vec![b'x'; 64 * 1024];
            while n > 0 {
                let k = n.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..k]).ok()?;
                n -= k as u64;
            }
        }
    }
    s.flush().ok()?;
    Some(format!(
        "sni={} host={} {} {} -> {status}{note}",
        tls_name.as_deref().unwrap_or("-"),
        if req.host.is_empty() { "-" } else { &req.host },
        req.method,
        req.path
    ))
}

fn connection(mut tcp: TcpStream, tls: Option<Arc<rustls::ServerConfig>>) {
    let _ = tcp.set_read_timeout(Some(HEAD_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(60)));
    let _ = tcp.set_nodelay(true);
    let logged = match tls {
        None => serve(&mut tcp, None).map(|l| format!("http {l}")),
        Some(cfg) => {
            let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                return;
            };
            let mut stream = rustls::StreamOwned::new(conn, tcp);
            // The handshake first, so that the server name is known.
            while stream.conn.is_handshaking() {
                if stream.conn.complete_io(&mut stream.sock).is_err() {
                    eprintln!("egress-upstream: tls handshake failed");
                    return;
                }
            }
            let sni = stream.conn.server_name().map(str::to_owned);
            let l = serve(&mut stream, Some(sni.unwrap_or_default()));
            stream.conn.send_close_notify();
            let _ = stream.flush();
            l.map(|l| format!("tls {l}"))
        }
    };
    match logged {
        Some(l) => eprintln!("egress-upstream: {l}"),
        None => eprintln!("egress-upstream: a request that did not parse or was cut off"),
    }
}

fn bind(o: &Options) -> Result<[TcpListener; 2]> {
    let http = TcpListener::bind(SocketAddr::new(o.addr, o.http_port))
        .with_context(|| format!("binding {}:{}", o.addr, o.http_port))?;
    let https = TcpListener::bind(SocketAddr::new(o.addr, o.https_port))
        .with_context(|| format!("binding {}:{}", o.addr, o.https_port))?;
    Ok([http, https])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = parse_args(&args).context(
        "usage: egress-upstream --addr IP --ca-out PATH [--http-port N] [--https-port N] \
         [--pidfile PATH] [--down-file PATH] [--stop-after SECS]",
    )?;
    let (ca_pem, tls) = make_tls()?;
    write_whole(&o.ca_out, ca_pem.as_bytes())?;
    let start = Instant::now();
    let active = Arc::new(AtomicUsize::new(0));
    let mut listeners: Option<[TcpListener; 2]> = None;
    let mut pid_written = false;
    while start.elapsed() < o.stop_after {
        let up = o.down_file.as_ref().is_none_or(|f| !f.exists());
        if up && listeners.is_none() {
            listeners = Some(bind(&o)?);
            eprintln!("egress-upstream: listening on {}", o.addr);
            if !pid_written {
                if let Some(p) = &o.pidfile {
                    write_whole(p, format!("{}\n", std::process::id()).as_bytes())?;
                }
                pid_written = true;
            }
        } else if !up && listeners.is_some() {
            listeners = None;
            eprintln!("egress-upstream: down (listeners closed)");
        }
        let Some(ls) = &listeners else {
            std::thread::sleep(Duration::from_millis(POLL_MS as u64));
            continue;
        };
        let mut fds = ls.each_ref().map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a live array of two pollfd structures whose
        // descriptors `ls` keeps open for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
        if n <= 0 {
            continue;
        }
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            let Ok((tcp, _)) = ls[i].accept() else {
                continue;
            };
            if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                continue;
            }
            active.fetch_add(1, Ordering::SeqCst);
            let tls = (i == 1).then(|| tls.clone());
            let active = active.clone();
            std::thread::spawn(move || {
                connection(tcp, tls);
                active.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }
    eprintln!("egress-upstream: stopping after {:?}", o.stop_after);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_with_and_without_a_port() {
        let r = parse_head("GET / HTTP/1.1\r\nHost: Allowed.Test:80\r\nUser-Agent: x").unwrap();
        assert_eq!(
            r,
            Request {
                method: "GET".into(),
                path: "/".into(),
                host: "allowed.test".into(),
                framing: Framing::Empty,
                auth: "none",
            }
        );
        assert_eq!(
            parse_head("GET /bytes/5 HTTP/1.0\r\nhost: [::1]:8080")
                .unwrap()
                .host,
            "[::1]"
        );
        assert_eq!(parse_head("GET / HTTP/1.1").unwrap().host, "");
        assert!(parse_head("GET /").is_none());
        assert!(parse_head("GET / SPDY/3").is_none());
        assert!(parse_head("GET / HTTP/1.1\r\nno colon").is_none());
    }

    #[test]
    fn heads_are_bounded() {
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(read_head(&mut long.as_bytes()).is_none());
        assert!(read_head(&mut &b"GET / HTTP/1.1\r\nHost: a"[..]).is_none());
        assert_eq!(
            read_head(&mut &b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"[..]).unwrap(),
            "GET / HTTP/1.1\r\nHost: a"
        );
    }

    #[test]
    fn answers() {
        let req = |path: &str| Request {
            method: "GET".into(),
            path: path.into(),
            host: "h".into(),
            framing: Framing::Empty,
            auth: "none",
        };
        assert!(
            matches!(answer(&req("/"), "api.test"), (200, _, Body::Text(t)) if t == "hello api.test\n")
        );
        assert!(matches!(
            answer(&req("/bytes/10"), ""),
            (200, _, Body::Bytes(10))
        ));
        assert!(matches!(answer(&req("/bytes/x"), ""), (400, _, _)));
        let too_big = format!("/bytes/{}", MAX_BYTES + 1);
        assert!(matches!(answer(&req(&too_big), ""), (400, _, _)));
        assert!(matches!(answer(&req("/nope"), ""), (404, _, _)));
    }

    #[test]
    fn bodies_are_framed_by_the_head() {
        let f = |h: &str| {
            parse_head(&format!("POST /v1/messages HTTP/1.1\r\n{h}"))
                .unwrap()
                .framing
        };
        assert_eq!(f("Host: a"), Framing::Empty);
        assert_eq!(f("Content-Length: 12"), Framing::Length(12));
        assert_eq!(
            f("Content-Length: 12\r\ncontent-length: 12"),
            Framing::Length(12)
        );
        assert_eq!(
            f("Content-Length: 12\r\nContent-Length: 13"),
            Framing::Invalid
        );
        assert_eq!(f("Content-Length: -1"), Framing::Invalid);
        assert_eq!(f("Transfer-Encoding: chunked"), Framing::Chunked);
        assert_eq!(
            f("Content-Length: 5\r\nTransfer-Encoding: chunked"),
            Framing::Chunked
        );
        assert_eq!(
            f("Transfer-Encoding: Chunked\r\nContent-Length: 5"),
            Framing::Chunked
        );
        assert_eq!(f("Transfer-Encoding: gzip, chunked"), Framing::Invalid);
        let auth = |h: &str| parse_head(&format!("POST / HTTP/1.1\r\n{h}")).unwrap().auth;
        assert_eq!(auth("Host: a"), "none");
        assert_eq!(auth("x-api-key: sk-ant-fake"), "x-api-key");
        assert_eq!(auth("authorization: bearer sk-ant-oat01-x"), "bearer");
        assert_eq!(auth("Authorization: Basic eDp5"), "other");
    }

    /// A connection in memory: what the client sent, and what it got.
    struct Conn {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Conn {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Conn {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Serves `request` and returns the log line and the reply.
    fn exchange(request: Vec<u8>) -> (String, String) {
        let mut c = Conn {
            input: std::io::Cursor::new(request),
            output: Vec::new(),
        };
        let log = serve(&mut c, Some(coworkvm_tests::egress::FAKE_API_NAME.into())).unwrap();
        (log, String::from_utf8(c.output).unwrap())
    }

    fn post(extra_head: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "POST /v1/messages?beta=true HTTP/1.1\r\nHost: fakeapi.test\r\n{extra_head}\r\n"
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn the_fake_messages_api_answers_over_http() {
        let body = serde_json::json!({"model": "m", "stream": true, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "WRITE /tmp/o.txt hello"}]}]})
        .to_string();
        let (log, reply) = exchange(post(
            &format!(
                "Authorization: Bearer sk-ant-oat01-secret\r\nContent-Length: {}\r\n",
                body.len()
            ),
            body.as_bytes(),
        ));
        assert!(!log.contains("secret"), "{log}");
        assert_eq!(
            log,
            "sni=fakeapi.test host=fakeapi.test POST /v1/messages?beta=true -> 200 \
             auth=bearer stream=true tool_use=Write"
        );
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(
            reply.contains("Content-Type: text/event-stream\r\n"),
            "{reply}"
        );
        assert!(reply.contains("event: message_stop\n"), "{reply}");
        assert!(reply.contains(r#"\"file_path\":\"/tmp/o.txt\""#), "{reply}");

        // The same, chunked and not streamed.
        let body = body.replace("true", "false");
        let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
        let (log, reply) = exchange(post("Transfer-Encoding: chunked\r\n", chunked.as_bytes()));
        assert!(
            log.ends_with("-> 200 auth=none stream=false tool_use=Write"),
            "{log}"
        );
        assert!(
            reply.contains("Content-Type: application/json\r\n"),
            "{reply}"
        );
        assert!(reply.contains(r#""stop_reason":"tool_use""#), "{reply}");
    }

    #[test]
    fn the_fake_messages_api_refuses_oversized_and_malformed_bodies() {
        // Announced over the bound: 413 without the body being sent.
        let (log, reply) = exchange(post(
            &format!("Content-Length: {}\r\n", fakeapi::MAX_BODY + 1),
            b"",
        ));
        assert!(log.contains("-> 413 auth=none error=413"), "{log}");
        assert!(
            reply.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{reply}"
        );
        assert!(reply.contains(r#""type":"request_too_large""#), "{reply}");
        let (log, reply) = exchange(post("Content-Length: 9\r\n", b"{not json"));
        assert!(log.contains("-> 400 auth=none error=400"), "{log}");
        assert!(
            reply.contains(r#""type":"invalid_request_error""#),
            "{reply}"
        );
        let (log, _) = exchange(post("Content-Length: 1\r\nContent-Length: 2\r\n", b"{}"));
        assert!(
            log.contains("-> 400 auth=none error=400 bad body framing"),
            "{log}"
        );
        // Other methods and paths are not the API.
        let (log, _) =
            exchange(b"GET /v1/messages HTTP/1.1\r\nHost: fakeapi.test\r\n\r\n".to_vec());
        assert!(log.ends_with("GET /v1/messages -> 404"), "{log}");
    }

    #[test]
    fn arguments() {
        let a = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let o = parse_args(&a(
            "--addr 10.99.0.1 --ca-out /tmp/ca.pem --https-port 8443",
        ))
        .unwrap();
        assert_eq!(
            (o.addr.to_string(), o.http_port, o.https_port),
            ("10.99.0.1".into(), 80, 443 + 8000)
        );
        assert!(parse_args(&a("--ca-out /x")).is_err());
        assert!(parse_args(&a("--addr 1.2.3.4")).is_err());
        assert!(parse_args(&a("--addr nope --ca-out /x")).is_err());
        assert!(parse_args(&a("--addr 1.2.3.4 --ca-out /x --bogus 1")).is_err());
        assert!(parse_args(&a("--addr 1.2.3.4 --ca-out")).is_err());
    }
}
