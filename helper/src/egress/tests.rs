//! The egress server end to end over a Unix socket pair (the agent's end)
//! and a local TCP upstream, the open-line reader against hostile input,
//! and the spawn environment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use socket_proto::egress::{
    decode_line, encode_line, EgressOpen, EgressRefusal, EgressReply, Via, EGRESS_VERSION,
    MAX_OPEN_LINE, MAX_REPLY_LINE,
};
use socket_proto::redact::Secret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

use super::config::{parse_resolve, EgressConfig};
use super::policy::{normalise, EgressPolicies, Host};
use super::probe::{
    exchange, parse_probe_url, status_line, ExchangeError, ProbeShared, ProbeTarget,
};
use super::server::{read_open_line, EgressServer, OpenLineError, MAX_STREAMS, OPEN_TIMEOUT};
use super::sni::tests::{hello, hello_with_extensions};
use super::{spawn_env, OAUTH_TOKEN_VAR};

struct Setup {
    server: Arc<EgressServer>,
    probes: Arc<ProbeShared>,
}

/// A server where session `s1` may reach `lists`, with these overrides and
/// allowed blocks.
fn setup(list: &[&str], resolve: &[&str], allow: &[&str], tls_port: u16, max: usize) -> Setup {
    let policies = Arc::new(EgressPolicies::default());
    let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    policies.record("s1", Some(&list));
    let mut config = EgressConfig::default();
    for r in resolve {
        config.resolve.push(parse_resolve(r).unwrap());
    }
    for a in allow {
        config.addresses.allow.push(a.parse().unwrap());
    }
    let probes = ProbeShared::new(Some(Host::Name("probe.test".into())));
    let mut server = EgressServer::build(policies, Arc::new(config), probes.clone(), max);
    server.tls_port = tls_port;
    Setup {
        server: Arc::new(server),
        probes,
    }
}

fn open_line(session: &str, host: &str, port: u16, via: Via) -> Vec<u8> {
    encode_line(&EgressOpen {
        v: EGRESS_VERSION,
        session: Some(session.into()),
        probe: None,
        host: host.into(),
        port,
        via,
    })
}

fn probe_line(nonce: &str, host: &str, port: u16) -> Vec<u8> {
    encode_line(&EgressOpen {
        v: EGRESS_VERSION,
        session: None,
        probe: Some(nonce.into()),
        host: host.into(),
        port,
        via: Via::Probe,
    })
}

/// Reads the reply line byte by byte (nothing past it).
async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> EgressReply {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        let n = r.read(&mut b).await.unwrap();
        assert_eq!(n, 1, "the stream ended before the reply: {line:?}");
        line.push(b[0]);
        if b[0] == b'\n' {
            return decode_line(&line, MAX_REPLY_LINE).unwrap();
        }
        assert!(line.len() <= MAX_REPLY_LINE);
    }
}

/// The agent's end of a new stream to `server`, the open line written.
async fn stream(server: &Arc<EgressServer>, line: &[u8]) -> UnixStream {
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    server.clone().admit(theirs);
    ours.write_all(line).await.unwrap();
    ours
}

/// A local upstream: answers `pong:<what it read>` after the client's
/// half-close, then closes. Returns its port and what it read.
async fn echo_upstream() -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let mut answer = b"pong:".to_vec();
        answer.extend_from_slice(&got);
        s.write_all(&answer).await.unwrap();
        s.shutdown().await.unwrap();
        got
    });
    (port, task)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn an_allowed_host_gets_a_stream_both_ways_with_half_close() {
    rt().block_on(async {
        let (port, upstream) = echo_upstream().await;
        let s = setup(
            &["upstream.test"],
            &["upstream.test=127.0.0.1"],
            &["127.0.0.1/32"],
            443,
            MAX_STREAMS,
        );
        let mut line = open_line("s1", "UPSTREAM.test.", port, Via::Connect);
        // Bytes right behind the open line are not lost.
        line.extend_from_slice(b"early,");
        let mut agent = stream(&s.server, &line).await;
        assert_eq!(read_reply(&mut agent).await, EgressReply::open());
        agent.write_all(b"ping").await.unwrap();
        agent.shutdown().await.unwrap();
        let mut back = Vec::new();
        agent.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong:early,ping");
        assert_eq!(upstream.await.unwrap(), b"early,ping");
    });
}

