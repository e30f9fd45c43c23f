//! What the Cowork end-to-end rig test (tests/tests/rig/cowork.rs), its client
//! probe (`client-probe --cowork`) and the Cowork benchmark (`coworkvm-rig
//! bench --cowork-only`, `client-probe --cowork-bench`) share: the L1 case
//! script (the images disk, a bundle disk, the runtime on a read-only disk
//! mounted where the client keeps it, `egress-upstream` with the fake
//! Messages API, `coworkvm -socket` run as uid 1000 the way the client
//! runs it), the runtime disk, and the benchmark's section of
//! bench/results.md.
//!
//! The disks, in this order: `$DISK0` the images ([`crate::images::images_disk`]),
//! `$DISK1` a bundle disk, then the runtime disk ([`runtime_disk`]) at the
//! index the caller names (2 in the test and in both benchmark batches).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::bench::{stats, tagged};
use crate::egress::{config_toml, start_upstream_script};
use crate::runtime;

/// The host user the helper and the probe run as in L1.
pub const HOST_UID: u32 = 1000;
/// The bundle directory on the bundle disk.
pub const BUNDLE_DIR: &str = "/bundle/c";
/// The runtime disk's size in MiB for a binary of `bytes` bytes: the
/// binary once (every version directory holds a hard link to it, which
/// costs no data blocks), a tenth for ext4, and room for the rest.
fn runtime_disk_mib(bytes: u64) -> u64 {
    bytes / (1 << 20) * 11 / 10 + 64
}

/// The runtime as the client lays it out under its `sdkSubpath`:
/// `<version>/claude` and `<version>/.verified` for [`runtime::VERSION`]
/// and for each of `extra_versions` (the copy benchmark installs each
/// under its own name, so none is found cached in the guest), on an ext4
/// disk in `work`. The extra versions are hard links to the one binary.
pub fn runtime_disk(claude: &Path, work: &Path, extra_versions: &[String]) -> Result<PathBuf> {
    let tree = work.join("sdk");
    let _ = std::fs::remove_dir_all(&tree);
    let mut first: Option<PathBuf> = None;
    for v in std::iter::once(runtime::VERSION).chain(extra_versions.iter().map(String::as_str)) {
        socket_proto::sdk::validate_version(v).with_context(|| format!("version {v:?}"))?;
        let vdir = tree.join(v);
        std::fs::create_dir_all(&vdir).with_context(|| format!("creating {}", vdir.display()))?;
        let bin = vdir.join("claude");
        match &first {
            // Within the tree: one file system, so a link always works.
            Some(f) => std::fs::hard_link(f, &bin),
            None => std::fs::hard_link(claude, &bin)
                .or_else(|_| std::fs::copy(claude, &bin).map(|_| ())),
        }
        .with_context(|| format!("the runtime into {}", bin.display()))?;
        std::fs::write(vdir.join(".verified"), b"")?;
        first.get_or_insert(bin);
    }
    let size = std::fs::metadata(claude)
        .with_context(|| format!("{}", claude.display()))?
        .len();
    let disk = work.join("sdk.ext4");
    crate::images::ext4_image(&disk, Some(&tree), runtime_disk_mib(size))
        .context("the runtime disk")?;
    let _ = std::fs::remove_dir_all(&tree);
    Ok(disk)
}

/// The L1 case script, in parts: the set-up up to the running helper.
const SETUP: &str = r#"mkdir -p /images /bundle
grep -q " /images " /proc/mounts || mount -o ro $DISK0 /images || exit 90
grep -q " /bundle " /proc/mounts || mount $DISK1 /bundle || exit 91
U=@UID@
export HOME=$TMPDIR/home COWORKVM_IMAGES=/images
T=$TMPDIR/cowork
E=$TMPDIR/egress
SDK=$HOME/.config/Claude/claude-code-vm
mkdir -p $HOME/.config/coworkvm $SDK $T/outputs $T/claude/skills $T/uploads $T/project $T/ref \
    $TMPDIR/run @BUNDLE@ $E
