//! The L1 VM: a Debian kernel under QEMU TCG (`-cpu max`, which emulates
//! AMD SVM with nested paging) whose initramfs loads `kvm-amd` and runs a
//! batch's cases against that KVM, two levels below the host.
//!
//! Protocol on L1's serial console (the host's view of it is the QEMU
//! process's stdout):
//! - `@@RIG-L1-UP <uptime>`: L1's init is running and KVM is loaded;
//! - `@@RIG-ERROR <why>`: L1 cannot run the batch (no /dev/kvm, a disk
//!   missing); it powers off at once;
//! - `@@RIG-BEGIN <case>` ... `@@RIG-END <case> rc=<n>` around each case's
//!   output (stdout and stderr);
//! - `@@RIG-DONE <uptime>` before it powers off.
//!
//! Every boot is bounded: L1 must print `@@RIG-L1-UP` within the boot
//! time-out, then finish the batch within the sum of the case time-outs
//! plus a margin. A boot that printed nothing at all within the boot
//! time-out hit a known TCG start-up spin (an environment fault, about one
//! boot in ten): it is retried once, and the retry is reported. A boot that
//! printed something and then failed is a real failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use coworkvm_rootfs::initramfs::{self, Compression, InitramfsSpec};

use crate::process::Captured;
use crate::{parse_console, Batch, BatchResult, Mode, Paths, Scratch};

/// Modules L1 loads: KVM for the VMM under test (kvm-intel just fails to
/// load on the emulated AMD CPU), virtio_blk for the batch's disks.
pub const L1_MODULES: &[&str] = &["kvm-amd", "kvm-intel", "virtio_pci", "virtio_blk"];
pub const UP_MARKER: &str = "@@RIG-L1-UP";
pub const ERROR_MARKER: &str = "@@RIG-ERROR";
pub const DONE_MARKER: &str = "@@RIG-DONE";
/// L1's memory: its initramfs (payloads included) and /tmp live in it.
const L1_MEM_MIB: u32 = 3072;
/// Time for L1 to power off after its last case, beyond the case time-outs.
const BATCH_MARGIN: Duration = Duration::from_secs(30);
/// How long L1 may take to power off once it printed `@@RIG-DONE`.
const POWEROFF_GRACE: Duration = Duration::from_secs(20);

/// How long L1 may take to print `@@RIG-L1-UP`: `COWORKVM_RIG_BOOT_TIMEOUT`
/// seconds, default 90. Measured: 9-11 s of host time with a 44-92 MiB
/// initramfs on a 2-core host busy with compiles (L1 uptime 6-8 s); the
/// margin covers a host busier still, and is what a TCG spin costs before
/// its retry.
pub fn boot_timeout() -> Duration {
    let secs = std::env::var("COWORKVM_RIG_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    Duration::from_secs(secs)
}

/// vCPUs of the L1 VM (`COWORKVM_RIG_SMP`, default 1). With 2, the L1
/// kernel occasionally oopses on an int3 in code it is live-patching (KVM
/// flips static keys when VMs come and go), a cross-modifying-code race of
/// multi-threaded TCG; one vCPU has no such race. L2 guests may still have
/// more vCPUs than L1.
pub fn smp() -> String {
    std::env::var("COWORKVM_RIG_SMP").unwrap_or_else(|_| "1".into())
}

/// L1's `/init`: mounts, modules, KVM check, the disks, then each case.
/// `tools` are (environment variable, path in L1) for the cases.
pub fn init_script(batch: &Batch, tools: &[(&str, &str)]) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=1500m tmp /tmp
mount -t debugfs debugfs /sys/kernel/debug
rel=$(uname -r)
for m in $(cat /lib/modules/$rel/load-order); do
    insmod /lib/modules/$rel/$m 2>/dev/null || echo "rig: insmod $m failed"
done
fail() { echo "@@RIG-ERROR $*"; poweroff -f; sleep 60; }
[ -c /dev/kvm ] || fail "/dev/kvm missing in L1 (insmod kvm-amd failed?)"
echo "@@RIG-L1-UP $(cut -d' ' -f1 /proc/uptime)"
export KERNEL=/payload/vmlinuz P=/payload TMPDIR=/tmp
# Ends whatever a case left running, so the next one starts clean.
reap() {
    for p in $(ls /proc | grep '^[0-9][0-9]*$'); do
        [ "$p" -gt 1 ] && [ -n "$(cat /proc/$p/cmdline 2>/dev/null)" ] && kill -9 "$p" 2>/dev/null
    done
    return 0
}
"#,
    );
    for (var, path) in tools {
        s.push_str(&format!("export {var}={path}\n"));
    }
    for i in 0..batch.disks.len() {
        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
        s.push_str(&format!(
            "i=0; while [ ! -b {dev} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
             [ -b {dev} ] || fail \"disk {i} ({dev}) did not appear in L1\"\n\
             export DISK{i}={dev}\n"
        ));
    }
    // A case that ran out of time reports rc=none, as in direct mode.
    for case in &batch.cases {
        s.push_str(&format!(
            "echo \"@@RIG-BEGIN {n}\"\nt0=$(cut -d. -f1 /proc/uptime)\n\
             timeout {t} sh /cases/{n}.sh </dev/null 2>&1\nrc=$?\n\
             [ $(($(cut -d. -f1 /proc/uptime) - t0)) -ge {t} ] && rc=none\n\
             echo \"@@RIG-END {n} rc=$rc\"\nreap\n",
            n = case.name,
            t = case.timeout.as_secs()
        ));
    }
    s.push_str(&format!(
        "sync\necho \"{DONE_MARKER} $(cut -d' ' -f1 /proc/uptime)\"\npoweroff -f\n"
    ));
    s
}

