//! The test rig: runs batches of VM test cases either directly on the host
//! (when its KVM can boot Linux) or inside an "L1" VM under QEMU TCG, whose
//! emulated SVM gives coworkvm a real KVM API where the host's own cannot
//! boot Linux (see [`l1`]).
//!
//! A case is a POSIX shell script. It finds what it needs in environment
//! variables, the same in both modes:
//! - the tools of [`Paths::tools`]: `COWORKVM` (the coworkvm binary),
//!   `VMM_TIMER`, `VSOCK_PROBE`, `AGENT_PROBE`, `CLIENT_PROBE`, `RUN_AS`,
//!   `EGRESS_UPSTREAM` (the egress tests' local HTTP and TLS server), and
//!   `VIRTIOFSD` (the virtiofsd `make build` builds; in L1 it is at
//!   `/usr/lib/coworkvm/virtiofsd`, where coworkvm's package puts it, so
//!   the helper's own search finds it there too);
//! - `KERNEL`: the guest kernel; `P`: the directory of payload files;
//! - `DISK0`, `DISK1`, ...: the batch's disks (host files in direct mode,
//!   L1's virtio disks in the rig, so the host can check them afterwards);
//! - `TMPDIR`: scratch space.
//!
//! ```no_run
//! use coworkvm_tests::{paths_or_skip, Batch, Case};
//!
//! // Fails when the rig cannot run here; skips (a counted skip) with SKIP_VM=1.
//! let Some(paths) = paths_or_skip() else { return };
//! let batch = Batch {
//!     cases: vec![Case::new(
//!         "hello",
//!         "$COWORKVM boot --kernel $KERNEL --initrd $P/g.cpio.zst --disk $DISK0",
//!         120,
//!     )],
//!     files: vec![("/tmp/g.cpio.zst".into(), "g.cpio.zst".into())],
//!     disks: vec!["/tmp/disk.img".into()],
//! };
//! let result = batch.run(&paths).expect("the rig runs");
//! let case = result.case("hello");
//! assert!(case.passed(), "{}", result.report());
//! assert_eq!(case.lines_with("@@L2 nproc="), ["1"], "{}", result.report());
//! // The guest's writes are in /tmp/disk.img now.
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use coworkvm_rootfs::initramfs::{self, Compression, InitramfsSpec};

pub mod bench;
pub mod client;
pub mod copyright;
pub mod cowork;
pub mod egress;
pub mod fakeapi;
pub mod images;
pub mod l1;
pub mod process;
pub mod qemu;
pub mod runtime;
pub mod skip;

pub use skip::{ok_or_skip, skip_or_fail, skipping_allowed};

/// Modules the guests of the tests load (dependencies come along).
pub const GUEST_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio-rng"];

/// The build directory of the workspace at `root`: `COWORKVM_BUILD_DIR`
/// (relative to `root` unless absolute) or `root/build`. A second kernel,
/// e.g. `BUILD=build/k61 COWORKVM_KERNEL_SERIES=6.1 scripts/fetch-kernel.sh`,
/// is tested with `COWORKVM_BUILD_DIR=build/k61`.
pub fn build_dir(root: &Path) -> PathBuf {
    match std::env::var_os("COWORKVM_BUILD_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("build"),
    }
}

/// Where `make build` puts virtiofsd, relative to the workspace root.
pub const VIRTIOFSD_BUILT: &str = "build/virtiofsd/bin/virtiofsd";
/// virtiofsd's path inside L1: where coworkvm's package installs it.
pub const VIRTIOFSD_IN_L1: &str = "/usr/lib/coworkvm/virtiofsd";

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
    pub agent_probe: PathBuf,
    pub client_probe: PathBuf,
    pub run_as: PathBuf,
    pub egress_upstream: PathBuf,
    /// The static virtiofsd of `make build` (scripts/build-virtiofsd.sh).
    pub virtiofsd: PathBuf,
    /// Initramfs with coworkvm-agent as /init.
    pub agent_initrd: PathBuf,
}

