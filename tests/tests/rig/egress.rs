//! Sessions' network end to end: the host-enforced egress proxy of issue
//! 14, in real VMs booted from the Debian images.
//!
//! - `egress`: `egress-upstream` (HTTP and TLS, a CA of its own) on L1's
//!   loopback address 127.0.0.2; `coworkvm -socket PATH` run as uid 1000
//!   the way the client runs it, configured by `~/.config/coworkvm/
//!   config.toml` (every test name routed to the upstream, `loop.test` to
//!   127.0.0.1, only 127.0.0.2/32 allowed), `RUST_LOG=debug`, and
//!   `SSL_CERT_FILE` naming the upstream's CA for its probe; driven by
//!   `client-probe --egress` (see tests/src/bin/client-probe/egress.rs for
//!   every check: the proxies through the injected variables, the
//!   allowlist, wildcards, IP literals, refused ranges, domain fronting,
//!   per-session lists and tokens, no route and no vsock from a session,
//!   apiReachability as the upstream goes and comes back and with an
//!   unresolvable URL, networkStatus when the VMM dies, no token on the
//!   session disk). Then no token in any log at debug level (the helper's,
//!   the guest console's), and the upstream never saw a request for a
//!   name a session was refused.
//! - `root-route`: guest root outside any sandbox (`coworkvm run`): no
//!   network device but `lo`, an empty routing table, and a TCP connect to
//!   an outside address fails with ENETUNREACH.

use coworkvm_tests::egress::{
    config_toml, start_upstream_script, TOKEN_A, TOKEN_APPROVED, TOKEN_B,
};
use coworkvm_tests::images;
use coworkvm_tests::{paths_or_skip, Batch, Case};

const SETUP: &str = r#"mkdir -p /images /bundle
grep -q " /images " /proc/mounts || mount -o ro $DISK0 /images || exit 90
grep -q " /bundle " /proc/mounts || mount $DISK1 /bundle || exit 91
export COWORKVM_IMAGES=/images
"#;

/// `@CONFIG@`: the helper's config.toml; `@UPSTREAM@`: the lines that
/// start the upstream; `@TA@`, `@TB@`, `@TC@`: the tokens.
const EGRESS: &str = r#"U=1000
export HOME=$TMPDIR/home
E=$TMPDIR/egress
mkdir -p $HOME/.config/coworkvm $TMPDIR/run /bundle/c $E
cat > $HOME/.config/coworkvm/config.toml <<'TOML'
@CONFIG@TOML
ip link set lo up || exit 92
@UPSTREAM@chown -R $U:$U $HOME $TMPDIR/run /bundle/c $E
chmod 755 $TMPDIR
chmod 700 $TMPDIR/run
chmod 666 /dev/kvm
S=$TMPDIR/run/cowork.sock
$RUN_AS $U env HOME=$HOME XDG_RUNTIME_DIR=$TMPDIR/run RUST_LOG=debug SSL_CERT_FILE=$E/ca.pem \
    $COWORKVM -socket $S 2> $TMPDIR/helper.log &
