//! End-to-end: `coworkvm boot` runs a real guest sandboxed by default. While
//! the guest (every virtio device up) is running, the host side reads the
//! VMM process: every thread has no_new_privs and a seccomp filter, the
//! rlimits are set, the VMM has its own network namespace, and the VMM
//! says which Landlock ABI it got. The guest then powers off cleanly
//! (exit 0): no syscall the running VMM makes is missing from its lists.
//! `--no-sandbox` boots the same guest unconfined, with a warning.

use std::path::PathBuf;

use coworkvm_tests::{paths_or_skip, Batch, Case};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("coworkvm-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Boots the guest in the background, waits for its devices, prints what
/// /proc says about the VMM, then waits for it to end.
fn case_script(flags: &str) -> String {
    format!(
        r#"log=$TMPDIR/sb-console-$$.log; err=$TMPDIR/sb-err-$$.log
RUST_LOG=info $COWORKVM boot --kernel $KERNEL --initrd $P/sandbox-check.cpio.zst \
    --disk $DISK0,ro --cpus 2 --mem 256 --cmdline quiet --console $log \
    --vsock $TMPDIR/sb-$$.sock {flags} 2>$err &
pid=$!
i=0
while ! grep -q '@@L2 devices-up' $log 2>/dev/null && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done
grep '@@L2 devices-up' $log
for t in /proc/$pid/task/*; do
    echo "@@SB thread $(cat $t/comm) seccomp=$(awk '/^Seccomp:/{{print $2}}' $t/status) nnp=$(awk '/^NoNewPrivs:/{{print $2}}' $t/status)"
done
echo "@@SB nofile=$(awk '/^Max open files/{{print $4}}' /proc/$pid/limits) core=$(awk '/^Max core file size/{{print $5}}' /proc/$pid/limits)"
if [ "$(readlink /proc/$pid/ns/net)" = "$(readlink /proc/self/ns/net)" ]; then echo "@@SB netns=shared"; else echo "@@SB netns=own"; fi
if [ "$(readlink /proc/$pid/ns/user)" = "$(readlink /proc/self/ns/user)" ]; then echo "@@SB userns=shared"; else echo "@@SB userns=own"; fi
wait $pid
echo "@@SB rc=$?"
cat $err
grep -c '@@L2 done' $log | sed 's/^/@@SB guest-done=/'
"#
    )
}

#[test]
fn a_guest_runs_under_the_vmm_sandbox() {
    let Some(paths) = paths_or_skip() else { return };
    let dir = scratch("sandbox");
    paths
        .guest_initramfs_with(
            &paths.root.join("tests/guest/sandbox-check.init"),
            &dir.join("sandbox-check.cpio.zst"),
            &["vmw_vsock_virtio_transport"],
            vec![],
        )
        .unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let batch = Batch {
        cases: vec![
            Case::new("sandboxed", &case_script(""), 150),
            Case::new("unconfined", &case_script("--no-sandbox"), 150),
        ],
        files: vec![(
            dir.join("sandbox-check.cpio.zst"),
            "sandbox-check.cpio.zst".into(),
        )],
        disks: vec![disk],
    };
    let result = batch.run(&paths).expect("the rig runs");

    let sb = result.case("sandboxed");
    let ctx = || result.context("sandboxed");
    assert_eq!(
        sb.lines_with("@@SB rc="),
        ["0"],
        "clean power-off\n{}",
        ctx()
    );
    assert_eq!(sb.lines_with("@@SB guest-done="), ["1"], "{}", ctx());
    let threads = sb.lines_with("@@SB thread ");
    for name in [
        "coworkvm",
        "vcpu0",
        "vcpu1",
        "worker-spawner",
        "virtio-blk",
        "virtio-rng",
        "virtio-vsock",
    ] {
        assert!(
            threads.iter().any(|t| t.starts_with(&format!("{name} "))),
            "no {name} thread\n{}",
            ctx()
        );
    }
    for t in &threads {
        assert!(t.ends_with("seccomp=2 nnp=1"), "{t}\n{}", ctx());
    }
    assert_eq!(sb.lines_with("@@SB nofile="), ["2048 core=0"], "{}", ctx());
    assert_eq!(sb.lines_with("@@SB netns="), ["own"], "{}", ctx());
    assert!(
        sb.output.contains("the VMM is sandboxed"),
        "the VMM reports its sandbox\n{}",
        ctx()
    );
    for line in sb
        .output
        .lines()
        .filter(|l| l.contains("the VMM is sandboxed"))
    {
        println!("rig: {}", line.trim());
    }
    println!("rig: userns {:?}", sb.lines_with("@@SB userns="));

    let un = result.case("unconfined");
    let ctx = || result.context("unconfined");
    assert_eq!(un.lines_with("@@SB rc="), ["0"], "{}", ctx());
    assert!(
        un.output.contains("--no-sandbox: the VMM runs unconfined"),
        "{}",
        ctx()
    );
    for t in un.lines_with("@@SB thread ") {
        assert!(t.ends_with("seccomp=0 nnp=0"), "{t}\n{}", ctx());
    }
    assert_eq!(un.lines_with("@@SB netns="), ["shared"], "{}", ctx());
    std::fs::remove_dir_all(dir).unwrap();
}
