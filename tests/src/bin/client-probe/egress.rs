//! `client-probe --egress SOCKET BUNDLE_DIR EGRESS_DIR`: a session's network
//! through the helper's egress proxy, driven as the client drives it, and
//! what must never get through.
//!
//! The case script started `egress-upstream` (as root, on
//! [`UPSTREAM_ADDR`] ports 80 and 443, its CA in `EGRESS_DIR/ca.pem`, its
//! down-file `EGRESS_DIR/down`) and the helper with the rig's `[egress]`
//! configuration (every [`UPSTREAM_NAMES`] name routed to the upstream,
//! `loop.test` to 127.0.0.1, only the upstream's address allowed),
//! `RUST_LOG=debug` and `SSL_CERT_FILE` naming the upstream's CA.
//!
//! Sessions, one VM (`startVM` with `apiProbeURL` [`PROBE_URL`]):
//! - `sa`, allowedDomains `allowed.test`, `api.test`, `loop.test`, token
//!   [`TOKEN_A`]: HTTPS through the injected `HTTPS_PROXY`, plain HTTP
//!   through `HTTP_PROXY`, SOCKS5 through `ALL_PROXY` and explicitly; the
//!   refusals (403 with `X-Proxy-Error`, SOCKS5 reply 2): a host not
//!   listed, an IP literal, a listed name resolving to 127.0.0.1, a
//!   CONNECT to `allowed.test:443` whose ClientHello names `denied.test`;
//!   no route and no `AF_VSOCK` from the session;
//! - `sb`, allowedDomains `*.allowed.test`, token [`TOKEN_B`]: the
//!   subdomain only, not the apex; its own token;
//! - `sc`, no allowedDomains, no token: no network; the approved token;
//! - `sa` again with `api.test` only: the latest spawn's list rules.
//!
//! Then `apiReachability` as the upstream goes down (a session's failed
//! request to the probe's host triggers a re-probe) and comes back; after
//! `stopVM` no token in `sessiondata.img`; a second VM whose probe URL
//! does not resolve; `networkStatus` when its VMM is killed.
//!
//! The guest prints the tokens only hex-encoded, so that its own output
//! (which the helper may log) can never be what the case script's search
//! of the logs finds.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use coworkvm_tests::egress::{
    PROBE_URL, TOKEN_A, TOKEN_APPROVED, TOKEN_B, TOKEN_PREFIX, UNRESOLVABLE_PROBE_URL,
    UPSTREAM_ADDR, UPSTREAM_NAMES,
};
use serde_json::json;

use super::shares::results;
use super::{ok, open_and_start_with, poll_connected, vmm_pid, Events, Pipe, Probe};

/// The helpers every session script starts with: `@NAME@` is the
/// session, `@CA@` the upstream's CA (PEM). `try ARGS` prints `rc=<curl's
/// status> <body or error, one line>`; `code ARGS` prints
/// `<http_code>/<http_connect> <X-Proxy-Error or ->`; `tok` the token in
/// hex.
const PRELUDE: &str = r#"cd /sessions/@NAME@ || exit 1
cat > ca.pem <<'PEM'
@CA@PEM
C="curl -sS --max-time 60 --cacert /sessions/@NAME@/ca.pem"
r() { printf 'R %s=%s\n' "$1" "$2"; }
try() { out=$($C "$@" 2>&1); rc=$?; printf 'rc=%s %s' "$rc" "$(printf %s "$out" | tr '\r\n' '  ' | head -c 300)"; }
code() { rm -f hdr; c=$($C -o /dev/null -D hdr -w '%{http_code}/%{http_connect}' "$@" 2>/dev/null)
  e=$(grep -i '^x-proxy-error:' hdr 2>/dev/null | head -n 1 | cut -d: -f2 | tr -d ' \r'); printf '%s %s' "$c" "${e:--}"; }
tok() { printf %s "${CLAUDE_CODE_OAUTH_TOKEN:-}" | od -An -tx1 | tr -d ' \n'; }
"#;