impl Paths {
    /// Finds the artifacts of `make build`, the tools of [`Self::tools`]
    /// included; an error says what is missing. `COWORKVM_BIN` overrides
    /// the coworkvm binary.
    pub fn locate() -> Result<Self> {
        let p = Self::locate_base()?;
        for (var, tool, _) in p.tools() {
            if !tool.exists() {
                let how = match var {
                    "VIRTIOFSD" => "`make build` (or scripts/build-virtiofsd.sh)",
                    _ => "`make build`",
                };
                bail!("{} missing: run {how}", tool.display());
            }
        }
        Ok(p)
    }

    /// Like [`Self::locate`], needing only the guest kernel, its modules
    /// and busybox (`make kernel`): enough for batches that do not run
    /// coworkvm, such as the rig's own test with QEMU as the L2 VMM. Tools
    /// that are missing are left out of L1.
    pub fn locate_base() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("workspace root")?
            .to_path_buf();
        let build = build_dir(&root);
        let release_dir = root.join("target/x86_64-unknown-linux-gnu/release");
        let coworkvm = std::env::var_os("COWORKVM_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| release_dir.join("coworkvm"));
        let version_file = build.join("kernel/version");
        let version = std::fs::read_to_string(&version_file)
            .with_context(|| format!("{} missing: run `make kernel`", version_file.display()))?;
        let kernel_release = version
            .lines()
            .find_map(|l| l.strip_prefix("release="))
            .with_context(|| format!("{} has no release= line", version_file.display()))?
            .to_owned();
        let p = Self {
            kernel: build.join("kernel/vmlinuz"),
            module_tree: build.join("kernel/modules").join(&kernel_release),
            busybox: build.join("busybox"),
            vmm_timer: release_dir.join("vmm-timer"),
            vsock_probe: release_dir.join("vsock-probe"),
            agent_probe: release_dir.join("agent-probe"),
            client_probe: release_dir.join("client-probe"),
            run_as: release_dir.join("run-as"),
            egress_upstream: release_dir.join("egress-upstream"),
            // Always the workspace's build/: make build puts it there even
            // when COWORKVM_BUILD_DIR points at a second kernel's directory.
            virtiofsd: root.join(VIRTIOFSD_BUILT),
            agent_initrd: build.join("agent-initrd.cpio.zst"),
            kernel_release,
            coworkvm,
            build,
            root,
        };
        for f in [&p.kernel, &p.busybox, &p.module_tree] {
            if !f.exists() {
                bail!("{} missing: run `make kernel`", f.display());
            }
        }
        Ok(p)
    }

