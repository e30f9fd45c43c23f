//! The test rig: runs batches of VM test cases either directly on the host
//! (when its KVM can boot Linux) or inside an "L1" VM under QEMU TCG, whose
//! emulated SVM gives coworkvm a real KVM API where the host's own cannot
//! boot Linux.
//!
//! A case is a POSIX shell script. It finds what it needs in environment
//! variables, the same in both modes:
//! - `COWORKVM`: the coworkvm binary; `VMM_TIMER`: the benchmark timer;
//! - `KERNEL`: the guest kernel; `P`: the directory of payload files;
//! - `DISK0`, `DISK1`, ...: the batch's disks (host files in direct mode,
//!   L1's virtio disks in the rig, so the host can check them afterwards);
//! - `TMPDIR`: scratch space.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use coworkvm_rootfs::initramfs::{self, Compression, InitramfsSpec};

pub mod bench;

/// Modules the guests of the tests load (dependencies come along).
pub const GUEST_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio-rng"];
/// Modules the L1 VM needs: KVM for coworkvm, virtio_blk for its disks.
const L1_MODULES: &[&str] = &["kvm-amd", "kvm-intel", "virtio_blk"];
/// How long the L1 VM may take to boot before its first case.
const L1_BOOT_BUDGET: Duration = Duration::from_secs(90);

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Where the build put everything the rig needs.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub build: PathBuf,
    pub kernel: PathBuf,
    pub kernel_release: String,
    pub module_tree: PathBuf,
    pub busybox: PathBuf,
    pub coworkvm: PathBuf,
    pub vmm_timer: PathBuf,
    pub vsock_probe: PathBuf,
    /// Initramfs with coworkvm-agent as /init.
    pub agent_initrd: PathBuf,
}

impl Paths {
    /// Finds the artifacts of `make build`; an error says what is missing.
    pub fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("workspace root")?
            .to_path_buf();
        let build = root.join("build");
        let release_dir = root.join("target/x86_64-unknown-linux-gnu/release");
        let coworkvm = std::env::var_os("COWORKVM_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| release_dir.join("coworkvm"));
        let version = std::fs::read_to_string(build.join("kernel/version"))
            .context("build/kernel/version missing: run `make kernel`")?;
        let kernel_release = version
            .lines()
            .find_map(|l| l.strip_prefix("release="))
            .context("build/kernel/version has no release= line")?
            .to_owned();
        let p = Self {
            kernel: build.join("kernel/vmlinuz"),
            module_tree: build.join("kernel/modules").join(&kernel_release),
            busybox: build.join("busybox"),
            vmm_timer: release_dir.join("vmm-timer"),
            vsock_probe: release_dir.join("vsock-probe"),
            agent_initrd: build.join("agent-initrd.cpio.zst"),
            kernel_release,
            coworkvm,
            build,
            root,
        };
        for f in [
            &p.kernel,
            &p.busybox,
            &p.coworkvm,
            &p.vmm_timer,
            &p.vsock_probe,
        ] {
            if !f.exists() {
                bail!("{} missing: run `make build`", f.display());
            }
        }
        Ok(p)
    }

    /// Builds a guest initramfs with busybox, the guest modules and `init`.
    pub fn guest_initramfs(&self, init: &Path, out: &Path) -> Result<()> {
        self.guest_initramfs_with(init, out, &[], vec![])
    }

    /// Same, with more modules and extra files (host path, image path).
    pub fn guest_initramfs_with(
        &self,
        init: &Path,
        out: &Path,
        extra_modules: &[&str],
        files: Vec<(PathBuf, String)>,
    ) -> Result<()> {
        let spec = InitramfsSpec {
            init: init.to_owned(),
            busybox: Some(self.busybox.clone()),
            module_tree: Some(self.module_tree.clone()),
            modules: GUEST_MODULES
                .iter()
                .chain(extra_modules)
                .map(|s| s.to_string())
                .collect(),
            files,
            compression: Compression::Zstd,
            mtime: 0,
        };
        initramfs::write(&spec, out).with_context(|| format!("building {}", out.display()))?;
        Ok(())
    }
}

