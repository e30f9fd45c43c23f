//! End-to-end: `coworkvm -socket PATH` (the drop-in form the desktop client
//! starts) serves real VMs booted from a bundle seeded with the Debian
//! images, driven by `client-probe` exactly as the client drives its helper:
//! configure, subscribeEvents, startVM, isGuestConnected, installSdk,
//! addApprovedOauthToken, spawns with events, writeStdin, kill, readFile,
//! the session-disk methods, stopVM, a VMM killed under load and a restart.
//! Then: no secret in the helper's log, SIGTERM stops it cleanly, and a
//! SIGKILLed helper takes its VMM with it.

use coworkvm_tests::images;
use coworkvm_tests::{paths_or_skip, Batch, Case};

const SCRIPT: &str = r#"mkdir -p $TMPDIR/images /bundle
mount -o ro $DISK0 $TMPDIR/images || exit 90
mount $DISK1 /bundle || exit 91
export HOME=$TMPDIR/home COWORKVM_IMAGES=$TMPDIR/images
d=$HOME/.config/Claude/claude-code-vm/9.9.9
mkdir -p $d $TMPDIR/run /bundle/c
chmod 700 $TMPDIR/run
printf '#!/bin/sh\necho "sdk-ok $*"\necho "uid=$(id -u)"\necho "cwd=$(pwd)"\n' > $d/claude
chmod 755 $d/claude
touch $d/.verified
S=$TMPDIR/run/cowork.sock
wait_socket() {
    i=0; while [ ! -S $S ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
}
$COWORKVM -socket $S 2> $TMPDIR/helper.log &
H=$!
wait_socket
$CLIENT_PROBE $S /bundle/c
echo "probe-rc=$?"
kill -TERM $H
wait $H
echo "helper-rc=$?"
echo "secret-lines=$(grep -c oauth-secret-e2e-7f3a $TMPDIR/helper.log)"
echo "log-lines=$(wc -l < $TMPDIR/helper.log)"
sed 's/^/helper| /' $TMPDIR/helper.log | tail -n 80

# A helper killed with SIGKILL takes its VMM with it.
rm -f $S
$COWORKVM serve -socket $S 2> $TMPDIR/helper2.log &
H=$!
wait_socket
$CLIENT_PROBE --start $S /bundle/c
echo "vmm-before=$(ps -o args | grep -c '[c]oworkvm boot')"
kill -KILL $H
wait $H
sleep 3
echo "vmm-after=$(ps -o args | grep -c '[c]oworkvm boot')"
"#;

#[test]
fn serve_drives_real_vms_as_the_client_does() {
    let Some(paths) = paths_or_skip() else { return };
    let Some(images) = images::images_or_skip(&paths.root) else {
        return;
    };
    let rig = images::HelperDisks::new(&paths.root, &images, "serve-e2e", false)
        .expect("the rig's disks");
    let batch = Batch {
        cases: vec![Case::new("serve", SCRIPT, 1200)],
        files: vec![],
        disks: rig.disks.clone(),
    };
    let result = batch.run(&paths).expect("the rig runs");
    drop(rig);
    let c = result.case("serve");
    eprintln!("{}", c.output);
    let ctx = || result.context("serve");
    result.assert_client_passed(
        "serve",
        &[
            "configure",
            "a new subscriber gets networkStatus and apiReachability",
            "isGuestConnected turns true",
            "installSdk",
            "the SDK runs and exits 0 (exitCode)",
            "the session runs as its own unprivileged user",
            "stdin reached the process",
            "readFile returns the file's bytes in base64",
            "kill ends it with the signal reported",
            "getSessionsDiskInfo",
            "pruneSessionCaches",
            "deleteSessionDirs",
            "unknown method",
            "not running, not connected after stopVM",
            "the vendor rootfs.img.zst was removed, not applied",
            "NOT_CONNECTED after the VMM died",
            "the running process is reported ended",
            "connected after the crash",
            "the session disk survived the crash",
            "final stopVM",
        ],
    );
    assert_eq!(
        c.lines_with("helper-rc="),
        ["0"],
        "SIGTERM: clean exit\n{}",
        ctx()
    );
    assert_eq!(
        c.lines_with("secret-lines="),
        ["0"],
        "a secret reached the log\n{}",
        ctx()
    );
    let log_lines: u32 = c.lines_with("log-lines=")[0].trim().parse().unwrap_or(0);
    assert!(log_lines > 5, "the helper logs its lifecycle\n{}", ctx());
    assert_eq!(c.lines_with("@@CLIENT started"), ["true"], "{}", ctx());
    assert_eq!(c.lines_with("vmm-before="), ["1"], "{}", ctx());
    assert_eq!(
        c.lines_with("vmm-after="),
        ["0"],
        "no VM outlives its helper\n{}",
        ctx()
    );
}
