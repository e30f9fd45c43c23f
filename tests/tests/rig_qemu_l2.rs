//! The rig end to end with QEMU as the L2 VMM: the host's
//! `qemu-system-x86_64` (shipped into L1 with its libraries and qboot by
//! `qemu::payload`) boots the same Debian kernel as `-M microvm` under L1's
//! KVM, with the guest of `tests/guest/boot-check.init`. It proves the rig
//! itself (L1 boot, KVM in L1, payloads, disks attached to L1 and checked
//! here afterwards, per-case results) independently of coworkvm, and it is
//! the reference VMM of the benchmark.

use coworkvm_tests::{base_paths_or_skip, qemu, Batch, Case, Scratch};

const MARKER: &str = "qemu-l2-marker-5c2e08";

#[test]
fn qemu_microvm_boots_the_guest_inside_the_rig() {
    // Needs no coworkvm: the rig proves itself even when the VMM is broken.
    let Some(paths) = base_paths_or_skip() else {
        return;
    };
    let dir = Scratch::new("qemu-l2").unwrap();
    let initrd = dir.path.join("guest.cpio.zst");
    paths
        .guest_initramfs(&paths.root.join("tests/guest/boot-check.init"), &initrd)
        .unwrap();
    // Read-only disk with the marker at its start; read-write disk zeroed.
    let ro = dir.path.join("ro.img");
    let mut ro_data = MARKER.as_bytes().to_vec();
    ro_data.resize(1 << 20, 0);
    std::fs::write(&ro, &ro_data).unwrap();
    let rw = dir.path.join("rw.img");
    std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();

    let mut vm = qemu::Microvm::new("$P/guest.cpio.zst");
    vm.cpus = 2;
    vm.disks = vec![("$DISK0".into(), true), ("$DISK1".into(), false)];
    vm.rng = true;
    let script = format!(
        "start=$(cut -d' ' -f1 /proc/uptime)\n{}\nrc=$?\n\
         echo \"@@CASE l2-wall start=$start end=$(cut -d' ' -f1 /proc/uptime)\"\nexit $rc\n",
        vm.command()
    );
    let mut files = vec![(initrd, "guest.cpio.zst".to_string())];
    files.extend(qemu::payload().expect("QEMU and its files for L2"));
    let batch = Batch {
        cases: vec![
            Case::new("qemu-l2", &script, 240),
            Case::new("times-out", "echo started\nsleep 600 &\nsleep 600", 3),
            Case::new(
                "exit-status",
                "echo before-exit\npidof sleep && echo sleep-left\nexit 7",
                20,
            ),
        ],
        files,
        disks: vec![ro.clone(), rw.clone()],
    };
    let result = batch.run(&paths).expect("the rig runs");
    let report = result.report();
    let c = result.case("qemu-l2");

    assert!(
        c.passed(),
        "QEMU exits 0 on the guest's power-off\n{report}"
    );
    assert_eq!(c.lines_with("@@L2 nproc="), ["2"], "{report}");
    assert_eq!(
        c.lines_with("@@L2 marker="),
        [MARKER],
        "the marker read from the read-only disk\n{report}"
    );
    assert_eq!(c.lines_with("@@L2 vda-ro="), ["1 vdb-ro=0"], "{report}");
    assert_eq!(c.lines_with("@@L2 ro-write="), ["refused"], "{report}");
    assert_eq!(c.lines_with("@@L2 hwrng="), ["virtio_rng.0"], "{report}");
    assert!(c.has_line("@@L2 done"), "{report}");

    // What the L2 guest wrote to its vdb (L1's vdb) is in the host file.
    let written = std::fs::read(&rw).unwrap();
    let text = String::from_utf8_lossy(&written[..128]);
    assert!(
        text.starts_with(&format!("result ok marker={MARKER} nproc=2\n")),
        "rw disk holds {text:?}\n{report}"
    );
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        ro_data,
        "the read-only disk is untouched"
    );

    // A case past its time-out is cut off with rc None; the next one
    // still runs, with nothing left over from it, and its status comes back.
    let t = result.case("times-out");
    assert_eq!(t.rc, None, "{report}");
    assert!(t.has_line("started"), "{report}");
    let e = result.case("exit-status");
    assert_eq!(e.rc, Some(7), "{report}");
    assert!(e.has_line("before-exit"), "{report}");
    assert!(
        !e.has_line("sleep-left"),
        "the timed-out case's processes were ended\n{report}"
    );

    // Timings for the record (cargo test -- --nocapture shows them).
    let up = c.lines_with("@@L2 userspace up=");
    let wall = c.lines_with("@@CASE l2-wall ");
    eprintln!(
        "timing: mode {:?}; L1 init after {:.1} s host time (L1 uptime {:?} s); \
         L2 guest userspace at uptime {up:?} s; L2 run in L1 {wall:?}; batch {:.1} s{}",
        result.mode,
        result.l1_up.unwrap_or_default().as_secs_f64(),
        result.l1_uptime_at_up,
        result.wall.as_secs_f64(),
        if result.retried {
            " (L1 boot retried once)"
        } else {
            ""
        }
    );
}