/// Locates the artifacts, or ends the test: a skip outside CI, a failure in it.
pub fn paths_or_skip() -> Option<Paths> {
    match Paths::locate() {
        Ok(p) => Some(p),
        Err(e) if in_ci() => panic!("CI=true and the rig cannot run: {e:#}"),
        Err(e) => {
            eprintln!("skipping VM test: {e:#}");
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The host's KVM boots Linux: run cases directly.
    Direct,
    /// Run cases inside an L1 VM under QEMU TCG.
    L1,
}

/// Picks the mode: `COWORKVM_RIG=l1|direct`, else `coworkvm doctor`.
pub fn detect_mode(paths: &Paths) -> (Mode, String) {
    match std::env::var("COWORKVM_RIG").as_deref() {
        Ok("l1") => return (Mode::L1, "COWORKVM_RIG=l1".into()),
        Ok("direct") => return (Mode::Direct, "COWORKVM_RIG=direct".into()),
        _ => {}
    }
    let out = Command::new(&paths.coworkvm)
        .args(["doctor", "--json"])
        .output();
    let report: Option<serde_json::Value> = out
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok());
    match report {
        Some(r) if r["can_boot_linux"] == true => (
            Mode::Direct,
            format!("host KVM runs ring 0 at {} MIPS", r["ring0_mips"]),
        ),
        Some(r) => (
            Mode::L1,
            format!(
                "host KVM cannot boot Linux ({}); using the L1 rig",
                r["verdict"].as_str().unwrap_or("?")
            ),
        ),
        None => (
            Mode::L1,
            "coworkvm doctor gave no report; using the L1 rig".into(),
        ),
    }
}

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub script: String,
    pub timeout: Duration,
}

impl Case {
    pub fn new(name: &str, script: &str, timeout_s: u64) -> Self {
        Self {
            name: name.into(),
            script: script.into(),
            timeout: Duration::from_secs(timeout_s),
        }
    }
}

#[derive(Debug, Default)]
pub struct Batch {
    pub cases: Vec<Case>,
    /// Payload files: (host path, name under `$P`).
    pub files: Vec<(PathBuf, String)>,
    /// Raw disk images, `$DISK0`, `$DISK1`, ... in the cases.
    pub disks: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    /// Exit status of the case script; None if it never finished.
    pub rc: Option<i32>,
    pub output: String,
}

impl CaseResult {
    /// Lines of the output that start with `prefix`, with the prefix removed.
    pub fn lines_with(&self, prefix: &str) -> Vec<String> {
        self.output
            .lines()
            .filter_map(|l| l.trim_end().strip_prefix(prefix))
            .map(|s| s.trim().to_owned())
            .collect()
    }

    pub fn has_line(&self, line: &str) -> bool {
        self.output.lines().any(|l| l.trim_end() == line)
    }
}

#[derive(Debug)]
pub struct BatchResult {
    pub mode: Mode,
    pub cases: Vec<CaseResult>,
    /// The whole L1 console (or the direct runs' output).
    pub console: String,
    pub retried: bool,
    pub wall: Duration,
}

impl BatchResult {
    pub fn case(&self, name: &str) -> &CaseResult {
        self.cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("case {name} has no result; console:\n{}", self.console))
    }
}

/// Splits an L1 console into case results by the rig's markers.
pub fn parse_console(console: &str, names: &[String]) -> Vec<CaseResult> {
    let mut results = Vec::new();
    let mut current: Option<(String, String)> = None;
    for raw in console.lines() {
        let line = raw.trim_end_matches('\r');
        if let Some(name) = line.strip_prefix("@@RIG-BEGIN ") {
            current = Some((name.trim().to_owned(), String::new()));
        } else if let Some(rest) = line.strip_prefix("@@RIG-END ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap_or_default().to_owned();
            let rc = parts
                .next()
                .and_then(|s| s.strip_prefix("rc="))
                .and_then(|s| s.parse().ok());
            let output = current.take().map(|c| c.1).unwrap_or_default();
            results.push(CaseResult { name, rc, output });
        } else if let Some((_, out)) = current.as_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some((name, output)) = current {
        results.push(CaseResult {
            name,
            rc: None,
            output,
        });
    }
    for n in names {
        if !results.iter().any(|r| &r.name == n) {
            results.push(CaseResult {
                name: n.clone(),
                rc: None,
                output: String::new(),
            });
        }
    }
    results
}

/// Runs `cmd` in its own process group, killing the whole group on time-out
/// (so a stray grandchild cannot hold the output pipes open).
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<(Option<i32>, String)> {
    use std::os::unix::process::CommandExt;
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().context("starting a rig process")?;
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let out = out.clone();
        readers.push(std::thread::spawn(move || {
            let mut pipe = pipe;
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }));
    }
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if start.elapsed() > timeout {
            // SAFETY: kill(2) with a negative pid signals the process group
            // we created for this child; it touches no memory.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for r in readers {
        let _ = r.join();
    }
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    Ok((status.and_then(|s| s.code()), text))
}

