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
//! L1's second serial port (a file on the host) carries a heartbeat,
//! `@@RIG-HB <uptime>` every [`HEARTBEAT_PERIOD_S`] seconds, from L1's
//! init on; it is kept off the console so that it can never split a line
//! of a case's output.
//!
//! Every boot is bounded: L1 must print `@@RIG-L1-UP` within the boot
//! time-out. A boot that printed nothing at all within it hit a known TCG
//! start-up spin (an environment fault, about one boot in ten): it is
//! retried once, and the retry is reported. A boot that printed something
//! and then failed is a real failure. Once up, L1 is hung when it is silent
//! (no console output and no heartbeat) for the silence limit, when a case
//! runs past its time-out plus [`CASE_GRACE`] (L1's own `timeout` failed
//! to end it), or when the batch runs past the sum of the case time-outs
//! plus a margin. A hung L1 is ended, its console's tail shown, and the
//! cases it did not finish run once more in a fresh L1; the rerun is in
//! the result ([`BatchResult::rerun`], [`BatchResult::hangs`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use coworkvm_rootfs::initramfs::{self, Compression, InitramfsSpec};

use crate::process::Captured;
use crate::{
    parse_console, Batch, BatchResult, Case, CaseResult, Mode, Paths, RunOptions, Scratch,
};

/// Modules L1 needs: kvm-amd for the VMM under test (L1's CPU is the
/// emulated AMD one of `-cpu max`), and the batch's disks, which are
/// virtio-blk on PCI. `virtio_pci` is a transport, so no dependency data
/// names it: virtio_blk depends on virtio and virtio_ring only, and in
/// Debian's 6.1 cloud kernel virtio_pci (with virtio and virtio_ring) is a
/// module, where 6.12 builds them in. Dependencies (kvm, irqbypass,
/// virtio_pci_modern_dev, ...) come from the modules themselves and
/// built-in ones are skipped (`coworkvm_rootfs::modules::ModuleTree`).
pub const L1_MODULES: &[&str] = &["kvm-amd", "virtio_pci", "virtio_blk"];
pub const UP_MARKER: &str = "@@RIG-L1-UP";
pub const ERROR_MARKER: &str = "@@RIG-ERROR";
pub const DONE_MARKER: &str = "@@RIG-DONE";
pub const BEGIN_MARKER: &str = "@@RIG-BEGIN";
pub const END_MARKER: &str = "@@RIG-END";
pub const HEARTBEAT_MARKER: &str = "@@RIG-HB";
/// Seconds between two heartbeats of L1.
pub const HEARTBEAT_PERIOD_S: u64 = 5;
/// How far past its own time-out a case may run before L1 counts as hung.
pub const CASE_GRACE: Duration = Duration::from_secs(30);
/// L1's memory: its initramfs (payloads included) and /tmp live in it.
const L1_MEM_MIB: u32 = 3072;
/// Time for L1 to power off after its last case, beyond the case time-outs.
const BATCH_MARGIN: Duration = Duration::from_secs(30);
/// How long L1 may take to power off once it printed `@@RIG-DONE`.
const POWEROFF_GRACE: Duration = Duration::from_secs(20);
/// Console lines shown when a hung L1 is ended.
const CONSOLE_TAIL_LINES: usize = 40;

/// How long L1 may take to print `@@RIG-L1-UP`: `COWORKVM_RIG_BOOT_TIMEOUT`
/// seconds, default 90. Measured: 9-11 s of host time with a 44-92 MiB
/// initramfs on a 2-core host busy with compiles (L1 uptime 6-8 s); the
/// margin covers a host busier still, and is what a TCG spin costs before
/// its retry.
pub fn boot_timeout() -> Duration {
    env_secs("COWORKVM_RIG_BOOT_TIMEOUT", 90)
}

/// How long an L1 that is up may stay silent (no console output, no
/// heartbeat) before it counts as hung: `COWORKVM_RIG_SILENCE_S` seconds,
/// default 60: twelve heartbeats missed.
pub fn silence_limit() -> Duration {
    env_secs("COWORKVM_RIG_SILENCE_S", 60)
}

fn env_secs(var: &str, default: u64) -> Duration {
    let secs = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&s| s > 0)
        .unwrap_or(default);
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