#[test]
fn hosts_outside_the_list_and_unknown_sessions_are_blocked_by_the_allowlist() {
    rt().block_on(async {
        let s = setup(
            &["upstream.test"],
            &["other.test=127.0.0.1"],
            &["127.0.0.1/32"],
            443,
            MAX_STREAMS,
        );
        // A session no spawn named: bad-request.
        let mut agent = stream(&s.server, &open_line("s2", "upstream.test", 80, Via::Http)).await;
        let r = read_reply(&mut agent).await;
        assert_eq!(r.error, Some(EgressRefusal::BadRequest));
        for (session, host) in [
            ("s1", "other.test"),
            ("s1", "x.upstream.test"),
            ("s1", "bad..name"),
        ] {
            let mut agent = stream(&s.server, &open_line(session, host, 80, Via::Http)).await;
            let r = read_reply(&mut agent).await;
            assert_eq!(r.error, Some(EgressRefusal::BlockedByAllowlist), "{host}");
            assert!(!r.ok);
            let mut rest = Vec::new();
            agent.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "closed after the refusal");
        }
    });
}

#[test]
fn loopback_is_refused_unless_an_allow_block_covers_it() {
    rt().block_on(async {
        let (port, upstream) = echo_upstream().await;
        // Listed literally, and a name that resolves there: both refused.
        let s = setup(
            &["127.0.0.1", "local.test"],
            &["local.test=127.0.0.1"],
            &[],
            443,
            MAX_STREAMS,
        );
        for host in ["127.0.0.1", "local.test"] {
            let mut agent = stream(&s.server, &open_line("s1", host, port, Via::Socks)).await;
            let r = read_reply(&mut agent).await;
            assert_eq!(r.error, Some(EgressRefusal::BlockedAddress), "{host}");
        }
        let s = setup(&["127.0.0.1"], &[], &["127.0.0.1/32"], 443, MAX_STREAMS);
        let mut agent = stream(&s.server, &open_line("s1", "127.0.0.1", port, Via::Socks)).await;
        assert_eq!(read_reply(&mut agent).await, EgressReply::open());
        agent.write_all(b"x").await.unwrap();
        agent.shutdown().await.unwrap();
        let mut back = Vec::new();
        agent.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong:x");
        upstream.await.unwrap();
    });
}

#[test]
fn a_closed_port_is_connection_refused() {
    rt().block_on(async {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let s = setup(&["127.0.0.1"], &[], &["127.0.0.1/32"], 443, MAX_STREAMS);
        let mut agent = stream(&s.server, &open_line("s1", "127.0.0.1", port, Via::Http)).await;
        let r = read_reply(&mut agent).await;
        assert_eq!(r.error, Some(EgressRefusal::ConnectionRefused));
    });
}

#[test]
fn a_failed_stream_to_the_probe_host_asks_for_a_probe_now() {
    rt().block_on(async {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let s = setup(
            &["probe.test", "other.test"],
            &["probe.test=127.0.0.1", "other.test=127.0.0.1"],
            &["127.0.0.1/32"],
            443,
            MAX_STREAMS,
        );
        let asked = s.probes.clone();
        let waiter = tokio::spawn(async move { asked.reprobe_requested().await });
        tokio::task::yield_now().await;
        // Another host's failure asks for nothing.
        let mut a = stream(&s.server, &open_line("s1", "other.test", port, Via::Http)).await;
        assert_eq!(
            read_reply(&mut a).await.error,
            Some(EgressRefusal::ConnectionRefused)
        );
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let mut b = stream(&s.server, &open_line("s1", "probe.test", port, Via::Http)).await;
        assert_eq!(
            read_reply(&mut b).await.error,
            Some(EgressRefusal::ConnectionRefused)
        );
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a re-probe was asked for")
            .unwrap();
    });
}

/// A CONNECT to the TLS port: the upstream gets the ClientHello only when
/// its name is the host asked for.
async fn connect_tls(first: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    tls_port_stream(Via::Connect, first).await
}