impl Batch {
    pub fn run(&self, paths: &Paths) -> Result<BatchResult> {
        let (mode, why) = detect_mode(paths);
        eprintln!("rig: mode {mode:?}: {why}");
        let start = Instant::now();
        let mut result = match mode {
            Mode::Direct => self.run_direct(paths)?,
            Mode::L1 => self.run_l1(paths)?,
        };
        result.wall = start.elapsed();
        eprintln!("rig: batch took {:.1} s", result.wall.as_secs_f64());
        Ok(result)
    }

    fn scratch() -> Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!(
            "coworkvm-rig-{}-{:016x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn run_direct(&self, paths: &Paths) -> Result<BatchResult> {
        let scratch = Self::scratch()?;
        let payload = scratch.join("payload");
        std::fs::create_dir_all(&payload)?;
        for (src, name) in &self.files {
            let dst = payload.join(name);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
        let mut cases = Vec::new();
        let mut console = String::new();
        for case in &self.cases {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(&case.script);
            cmd.env("COWORKVM", &paths.coworkvm)
                .env("VMM_TIMER", &paths.vmm_timer)
                .env("VSOCK_PROBE", &paths.vsock_probe)
                .env("KERNEL", &paths.kernel)
                .env("P", &payload)
                .env("TMPDIR", &scratch);
            for (i, d) in self.disks.iter().enumerate() {
                cmd.env(format!("DISK{i}"), d);
            }
            let (rc, output) = run_with_timeout(cmd, case.timeout)?;
            console.push_str(&format!(
                "@@RIG-BEGIN {}\n{output}@@RIG-END {} rc={rc:?}\n",
                case.name, case.name
            ));
            cases.push(CaseResult {
                name: case.name.clone(),
                rc,
                output,
            });
        }
        let _ = std::fs::remove_dir_all(&scratch);
        Ok(BatchResult {
            mode: Mode::Direct,
            cases,
            console,
            retried: false,
            wall: Duration::ZERO,
        })
    }

    fn l1_init(&self) -> String {
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
    insmod /lib/modules/$rel/$m 2>/dev/null
done
echo "@@RIG-L1-UP $(cut -d' ' -f1 /proc/uptime)"
[ -c /dev/kvm ] || echo "@@RIG-ERROR /dev/kvm missing in L1"
export COWORKVM=/bin/coworkvm VMM_TIMER=/bin/vmm-timer VSOCK_PROBE=/bin/vsock-probe KERNEL=/payload/vmlinuz P=/payload TMPDIR=/tmp
"#,
        );
        let letters = "abcdefghijklmnop";
        for i in 0..self.disks.len() {
            let dev = format!("/dev/vd{}", &letters[i..i + 1]);
            s.push_str(&format!(
                "i=0; while [ ! -b {dev} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\nexport DISK{i}={dev}\n"
            ));
        }
        for case in &self.cases {
            s.push_str(&format!(
                "echo \"@@RIG-BEGIN {n}\"\ntimeout {t} sh /cases/{n}.sh 2>&1\necho \"@@RIG-END {n} rc=$?\"\n",
                n = case.name,
                t = case.timeout.as_secs()
            ));
        }
        s.push_str("echo \"@@RIG-DONE $(cut -d' ' -f1 /proc/uptime)\"\nsync\npoweroff -f\n");
        s
    }

