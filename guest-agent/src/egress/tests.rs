//! The proxies end to end over local TCP, with a fake host: a dialer
//! whose Unix socket pair's far end plays the helper.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};

use super::*;

/// What the fake helper does with an open line.
#[derive(Clone, Copy, Debug)]
enum Helper {
    /// `{"ok":true}`, then `first` bytes, then echoes until end of input.
    OpenAndEcho {
        first: &'static [u8],
    },
    Refuse(EgressRefusal),
    /// Reads the line and never answers (until the stream closes).
    Silent,
    /// Answers a line that is not a reply.
    Garbage,
}

/// A dialer to a fake helper that does `what`, sending each open line it
/// reads on the receiver.
fn fake_host(what: Helper) -> (Dialer, Receiver<EgressOpen>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let dialer: Dialer = Arc::new(move || {
        let (agent, mut helper) = UnixStream::pair().expect("socketpair");
        let tx = lock(&tx).clone();
        std::thread::spawn(move || {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while helper.read_exact(&mut b).is_ok() {
                line.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            let Ok(open) = decode_line::<EgressOpen>(&line, MAX_OPEN_LINE) else {
                return;
            };
            let _ = tx.send(open);
            match what {
                Helper::OpenAndEcho { first } => {
                    let mut out = encode_line(&EgressReply::open());
                    out.extend_from_slice(first);
                    helper.write_all(&out).unwrap();
                    let mut buf = [0u8; 4096];
                    loop {
                        match helper.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if helper.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = helper.shutdown(Shutdown::Write);
                }
                Helper::Refuse(why) => {
                    let _ = helper.write_all(&encode_line(&EgressReply::refused(why, "no")));
                }
                Helper::Silent => {
                    let _ = helper.read(&mut [0u8; 16]);
                }
                Helper::Garbage => {
                    let _ = helper.write_all(b"HTTP/1.1 200 OK\r\n\r\n\n");
                }
            }
        });
        Ok(Socket::from(agent))
    });
    (dialer, rx)
}

fn quick() -> Bounds {
    Bounds {
        handshake: Duration::from_millis(400),
        reply: Duration::from_millis(400),
        ..Bounds::default()
    }
}

/// Proxies of session `name` on ephemeral local ports (no namespace: the
/// descriptor is the test's own namespace's).
struct Rig {
    _net: SessionNet,
    http: SocketAddr,
    socks: SocketAddr,
}

fn serve(egress: &Egress, name: &str) -> Rig {
    let listen = || TcpListener::bind("127.0.0.1:0").unwrap();
    let ns = netns::Namespace {
        fd: OwnedFd::from(std::fs::File::open("/proc/self/ns/net").unwrap()),
        http: listen(),
        socks: listen(),
    };
    let (http, socks) = (
        ns.http.local_addr().unwrap(),
        ns.socks.local_addr().unwrap(),
    );
    Rig {
        _net: egress.serve(name, ns).unwrap(),
        http,
        socks,
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn read_all(s: &mut TcpStream) -> String {
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    String::from_utf8_lossy(&v).into_owned()
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn connect_tunnels_after_the_hosts_ok() {
    let (dialer, opens) = fake_host(Helper::OpenAndEcho { first: b"hello>" });
    let egress = Egress::per_session(dialer, quick());
    let rig = serve(&egress, "s1");
    let mut c = connect(rig.http);
    c.write_all(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\nearly")
        .unwrap();
    assert_eq!(read_n(&mut c, http::CONNECTED.len()), http::CONNECTED);
    assert_eq!(read_n(&mut c, 11), b"hello>early");
    c.write_all(b" ping").unwrap();
    assert_eq!(read_n(&mut c, 5), b" ping");
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut c), "");
    let open = opens.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        open,
        EgressOpen {
            v: 1,
            session: Some("s1".into()),
            probe: None,
            host: "api.test".into(),
            port: 443,
            via: Via::Connect,
        }
    );
}

#[test]
fn an_allowlist_refusal_is_403_with_the_header() {
    let (dialer, opens) = fake_host(Helper::Refuse(EgressRefusal::BlockedByAllowlist));
    let egress = Egress::per_session(dialer, quick());
    let rig = serve(&egress, "s1");
    let mut c = connect(rig.http);
    c.write_all(b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_all(&mut c),
        "HTTP/1.1 403 Forbidden\r\nX-Proxy-Error: blocked-by-allowlist\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(opens.recv().unwrap().host, "denied.test");
    // Absolute-URI, likewise.
    let mut c = connect(rig.http);
    c.write_all(b"GET http://denied.test/x HTTP/1.1\r\nHost: denied.test\r\n\r\n")
        .unwrap();
    assert!(read_all(&mut c)
        .starts_with("HTTP/1.1 403 Forbidden\r\nX-Proxy-Error: blocked-by-allowlist\r\n"));
    let open = opens.recv().unwrap();
    assert_eq!(
        (open.host.as_str(), open.port, open.via),
        ("denied.test", 80, Via::Http)
    );
}

#[test]
fn a_refused_client_still_sending_its_body_gets_the_answer() {
    let (dialer, _opens) = fake_host(Helper::Refuse(EgressRefusal::BlockedByAllowlist));
    let egress = Egress::per_session(dialer, quick());
    let rig = serve(&egress, "s1");
    let mut c = connect(rig.http);
    c.write_all(b"POST http://denied.test/ HTTP/1.1\r\nContent-Length: 32768\r\n\r\n")
        .unwrap();
    let mut w = c.try_clone().unwrap();
    // The body keeps coming after the refusal: its writes must not be
    // reset (a close with unread input would).
    let body = std::thread::spawn(move || {
        for _ in 0..32 {
            w.write_all(&[b'b'; 1024])?;
            std::thread::sleep(Duration::from_millis(10));
        }
        w.shutdown(Shutdown::Write)
    });
    assert!(read_all(&mut c).starts_with("HTTP/1.1 403 Forbidden\r\n"));
    body.join().unwrap().unwrap();
}

#[test]
fn an_absolute_uri_request_is_forwarded_in_origin_form() {
    let (dialer, opens) = fake_host(Helper::OpenAndEcho { first: b"" });
    let egress = Egress::per_session(dialer, quick());
    let rig = serve(&egress, "s1");
    let mut c = connect(rig.http);
    c.write_all(
        b"POST http://allowed.test:8080/a?b HTTP/1.1\r\nHost: other.test\r\n\
          Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n\
          Content-Length: 4\r\n\r\nbody",
    )
    .unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    // The echo: what the origin received.
    assert_eq!(
        read_all(&mut c),
        "POST /a?b HTTP/1.1\r\nHost: allowed.test:8080\r\nContent-Length: 4\r\n\
         Connection: close\r\n\r\nbody"
    );
    let open = opens.recv().unwrap();
    assert_eq!(
        (open.host.as_str(), open.port, open.via),
        ("allowed.test", 8080, Via::Http)
    );
}

#[test]
fn malformed_and_slow_requests_get_400_without_a_stream() {
    let (dialer, opens) = fake_host(Helper::OpenAndEcho { first: b"" });
    let egress = Egress::per_session(dialer, quick());
    let rig = serve(&egress, "s1");
    let bad = "HTTP/1.1 400 Bad Request\r\nX-Proxy-Error: bad-request\r\n\
               Content-Length: 0\r\nConnection: close\r\n\r\n";
    for req in [
        &b"GET https://a.test/ HTTP/1.1\r\n\r\n"[..],
        b"CONNECT a.test HTTP/1.1\r\n\r\n",
        b"garbage\r\n\r\n",
        b"GET http://a.test/ HTTP/1.1\nHost: a\n\n",
        b"\x05\x01\x00",
    ] {
        let mut c = connect(rig.http);
        c.write_all(req).unwrap();
        if req.starts_with(b"\x05") {
            // Not HTTP and never a head: cut off at the time bound.
            let started = Instant::now();
            assert_eq!(read_all(&mut c), bad);
            assert!(started.elapsed() >= Duration::from_millis(300));
            continue;
        }
        assert_eq!(read_all(&mut c), bad, "{req:?}");
    }
    // Over 16 KiB without an end: refused at the byte bound, before the
    // time bound.
    let mut c = connect(rig.http);
    let started = Instant::now();
    let mut big = b"GET http://a.test/ HTTP/1.1\r\n".to_vec();
    while big.len() <= http::MAX_HEAD {
        big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let _ = c.write_all(&big);
    assert_eq!(read_all(&mut c), bad);
    assert!(started.elapsed() < Duration::from_millis(300));
    // A client trickling a byte at a time is cut off at the time bound.
    let mut c = connect(rig.http);
    let started = Instant::now();
    let mut w = c.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for b in b"GET http://a.test/ HTTP/1.1\r\nX-Slow: ".iter().cycle() {
            if w.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    assert_eq!(read_all(&mut c), bad);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    drop(c);
    trickle.join().unwrap();
    assert!(opens.try_recv().is_err(), "nothing was asked of the host");
}

#[test]
fn socks5_connects_and_refuses_with_the_hosts_code() {
    let (dialer, opens) = fake_host(Helper::OpenAndEcho { first: b"" });
    let egress = Egress::per_session(dialer, quick());
    let rig = serve(&egress, "s2");
    let mut c = connect(rig.socks);
    // Greeting and request in one write, and data right behind them.
    let mut hello = vec![5, 2, 2, 0, 5, 1, 0, 3, 8];
    hello.extend_from_slice(b"api.test");
    hello.extend_from_slice(&[1, 187]);
    hello.extend_from_slice(b"data");
    c.write_all(&hello).unwrap();
    assert_eq!(read_n(&mut c, 2), [5, 0]);
    assert_eq!(read_n(&mut c, 10), [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(read_n(&mut c, 4), b"data");
    let open = opens.recv().unwrap();
    assert_eq!(open.session.as_deref(), Some("s2"));
    assert_eq!(
        (open.host.as_str(), open.port, open.via),
        ("api.test", 443, Via::Socks)
    );

    let (dialer, _opens) = fake_host(Helper::Refuse(EgressRefusal::BlockedByAllowlist));
    let egress = Egress::per_session(dialer, quick());
    let rig = serve(&egress, "s2");
    let mut c = connect(rig.socks);
    c.write_all(&[5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 0, 80])
        .unwrap();
    let got = read_all(&mut c);
    assert_eq!(got.as_bytes(), [5, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn socks5_handshake_failures() {
    let (dialer, opens) = fake_host(Helper::OpenAndEcho { first: b"" });
    let egress = Egress::per_session(dialer, quick());
    let rig = serve(&egress, "s1");
    let talk = |bytes: &[u8]| {
        let mut c = connect(rig.socks);
        c.write_all(bytes).unwrap();
        let mut v = Vec::new();
        let _ = c.read_to_end(&mut v);
        v
    };
    // Username/password only: no acceptable method.
    assert_eq!(talk(&[5, 1, 2]), [5, 0xff]);
    // BIND, an unknown address type, an empty domain.
    assert_eq!(
        talk(&[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80])[2..4],
        [5, 7]
    );
    assert_eq!(
        talk(&[5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80])[2..4],
        [5, 8]
    );
    assert_eq!(talk(&[5, 1, 0, 5, 1, 0, 3, 0, 0, 80])[2..4], [5, 1]);
    // Not SOCKS5: closed without a word.
    assert_eq!(talk(b"GET / HTTP/1.1\r\n\r\n"), b"");
    // A truncated greeting: cut off at the time bound.
    let started = Instant::now();
    assert_eq!(talk(&[5, 3, 0]), b"");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(opens.try_recv().is_err());
}

#[test]
fn an_unreachable_or_silent_host_is_502_or_504() {
    let failing: Dialer = Arc::new(|| {
        Err(DialError::Socket(io::Error::from_raw_os_error(
            libc::EAFNOSUPPORT,
        )))
    });
    let egress = Egress::per_session(failing, quick());
    let rig = serve(&egress, "s1");
    let mut c = connect(rig.http);
    c.write_all(b"CONNECT a.test:443 HTTP/1.1\r\n\r\n").unwrap();
    assert!(
        read_all(&mut c).starts_with("HTTP/1.1 502 Bad Gateway\r\nX-Proxy-Error: unreachable\r\n")
    );
    let mut c = connect(rig.socks);
    c.write_all(&[5, 1, 0, 5, 1, 0, 1, 1, 2, 3, 4, 0, 80])
        .unwrap();
    assert_eq!(read_all(&mut c).as_bytes()[2..4], [5, 4]);

    for (helper, status) in [
        (
            Helper::Silent,
            "HTTP/1.1 504 Gateway Timeout\r\nX-Proxy-Error: timeout\r\n",
        ),
        (
            Helper::Garbage,
            "HTTP/1.1 502 Bad Gateway\r\nX-Proxy-Error: unreachable\r\n",
        ),
    ] {
        let (dialer, _opens) = fake_host(helper);
        let egress = Egress::per_session(dialer, quick());
        let rig = serve(&egress, "s1");
        let mut c = connect(rig.http);
        c.write_all(b"CONNECT a.test:443 HTTP/1.1\r\n\r\n").unwrap();
        let got = read_all(&mut c);
        assert!(got.starts_with(status), "{helper:?}: {got}");
    }
}

#[test]
fn connections_over_the_bounds_are_refused_as_busy() {
    let (dialer, _opens) = fake_host(Helper::OpenAndEcho { first: b"" });
    let bounds = Bounds {
        per_session: 2,
        per_agent: 3,
        ..quick()
    };
    let egress = Egress::per_session(dialer, bounds);
    let a = serve(&egress, "a");
    let b = serve(&egress, "b");
    let open_tunnel = |addr| {
        let mut c = connect(addr);
        c.write_all(b"CONNECT x.test:443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_n(&mut c, http::CONNECTED.len()), http::CONNECTED);
        c
    };
    let a1 = open_tunnel(a.http);
    let _a2 = open_tunnel(a.http);
    // Session a is full, on either proxy.
    let mut c = connect(a.http);
    assert_eq!(
        read_all(&mut c),
        "HTTP/1.1 503 Service Unavailable\r\nX-Proxy-Error: busy\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let mut c = connect(a.socks);
    c.write_all(&[5, 1, 0, 5, 1, 0, 1, 1, 2, 3, 4, 0, 80])
        .unwrap();
    assert_eq!(
        read_all(&mut c).as_bytes(),
        [5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    // Session b has one left before the agent's bound.
    let _b1 = open_tunnel(b.http);
    let mut c = connect(b.http);
    assert!(read_all(&mut c).starts_with("HTTP/1.1 503 "));
    // A connection that ends gives its place back.
    drop(a1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = connect(a.http);
        c.write_all(b"CONNECT x.test:443 HTTP/1.1\r\n\r\n").unwrap();
        let mut head = vec![0u8; 12];
        c.read_exact(&mut head).unwrap();
        if head == b"HTTP/1.1 200" {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn forgetting_a_session_stops_its_proxies() {
    let (dialer, _opens) = fake_host(Helper::OpenAndEcho { first: b"" });
    let egress = Egress::per_session(dialer, quick());
    let rig = serve(&egress, "s1");
    let addr = rig.http;
    // The live tunnel outlives its listener.
    let mut c = connect(addr);
    c.write_all(b"CONNECT x.test:443 HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_n(&mut c, http::CONNECTED.len()), http::CONNECTED);
    drop(rig);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < deadline, "still accepting");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.write_all(b"still").unwrap();
    assert_eq!(read_n(&mut c, 5), b"still");
}

#[test]
fn the_probe_reports_the_hosts_answer() {
    let p = EgressProbeParams {
        nonce: "n-123".into(),
        host: "api.test".into(),
        port: 443,
    };
    let (dialer, opens) = fake_host(Helper::Refuse(EgressRefusal::DnsFailure));
    let egress = Egress::channel_only(dialer);
    assert!(!egress.serves_sessions());
    assert_eq!(
        egress.probe(&p).unwrap(),
        json!({"ok": false, "error": "dns-failure"})
    );
    assert_eq!(
        opens.recv().unwrap(),
        EgressOpen {
            v: 1,
            session: None,
            probe: Some("n-123".into()),
            host: "api.test".into(),
            port: 443,
            via: Via::Probe,
        }
    );
    let (dialer, _opens) = fake_host(Helper::OpenAndEcho { first: b"" });
    assert_eq!(
        Egress::channel_only(dialer).probe(&p).unwrap(),
        json!({"ok": true})
    );
    // No host, or no answer: an error, not a reply.
    let failing: Dialer = Arc::new(|| {
        Err(DialError::Socket(io::Error::from_raw_os_error(
            libc::ENODEV,
        )))
    });
    let e = Egress::channel_only(failing).probe(&p).unwrap_err();
    assert!(matches!(e, EgressError::Dial(_)), "{e}");
    let (dialer, _opens) = fake_host(Helper::Silent);
    let egress = Egress::per_session(dialer, quick());
    let e = egress.probe(&p).unwrap_err();
    assert!(
        matches!(e, EgressError::Reply(BoundedReadError::TimedOut(_))),
        "{e}"
    );
    // A nonce that would make the line too long is not sent.
    let long = EgressProbeParams {
        nonce: "n".repeat(MAX_OPEN_LINE),
        ..p
    };
    let e = egress.probe(&long).unwrap_err();
    assert!(matches!(e, EgressError::OpenTooLong(_)), "{e}");
}

/// Root only: a session's real namespace, reached from inside it, and
/// not from outside; a second session's namespace is another one.
#[test]
fn sessions_proxies_live_in_their_own_namespaces() {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        coworkvm_tests::skip_or_fail("making network namespaces needs root");
        return;
    }
    let (dialer, opens) = fake_host(Helper::Refuse(EgressRefusal::BlockedByAllowlist));
    let egress = Egress::per_session(dialer, quick());
    assert!(egress.serves_sessions());
    let one = egress.session_net("one").unwrap().unwrap();
    let again = egress.session_net("one").unwrap().unwrap();
    assert!(Arc::ptr_eq(&one, &again), "one namespace per session");
    let two = egress.session_net("two").unwrap().unwrap();
    // From inside each namespace, its own proxy answers, tagged with its
    // session's name.
    for (net, name) in [(&one, "one"), (&two, "two")] {
        let fd = net.netns_fd();
        let got = std::thread::spawn(move || {
            // SAFETY: setns on a live namespace descriptor; this thread
            // ends right after.
            assert_eq!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }, 0);
            let mut c = connect(SocketAddr::from(([127, 0, 0, 1], 3128)));
            c.write_all(b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n")
                .unwrap();
            read_all(&mut c)
        })
        .join()
        .unwrap();
        assert!(got.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{got}");
        assert_eq!(opens.recv().unwrap().session.as_deref(), Some(name));
    }
    // Forgotten: its proxies stop (the namespace lives while a thread or
    // descriptor holds it).
    let fd = one.netns.try_clone().unwrap();
    drop((one, again));
    egress.forget("one");
    let raw = fd.as_raw_fd();
    let refused = std::thread::spawn(move || {
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setns(raw, libc::CLONE_NEWNET) }, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpStream::connect(("127.0.0.1", 3128)) {
                Err(e) => return e.kind(),
                Ok(_) => assert!(Instant::now() < deadline, "still accepting"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .join()
    .unwrap();
    assert_eq!(refused, io::ErrorKind::ConnectionRefused);
    drop(fd);
    egress.forget("two");
}