/// Session A: allowedDomains allowed.test, api.test, loop.test.
const SESSION_A: &str = r#"r token "$(tok)"
r https_proxy "${HTTPS_PROXY:-unset} ${https_proxy:-unset}"
r http_proxy "${HTTP_PROXY:-unset} ${http_proxy:-unset}"
r all_proxy "${ALL_PROXY:-unset} ${all_proxy:-unset}"
r no_proxy "${NO_PROXY:-unset}"
r https-allowed "$(try https://allowed.test/)"
r http-allowed "$(try http://allowed.test/)"
r https-api "$(try https://api.test/)"
r http-denied "$(code http://denied.test/)"
r https-denied "$(code https://denied.test/)"
r socks-allowed "$(try --socks5-hostname 127.0.0.1:1080 https://allowed.test/)"
r socks-denied "$(try --socks5-hostname 127.0.0.1:1080 https://denied.test/)"
r all-proxy-allowed "$(out=$(env -u HTTPS_PROXY -u https_proxy $C https://allowed.test/ 2>&1); printf 'rc=%s %s' $? "$out" | tr '\r\n' '  ')"
r ip-https "$(code https://@ADDR@/)"
r ip-http "$(code http://@ADDR@/)"
r ip-socks "$(try --socks5-hostname 127.0.0.1:1080 https://@ADDR@/)"
r loop-http "$(code http://loop.test/)"
r loop-https "$(code https://loop.test/)"
r fronting "$(try -w ' connect=%{http_connect}' --connect-to denied.test:443:allowed.test:443 https://denied.test/)"
r socks-fronting "$(try --socks5-hostname 127.0.0.1:1080 --connect-to denied.test:443:allowed.test:443 https://denied.test/)"
r noproxy "$(try --noproxy '*' --max-time 10 http://192.0.2.1/)"
r connect-errno "$(perl -e 'socket(my $s, 2, 1, 0) or die "socket: $!"; print connect($s, pack("SnC4x8", 2, 80, 192, 0, 2, 1)) ? "connected" : $!+0')"
r vsock "$(perl -e 'print socket(my $s, 40, 1, 0) ? "created" : $!+0')"
r routes "$(tail -n +2 /proc/net/route | wc -l)"
r netdevs "$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ',')"
r nested "$(rm -f /tmp/px.sock; socat UNIX-LISTEN:/tmp/px.sock,fork TCP:127.0.0.1:3128 & sp=$!
  out=$(bwrap --new-session --die-with-parent --unshare-net --unshare-pid --ro-bind / / --dev /dev --proc /proc --bind /tmp /tmp -- sh -c '
    socat TCP-LISTEN:3128,bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:/tmp/px.sock &
    curl -sS --max-time 60 --retry 30 --retry-delay 1 --retry-all-errors --cacert /sessions/@NAME@/ca.pem -x http://127.0.0.1:3128 https://allowed.test/
    echo " inner=$? devs=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " " | tr "\n" ,)"' 2>&1)
  printf 'rc=%s %s' $? "$out" | tr '\r\n' '  '; kill $sp 2>/dev/null)"
r nested-vsock "$(unshare -Urn perl -e 'print socket(my $s, 40, 1, 0) ? "created" : $!+0' 2>&1)"
r nested-netfilter "$(unshare -Urn perl -e 'print socket(my $s, 16, 3, 12) ? "created" : $!+0' 2>&1)"
r userns-bound "$(i=0; while [ $i -lt 160 ]; do unshare -U sleep 600 2>/dev/null & i=$((i+1)); done
  sleep 5; n=$(ps -e -o comm= | grep -c '^sleep$'); pkill -x sleep; echo $n)"
r done yes
"#;

/// Session B: allowedDomains `*.allowed.test` only.
const SESSION_B: &str = r#"r token "$(tok)"
r wild-sub "$(try https://a.allowed.test/)"
r wild-apex "$(code https://allowed.test/)"
r wild-api "$(code https://api.test/)"
r done yes
"#;

/// Session C: no allowedDomains.
const SESSION_C: &str = r#"r token "$(tok)"
r none-https "$(code https://allowed.test/)"
r none-socks "$(try --socks5-hostname 127.0.0.1:1080 https://allowed.test/)"
r done yes
"#;

/// Session A again, now with `api.test` only.
const SESSION_A_LATEST: &str = r#"r latest-api "$(try https://api.test/)"
r latest-allowed "$(code https://allowed.test/)"
r done yes
"#;

/// A request to the probe's host while the upstream is down.
const SESSION_A_DOWN: &str = r#"r down-api "$(code https://api.test/)"
r done yes
"#;

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn script(name: &str, ca: &str, body: &str) -> String {
    format!("{PRELUDE}{body}")
        .replace("@NAME@", name)
        .replace("@CA@", ca)
        .replace("@ADDR@", UPSTREAM_ADDR)
}