/// A stream to the TLS port asked for `via`, whose first bytes are
/// `first`: what came back, and what the upstream saw.
async fn tls_port_stream(via: Via, first: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let (port, upstream) = echo_upstream().await;
    let s = setup(
        &["api.test"],
        &["api.test=127.0.0.1"],
        &["127.0.0.1/32"],
        port,
        MAX_STREAMS,
    );
    let mut agent = stream(&s.server, &open_line("s1", "api.test", port, via)).await;
    assert_eq!(read_reply(&mut agent).await, EgressReply::open());
    agent.write_all(&first).await.unwrap();
    agent.shutdown().await.unwrap();
    let mut back = Vec::new();
    // A refused stream closed with our bytes unread may read as a reset.
    let _ = agent.read_to_end(&mut back).await;
    // Refused: the upstream saw its connection close with nothing.
    let got = upstream.await.unwrap();
    (back, got)
}

#[test]
fn connect_443_with_another_sni_is_closed_and_the_same_one_passes() {
    rt().block_on(async {
        let (back, got) = connect_tls(hello("evil.test")).await;
        assert!(back.is_empty(), "refused: nothing comes back");
        assert!(got.is_empty(), "the upstream never saw the ClientHello");

        let h = hello("API.test.");
        let (back, got) = connect_tls(h.clone()).await;
        assert_eq!(got, h, "the ClientHello passes unchanged");
        assert!(back.starts_with(b"pong:"));

        // No SNI: nothing to compare; not TLS at all: passed through.
        let none = hello_with_extensions(None);
        assert_eq!(connect_tls(none.clone()).await.1, none);
        assert_eq!(
            connect_tls(b"GET / HTTP/1.0\r\n\r\n".to_vec()).await.1,
            b"GET / HTTP/1.0\r\n\r\n"
        );

        // A handshake record that does not parse is refused.
        let mut broken = hello("api.test");
        let last = broken.len() - 1;
        broken.truncate(last);
        broken[3..5].copy_from_slice(&((last - 5) as u16).to_be_bytes());
        let (back, got) = connect_tls(broken).await;
        assert!(back.is_empty() && got.is_empty());
    });
}

#[test]
fn a_socks_or_http_stream_to_443_gets_the_sni_check_too() {
    // The session picks how it asks (its SOCKS5 proxy is as good a tunnel
    // as CONNECT), and a hostile agent picks `via`: the SNI check must not
    // depend on it.
    rt().block_on(async {
        for via in [Via::Socks, Via::Http] {
            let (back, got) = tls_port_stream(via, hello("evil.test")).await;
            assert!(back.is_empty() && got.is_empty(), "{via:?}: fronted");
            let h = hello("api.test");
            assert_eq!(tls_port_stream(via, h.clone()).await.1, h, "{via:?}");
        }
        // A plain HTTP request (an absolute-URI request to port 443) passes.
        let get = b"GET / HTTP/1.1\r\nHost: api.test:443\r\n\r\n".to_vec();
        assert_eq!(tls_port_stream(Via::Http, get.clone()).await.1, get);
    });
}

#[test]
fn a_tls_record_before_the_client_hello_does_not_skip_the_sni_check() {
    // Some TLS servers (Go's crypto/tls) drop warning alerts that come
    // before the ClientHello: an alert first, then a ClientHello naming
    // another server, must not pass as "not TLS".
    rt().block_on(async {
        for first_record in [
            &[0x15, 3, 1, 0, 2, 1, 0][..], // warning alert
            &[0x14, 3, 1, 0, 1, 1],        // change_cipher_spec
            &[0x17, 3, 3, 0, 1, 0],        // application data
        ] {
            let mut bytes = first_record.to_vec();
            bytes.extend(hello("evil.test"));
            let (back, got) = connect_tls(bytes).await;
            assert!(
                back.is_empty() && got.is_empty(),
                "{first_record:?} then a fronted ClientHello passed"
            );
        }
    });
}