    /// The binaries every case can call: (environment variable, host path,
    /// path inside L1). A helper added here is there in both modes.
    pub fn tools(&self) -> Vec<(&'static str, &Path, &'static str)> {
        vec![
            ("COWORKVM", &self.coworkvm, "/bin/coworkvm"),
            ("VMM_TIMER", &self.vmm_timer, "/bin/vmm-timer"),
            ("VSOCK_PROBE", &self.vsock_probe, "/bin/vsock-probe"),
            ("AGENT_PROBE", &self.agent_probe, "/bin/agent-probe"),
            ("CLIENT_PROBE", &self.client_probe, "/bin/client-probe"),
            ("RUN_AS", &self.run_as, "/bin/run-as"),
            (
                "EGRESS_UPSTREAM",
                &self.egress_upstream,
                "/bin/egress-upstream",
            ),
            ("VIRTIOFSD", &self.virtiofsd, VIRTIOFSD_IN_L1),
        ]
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

/// Locates the artifacts ([`Paths::locate`]) and checks that the mode the
/// rig will use can run here (QEMU for L1, `/dev/kvm` for direct); if not,
/// ends the test through [`skip_or_fail`]: a failure, or with `SKIP_VM=1` a
/// counted skip. With `SKIP_VM=1` (`make test-quick`) the VM batches are
/// skipped even where they could run: they are the slow part.
#[track_caller]
pub fn paths_or_skip() -> Option<Paths> {
    skip_unless_ready(Paths::locate)
}

/// [`paths_or_skip`] for batches that need only the kernel and busybox
/// ([`Paths::locate_base`]).
#[track_caller]
pub fn base_paths_or_skip() -> Option<Paths> {
    skip_unless_ready(Paths::locate_base)
}

#[track_caller]
fn skip_unless_ready(locate: fn() -> Result<Paths>) -> Option<Paths> {
    if skipping_allowed() {
        skip_or_fail(format!("{}=1 skips the VM batches", skip::SKIP_ENV));
        return None;
    }
    let checked = locate().and_then(|p| {
        let (mode, why) = mode(&p);
        match mode {
            Mode::L1 if which("qemu-system-x86_64").is_none() => {
                bail!("the L1 rig needs qemu-system-x86_64 ({why}): run `make deps`")
            }
            Mode::Direct if !Path::new("/dev/kvm").exists() => {
                bail!("direct mode needs /dev/kvm ({why})")
            }
            _ => Ok(p),
        }
    });
    ok_or_skip(checked.map_err(|e| format!("the rig cannot run: {e:#}")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The host's KVM boots Linux: run cases directly.
    Direct,
    /// Run cases inside an L1 VM under QEMU TCG.
    L1,
}

/// Picks the mode: `COWORKVM_RIG=l1|direct`, else `coworkvm doctor --json`
/// (its `can_boot_linux`); L1 when coworkvm or its doctor gives no answer.
/// Returns the mode and why.
pub fn detect_mode(paths: &Paths) -> (Mode, String) {
    match std::env::var("COWORKVM_RIG").unwrap_or_default().as_str() {
        "l1" => return (Mode::L1, "COWORKVM_RIG=l1".into()),
        "direct" => return (Mode::Direct, "COWORKVM_RIG=direct".into()),
        "" => {}
        other => eprintln!("rig: ignoring COWORKVM_RIG={other} (l1 or direct)"),
    }
    let report = Command::new(&paths.coworkvm)
        .args(["doctor", "--json"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());
    mode_from_doctor(report.as_ref(), &paths.coworkvm)
}

/// The mode a `coworkvm doctor --json` report (None: no report) implies.
pub fn mode_from_doctor(report: Option<&serde_json::Value>, bin: &Path) -> (Mode, String) {
    let answer = report.and_then(|r| r.get("can_boot_linux").and_then(|v| v.as_bool()));
    match (report, answer) {
        (Some(r), Some(true)) => (
            Mode::Direct,
            format!(
                "coworkvm doctor: the host's KVM can boot Linux ({} MIPS in ring 0)",
                r["ring0_mips"]
            ),
        ),
        (Some(r), Some(false)) => (
            Mode::L1,
            format!(
                "coworkvm doctor: the host's KVM cannot boot Linux ({}); using the L1 rig",
                r["verdict"].as_str().unwrap_or("no verdict")
            ),
        ),
        _ => (
            Mode::L1,
            format!(
                "`{} doctor --json` gave no can_boot_linux answer; using the L1 rig",
                bin.display()
            ),
        ),
    }
}

/// [`detect_mode`], asked once per test process.
pub fn mode(paths: &Paths) -> (Mode, String) {
    static MODE: OnceLock<(Mode, String)> = OnceLock::new();
    MODE.get_or_init(|| detect_mode(paths)).clone()
}

#[derive(Debug, Clone)]
pub struct Case {
    /// Letters, digits, '-' and '_'; unique in its batch.
    pub name: String,
    /// POSIX shell script (busybox sh in L1); stderr goes with stdout.
    pub script: String,
    /// The case is killed after this long.
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

/// Cases run in order, one L1 boot for the whole batch.
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
    /// The case script finished with status 0.
    pub fn passed(&self) -> bool {
        self.rc == Some(0)
    }

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

/// How the rig runs a batch.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// L1 mode: how long an L1 that is up may be silent (no console output,
    /// no heartbeat) before it counts as hung ([`l1::silence_limit`]).
    pub silence_limit: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            silence_limit: l1::silence_limit(),
        }
    }
}

#[derive(Debug)]
pub struct BatchResult {
    pub mode: Mode,
    pub cases: Vec<CaseResult>,
    /// The whole L1 console (or the direct runs' output).
    pub console: String,
    /// The L1 boot was retried once after printing nothing (TCG spin).
    pub retried: bool,
    pub wall: Duration,
    /// L1 mode: host time from QEMU's start to L1's init.
    pub l1_up: Option<Duration>,
    /// L1 mode: L1's own uptime (s) at its init, from `/proc/uptime`.
    pub l1_uptime_at_up: Option<f64>,
    /// L1 mode: the cases run a second time, in a fresh L1, because the
    /// first one hung before they finished.
    pub rerun: Vec<String>,
    /// L1 mode: why each hung L1 was ended.
    pub hangs: Vec<String>,
}

impl BatchResult {
    pub fn case(&self, name: &str) -> &CaseResult {
        self.cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("case {name} has no result; console:\n{}", self.console))
    }

    /// One case's output, then the whole console: the text to attach to a
    /// failed assertion about that case.
    pub fn context(&self, name: &str) -> String {
        format!(
            "case {name}:\n{}\n--- console:\n{}",
            self.case(name).output,
            self.console
        )
    }

    /// Asserts the client probe's verdict in case `name`: no `@@CLIENT
    /// fail` line, a `@@CLIENT pass` line for each check in `required` (a
    /// probe that died early passes none of the later ones), and
    /// `probe-rc=0`.
    #[track_caller]
    pub fn assert_client_passed(&self, name: &str, required: &[&str]) {
        let c = self.case(name);
        let fails = c.lines_with("@@CLIENT fail");
        assert!(
            fails.is_empty(),
            "failed checks: {fails:#?}\n{}",
            self.context(name)
        );
        for what in required {
            assert!(
                c.has_line(&format!("@@CLIENT pass {what}")),
                "check {what:?} did not pass\n{}",
                self.context(name)
            );
        }
        assert_eq!(c.lines_with("probe-rc="), ["0"], "{}", self.context(name));
    }

    /// Prints every case's status and output to stderr (shown when a test
    /// fails, captured otherwise).
    pub fn print_cases(&self) {
        for c in &self.cases {
            eprintln!("--- case {} (rc {:?}):\n{}", c.name, c.rc, c.output);
        }
    }

    /// Every case's status and output, then the whole console: the text to
    /// attach to a failed assertion.
    pub fn report(&self) -> String {
        let mut s = format!(
            "mode {:?}{}, {:.1} s\n",
            self.mode,
            if self.retried {
                " (L1 boot retried once)"
            } else {
                ""
            },
            self.wall.as_secs_f64()
        );
        for h in &self.hangs {
            s.push_str(&format!("L1 hung: {h}\n"));
        }
        if !self.rerun.is_empty() {
            s.push_str(&format!("rerun in a fresh L1: {}\n", self.rerun.join(" ")));
        }
        for c in &self.cases {
            s.push_str(&format!("=== case {}: rc {:?}\n{}", c.name, c.rc, c.output));
        }
        s.push_str("=== console:\n");
        s.push_str(&self.console);
        s
    }
}

/// Splits a console into case results by the rig's markers; a case with
/// no `@@RIG-END` (cut off, or never started) has `rc: None`.
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

/// A scratch directory under the system temp dir, removed when dropped.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "coworkvm-rig-{tag}-{}-{:016x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

impl Batch {
    /// Runs every case, in order, in the mode [`mode`] picks (printed with
    /// its reason). An error means the rig itself could not run the batch
    /// (no QEMU, L1 never came up, no /dev/kvm in L1) and carries the
    /// console; a case that fails is a result, not an error. A hung L1 is
    /// ended and the cases it did not finish rerun once in a fresh one
    /// ([`BatchResult::rerun`]).
    pub fn run(&self, paths: &Paths) -> Result<BatchResult> {
        self.run_with(paths, &RunOptions::default())
    }

    /// [`Self::run`] with `opts` instead of the defaults.
    pub fn run_with(&self, paths: &Paths, opts: &RunOptions) -> Result<BatchResult> {
        self.validate()?;
        let (mode, why) = mode(paths);
        eprintln!("rig: mode {mode:?}: {why}");
        let start = Instant::now();
        let mut result = match mode {
            Mode::Direct => self.run_direct(paths)?,
            Mode::L1 => l1::run(self, paths, opts)?,
        };
        result.wall = start.elapsed();
        let summary: Vec<String> = result
            .cases
            .iter()
            .map(|c| {
                format!(
                    "{} rc={}",
                    c.name,
                    c.rc.map_or("none".into(), |r| r.to_string())
                )
            })
            .collect();
        eprintln!(
            "rig: batch took {:.1} s: {}{}",
            result.wall.as_secs_f64(),
            summary.join(", "),
            if result.rerun.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} rerun in a fresh L1 after: {})",
                    result.rerun.join(" "),
                    result.hangs.join("; ")
                )
            }
        );
        Ok(result)
    }

    fn validate(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for c in &self.cases {
            let ok_name = !c.name.is_empty()
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok_name {
                bail!("case name {:?}: use letters, digits, '-' and '_'", c.name);
            }
            if !seen.insert(&c.name) {
                bail!("case name {:?} used twice", c.name);
            }
        }
        for (_, name) in &self.files {
            if name.starts_with('/') || name.split('/').any(|c| c == ".." || c.is_empty()) {
                bail!("payload name {name:?}: a relative path under $P");
            }
        }
        if self.disks.len() > 16 {
            bail!("{} disks: the rig attaches at most 16", self.disks.len());
        }
        for d in &self.disks {
            if !d.is_file() {
                bail!("disk {} is not a file", d.display());
            }
        }
        Ok(())
    }

    fn run_direct(&self, paths: &Paths) -> Result<BatchResult> {
        let scratch = Scratch::new("direct")?;
        let payload = scratch.path.join("payload");
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
            let script = scratch.path.join(format!("{}.sh", case.name));
            std::fs::write(&script, &case.script)?;
            // As in L1: stderr into stdout, in order.
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "exec sh \"$0\" 2>&1"]).arg(&script);
            for (var, host, _) in paths.tools() {
                if host.exists() {
                    cmd.env(var, host);
                }
            }
            cmd.env("KERNEL", &paths.kernel)
                .env("P", &payload)
                .env("TMPDIR", &scratch.path);
            for (i, d) in self.disks.iter().enumerate() {
                cmd.env(format!("DISK{i}"), d);
            }
            let (rc, output) = process::run_with_timeout(cmd, case.timeout)?;
            let rc_text = rc.map_or("none".into(), |r| r.to_string());
            console.push_str(&format!(
                "@@RIG-BEGIN {n}\n{output}@@RIG-END {n} rc={rc_text}\n",
                n = case.name
            ));
            cases.push(CaseResult {
                name: case.name.clone(),
                rc,
                output,
            });
        }
        Ok(BatchResult {
            mode: Mode::Direct,
            cases,
            console,
            retried: false,
            wall: Duration::ZERO,
            l1_up: None,
            l1_uptime_at_up: None,
            rerun: vec![],
            hangs: vec![],
        })
    }
}