/// Runs `body` in session `name` (with `domains` and `token` when given)
/// and returns its `R key=value` results, each printed for the log.
#[allow(clippy::too_many_arguments)]
fn run_session(
    p: &mut Probe,
    pipe: &mut Pipe,
    ev: &Events,
    id: &str,
    name: &str,
    ca: &str,
    body: &str,
    domains: Option<&[&str]>,
    token: Option<&str>,
) -> BTreeMap<String, String> {
    let mut params = json!({"id": id, "name": name, "command": "sh",
        "args": ["-c", script(name, ca, body)], "isResume": false, "env": {}});
    if let Some(d) = domains {
        params["allowedDomains"] = json!(d);
    }
    if let Some(t) = token {
        params["oauthToken"] = json!(t);
    }
    let r = pipe.call("spawn", params);
    p.check(&format!("spawn {id} in session {name}"), ok(&r), &r);
    let exit = ev.exit_of(id, Duration::from_secs(600));
    let out = ev.stdout(id);
    for l in out.lines() {
        println!("@@CLIENT guest {id} {l}");
    }
    p.check(
        &format!("{id} ran to its end"),
        exit.is_some() && out.contains("R done=yes"),
        format!("{exit:?}"),
    );
    results(&out)
}

/// Waits for an `apiReachability` or `networkStatus` event with `status`
/// after event `from`; how long it took.
fn wait_status(
    ev: &Events,
    from: usize,
    kind: &str,
    status: &str,
    timeout: Duration,
) -> Option<Duration> {
    let t = Instant::now();
    ev.wait(from, timeout, |v| {
        v["type"] == kind && v["status"] == status
    })
    .map(|_| t.elapsed())
}

/// Which of `needles` occur in the data of the (sparse) file at `path`:
/// only its data extents are read (`SEEK_DATA`/`SEEK_HOLE`), so a 10 GiB
/// session disk costs what it holds. Every needle starts with `prefix`.
fn scan_file(path: &Path, prefix: &[u8], needles: &[&[u8]]) -> std::io::Result<Vec<bool>> {
    let f = File::open(path)?;
    let len = f.metadata()?.len() as i64;
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(1);
    let mut found = vec![false; needles.len()];
    let mut pos = 0i64;
    while pos < len {
        // SAFETY: lseek on a descriptor `f` keeps open; no memory is passed.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past `pos`.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { hole };
        let mut carry: Vec<u8> = Vec::new();
        let mut off = data;
        while off < end {
            let n = (end - off).min(1 << 20) as usize;
            let mut hay = std::mem::take(&mut carry);
            let start = hay.len();
            hay.resize(start + n, 0);
            f.read_exact_at(&mut hay[start..], off as u64)?;
            let mut i = 0;
            while let Some(at) = find(&hay[i..], prefix) {
                let hit = &hay[i + at..];
                for (k, nd) in needles.iter().enumerate() {
                    found[k] |= hit.starts_with(nd);
                }
                i += at + 1;
            }
            // A needle cut by the chunk's end is found with the next one.
            carry = hay[hay.len().saturating_sub(longest - 1)..].to_vec();
            off += n as i64;
        }
        pos = end;
    }
    Ok(found)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut i = 0;
    while let Some(at) = hay[i..].iter().position(|b| *b == first) {
        let j = i + at;
        if hay[j..].starts_with(needle) {
            return Some(j);
        }
        i = j + 1;
    }
    None
}

