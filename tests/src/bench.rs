//! `make bench`: boots the same kernel and initramfs with the same devices
//! (one read-only disk, an rng, 256 MiB, 1 vCPU) in coworkvm and in QEMU
//! microvm, alternately, in one batch, and compares time to a console
//! marker, VM exits up to the marker (KVM's debugfs; independent of the
//! machine's speed) and peak RSS; and the same coworkvm boot with
//! `--no-sandbox`, for the VMM sandbox's cost.
//!
//! In the same batch it measures the agent path (coworkvm-agent's stdout
//! and stdin over coworkvm's vsock, driven by `agent-probe --bench`) and,
//! as the reference a user would otherwise take, the same payloads over
//! QEMU microvm's virtio-serial (`agent-probe --serial-bench`, guest
//! `tests/guest/serial-bench.init`), same kernel, vCPUs and memory.
//!
//! And shared folders ([`fs`]): sequential write and read and a
//! metadata-heavy workload in a virtio-fs share under coworkvm and under
//! QEMU microvm with the same virtiofsd, with a virtio-blk ext4 disk as
//! reference. `--fs-only` runs just that part and replaces its section of
//! an existing results file.
//!
//! And sessions' network ([`crate::egress`]): a download from a local
//! upstream in L1 through a session's egress proxies (HTTP absolute URI,
//! CONNECT tunnel, SOCKS5) vs the same download directly in L1, and the
//! CONNECT set-up latency. `--egress-only` runs just that part, likewise.
//!
//! And a Cowork session with the real runtime ([`crate::cowork`]): per
//! round (`--cowork-runs`, 5; 0 leaves the case out of the full run) a
//! fresh boot to connected, `installSdk` through the shared folder, the
//! runtime's `--version` to its first stdout, and a `claude -p` round trip
//! against the fake Messages API; `installSdk` by copy from a helper
//! without virtiofsd; the rootfs sizes and the first start's expansion.
//! `--cowork-only` runs just that part, likewise. It needs the pinned
//! runtime (`crate::runtime`, fetched into `build/claude-code/` once).

