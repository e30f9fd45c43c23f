//! What the egress rig test (tests/tests/rig/egress.rs), its client probe
//! (`client-probe --egress`) and the egress benchmark (`coworkvm-rig bench
//! --egress-only`) share: the local upstream's address, the names routed
//! to it, the tokens, and the benchmark's section of bench/results.md.
//!
//! The upstream (`egress-upstream`) listens on [`UPSTREAM_ADDR`], a
//! loopback address of L1 other than 127.0.0.1: reaching it proves the
//! helper's `--egress-allow` exception, while [`LOOP_HOST`] (127.0.0.1,
//! not allowed) proves the refused ranges. The traffic never leaves L1's
//! (or, in direct mode, the host's) loopback.

use std::fmt::Write as _;

use crate::bench::{stats, tagged};

/// The upstream's address in L1.
pub const UPSTREAM_ADDR: &str = "127.0.0.2";
/// The `--egress-allow` range that lets the helper reach it (and nothing
/// else in 127/8).
pub const UPSTREAM_ALLOW: &str = "127.0.0.2/32";
/// The name the upstream's fake Anthropic Messages API
/// ([`crate::fakeapi`]) is reached under: a session's
/// `ANTHROPIC_BASE_URL` is `https://fakeapi.test`.
pub const FAKE_API_NAME: &str = "fakeapi.test";
/// Names routed to the upstream with `--egress-resolve` (the upstream's
/// certificate covers each). `denied.test` is among them on purpose: a
/// request for it that got through the proxy would succeed, so only the
/// proxy's refusal can make the test's checks pass.
pub const UPSTREAM_NAMES: &[&str] = &[
    "allowed.test",
    "a.allowed.test",
    "api.test",
    "denied.test",
    FAKE_API_NAME,
];
/// A name resolved to 127.0.0.1, which no `--egress-allow` covers.
pub const LOOP_HOST: &str = "loop.test";
/// The `startVM` probe URL the reachability checks use.
pub const PROBE_URL: &str = "https://api.test/";
/// A probe URL whose name does not resolve.
pub const UNRESOLVABLE_PROBE_URL: &str = "https://nowhere.invalid/";
/// Session A's OAuth token (`spawn.oauthToken`). All three tokens share
/// [`TOKEN_PREFIX`], so one scan of a disk finds any of them.
pub const TOKEN_A: &str = "cwvm-egress-token-a-5d2f9c71";
/// Session B's OAuth token.
pub const TOKEN_B: &str = "cwvm-egress-token-b-81e07a4b";
/// The `addApprovedOauthToken` token, which a spawn without its own gets.
pub const TOKEN_APPROVED: &str = "cwvm-egress-token-approved-c47b3e02";
/// What every token starts with.
pub const TOKEN_PREFIX: &str = "cwvm-egress-token-";

/// The helper's egress configuration for the rig: the `[egress]` table of
/// `config.toml` (what the `-socket PATH` form reads), and the same as
/// `coworkvm serve` flags.
pub fn resolve_entries() -> Vec<String> {
    let mut v: Vec<String> = UPSTREAM_NAMES
        .iter()
        .map(|n| format!("{n}={UPSTREAM_ADDR}"))
        .collect();
    v.push(format!("{LOOP_HOST}=127.0.0.1"));
    v
}

/// `config.toml` with the rig's `[egress]` table.
pub fn config_toml() -> String {
    let quoted: Vec<String> = resolve_entries()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    format!(
        "[egress]\nresolve = [{}]\nallow = [\"{UPSTREAM_ALLOW}\"]\n",
        quoted.join(", ")
    )
}

/// The same as `coworkvm serve` flags.
pub fn serve_flags() -> String {
    let mut s = String::new();
    for e in resolve_entries() {
        let _ = write!(s, " --egress-resolve {e}");
    }
    let _ = write!(s, " --egress-allow {UPSTREAM_ALLOW}");
    s
}

/// Shell lines that start the upstream as root in the background,
/// with its files in `$E`, and wait for its pidfile. Needs `lo` up.
pub const START_UPSTREAM: &str = r#"$EGRESS_UPSTREAM --addr @ADDR@ --ca-out $E/ca.pem --pidfile $E/upstream.pid \
    --down-file $E/down --stop-after 3000 2> $TMPDIR/upstream.log &
i=0; while [ ! -s $E/upstream.pid ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -s $E/upstream.pid ] || { echo "the upstream did not start"; cat $TMPDIR/upstream.log; exit 93; }
chmod 644 $E/ca.pem
"#;

/// [`START_UPSTREAM`] with the address filled in.
pub fn start_upstream_script() -> String {
    START_UPSTREAM.replace("@ADDR@", UPSTREAM_ADDR)
}