pub fn egress(socket: &str, bundle: &str, dir: &str) {
    let mut p = Probe { failed: false };
    let long = Duration::from_secs(240);
    let dir = Path::new(dir);
    let ca = std::fs::read_to_string(dir.join("ca.pem")).expect("the upstream's CA");
    let down = dir.join("down");
    let (mut pipe, ev) = open_and_start_with(
        &mut p,
        socket,
        json!({"bundlePath": bundle, "memoryGB": 1, "cpuCount": 2, "apiProbeURL": PROBE_URL}),
        long,
    );
    let r = pipe.call("setDebugLogging", json!({"enabled": true}));
    p.check("setDebugLogging on", ok(&r), &r);
    let t = wait_status(&ev, 0, "networkStatus", "CONNECTED", long);
    p.check("networkStatus CONNECTED", t.is_some(), "no event");
    let t = wait_status(&ev, 0, "apiReachability", "REACHABLE", long);
    p.check(
        "apiReachability REACHABLE with the probe URL on the upstream",
        t.is_some(),
        format!("{:?}", events_of(&ev, "apiReachability")),
    );
    let r = pipe.call("addApprovedOauthToken", json!({"token": TOKEN_APPROVED}));
    p.check("addApprovedOauthToken", ok(&r), &r);

    // Session A.
    let a_domains: &[&str] = &["allowed.test", "api.test", "loop.test"];
    let a = run_session(
        &mut p,
        &mut pipe,
        &ev,
        "a1",
        "sa",
        &ca,
        SESSION_A,
        Some(a_domains),
        Some(TOKEN_A),
    );
    let get = |m: &BTreeMap<String, String>, k: &str| m.get(k).cloned().unwrap_or_default();
    let expect = |p: &mut Probe,
                  m: &BTreeMap<String, String>,
                  what: &str,
                  key: &str,
                  want: &dyn Fn(&str) -> bool| {
        let v = get(m, key);
        p.check(what, want(&v), format!("{key}={v}"));
    };
    let hello = |name: &'static str| move |v: &str| v.starts_with(&format!("rc=0 hello {name}"));
    let refused = |why: &'static str| {
        move |v: &str| {
            let (codes, header) = v.split_once(' ').unwrap_or((v, ""));
            let proxy_code = codes.split('/').find(|c| *c != "000");
            proxy_code == Some("403") && header == why
        }
    };
    let socks_refused = |v: &str| v.starts_with("rc=97 ") && v.contains("(2)");
    expect(
        &mut p,
        &a,
        "the session has its spawn's oauthToken",
        "token",
        &|v| v == hex(TOKEN_A),
    );
    expect(
        &mut p,
        &a,
        "HTTPS_PROXY and https_proxy are the session's HTTP proxy",
        "https_proxy",
        &|v| v == "http://127.0.0.1:3128 http://127.0.0.1:3128",
    );
    expect(
        &mut p,
        &a,
        "HTTP_PROXY and http_proxy are the session's HTTP proxy",
        "http_proxy",
        &|v| v == "http://127.0.0.1:3128 http://127.0.0.1:3128",
    );
    expect(
        &mut p,
        &a,
        "ALL_PROXY and all_proxy are the session's SOCKS5 proxy",
        "all_proxy",
        &|v| v == "socks5h://127.0.0.1:1080 socks5h://127.0.0.1:1080",
    );
    expect(&mut p, &a, "NO_PROXY is the loopback", "no_proxy", &|v| {
        v == "localhost,127.0.0.1,::1"
    });
    expect(
        &mut p,
        &a,
        "curl https://allowed.test/ succeeds through the injected HTTPS_PROXY",
        "https-allowed",
        &hello("allowed.test"),
    );
    expect(
        &mut p,
        &a,
        "curl http://allowed.test/ succeeds through the injected HTTP_PROXY",
        "http-allowed",
        &hello("allowed.test"),
    );
    expect(
        &mut p,
        &a,
        "curl https://api.test/ succeeds",
        "https-api",
        &hello("api.test"),
    );
    expect(
        &mut p,
        &a,
        "http://denied.test/ gets 403 with X-Proxy-Error: blocked-by-allowlist",
        "http-denied",
        &refused("blocked-by-allowlist"),
    );
    expect(
        &mut p,
        &a,
        "a CONNECT to denied.test gets 403 with X-Proxy-Error: blocked-by-allowlist",
        "https-denied",
        &refused("blocked-by-allowlist"),
    );
    expect(
        &mut p,
        &a,
        "SOCKS5 to allowed.test succeeds",
        "socks-allowed",
        &hello("allowed.test"),
    );
    expect(
        &mut p,
        &a,
        "SOCKS5 to denied.test is refused with reply 2",
        "socks-denied",
        &socks_refused,
    );
    expect(
        &mut p,
        &a,
        "curl with only the injected ALL_PROXY (socks5h) succeeds",
        "all-proxy-allowed",
        &hello("allowed.test"),
    );
    expect(
        &mut p,
        &a,
        "an IP literal is refused (CONNECT)",
        "ip-https",
        &refused("blocked-by-allowlist"),
    );
    expect(
        &mut p,
        &a,
        "an IP literal is refused (absolute URI)",
        "ip-http",
        &refused("blocked-by-allowlist"),
    );
    expect(
        &mut p,
        &a,
        "an IP literal is refused (SOCKS5)",
        "ip-socks",
        &socks_refused,
    );
    expect(
        &mut p,
        &a,
        "a listed name resolving to 127.0.0.1 is refused (absolute URI)",
        "loop-http",
        &refused("blocked-address"),
    );
    expect(
        &mut p,
        &a,
        "a listed name resolving to 127.0.0.1 is refused (CONNECT)",
        "loop-https",
        &refused("blocked-address"),
    );
    expect(
        &mut p,
        &a,
        "a CONNECT to allowed.test:443 whose ClientHello names denied.test is refused",
        "fronting",
        &|v| !v.starts_with("rc=0 ") && v.contains("connect=200") && !v.contains("hello"),
    );
    expect(
        &mut p,
        &a,
        "a SOCKS5 stream to allowed.test:443 whose ClientHello names denied.test is refused",
        "socks-fronting",
        &|v| !v.starts_with("rc=0 ") && !v.contains("hello"),
    );
    expect(
        &mut p,
        &a,
        "a session's direct connection fails (curl --noproxy)",
        "noproxy",
        &|v| v.starts_with("rc=7 "),
    );
    expect(
        &mut p,
        &a,
        "a session has no route (connect: ENETUNREACH)",
        "connect-errno",
        &|v| v == "101",
    );
    expect(
        &mut p,
        &a,
        "a session cannot create an AF_VSOCK socket",
        "vsock",
        &|v| v == "1",
    );
    expect(
        &mut p,
        &a,
        "a session's routing table is empty",
        "routes",
        &|v| v == "0",
    );
    expect(
        &mut p,
        &a,
        "a session's only network device is lo",
        "netdevs",
        &|v| v == "lo,",
    );
    // Claude Code's own sandbox inside a session: a nested bwrap without
    // a network, reaching the session's proxy through a socat bridge over
    // a Unix socket, as the runtime's sandbox does.
    expect(
        &mut p,
        &a,
        "a nested bwrap + socat bridge reaches allowed.test through the session's proxy",
        "nested",
        &|v| v.starts_with("rc=0 hello allowed.test") && v.contains("inner=0 devs=lo,"),
    );
    expect(
        &mut p,
        &a,
        "root of a nested user namespace cannot create an AF_VSOCK socket (EPERM)",
        "nested-vsock",
        &|v| v == "1",
    );
    expect(
        &mut p,
        &a,
        "root of a nested user and network namespace cannot open netfilter's netlink (EPERM)",
        "nested-netfilter",
        &|v| v == "1",
    );
    // 128 per uid, less the session's own sandbox namespace.
    expect(
        &mut p,
        &a,
        "a session holds at most 128 user namespaces (160 tried at once)",
        "userns-bound",
        &|v| v.parse::<u32>().is_ok_and(|n| (100..128).contains(&n)),
    );

    // Session B: the wildcard, and its own token.
    let b = run_session(
        &mut p,
        &mut pipe,
        &ev,
        "b1",
        "sb",
        &ca,
        SESSION_B,
        Some(&["*.allowed.test"]),
        Some(TOKEN_B),
    );
    expect(
        &mut p,
        &b,
        "another session has its own token, not the first one's",
        "token",
        &|v| v == hex(TOKEN_B),
    );
    expect(
        &mut p,
        &b,
        "*.allowed.test allows a.allowed.test",
        "wild-sub",
        &hello("a.allowed.test"),
    );
    expect(
        &mut p,
        &b,
        "*.allowed.test does not allow allowed.test",
        "wild-apex",
        &refused("blocked-by-allowlist"),
    );
    expect(
        &mut p,
        &b,
        "*.allowed.test does not allow api.test",
        "wild-api",
        &refused("blocked-by-allowlist"),
    );
    p.check(
        "two sessions with different allowedDomains get different answers for allowed.test",
        hello("allowed.test")(&get(&a, "https-allowed"))
            && refused("blocked-by-allowlist")(&get(&b, "wild-apex")),
        format!(
            "{:?} / {:?}",
            get(&a, "https-allowed"),
            get(&b, "wild-apex")
        ),
    );

    // Session C: no list, no token of its own.
    let c = run_session(
        &mut p, &mut pipe, &ev, "c1", "sc", &ca, SESSION_C, None, None,
    );
    expect(
        &mut p,
        &c,
        "a spawn without oauthToken gets the approved token",
        "token",
        &|v| v == hex(TOKEN_APPROVED),
    );
    expect(
        &mut p,
        &c,
        "no allowedDomains: no network (HTTP proxy)",
        "none-https",
        &refused("blocked-by-allowlist"),
    );
    expect(
        &mut p,
        &c,
        "no allowedDomains: no network (SOCKS5)",
        "none-socks",
        &socks_refused,
    );

    // Session A's latest spawn sets its list.
    let a2 = run_session(
        &mut p,
        &mut pipe,
        &ev,
        "a2",
        "sa",
        &ca,
        SESSION_A_LATEST,
        Some(&["api.test"]),
        Some(TOKEN_A),
    );
    expect(
        &mut p,
        &a2,
        "the session's latest spawn's list rules: api.test allowed",
        "latest-api",
        &hello("api.test"),
    );
    expect(
        &mut p,
        &a2,
        "the session's latest spawn's list rules: allowed.test refused",
        "latest-allowed",
        &refused("blocked-by-allowlist"),
    );

    // The upstream goes away: a session's failed request to the probe's
    // host brings the next probe forward.
    let mark = ev.len();
    let went = Instant::now();
    let wrote = std::fs::write(&down, b"");
    p.check(
        "took the upstream down",
        wrote.is_ok(),
        format!("{wrote:?}"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let d = run_session(
        &mut p,
        &mut pipe,
        &ev,
        "a3",
        "sa",
        &ca,
        SESSION_A_DOWN,
        Some(&["api.test"]),
        Some(TOKEN_A),
    );
    expect(
        &mut p,
        &d,
        "while the upstream is down a session gets 502 for api.test",
        "down-api",
        &|v| v.starts_with("000/502 "),
    );
    let left = Duration::from_secs(60).saturating_sub(went.elapsed());
    let t = wait_status(&ev, mark, "apiReachability", "UNREACHABLE", left);
    p.check(
        "apiReachability UNREACHABLE within 60 s of the upstream going away",
        t.is_some(),
        format!("{:?}", events_of(&ev, "apiReachability")),
    );
    println!(
        "@@CLIENT unreachable-after-ms {}",
        went.elapsed().as_millis()
    );
    let mark = ev.len();
    let back = Instant::now();
    let removed = std::fs::remove_file(&down);
    p.check(
        "brought the upstream back",
        removed.is_ok(),
        format!("{removed:?}"),
    );
    let t = wait_status(
        &ev,
        mark,
        "apiReachability",
        "REACHABLE",
        Duration::from_secs(45),
    );
    p.check(
        "apiReachability REACHABLE within 45 s of the upstream coming back",
        t.is_some(),
        format!("{:?}", events_of(&ev, "apiReachability")),
    );
    println!(
        "@@CLIENT reachable-again-after-ms {}",
        back.elapsed().as_millis()
    );

    // The session disk holds no token.
    let r = pipe.call("stopVM", json!({}));
    p.check("stopVM", ok(&r), &r);
    let disk = Path::new(bundle).join("sessiondata.img");
    let t = Instant::now();
    let tokens = [TOKEN_A, TOKEN_B, TOKEN_APPROVED];
    let needles: Vec<&[u8]> = tokens.iter().map(|t| t.as_bytes()).collect();
    match scan_file(&disk, TOKEN_PREFIX.as_bytes(), &needles) {
        Ok(found) => p.check(
            "no token in sessiondata.img",
            !found.contains(&true),
            format!("found (in token order A, B, approved): {found:?}"),
        ),
        Err(e) => p.check(
            "no token in sessiondata.img",
            false,
            format!("reading {}: {e}", disk.display()),
        ),
    }
    println!("@@CLIENT disk-scan-ms {}", t.elapsed().as_millis());

    // A probe URL that does not resolve.
    let mark = ev.len();
    let r = pipe.call(
        "startVM",
        json!({"bundlePath": bundle, "memoryGB": 1, "cpuCount": 2, "apiProbeURL": UNRESOLVABLE_PROBE_URL}),
    );
    p.check("startVM with an unresolvable probe URL", ok(&r), &r);
    p.check(
        "connected again",
        poll_connected(socket, long).is_some(),
        "timed out",
    );
    let t = wait_status(
        &ev,
        mark,
        "apiReachability",
        "UNREACHABLE",
        Duration::from_secs(120),
    );
    p.check(
        "apiReachability UNREACHABLE with an unresolvable probe URL",
        t.is_some(),
        format!("{:?}", events_of(&ev, "apiReachability")),
    );

    // The VMM dies.
    let mark = ev.len();
    match vmm_pid(bundle) {
        Some(pid) => {
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let t = wait_status(
                &ev,
                mark,
                "networkStatus",
                "NOT_CONNECTED",
                Duration::from_secs(60),
            );
            p.check(
                "networkStatus NOT_CONNECTED after the VMM is killed",
                t.is_some(),
                format!("{:?}", events_of(&ev, "networkStatus")),
            );
        }
        None => p.check("found the VMM process", false, "no coworkvm boot child"),
    }
    let r = pipe.call("stopVM", json!({}));
    p.check("stopVM after the crash", ok(&r), &r);
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(p.failed));
}