pub mod fs;

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

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
    let mut stream_runs = 1u32;
    let mut mib = STREAM_MIB;
    let mut helper_runs = true;
    let mut baseline: Option<PathBuf> = None;
    let mut baseline_name: Option<String> = None;
    let mut fs_opts = fs::Options::default();
    let mut fs_only = false;
    let mut egress_opts = EgressOptions::default();
    let mut egress_only = false;
    let mut cowork_opts = CoworkOptions::default();
    let mut cowork_only = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--out" => out = PathBuf::from(args.get(i + 1).context("--out FILE")?),
            "--runs" => runs = args.get(i + 1).context("--runs N")?.parse()?,
            "--stream-runs" => stream_runs = args.get(i + 1).context("--stream-runs N")?.parse()?,
            "--mib" => mib = args.get(i + 1).context("--mib N")?.parse()?,
            "--baseline" => {
                baseline = Some(PathBuf::from(
                    args.get(i + 1).context("--baseline COWORKVM-BINARY")?,
                ))
            }
            "--baseline-name" => {
                baseline_name = Some(args.get(i + 1).context("--baseline-name TEXT")?.clone())
            }
            "--fs-runs" => fs_opts.runs = args.get(i + 1).context("--fs-runs N")?.parse()?,
            "--fs-reps" => fs_opts.reps = args.get(i + 1).context("--fs-reps N")?.parse()?,
            "--fs-mib" => fs_opts.mib = args.get(i + 1).context("--fs-mib N")?.parse()?,
            "--fs-files" => fs_opts.files = args.get(i + 1).context("--fs-files N")?.parse()?,
            "--egress-mib" => {
                egress_opts.mib = args.get(i + 1).context("--egress-mib N")?.parse()?
            }
            "--egress-connects" => {
                egress_opts.connects = args.get(i + 1).context("--egress-connects N")?.parse()?
            }
            "--cowork-runs" => {
                cowork_opts.runs = args.get(i + 1).context("--cowork-runs N")?.parse()?
            }
            "--cowork-only" => {
                cowork_only = true;
                i += 1;
                continue;
            }
            "--no-helper" => {
                helper_runs = false;
                i += 1;
                continue;
            }
            "--fs-only" => {
                fs_only = true;
                i += 1;
                continue;
            }
            "--egress-only" => {
                egress_only = true;
                i += 1;
                continue;
            }
            other => bail!("unknown bench argument {other}"),
        }
        i += 2;
    }
    fs_opts.validate()?;
    egress_opts.validate()?;
    cowork_opts.validate(cowork_only)?;
    if [fs_only, egress_only, cowork_only]
        .iter()
        .filter(|x| **x)
        .count()
        > 1
    {
        bail!("--fs-only, --egress-only and --cowork-only: one part at a time");
    }
    let scratch = std::env::temp_dir().join(format!("coworkvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    if cowork_only {
        let r = run_cowork_only(paths, &scratch, &cowork_opts, &out);
        let _ = std::fs::remove_dir_all(&scratch);
        return r;
    }
    if egress_only {
        let r = run_egress_only(paths, &scratch, &egress_opts, &out);
        let _ = std::fs::remove_dir_all(&scratch);
        return r;
    }
    if fs_only {
        let r = run_fs_only(paths, &scratch, &fs_opts, &out);
        let _ = std::fs::remove_dir_all(&scratch);
        return r;
    }
    let initrd = scratch.join("bench.cpio.zst");
    paths.guest_initramfs(&paths.root.join("tests/guest/bench.init"), &initrd)?;
    let serial_initrd = scratch.join("serial.cpio.zst");
    paths.guest_initramfs(
        &paths.root.join("tests/guest/serial-bench.init"),
        &serial_initrd,
    )?;
    let mut files = vec![
        (initrd, "bench.cpio.zst".to_string()),
        (serial_initrd, "serial.cpio.zst".to_string()),
        (paths.agent_initrd.clone(), "agent.cpio.zst".to_string()),
    ];
    files.extend(crate::qemu::payload()?);
    let baseline = match baseline {
        Some(bin) => {
            if runs == 0 {
                bail!("--baseline compares boots: it needs --runs 1 or more");
            }
            let meta =
                std::fs::metadata(&bin).with_context(|| format!("--baseline {}", bin.display()))?;
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                bail!("--baseline {}: not an executable file", bin.display());
            }
            files.push((bin.clone(), BASELINE_PAYLOAD.to_string()));
            let name = baseline_name.unwrap_or_else(|| bin.display().to_string());
            Some(name)
        }
        None => None,
    };

    let script = boot_loop_script(runs, baseline.is_some());
    let agent_script = format!(
        "$AGENT_PROBE --bench --mib {mib} $TMPDIR/ab.sock -- $COWORKVM boot --kernel $KERNEL \
         --initrd $P/agent.cpio.zst --cpus 2 --mem 512 --cmdline quiet --vsock $TMPDIR/ab.sock \
         --console $TMPDIR/ab.log"
    );
    let serial_script = format!(
        "$AGENT_PROBE --serial-bench --mib {mib} $TMPDIR/ser.sock -- {qemu} -M microvm \
         -enable-kvm -cpu host -smp 2 -m 512 -name bench,debug-threads=on -nodefaults -no-user-config \
         -nographic \
         -serial stdio -no-reboot -kernel $KERNEL -initrd $P/serial.cpio.zst \
         -append \"{CMDLINE}\" -device virtio-serial-device \
         -chardev socket,id=c0,path=$TMPDIR/ser.sock -device virtserialport,chardev=c0,name=bench",
        qemu = crate::qemu::SH
    );
    let mut cases = Vec::new();
    if runs > 0 {
        let boots = if baseline.is_some() { 4 } else { 3 };
        cases.push(Case::new("bench", &script, 60 + 30 * boots * runs as u64));
    }
    // The helper with real VMs needs the images on a disk and a bundle disk.
    let mut disks = Vec::new();
    let cowork_runs = helper_runs && cowork_opts.runs > 0;
    if helper_runs {
        let images = crate::images::images_dir(&paths.root)?;
        disks.push(crate::images::images_disk(&images, &scratch, false)?);
        let bundle = scratch.join("bundle.ext4");
        crate::images::ext4_image(&bundle, None, bundle_disk_mib(cowork_runs))?;
        disks.push(bundle);
        cases.push(Case::new("helper", HELPER_CASE, 1800));
        cases.push(egress_opts.case());
    }
    if cowork_runs {
        // The runtime disk goes right after the bundle disk; its index is
        // the case's `$DISKn`.
        disks.push(cowork_opts.runtime_disk(paths, &scratch)?);
        cases.extend(cowork_opts.cases(disks.len() - 1));
    }
    // Alternating, so a busy stretch of the host hits both paths alike.
    for r in 0..stream_runs {
        cases.push(Case::new(&format!("agent{r}"), &agent_script, 900));
        cases.push(Case::new(&format!("serial{r}"), &serial_script, 600));
    }
    let shared = if fs_opts.runs > 0 {
        let p = fs::prepare(paths, &scratch, &fs_opts, disks.len())?;
        disks.push(p.disk.clone());
        files.extend(p.files.iter().cloned());
        cases.extend(p.cases.iter().cloned());
        Some(p.tree)
    } else {
        None
    };
    let batch = Batch {
        cases,
        files,
        disks,
    };
    let result = batch.run(paths)?;
    let _ = std::fs::remove_dir_all(&scratch);
    let mut missing = unfinished_cases(&result);
    let mut host = String::new();
    if helper_runs {
        host.push_str(&render_helper(&result.case("helper").output));
    }
    host.push_str(&helper_rtt_section(paths).unwrap_or_else(|e| format!("\nhelper rtt: {e:#}\n")));
    host.push_str(&images_section(paths).unwrap_or_else(|e| format!("\nimages: {e:#}\n")));
    let agent_out: Vec<String> = (0..stream_runs)
        .map(|r| result.case(&format!("agent{r}")).output.clone())
        .collect();
    let serial_out: Vec<String> = (0..stream_runs)
        .map(|r| result.case(&format!("serial{r}")).output.clone())
        .collect();
    for (name, outs, tag) in [
        ("agent", &agent_out, "@@BENCH"),
        ("serial", &serial_out, "@@BENCH-SERIAL"),
    ] {
        for (r, o) in outs.iter().enumerate() {
            if tagged(o, tag).is_empty() {
                missing.push(format!("{name}{r}: no {tag} result"));
            }
        }
    }
    if helper_runs && tagged(&result.case("helper").output, "@@HELPER-BENCH").is_empty() {
        missing.push("helper: no @@HELPER-BENCH result".into());
    }
    let egress = helper_runs.then(|| {
        let (section, complete) = crate::egress::render(
            &result.case(EGRESS_CASE).output,
            &run_context(result.mode, paths),
        );
        if !complete {
            missing.push(format!("{EGRESS_CASE}: no @@EGRESS-BENCH result"));
        }
        section
    });
    let cowork = cowork_runs.then(|| {
        let (section, complete) = crate::cowork::render(
            &outputs_of(&result, &[COWORK_CASE, COWORK_COPY_CASE]),
            &run_context(result.mode, paths),
        );
        if !complete {
            missing.push(format!(
                "{COWORK_CASE}, {COWORK_COPY_CASE}: no complete @@COWORK-BENCH and @@COWORK-COPY result"
            ));
        }
        section
    });
    let mut streams = render_streams(&agent_out, &serial_out, mib);
    if let Some(tree) = &shared {
        let (section, fs_missing) = fs_section(&result, &fs_opts, tree, paths);
        streams.push_str(&section);
        missing.extend(fs_missing);
    }
    if let Some(section) = &egress {
        streams.push('\n');
        streams.push_str(section);
    }
    if let Some(section) = &cowork {
        streams.push('\n');
        streams.push_str(section);
    }
    streams.push_str(&host);
    streams.push_str(&rerun_note(&result));
    if runs == 0 {
        let report =
            format!("# Stream benchmark: coworkvm agent vs QEMU virtio-serial\n\n{streams}");
        return write_results(&out, &report, &missing);
    }
    let case = result.case("bench");
    let cw = parse_samples(&case.output, "coworkvm");
    let qm = parse_samples(&case.output, "qemu");
    let unconfined = parse_samples(&case.output, "unconfined");
    let base = parse_samples(&case.output, "baseline");
    let mut counts = vec![
        ("coworkvm", cw.len()),
        ("qemu", qm.len()),
        ("coworkvm --no-sandbox", unconfined.len()),
    ];
    if baseline.is_some() {
        counts.push(("baseline", base.len()));
    }
    for (vmm, got) in counts {
        if got < runs as usize {
            missing.push(format!("bench: {got} of {runs} {vmm} boot samples"));
        }
    }
    if cw.is_empty() || qm.is_empty() {
        bail!(
            "no samples (coworkvm {}, qemu {}), {} kept as it was; output:\n{}",
            cw.len(),
            qm.len(),
            out.display(),
            case.output
        );
    }
    let mut report = render(&cw, &qm, &result, paths)?;
    report.push_str(&render_sandbox_cost(&cw, &unconfined)?);
    if let Some(name) = &baseline {
        report.push_str(&render_baseline(&cw, &base, name)?);
    }
    report.push_str(&streams);
    write_results(&out, &report, &missing)
}

