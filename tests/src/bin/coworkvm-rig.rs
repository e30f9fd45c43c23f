//! `coworkvm-rig`: `make run` and `make bench` on any host, through the rig
//! when the host's KVM cannot boot Linux.
//!
//! usage: coworkvm-rig demo | coworkvm-rig bench [--out FILE] [--runs N]
//!        [--stream-runs N] [--mib N] [--no-helper]
//!        [--baseline COWORKVM-BINARY [--baseline-name TEXT]]
//!        [--fs-runs N] [--fs-reps N] [--fs-mib N] [--fs-files N] [--fs-only]
//!        [--egress-mib N] [--egress-connects N] [--egress-only]
//!        [--cowork-runs N] [--cowork-only]
//!
//! `--baseline` adds an earlier `coworkvm` binary to the boot loop (its
//! sandboxed `boot`, same flags, alternating with this build's) and a
//! "new / baseline" table to the results.
//!
//! `--fs-runs` (default 3; 0 leaves it out), `--fs-reps` (workloads per
//! boot, default 1), `--fs-mib` (256) and
//! `--fs-files` (5000) size the shared-folder benchmark (virtio-fs under
//! coworkvm and QEMU microvm, virtio-blk for reference); `--fs-only` runs
//! only that and replaces its section of the results file, keeping the rest.
//!
//! `--egress-mib` (256) and `--egress-connects` (100) size the egress
//! benchmark (a session's proxies vs L1 directly; part of the helper runs,
//! so `--no-helper` leaves it out); `--egress-only` runs only that, as
//! `--fs-only` does.
//!
//! `--cowork-runs` (5; 0 leaves it out) sizes the Cowork benchmark (the
//! real Claude Code runtime, pinned and fetched into `build/claude-code/`,
//! driven as the client drives the helper: per round a fresh boot to
//! connected, `installSdk` through the shared folder, `claude --version` to
//! its first stdout, a `claude -p` round trip against the fake Messages
//! API; as many `installSdk` by copy from a helper without virtiofsd; the
//! rootfs sizes and the first start's expansion; part of the helper runs,
//! so `--no-helper` leaves it out too); `--cowork-only` runs only that, as
//! `--fs-only` does.

use anyhow::{bail, Context, Result};
use coworkvm_tests::{Batch, Case, Paths};

fn demo(paths: &Paths) -> Result<()> {
    // `coworkvm run` seeds a bundle from the images, boots its Debian rootfs
    // and runs the command through the agent over vsock.
    let images = coworkvm_tests::images::images_dir(&paths.root)?;
    let work = paths.root.join("target/rig-tmp/demo");
    std::fs::create_dir_all(&work)?;
    let disk = coworkvm_tests::images::images_disk(&images, &work, false)?;
    let batch = Batch {
        cases: vec![Case::new(
            "demo",
            r#"mkdir -p $TMPDIR/images && mount -o ro $DISK0 $TMPDIR/images || exit 90
$COWORKVM run --bundle $TMPDIR/bundle --images $TMPDIR/images --disk-size-gb 1 \
  --cpus 2 --mem 512 -- \
  sh -c 'echo "--- hello from inside the coworkvm guest ---"
         echo "os:       $(. /etc/os-release; echo $PRETTY_NAME)"
         echo "rootfs:   $(cat /etc/coworkvm-release) ($(stat -f -c %T /), read-only image + tmpfs)"
         echo "hostname: $(cat /proc/sys/kernel/hostname)"
         echo "kernel:   $(uname -r)"
         echo "cpus:     $(nproc)"
         echo "memory:   $(awk "/MemTotal/ {print \$2 \" kB\"}" /proc/meminfo)"
         echo "machine:  $(cat /sys/class/dmi/id/product_uuid)"
         echo "sessions: $(df -h /sessions | awk "NR==2 {print \$2 \" ext4 disk\"}")"
         echo "uptime:   $(cut -d" " -f1 /proc/uptime) s"
         echo "--- exit code 0, the VM powers off ---"' 2> $TMPDIR/run.err
rc=$?
[ $rc = 0 ] || cat $TMPDIR/run.err
exit $rc"#,
            300,
        )],
        files: vec![],
        disks: vec![disk],
    };
    let result = batch.run(paths)?;
    let _ = std::fs::remove_dir_all(&work);
    let case = result.case("demo");
    let mut shown = false;
    for line in case.output.lines() {
        let line = line.trim_end();
        if line.starts_with("--- hello") {
            shown = true;
        }
        if shown && !line.starts_with('[') {
            println!("{line}");
        }
    }
    if case.rc != Some(0) || !shown {
        bail!(
            "the guest did not run to completion (rc {:?}); output:\n{}",
            case.rc,
            case.output
        );
    }
    println!(
        "(ran in {:?} mode, {:.1} s; {})",
        result.mode,
        result.wall.as_secs_f64(),
        images_kernel(&images, paths)
    );
    Ok(())
}

/// The guest kernel of the images (their manifest) and the Debian package
/// it came from (`kernel/version`, written by scripts/fetch-kernel.sh).
fn images_kernel(images: &std::path::Path, paths: &Paths) -> String {
    let release = std::fs::read(images.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<socket_proto::manifest::Manifest>(&b).ok())
        .map_or_else(|| "unknown".into(), |m| m.kernel_version);
    let package = std::fs::read_to_string(paths.build.join("kernel/version"))
        .ok()
        .and_then(|v| {
            v.lines()
                .find_map(|l| l.strip_prefix("package=").map(str::to_owned))
        })
        .unwrap_or_else(|| "package unknown".into());
    format!("images' kernel {release}, from {package}")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let paths = Paths::locate().context("locating the build (run `make build`)")?;
    match args.first().map(String::as_str) {
        Some("demo") => demo(&paths),
        Some("bench") => coworkvm_tests::bench::run(&paths, &args[1..]),
        _ => bail!(
            "usage: coworkvm-rig demo | bench [--out FILE] [--runs N] [--stream-runs N] [--mib N] \
             [--no-helper] [--baseline COWORKVM-BINARY [--baseline-name TEXT]] \
             [--fs-runs N] [--fs-reps N] [--fs-mib N] [--fs-files N] [--fs-only] \
             [--egress-mib N] [--egress-connects N] [--egress-only]"
        ),
    }
}