#[test]
fn the_hosts_own_addresses_are_refused_even_when_public() {
    // A name that resolves to one of the host's own interface addresses
    // (a laptop's global IPv6, say) would reach the host's services on
    // that address: refused as loopback is, unless an allow block covers
    // it. 203.0.113.5 stands in for such an address here.
    fn own() -> std::io::Result<Vec<std::net::IpAddr>> {
        Ok(vec!["203.0.113.5".parse().unwrap()])
    }
    rt().block_on(async {
        for (allow, refused) in [(None, true), (Some("203.0.113.0/24"), false)] {
            let policies = Arc::new(EgressPolicies::default());
            policies.record("s1", Some(&["own.test".to_owned()]));
            let mut config = EgressConfig::default();
            config
                .resolve
                .push(parse_resolve("own.test=203.0.113.5").unwrap());
            config
                .addresses
                .allow
                .extend(allow.map(|a| a.parse::<super::addr::Cidr>().unwrap()));
            let probes = ProbeShared::new(None);
            let mut server = EgressServer::build(policies, Arc::new(config), probes, MAX_STREAMS);
            server.host_addresses = own;
            let server = Arc::new(server);
            let host = normalise("own.test").unwrap();
            let r =
                tokio::time::timeout(Duration::from_millis(300), server.open_upstream(&host, 9))
                    .await;
            let blocked = matches!(r, Ok(Err((EgressRefusal::BlockedAddress, _))));
            assert_eq!(
                blocked,
                refused,
                "allow {allow:?}: {:?}",
                r.map(|r| r.err())
            );
        }
    });
}

#[test]
fn refusal_lines_are_once_per_pair_and_bounded_in_rate() {
    let s = setup(&["api.test"], &[], &[], 443, MAX_STREAMS);
    assert!(s.server.log_refusal("s1", "a.test", "x"));
    assert!(!s.server.log_refusal("s1", "a.test", "x"), "once per pair");
    // A session asking for ever new names does not get a line for each.
    let logged = (0..10_000)
        .filter(|i| s.server.log_refusal("s1", &format!("h{i}.test"), "x"))
        .count();
    assert!(logged <= 64, "{logged} lines");
}

#[test]
fn a_probe_nonce_works_once_and_only_for_its_target() {
    rt().block_on(async {
        let (port, upstream) = echo_upstream().await;
        let s = setup(
            &[],
            &["probe.test=127.0.0.1"],
            &["127.0.0.1/32"],
            443,
            MAX_STREAMS,
        );
        let target = ProbeTarget {
            host: "probe.test".into(),
            port,
        };
        let (nonce, rx) = s.probes.register(Some(target)).unwrap();
        let mut agent = stream(&s.server, &probe_line(&nonce, "probe.test", port)).await;
        assert_eq!(read_reply(&mut agent).await, EgressReply::open());
        let mut tcp = rx.await.unwrap().expect("the prober gets the connection");
        tcp.write_all(b"hi").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut back = Vec::new();
        tcp.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong:hi");
        upstream.await.unwrap();

        // Twice: refused.
        let mut again = stream(&s.server, &probe_line(&nonce, "probe.test", port)).await;
        assert_eq!(
            read_reply(&mut again).await.error,
            Some(EgressRefusal::BadRequest)
        );
        // Another target under a real nonce: refused, and the nonce is spent.
        let target = ProbeTarget {
            host: "probe.test".into(),
            port,
        };
        let (nonce, rx) = s.probes.register(Some(target)).unwrap();
        let mut other = stream(&s.server, &probe_line(&nonce, "evil.test", port)).await;
        assert_eq!(
            read_reply(&mut other).await.error,
            Some(EgressRefusal::BadRequest)
        );
        assert!(matches!(rx.await, Ok(Err(_))));
        assert!(s.probes.take(&nonce).is_none());
        // A session line cannot claim a probe, nor a probe line a session.
        let mixed = encode_line(&EgressOpen {
            v: EGRESS_VERSION,
            session: Some("s1".into()),
            probe: Some("n".into()),
            host: "probe.test".into(),
            port,
            via: Via::Probe,
        });
        let mut m = stream(&s.server, &mixed).await;
        assert_eq!(
            read_reply(&mut m).await.error,
            Some(EgressRefusal::BadRequest)
        );
        // No target (no probe URL): bad-request, which proves the channel.
        let (nonce, _rx) = s.probes.register(None).unwrap();
        let mut dummy = stream(&s.server, &probe_line(&nonce, "", 0)).await;
        assert_eq!(
            read_reply(&mut dummy).await.error,
            Some(EgressRefusal::BadRequest)
        );
    });
}

