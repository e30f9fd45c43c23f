//! A real Cowork session end to end, in a real VM from the Debian images:
//! `coworkvm -socket PATH` run as uid 1000 the way the client runs it,
//! driven by `client-probe --cowork` exactly as the client drives it, with
//! the real agent runtime (Claude Code's Linux binary from npm, pinned in
//! `coworkvm_tests::runtime`, fetched once into `build/claude-code/`) laid
//! out as the client lays it out (`$HOME/<sdkSubpath>/<version>/claude`
//! and `.verified`, here a read-only disk mounted there), and a fake
//! Messages API (`egress-upstream`) that the session reaches through its
//! egress proxy. See tests/src/bin/client-probe/cowork.rs for the checks:
//! installSdk within the client's timeout, `/usr/local/bin/claude
//! --version`, `claude -p` writing into the host's outputs folder, a
//! refused write into a read-only mount, a refused host, and a resumed
//! session after a restart. The probe prints the timings the benchmark
//! reports (`@@CLIENT start_to_connected_s`, `install_sdk_s`, ...).

use coworkvm_tests::egress::{config_toml, start_upstream_script};
use coworkvm_tests::{build_dir, images, runtime};
use coworkvm_tests::{paths_or_skip, Batch, Case};

const SCRIPT: &str = r#"mkdir -p /images /bundle
mount -o ro $DISK0 /images || exit 90
mount $DISK1 /bundle || exit 91
U=1000
export HOME=$TMPDIR/home COWORKVM_IMAGES=/images
T=$TMPDIR/cowork
E=$TMPDIR/egress
SDK=$HOME/.config/Claude/claude-code-vm
mkdir -p $HOME/.config/coworkvm $SDK $T/outputs $T/claude/skills $T/uploads $T/project $T/ref \
    $TMPDIR/run /bundle/c $E
mount -o ro $DISK2 $SDK || exit 94
[ -x $SDK/@VERSION@/claude ] && [ -e $SDK/@VERSION@/.verified ] || exit 95
cat > $HOME/.config/coworkvm/config.toml <<'TOML'
@CONFIG@TOML
ip link set lo up || exit 92
@UPSTREAM@cp $E/ca.pem $T/ref/ca.pem
echo project-file > $T/project/README.md
chown $U:$U $HOME $HOME/.config $HOME/.config/Claude
chown -R $U:$U $HOME/.config/coworkvm $T $TMPDIR/run /bundle/c $E
chmod 755 $TMPDIR
chmod 700 $TMPDIR/run
chmod 666 /dev/kvm
S=$TMPDIR/run/cowork.sock
$RUN_AS $U env HOME=$HOME XDG_RUNTIME_DIR=$TMPDIR/run SSL_CERT_FILE=$E/ca.pem \
    $COWORKVM -socket $S 2> $TMPDIR/helper.log &
H=$!
i=0; while [ ! -S $S ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
$RUN_AS $U env HOME=$HOME $CLIENT_PROBE --cowork $S /bundle/c $T
echo "probe-rc=$?"
kill -TERM $H
wait $H
echo "helper-rc=$?"
kill $(cat $E/upstream.pid)
echo "fakeapi-requests=$(grep -c 'POST /v1/messages' $TMPDIR/upstream.log)"
echo "upstream-denied=$(grep -c 'denied.test' $TMPDIR/upstream.log)"
sed 's/^/upstream| /' $TMPDIR/upstream.log | tail -n 40
grep -v ' DEBUG ' $TMPDIR/helper.log | sed 's/^/helper| /' | tail -n 60
for c in $TMPDIR/run/*.d/console.log; do grep -a -i -E "coworkvm-agent|error" $c | sed 's/^/console| /' | tail -n 30; done
"#;

#[test]
fn a_cowork_session_runs_the_real_runtime_end_to_end() {
    let Some(paths) = paths_or_skip() else { return };
    let Some(images) = images::images_or_skip(&paths.root) else {
        return;
    };
    let Some(claude) = coworkvm_tests::ok_or_skip(
        runtime::fetch(&build_dir(&paths.root)).map_err(|e| format!("the runtime: {e:#}")),
    ) else {
        return;
    };
    let work = paths.root.join("target/rig-tmp/cowork-e2e");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let images_disk = images::images_disk(&images, &work, false).expect("images disk");
    let bundle_disk = work.join("bundle.ext4");
    images::ext4_image(&bundle_disk, None, 3072).expect("bundle disk");
    // The runtime as the client lays it out under its sdkSubpath.
    let tree = work.join("sdk");
    let vdir = tree.join(runtime::VERSION);
    std::fs::create_dir_all(&vdir).unwrap();
    std::fs::hard_link(&claude, vdir.join("claude"))
        .or_else(|_| std::fs::copy(&claude, vdir.join("claude")).map(|_| ()))
        .expect("the runtime into the disk tree");
    std::fs::write(vdir.join(".verified"), b"").unwrap();
    let size_mib = std::fs::metadata(&claude).unwrap().len() / (1 << 20) * 11 / 10 + 64;
    let sdk_disk = work.join("sdk.ext4");
    images::ext4_image(&sdk_disk, Some(&tree), size_mib).expect("runtime disk");
    let _ = std::fs::remove_dir_all(&tree);

    let script = SCRIPT
        .replace("@CONFIG@", &config_toml())
        .replace("@UPSTREAM@", &start_upstream_script())
        .replace("@VERSION@", runtime::VERSION);
    let batch = Batch {
        cases: vec![Case::new("cowork", &script, 2400)],
        files: vec![],
        disks: vec![images_disk, bundle_disk, sdk_disk],
    };
    let result = batch.run(&paths).expect("the rig runs");
    let _ = std::fs::remove_dir_all(&work);
    result.print_cases();

    let c = result.case("cowork");
    let ctx = || result.context("cowork");
    let fails = c.lines_with("@@CLIENT fail");
    assert!(fails.is_empty(), "failed checks: {fails:#?}\n{}", ctx());
    for what in [
        "installSdk of the real runtime",
        "installSdk answers within the client's 30 s",
        "installSdk again (a client's retry) works",
        "the runtime prints its version on stdout",
        "--version exits 0",
        "claude -p exits 0",
        "the file appears in the host's outputs folder",
        "the file is owned by the host user",
        "a Write into a ro mount is refused",
        "a host not in allowedDomains is refused (403 blocked-by-allowlist)",
        "the resumed session sees its files",
        "the runtime's transcript is on the host in the .claude mount",
    ] {
        assert!(
            c.has_line(&format!("@@CLIENT pass {what}")),
            "check {what:?} did not pass\n{}",
            ctx()
        );
    }
    assert_eq!(c.lines_with("probe-rc="), ["0"], "{}", ctx());
    assert_eq!(c.lines_with("helper-rc="), ["0"], "{}", ctx());
    let api: usize = c.lines_with("fakeapi-requests=")[0].parse().unwrap_or(0);
    assert!(
        api >= 2,
        "the fake API did not see the runtime's two turns\n{}",
        ctx()
    );
    assert_eq!(
        c.lines_with("upstream-denied="),
        ["0"],
        "a request for denied.test reached the upstream\n{}",
        ctx()
    );
}