H=$!
i=0; while [ ! -S $S ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
$RUN_AS $U env HOME=$HOME $CLIENT_PROBE --egress $S /bundle/c $E
echo "probe-rc=$?"
kill -TERM $H
wait $H
echo "helper-rc=$?"
kill $(cat $E/upstream.pid)
echo "helper-debug-lines=$(grep -c DEBUG $TMPDIR/helper.log)"
LOGS="$TMPDIR/helper.log $(find $TMPDIR/run -type f)"
echo "token-files=$(grep -l -a -F -e @TA@ -e @TB@ -e @TC@ $LOGS | wc -l)"
grep -l -a -F -e @TA@ -e @TB@ -e @TC@ $LOGS | sed 's/^/token-in| /'
echo "upstream-requests=$(grep -c ' -> ' $TMPDIR/upstream.log)"
echo "upstream-denied=$(grep -c 'denied.test' $TMPDIR/upstream.log)"
echo "upstream-ip-literal=$(grep -c 'host=127' $TMPDIR/upstream.log)"
sed 's/^/upstream| /' $TMPDIR/upstream.log | tail -n 60
grep -v ' DEBUG ' $TMPDIR/helper.log | sed 's/^/helper| /' | tail -n 80
grep -i egress $TMPDIR/helper.log | sed 's/^/helper-egress| /' | tail -n 60
for c in $TMPDIR/run/*.d/console.log; do grep -a -i -E "coworkvm-agent|egress|proxy" $c | sed 's/^/console| /' | tail -n 40; done
"#;

/// Guest root, outside any sandbox.
const ROOT_ROUTE: &str = r#"mkdir -p $TMPDIR/home && export HOME=$TMPDIR/home
cat > $TMPDIR/route.sh <<'SH'
echo "routes=$(tail -n +2 /proc/net/route | wc -l)"
echo "netdevs=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ',')"
perl -e 'for my $a ([192,0,2,1], [10,0,2,2]) { socket(my $s, 2, 1, 0) or die "socket: $!";
  my $r = connect($s, pack("SnC4x8", 2, 80, @$a)) ? "connected" : $!+0;
  print "connect-", join(".", @$a), "=$r\n" }'
SH
$COWORKVM run --bundle /bundle/r --images /images --cpus 1 --mem 512 -- sh -c "$(cat $TMPDIR/route.sh)" \
    > $TMPDIR/route.out 2> $TMPDIR/route.err
echo "run-rc=$?"
cat $TMPDIR/route.out
sed 's/^/run| /' $TMPDIR/route.err | tail -n 30
"#;

#[test]
fn sessions_reach_exactly_what_their_allowlist_allows() {
    let Some(paths) = paths_or_skip() else { return };
    let Some(images) = images::images_or_skip(&paths.root) else {
        return;
    };
    let rig = images::HelperDisks::new(&paths.root, &images, "egress-e2e", false)
        .expect("the rig's disks");
    let egress = EGRESS
        .replace("@CONFIG@", &config_toml())
        .replace("@UPSTREAM@", &start_upstream_script())
        .replace("@TA@", TOKEN_A)
        .replace("@TB@", TOKEN_B)
        .replace("@TC@", TOKEN_APPROVED);
    let batch = Batch {
        cases: vec![
            Case::new("egress", &format!("{SETUP}{egress}"), 2400),
            Case::new("root-route", &format!("{SETUP}{ROOT_ROUTE}"), 600),
        ],
        files: vec![],
        disks: rig.disks.clone(),
    };
    let result = batch.run(&paths).expect("the rig runs");
    drop(rig);
    result.print_cases();

    let c = result.case("egress");
    let ctx = || result.context("egress");
    // Every check of the probe ran (a probe that died early passes none
    // of the later ones).
    result.assert_client_passed(
        "egress",
        &[
            "apiReachability REACHABLE with the probe URL on the upstream",
            "the session has its spawn's oauthToken",
            "curl https://allowed.test/ succeeds through the injected HTTPS_PROXY",
            "http://denied.test/ gets 403 with X-Proxy-Error: blocked-by-allowlist",
            "a CONNECT to denied.test gets 403 with X-Proxy-Error: blocked-by-allowlist",
            "SOCKS5 to allowed.test succeeds",
            "SOCKS5 to denied.test is refused with reply 2",
            "curl with only the injected ALL_PROXY (socks5h) succeeds",
            "an IP literal is refused (CONNECT)",
            "a listed name resolving to 127.0.0.1 is refused (CONNECT)",
            "a CONNECT to allowed.test:443 whose ClientHello names denied.test is refused",
            "a SOCKS5 stream to allowed.test:443 whose ClientHello names denied.test is refused",
            "a session has no route (connect: ENETUNREACH)",
            "a session cannot create an AF_VSOCK socket",
            "another session has its own token, not the first one's",
            "*.allowed.test allows a.allowed.test",
            "*.allowed.test does not allow allowed.test",
            "two sessions with different allowedDomains get different answers for allowed.test",
            "a spawn without oauthToken gets the approved token",
            "no allowedDomains: no network (HTTP proxy)",
            "the session's latest spawn's list rules: allowed.test refused",
            "apiReachability UNREACHABLE within 60 s of the upstream going away",
            "apiReachability REACHABLE within 45 s of the upstream coming back",
            "no token in sessiondata.img",
            "apiReachability UNREACHABLE with an unresolvable probe URL",
            "networkStatus NOT_CONNECTED after the VMM is killed",
        ],
    );
    assert_eq!(c.lines_with("helper-rc="), ["0"], "{}", ctx());
    let debug: usize = c.lines_with("helper-debug-lines=")[0].parse().unwrap_or(0);
    assert!(
        debug > 0,
        "the helper did not log at debug level, so the token check proves little\n{}",
        ctx()
    );
    assert_eq!(
        c.lines_with("token-files="),
        ["0"],
        "a token reached a log (the helper's or the guest console's)\n{}",
        ctx()
    );
    let served: usize = c.lines_with("upstream-requests=")[0].parse().unwrap_or(0);
    assert!(served > 0, "the upstream served nothing\n{}", ctx());
    assert_eq!(
        c.lines_with("upstream-denied="),
        ["0"],
        "a request for denied.test reached the upstream\n{}",
        ctx()
    );
    assert_eq!(
        c.lines_with("upstream-ip-literal="),
        ["0"],
        "a request by IP literal reached the upstream\n{}",
        ctx()
    );

    let c = result.case("root-route");
    let ctx = || result.context("root-route");
    assert_eq!(c.lines_with("run-rc="), ["0"], "{}", ctx());
    assert_eq!(
        c.lines_with("routes="),
        ["0"],
        "guest root has a route\n{}",
        ctx()
    );
    assert_eq!(
        c.lines_with("netdevs="),
        ["lo,"],
        "guest root has a network device besides lo\n{}",
        ctx()
    );
    // ENETUNREACH (101): no route, no device; nothing was sent.
    assert_eq!(c.lines_with("connect-192.0.2.1="), ["101"], "{}", ctx());
    assert_eq!(c.lines_with("connect-10.0.2.2="), ["101"], "{}", ctx());
}
