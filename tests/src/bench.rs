//! `make bench`: boots the same kernel and initramfs with the same devices
//! (one read-only disk, an rng, 256 MiB, 1 vCPU) in coworkvm and in QEMU
//! microvm, alternately, in one batch, and compares time to a console
//! marker, VM exits up to the marker (KVM's debugfs; independent of the
//! machine's speed) and peak RSS.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::{Batch, Case, Paths};

const MARKER: &str = "@@BENCH-MARKER";
/// Kernel parameters coworkvm adds itself; QEMU gets the same.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off no_timer_check quiet";

#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub marker_ms: u64,
    pub vm_exits: Option<u64>,
    pub max_rss_kib: u64,
}

/// Parses `@@VMM-TIMER {...}` lines tagged by the case script as
/// `@@SAMPLE <vmm> {...}`.
pub fn parse_samples(output: &str, vmm: &str) -> Vec<Sample> {
    let prefix = format!("@@SAMPLE {vmm} ");
    output
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(&prefix))
        .filter_map(|json| serde_json::from_str::<serde_json::Value>(json).ok())
        .filter_map(|v| {
            Some(Sample {
                marker_ms: v["marker_ms"].as_u64()?,
                vm_exits: v["vm_exits"].as_u64(),
                max_rss_kib: v["max_rss_kib"].as_u64()?,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

pub fn run(paths: &Paths, args: &[String]) -> Result<()> {
    let mut out = paths.root.join("bench/results.md");
    let mut runs = 10u32;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--out" => out = PathBuf::from(args.get(i + 1).context("--out FILE")?),
            "--runs" => runs = args.get(i + 1).context("--runs N")?.parse()?,
            other => bail!("unknown bench argument {other}"),
        }
        i += 2;
    }
    let scratch = std::env::temp_dir().join(format!("coworkvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let initrd = scratch.join("bench.cpio.zst");
    paths.guest_initramfs(&paths.root.join("tests/guest/bench.init"), &initrd)?;
    let mut files = vec![
        (initrd, "bench.cpio.zst".to_string()),
        (paths.agent_initrd.clone(), "agent.cpio.zst".to_string()),
    ];
    files.extend(crate::qemu::payload()?);

    let script = format!(
        r#"set -u
dd if=/dev/zero of=$TMPDIR/ro.img bs=1M count=16 2>/dev/null
QEMU="{qemu}"
for i in $(seq 1 {runs}); do
  s=$($VMM_TIMER --marker {MARKER} --timeout 120 -- $COWORKVM boot --kernel $KERNEL \
      --initrd $P/bench.cpio.zst --disk $TMPDIR/ro.img,ro --cpus 1 --mem 256 --cmdline quiet \
      | grep '^@@VMM-TIMER' | cut -d' ' -f2-)
  echo "@@SAMPLE coworkvm $s"
  s=$($VMM_TIMER --marker {MARKER} --timeout 120 -- $QEMU -M microvm -enable-kvm -cpu host \
      -smp 1 -m 256 -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
      -kernel $KERNEL -initrd $P/bench.cpio.zst -append "{CMDLINE}" \
      -drive id=ro,file=$TMPDIR/ro.img,format=raw,if=none,readonly=on \
      -device virtio-blk-device,drive=ro -device virtio-rng-device \
      | grep '^@@VMM-TIMER' | cut -d' ' -f2-)
  echo "@@SAMPLE qemu $s"
done
"#,
        qemu = crate::qemu::SH
    );
    let agent_script = "$AGENT_PROBE --bench $TMPDIR/ab.sock -- $COWORKVM boot --kernel $KERNEL \
        --initrd $P/agent.cpio.zst --cpus 2 --mem 512 --cmdline quiet --vsock $TMPDIR/ab.sock \
        --console $TMPDIR/ab.log";
    let batch = Batch {
        cases: vec![
            Case::new("bench", &script, 60 + 60 * runs as u64),
            Case::new("agent", agent_script, 900),
        ],
        files,
        disks: vec![],
    };
    let result = batch.run(paths)?;
    let _ = std::fs::remove_dir_all(&scratch);
    let case = result.case("bench");
    let cw = parse_samples(&case.output, "coworkvm");
    let qm = parse_samples(&case.output, "qemu");
    if cw.is_empty() || qm.is_empty() {
        bail!(
            "no samples (coworkvm {}, qemu {}); output:\n{}",
            cw.len(),
            qm.len(),
            case.output
        );
    }
    let mut report = render(&cw, &qm, &result, paths)?;
    report.push_str(&render_agent(&result.case("agent").output));
    print!("{report}");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &report)?;
    eprintln!("bench: written to {}", out.display());
    Ok(())
}

/// The agent path: `coworkvm boot` with the agent, driven over vsock by
/// agent-probe exactly as the helper drives it.
fn render_agent(output: &str) -> String {
    let sample = output
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("@@BENCH "))
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok());
    let mut s = String::from("## The agent path (vsock + guest protocol)\n\n");
    let Some(v) = sample else {
        s.push_str("No result: the agent benchmark failed; its output:\n\n```\n");
        s.push_str(output);
        s.push_str("\n```\n");
        return s;
    };
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    s.push_str(&format!(
        "2 vCPUs, 512 MiB, the agent initramfs. VMM start to the agent's `ready`: {:.0} ms. \
         Spawn request to first stdout event (`echo x`, 100 runs): median {:.1} ms \
         (min {:.1}, max {:.1}). Guest to host, 256 MiB of text on a process's stdout: \
         {:.1} MiB/s. Host to guest, 64 MiB into a process's stdin: {:.1} MiB/s.\n\n\
         Not measured yet: the same payloads over QEMU's virtio-serial or user-net path.\n",
        f("ready_ms"),
        f("spawn_first_stdout_median_us") / 1000.0,
        f("spawn_first_stdout_min_us") / 1000.0,
        f("spawn_first_stdout_max_us") / 1000.0,
        f("stdout_mib_s"),
        f("stdin_mib_s"),
    ));
    s
}

fn render(
    cw: &[Sample],
    qm: &[Sample],
    result: &crate::BatchResult,
    paths: &Paths,
) -> Result<String> {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let host_cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let mut s = String::new();
    writeln!(s, "# Boot benchmark: coworkvm vs QEMU microvm\n")?;
    writeln!(
        s,
        "{date}; mode **{:?}** ({}); host CPU {host_cpu}; guest kernel {}; {} runs each, alternating.\n",
        result.mode,
        match result.mode {
            crate::Mode::L1 => "both VMMs run inside the L1 VM under QEMU TCG, on its emulated SVM",
            crate::Mode::Direct => "both VMMs run directly on the host's KVM",
        },
        paths.kernel_release,
        cw.len().min(qm.len())
    )?;
    writeln!(
        s,
        "Same kernel, same initramfs (busybox; loads virtio_mmio, virtio_blk, virtio-rng; \
         prints a marker once /dev/vda exists), 1 vCPU, 256 MiB, one read-only virtio-blk disk \
         and virtio-rng, kernel command line `{CMDLINE}`. Time is from the VMM's exec to the \
         marker on its console; VM exits are KVM's count for the VM at the marker; RSS is the \
         VMM process's peak.\n"
    )?;
    writeln!(
        s,
        "| metric | coworkvm median (min-max) | QEMU microvm median (min-max) | coworkvm / QEMU |"
    )?;
    writeln!(s, "|---|---|---|---|")?;
    let row =
        |s: &mut String, name: &str, unit: &str, a: &[f64], b: &[f64]| -> Result<()> {
            match (stats(a), stats(b)) {
                (Some(x), Some(y)) => {
                    writeln!(
                s,
                "| {name} | {:.0} {unit} ({:.0}-{:.0}) | {:.0} {unit} ({:.0}-{:.0}) | {:.2} |",
                x.median, x.min, x.max, y.median, y.min, y.max, x.median / y.median
            )?
                }
                _ => writeln!(s, "| {name} | n/a | n/a | n/a |")?,
            }
            Ok(())
        };
    let ms = |v: &[Sample]| v.iter().map(|x| x.marker_ms as f64).collect::<Vec<_>>();
    let exits = |v: &[Sample]| {
        v.iter()
            .filter_map(|x| x.vm_exits)
            .map(|e| e as f64)
            .collect::<Vec<_>>()
    };
    let rss = |v: &[Sample]| {
        v.iter()
            .map(|x| x.max_rss_kib as f64 / 1024.0)
            .collect::<Vec<_>>()
    };
    row(&mut s, "time to marker", "ms", &ms(cw), &ms(qm))?;
    row(&mut s, "VM exits to marker", "", &exits(cw), &exits(qm))?;
    row(&mut s, "peak RSS", "MiB", &rss(cw), &rss(qm))?;
    writeln!(s)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_stats() {
        let out = "@@SAMPLE coworkvm {\"marker_ms\": 100, \"vm_exits\": 5, \"max_rss_kib\": 2048}\n\
                   @@SAMPLE qemu {\"marker_ms\": 300, \"vm_exits\": null, \"max_rss_kib\": 4096}\n\
                   @@SAMPLE coworkvm \n\
                   @@SAMPLE coworkvm {\"marker_ms\": 120, \"vm_exits\": 7, \"max_rss_kib\": 1024}\n";
        let cw = parse_samples(out, "coworkvm");
        assert_eq!(cw.len(), 2, "a failed run (empty sample) is dropped");
        assert_eq!(cw[1].vm_exits, Some(7));
        let qm = parse_samples(out, "qemu");
        assert_eq!(qm[0].vm_exits, None);
        let st = stats(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((st.median, st.min, st.max), (2.5, 1.0, 10.0));
        assert!(stats(&[]).is_none());
    }
}
