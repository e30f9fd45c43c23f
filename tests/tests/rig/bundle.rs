//! End-to-end: a bundle boots the Debian rootfs with a persistent identity
//! and session disk (`coworkvm run --bundle`), survives a rootfs update, and
//! keeps every synced file through ten SIGKILLs of the VMM.
//!
//! The images (`build/images`, made by `make build`) reach the rig on an
//! ext4 disk (`$DISK0`, read-only) together with an "update": the same
//! rootfs with a different `/etc/coworkvm-release`, recompressed, and its
//! manifest. The bundle lives on a second ext4 disk (`$DISK1`), so fsync and
//! rename behave as on a real filesystem.

use coworkvm_tests::images::{self, UPDATE_RELEASE};
use coworkvm_tests::{paths_or_skip, Batch, Case};

const SETUP: &str = r#"mkdir -p $TMPDIR/images /bundle
mount -o ro $DISK0 $TMPDIR/images || exit 90
mount $DISK1 /bundle || exit 91
"#;

const RUNB: &str = "$COWORKVM run --bundle /bundle/b --images $TMPDIR/images --cpus 1 --mem 512 --";

/// What a boot reports about itself.
const PROBE: &str = r#"echo "uuid=$(cat /sys/class/dmi/id/product_uuid)"
echo "release=$(cat /etc/coworkvm-release)"
echo "rootfs=$(stat -f -c %T /)"
echo "hostname=$(cat /proc/sys/kernel/hostname)"
grep -q " /sessions ext4 " /proc/mounts && echo "sessions=mounted"
echo "keep=$(cat /sessions/keep 2>/dev/null)""#;

/// Bundle state seen from L1 after a boot.
const STATE: &str = r#"echo "ident=$(cat /bundle/b/machineIdentifier)"
echo "mac=$(cat /bundle/b/macAddress)"
echo "sums=$(cat /bundle/b/macAddress /bundle/b/machineIdentifier | md5sum | cut -d' ' -f1)"
echo "files=$(ls /bundle/b | tr '\n' ' ')"
"#;

/// Each round: check every file the previous rounds saw synced, then write
/// and sync new ones until the VMM is killed. The writer script goes into
/// the guest as `sh -c` text: the guest sees none of L1's files.
const KILL_ROUNDS: &str = r#"cat > $TMPDIR/writer.sh <<'EOF'
last=$1
mkdir -p /sessions/k
grep -q " /sessions ext4 " /proc/mounts && echo "sessions=mounted"
i=0
while [ $i -le $last ]; do
    [ "$(cat /sessions/k/f$i 2>/dev/null)" = "payload-$i" ] || echo "LOST f$i"
    i=$((i+1))
done
echo "checked $last"
while true; do
    echo "payload-$i" > /sessions/k/f$i
    sync
    echo "synced $i"
    i=$((i+1))
done
EOF
last=-1
for round in 1 2 3 4 5 6 7 8 9 10; do
    out=$TMPDIR/round$round.out
    : > $out
    $RUNB sh -c "$(cat $TMPDIR/writer.sh)" writer $last > $out 2>&1 &
    vmm=$!
    n=0
    while [ "$(grep -c '^synced' $out)" -lt $((round % 3 + 2)) ] && [ $n -lt 1800 ]; do
        sleep 0.1; n=$((n+1))
    done
    kill -9 $vmm
    wait $vmm
    grep -q "^checked $last" $out && echo "round $round checked $last"
    grep -q "^sessions=mounted" $out && echo "round $round mounted"
    grep '^LOST' $out | sed "s/^/round $round /"
    new=$(grep '^synced' $out | tail -n 1 | cut -d' ' -f2)
    [ -n "$new" ] && last=$new
    [ -n "$new" ] || { echo "round $round wrote nothing:"; tail -n 20 $out; }
done
echo "rounds-done last=$last"
$RUNB sh -c 'i=0; while [ -e /sessions/k/f$i ]; do i=$((i+1)); done; echo "final-count $i"' 2>&1
"#;

