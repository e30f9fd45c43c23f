//! Shared folders end to end: `coworkvm -socket PATH`, run as an ordinary
//! user (uid 1000) the way a desktop session runs it, serves a real VM
//! booted from the Debian images with virtiofsd (the one `make build`
//! builds, at `/usr/lib/coworkvm/virtiofsd` in L1), driven by
//! `client-probe --shares` as the client drives it: a spawn with the seven
//! standard mounts, a picked folder and the home directory; reads, writes,
//! read-only grants, nested mounts, ownership both ways; the mounts that
//! must fail (`failedMounts`); a second session that sees none of it;
//! `mountPath` into a running session; the grant leaving the staging tree
//! when the session ends; and the escape attempts from a session
//! (`..`, symlinks both ways, a symlink swap race, hard links and renames
//! out of a grant, devices, setuid and capabilities, xattrs, handles,
//! `/proc/self/fd` reopening, the hidden credential stores, a tree up to
//! 10,000 deep (45 s of it: under TCG a level costs several round trips),
//! a full host filesystem), each with the host's canaries checked.

use coworkvm_tests::images;
use coworkvm_tests::{paths_or_skip, Batch, Case};

const SCRIPT: &str = r#"mkdir -p /images /bundle
mount -o ro $DISK0 /images || exit 90
mount $DISK1 /bundle || exit 91
U=1000
export HOME=$TMPDIR/home COWORKVM_IMAGES=/images
T=$TMPDIR/shares
mkdir -p $HOME/.ssh $T/picked $T/outputs $T/claude/skills $T/lib $T/permreq $T/permresp \
    $T/uploads $T/late $T/small $TMPDIR/run /bundle/c
echo hello-from-host > $T/picked/hello.txt
echo skill > $T/claude/skills/s.md
echo lib-original > $T/lib/lib.txt
echo canary-host > $T/canary.txt
echo late-file > $T/late/late.txt
echo secret-key > $HOME/.ssh/id_test
ln -s $HOME/.ssh $T/sshlink
mount -t tmpfs -o size=32m,uid=$U,gid=$U,mode=0755 tmpfs $T/small || exit 92
chown -R $U:$U $HOME $T $TMPDIR/run /bundle/c
chmod 755 $TMPDIR
chmod 700 $TMPDIR/run $HOME/.ssh
chmod 666 /dev/kvm
S=$TMPDIR/run/cowork.sock
$RUN_AS $U env HOME=$HOME XDG_RUNTIME_DIR=$TMPDIR/run $COWORKVM -socket $S 2> $TMPDIR/helper.log &
H=$!
i=0; while [ ! -S $S ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
$RUN_AS $U env HOME=$HOME $CLIENT_PROBE --shares $S /bundle/c $T
echo "probe-rc=$?"
kill -TERM $H
wait $H
echo "helper-rc=$?"
# The keeper and its virtiofsd end with the helper (SIGKILL on parent
# death); give the kernel a moment to deliver it.
i=0; while [ $i -lt 50 ] && ps -o args | grep -q '[s]hare-keeper\|[v]irtiofsd'; do sleep 0.1; i=$((i+1)); done
echo "keepers-left=$(ps -o args | grep -c '[s]hare-keeper')"
echo "virtiofsd-left=$(ps -o args | grep -c '[v]irtiofsd')"
ps -o pid,ppid,stat,args | grep '[v]irtiofsd\|[s]hare-keeper'
sed 's/^/helper| /' $TMPDIR/helper.log | tail -n 80
for c in $TMPDIR/run/*.d/console.log; do grep -a -i -E "coworkvm-agent|virtio|fuse|idmap" $c | sed 's/^/console| /' | tail -n 40; done
"#;

#[test]
fn shared_folders_work_and_hold_against_a_hostile_session() {
    let Some(paths) = paths_or_skip() else { return };
    let Some(images) = images::images_or_skip(&paths.root) else {
        return;
    };
    let rig = images::HelperDisks::new(&paths.root, &images, "shares-e2e", false)
        .expect("the rig's disks");
    let batch = Batch {
        cases: vec![Case::new("shares", SCRIPT, 1500)],
        files: vec![],
        disks: rig.disks.clone(),
    };
    let result = batch.run(&paths).expect("the rig runs");
    drop(rig);
    let c = result.case("shares");
    eprintln!("{}", c.output);
    let ctx = || result.context("shares");
    // Every check of the probe ran (a probe that died early passes none
    // of the later ones).
    result.assert_client_passed(
        "shares",
        &[
            "mount \"missing\" comes back in failedMounts",
            "the session reads a host file in the picked folder",
            "a ro mount refuses writes with EROFS",
            "the file is owned by the host user on the host",
            "no symlink swap reaches the host canary",
            "a second session does not see the first",
            "mountPath's folder appears in the running session",
            "after the session ends its grant is gone from the staging directory",
        ],
    );
    let passes = c.lines_with("@@CLIENT pass");
    let escapes = passes
        .iter()
        .filter(|p| {
            [
                "refuse",
                "fails",
                "denied",
                "cannot",
                "hidden",
                "not ",
                "no ",
                "resolves",
                "unchanged",
                "is empty",
                "is refused",
                "ENOSPC",
                "bounded",
            ]
            .iter()
            .any(|w| p.contains(w))
        })
        .count();
    assert!(
        escapes >= 20,
        "only {escapes} escape checks passed\n{}",
        ctx()
    );
    assert_eq!(c.lines_with("helper-rc="), ["0"], "{}", ctx());
    assert_eq!(c.lines_with("keepers-left="), ["0"], "{}", ctx());
    assert_eq!(c.lines_with("virtiofsd-left="), ["0"], "{}", ctx());
}