    fn run_l1(&self, paths: &Paths) -> Result<BatchResult> {
        if which("qemu-system-x86_64").is_none() {
            bail!("qemu-system-x86_64 not found: run `make deps` (Debian package qemu-system-x86)");
        }
        let scratch = Self::scratch()?;
        let init = scratch.join("init");
        std::fs::write(&init, self.l1_init())?;
        let mut files = vec![
            (paths.coworkvm.clone(), "/bin/coworkvm".to_string()),
            (paths.vmm_timer.clone(), "/bin/vmm-timer".to_string()),
            (paths.vsock_probe.clone(), "/bin/vsock-probe".to_string()),
            (paths.kernel.clone(), "/payload/vmlinuz".to_string()),
        ];
        for (src, name) in &self.files {
            files.push((src.clone(), format!("/payload/{name}")));
        }
        for case in &self.cases {
            let f = scratch.join(format!("{}.sh", case.name));
            std::fs::write(&f, &case.script)?;
            files.push((f, format!("/cases/{}.sh", case.name)));
        }
        let spec = InitramfsSpec {
            init,
            busybox: Some(paths.busybox.clone()),
            module_tree: Some(paths.module_tree.clone()),
            modules: L1_MODULES.iter().map(|s| s.to_string()).collect(),
            files,
            compression: Compression::None,
            mtime: 0,
        };
        let initrd = scratch.join("l1.cpio");
        initramfs::write(&spec, &initrd).context("building the L1 initramfs")?;

        let budget = L1_BOOT_BUDGET + self.cases.iter().map(|c| c.timeout).sum::<Duration>();
        let mut retried = false;
        let (rc, console) = loop {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args([
                "-M",
                "q35",
                "-accel",
                "tcg,thread=multi",
                "-cpu",
                "max",
                "-smp",
                &l1_smp(),
                "-m",
                "3072",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-serial",
                "stdio",
                "-no-reboot",
                "-kernel",
            ])
            .arg(&paths.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1"]);
            for (i, d) in self.disks.iter().enumerate() {
                cmd.arg("-drive")
                    .arg(format!(
                        "file={},if=none,id=d{i},format=raw,cache=unsafe",
                        d.display()
                    ))
                    .args(["-device", &format!("virtio-blk-pci,drive=d{i}")]);
            }
            let (rc, console) = run_with_timeout(cmd, budget)?;
            // TCG sometimes spins before the guest prints anything; that is an
            // environment fault, retried once. Anything that printed counts.
            if !console.contains("@@RIG-L1-UP") && !retried && rc.is_none() {
                eprintln!("rig: L1 printed nothing within {budget:?}; retrying once");
                retried = true;
                continue;
            }
            break (rc, console);
        };
        let _ = std::fs::remove_dir_all(&scratch);
        if !console.contains("@@RIG-L1-UP") {
            bail!("the L1 VM did not come up (qemu rc {rc:?}); console:\n{console}");
        }
        let names: Vec<String> = self.cases.iter().map(|c| c.name.clone()).collect();
        Ok(BatchResult {
            mode: Mode::L1,
            cases: parse_console(&console, &names),
            console,
            retried,
            wall: Duration::ZERO,
        })
    }
}

/// vCPUs of the L1 VM (`COWORKVM_RIG_SMP`, default 1). With 2, the L1
/// kernel occasionally oopses on an int3 in code it is live-patching (KVM
/// flips static keys when VMs come and go), a cross-modifying-code race of
/// multi-threaded TCG; one vCPU has no such race.
fn l1_smp() -> String {
    std::env::var("COWORKVM_RIG_SMP").unwrap_or_else(|_| "1".into())
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u64::from_le_bytes(b)
}

pub fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(prog))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_is_split_into_cases() {
        let console = "noise\r\n@@RIG-BEGIN a\r\nline1\r\n@@RIG-END a rc=0\r\n[ 1.0] kernel\n@@RIG-BEGIN b\nx\n@@RIG-END b rc=3\n@@RIG-BEGIN c\nhalf\n";
        let names = vec!["a".into(), "b".into(), "c".into(), "d".into()];
        let r = parse_console(console, &names);
        assert_eq!(r.len(), 4);
        assert_eq!(
            (r[0].name.as_str(), r[0].rc, r[0].output.as_str()),
            ("a", Some(0), "line1\n")
        );
        assert_eq!(r[1].rc, Some(3));
        assert_eq!((r[2].name.as_str(), r[2].rc), ("c", None));
        assert_eq!(
            (r[3].name.as_str(), r[3].rc),
            ("d", None),
            "a case that never started"
        );
    }

    #[test]
    fn case_line_helpers() {
        let c = CaseResult {
            name: "x".into(),
            rc: Some(0),
            output: "@@L2 nproc=2\n@@L2 done\r\n".into(),
        };
        assert_eq!(c.lines_with("@@L2 nproc="), ["2"]);
        assert!(c.has_line("@@L2 done"));
    }

    #[test]
    fn timeout_kills_the_process() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo before; sleep 30"]);
        let (rc, out) = run_with_timeout(cmd, Duration::from_millis(300)).unwrap();
        assert_eq!(rc, None);
        assert_eq!(out, "before\n");
    }
}