#[test]
fn bundle_identity_session_disk_update_and_sigkill() {
    let Some(paths) = paths_or_skip() else { return };
    let Some(images) = images::images_or_skip(&paths.root) else {
        return;
    };
    let rig = images::HelperDisks::new(&paths.root, &images, "bundle-e2e", true)
        .expect("the rig's disks");

    let first = format!(
        "{SETUP}mkdir -p /bundle/b\necho '{{\"diskSizeGB\": 1}}' > /bundle/b/config.json\n\
         {RUNB} sh -c '{PROBE}; echo keep-me > /sessions/keep; sync'\necho \"rc=$?\"\n{STATE}"
    );
    let second = format!("{RUNB} sh -c '{PROBE}'\necho \"rc=$?\"\n{STATE}");
    let update = format!(
        "cp $TMPDIR/images/update/rootfs.img.zst $TMPDIR/images/update/manifest.json /bundle/b/\n\
         {RUNB} sh -c '{PROBE}'\necho \"rc=$?\"\n{STATE}"
    );
    let kill = KILL_ROUNDS.replace("$RUNB", RUNB);
    let batch = Batch {
        cases: vec![
            Case::new("first", &first, 400),
            Case::new("second", &second, 300),
            Case::new("update", &update, 400),
            Case::new("sigkill", &kill, 900),
        ],
        files: vec![],
        disks: rig.disks.clone(),
    };
    let result = batch.run(&paths).expect("the rig runs");
    drop(rig);
    result.print_cases();
    let ctx = |name: &str| result.context(name);
    let one = |case: &str, key: &str| -> String {
        let v = result.case(case).lines_with(key);
        assert_eq!(v.len(), 1, "{key} in {}", ctx(case));
        v[0].clone()
    };

    // First boot: the identity is made, the guest sees it, the rootfs is
    // the overlay, the session disk got formatted and mounted.
    for case in ["first", "second", "update"] {
        assert_eq!(one(case, "rc="), "0", "{}", ctx(case));
        assert_eq!(one(case, "rootfs="), "overlayfs", "{}", ctx(case));
        assert_eq!(one(case, "hostname="), "coworkvm", "{}", ctx(case));
        assert_eq!(one(case, "sessions="), "mounted", "{}", ctx(case));
        assert_eq!(
            one(case, "uuid="),
            one(case, "ident="),
            "product_uuid is machineIdentifier\n{}",
            ctx(case)
        );
    }
    let ident = one("first", "ident=");
    assert_eq!(ident.len(), 36, "{}", ctx("first"));
    let mac = one("first", "mac=");
    let first_octet = u8::from_str_radix(&mac[..2], 16).expect("MAC");
    assert_eq!(
        first_octet & 0b11,
        0b10,
        "locally administered unicast: {mac}"
    );

    // Second boot: same identity, the synced file is still there.
    assert_eq!(one("second", "ident="), ident);
    assert_eq!(one("second", "keep="), "keep-me", "{}", ctx("second"));
    assert_eq!(one("second", "sums="), one("first", "sums="));

    // Update: the new release boots; identity and session data stay; the
    // .zst is gone once applied.
    let old_release = one("first", "release=");
    assert_ne!(old_release, UPDATE_RELEASE);
    assert_eq!(one("second", "release="), old_release);
    assert_eq!(
        one("update", "release="),
        UPDATE_RELEASE,
        "{}",
        ctx("update")
    );
    assert_eq!(one("update", "keep="), "keep-me", "{}", ctx("update"));
    assert_eq!(one("update", "sums="), one("first", "sums="));
    let files = one("update", "files=");
    assert!(!files.contains("rootfs.img.zst"), "{files}");
    assert!(files.contains("rootfs.img "), "{files}");
    assert!(files.contains("sessiondata.img"), "{files}");

    // Ten SIGKILLs: every boot mounted the disk and found every file that
    // was synced before the kill.
    let k = result.case("sigkill");
    assert!(
        k.lines_with("round ").iter().all(|l| !l.contains("LOST")),
        "{}",
        ctx("sigkill")
    );
    for round in 1..=10 {
        assert!(
            k.has_line(&format!("round {round} mounted")),
            "round {round}\n{}",
            ctx("sigkill")
        );
        assert!(
            k.output.contains(&format!("round {round} checked ")),
            "round {round}\n{}",
            ctx("sigkill")
        );
    }
    let last: i64 = one("sigkill", "rounds-done last=").parse().expect("last");
    assert!(last >= 20, "at least two syncs a round: {last}");
    let count: i64 = one("sigkill", "final-count ").parse().expect("count");
    assert!(count > last, "every synced file is there: {count} > {last}");
}