fn rand_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u64::from_le_bytes(b)
}

/// A new, empty directory for one test: `cvm-TAG-PID-N` in the temporary
/// directory (N counts up, so parallel tests never share one).
pub fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "cvm-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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
        assert!(c.passed());
        assert!(!CaseResult { rc: None, ..c }.passed());
    }

    #[test]
    fn mode_follows_the_doctor() {
        let bin = Path::new("/x/coworkvm");
        let yes = serde_json::json!({"can_boot_linux": true, "ring0_mips": 2000.0});
        let no = serde_json::json!({"can_boot_linux": false, "verdict": "emulated ring 0"});
        assert_eq!(mode_from_doctor(Some(&yes), bin).0, Mode::Direct);
        let (m, why) = mode_from_doctor(Some(&no), bin);
        assert_eq!(m, Mode::L1);
        assert!(why.contains("emulated ring 0"), "{why}");
        // No report, or one without the answer: the rig.
        assert_eq!(mode_from_doctor(None, bin).0, Mode::L1);
        let odd = serde_json::json!({"kvm_usable": true});
        let (m, why) = mode_from_doctor(Some(&odd), bin);
        assert_eq!(m, Mode::L1);
        assert!(why.contains("/x/coworkvm doctor --json"), "{why}");
    }

    #[test]
    fn bad_batches_are_refused_before_anything_boots() {
        let bad = |cases: Vec<Case>, files: Vec<(PathBuf, String)>| {
            Batch {
                cases,
                files,
                disks: vec![],
            }
            .validate()
            .is_err()
        };
        assert!(bad(vec![Case::new("a b", "true", 1)], vec![]));
        assert!(bad(vec![Case::new("a;rm", "true", 1)], vec![]));
        assert!(bad(
            vec![Case::new("a", "true", 1), Case::new("a", "true", 1)],
            vec![]
        ));
        assert!(bad(vec![], vec![("/etc/hosts".into(), "../x".into())]));
        assert!(bad(vec![], vec![("/etc/hosts".into(), "/abs".into())]));
        assert!(!bad(
            vec![Case::new("ok-1_2", "true", 1)],
            vec![("/etc/hosts".into(), "dir/hosts".into())]
        ));
        let missing_disk = Batch {
            cases: vec![],
            files: vec![],
            disks: vec!["/nonexistent/disk.img".into()],
        };
        assert!(missing_disk.validate().is_err());
    }

    #[test]
    fn direct_mode_runs_cases_in_order_with_rc_and_output() {
        let dir = Scratch::new("unit-direct").unwrap();
        let disk = dir.path.join("d.img");
        std::fs::write(&disk, b"disk-bytes").unwrap();
        let file = dir.path.join("f.txt");
        std::fs::write(&file, b"payload-bytes").unwrap();
        let fake = |n: &str| dir.path.join(n);
        // A tool that exists is in the cases' environment; one that does not is not.
        std::fs::write(fake("coworkvm"), b"").unwrap();
        let paths = Paths {
            root: fake(""),
            build: fake(""),
            kernel: fake("vmlinuz"),
            kernel_release: "x".into(),
            module_tree: fake(""),
            busybox: fake("busybox"),
            coworkvm: fake("coworkvm"),
            vmm_timer: fake("vmm-timer"),
            vsock_probe: fake("vsock-probe"),
            agent_probe: fake("agent-probe"),
            client_probe: fake("client-probe"),
            run_as: fake("run-as"),
            egress_upstream: fake("egress-upstream"),
            virtiofsd: fake("virtiofsd"),
            agent_initrd: fake("agent.cpio.zst"),
        };
        let batch = Batch {
            cases: vec![
                Case::new(
                    "ok",
                    "cat $P/sub/f.txt; echo; cat $DISK0; echo; echo err >&2; echo $COWORKVM; \
                     echo \"[${VMM_TIMER:-unset}]\"",
                    10,
                ),
                Case::new("fails", "echo x > $TMPDIR/t; exit 7", 10),
                Case::new("hangs", "echo started; sleep 60", 1),
            ],
            files: vec![(file, "sub/f.txt".into())],
            disks: vec![disk],
        };
        let r = batch.run_direct(&paths).unwrap();
        assert_eq!(r.cases.len(), 3);
        assert!(r.case("ok").passed());
        assert_eq!(
            r.case("ok").output,
            format!(
                "payload-bytes\ndisk-bytes\nerr\n{}\n[unset]\n",
                paths.coworkvm.display()
            )
        );
        assert_eq!(r.case("fails").rc, Some(7));
        assert!(!r.case("fails").passed());
        assert_eq!(r.case("hangs").rc, None);
        assert!(r.case("hangs").has_line("started"));
        // The console carries the same markers as L1's.
        let names: Vec<String> = batch.cases.iter().map(|c| c.name.clone()).collect();
        let again = parse_console(&r.console, &names);
        assert_eq!((again[1].rc, again[2].rc), (Some(7), None));
        assert!(r.report().contains("=== case fails: rc Some(7)"));
    }
}