/// The outer QEMU: q35 under multi-threaded TCG (single-threaded TCG
/// hangs L2 guests), console on stdout, the batch's disks as virtio-blk.
pub fn qemu_command(kernel: &Path, initrd: &Path, disks: &[PathBuf]) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "q35", "-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-smp", &smp(), "-m", &L1_MEM_MIB.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic"])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"]);
    for (i, d) in disks.iter().enumerate() {
        cmd.arg("-drive")
            .arg(format!(
                "file={},if=none,id=d{i},format=raw,cache=unsafe",
                d.display()
            ))
            .args(["-device", &format!("virtio-blk-pci,drive=d{i}")]);
    }
    cmd
}

/// How one L1 boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// QEMU exited by itself (exit code, None if killed by a signal).
    Exited(Option<i32>),
    /// Nothing at all on the console within the boot time-out.
    Silent,
    /// Output, but no `@@RIG-L1-UP`, within the boot time-out.
    NotUp,
    /// Up, but the batch ran past its time-out.
    BatchTimeout,
}

#[derive(Debug)]
pub struct Boot {
    pub ending: Ending,
    /// L1's serial console (QEMU's stdout).
    pub console: String,
    /// QEMU's own messages.
    pub stderr: String,
    /// Host time from QEMU's start to `@@RIG-L1-UP`.
    pub up_after: Option<Duration>,
    pub wall: Duration,
}