#[test]
fn bad_lines_are_refused_and_the_server_keeps_serving() {
    rt().block_on(async {
        let s = setup(&["upstream.test"], &[], &[], 443, MAX_STREAMS);
        for line in [
            b"not json\n".to_vec(),
            b"{\"v\":2,\"session\":\"s1\",\"host\":\"a\",\"port\":1,\"via\":\"http\"}\n".to_vec(),
            b"{\"v\":1,\"session\":\"s1\",\"host\":\"a\",\"port\":1,\"via\":\"probe\"}\n".to_vec(),
            vec![b'x'; MAX_OPEN_LINE + 10],
        ] {
            let mut agent = stream(&s.server, &line).await;
            assert_eq!(
                read_reply(&mut agent).await.error,
                Some(EgressRefusal::BadRequest)
            );
        }
    });
}

#[test]
fn streams_over_the_limit_are_busy() {
    rt().block_on(async {
        let s = setup(&[], &[], &[], 443, 2);
        // Two streams that never send their line hold both permits.
        let (_a, a) = UnixStream::pair().unwrap();
        let (_b, b) = UnixStream::pair().unwrap();
        s.server.clone().admit(a);
        s.server.clone().admit(b);
        let mut third = stream(&s.server, b"").await;
        assert_eq!(
            read_reply(&mut third).await.error,
            Some(EgressRefusal::Busy)
        );
    });
}

#[tokio::test(start_paused = true)]
async fn the_open_line_reader_bounds_size_and_time() {
    // Exactly at the bound, with bytes behind it.
    let mut line = vec![b' '; MAX_OPEN_LINE - 1];
    line.push(b'\n');
    line.extend_from_slice(b"data");
    let mut reader = line.as_slice();
    let (l, mut rest) = read_open_line(&mut reader).await.unwrap();
    assert_eq!(l.len(), MAX_OPEN_LINE);
    // What was read past the line comes back; the rest is still unread.
    rest.extend_from_slice(reader);
    assert_eq!(rest, b"data");
    let mut short = b"{}\nfirst bytes".as_slice();
    let (l, rest) = read_open_line(&mut short).await.unwrap();
    assert_eq!(
        (l.as_slice(), rest.as_slice()),
        (&b"{}\n"[..], &b"first bytes"[..])
    );
    // One byte over, newline or not.
    let mut over = vec![b' '; MAX_OPEN_LINE];
    over.push(b'\n');
    assert!(matches!(
        read_open_line(&mut over.as_slice()).await,
        Err(OpenLineError::TooLong)
    ));
    let endless = vec![b'a'; 1 << 20];
    assert!(matches!(
        read_open_line(&mut endless.as_slice()).await,
        Err(OpenLineError::TooLong)
    ));
    // No newline before the end.
    assert!(matches!(
        read_open_line(&mut &b"{\"v\":1"[..]).await,
        Err(OpenLineError::Closed)
    ));
    // A slowloris: one byte a second never completes the line in time.
    let (mut client, mut server) = tokio::io::duplex(64);
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if client.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let started = tokio::time::Instant::now();
    assert!(matches!(
        read_open_line(&mut server).await,
        Err(OpenLineError::Timeout)
    ));
    assert_eq!(started.elapsed(), OPEN_TIMEOUT);
    trickle.abort();
}

#[tokio::test(start_paused = true)]
async fn a_silent_stream_is_answered_and_closed_after_the_open_timeout() {
    let s = setup(&[], &[], &[], 443, MAX_STREAMS);
    let (mut ours, theirs) = tokio::io::duplex(4096);
    let task = tokio::spawn(s.server.clone().handle(theirs));
    let r = read_reply(&mut ours).await;
    assert_eq!(r.error, Some(EgressRefusal::BadRequest));
    task.await.unwrap();
}