/// `--fs-only`: the shared-folder cases alone, in one batch; their
/// section replaces the one in `out` (the rest of the file stays), or is
/// added to it.
fn run_fs_only(paths: &Paths, scratch: &Path, opts: &fs::Options, out: &Path) -> Result<()> {
    if opts.runs == 0 {
        bail!("--fs-only measures shared folders: it needs --fs-runs 1 or more");
    }
    let existing = match std::fs::read_to_string(out) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    let p = fs::prepare(paths, scratch, opts, 0)?;
    let mut files = p.files.clone();
    files.extend(crate::qemu::payload()?);
    let batch = Batch {
        cases: p.cases.clone(),
        files,
        disks: vec![p.disk.clone()],
    };
    let result = batch.run(paths)?;
    let mut missing = unfinished_cases(&result);
    let (mut section, fs_missing) = fs_section(&result, opts, &p.tree, paths);
    missing.extend(fs_missing);
    section.push_str(&rerun_note(&result));
    write_results(out, &fs::splice_section(&existing, &section), &missing)
}

/// The egress case's name.
const EGRESS_CASE: &str = "egress";

/// How the egress benchmark is sized: `--egress-mib` (256) per download,
/// `--egress-connects` (100) CONNECT set-ups.
#[derive(Debug, Clone)]
pub struct EgressOptions {
    pub mib: u64,
    pub connects: usize,
}

impl Default for EgressOptions {
    fn default() -> Self {
        Self {
            mib: 256,
            connects: 100,
        }
    }
}

impl EgressOptions {
    pub fn validate(&self) -> Result<()> {
        if !(1..=4096).contains(&self.mib) {
            bail!("--egress-mib {}: 1 to 4096", self.mib);
        }
        if !(1..=10_000).contains(&self.connects) {
            bail!("--egress-connects {}: 1 to 10000", self.connects);
        }
        Ok(())
    }

    /// The case (disks: the images, then a bundle disk). Its time-out: a
    /// boot, three proxied downloads and one direct at 1 MiB/s or better
    /// under TCG, and a second per CONNECT.
    pub fn case(&self) -> Case {
        let secs = 600 + 4 * self.mib + self.connects as u64;
        Case::new(
            EGRESS_CASE,
            &crate::egress::bench_case_script(self.mib, self.connects),
            secs,
        )
    }
}

/// One benchmark case alone in one batch, on the images disk, a bundle
/// disk of `bundle_mib` and `extra_disks`; the section `render` makes of
/// its output replaces the one under `heading` in `out`, or is added.
#[allow(clippy::too_many_arguments)]
fn run_section_only(
    paths: &Paths,
    scratch: &Path,
    cases: Vec<Case>,
    bundle_mib: u64,
    extra_disks: Vec<PathBuf>,
    render: fn(&str, &str) -> (String, bool),
    heading: &str,
    out: &Path,
) -> Result<()> {
    let existing = match std::fs::read_to_string(out) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    let images = crate::images::images_dir(&paths.root)?;
    let images_disk = crate::images::images_disk(&images, scratch, false)?;
    let bundle = scratch.join("bundle.ext4");
    crate::images::ext4_image(&bundle, None, bundle_mib)?;
    let names: Vec<String> = cases.iter().map(|c| c.name.clone()).collect();
    let mut disks = vec![images_disk, bundle];
    disks.extend(extra_disks);
    let batch = Batch {
        cases,
        files: vec![],
        disks,
    };
    let result = batch.run(paths)?;
    let mut missing = unfinished_cases(&result);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (mut section, complete) = render(
        &outputs_of(&result, &names),
        &run_context(result.mode, paths),
    );
    if !complete {
        missing.push(format!("{}: no complete result", names.join(", ")));
    }
    section.push_str(&rerun_note(&result));
    let spliced = fs::splice_named(&existing, heading, &section);
    write_results(out, &spliced, &missing)
}

/// `--egress-only`: the egress case alone in one batch (with the images
/// and a bundle disk); its section replaces the one in `out`, or is added.
fn run_egress_only(paths: &Paths, scratch: &Path, opts: &EgressOptions, out: &Path) -> Result<()> {
    run_section_only(
        paths,
        scratch,
        vec![opts.case()],
        3072,
        vec![],
        crate::egress::render,
        crate::egress::SECTION_HEADING,
        out,
    )
}

/// The Cowork cases' names: the share rounds, the copies.
const COWORK_CASE: &str = "cowork";
const COWORK_COPY_CASE: &str = "cowork-copy";