/// Runs one L1 boot to its end under the two time-outs.
pub fn boot_once(cmd: Command, boot_timeout: Duration, batch_timeout: Duration) -> Result<Boot> {
    let mut c = Captured::spawn(cmd)?;
    let mut up_after = None;
    let mut done_at = None;
    let ending = loop {
        if let Some(rc) = c.try_wait()? {
            break Ending::Exited(rc);
        }
        let now = c.started.elapsed();
        if up_after.is_none() && c.stdout_contains(UP_MARKER) {
            up_after = Some(now);
        }
        match up_after {
            None if now > boot_timeout => {
                break if c.stdout_len() == 0 {
                    Ending::Silent
                } else {
                    Ending::NotUp
                }
            }
            Some(up) if now > up + batch_timeout => break Ending::BatchTimeout,
            _ => {}
        }
        if done_at.is_none() && up_after.is_some() && c.stdout_contains(DONE_MARKER) {
            done_at = Some(now);
        }
        if done_at.is_some_and(|d| now > d + POWEROFF_GRACE) {
            // The batch finished; L1 just did not power off.
            break Ending::Exited(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall = c.started.elapsed();
    let (console, stderr) = c.finish();
    // The marker may have arrived with QEMU's last output.
    if up_after.is_none() && console.contains(UP_MARKER) {
        up_after = Some(wall);
    }
    Ok(Boot {
        ending,
        console,
        stderr,
        up_after,
        wall,
    })
}

/// Boots L1 (`make_cmd` gives a fresh QEMU command each time), retrying
/// once a boot that printed nothing at all. Returns the boot and whether
/// it was retried; a boot that never came up is an error carrying the
/// console and QEMU's messages.
pub fn boot_with_retry(
    mut make_cmd: impl FnMut() -> Command,
    boot_timeout: Duration,
    batch_timeout: Duration,
) -> Result<(Boot, bool)> {
    let mut retried = false;
    loop {
        let boot = boot_once(make_cmd(), boot_timeout, batch_timeout)?;
        let detail = || {
            format!(
                "--- L1 console:\n{}\n--- qemu stderr:\n{}",
                boot.console, boot.stderr
            )
        };
        match boot.ending {
            Ending::Silent if !retried => {
                eprintln!(
                    "rig: L1 printed nothing within {boot_timeout:?} (TCG start-up spin); \
                     retrying once"
                );
                retried = true;
            }
            Ending::Silent => bail!(
                "L1 printed nothing within {boot_timeout:?}, twice (retried once)\n{}",
                detail()
            ),
            Ending::NotUp => bail!(
                "L1 printed output but did not reach its init within {boot_timeout:?}{}\n{}",
                if retried { " (after one retry)" } else { "" },
                detail()
            ),
            Ending::Exited(rc) if boot.up_after.is_none() => bail!(
                "QEMU exited with {rc:?} before L1 came up{}\n{}",
                if retried { " (after one retry)" } else { "" },
                detail()
            ),
            _ => return Ok((boot, retried)),
        }
    }
}

/// Runs `batch` in an L1 VM.
pub(crate) fn run(batch: &Batch, paths: &Paths) -> Result<BatchResult> {
    if crate::which("qemu-system-x86_64").is_none() {
        bail!("qemu-system-x86_64 not found: run `make deps` (Debian package qemu-system-x86)");
    }
    let scratch = Scratch::new("l1")?;
    let mut tools = paths.tools();
    tools.retain(|t| t.1.exists());
    let exports: Vec<(&str, &str)> = tools.iter().map(|t| (t.0, t.2)).collect();
    let init = scratch.path.join("init");
    std::fs::write(&init, init_script(batch, &exports))?;
    let mut files = vec![(paths.kernel.clone(), "/payload/vmlinuz".to_string())];
    for (_, host, in_l1) in &tools {
        files.push((host.to_path_buf(), in_l1.to_string()));
    }
    for (src, name) in &batch.files {
        files.push((src.clone(), format!("/payload/{name}")));
    }
    for case in &batch.cases {
        let f = scratch.path.join(format!("{}.sh", case.name));
        std::fs::write(&f, &case.script)?;
        files.push((f, format!("/cases/{}.sh", case.name)));
    }
    let spec = InitramfsSpec {
        init,
        busybox: Some(paths.busybox.clone()),
        module_tree: Some(paths.module_tree.clone()),
        modules: L1_MODULES.iter().map(|s| s.to_string()).collect(),
        files,
        // TCG decompresses slowly; a plain archive boots faster.
        compression: Compression::None,
        mtime: 0,
    };
    let initrd = scratch.path.join("l1.cpio");
    let size = initramfs::write(&spec, &initrd).context("building the L1 initramfs")?;
    eprintln!("rig: L1 initramfs {} MiB", size >> 20);

    let batch_timeout = BATCH_MARGIN + batch.cases.iter().map(|c| c.timeout).sum::<Duration>();
    let (boot, retried) = boot_with_retry(
        || qemu_command(&paths.kernel, &initrd, &batch.disks),
        boot_timeout(),
        batch_timeout,
    )?;
    if let Some(line) = boot
        .console
        .lines()
        .find(|l| l.trim_start().starts_with(ERROR_MARKER))
    {
        bail!(
            "L1 cannot run the batch: {}\n--- L1 console:\n{}",
            line.trim(),
            boot.console
        );
    }
    let l1_uptime = boot
        .console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix(UP_MARKER))
        .and_then(|s| s.trim().parse::<f64>().ok());
    eprintln!(
        "rig: L1 up after {:.1} s (L1 uptime {:.2} s){}; ended {:?}",
        boot.up_after.unwrap_or_default().as_secs_f64(),
        l1_uptime.unwrap_or(f64::NAN),
        if retried { ", after one retry" } else { "" },
        boot.ending
    );
    if boot.ending == Ending::BatchTimeout {
        eprintln!("rig: the batch ran past {batch_timeout:?}; L1 was killed");
    }
    let names: Vec<String> = batch.cases.iter().map(|c| c.name.clone()).collect();
    Ok(BatchResult {
        mode: Mode::L1,
        cases: parse_console(&boot.console, &names),
        console: boot.console,
        retried,
        wall: Duration::ZERO,
        l1_up: boot.up_after,
        l1_uptime_at_up: l1_uptime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Case;
    use std::time::Instant;

    fn fake(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_silent_boot_is_retried_once_and_reported() {
        let dir = Scratch::new("retry").unwrap();
        let flag = dir.path.join("first-done");
        let script = format!(
            "if [ -e {f} ]; then echo '@@RIG-L1-UP 2.5'; echo '@@RIG-DONE 3'; \
             else touch {f}; sleep 60; fi",
            f = flag.display()
        );
        let t = Instant::now();
        let (boot, retried) = boot_with_retry(
            || fake(&script),
            Duration::from_millis(700),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(retried);
        assert_eq!(boot.ending, Ending::Exited(Some(0)));
        assert!(boot.up_after.is_some());
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn silent_twice_is_an_error() {
        let e = boot_with_retry(
            || fake("sleep 60"),
            Duration::from_millis(300),
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("twice"), "{e:#}");
    }

    #[test]
    fn output_without_init_is_a_real_failure_not_retried() {
        let dir = Scratch::new("noretry").unwrap();
        let count = dir.path.join("count");
        let script = format!(
            "echo x >> {c}; echo 'Kernel panic - not syncing: VFS'; sleep 60",
            c = count.display()
        );
        let e = boot_with_retry(
            || fake(&script),
            Duration::from_millis(500),
            Duration::from_secs(10),
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("did not reach its init"), "{msg}");
        assert!(
            msg.contains("Kernel panic"),
            "the console comes with it: {msg}"
        );
        assert_eq!(
            std::fs::read_to_string(&count).unwrap(),
            "x\n",
            "one boot only"
        );
    }

    #[test]
    fn qemu_failing_to_start_shows_its_message() {
        let e = boot_with_retry(
            || fake("echo 'qemu: could not load kernel' >&2; exit 1"),
            Duration::from_secs(5),
            Duration::from_secs(10),
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("exited with Some(1)"), "{msg}");
        assert!(msg.contains("could not load kernel"), "{msg}");
    }

    #[test]
    fn a_batch_past_its_time_out_is_cut_with_what_it_printed() {
        let (boot, retried) = boot_with_retry(
            || fake("echo '@@RIG-L1-UP 1'; echo '@@RIG-BEGIN a'; echo partial; sleep 60"),
            Duration::from_secs(5),
            Duration::from_millis(500),
        )
        .unwrap();
        assert!(!retried);
        assert_eq!(boot.ending, Ending::BatchTimeout);
        let r = parse_console(&boot.console, &["a".into()]);
        assert_eq!((r[0].rc, r[0].output.as_str()), (None, "partial\n"));
    }

    #[test]
    fn init_script_runs_each_case_with_its_time_out() {
        let batch = Batch {
            cases: vec![
                Case::new("one", "echo 1", 30),
                Case::new("two", "exit 3", 45),
            ],
            files: vec![],
            disks: vec![PathBuf::from("/x/a.img"), PathBuf::from("/x/b.img")],
        };
        let s = init_script(&batch, &[("COWORKVM", "/bin/coworkvm")]);
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("timeout 30 sh /cases/one.sh </dev/null 2>&1\n"));
        assert!(s.contains("-ge 45 ] && rc=none\n"));
        assert!(s.contains("echo \"@@RIG-END two rc=$rc\""));
        assert!(s.contains("export DISK1=/dev/vdb"));
        assert!(s.contains("export COWORKVM=/bin/coworkvm\n"));
        assert!(s.find("@@RIG-BEGIN one").unwrap() < s.find("@@RIG-BEGIN two").unwrap());
        assert!(s.find("[ -c /dev/kvm ]").unwrap() < s.find(UP_MARKER).unwrap());
        assert!(s.trim_end().ends_with("poweroff -f"));
    }
}