#[test]
fn the_spawn_env_gets_the_proxies_and_the_token_unless_it_has_its_own() {
    let env = |pairs: &[(&str, &str)]| {
        Secret::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        )
    };
    let spawn_token = Secret::new("from-spawn".to_string());
    let out = spawn_env(None, true, Some(&spawn_token)).unwrap();
    let vars = out.expose();
    assert_eq!(vars["HTTPS_PROXY"], "http://127.0.0.1:3128");
    assert_eq!(vars["http_proxy"], "http://127.0.0.1:3128");
    assert_eq!(vars["ALL_PROXY"], "socks5h://127.0.0.1:1080");
    assert_eq!(vars["all_proxy"], "socks5h://127.0.0.1:1080");
    assert_eq!(vars["NO_PROXY"], "localhost,127.0.0.1,::1");
    assert_eq!(vars["no_proxy"], "localhost,127.0.0.1,::1");
    assert_eq!(vars[OAUTH_TOKEN_VAR], "from-spawn");
    assert_eq!(vars.len(), 9);
    // The client's own values win.
    let theirs = env(&[
        ("HTTPS_PROXY", "http://mine:1"),
        (OAUTH_TOKEN_VAR, "mine"),
        ("PATH", "/bin"),
    ]);
    let out = spawn_env(Some(&theirs), true, Some(&spawn_token)).unwrap();
    assert_eq!(out.expose()["HTTPS_PROXY"], "http://mine:1");
    assert_eq!(out.expose()[OAUTH_TOKEN_VAR], "mine");
    assert_eq!(out.expose()["PATH"], "/bin");
    assert_eq!(out.expose()["HTTP_PROXY"], "http://127.0.0.1:3128");
    // No token: no variable. No egress: the env as it came, nothing added.
    let out = spawn_env(None, true, None).unwrap();
    assert!(!out.expose().contains_key(OAUTH_TOKEN_VAR));
    assert_eq!(spawn_env(None, false, Some(&spawn_token)), None);
    assert_eq!(
        spawn_env(Some(&theirs), false, Some(&spawn_token)).unwrap(),
        theirs
    );
    // Never in a debug line.
    let out = spawn_env(None, true, Some(&spawn_token)).unwrap();
    assert!(!format!("{out:?}").contains("from-spawn"));
}

/// The client sends some variables empty (`ANTHROPIC_API_KEY=""`); an
/// empty API key would override the OAuth token in the runtime. Empty
/// values are dropped with or without the proxy, and an empty token or
/// proxy variable is filled in as if it were absent.
#[test]
fn the_spawn_env_loses_its_empty_values() {
    let theirs = Secret::new(
        [
            ("ANTHROPIC_API_KEY", ""),
            ("CLAUDE_CODE_DISABLE_CRON", ""),
            (OAUTH_TOKEN_VAR, ""),
            ("HTTPS_PROXY", ""),
            ("CLAUDE_CONFIG_DIR", "/sessions/s/mnt/.claude"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<BTreeMap<_, _>>(),
    );
    let token = Secret::new("tok".to_string());
    let out = spawn_env(Some(&theirs), false, Some(&token)).unwrap();
    assert_eq!(
        out.expose().keys().map(String::as_str).collect::<Vec<_>>(),
        ["CLAUDE_CONFIG_DIR"]
    );
    let out = spawn_env(Some(&theirs), true, Some(&token)).unwrap();
    let vars = out.expose();
    assert!(!vars.contains_key("ANTHROPIC_API_KEY"));
    assert!(!vars.contains_key("CLAUDE_CODE_DISABLE_CRON"));
    assert_eq!(vars[OAUTH_TOKEN_VAR], "tok");
    assert_eq!(vars["HTTPS_PROXY"], "http://127.0.0.1:3128");
    assert_eq!(vars["CLAUDE_CONFIG_DIR"], "/sessions/s/mnt/.claude");
}

#[test]
fn probe_urls_parse_strictly() {
    let u = parse_probe_url("https://API.example.com/v1/ping?x=1#frag").unwrap();
    assert!(u.https);
    assert_eq!(
        (u.host.as_str(), u.port, u.path.as_str()),
        ("API.example.com", 443, "/v1/ping?x=1")
    );
    assert_eq!(u.normal, Host::Name("api.example.com".into()));
    assert_eq!(u.host_header(), "API.example.com");
    let u = parse_probe_url("http://[2001:db8::1]:8080").unwrap();
    assert_eq!(
        (u.host.as_str(), u.port, u.path.as_str()),
        ("2001:db8::1", 8080, "/")
    );
    assert_eq!(u.host_header(), "[2001:db8::1]:8080");
    for bad in [
        "ftp://x.test/",
        "https://user@x.test/",
        "https://x.test:0/",
        "https://x.test:99999/",
        "https://x.test:+1/",
        "https://x test/",
        "https://a..b/",
        "https:///path",
    ] {
        assert!(parse_probe_url(bad).is_err(), "{bad}");
    }
    assert!(parse_probe_url(&format!("https://x.test/{}", "a".repeat(3000))).is_err());
}

#[test]
fn the_status_line_is_read_bounded() {
    rt().block_on(async {
        async fn answer(bytes: &'static [u8]) -> Result<u16, ExchangeError> {
            let (mut server, client) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let mut req = [0u8; 1024];
                let _ = server.read(&mut req).await;
                let _ = server.write_all(bytes).await;
            });
            status_line(client, "h.test", "/").await
        }
        assert_eq!(
            answer(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap(),
            204
        );
        assert_eq!(answer(b"HTTP/1.0 404\r\n").await.unwrap(), 404);
        assert!(matches!(
            answer(b"SSH-2.0-x\r\n").await,
            Err(ExchangeError::Garbled)
        ));
        assert!(matches!(
            answer(b"HTTP/1.1 2000 x\r\n").await,
            Err(ExchangeError::Garbled)
        ));
        assert!(matches!(
            answer(b"HTTP/1.1 20").await,
            Err(ExchangeError::Garbled)
        ));
        assert!(matches!(answer(b"").await, Err(ExchangeError::Closed)));
        let long: &'static [u8] = Box::leak(vec![b'H'; 10_000].into_boxed_slice());
        assert!(matches!(answer(long).await, Err(ExchangeError::Garbled)));
    });
}

#[test]
fn https_to_a_server_that_speaks_no_tls_is_a_tls_error() {
    rt().block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 512];
            let _ = s.read(&mut b).await;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        });
        let url = parse_probe_url(&format!("https://localhost:{port}/")).unwrap();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        assert!(matches!(
            exchange(tcp, &url).await,
            Err(ExchangeError::Tls(_))
        ));
    });
}

