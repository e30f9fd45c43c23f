//! `coworkvm-rig`: `make run` and `make bench` on any host, through the rig
//! when the host's KVM cannot boot Linux.
//!
//! usage: coworkvm-rig demo | coworkvm-rig bench [--out FILE] [--runs N]

use anyhow::{bail, Context, Result};
use coworkvm_tests::{Batch, Case, Paths};

fn demo(paths: &Paths) -> Result<()> {
    // `coworkvm run` boots the agent initramfs and runs the command over vsock.
    let batch = Batch {
        cases: vec![Case::new(
            "demo",
            r#"$COWORKVM run --kernel $KERNEL --initrd $P/agent.cpio.zst --cpus 2 --mem 256 -- \
  sh -c 'echo "--- hello from inside the coworkvm guest ---"
         echo "kernel:   $(uname -r)"
         echo "cpus:     $(nproc)"
         echo "memory:   $(awk "/MemTotal/ {print \$2 \" kB\"}" /proc/meminfo)"
         echo "uptime:   $(cut -d" " -f1 /proc/uptime) s"
         echo "init:     $(cat /proc/1/comm)"
         echo "--- exit code 0, the VM powers off ---"'"#,
            180,
        )],
        files: vec![(paths.agent_initrd.clone(), "agent.cpio.zst".into())],
        disks: vec![],
    };
    let result = batch.run(paths)?;
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
        "(ran in {:?} mode, {:.1} s)",
        result.mode,
        result.wall.as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let paths = Paths::locate().context("locating the build (run `make build`)")?;
    match args.first().map(String::as_str) {
        Some("demo") => demo(&paths),
        Some("bench") => coworkvm_tests::bench::run(&paths, &args[1..]),
        _ => bail!("usage: coworkvm-rig demo | bench [--out FILE] [--runs N]"),
    }
}
