//! End-to-end: the stock Debian kernel boots under coworkvm with 2 vCPUs
//! and 2 disks, and a guest panic ends the VMM with an error and the
//! console's last lines. Runs directly on hardware KVM, else in the L1 rig.

use std::path::PathBuf;

use coworkvm_tests::{paths_or_skip, Batch, Case, Mode};

const MARKER: &str = "coworkvm-marker-7f3a91";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("coworkvm-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn debian_kernel_boots_with_two_cpus_and_two_disks() {
    let Some(paths) = paths_or_skip() else { return };
    let dir = scratch("boot");
    let guest_dir = paths.root.join("tests/guest");
    paths
        .guest_initramfs(
            &guest_dir.join("boot-check.init"),
            &dir.join("boot-check.cpio.zst"),
        )
        .unwrap();
    paths
        .guest_initramfs(&guest_dir.join("panic.init"), &dir.join("panic.cpio.zst"))
        .unwrap();

    // Read-only disk with the marker at its start; read-write disk zeroed.
    let ro = dir.join("ro.img");
    let mut ro_data = MARKER.as_bytes().to_vec();
    ro_data.resize(1 << 20, 0);
    std::fs::write(&ro, &ro_data).unwrap();
    let rw = dir.join("rw.img");
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();

    let batch = Batch {
        cases: vec![
            Case::new(
                "boot",
                r#"$COWORKVM boot --kernel $KERNEL --initrd $P/boot-check.cpio.zst \
                    --disk $DISK0,ro --disk $DISK1 --cpus 2 --mem 256 --cmdline quiet"#,
                120,
            ),
            Case::new(
                "panic",
                r#"$COWORKVM boot --kernel $KERNEL --initrd $P/panic.cpio.zst --mem 128 \
                    --cmdline quiet --console $TMPDIR/panic-console.log"#,
                120,
            ),
        ],
        files: vec![
            (
                dir.join("boot-check.cpio.zst"),
                "boot-check.cpio.zst".into(),
            ),
            (dir.join("panic.cpio.zst"), "panic.cpio.zst".into()),
        ],
        disks: vec![ro.clone(), rw.clone()],
    };
    let result = batch.run(&paths).expect("the rig runs");
    let boot = result.case("boot");
    let ctx = || result.context("boot");

    assert_eq!(
        boot.rc,
        Some(0),
        "guest power-off must end the VMM with 0\n{}",
        ctx()
    );
    assert_eq!(boot.lines_with("@@L2 nproc="), ["2"], "{}", ctx());
    assert_eq!(
        boot.lines_with("@@L2 marker="),
        [MARKER],
        "marker read from the ro disk\n{}",
        ctx()
    );
    assert_eq!(boot.lines_with("@@L2 vda-ro="), ["1 vdb-ro=0"], "{}", ctx());
    assert_eq!(boot.lines_with("@@L2 ro-write="), ["refused"], "{}", ctx());
    // GET_ID carries the disk's file name: L1's device node in the rig.
    let serial = match result.mode {
        Mode::L1 => "vda",
        Mode::Direct => "ro.img",
    };
    assert_eq!(boot.lines_with("@@L2 vda-serial="), [serial], "{}", ctx());
    assert_eq!(
        boot.lines_with("@@L2 hwrng="),
        ["virtio_rng.0"],
        "{}",
        ctx()
    );
    assert!(boot.has_line("@@L2 done"), "{}", ctx());

    // Checked from this side: what the guest wrote reached the disk file.
    let written = std::fs::read(&rw).unwrap();
    let text = String::from_utf8_lossy(&written[..128]);
    assert!(
        text.starts_with(&format!("result ok marker={MARKER} nproc=2\n")),
        "rw disk holds {text:?}\n{}",
        ctx()
    );
    // And the ro disk is untouched.
    assert_eq!(std::fs::read(&ro).unwrap(), ro_data);

    let panic = result.case("panic");
    assert!(
        matches!(panic.rc, Some(rc) if rc != 0),
        "a guest panic must end the VMM non-zero; got {:?}\n{}",
        panic.rc,
        panic.output
    );
    assert!(
        panic.output.contains("the guest kernel panicked"),
        "the VMM says why:\n{}",
        panic.output
    );
    assert!(
        panic.output.contains("Kernel panic"),
        "and shows the console's last lines:\n{}",
        panic.output
    );
    std::fs::remove_dir_all(dir).unwrap();
}