#[test]
fn hosts_normalise_for_the_server_as_for_the_list() {
    assert_eq!(
        normalise("Bücher.Example."),
        Ok(Host::Name("xn--bcher-kva.example".into()))
    );
}

#[test]
fn other_ports_check_a_tls_handshake_when_it_comes_and_let_the_server_speak_first() {
    rt().block_on(async {
        // TLS fronting through an allowed host on a port that is not 443.
        let (port, upstream) = echo_upstream().await;
        let s = setup(
            &["api.test"],
            &["api.test=127.0.0.1"],
            &["127.0.0.1/32"],
            443,
            MAX_STREAMS,
        );
        for (name, passes) in [("evil.test", false), ("api.test", true)] {
            let (port, upstream) = if passes {
                echo_upstream().await
            } else {
                (port, tokio::spawn(async { Vec::new() }))
            };
            let mut agent = stream(&s.server, &open_line("s1", "api.test", port, Via::Socks)).await;
            assert_eq!(read_reply(&mut agent).await, EgressReply::open());
            let h = hello(name);
            agent.write_all(&h).await.unwrap();
            agent.shutdown().await.unwrap();
            let mut back = Vec::new();
            let _ = agent.read_to_end(&mut back).await;
            if passes {
                assert_eq!(
                    upstream.await.unwrap(),
                    h,
                    "{name}: the hello passes unchanged"
                );
                assert!(back.starts_with(b"pong:"), "{name}");
            } else {
                assert!(back.is_empty(), "{name}: refused, nothing comes back");
            }
        }
        assert!(
            upstream.await.unwrap().is_empty(),
            "the fronted hello never reached the upstream"
        );

        // A server that speaks first: its banner reaches the session before
        // the session has sent anything.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            c.write_all(b"220 banner\r\n").await.unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut agent = stream(&s.server, &open_line("s1", "api.test", port, Via::Connect)).await;
        assert_eq!(read_reply(&mut agent).await, EgressReply::open());
        let mut banner = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), agent.read_exact(&mut banner))
            .await
            .expect("the banner came before the session spoke")
            .unwrap();
        assert_eq!(&banner, b"220 banner\r\n");
        agent.write_all(b"HELO x\r\n").await.unwrap();
        agent.shutdown().await.unwrap();
        assert_eq!(server.await.unwrap(), b"HELO x\r\n");
    });
}