/// L1's `/init`: mounts, heartbeat, modules, KVM check, the disks, then
/// each of `cases`. `tools` are (environment variable, path in L1) for the
/// cases; `disks` is how many disks the batch attached.
///
/// A case finds the heartbeat's process in `RIG_HEARTBEAT_PID` (the rig's
/// own hang test stops it to play a hung L1).
pub fn init_script(cases: &[&Case], disks: usize, tools: &[(&str, &str)]) -> String {
    let mut s = format!(
        r#"#!/bin/sh
export PATH=/bin
# pivot_root(2) refuses the initramfs's rootfs (it has no parent mount), and
# virtiofsd's --sandbox namespace pivots into its shared directory, as
# container runtimes do. So L1 runs from a bind mount of its rootfs moved
# onto / (what switch_root does; the files stay where they are). A plain
# chroot would not do: unshare(CLONE_NEWUSER) refuses a chrooted caller.
if [ -z "$RIG_ROOT_MOVED" ]; then
    export RIG_ROOT_MOVED=1
    if mkdir -p /.l1root && mount -o bind / /.l1root && cd /.l1root && mount -o move . /; then
        exec chroot . /init
    fi
    cd /
    echo "rig: cannot move L1's root off the rootfs: virtiofsd's namespace sandbox will fail"
fi
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=1500m tmp /tmp
mount -t debugfs debugfs /sys/kernel/debug
fail() {{ echo "{ERROR_MARKER} $*"; poweroff -f; sleep 60; }}
# The heartbeat goes to the second serial port, never into a case's output.
# It sleeps as `busybox`, not `sleep`: cases look for a leftover sleep.
[ -c /dev/ttyS1 ] || fail "no /dev/ttyS1 for the heartbeat"
while :; do
    read -r up rest </proc/uptime
    echo "{HEARTBEAT_MARKER} $up"
    /bin/busybox sleep {HEARTBEAT_PERIOD_S}
done >/dev/ttyS1 2>&1 &
export RIG_HEARTBEAT_PID=$!
rel=$(uname -r)
for m in $(cat /lib/modules/$rel/load-order); do
    out=$(insmod /lib/modules/$rel/$m 2>&1) || echo "rig: insmod $m failed: $out"
done
[ -c /dev/kvm ] || fail "/dev/kvm missing in L1 (insmod kvm-amd failed?)"
echo "{UP_MARKER} $(cut -d' ' -f1 /proc/uptime)"
export KERNEL=/payload/vmlinuz P=/payload TMPDIR=/tmp
# Ends whatever a case left running, so the next one starts clean; the
# heartbeat and its children (field 4 of stat: the parent) stay.
reap() {{
    for p in $(ls /proc | grep '^[0-9][0-9]*$'); do
        [ "$p" -gt 1 ] && [ "$p" != "$RIG_HEARTBEAT_PID" ] || continue
        [ "$(cut -d' ' -f4 /proc/$p/stat 2>/dev/null)" = "$RIG_HEARTBEAT_PID" ] && continue
        [ -n "$(cat /proc/$p/cmdline 2>/dev/null)" ] && kill -9 "$p" 2>/dev/null
    done
    return 0
}}
"#
    );
    for (var, path) in tools {
        s.push_str(&format!("export {var}={path}\n"));
    }
    for i in 0..disks {
        let dev = format!("/dev/vd{}", (b'a' + i as u8) as char);
        s.push_str(&format!(
            "i=0; while [ ! -b {dev} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
             [ -b {dev} ] || fail \"disk {i} ({dev}) did not appear in L1; \
             virtio devices: $(ls /sys/bus/virtio/devices | tr '\\n' ' ')\
             modules: $(cut -d' ' -f1 /proc/modules | tr '\\n' ' ')\"\n\
             export DISK{i}={dev}\n"
        ));
    }
    // A case that ran out of time reports rc=none, as in direct mode.
    for case in cases {
        s.push_str(&format!(
            "echo \"{BEGIN_MARKER} {n}\"\nt0=$(cut -d. -f1 /proc/uptime)\n\
             timeout {t} sh /cases/{n}.sh </dev/null 2>&1\nrc=$?\n\
             [ $(($(cut -d. -f1 /proc/uptime) - t0)) -ge {t} ] && rc=none\n\
             echo \"{END_MARKER} {n} rc=$rc\"\nreap\n",
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
/// hangs L2 guests), console on stdout, the heartbeat port into
/// `heartbeat`, the batch's disks as virtio-blk on PCI.
pub fn qemu_command(kernel: &Path, initrd: &Path, disks: &[PathBuf], heartbeat: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "q35", "-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-smp", &smp(), "-m", &L1_MEM_MIB.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic"])
        .args(["-serial", "stdio"])
        .arg("-chardev")
        .arg(format!("file,id=heartbeat,path={}", heartbeat.display()))
        .args(["-serial", "chardev:heartbeat", "-no-reboot", "-kernel"])
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

/// Why a running L1 was ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hang {
    /// No console output and no heartbeat for this long.
    Silent {
        silent_for: Duration,
        case: Option<String>,
    },
    /// A case ran this long, past its time-out plus `grace`.
    CaseOverrun {
        case: String,
        ran: Duration,
        grace: Duration,
    },
    /// The batch ran past its time-out.
    BatchTimeout(Duration),
}

impl fmt::Display for Hang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hang::Silent { silent_for, case } => write!(
                f,
                "L1 silent (no console output, no heartbeat) for {:.0} s{}",
                silent_for.as_secs_f64(),
                case.as_ref()
                    .map_or(String::from(" between cases"), |c| format!(
                        " during case {c}"
                    ))
            ),
            Hang::CaseOverrun { case, ran, grace } => write!(
                f,
                "case {case} still running after {:.0} s, past its time-out and {:.0} s of grace \
                 (L1's own time-out did not end it)",
                ran.as_secs_f64(),
                grace.as_secs_f64()
            ),
            Hang::BatchTimeout(t) => write!(f, "the batch ran past its time-out of {t:?}"),
        }
    }
}

/// How one L1 boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// QEMU exited by itself (exit code, None if killed by a signal).
    Exited(Option<i32>),
    /// Nothing at all on the console within the boot time-out.
    Silent,
    /// Output, but no `@@RIG-L1-UP`, within the boot time-out.
    NotUp,
    /// Up, then hung: ended by the runner.
    Hung(Hang),
}