/// The `status` of every event of `kind` so far, for a failure's detail.
fn events_of(ev: &Events, kind: &str) -> Vec<String> {
    ev.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["type"] == kind)
        .map(|(_, v)| v["status"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The benchmark's session: `@BYTES@` through the HTTP proxy as an
/// absolute URI, as a CONNECT tunnel (`-p`) and through SOCKS5, and from a
/// server in the session itself over its loopback (the guest's own
/// ceiling: no vsock, no proxy), each printed `B <path> <seconds> <bytes>
/// <status>`; then `@N@` sequential
/// CONNECT set-ups, each `L <seconds to the tunnel> <status>`.
const BENCH_SCRIPT: &str = r#"U=http://allowed.test/bytes/@BYTES@
t() { curl -sS --max-time 3000 -o /dev/null -w '%{time_total} %{size_download} %{http_code}' "$@"; }
echo "B http $(t $U)"
echo "B connect $(t -p $U)"
echo "B socks $(t --socks5-hostname 127.0.0.1:1080 $U)"
perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalAddr => "127.0.0.1:9000", Listen => 1, ReuseAddr => 1) or die "listen: $!";
  $c = $s->accept or die; sysread($c, $r, 4096); $n = @BYTES@; $b = "x" x 65536;
  syswrite($c, "HTTP/1.1 200 OK\r\nContent-Length: $n\r\nConnection: close\r\n\r\n");
  while ($n > 0) { $w = syswrite($c, $b, $n < 65536 ? $n : 65536); last unless $w; $n -= $w } close $c' &
P=$!
echo "B loopback $(t --noproxy '*' --retry 30 --retry-connrefused --retry-delay 1 http://127.0.0.1:9000/)"
kill $P 2>/dev/null
i=0
while [ $i -lt @N@ ]; do
  curl -sS -p --max-time 60 -o /dev/null -w 'L %{time_pretransfer} %{http_code}\n' http://allowed.test/
  i=$((i+1))
done
echo "R done=yes"
"#;

/// `client-probe --egress-bench MIB N SOCKET BUNDLE_DIR EGRESS_DIR`: one VM,
/// one session allowed `allowed.test`; `MIB` MiB downloaded through the
/// session's HTTP proxy (absolute URI and a CONNECT tunnel) and SOCKS5
/// proxy, then directly from this process; `N` sequential CONNECT
/// set-ups. Prints `@@EGRESS-BENCH {json}`; exit status 1 when a part
/// failed.
pub fn bench(mib: u64, n: usize, socket: &str, bundle: &str, _dir: &str) {
    let mut p = Probe { failed: false };
    let (mut pipe, ev) = open_and_start_with(
        &mut p,
        socket,
        json!({"bundlePath": bundle, "memoryGB": 1, "cpuCount": 2}),
        Duration::from_secs(300),
    );
    let bytes = mib << 20;
    let body = BENCH_SCRIPT
        .replace("@BYTES@", &bytes.to_string())
        .replace("@N@", &n.to_string());
    let r = pipe.call(
        "spawn",
        json!({"id": "eb", "name": "bench", "command": "sh", "args": ["-c", body],
               "isResume": false, "env": {}, "allowedDomains": ["allowed.test"]}),
    );
    p.check("spawn the download session", ok(&r), &r);
    let exit = ev.exit_of("eb", Duration::from_secs(3 * 3000 + 600));
    let out = ev.stdout("eb");
    for l in out.lines() {
        println!("@@CLIENT guest {l}");
    }
    p.check(
        "the session's downloads ran to their end",
        exit.is_some() && out.contains("R done=yes"),
        format!("{exit:?}"),
    );
    // `B <path> <seconds> <bytes> <status>`: only a whole download counts.
    let took = |path: &str| -> Option<f64> {
        out.lines().find_map(|l| {
            let f: Vec<&str> = l.strip_prefix(&format!("B {path} "))?.split(' ').collect();
            (f.len() == 3 && f[1] == bytes.to_string() && f[2] == "200")
                .then(|| f[0].parse().ok())
                .flatten()
        })
    };
    let setup_ms: Vec<f64> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.strip_prefix("L ")?.split(' ').collect();
            (f.len() == 2 && f[1] == "200")
                .then(|| f[0].parse::<f64>().ok().map(|s| s * 1000.0))
                .flatten()
        })
        .collect();
    let r = pipe.call("stopVM", json!({}));
    p.check("stopVM", ok(&r), &r);
    let direct = direct_download(bytes);
    p.check("the direct download", direct.is_ok(), format!("{direct:?}"));
    let (http, connect, socks) = (took("http"), took("connect"), took("socks"));
    let loopback = took("loopback");
    p.check(
        "the in-guest loopback download was whole",
        loopback.is_some(),
        &out,
    );
    p.check(
        "every proxied download was whole",
        http.is_some() && connect.is_some() && socks.is_some(),
        &out,
    );
    p.check(
        "every CONNECT set-up succeeded",
        setup_ms.len() == n,
        format!("{} of {n}", setup_ms.len()),
    );
    println!(
        "@@EGRESS-BENCH {}",
        json!({"mib": mib, "direct_s": direct.ok(), "proxy_http_s": http,
               "proxy_connect_s": connect, "proxy_socks_s": socks,
               "guest_loopback_s": loopback,
               "connect_setup_ms": setup_ms})
    );
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(p.failed));
}