/// The benchmark case: the helper (`coworkvm serve` with the egress flags)
/// and a real VM; `client-probe --egress-bench` downloads `mib` MiB
/// through a session's proxies and directly, and times `connects` CONNECT
/// set-ups.
pub fn bench_case_script(mib: u64, connects: usize) -> String {
    format!(
        r#"mkdir -p $TMPDIR/images /bundle
grep -q " $TMPDIR/images " /proc/mounts || mount -o ro $DISK0 $TMPDIR/images || exit 90
grep -q " /bundle " /proc/mounts || mount $DISK1 /bundle || exit 91
export COWORKVM_IMAGES=$TMPDIR/images HOME=$TMPDIR/home
E=$TMPDIR/egress-bench
mkdir -p $TMPDIR/run $E /bundle/eb && chmod 700 $TMPDIR/run
ip link set lo up
{upstream}$COWORKVM serve --socket $TMPDIR/run/e.sock{flags} 2> $TMPDIR/e.log &
H=$!
i=0; while [ ! -S $TMPDIR/run/e.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
$CLIENT_PROBE --egress-bench {mib} {connects} $TMPDIR/run/e.sock /bundle/eb $E
rc=$?
kill $H; wait $H
kill $(cat $E/upstream.pid)
grep -i -E 'egress|error' $TMPDIR/e.log | tail -n 20
exit $rc
"#,
        upstream = start_upstream_script(),
        flags = serve_flags(),
    )
}

/// The section's heading in bench/results.md.
pub const SECTION_HEADING: &str = "## Egress: a session's proxies vs L1 directly";
/// The issue's target: proxy throughput at least this share of direct.
pub const TARGET_THROUGHPUT_RATIO: f64 = 0.5;

/// The percentile `p` (0-100) of `v`, nearest rank.
fn percentile(v: &[f64], p: usize) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = (v.len() * p).div_ceil(100).checked_sub(1)?;
    v.get(i).copied()
}