/// The bounds one L1 boot runs under.
#[derive(Debug, Clone)]
pub struct Limits {
    /// To `@@RIG-L1-UP`.
    pub boot: Duration,
    /// Once up: longest time without console output or heartbeat.
    pub silence: Duration,
    /// Once up: the whole batch.
    pub batch: Duration,
    /// Each case's time-out, by name.
    pub cases: Vec<(String, Duration)>,
    /// How far past its time-out a case may run ([`CASE_GRACE`]).
    pub case_grace: Duration,
}

impl Limits {
    /// The limits for running `cases`.
    pub fn for_cases(cases: &[&Case], boot: Duration, silence: Duration) -> Self {
        Self {
            boot,
            silence,
            batch: BATCH_MARGIN + cases.iter().map(|c| c.timeout).sum::<Duration>(),
            cases: cases.iter().map(|c| (c.name.clone(), c.timeout)).collect(),
            case_grace: CASE_GRACE,
        }
    }

    fn case_timeout(&self, name: &str) -> Option<Duration> {
        self.cases.iter().find(|c| c.0 == name).map(|c| c.1)
    }
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

/// What follows L1's `marker` on a console `line`. The marker may come
/// after terminal escapes (the console's reset, `ESC c ESC [2J`, lands at
/// the start of the line of `@@RIG-L1-UP`).
pub fn after_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// Follows the console line by line as it grows: L1's markers, the case
/// running now, and a progress line on stderr per case that ends.
#[derive(Default)]
struct ConsoleWatch {
    /// Bytes of the console already split into lines.
    scanned: usize,
    up: bool,
    done: bool,
    /// The case running now and when its `@@RIG-BEGIN` arrived.
    current: Option<(String, Instant)>,
    ended: usize,
}

impl ConsoleWatch {
    fn scan(&mut self, console: &[u8], total_cases: usize) {
        let Some(last_nl) = console[self.scanned..].iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let end = self.scanned + last_nl + 1;
        for raw in String::from_utf8_lossy(&console[self.scanned..end]).lines() {
            let line = raw.trim_end_matches('\r').trim_start();
            if after_marker(line, UP_MARKER).is_some() {
                self.up = true;
            } else if after_marker(line, DONE_MARKER).is_some() {
                self.done = true;
            } else if let Some(name) = line.strip_prefix(BEGIN_MARKER) {
                self.current = Some((name.trim().to_owned(), Instant::now()));
            } else if let Some(rest) = line.strip_prefix(END_MARKER) {
                self.ended += 1;
                let took = self.current.take().map_or(String::new(), |(_, t)| {
                    format!(" in {:.1} s", t.elapsed().as_secs_f64())
                });
                eprintln!(
                    "rig: [{}/{total_cases}] case{}{took}",
                    self.ended,
                    rest.trim_end()
                );
            }
        }
        self.scanned = end;
    }
}

fn file_len(p: Option<&Path>) -> u64 {
    p.and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len())
}