/// The output of the cases `names` of `result`, one after the other.
fn outputs_of(result: &crate::BatchResult, names: &[&str]) -> String {
    names
        .iter()
        .map(|n| result.case(n).output.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The bundle disk's size: the Cowork cases' bundle also holds a copy of
/// the runtime in its session disk per copy install (all in one VM, and
/// the guest removes old versions only when it starts).
fn bundle_disk_mib(cowork: bool) -> u64 {
    if cowork {
        8192
    } else {
        3072
    }
}

/// How the Cowork benchmark is sized: `--cowork-runs` (5) rounds, and as
/// many installs by copy.
#[derive(Debug, Clone)]
pub struct CoworkOptions {
    pub runs: usize,
}

impl Default for CoworkOptions {
    fn default() -> Self {
        Self { runs: 5 }
    }
}

impl CoworkOptions {
    /// 0 leaves the case out of the full run; `--cowork-only` needs one.
    pub fn validate(&self, only: bool) -> Result<()> {
        if only && self.runs == 0 {
            bail!("--cowork-only measures a Cowork session: it needs --cowork-runs 1 or more");
        }
        if self.runs > 20 {
            bail!("--cowork-runs {}: 0 to 20", self.runs);
        }
        Ok(())
    }

    /// The cases, the share rounds and the copies, with the runtime disk
    /// at `$DISK<sdk_disk>` (the images are `$DISK0`, the bundle disk
    /// `$DISK1`).
    pub fn cases(&self, sdk_disk: usize) -> Vec<Case> {
        vec![
            Case::new(
                COWORK_CASE,
                &crate::cowork::bench_case_script(self.runs, sdk_disk),
                crate::cowork::bench_timeout_s(self.runs),
            ),
            Case::new(
                COWORK_COPY_CASE,
                &crate::cowork::copy_case_script(self.runs, sdk_disk),
                crate::cowork::copy_timeout_s(self.runs),
            ),
        ]
    }

    /// The runtime (fetched once into the build directory) on its disk,
    /// with a version name per copy install.
    pub fn runtime_disk(&self, paths: &Paths, scratch: &Path) -> Result<PathBuf> {
        let claude = crate::runtime::fetch(&crate::build_dir(&paths.root))
            .context("the Cowork benchmark's runtime (--cowork-runs 0 leaves the case out)")?;
        crate::cowork::runtime_disk(&claude, scratch, &crate::cowork::copy_versions(self.runs))
    }
}

/// `--cowork-only`: the Cowork case alone in one batch (the images, a
/// bundle disk, the runtime disk); its section replaces the one in `out`,
/// or is added.
fn run_cowork_only(paths: &Paths, scratch: &Path, opts: &CoworkOptions, out: &Path) -> Result<()> {
    let runtime = opts.runtime_disk(paths, scratch)?;
    run_section_only(
        paths,
        scratch,
        opts.cases(2),
        bundle_disk_mib(true),
        vec![runtime],
        crate::cowork::render,
        crate::cowork::SECTION_HEADING,
        out,
    )
}

/// The shared-folder section from a batch that ran [`fs::prepare`]'s
/// cases, and the runs and figures missing from it.
fn fs_section(
    result: &crate::BatchResult,
    opts: &fs::Options,
    tree: &fs::SourceTree,
    paths: &Paths,
) -> (String, Vec<String>) {
    let outputs: Vec<String> = (0..opts.runs)
        .map(|r| result.case(&fs::case_name(r)).output.clone())
        .collect();
    let (by_label, missing) = fs::collect(&outputs, opts, tree);
    let section = fs::render(&by_label, opts, tree, &run_context(result.mode, paths));
    (section, missing)
}

/// The first words of a section: when, where, on what.
fn run_context(mode: crate::Mode, paths: &Paths) -> String {
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
    format!(
        "{date}; mode **{mode:?}** ({}); host CPU {host_cpu}; guest kernel {}",
        match mode {
            crate::Mode::L1 => "both VMMs run inside the L1 VM under QEMU TCG, on its emulated SVM",
            crate::Mode::Direct => "both VMMs run directly on the host's KVM",
        },
        paths.kernel_release,
    )
}

/// Name under `$P` of the `--baseline` binary in the rig.
const BASELINE_PAYLOAD: &str = "coworkvm-baseline";

/// The boot loop: per run, `coworkvm boot` (sandboxed), `--no-sandbox` and
/// QEMU microvm, each timed to the marker by vmm-timer; with a baseline,
/// the baseline binary's sandboxed `boot` too (same flags), and the two
/// sandboxed boots swap places every other run, so neither always follows
/// the same neighbour.
pub fn boot_loop_script(runs: u32, baseline: bool) -> String {
    let order = if baseline {
        "  if [ $((i % 2)) = 1 ]; then\n    sample coworkvm $COWORKVM\n    \
         sample baseline $P/{BASELINE_PAYLOAD}\n  else\n    \
         sample baseline $P/{BASELINE_PAYLOAD}\n    sample coworkvm $COWORKVM\n  fi\n"
            .replace("{BASELINE_PAYLOAD}", BASELINE_PAYLOAD)
    } else {
        "  sample coworkvm $COWORKVM\n".to_string()
    };
    format!(
        r#"set -u
dd if=/dev/zero of=$TMPDIR/ro.img bs=1M count=16 2>/dev/null
QEMU="{qemu}"
# sample NAME BINARY [FLAGS...]: one `BINARY boot` to the marker.
sample() {{
  name=$1; bin=$2; shift 2
  s=$($VMM_TIMER --marker {MARKER} --timeout 120 -- $bin boot "$@" --kernel $KERNEL \
      --initrd $P/bench.cpio.zst --disk $TMPDIR/ro.img,ro --cpus 1 --mem 256 --cmdline quiet \
      | grep '^@@VMM-TIMER' | cut -d' ' -f2-)
  echo "@@SAMPLE $name $s"
}}
for i in $(seq 1 {runs}); do
{order}  sample unconfined $COWORKVM --no-sandbox
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
    )
}

/// The cases of `result` that did not finish with status 0, each with why.
pub fn unfinished_cases(result: &crate::BatchResult) -> Vec<String> {
    result
        .cases
        .iter()
        .filter(|c| !c.passed())
        .map(|c| match c.rc {
            None => format!("{}: did not finish", c.name),
            Some(rc) => format!("{}: exit status {rc}", c.name),
        })
        .collect()
}

/// A line for the report when the rig reran cases after a hung L1.
fn rerun_note(result: &crate::BatchResult) -> String {
    if result.rerun.is_empty() {
        return String::new();
    }
    format!(
        "\nRig: {} ran a second time, in a fresh L1, after the first one hung ({}).\n",
        result.rerun.join(", "),
        result.hangs.join("; ")
    )
}

/// Prints `report` and writes it to `out` (whole, through a rename) when
/// nothing is `missing`; otherwise `out` keeps the previous run's results
/// and the error names what is missing. A partial table must never replace
/// a complete one.
pub fn write_results(out: &Path, report: &str, missing: &[String]) -> Result<()> {
    print!("{report}");
    if !missing.is_empty() {
        bail!(
            "incomplete benchmark run, {} not written (it keeps the previous results); \
             missing: {}",
            out.display(),
            missing.join("; ")
        );
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = out.with_extension("md.tmp");
    std::fs::write(&tmp, report).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    eprintln!("bench: written to {}", out.display());
    Ok(())
}

/// Payload of each stream direction, the same for both paths.
pub const STREAM_MIB: u64 = 64;

/// The `@@TAG {json}` lines of a case's output.
pub fn tagged(output: &str, tag: &str) -> Vec<serde_json::Value> {
    let prefix = format!("{tag} ");
    output
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(&prefix))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect()
}

/// The agent path (`coworkvm boot` with the agent, driven over vsock by
/// agent-probe exactly as the helper drives it) next to the same payloads
/// over QEMU microvm's virtio-serial.
pub fn render_streams(agent: &[String], serial: &[String], mib: u64) -> String {
    let mut s = String::from("## Streams: the agent path vs QEMU virtio-serial\n\n");
    let a: Vec<_> = agent.iter().flat_map(|o| tagged(o, "@@BENCH")).collect();
    let q: Vec<_> = serial
        .iter()
        .flat_map(|o| tagged(o, "@@BENCH-SERIAL"))
        .collect();
    for (name, outs, got) in [
        ("agent", agent, a.len()),
        ("virtio-serial", serial, q.len()),
    ] {
        if got < outs.len() {
            s.push_str(&format!(
                "{} of {} {name} runs gave no result; the output of the runs:\n\n```\n{}\n```\n\n",
                outs.len() - got,
                outs.len(),
                outs.join("\n----\n").trim_end()
            ));
        }
    }
    let med = |v: &[serde_json::Value], k: &str| {
        stats(&v.iter().filter_map(|x| x[k].as_f64()).collect::<Vec<_>>()).map(|s| s.median)
    };
    let _ = writeln!(
        s,
        "Both guests: the same kernel, 2 vCPUs, 512 MiB, busybox. coworkvm: `coworkvm boot` with \
         the agent initramfs; agent-probe speaks the guest protocol over the vsock socket \
         (length-prefixed JSON, stdout as `data` strings). QEMU: `-M microvm` with \
         `virtio-serial-device` and a `virtserialport` on a `-chardev socket`, raw bytes. \
         Payload {mib} MiB each way: guest to host, `yes <63 a> | head -c {mib}M` (a spawned \
         process's stdout / written into the port); host to guest, 64 KiB writes (stdin \
         notifications / raw into the port, read by `head -c | wc -c`). Times \
         are the host's, from the request to the last byte (or the guest's count). \
         {} run(s) each, alternating; medians.\n",
        a.len().max(q.len())
    );
    let _ = writeln!(s, "{}", stdin_pacing_note(&a));
    let _ = writeln!(
        s,
        "| metric | coworkvm agent (vsock) | QEMU virtio-serial | coworkvm / QEMU |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for (name, k, unit, digits) in [
        ("VMM start to guest ready", "ready_ms", "ms", 0),
        ("guest to host (stdout)", "stdout_mib_s", "MiB/s", 1),
        ("host to guest (stdin)", "stdin_mib_s", "MiB/s", 1),
    ] {
        let f = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.digits$} {unit}"));
        let (x, y) = (med(&a, k), med(&q, k));
        let ratio = match (x, y) {
            (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
            _ => "n/a".into(),
        };
        let _ = writeln!(s, "| {name} | {} | {} | {ratio} |", f(x), f(y));
    }
    if let (Some(m), Some(lo), Some(hi)) = (
        med(&a, "spawn_first_stdout_median_us"),
        med(&a, "spawn_first_stdout_min_us"),
        med(&a, "spawn_first_stdout_max_us"),
    ) {
        let _ = writeln!(
            s,
            "\nAgent only: spawn request to first stdout event (`echo x`, 100 runs): median \
             {:.1} ms (min {:.1}, max {:.1}).",
            m / 1000.0,
            lo / 1000.0,
            hi / 1000.0
        );
    }
    let sa: Vec<_> = agent
        .iter()
        .flat_map(|o| tagged(o, "@@BENCH-SPLIT"))
        .collect();
    let sq: Vec<_> = serial
        .iter()
        .flat_map(|o| tagged(o, "@@BENCH-SPLIT"))
        .collect();
    if !sa.is_empty() || !sq.is_empty() {
        let _ = writeln!(
            s,
            "\nWhere the guest-to-host transfer's CPU time went (ms, host clock, first run; \
             in the rig every thread shares L1's one vCPU). vCPU threads include the guest's \
             time; the guest's own accounting of the agent (PID 1) and of all its CPUs is \
             shown where there is an agent.\n"
        );
        let _ = writeln!(
            s,
            "| path | wall | vCPU threads | vsock worker | rest of the VMM | host reader | guest: agent | guest: all busy | VM exits | frames |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        let cell = |v: &serde_json::Value, k: &str| {
            v[k].as_u64().map_or("-".to_string(), |n| n.to_string())
        };
        for (name, v) in [
            ("coworkvm agent", sa.first()),
            ("QEMU virtio-serial", sq.first()),
        ] {
            if let Some(v) = v {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    cell(v, "wall"),
                    cell(v, "vmm_vcpus"),
                    cell(v, "vmm_vsock_worker"),
                    cell(v, "vmm_other"),
                    cell(v, "host_reader"),
                    cell(v, "guest_agent"),
                    cell(v, "guest_busy"),
                    cell(v, "vm_exits"),
                    cell(v, "frames"),
                );
            }
        }
    }
    s.push('\n');
    s
}

/// How the agent path's stdin was paced, from the probe's `@@BENCH`
/// lines: the agent refuses (with an `error` event) a chunk past 64 chunks
/// or 16 MiB of unread stdin per process, and `stdin` is a notification with
/// no answer, so the probe paces itself on the reader's acknowledgements.
pub fn stdin_pacing_note(agent: &[serde_json::Value]) -> String {
    let Some(v) = agent.iter().find(|v| v["stdin_window_kib"].is_u64()) else {
        return String::new();
    };
    let (window, ack) = (
        v["stdin_window_kib"].as_u64().unwrap_or(0),
        v["stdin_ack_kib"].as_u64().unwrap_or(0),
    );
    format!(
        "Stdin pacing on the agent path: the agent holds at most 64 chunks or 16 MiB of a \
         process's unread stdin and refuses more (an `error` event; `stdin` is a notification \
         without an answer), so agent-probe keeps at most {} unacknowledged: the guest's \
         reader, `dd bs=64K count={} iflag=fullblock` in a shell loop, prints a count after \
         each {} it has read, and the probe sends the next chunk only when that count says \
         the window has room. The time runs to the reader's exit after the last byte. The \
         virtio-serial path needs no pacing: the port's own flow control stops QEMU's \
         socket.\n",
        kib_text(window),
        ack / 64,
        kib_text(ack),
    )
}

fn kib_text(kib: u64) -> String {
    if kib % 1024 == 0 {
        format!("{} MiB", kib / 1024)
    } else {
        format!("{kib} KiB")
    }
}

fn render(
    cw: &[Sample],
    qm: &[Sample],
    result: &crate::BatchResult,
    paths: &Paths,
) -> Result<String> {
    let mut s = String::new();
    writeln!(s, "# Boot benchmark: coworkvm vs QEMU microvm\n")?;
    writeln!(
        s,
        "{}; {} runs each, alternating.\n",
        run_context(result.mode, paths),
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

/// The VMM sandbox's cost: the same boots with the sandbox (the default)
/// and with `--no-sandbox`, alternating in the same loop as the QEMU runs.
fn render_sandbox_cost(sandboxed: &[Sample], unconfined: &[Sample]) -> Result<String> {
    let mut s = String::new();
    writeln!(s, "## The VMM sandbox's cost\n")?;
    writeln!(
        s,
        "The boot above, `coworkvm boot` as the helper runs it (sandboxed: no_new_privs, \
         rlimits, namespaces, Landlock, a seccomp filter per thread) against `coworkvm boot \
         --no-sandbox`, {} runs each, alternating in the same loop.\n",
        sandboxed.len().min(unconfined.len())
    )?;
    s.push_str(&ratio_table(
        ("sandboxed", "--no-sandbox", "sandboxed / unconfined"),
        sandboxed,
        unconfined,
    )?);
    Ok(s)
}

/// This build against an earlier one (`--baseline`): both binaries'
/// sandboxed `boot`, same flags, alternating in the same loop.
fn render_baseline(new: &[Sample], baseline: &[Sample], name: &str) -> Result<String> {
    let mut s = String::new();
    writeln!(s, "## This build against a baseline\n")?;
    writeln!(
        s,
        "The boot above, `coworkvm boot` (sandboxed, as the helper runs it) of this build \
         against the same command of the baseline binary ({name}), same kernel, initramfs, \
         disk and flags, {} runs each, alternating in the same loop (the two swap order \
         every other run). A ratio near 1.00 is no change; the min-max ranges show the \
         noise.\n",
        new.len().min(baseline.len())
    )?;
    s.push_str(&ratio_table(
        ("new", "baseline", "new / baseline"),
        new,
        baseline,
    )?);
    s.push_str(&paired_times(new, baseline));
    Ok(s)
}

/// The two sandboxed boots of one run are neighbours in time, so a busy
/// stretch of the host slows both: the per-run ratios of their times to
/// the marker show a change apart from that noise. The i-th samples of
/// both are of the same run when neither lost one (a failed boot leaves
/// the run incomplete, and then its results are not written); otherwise
/// there is no pairing to show.
fn paired_times(new: &[Sample], baseline: &[Sample]) -> String {
    if new.is_empty() || new.len() != baseline.len() {
        return String::new();
    }
    let ratios: Vec<f64> = new
        .iter()
        .zip(baseline)
        .map(|(a, b)| a.marker_ms as f64 / b.marker_ms.max(1) as f64)
        .collect();
    let faster = new
        .iter()
        .zip(baseline)
        .filter(|(a, b)| a.marker_ms < b.marker_ms)
        .count();
    let Some(r) = stats(&ratios) else {
        return String::new();
    };
    format!(
        "Paired by run (the two boots of a run are neighbours, so a busy stretch of the host \
         slows both): new / baseline time to marker, median of the {n} per-run ratios \
         **{:.2}** (min {:.2}, max {:.2}); the new binary was the faster in {faster} of {n} \
         runs.\n\n",
        r.median,
        r.min,
        r.max,
        n = ratios.len()
    )
}

/// Time to marker, VM exits and peak RSS of two sets of boots: median
/// (min-max) of each and the ratio of the medians.
fn ratio_table(
    (a_name, b_name, ratio_name): (&str, &str, &str),
    a: &[Sample],
    b: &[Sample],
) -> Result<String> {
    let mut s = String::new();
    writeln!(
        s,
        "| metric | {a_name} median (min-max) | {b_name} median (min-max) | {ratio_name} |"
    )?;
    writeln!(s, "|---|---|---|---|")?;
    type Metric = fn(&Sample) -> Option<f64>;
    let rows: [(&str, &str, Metric); 3] = [
        ("time to marker", "ms", |x| Some(x.marker_ms as f64)),
        ("VM exits to marker", "", |x| x.vm_exits.map(|e| e as f64)),
        ("peak RSS", "MiB", |x| Some(x.max_rss_kib as f64 / 1024.0)),
    ];
    for (name, unit, get) in rows {
        let x: Vec<f64> = a.iter().filter_map(get).collect();
        let y: Vec<f64> = b.iter().filter_map(get).collect();
        match (stats(&x), stats(&y)) {
            (Some(x), Some(y)) => writeln!(
                s,
                "| {name} | {:.0} {unit} ({:.0}-{:.0}) | {:.0} {unit} ({:.0}-{:.0}) | {:.2} |",
                x.median,
                x.min,
                x.max,
                y.median,
                y.min,
                y.max,
                x.median / y.median
            )?,
            _ => writeln!(s, "| {name} | n/a | n/a | n/a |")?,
        }
    }
    writeln!(s)?;
    Ok(s)
}

/// The images, measured on the host: a rebuild with the Debian tree cached
/// (a new release tag forces everything after mmdebstrap), the sizes, and
/// bundle expansion (`coworkvm bundle prepare`: seed copy, streaming zstd
/// decode, SHA-256 check, fsync, rename) against `zstd -d` of the same file,
/// alternating, 3 runs each.
pub fn images_section(paths: &Paths) -> Result<String> {
    use std::process::Command;
    use std::time::Instant;
    let images = crate::images::images_dir(&paths.root)?;
    let scratch = std::env::temp_dir().join(format!("coworkvm-imgbench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let release = paths.root.join("target/release/coworkvm-rootfs");
    let agent = paths
        .root
        .join("target/x86_64-unknown-linux-gnu/release/coworkvm-agent");
    let t = Instant::now();
    let st = Command::new(&release)
        .args(["build", "--out"])
        .arg(scratch.join("img"))
        .arg("--kernel-dir")
        .arg(paths.build.join("kernel"))
        .arg("--agent")
        .arg(&agent)
        .arg("--cache-dir")
        .arg(paths.build.join("cache"))
        .args(["--version-tag", &format!("bench-{}", std::process::id())])
        .output()?;
    if !st.status.success() {
        bail!(
            "coworkvm-rootfs build: {}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    let warm_build = t.elapsed().as_secs_f64();
    let m: socket_proto::manifest::Manifest =
        serde_json::from_slice(&std::fs::read(images.join("manifest.json"))?)?;
    let size = |f: &str| m.file(f).map_or(0, |e| e.size);
    let img_mb = size("rootfs.img") as f64 / 1e6;
    let (mut ours, mut zstd) = (Vec::new(), Vec::new());
    for i in 0..3 {
        let b = scratch.join(format!("bundle{i}"));
        let t = Instant::now();
        let o = Command::new(&paths.coworkvm)
            .args(["bundle", "prepare"])
            .arg(&b)
            .arg("--images")
            .arg(&images)
            .output()?;
        if !o.status.success() {
            bail!(
                "coworkvm bundle prepare: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        ours.push(img_mb / t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&b);
        let t = Instant::now();
        let o = Command::new("zstd")
            .args(["-q", "-d", "-f", "--long=31", "-o"])
            .arg(scratch.join("z.img"))
            .arg(images.join("rootfs.img.zst"))
            .output()?;
        if !o.status.success() {
            bail!("zstd -d: {}", String::from_utf8_lossy(&o.stderr));
        }
        zstd.push(img_mb / t.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(scratch.join("z.img"));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let (a, b) = (
        stats(&ours).map_or(0.0, |s| s.median),
        stats(&zstd).map_or(0.0, |s| s.median),
    );
    let mut s = String::new();
    writeln!(s, "\n## Guest images (host)\n")?;
    writeln!(
        s,
        "Rebuild with the Debian tree cached (new release tag: unpack, mkfs.ext4 -d, inode \
         time reset, e2fsck, zstd, initrd, manifest): **{warm_build:.1} s**. Sizes: `rootfs.img` {:.0} MiB, \
         `rootfs.img.zst` {:.1} MiB, `initrd.img` {:.1} MiB, `vmlinuz` {:.1} MiB.\n",
        size("rootfs.img") as f64 / 1048576.0,
        size("rootfs.img.zst") as f64 / 1048576.0,
        size("initrd.img") as f64 / 1048576.0,
        size("vmlinuz") as f64 / 1048576.0,
    )?;
    writeln!(
        s,
        "| expansion of rootfs.img.zst (median of 3) | MB/s of rootfs.img |"
    )?;
    writeln!(s, "|---|---|")?;
    writeln!(
        s,
        "| `coworkvm bundle prepare` (seed copy + decode + SHA-256 + fsync + rename) | {a:.0} |"
    )?;
    writeln!(s, "| `zstd -d --long=31` (decode only) | {b:.0} |")?;
    writeln!(s, "| ratio | {:.2} |", if b > 0.0 { a / b } else { 0.0 })?;
    Ok(s)
}

/// `isRunning` round trips on one pipe to a helper on the host (no VM).
pub fn helper_rtt_section(paths: &Paths) -> Result<String> {
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(format!("coworkvm-rtt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("run/h.sock");
    let mut helper = Command::new(&paths.coworkvm)
        .args(["serve", "--socket"])
        .arg(&sock)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()?;
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = Command::new(&paths.client_probe)
        .args(["--rtt", "10000"])
        .arg(&sock)
        .output();
    let _ = helper.kill();
    let _ = helper.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = tagged(&text, "@@HELPER-RTT")
        .into_iter()
        .next()
        .with_context(|| format!("client-probe --rtt: {text}"))?;
    Ok(format!(
        "\n## Helper (host, no VM)\n\n`isRunning` round trip over one persistent pipe, 10,000 \
         requests: median **{} µs**, p95 {} µs, max {} µs.\n",
        v["median_us"], v["p95_us"], v["max_us"]
    ))
}

/// The rig case of the helper benchmark: `coworkvm serve` boots a bundle
/// 10 times (startVM to isGuestConnected true, spawn to first stdout).
pub const HELPER_CASE: &str = r#"mkdir -p $TMPDIR/images /bundle
mount -o ro $DISK0 $TMPDIR/images || exit 90
mount $DISK1 /bundle || exit 91
export COWORKVM_IMAGES=$TMPDIR/images HOME=$TMPDIR/home
mkdir -p $TMPDIR/run && chmod 700 $TMPDIR/run
$COWORKVM serve --socket $TMPDIR/run/h.sock 2> $TMPDIR/h.log &
H=$!
i=0; while [ ! -S $TMPDIR/run/h.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
$CLIENT_PROBE --bench 10 $TMPDIR/run/h.sock /bundle/b
kill $H; wait $H
tail -n 5 $TMPDIR/h.log
"#;

/// Renders the helper case's `@@HELPER-BENCH` line.
pub fn render_helper(output: &str) -> String {
    let Some(v) = tagged(output, "@@HELPER-BENCH").into_iter().next() else {
        return format!(
            "\n## Helper with real VMs\n\nNo result; the case's output:\n\n```\n{}\n```\n",
            output.trim_end()
        );
    };
    let nums = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    };
    let p95 = |mut x: Vec<f64>| -> f64 {
        x.sort_by(|a, b| a.total_cmp(b));
        x.get((x.len() * 95).div_ceil(100).saturating_sub(1))
            .copied()
            .unwrap_or(0.0)
    };
    let c = nums("connect_ms");
    let f = nums("first_stdout_us");
    format!(
        "\n## Helper with real VMs\n\n`coworkvm serve` in the same batch, driven like the client \
         (`client-probe --bench 10`): 10 times startVM, poll `isGuestConnected` every 50 ms, \
         spawn `echo x` in a sandboxed session, first stdout event, stopVM. Guest: the Debian \
         rootfs bundle, 1 GiB, the helper's default 2 vCPUs (the probe, like the client, sends no `cpuCount`).\n\n| metric | median | p95 | min-max |\n|---|---|---|---|\n\
         | startVM to isGuestConnected true | {:.0} ms | {:.0} ms | {:.0}-{:.0} ms |\n\
         | spawn to first stdout event | {:.0} ms | {:.0} ms | {:.0}-{:.0} ms |\n\n\
         The bundle is new, so the first start also seeds it, expands \
         `rootfs.img` and makes the identity and the session disk: {:.0} ms; the other \
         starts, median {:.0} ms. Every spawn is the first in its VM: it makes the \
         session's user and directory and starts bubblewrap.\n",
        stats(&c).map_or(0.0, |s| s.median),
        p95(c.clone()),
        stats(&c).map_or(0.0, |s| s.min),
        stats(&c).map_or(0.0, |s| s.max),
        stats(&f).map_or(0.0, |s| s.median) / 1000.0,
        p95(f.clone()) / 1000.0,
        stats(&f).map_or(0.0, |s| s.min) / 1000.0,
        stats(&f).map_or(0.0, |s| s.max) / 1000.0,
        c.first().copied().unwrap_or(0.0),
        stats(c.get(1..).unwrap_or_default()).map_or(0.0, |s| s.median),
    )
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

    #[test]
    fn sandbox_cost_is_a_ratio_of_medians() {
        let sample = |ms, exits| Sample {
            marker_ms: ms,
            vm_exits: Some(exits),
            max_rss_kib: 4096,
        };
        let table = render_sandbox_cost(
            &[sample(110, 50), sample(130, 50), sample(120, 52)],
            &[sample(100, 50), sample(100, 50)],
        )
        .unwrap();
        assert!(table.contains("| time to marker | 120 ms (110-130) | 100 ms (100-100) | 1.20 |"));
        assert!(table.contains("| peak RSS | 4 MiB (4-4) | 4 MiB (4-4) | 1.00 |"));
        assert!(table.contains("2 runs each"));
        let empty = render_sandbox_cost(&[], &[]).unwrap();
        assert!(empty.contains("| time to marker | n/a | n/a | n/a |"));
    }

    #[test]
    fn baseline_table_is_new_over_baseline() {
        let sample = |ms, rss| Sample {
            marker_ms: ms,
            vm_exits: Some(3800),
            max_rss_kib: rss,
        };
        let table = render_baseline(
            &[
                sample(8000, 115_712),
                sample(8200, 115_712),
                sample(7900, 116_736),
            ],
            &[sample(8100, 115_712), sample(8000, 115_712)],
            "65c5c8b",
        )
        .unwrap();
        assert!(table.contains("(65c5c8b)"), "{table}");
        assert!(
            table.contains(
                "| metric | new median (min-max) | baseline median (min-max) | new / baseline |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| time to marker | 8000 ms (7900-8200) | 8050 ms (8000-8100) | 0.99 |"),
            "{table}"
        );
        assert!(
            table.contains("| VM exits to marker | 3800  (3800-3800) | 3800  (3800-3800) | 1.00 |"),
            "{table}"
        );
        assert!(
            table.contains("| peak RSS | 113 MiB (113-114) | 113 MiB (113-113) | 1.00 |"),
            "{table}"
        );
        assert!(table.contains("2 runs each"), "{table}");
        // Unequal counts: no pairing.
        assert!(!table.contains("Paired by run"), "{table}");
        let paired = render_baseline(
            &[sample(9000, 1), sample(6000, 1), sample(11000, 1)],
            &[sample(10000, 1), sample(5000, 1), sample(10000, 1)],
            "old",
        )
        .unwrap();
        assert!(
            paired.contains("median of the 3 per-run ratios **1.10** (min 0.90, max 1.20)"),
            "{paired}"
        );
        assert!(paired.contains("faster in 1 of 3 runs"), "{paired}");
    }

    /// The boot loop, run by sh with a stand-in for vmm-timer that names
    /// the binary it was given: each binary's samples carry its own name,
    /// the baseline runs once per run, and the two sandboxed boots swap.
    #[test]
    fn boot_loop_samples_each_binary_under_its_own_name() {
        let dir = crate::Scratch::new("bench-loop").unwrap();
        let timer = dir.path.join("timer");
        std::fs::write(
            &timer,
            "#!/bin/sh\nshift 5\ncase $1 in */coworkvm-baseline) ms=2;; */new) ms=1;; *) ms=3;; esac\n\
             case \"$*\" in *--no-sandbox*) ms=4;; esac\n\
             echo \"@@VMM-TIMER {\\\"marker_ms\\\": $ms, \\\"vm_exits\\\": null, \\\"max_rss_kib\\\": 1}\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&timer, std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = |baseline| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(boot_loop_script(3, baseline))
                .env("TMPDIR", &dir.path)
                .env("VMM_TIMER", &timer)
                .env("COWORKVM", "/x/new")
                .env("P", "/payload")
                .env("KERNEL", "/payload/vmlinuz")
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let out = run(true);
        let ms = |name| -> Vec<u64> {
            parse_samples(&out, name)
                .iter()
                .map(|s| s.marker_ms)
                .collect()
        };
        assert_eq!(ms("coworkvm"), [1, 1, 1], "{out}");
        assert_eq!(ms("baseline"), [2, 2, 2], "{out}");
        assert_eq!(ms("unconfined"), [4, 4, 4], "{out}");
        assert_eq!(ms("qemu"), [3, 3, 3], "{out}");
        let order: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("@@SAMPLE "))
            .filter_map(|l| l.split(' ').next())
            .filter(|n| *n == "coworkvm" || *n == "baseline")
            .collect();
        assert_eq!(
            order,
            ["coworkvm", "baseline", "baseline", "coworkvm", "coworkvm", "baseline"]
        );
        let out = run(false);
        assert!(parse_samples(&out, "baseline").is_empty(), "{out}");
        assert_eq!(parse_samples(&out, "coworkvm").len(), 3, "{out}");
    }

    #[test]
    fn the_stdin_pacing_is_stated_from_the_probe_result() {
        let v = serde_json::json!({"stdin_window_kib": 3072, "stdin_ack_kib": 1024});
        let note = stdin_pacing_note(&[v]);
        assert!(note.contains("at most 3 MiB unacknowledged"), "{note}");
        assert!(
            note.contains("`dd bs=64K count=16 iflag=fullblock`"),
            "{note}"
        );
        assert!(note.contains("after each 1 MiB it has read"), "{note}");
        assert_eq!(
            stdin_pacing_note(&[serde_json::json!({"stdin_mib_s": 6.0})]),
            ""
        );
    }

    fn result_of(cases: &[(&str, Option<i32>)]) -> crate::BatchResult {
        crate::BatchResult {
            mode: crate::Mode::L1,
            cases: cases
                .iter()
                .map(|(n, rc)| crate::CaseResult {
                    name: n.to_string(),
                    rc: *rc,
                    output: String::new(),
                })
                .collect(),
            console: String::new(),
            retried: false,
            wall: std::time::Duration::ZERO,
            l1_up: None,
            l1_uptime_at_up: None,
            rerun: vec!["agent0".into()],
            hangs: vec!["L1 silent for 60 s during case agent0".into()],
        }
    }

    /// The `make bench` of 2026-11-29: L1 hung after 7 of 10 boot pairs and
    /// the partial tables replaced bench/results.md. Now the file stays.
    #[test]
    fn an_incomplete_run_keeps_the_previous_results() {
        let dir = crate::Scratch::new("bench-out").unwrap();
        let out = dir.path.join("results.md");
        std::fs::write(&out, "previous complete results\n").unwrap();
        let r = result_of(&[("bench", None), ("helper", Some(0)), ("agent0", Some(3))]);
        let missing = unfinished_cases(&r);
        assert_eq!(missing, ["bench: did not finish", "agent0: exit status 3"]);
        let e = write_results(&out, "# partial\n", &missing).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("bench: did not finish"), "{msg}");
        assert!(msg.contains("keeps the previous results"), "{msg}");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "previous complete results\n"
        );
        // A complete run replaces it, and says when cases were rerun.
        let ok = result_of(&[("bench", Some(0))]);
        assert!(unfinished_cases(&ok).is_empty());
        let report = format!("# new\n{}", rerun_note(&ok));
        write_results(&out, &report, &[]).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("# new\n"));
        assert!(
            text.contains("agent0 ran a second time, in a fresh L1"),
            "{text}"
        );
        assert!(!dir.path.join("results.md.tmp").exists());
    }

    #[test]
    fn helper_section_sets_the_first_start_apart() {
        let out = "noise\n@@HELPER-BENCH {\"connect_ms\": [20000, 10000, 12000], \
                   \"first_stdout_us\": [700000, 600000, 650000]}\n";
        let md = render_helper(out);
        assert!(
            md.contains(
                "| startVM to isGuestConnected true | 12000 ms | 20000 ms | 10000-20000 ms |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| spawn to first stdout event | 650 ms | 700 ms | 600-700 ms |"),
            "{md}"
        );
        assert!(md.contains("the first start also seeds it"), "{md}");
        assert!(
            md.contains(": 20000 ms; the other starts, median 11000 ms"),
            "{md}"
        );
        assert!(render_helper("no tag").contains("No result"));
    }
}