/// `GET /bytes/<bytes>` from the upstream over one plain TCP connection;
/// seconds to the last byte.
fn direct_download(bytes: u64) -> Result<f64, String> {
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect((UPSTREAM_ADDR, 80)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /bytes/{bytes} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        UPSTREAM_NAMES[0]
    )
    .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut head: Vec<u8> = Vec::new();
    let mut body_at = None;
    loop {
        let k = s.read(&mut buf).map_err(|e| e.to_string())?;
        if k == 0 {
            break;
        }
        if body_at.is_none() {
            head.extend_from_slice(&buf[..k]);
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                body_at = Some(i + 4);
                total = (head.len() - i - 4) as u64;
                head.truncate(i);
            }
        } else {
            total += k as u64;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if !head.starts_with(b"HTTP/1.1 200 ") || total != bytes {
        return Err(format!(
            "{} bytes, head {:?}",
            total,
            String::from_utf8_lossy(&head)
        ));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_reads_the_data_of_a_sparse_file_and_finds_cut_needles() {
        let dir = coworkvm_tests::temp_dir("egress-scan");
        let path = dir.join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        // One token across a 1 MiB chunk boundary of a data extent, one
        // deep in the file after a hole; the third nowhere.
        let at = (8 << 20) - 5;
        f.write_all_at(&vec![b'z'; 2 << 20], (7 << 20) as u64)
            .unwrap();
        f.write_all_at(TOKEN_A.as_bytes(), at).unwrap();
        f.write_all_at(format!("xx{TOKEN_APPROVED}yy").as_bytes(), 40 << 20)
            .unwrap();
        f.write_all_at(TOKEN_PREFIX.as_bytes(), 50 << 20).unwrap();
        let needles = [
            TOKEN_A.as_bytes(),
            TOKEN_B.as_bytes(),
            TOKEN_APPROVED.as_bytes(),
        ];
        let found = scan_file(&path, TOKEN_PREFIX.as_bytes(), &needles).unwrap();
        assert_eq!(found, [true, false, true]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn find_finds_the_first_whole_match() {
        assert_eq!(find(b"aab aabc", b"abc"), Some(5));
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"", b"a"), None);
    }

    #[test]
    fn session_scripts_are_filled_in() {
        let s = script(
            "sa",
            "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n",
            SESSION_A,
        );
        assert!(s.starts_with("cd /sessions/sa || exit 1\n"), "{s}");
        assert!(s.contains("-----END CERTIFICATE-----\nPEM\n"), "{s}");
        assert!(s.contains("code https://127.0.0.2/"), "{s}");
        for placeholder in ["@NAME@", "@CA@", "@ADDR@"] {
            assert!(!s.contains(placeholder), "{s}");
        }
        for t in [TOKEN_A, TOKEN_B, TOKEN_APPROVED] {
            assert!(
                !s.contains(t),
                "a token in a session's arguments would reach the logs"
            );
        }
    }
}