/// Renders the benchmark case's `@@EGRESS-BENCH` line; `None` when the
/// output has none (the section then shows the output).
pub fn render(output: &str, context: &str) -> (String, bool) {
    let mut s = format!("{SECTION_HEADING}\n\n");
    let Some(v) = tagged(output, "@@EGRESS-BENCH").into_iter().next() else {
        let _ = write!(
            s,
            "No result; the case's output:\n\n```\n{}\n```\n",
            output.trim_end()
        );
        return (s, false);
    };
    let mib = v["mib"].as_f64().unwrap_or(0.0);
    let rate = |k: &str| v[k].as_f64().filter(|t| *t > 0.0).map(|t| mib / t);
    let direct = rate("direct_s");
    let _ = writeln!(
        s,
        "{context}. `egress-upstream` serves `GET /bytes/N` on L1's loopback \
         ({UPSTREAM_ADDR}, plain HTTP, so the figures are the byte path, not TLS). Through the \
         proxies: curl in a sandboxed session of a real VM (the Debian rootfs bundle, 1 GiB, 2 \
         vCPUs) started by `coworkvm serve`, the session's `HTTP_PROXY` as the helper sets it; \
         the path is session -> agent proxy (127.0.0.1:3128 / :1080 in the session's netns) -> \
         vsock -> helper (policy, connect) -> upstream. Directly: the client probe in L1, one \
         TCP connection to the upstream. {mib:.0} MiB each, one run.\n"
    );
    let _ = writeln!(s, "| path | throughput | vs direct |");
    let _ = writeln!(s, "|---|---|---|");
    let cell = |x: Option<f64>| x.map_or("n/a".to_string(), |r| format!("{r:.1} MiB/s"));
    let _ = writeln!(s, "| L1 directly | {} | 1 |", cell(direct));
    for (name, k) in [
        (
            "HTTP proxy, absolute URI (`curl http://...`)",
            "proxy_http_s",
        ),
        ("HTTP proxy, CONNECT tunnel (`curl -p`)", "proxy_connect_s"),
        ("SOCKS5 (`curl --socks5-hostname`)", "proxy_socks_s"),
    ] {
        let r = rate(k);
        let ratio = match (r, direct) {
            (Some(x), Some(d)) => format!("{:.2}", x / d),
            _ => "n/a".into(),
        };
        let _ = writeln!(s, "| {name} | {} | {ratio} |", cell(r));
    }
    let loopback = rate("guest_loopback_s");
    let vs_loopback = match (rate("proxy_http_s"), loopback) {
        (Some(x), Some(l)) => format!("{:.2}", x / l),
        _ => "n/a".into(),
    };
    let ratio = match (loopback, direct) {
        (Some(l), Some(d)) => format!("{:.2}", l / d),
        _ => "n/a".into(),
    };
    let _ = writeln!(
        s,
        "| in the session, from a server in the session over its own loopback (no vsock, no \
         proxy: the guest's own ceiling) | {} | {ratio} |",
        cell(loopback)
    );
    let _ = writeln!(
        s,
        "\nThe HTTP proxy path against the guest's own loopback ceiling: {vs_loopback}x. In \
         the rig the VM's code runs under TCG-emulated nested virtualization, so any byte \
         path through the guest is bounded by the guest's own speed, which the loopback row \
         measures; L1's direct download involves no guest at all."
    );
    let setup: Vec<f64> = v["connect_setup_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    let med = stats(&setup).map(|s| s.median);
    let p95 = percentile(&setup, 95);
    let f = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.1} ms"));
    let _ = writeln!(
        s,
        "\nCONNECT set-up, {} sequential `curl -p` requests in the session (curl's \
         `time_pretransfer`: connection to the proxy, `CONNECT`, the helper's policy check \
         and its connection to the upstream, `200`): median {}, p95 {}.",
        setup.len(),
        f(med),
        f(p95)
    );
    let worst = ["proxy_http_s", "proxy_connect_s", "proxy_socks_s"]
        .iter()
        .filter_map(|k| rate(k))
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.min(r))));
    if let (Some(w), Some(d)) = (worst, direct) {
        let ratio = w / d;
        let _ = writeln!(
            s,
            "\nTarget: every proxy path at least {TARGET_THROUGHPUT_RATIO}x direct; slowest \
             {ratio:.2}x: {}.",
            if ratio >= TARGET_THROUGHPUT_RATIO {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    (s, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_routes_every_name_and_allows_only_the_upstream() {
        let c = config_toml();
        for n in UPSTREAM_NAMES {
            assert!(c.contains(&format!("\"{n}={UPSTREAM_ADDR}\"")), "{c}");
        }
        assert!(c.contains("\"loop.test=127.0.0.1\""), "{c}");
        assert!(c.contains("allow = [\"127.0.0.2/32\"]"), "{c}");
        let f = serve_flags();
        assert!(f.contains(" --egress-resolve api.test=127.0.0.2"), "{f}");
        assert!(f.ends_with(" --egress-allow 127.0.0.2/32"), "{f}");
        for t in [TOKEN_A, TOKEN_B, TOKEN_APPROVED] {
            assert!(t.starts_with(TOKEN_PREFIX));
        }
    }

    #[test]
    fn the_section_replaces_its_own_or_goes_before_the_host_sections() {
        use crate::bench::fs::splice_named;
        let base = "# B\n\n## Streams\n\ns\n\n## Helper with real VMs\n\nh\n";
        let sec = format!("{SECTION_HEADING}\n\nfirst\n");
        let once = splice_named(base, SECTION_HEADING, &sec);
        assert_eq!(
            once,
            format!("# B\n\n## Streams\n\ns\n\n{SECTION_HEADING}\n\nfirst\n\n## Helper with real VMs\n\nh\n")
        );
        let again = splice_named(
            &once,
            SECTION_HEADING,
            &format!("{SECTION_HEADING}\n\nsecond\n"),
        );
        assert_eq!(again, once.replace("first", "second"));
        let opts = crate::bench::EgressOptions::default();
        assert!(opts.validate().is_ok());
        assert!(crate::bench::EgressOptions {
            mib: 0,
            ..opts.clone()
        }
        .validate()
        .is_err());
        assert!(crate::bench::EgressOptions {
            connects: 0,
            ..opts.clone()
        }
        .validate()
        .is_err());
        let case = opts.case();
        assert!(
            case.script.contains("--egress-bench 256 100 "),
            "{}",
            case.script
        );
        assert!(
            case.script.contains("--egress-allow 127.0.0.2/32"),
            "{}",
            case.script
        );
    }

    #[test]
    fn the_section_shows_rates_ratios_and_latency() {
        let out = "noise\n@@EGRESS-BENCH {\"mib\":256,\"direct_s\":1.0,\"proxy_http_s\":2.0,\
                   \"proxy_connect_s\":4.0,\"proxy_socks_s\":2.0,\"guest_loopback_s\":1.6,\
                   \"connect_setup_ms\":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,100]}\n";
        let (s, ok) = render(out, "ctx");
        assert!(ok);
        assert!(s.starts_with(SECTION_HEADING), "{s}");
        assert!(s.contains("| L1 directly | 256.0 MiB/s | 1 |"), "{s}");
        assert!(s.contains("| 128.0 MiB/s | 0.50 |"), "{s}");
        assert!(s.contains("| 64.0 MiB/s | 0.25 |"), "{s}");
        assert!(s.contains("median 10.5 ms, p95 19.0 ms"), "{s}");
        assert!(s.contains("| 160.0 MiB/s | 0.62 |"), "{s}");
        assert!(s.contains("own loopback ceiling: 0.80x"), "{s}");
        assert!(s.contains("slowest 0.25x: NOT met"), "{s}");
        let (s, ok) = render("no result here\n", "ctx");
        assert!(!ok);
        assert!(s.contains("no result here"), "{s}");
    }
}
