//! `coworkvm doctor` where coworkvm can run VMs (the rig's L1, or this host
//! when its KVM boots Linux): every check PASSes and the exit status is 0.
//! The images come on a disk, the bundle directory on an ext4 disk with
//! room for a bundle, virtiofsd at `/usr/lib/coworkvm/virtiofsd` (where the
//! package installs it), and a `coworkvm serve` holds the client socket.

use coworkvm_tests::images;
use coworkvm_tests::{paths_or_skip, Batch, Case};

const SCRIPT: &str = r#"mkdir -p $TMPDIR/images $TMPDIR/data
mount -o ro $DISK0 $TMPDIR/images || exit 90
mount $DISK1 $TMPDIR/data || exit 91
export HOME=$TMPDIR/home XDG_DATA_HOME=$TMPDIR/data COWORKVM_IMAGES=$TMPDIR/images
export XDG_RUNTIME_DIR=$TMPDIR/xdg
mkdir -p $HOME
mkdir -m 700 $XDG_RUNTIME_DIR
$COWORKVM serve 2> $TMPDIR/helper.log &
H=$!
i=0; while [ ! -S $XDG_RUNTIME_DIR/claude-cowork-vm.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
$COWORKVM doctor > $TMPDIR/d.txt
echo "doctor-rc=$?"
sed 's/^/doctor| /' $TMPDIR/d.txt
$COWORKVM doctor --json > $TMPDIR/d.json
echo "json-rc=$?"
echo "json=$(cat $TMPDIR/d.json)"
kill -TERM $H
wait $H
"#;

#[test]
fn doctor_passes_every_check_where_vms_run() {
    let Some(paths) = paths_or_skip() else { return };
    let Some(images) = images::images_or_skip(&paths.root) else {
        return;
    };
    let work = paths.root.join("target/rig-tmp/doctor-l1");
    std::fs::create_dir_all(&work).unwrap();
    let images_disk = images::images_disk(&images, &work, false).expect("images disk");
    // Sparse: room for a bundle (the doctor wants 10 GiB free).
    let data_disk = work.join("data.ext4");
    images::ext4_image(&data_disk, None, 12 * 1024).expect("data disk");
    let batch = Batch {
        cases: vec![Case::new("doctor", SCRIPT, 300)],
        files: vec![],
        disks: vec![images_disk, data_disk],
    };
    let result = batch.run(&paths).expect("the rig runs");
    let _ = std::fs::remove_dir_all(&work);
    let c = result.case("doctor");
    let ctx = || result.context("doctor");
    let lines = c.lines_with("doctor|");
    let not_passing: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(": WARN (") || l.contains(": FAIL ("))
        .collect();
    assert!(not_passing.is_empty(), "{not_passing:#?}\n{}", ctx());
    assert!(
        lines.iter().any(|l| l == "coworkvm can run VMs here"),
        "{}",
        ctx()
    );
    assert_eq!(c.lines_with("doctor-rc="), ["0"], "{}", ctx());
    assert_eq!(c.lines_with("json-rc="), ["0"], "{}", ctx());
    let json = c.lines_with("json=");
    assert_eq!(json.len(), 1, "{}", ctx());
    let report: serde_json::Value = serde_json::from_str(&json[0]).expect("one JSON object");
    assert_eq!(report["can_run_vms"], true, "{report}");
    assert_eq!(report["can_boot_linux"], true, "{report}");
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 10, "{report}");
    for check in checks {
        assert_eq!(check["status"], "PASS", "{check}");
    }
    let socket = checks.iter().find(|c| c["id"] == "socket").unwrap();
    assert!(
        socket["detail"]
            .as_str()
            .unwrap()
            .starts_with("coworkvm on "),
        "{socket}"
    );
}