/// Runs one L1 boot to its end under `limits`. `heartbeat` is the file
/// L1's heartbeat port writes to: its growth counts as a sign of life.
pub fn boot_once(cmd: Command, heartbeat: Option<&Path>, limits: &Limits) -> Result<Boot> {
    if let Some(hb) = heartbeat {
        let _ = std::fs::remove_file(hb);
    }
    let mut c = Captured::spawn(cmd)?;
    let mut watch = ConsoleWatch::default();
    let mut up_after = None;
    let mut done_at = None;
    let mut last_life = Instant::now();
    let mut sizes = (0usize, 0u64);
    let ending = loop {
        if let Some(rc) = c.try_wait()? {
            break Ending::Exited(rc);
        }
        let now = c.started.elapsed();
        let grown = (c.stdout_len(), file_len(heartbeat));
        if grown != sizes {
            sizes = grown;
            last_life = Instant::now();
        }
        watch.scan(&c.stdout.lock().unwrap(), limits.cases.len());
        if up_after.is_none() && watch.up {
            up_after = Some(now);
        }
        match up_after {
            None if now > limits.boot => {
                break if c.stdout_len() == 0 {
                    Ending::Silent
                } else {
                    Ending::NotUp
                }
            }
            None => {}
            Some(up) => {
                if last_life.elapsed() > limits.silence {
                    break Ending::Hung(Hang::Silent {
                        silent_for: last_life.elapsed(),
                        case: watch.current.as_ref().map(|c| c.0.clone()),
                    });
                }
                if let Some((case, began)) = &watch.current {
                    let allowed =
                        limits.case_timeout(case).unwrap_or(limits.batch) + limits.case_grace;
                    if began.elapsed() > allowed {
                        break Ending::Hung(Hang::CaseOverrun {
                            case: case.clone(),
                            ran: began.elapsed(),
                            grace: limits.case_grace,
                        });
                    }
                }
                if now > up + limits.batch {
                    break Ending::Hung(Hang::BatchTimeout(limits.batch));
                }
            }
        }
        if done_at.is_none() && watch.up && watch.done {
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
    heartbeat: Option<&Path>,
    limits: &Limits,
) -> Result<(Boot, bool)> {
    let mut retried = false;
    loop {
        let boot = boot_once(make_cmd(), heartbeat, limits)?;
        let detail = || {
            format!(
                "--- L1 console:\n{}\n--- qemu stderr:\n{}",
                boot.console, boot.stderr
            )
        };
        let boot_timeout = limits.boot;
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

/// The names of the cases whose `@@RIG-END` is on `console`.
pub fn ended_cases(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix(END_MARKER))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cases` in L1 boots made by `boot` (given the cases to run and the
/// attempt, 0 or 1; it returns the boot and whether it was retried). When
/// an L1 hangs, it is ended and the cases it did not finish run once more
/// in a fresh L1; a second hang leaves them unfinished (`rc: None`). The
/// fresh L1 gets the same disks, as the hung one left them. `@@RIG-ERROR`
/// on either boot is an error.
pub fn run_with_rerun(
    cases: &[Case],
    mut boot: impl FnMut(&[&Case], u32) -> Result<(Boot, bool)>,
) -> Result<BatchResult> {
    let mut pending: Vec<&Case> = cases.iter().collect();
    let mut results: Vec<CaseResult> = Vec::new();
    let mut console = String::new();
    let mut retried = false;
    let mut first_up = None;
    let mut hangs = Vec::new();
    let mut rerun = Vec::new();
    for attempt in 0..2u32 {
        let (b, was_retried) = boot(&pending, attempt)?;
        retried |= was_retried;
        if let Some(line) = b
            .console
            .lines()
            .find_map(|l| after_marker(l, ERROR_MARKER))
        {
            bail!(
                "L1 cannot run the batch: {ERROR_MARKER} {}\n--- L1 console:\n{}",
                line.trim(),
                b.console
            );
        }
        let l1_uptime = b
            .console
            .lines()
            .find_map(|l| after_marker(l, UP_MARKER))
            .and_then(|s| s.trim().parse::<f64>().ok());
        eprintln!(
            "rig: L1 up after {:.1} s (L1 uptime {:.2} s){}; ended {:?}",
            b.up_after.unwrap_or_default().as_secs_f64(),
            l1_uptime.unwrap_or(f64::NAN),
            if was_retried { ", after one retry" } else { "" },
            b.ending
        );
        if attempt == 0 {
            first_up = Some((b.up_after, l1_uptime));
        } else {
            console.push_str(&format!(
                "\n=== rig: a fresh L1 for the cases the hung one did not finish: {} ===\n",
                rerun.join(" ")
            ));
        }
        console.push_str(&b.console);
        let names: Vec<String> = pending.iter().map(|c| c.name.clone()).collect();
        let ended = ended_cases(&b.console);
        let parsed = parse_console(&b.console, &names);
        let Ending::Hung(hang) = b.ending else {
            results.extend(parsed);
            break;
        };
        let unfinished: Vec<&Case> = pending
            .iter()
            .copied()
            .filter(|c| !ended.contains(&c.name))
            .collect();
        eprintln!(
            "rig: {hang}; L1 ended. Its console's last {CONSOLE_TAIL_LINES} lines:\n{}\n--- qemu \
             stderr:\n{}",
            tail(&b.console, CONSOLE_TAIL_LINES),
            tail(&b.stderr, 10)
        );
        hangs.push(hang.to_string());
        let (done, cut): (Vec<CaseResult>, Vec<CaseResult>) =
            parsed.into_iter().partition(|r| ended.contains(&r.name));
        results.extend(done);
        if attempt == 1 || unfinished.is_empty() {
            results.extend(cut);
            if !unfinished.is_empty() {
                eprintln!(
                    "rig: L1 hung again; not finished: {}",
                    unfinished
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            break;
        }
        rerun = unfinished.iter().map(|c| c.name.clone()).collect();
        eprintln!(
            "rig: rerunning {} case(s) in a fresh L1 (once): {}",
            rerun.len(),
            rerun.join(" ")
        );
        pending = unfinished;
    }
    // In the batch's order.
    results.sort_by_key(|r| cases.iter().position(|c| c.name == r.name));
    let (l1_up, l1_uptime_at_up) = first_up.unwrap_or((None, None));
    Ok(BatchResult {
        mode: Mode::L1,
        cases: results,
        console,
        retried,
        wall: Duration::ZERO,
        l1_up,
        l1_uptime_at_up,
        rerun,
        hangs,
    })
}

/// Runs `batch` in an L1 VM (and, after a hang, its unfinished cases in a
/// second one).
pub(crate) fn run(batch: &Batch, paths: &Paths, opts: &RunOptions) -> Result<BatchResult> {
    if crate::which("qemu-system-x86_64").is_none() {
        bail!("qemu-system-x86_64 not found: run `make deps` (Debian package qemu-system-x86)");
    }
    let scratch = Scratch::new("l1")?;
    let mut tools = paths.tools();
    tools.retain(|t| t.1.exists());
    let exports: Vec<(&str, &str)> = tools.iter().map(|t| (t.0, t.2)).collect();
    let mut common = vec![(paths.kernel.clone(), "/payload/vmlinuz".to_string())];
    for (_, host, in_l1) in &tools {
        common.push((host.to_path_buf(), in_l1.to_string()));
    }
    for (src, name) in &batch.files {
        common.push((src.clone(), format!("/payload/{name}")));
    }
    let heartbeat = scratch.path.join("heartbeat");
    run_with_rerun(&batch.cases, |cases, attempt| {
        let init = scratch.path.join(format!("init-{attempt}"));
        std::fs::write(&init, init_script(cases, batch.disks.len(), &exports))?;
        let mut files = common.clone();
        for case in cases {
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
        let limits = Limits::for_cases(cases, boot_timeout(), opts.silence_limit);
        boot_with_retry(
            || qemu_command(&paths.kernel, &initrd, &batch.disks, &heartbeat),
            Some(&heartbeat),
            &limits,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use coworkvm_rootfs::modules::{synthetic_module, ModuleTree};
    use std::cell::Cell;

    fn fake(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    fn limits(boot_ms: u64, silence_ms: u64, batch_ms: u64) -> Limits {
        Limits {
            boot: Duration::from_millis(boot_ms),
            silence: Duration::from_millis(silence_ms),
            batch: Duration::from_millis(batch_ms),
            cases: vec![],
            case_grace: CASE_GRACE,
        }
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
        let (boot, retried) =
            boot_with_retry(|| fake(&script), None, &limits(700, 10_000, 10_000)).unwrap();
        assert!(retried);
        assert_eq!(boot.ending, Ending::Exited(Some(0)));
        assert!(boot.up_after.is_some());
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn silent_twice_is_an_error() {
        let e =
            boot_with_retry(|| fake("sleep 60"), None, &limits(300, 10_000, 10_000)).unwrap_err();
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
        let e = boot_with_retry(|| fake(&script), None, &limits(500, 10_000, 10_000)).unwrap_err();
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
            None,
            &limits(5000, 10_000, 10_000),
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("exited with Some(1)"), "{msg}");
        assert!(msg.contains("could not load kernel"), "{msg}");
    }

    #[test]
    fn a_batch_past_its_time_out_is_cut_with_what_it_printed() {
        // Output keeps coming, so only the batch's time-out ends it.
        let (boot, retried) = boot_with_retry(
            || {
                fake(
                    "echo '@@RIG-L1-UP 1'; echo '@@RIG-BEGIN a'; echo partial; \
                     while :; do echo . >&2; sleep 0.1; done",
                )
            },
            None,
            &limits(5000, 10_000, 700),
        )
        .unwrap();
        assert!(!retried);
        assert_eq!(
            boot.ending,
            Ending::Hung(Hang::BatchTimeout(Duration::from_millis(700)))
        );
        let r = parse_console(&boot.console, &["a".into()]);
        assert_eq!((r[0].rc, r[0].output.as_str()), (None, "partial\n"));
    }

    /// An L1 that stops talking mid-case is ended after the silence limit,
    /// long before the batch's time-out: the hang of `make bench` that
    /// cost 35 minutes.
    #[test]
    fn a_silent_l1_is_ended_after_the_silence_limit() {
        let dir = Scratch::new("hang").unwrap();
        let hb = dir.path.join("hb");
        let script = format!(
            "echo '@@RIG-L1-UP 1'; echo '@@RIG-BEGIN a'; echo '@@RIG-END a rc=0'; \
             echo '@@RIG-BEGIN b'; echo half; \
             for i in 1 2 3; do echo '@@RIG-HB 1' >> {hb}; sleep 0.2; done; sleep 600",
            hb = hb.display()
        );
        let t = Instant::now();
        let mut l = limits(5000, 1000, 600_000);
        l.cases = vec![
            ("a".into(), Duration::from_secs(300)),
            ("b".into(), Duration::from_secs(300)),
        ];
        let boot = boot_once(fake(&script), Some(&hb), &l).unwrap();
        match &boot.ending {
            Ending::Hung(Hang::Silent { case, silent_for }) => {
                assert_eq!(case.as_deref(), Some("b"));
                assert!(*silent_for >= Duration::from_secs(1));
            }
            other => panic!("expected a silent hang, got {other:?}"),
        }
        // Heartbeats until 0.4 s, then 1 s of silence.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            t.elapsed() > Duration::from_millis(1350),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(ended_cases(&boot.console), ["a"]);
    }

    /// A quiet case (no console output for longer than the silence limit)
    /// is not a hang while the heartbeat goes on.
    #[test]
    fn the_heartbeat_keeps_a_quiet_case_alive() {
        let dir = Scratch::new("hb").unwrap();
        let hb = dir.path.join("hb");
        let script = format!(
            "echo '@@RIG-L1-UP 1'; echo '@@RIG-BEGIN quiet'; \
             for i in $(seq 1 12); do echo '@@RIG-HB 1' >> {hb}; sleep 0.2; done; \
             echo '@@RIG-END quiet rc=0'; echo '@@RIG-DONE 3'",
            hb = hb.display()
        );
        let boot = boot_once(fake(&script), Some(&hb), &limits(5000, 800, 60_000)).unwrap();
        assert_eq!(boot.ending, Ending::Exited(Some(0)), "{}", boot.console);
        assert_eq!(ended_cases(&boot.console), ["quiet"]);
        // Without the heartbeat file the same L1 is silent for 2.4 s.
        let boot = boot_once(fake(&script), None, &limits(5000, 800, 60_000)).unwrap();
        assert!(matches!(boot.ending, Ending::Hung(Hang::Silent { .. })));
    }

    /// A case that L1's own `timeout` fails to end (heartbeat still going)
    /// is a hang once it runs past its time-out and the grace.
    #[test]
    fn a_case_past_its_time_out_and_grace_is_a_hang() {
        let dir = Scratch::new("overrun").unwrap();
        let hb = dir.path.join("hb");
        let script = format!(
            "echo '@@RIG-L1-UP 1'; echo '@@RIG-BEGIN stuck'; \
             while :; do echo '@@RIG-HB 1' >> {hb}; sleep 0.1; done",
            hb = hb.display()
        );
        let mut l = limits(5000, 10_000, 600_000);
        l.cases = vec![("stuck".into(), Duration::from_millis(500))];
        l.case_grace = Duration::from_millis(500);
        let t = Instant::now();
        let boot = boot_once(fake(&script), Some(&hb), &l).unwrap();
        match &boot.ending {
            Ending::Hung(h @ Hang::CaseOverrun { case, .. }) => {
                assert_eq!(case, "stuck");
                assert!(h.to_string().contains("did not end it"), "{h}");
            }
            other => panic!("expected a case overrun, got {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// A fake L1 for [`run_with_rerun`]: runs `cases` (each prints its
    /// name and passes) but, on a boot listed in `hang_on`, goes silent
    /// at the case named `hang_at`.
    fn fake_l1(cases: &[&Case], hang_at: Option<&str>, hb: &Path) -> Result<(Boot, bool)> {
        let mut s = String::from("echo '@@RIG-L1-UP 1.5'\n");
        for c in cases {
            s.push_str(&format!(
                "echo '@@RIG-BEGIN {n}'; echo 'out-{n}'\n",
                n = c.name
            ));
            if hang_at == Some(c.name.as_str()) {
                s.push_str("sleep 600\n");
            }
            s.push_str(&format!("echo '@@RIG-END {n} rc=0'\n", n = c.name));
        }
        s.push_str("echo '@@RIG-DONE 2'\n");
        let l = Limits {
            silence: Duration::from_millis(800),
            ..Limits::for_cases(cases, Duration::from_secs(5), Duration::ZERO)
        };
        boot_with_retry(|| fake(&s), Some(hb), &l)
    }

    fn three_cases() -> Vec<Case> {
        vec![
            Case::new("a", "", 60),
            Case::new("b", "", 60),
            Case::new("c", "", 60),
        ]
    }

    #[test]
    fn a_hung_l1_is_replaced_and_only_the_unfinished_cases_rerun() {
        let dir = Scratch::new("rerun").unwrap();
        let hb = dir.path.join("hb");
        let cases = three_cases();
        let boots = Cell::new(0);
        let r = run_with_rerun(&cases, |pending, attempt| {
            boots.set(boots.get() + 1);
            let names: Vec<&str> = pending.iter().map(|c| c.name.as_str()).collect();
            match attempt {
                0 => assert_eq!(names, ["a", "b", "c"]),
                _ => assert_eq!(names, ["b", "c"], "a finished in the first L1"),
            }
            fake_l1(pending, (attempt == 0).then_some("b"), &hb)
        })
        .unwrap();
        assert_eq!(boots.get(), 2);
        assert_eq!(r.rerun, ["b", "c"]);
        assert_eq!(r.hangs.len(), 1);
        assert!(r.hangs[0].contains("during case b"), "{:?}", r.hangs);
        let got: Vec<(&str, Option<i32>, &str)> = r
            .cases
            .iter()
            .map(|c| (c.name.as_str(), c.rc, c.output.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a", Some(0), "out-a\n"),
                ("b", Some(0), "out-b\n"),
                ("c", Some(0), "out-c\n")
            ]
        );
        assert_eq!(r.console.matches("@@RIG-BEGIN a").count(), 1);
        assert_eq!(r.console.matches("@@RIG-BEGIN b").count(), 2);
        assert!(r.console.contains("=== rig: a fresh L1"));
        assert!(
            r.report().contains("rerun in a fresh L1: b c"),
            "{}",
            r.report()
        );
    }

    #[test]
    fn a_second_hang_is_not_rerun_and_leaves_the_cases_unfinished() {
        let dir = Scratch::new("rerun2").unwrap();
        let hb = dir.path.join("hb");
        let cases = three_cases();
        let boots = Cell::new(0);
        let r = run_with_rerun(&cases, |pending, _| {
            boots.set(boots.get() + 1);
            fake_l1(pending, Some("c"), &hb)
        })
        .unwrap();
        assert_eq!(boots.get(), 2, "one rerun only");
        assert_eq!(r.rerun, ["c"]);
        assert_eq!(r.hangs.len(), 2);
        assert_eq!(r.case("a").rc, Some(0));
        assert_eq!(r.case("b").rc, Some(0));
        assert_eq!(r.case("c").rc, None);
        assert_eq!(r.case("c").output, "out-c\n");
        assert_eq!(r.cases.len(), 3);
    }

    #[test]
    fn an_l1_that_cannot_run_the_batch_is_an_error_not_a_rerun() {
        let cases = three_cases();
        let e = run_with_rerun(&cases, |_, _| {
            boot_with_retry(
                || {
                    fake(
                        "echo '@@RIG-L1-UP 1'; echo '@@RIG-ERROR disk 0 (/dev/vda) did not appear'",
                    )
                },
                None,
                &limits(5000, 10_000, 10_000),
            )
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("did not appear"), "{e:#}");
    }

    #[test]
    fn markers_after_terminal_escapes_count() {
        let line = "\u{1b}c\u{1b}[?7l\u{1b}[2J@@RIG-L1-UP 7.70\r";
        assert_eq!(
            after_marker(line, UP_MARKER).map(|s| s.trim().parse::<f64>().unwrap()),
            Some(7.7)
        );
        let mut w = ConsoleWatch::default();
        w.scan(format!("{line}\n").as_bytes(), 0);
        assert!(w.up);
        assert_eq!(after_marker("plain", UP_MARKER), None);
    }

    #[test]
    fn init_script_runs_each_case_with_its_time_out_and_a_heartbeat() {
        let cases = [
            Case::new("one", "echo 1", 30),
            Case::new("two", "exit 3", 45),
        ];
        let refs: Vec<&Case> = cases.iter().collect();
        let s = init_script(&refs, 2, &[("COWORKVM", "/bin/coworkvm")]);
        assert!(s.starts_with("#!/bin/sh\n"));
        // L1 leaves the rootfs (where pivot_root fails) before anything else.
        let bind = s
            .find("mount -o move . /; then\n        exec chroot . /init")
            .unwrap();
        assert!(bind < s.find("mount -t proc").unwrap());
        assert!(s.contains("timeout 30 sh /cases/one.sh </dev/null 2>&1\n"));
        assert!(s.contains("-ge 45 ] && rc=none\n"));
        assert!(s.contains("echo \"@@RIG-END two rc=$rc\""));
        assert!(s.contains("export DISK1=/dev/vdb"));
        assert!(s.contains("export COWORKVM=/bin/coworkvm\n"));
        assert!(s.find("@@RIG-BEGIN one").unwrap() < s.find("@@RIG-BEGIN two").unwrap());
        assert!(s.find("[ -c /dev/kvm ]").unwrap() < s.find(UP_MARKER).unwrap());
        assert!(s.trim_end().ends_with("poweroff -f"));
        // The heartbeat: on ttyS1, before the modules load, spared by reap.
        assert!(s.contains("done >/dev/ttyS1 2>&1 &\nexport RIG_HEARTBEAT_PID=$!\n"));
        assert!(s.contains(&format!("/bin/busybox sleep {HEARTBEAT_PERIOD_S}\n")));
        assert!(s.find("RIG_HEARTBEAT_PID=").unwrap() < s.find("insmod").unwrap());
        assert!(s.contains("[ \"$p\" != \"$RIG_HEARTBEAT_PID\" ] || continue"));
        // A module that fails to load says so.
        assert!(s.contains("|| echo \"rig: insmod $m failed: $out\""));
        // Only the cases given (a rerun runs a subset).
        let s = init_script(&refs[1..], 0, &[]);
        assert!(!s.contains("@@RIG-BEGIN one") && s.contains("@@RIG-BEGIN two"));
        assert!(!s.contains("DISK0"));
    }

    #[test]
    fn qemu_gets_a_second_serial_port_for_the_heartbeat() {
        let cmd = qemu_command(
            Path::new("/k"),
            Path::new("/i"),
            &[PathBuf::from("/d0")],
            Path::new("/s/hb"),
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(
            line.contains(
                "-serial stdio -chardev file,id=heartbeat,path=/s/hb -serial chardev:heartbeat"
            ),
            "{line}"
        );
        assert!(line.contains("-device virtio-blk-pci,drive=d0"), "{line}");
    }

    /// A module tree shaped like a Debian cloud kernel's: 6.1 ships the
    /// virtio PCI transport as modules, 6.12 builds it in.
    fn cloud_tree(name: &str, virtio_builtin: bool) -> Scratch {
        let dir = Scratch::new(name).unwrap();
        let mut mods = vec![
            ("kernel/virt/lib/irqbypass.ko", ""),
            ("kernel/arch/x86/kvm/kvm.ko", "irqbypass"),
            ("kernel/arch/x86/kvm/kvm-amd.ko", "kvm"),
            ("kernel/arch/x86/kvm/kvm-intel.ko", "kvm"),
        ];
        let virtio = [
            ("kernel/drivers/virtio/virtio.ko", ""),
            ("kernel/drivers/virtio/virtio_ring.ko", ""),
            ("kernel/drivers/virtio/virtio_pci_legacy_dev.ko", ""),
            ("kernel/drivers/virtio/virtio_pci_modern_dev.ko", ""),
            (
                "kernel/drivers/virtio/virtio_pci.ko",
                "virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio_ring,virtio",
            ),
        ];
        let mut builtin = String::from("kernel/fs/ext4/ext4.ko\n");
        if virtio_builtin {
            for (p, _) in virtio {
                builtin.push_str(p);
                builtin.push('\n');
            }
            mods.push(("kernel/drivers/block/virtio_blk.ko", ""));
        } else {
            mods.extend(virtio);
            mods.push(("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring"));
        }
        for (path, deps) in mods {
            let f = dir.path.join(path);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            let info = format!("license=GPL\0depends={deps}\0");
            std::fs::write(f, synthetic_module(info.as_bytes())).unwrap();
        }
        std::fs::write(dir.path.join("modules.builtin"), builtin).unwrap();
        dir
    }

    /// The 6.1 failure (`disk 0 (/dev/vda) did not appear in L1`): L1 must
    /// load the PCI transport and its dependencies before virtio_blk.
    #[test]
    fn l1_loads_the_virtio_pci_transport_where_it_is_a_module() {
        let t61 = cloud_tree("k61", false);
        let r = ModuleTree::open(&t61.path)
            .unwrap()
            .resolve(L1_MODULES)
            .unwrap();
        let pos = |n: &str| {
            r.order
                .iter()
                .position(|m| m == n)
                .unwrap_or_else(|| panic!("{n} not loaded: {:?}", r.order))
        };
        assert!(pos("irqbypass") < pos("kvm") && pos("kvm") < pos("kvm_amd"));
        for dep in [
            "virtio",
            "virtio_ring",
            "virtio_pci_modern_dev",
            "virtio_pci_legacy_dev",
        ] {
            assert!(
                pos(dep) < pos("virtio_pci"),
                "{dep} before virtio_pci: {:?}",
                r.order
            );
        }
        assert!(pos("virtio_pci") < pos("virtio_blk"));
        assert!(r.builtin.is_empty());

        let t612 = cloud_tree("k612", true);
        let r = ModuleTree::open(&t612.path)
            .unwrap()
            .resolve(L1_MODULES)
            .unwrap();
        assert_eq!(r.order, ["irqbypass", "kvm", "kvm_amd", "virtio_blk"]);
        assert_eq!(r.builtin, ["virtio_pci"], "built in: no insmod");
    }

    /// The kernel the build fetched (build/, or COWORKVM_BUILD_DIR): every
    /// module L1 wants is either built in or loadable with its dependencies.
    #[test]
    fn the_fetched_kernel_has_what_l1_needs() {
        let Some(p) = crate::ok_or_skip(
            Paths::locate_base().map_err(|e| format!("no fetched kernel (make kernel): {e:#}")),
        ) else {
            return;
        };
        let tree = ModuleTree::open(&p.module_tree).unwrap();
        let r = tree.resolve(L1_MODULES).unwrap();
        for m in L1_MODULES {
            let m = coworkvm_rootfs::modules::normalize(m);
            assert!(
                r.order.contains(&m) || r.builtin.contains(&m),
                "{m} neither loaded nor built into {}: {r:?}",
                p.kernel_release
            );
        }
        eprintln!(
            "{}: L1 loads {:?}, built in {:?}",
            p.kernel_release, r.order, r.builtin
        );
    }
}