grep -q " $SDK " /proc/mounts || mount -o ro $DISK@SDK_DISK@ $SDK || exit 94
[ -x $SDK/@VERSION@/claude ] && [ -e $SDK/@VERSION@/.verified ] || exit 95
cat > $HOME/.config/coworkvm/config.toml <<'TOML'
@CONFIG@TOML
ip link set lo up || exit 92
@UPSTREAM@cp $E/ca.pem $T/ref/ca.pem
echo project-file > $T/project/README.md
chown $U:$U $HOME $HOME/.config $HOME/.config/Claude
chown -R $U:$U $HOME/.config/coworkvm $T $TMPDIR/run @BUNDLE@ $E
chmod 755 $TMPDIR
chmod 700 $TMPDIR/run
chmod 666 /dev/kvm
S=$TMPDIR/run/cowork.sock
$RUN_AS $U env HOME=$HOME XDG_RUNTIME_DIR=$TMPDIR/run SSL_CERT_FILE=$E/ca.pem \
    $COWORKVM -socket $S 2> $TMPDIR/helper.log &
H=$!
i=0; while [ ! -S $S ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
"#;

/// The probe and the end: the helper stopped, the logs shown.
const RUN_AND_REPORT: &str = r#"$RUN_AS $U env HOME=$HOME $CLIENT_PROBE @PROBE_ARGS@
PRC=$?
echo "probe-rc=$PRC"
kill -TERM $H
wait $H
echo "helper-rc=$?"
@AFTER_PROBE@kill $(cat $E/upstream.pid)
echo "fakeapi-requests=$(grep -c 'POST /v1/messages' $TMPDIR/upstream.log)"
echo "upstream-denied=$(grep -c 'denied.test' $TMPDIR/upstream.log)"
sed 's/^/upstream| /' $TMPDIR/upstream.log | tail -n 40
grep -v ' DEBUG ' $TMPDIR/helper.log | sed 's/^/helper| /' | tail -n 60
for c in $TMPDIR/run/*.d/console.log; do grep -a -i -E "coworkvm-agent|error" $c | sed 's/^/console| /' | tail -n 30; done
"#;

fn script(
    probe_args: &str,
    sdk_disk: usize,
    before_probe: &str,
    after_probe: &str,
    last: &str,
) -> String {
    let setup = SETUP
        .replace("@UID@", &HOST_UID.to_string())
        .replace("@BUNDLE@", BUNDLE_DIR)
        .replace("@SDK_DISK@", &sdk_disk.to_string())
        .replace("@CONFIG@", &config_toml())
        .replace("@UPSTREAM@", &start_upstream_script())
        .replace("@VERSION@", runtime::VERSION);
    let end = RUN_AND_REPORT
        .replace("@PROBE_ARGS@", probe_args)
        .replace("@AFTER_PROBE@", after_probe);
    format!("{setup}{before_probe}{end}{last}")
}

/// The end-to-end test's case: `client-probe PROBE_ARGS` (which may use
/// `$S`, the helper's socket, and `$T`, the host folders) as uid 1000
/// against the helper; the runtime disk is `$DISK<sdk_disk>`.
pub fn case_script(probe_args: &str, sdk_disk: usize) -> String {
    script(probe_args, sdk_disk, "", "", "")
}

/// The version name of the copy benchmark's `round`-th install (1-based).
pub fn copy_version(round: usize) -> String {
    format!("{}-copy{round}", runtime::VERSION)
}

/// The versions [`runtime_disk`] must carry for `runs` copy installs.
pub fn copy_versions(runs: usize) -> Vec<String> {
    (1..=runs).map(copy_version).collect()
}

/// The virtiofsd paths the helper's search tries (see
/// `coworkvm_helper::virtiofsd`), as L1 lays them out: the copy helper's
/// private mount namespace hides each one that exists.
const VIRTIOFSD_CANDIDATES: &str = "/usr/libexec/virtiofsd /usr/bin/virtiofsd \
/usr/lib/coworkvm/virtiofsd $(dirname $COWORKVM)/../lib/coworkvm/virtiofsd";

/// The copy helper: a second `coworkvm -socket` in its own mount namespace
/// where every virtiofsd the helper would find is covered by `/dev/null`
/// (not executable, so the probe of each fails) and `$COWORKVM_VIRTIOFSD`
/// is unset, so its VMs have no shared folders and `installSdk` falls back
/// to copying the binary over the agent connection, as it does for a user
/// without virtiofsd.
const COPY_HELPER: &str = r#"cat > $TMPDIR/copy-helper.sh <<'SH'
for v in @CANDIDATES@; do
    [ -e "$v" ] && { mount -o bind /dev/null "$v" || exit 97; }
done
unset COWORKVM_VIRTIOFSD
exec "$@"
SH
C=$TMPDIR/run/copy.sock
unshare -m --propagation private sh $TMPDIR/copy-helper.sh \
    $RUN_AS $U env HOME=$HOME XDG_RUNTIME_DIR=$TMPDIR/run $COWORKVM -socket $C \
    2> $TMPDIR/copy-helper.log &
CH=$!
i=0; while [ ! -S $C ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
"#;

/// L1's memory every 30 s while a benchmark case runs, on the console: a
/// case that starves L1 shows how (the copy path writes the runtime
/// through the guest's page cache into the bundle disk).
const MEMORY_MONITOR: &str = r#"( while :; do
    echo "@@L1-MEM $(grep -E '^(MemAvailable|Dirty|Writeback|Shmem):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
    sleep 30
done ) &
MON=$!
"#;

/// The share case's lines after the probe: what the render needs from the
/// logs and the images.
const SHARE_REPORT: &str = r#"kill $MON
echo "@@COWORK-MANIFEST $(tr -d '\n' < /images/manifest.json)"
grep -o 'expanded [0-9]* MiB in [0-9.]* s' $TMPDIR/helper.log | sed 's/^/@@COWORK-EXPANDED /'
echo "@@COWORK-INSTALLS share-helper shared=$(grep -c 'shared read-only into the guest' $TMPDIR/helper.log) copied=$(grep -c 'copying the binary' $TMPDIR/helper.log)"
"#;

/// The copy case's lines after the probe: the copy helper stopped, and
/// the paths its installs took.
const COPY_REPORT: &str = r#"kill $MON
kill -TERM $CH
wait $CH
echo "copy-helper-rc=$?"
echo "@@COWORK-INSTALLS copy-helper shared=$(grep -c 'shared read-only into the guest' $TMPDIR/copy-helper.log) copied=$(grep -c 'copying the binary' $TMPDIR/copy-helper.log)"
grep -v ' DEBUG ' $TMPDIR/copy-helper.log | sed 's/^/copy-helper| /' | tail -n 30
"#;

/// The share case's time-out for `runs` rounds: a first start with the
/// expansion, then per round a boot, the installs and the runtime's two
/// runs (about two minutes a round in the rig).
pub fn bench_timeout_s(runs: usize) -> u64 {
    1200 + 600 * runs as u64
}

/// The copy case's time-out for `runs` installs by copy: a boot, then a
/// copy of the whole binary through the guest each.
pub fn copy_timeout_s(runs: usize) -> u64 {
    900 + 600 * runs as u64
}

/// The fake API lives as long as the case may.
fn upstream_lives(script: String, timeout_s: u64) -> String {
    script.replace("--stop-after 3000", &format!("--stop-after {timeout_s}"))
}

/// The benchmark's share case: `client-probe --cowork-bench RUNS` against
/// the helper (installs through the share); the runtime disk is
/// `$DISK<sdk_disk>`.
pub fn bench_case_script(runs: usize, sdk_disk: usize) -> String {
    let s = script(
        &format!("--cowork-bench {runs} $S {BUNDLE_DIR} $T"),
        sdk_disk,
        MEMORY_MONITOR,
        SHARE_REPORT,
        // The probe's status is the case's: a failed check fails the run.
        "exit $PRC\n",
    );
    upstream_lives(s, bench_timeout_s(runs))
}

/// The benchmark's copy case, a case of its own so that a starved L1
/// reruns only it: `client-probe --cowork-copy-bench RUNS` against the
/// copy helper (no virtiofsd); the runtime disk is `$DISK<sdk_disk>` and
/// must carry [`copy_versions`]`(runs)`.
pub fn copy_case_script(runs: usize, sdk_disk: usize) -> String {
    let s = script(
        &format!("--cowork-copy-bench {runs} $C {BUNDLE_DIR}"),
        sdk_disk,
        &format!(
            "{}{MEMORY_MONITOR}",
            COPY_HELPER.replace("@CANDIDATES@", VIRTIOFSD_CANDIDATES)
        ),
        COPY_REPORT,
        "exit $PRC\n",
    );
    upstream_lives(s, copy_timeout_s(runs))
}

/// What the agent prints on the console once it reaches the helper
/// (`coworkvm-agent`'s `BootTimeline`), before its stages.
const BOOT_LINE: &str = "coworkvm-agent: boot (s since the kernel started): ";

/// The stages of the last boot timeline in a console log, each with the
/// guest's uptime in seconds when it ended (`init` is when the kernel ran
/// the agent, `connected` when the agent reached the helper).
pub fn boot_stages(console: &str) -> Option<Vec<(String, f64)>> {
    let line = console
        .lines()
        .rev()
        .find_map(|l| l.split_once(BOOT_LINE).map(|(_, rest)| rest))?;
    line.trim_end()
        .split(", ")
        .map(|kv| {
            let (k, v) = kv.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// The section's heading in bench/results.md.
pub const SECTION_HEADING: &str = "## A Cowork session with the real runtime";

/// Seconds per round of one metric of the `@@COWORK-BENCH` line.
fn secs(v: &serde_json::Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default()
}

/// `expanded N MiB in X s` lines (the bundle's log): (MiB, seconds).
fn expansions(output: &str) -> Vec<(u64, f64)> {
    output
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("@@COWORK-EXPANDED expanded "))
        .filter_map(|l| {
            let (mib, rest) = l.split_once(" MiB in ")?;
            let s = rest.strip_suffix(" s")?;
            Some((mib.parse().ok()?, s.parse().ok()?))
        })
        .collect()
}

/// `@@COWORK-INSTALLS <helper> shared=N copied=M`: (shared, copied).
fn installs(output: &str, helper: &str) -> Option<(u64, u64)> {
    let prefix = format!("@@COWORK-INSTALLS {helper} ");
    let l = output
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(&prefix))?;
    let mut shared = None;
    let mut copied = None;
    for kv in l.split(' ') {
        match kv.split_once('=') {
            Some(("shared", n)) => shared = n.parse().ok(),
            Some(("copied", n)) => copied = n.parse().ok(),
            _ => {}
        }
    }
    Some((shared?, copied?))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// Renders the share case's `@@COWORK-BENCH` line and the copy case's
/// `@@COWORK-COPY` line (`output` is both cases' output, with the images'
/// manifest and the helpers' expansion and install lines); `false` when
/// the output has no result, a metric has fewer values than rounds, or the
/// logs show an install took the other path than the one it is reported
/// under (the section then says so).
pub fn render(output: &str, context: &str) -> (String, bool) {
    let mut s = format!("{SECTION_HEADING}\n\n");
    let Some(v) = tagged(output, "@@COWORK-BENCH").into_iter().next() else {
        let _ = write!(
            s,
            "No result; the case's output:\n\n```\n{}\n```\n",
            output.trim_end()
        );
        return (s, false);
    };
    let rounds = v["rounds"].as_u64().unwrap_or(0) as usize;
    let connect = secs(&v, "connect_s");
    let share = secs(&v, "install_share_s");
    // The copy case's line; without it (the case did not finish) the
    // copy row is empty and the section incomplete.
    let copy_line = tagged(output, "@@COWORK-COPY").into_iter().next();
    let copy = copy_line
        .as_ref()
        .map(|c| secs(c, "install_copy_s"))
        .unwrap_or_default();
    let copy_answer = copy_line
        .as_ref()
        .map(|c| secs(c, "install_copy_answer_s"))
        .unwrap_or_default();
    let version = secs(&v, "version_first_stdout_s");
    let print = secs(&v, "print_round_trip_s");
    let sdk_mib = v["sdk_bytes"].as_u64().map(mib);
    let mut complete = rounds > 0;
    let _ = writeln!(
        s,
        "{context}. The real agent runtime (Claude Code {}, the npm Linux binary, {}) laid \
         out as the client lays it out, driven by `client-probe --cowork-bench {rounds}` the \
         way the client drives `coworkvm -socket` (run as uid {HOST_UID}); the Debian rootfs \
         bundle, 2 GiB, 2 vCPUs. Each round: `startVM` (a fresh boot), `isGuestConnected` \
         polled every 250 ms, `installSdk` (through the shared folder: the version \
         directory granted read-only to the VM), `spawn` of `/usr/local/bin/claude \
         --version` with the client's standard mounts, `claude -p` against the fake Messages \
         API (`egress-upstream`, reached through the session's egress proxy) whose reply asks \
         for a Write into `outputs`, `stopVM`. The copy fallback (no virtiofsd: a second \
         helper whose mount namespace hides every virtiofsd it would find) installs the \
         binary {rounds} times in one VM, each under its own version name so that none is \
         found cached in the guest; `installSdk` answers when the copy is in or after 20 s, \
         whichever comes first, and a `spawn` of the runtime is accepted once the copy is \
         in.\n",
        runtime::VERSION,
        sdk_mib.map_or("size unknown".into(), |m| format!("{m:.0} MiB")),
    );
    let _ = writeln!(s, "| metric | runs | median | min-max |");
    let _ = writeln!(s, "|---|---|---|---|");
    let row = |s: &mut String, name: &str, x: &[f64], complete: &mut bool, want: usize| {
        if x.len() < want {
            *complete = false;
        }
        let cells = match stats(x) {
            Some(st) => format!(
                "{} | {:.1} s | {:.1}-{:.1} s",
                x.len(),
                st.median,
                st.min,
                st.max
            ),
            None => "0 | n/a | n/a".into(),
        };
        let _ = writeln!(s, "| {name} | {cells} |");
    };
    let first = connect.first().copied();
    let warm = connect.get(1..).unwrap_or_default();
    row(
        &mut s,
        "`startVM` to `isGuestConnected` true (warm: rounds 2 on)",
        warm,
        &mut complete,
        rounds.saturating_sub(1),
    );
    // Where the warm boots' time went inside the guest.
    let boots: Vec<Vec<(String, f64)>> = v["boot_stages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    b.as_array()
                        .map(|kv| {
                            kv.iter()
                                .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_f64()?)))
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    let warm_boots = boots.get(1..).unwrap_or_default();
    if let Some(first_boot) = warm_boots.first() {
        for (stage, _) in first_boot {
            let at: Vec<f64> = warm_boots
                .iter()
                .filter_map(|b| b.iter().find(|(k, _)| k == stage).map(|(_, v)| *v))
                .collect();
            let name =
                format!("of that, in the guest: kernel start to the agent's `{stage}` (warm)");
            // Informative rows: none is required (0 values wanted).
            row(&mut s, &name, &at, &mut complete, 0);
        }
    }
    row(
        &mut s,
        "`installSdk`, shared folder",
        &share,
        &mut complete,
        rounds,
    );
    row(
        &mut s,
        "`installSdk` by copy (no virtiofsd): its answer",
        &copy_answer,
        &mut complete,
        rounds,
    );
    row(
        &mut s,
        "`installSdk` by copy (no virtiofsd): the copy in, a runtime `spawn` accepted",
        &copy,
        &mut complete,
        rounds,
    );
    row(
        &mut s,
        "`spawn` of `claude --version` to its first stdout event",
        &version,
        &mut complete,
        rounds,
    );
    row(
        &mut s,
        "`claude -p` with a Write, spawn to exit (two API turns)",
        &print,
        &mut complete,
        rounds,
    );
    if connect.is_empty() {
        complete = false;
    }
    let manifest = tagged(output, "@@COWORK-MANIFEST").into_iter().next();
    let size = |name: &str| {
        manifest
            .as_ref()
            .and_then(|m| m["files"][name]["size"].as_u64())
    };
    let sizes = match (size("rootfs.img"), size("rootfs.img.zst")) {
        (Some(raw), Some(zst)) => format!(
            "`rootfs.img` {:.0} MiB, `rootfs.img.zst` {:.0} MiB",
            mib(raw),
            mib(zst)
        ),
        _ => "the rootfs sizes: no manifest in the output".into(),
    };
    let expansion = match expansions(output).first() {
        Some((m, t)) => format!("the helper expanded {m} MiB in {t:.1} s"),
        None => "the helper logged no expansion".into(),
    };
    let _ = writeln!(
        s,
        "\nFirst start of the new bundle: {} to connected, which includes seeding the bundle \
         and expanding the rootfs ({sizes}; {expansion}). The client gives up when the guest \
         is not connected 60 s after `startVM`; the target for the warm median is under 30 s.",
        first.map_or("n/a".into(), |f| format!("{f:.1} s")),
    );
    let mut paths_note = String::new();
    if let Some((shared, copied)) = installs(output, "share-helper") {
        let _ = write!(
            paths_note,
            " The helper's log: {shared} installs through the share, {copied} copies;"
        );
        if copied > 0 || shared < share.len() as u64 {
            complete = false;
            paths_note.push_str(" NOT all shared, so the share row is not what it says;");
        }
    }
    if let Some((shared, copied)) = installs(output, "copy-helper") {
        let _ = write!(
            paths_note,
            " the copy helper's: {shared} through a share, {copied} copies."
        );
        if shared > 0 || copied < copy.len() as u64 {
            complete = false;
            paths_note.push_str(" NOT all copied, so the copy row is not what it says.");
        }
    }
    let _ = writeln!(
        s,
        "\nThese are rig numbers: the VM runs under nested KVM inside an L1 that QEMU \
         emulates (TCG), so every guest instruction is emulated and a boot, the runtime's \
         start-up and a copy through the guest are many times slower than on a user's \
         hardware; compare the rows with each other and with earlier runs of this rig, not \
         with a desktop.{paths_note}"
    );
    (s, complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_script_runs_the_probe_as_the_host_user_against_its_disks() {
        let s = case_script("--cowork $S /bundle/c $T", 2);
        assert!(
            s.contains("$RUN_AS $U env HOME=$HOME $CLIENT_PROBE --cowork $S /bundle/c $T\n"),
            "{s}"
        );
        assert!(s.contains("mount -o ro $DISK2 $SDK || exit 94"), "{s}");
        assert!(
            s.contains(&format!("$SDK/{}/claude", runtime::VERSION)),
            "{s}"
        );
        assert!(s.contains("U=1000\n"), "{s}");
        assert!(s.contains("--stop-after 3000"), "{s}");
        for marker in [
            "@UID@",
            "@BUNDLE@",
            "@SDK_DISK@",
            "@CONFIG@",
            "@UPSTREAM@",
            "@VERSION@",
        ] {
            assert!(!s.contains(marker), "{marker} left in {s}");
        }
        assert!(!s.contains("copy.sock"), "{s}");
    }

    #[test]
    fn the_bench_scripts_run_the_share_rounds_and_the_copies_apart() {
        let s = bench_case_script(5, 2);
        assert!(
            s.contains("$CLIENT_PROBE --cowork-bench 5 $S /bundle/c $T\n"),
            "{s}"
        );
        assert!(!s.contains("copy.sock"), "{s}");
        assert!(s.contains("@@COWORK-MANIFEST"), "{s}");
        assert!(s.contains("@@COWORK-INSTALLS share-helper"), "{s}");
        assert!(
            s.contains(&format!("--stop-after {}", bench_timeout_s(5))),
            "{s}"
        );
        assert!(s.ends_with("exit $PRC\n"), "{s}");

        let c = copy_case_script(5, 2);
        assert!(
            c.contains("$CLIENT_PROBE --cowork-copy-bench 5 $C /bundle/c\n"),
            "{c}"
        );
        assert!(c.contains("unshare -m --propagation private"), "{c}");
        assert!(c.contains("mount -o bind /dev/null \"$v\""), "{c}");
        assert!(c.contains("/usr/lib/coworkvm/virtiofsd"), "{c}");
        assert!(c.contains("@@COWORK-INSTALLS copy-helper"), "{c}");
        assert!(!c.contains("@@COWORK-INSTALLS share-helper"), "{c}");
        assert!(
            c.contains(&format!("--stop-after {}", copy_timeout_s(5))),
            "{c}"
        );
        // The copy helper starts before the probe and stops after it; the
        // memory monitor runs around the probe in both.
        let start = c.find("-socket $C").unwrap();
        let probe = c.find("--cowork-copy-bench").unwrap();
        let stop = c.find("kill -TERM $CH").unwrap();
        assert!(start < probe && probe < stop, "{c}");
        for x in [&s, &c] {
            let mon = x.find("@@L1-MEM").unwrap();
            let probe = x.find("$CLIENT_PROBE").unwrap();
            let end = x.find("kill $MON").unwrap();
            assert!(mon < probe && probe < end, "{x}");
        }
        assert!(c.ends_with("exit $PRC\n"), "{c}");
        assert_eq!(copy_versions(2), [copy_version(1), copy_version(2)]);
        for v in copy_versions(3) {
            socket_proto::sdk::validate_version(&v).unwrap();
        }
    }

    /// The copy helper's wrapper, run by sh with `mount` and `$COWORKVM`
    /// stood in: it covers each existing candidate, then runs the helper.
    #[test]
    fn the_copy_wrapper_covers_every_existing_virtiofsd_then_runs_the_helper() {
        let dir = crate::Scratch::new("cowork-wrap").unwrap();
        let bin = dir.path.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let log = dir.path.join("mounts");
        let fake_mount = format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display());
        std::fs::write(bin.join("mount"), fake_mount).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(bin.join("mount"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        // $COWORKVM in a tree with a bundled virtiofsd beside it.
        let tree = dir.path.join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::create_dir_all(tree.join("lib/coworkvm")).unwrap();
        std::fs::write(tree.join("lib/coworkvm/virtiofsd"), "").unwrap();
        let script = COPY_HELPER.replace("@CANDIDATES@", VIRTIOFSD_CANDIDATES);
        let body = script.split_once("<<'SH'\n").unwrap().1;
        let wrapper = body.split_once("\nSH\n").unwrap().0.to_owned();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&wrapper)
            .arg("sh")
            .arg("echo")
            .arg("helper-ran")
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("COWORKVM", tree.join("bin/coworkvm"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "helper-ran\n");
        let mounts = std::fs::read_to_string(&log).unwrap();
        assert!(
            mounts.contains(&format!(
                "-o bind /dev/null {}/bin/../lib/coworkvm/virtiofsd",
                tree.display()
            )),
            "{mounts}"
        );
    }

    #[test]
    fn the_runtime_disk_links_every_version_to_one_binary() {
        let dir = crate::Scratch::new("cowork-disk").unwrap();
        let claude = dir.path.join("claude");
        std::fs::write(&claude, vec![7u8; 3 << 20]).unwrap();
        let disk = runtime_disk(&claude, &dir.path, &copy_versions(2)).unwrap();
        let size = std::fs::metadata(&disk).unwrap().len();
        // One binary's worth: the hard links share its blocks.
        assert_eq!(size, runtime_disk_mib(3 << 20) << 20);
        let ls = std::process::Command::new("debugfs")
            .args(["-R", &format!("stat /{}/claude", copy_version(2))])
            .arg(&disk)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&ls.stdout);
        assert!(text.contains("Links: 3"), "{text}");
        assert!(runtime_disk(&claude, &dir.path, &["../x".into()]).is_err());
    }

    const OUT: &str = "noise\n\
        @@COWORK-BENCH {\"rounds\":5,\"sdk_bytes\":391118848,\
        \"connect_s\":[61.0,20.0,22.0,21.0,30.0],\
        \"install_share_s\":[0.5,0.4,0.6,0.5,0.5],\
        \"version_first_stdout_s\":[9.0,8.0,10.0,8.5,9.5],\
        \"print_round_trip_s\":[40.0,35.0,38.0,36.0,50.0],\
        \"boot_stages\":[[[\"init\",3.0],[\"connected\",9.0]],[[\"init\",2.0],[\"connected\",6.0]],\
        [[\"init\",2.2],[\"connected\",6.4]],[[\"init\",2.4],[\"connected\",7.0]],\
        [[\"init\",2.6],[\"connected\",8.0]]]}\n\
        @@COWORK-MANIFEST {\"files\":{\"rootfs.img\":{\"size\":1610612736},\
        \"rootfs.img.zst\":{\"size\":314572800}}}\n\
        @@COWORK-EXPANDED expanded 1536 MiB in 25.3 s\n\
        @@COWORK-INSTALLS share-helper shared=5 copied=0\n\
        @@COWORK-INSTALLS copy-helper shared=0 copied=5\n\
        @@COWORK-COPY {\"rounds\":5,\"install_copy_answer_s\":[20.0,20.1,20.0,19.9,20.2],\
        \"install_copy_s\":[80.0,70.0,75.0,90.0,72.0]}\n";

    #[test]
    fn the_section_shows_each_metric_the_first_start_and_the_sizes() {
        let (s, ok) = render(OUT, "ctx");
        assert!(ok, "{s}");
        assert!(s.starts_with(SECTION_HEADING), "{s}");
        assert!(s.contains("ctx. The real agent runtime"), "{s}");
        assert!(s.contains("373 MiB"), "{s}");
        assert!(
            s.contains("| `startVM` to `isGuestConnected` true (warm: rounds 2 on) | 4 | 21.5 s | 20.0-30.0 s |"),
            "{s}"
        );
        assert!(
            s.contains("| `installSdk`, shared folder | 5 | 0.5 s | 0.4-0.6 s |"),
            "{s}"
        );
        assert!(s.contains("its answer | 5 | 20.0 s | 19.9-20.2 s |"), "{s}");
        assert!(
            s.contains("a runtime `spawn` accepted | 5 | 75.0 s | 70.0-90.0 s |"),
            "{s}"
        );
        assert!(
            s.contains("first stdout event | 5 | 9.0 s | 8.0-10.0 s |"),
            "{s}"
        );
        assert!(
            s.contains("(two API turns) | 5 | 38.0 s | 35.0-50.0 s |"),
            "{s}"
        );
        assert!(s.contains("First start of the new bundle: 61.0 s"), "{s}");
        // The guest's stages over the warm boots (rounds 2 on), right
        // after the boot's own row.
        let init = s
            .find("| of that, in the guest: kernel start to the agent's `init` (warm) | 4 | 2.3 s | 2.0-2.6 s |")
            .expect(&s);
        let connected = s
            .find("agent's `connected` (warm) | 4 | 6.7 s | 6.0-8.0 s |")
            .expect(&s);
        let boot_row = s.find("(warm: rounds 2 on)").unwrap();
        let share_row = s.find("`installSdk`, shared folder").unwrap();
        assert!(
            boot_row < init && init < connected && connected < share_row,
            "{s}"
        );
        assert!(
            s.contains("`rootfs.img` 1536 MiB, `rootfs.img.zst` 300 MiB"),
            "{s}"
        );
        assert!(s.contains("expanded 1536 MiB in 25.3 s"), "{s}");
        assert!(s.contains("emulates (TCG)"), "{s}");
        assert!(s.contains("5 installs through the share, 0 copies"), "{s}");
        assert!(!s.contains("NOT all"), "{s}");
    }

    #[test]
    fn an_install_on_the_wrong_path_or_a_short_metric_is_incomplete() {
        let wrong = OUT.replace(
            "share-helper shared=5 copied=0",
            "share-helper shared=0 copied=5",
        );
        let (s, ok) = render(&wrong, "ctx");
        assert!(!ok);
        assert!(s.contains("NOT all shared"), "{s}");
        let wrong = OUT.replace(
            "copy-helper shared=0 copied=5",
            "copy-helper shared=5 copied=0",
        );
        let (s, ok) = render(&wrong, "ctx");
        assert!(!ok);
        assert!(s.contains("NOT all copied"), "{s}");
        let short = OUT.replace("[80.0,70.0,75.0,90.0,72.0]", "[80.0]");
        let (s, ok) = render(&short, "ctx");
        assert!(!ok);
        assert!(s.contains("`spawn` accepted | 1 | 80.0 s"), "{s}");
        let (s, ok) = render("the probe crashed\n", "ctx");
        assert!(!ok);
        assert!(s.contains("the probe crashed"), "{s}");
        // Without the log lines the numbers still render.
        let bare: Vec<&str> = OUT
            .lines()
            .filter(|l| l.starts_with("@@COWORK-BENCH") || l.starts_with("@@COWORK-COPY"))
            .collect();
        let (s, ok) = render(&bare.join("\n"), "ctx");
        assert!(ok, "{s}");
        assert!(s.contains("the helper logged no expansion"), "{s}");
        assert!(s.contains("no manifest in the output"), "{s}");
        // The copy case did not finish: the copy row is empty.
        let no_copy: Vec<&str> = OUT
            .lines()
            .filter(|l| !l.starts_with("@@COWORK-COPY"))
            .collect();
        let (s, ok) = render(&no_copy.join("\n"), "ctx");
        assert!(!ok, "{s}");
        assert!(s.contains("its answer | 0 | n/a | n/a |"), "{s}");
        assert!(s.contains("`spawn` accepted | 0 | n/a | n/a |"), "{s}");
        assert!(s.contains("shared folder | 5 | 0.5 s"), "{s}");
    }

    #[test]
    fn the_last_boot_timeline_of_a_console_parses() {
        let console = "[    1.0] x\n\
            coworkvm-agent: boot (s since the kernel started): init 9.00, connected 9.50\n\
            noise\n\
            coworkvm-agent: boot (s since the kernel started): init 2.91, modules 3.40, \
            disks 3.52, checks 6.10, connected 6.20\r\n";
        let stages = boot_stages(console).unwrap();
        let names: Vec<&str> = stages.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["init", "modules", "disks", "checks", "connected"]);
        assert_eq!(stages[0].1, 2.91);
        assert_eq!(stages[4].1, 6.20);
        assert_eq!(boot_stages("no timeline\n"), None);
        assert_eq!(
            boot_stages("coworkvm-agent: boot (s since the kernel started): init x\n"),
            None
        );
    }

    #[test]
    fn expansion_and_install_lines_parse() {
        assert_eq!(
            expansions("@@COWORK-EXPANDED expanded 740 MiB in 12.5 s\nx\n"),
            [(740, 12.5)]
        );
        assert!(expansions("@@COWORK-EXPANDED expanded x MiB in 1 s\n").is_empty());
        assert_eq!(
            installs("@@COWORK-INSTALLS a shared=1 copied=2\n", "a"),
            Some((1, 2))
        );
        assert_eq!(installs("@@COWORK-INSTALLS a shared=1\n", "a"), None);
    }
}
