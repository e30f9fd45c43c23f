//! `coworkvm`: boot a guest, or check the host.

mod doctor_checks;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use coworkvm_bundle::{Bundle, SeedOutcome};
use coworkvm_helper::run::{RunConfig, RunMachine};
use coworkvm_helper::vm::{BundleImages, ImageSource, MachineSize};
use coworkvm_vmm::boot_file::{BootFile, DiskArg, FileArg};
use coworkvm_vmm::config::{DiskConfig, DiskRole, FsConfig, LaunchConfig, MAX_CONFIG_BYTES};
use coworkvm_vmm::doctor;
use coworkvm_vmm::MachineUuid;
use coworkvm_vmm::{GuestExit, VsockSpec};
use socket_proto::manifest::MANIFEST_FILE;

#[derive(Parser)]
#[command(
    name = "coworkvm",
    version,
    about = "A KVM sandbox VM for the Cowork agent"
)]
struct Cli {
    /// More log output: -v info, -vv debug, -vvv trace (RUST_LOG, when
    /// set, decides instead).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Less log output: errors only (RUST_LOG, when set, decides instead).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

/// The CLI's definition, for the man pages and shell completions that
/// coworkvm-gendoc (src/bin/gendoc.rs, which includes this file) renders.
#[allow(dead_code, reason = "used only by the coworkvm-gendoc binary")]
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux kernel with an initramfs and disks; exits when the guest powers off.
    Boot(BootArgs),
    /// Boot a VM with the guest agent and run CMD in it, like `ssh host CMD`.
    Run(RunArgs),
    /// Serve the desktop client's helper protocol on a Unix socket (also
    /// what `coworkvm -socket PATH` and `coworkvm SCRIPT.js -socket PATH`
    /// do, as the clients start their helper). Under systemd socket
    /// activation (LISTEN_FDS) it serves the socket systemd passed.
    Serve {
        /// The socket [default: the one systemd passed, else
        /// $XDG_RUNTIME_DIR/claude-cowork-vm.sock].
        #[arg(long = "socket", value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Stop after SECS seconds with no VM and no client connection; 0
        /// never [default: 300 when socket-activated (the socket stays and
        /// the next connection starts the helper again), else never].
        #[arg(long = "idle-exit", value_name = "SECS")]
        idle_exit: Option<u64>,
        /// Connect the sessions' streams to HOST (any port, or only PORT) at IP
        /// instead of its DNS answer, like curl's --resolve. Repeatable.
        #[arg(long = "egress-resolve", value_name = "HOST[:PORT]=IP")]
        egress_resolve: Vec<String>,
        /// Let the sessions' streams reach addresses in CIDR even inside a refused
        /// range (loopback, private, link-local, ...). Repeatable.
        #[arg(long = "egress-allow", value_name = "CIDR")]
        egress_allow: Vec<String>,
        /// The config file ([egress] resolve = [...], allow = [...])
        /// [default: $XDG_CONFIG_HOME/coworkvm/config.toml, else ~/.config/coworkvm/config.toml].
        #[arg(long = "config", value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Inspect or prepare a VM bundle (images, identity, session disk).
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Check that this host can run coworkvm VMs: one PASS/WARN/FAIL line per
    /// check, each failing one with its fix. Exit status 1 when coworkvm
    /// cannot run a VM here (or, with --client, the client's probe would
    /// refuse this machine).
    Doctor {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also check what the desktop client's own probe wants (QEMU, OVMF,
        /// virtiofsd at its paths, /dev/vhost-vsock) and the community
        /// build's COWORK_NODE_PATH.
        #[arg(long)]
        client: bool,
        /// Check this virtiofsd first, as the client's configure.virtiofsdPath would name it.
        #[arg(long, value_name = "PATH")]
        virtiofsd: Option<PathBuf>,
    },
    /// Test hook: set up boot's sandbox and make one access (vmm/tests/sandbox.rs).
    #[command(hide = true)]
    SandboxProbe(coworkvm_vmm::sandbox_probe::ProbeArgs),
    /// The helper's share keeper for one VM (spawned by the helper itself):
    /// a private namespace with the staging tmpfs and virtiofsd.
    #[command(hide = true)]
    ShareKeeper {
        /// The control socket inherited from the helper.
        #[arg(long, value_name = "N")]
        control_fd: i32,
        /// The listening vhost-user socket, for virtiofsd.
        #[arg(long, value_name = "M")]
        listen_fd: i32,
        /// The staging directory.
        #[arg(long, value_name = "DIR")]
        staging: PathBuf,
        /// The virtiofsd to run.
        #[arg(long, value_name = "PATH")]
        virtiofsd: PathBuf,
    },
}

/// The same as JSON: `{"path", "version"}` or `null` for the chosen one, every rejection.
fn virtiofsd_json(res: &coworkvm_helper::virtiofsd::Resolution) -> serde_json::Value {
    use coworkvm_helper::virtiofsd::version_string;
    serde_json::json!({
        "path": res.chosen.as_ref().map(|v| v.path.display().to_string()),
        "version": res.chosen.as_ref().map(|v| version_string(v.version)),
        "rejected": res.rejected.iter().map(|r| serde_json::json!({
            "path": r.candidate.path.display().to_string(),
            "source": r.candidate.source.to_string(),
            "reason": r.reason.to_string(),
        })).collect::<Vec<_>>(),
    })
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Show a bundle's identity, rootfs versions and disk usage; creates nothing.
    Status {
        /// Bundle directory [default: $XDG_DATA_HOME/coworkvm/bundle].
        dir: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make a bundle ready to boot: seed it from the images, expand a pending
    /// rootfs, create its identity and session disk.
    Prepare {
        /// Bundle directory [default: $XDG_DATA_HOME/coworkvm/bundle].
        dir: Option<PathBuf>,
        /// Images directory to seed from [default for the default bundle:
        /// $COWORKVM_IMAGES, /usr/lib/coworkvm/images or build/images].
        #[arg(long)]
        images: Option<PathBuf>,
        /// Size of the session disk when it is created (GiB).
        #[arg(long)]
        disk_size_gb: Option<u64>,
    },
}

#[derive(clap::Args)]
struct BootArgs {
    /// Read the whole launch configuration as JSON from descriptor N,
    /// inherited from the parent (how `coworkvm serve` and `coworkvm run`
    /// start the VMM); no other machine flag may be given with it.
    #[arg(
        long,
        value_name = "N",
        conflicts_with_all = ["kernel", "initrd", "disks", "cpus", "mem", "cmdline",
                              "console", "vsock", "cid", "uuid", "fs_socket", "fs_tag"]
    )]
    config_fd: Option<i32>,
    /// bzImage of the guest kernel: PATH, or fd:N (a descriptor inherited
    /// from the parent process).
    #[arg(long, value_name = "PATH|fd:N", required_unless_present = "config_fd")]
    kernel: Option<FileArg>,
    /// Initramfs (cpio, optionally compressed): PATH or fd:N.
    #[arg(long, value_name = "PATH|fd:N")]
    initrd: Option<FileArg>,
    /// Disk image: PATH or fd:N, then ",ro" for read-only; a PATH may be a
    /// block device. Repeat for more disks (vda, vdb, ...).
    #[arg(long = "disk", value_name = "PATH|fd:N[,ro]")]
    disks: Vec<DiskArg>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    mem: u64,
    /// Extra kernel parameters, appended to the built-in ones.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Write the guest console here instead of to stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Give the guest a vsock device: its port P reaches the host socket
    /// PATH_P; host programs reach the guest through PATH ("CONNECT P").
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3)]
    cid: u64,
    /// Machine UUID the guest reads from /sys/class/dmi/id/product_uuid.
    #[arg(long, value_parser = parse_uuid)]
    uuid: Option<MachineUuid>,
    /// Give the guest a virtio-fs device served by the vhost-user back-end
    /// (virtiofsd) listening on this socket, or on fd:N, an inherited
    /// socket already connected to it.
    #[arg(long, value_name = "PATH|fd:N")]
    fs_socket: Option<FileArg>,
    /// The virtio-fs tag the guest mounts (`mount -t virtiofs TAG DIR`).
    #[arg(long, value_name = "TAG", requires = "fs_socket",
          default_value = socket_proto::guest::SHARE_TAG)]
    fs_tag: String,
    /// Run the VMM unconfined: no seccomp, Landlock, namespaces or rlimits.
    /// For debugging only.
    #[arg(long)]
    no_sandbox: bool,
}

impl BootArgs {
    /// The launch configuration: read from `--config-fd`, or built from
    /// the flags (every `--disk` a data disk, in the order given).
    fn launch_config(&self) -> anyhow::Result<LaunchConfig> {
        if let Some(fd) = self.config_fd {
            return read_config_fd(fd);
        }
        let kernel = self.kernel.clone().context("--kernel is required")?;
        Ok(LaunchConfig {
            initrd: self.initrd.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskConfig {
                    role: DiskRole::Data,
                    file: d.file.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            cpus: self.cpus,
            mem_mib: self.mem,
            cmdline: self.cmdline.clone(),
            console: self.console.clone(),
            vsock: self.vsock.clone().map(|uds| VsockSpec {
                guest_cid: self.cid,
                uds,
            }),
            machine_uuid: self.uuid,
            fs: self.fs_socket.clone().map(|socket| FsConfig {
                socket,
                tag: self.fs_tag.clone(),
            }),
            ..LaunchConfig::new(kernel)
        })
    }
}

/// Takes descriptor `fd` and reads a [`LaunchConfig`] from it as JSON
/// (bounded; unknown fields refused).
fn read_config_fd(fd: i32) -> anyhow::Result<LaunchConfig> {
    use std::io::Read as _;
    use std::os::fd::FromRawFd as _;
    anyhow::ensure!(
        fd > 2,
        "--config-fd {fd}: a standard stream, not a configuration"
    );
    // SAFETY: F_GETFD only reads the descriptor table; a closed number
    // gives EBADF.
    let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    anyhow::ensure!(open, "--config-fd {fd}: not an open descriptor");
    // SAFETY: `fd` is open, above the standard streams, and was inherited
    // for this purpose: nothing else in this process owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .context("reading the launch configuration")?;
    anyhow::ensure!(
        bytes.len() <= MAX_CONFIG_BYTES,
        "the launch configuration is over {MAX_CONFIG_BYTES} bytes"
    );
    serde_json::from_slice(&bytes).context("the launch configuration is not valid")
}

#[derive(clap::Args)]
#[command(
    after_help = "Exit status: the command's own (128+N when signal N ended it); \
125 when coworkvm itself failed (a bad option, the VM did not boot, its agent did not connect); \
126 when the command cannot be executed; 127 when it is not found."
)]
struct RunArgs {
    /// Guest kernel (bzImage) [default: $COWORKVM_KERNEL or build/kernel/vmlinuz].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs with coworkvm-agent as /init [default: $COWORKVM_INITRD or
    /// build/agent-initrd.cpio.zst].
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Number of vCPUs (serve: the client's cpuCount, else 2).
    #[arg(long, value_name = "N", default_value_t = 2)]
    cpus: u8,
    /// Guest memory in MiB. Smaller than serve's default (the client's
    /// memoryMB, else 2048): one command needs less than a desktop session.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    mem: u64,
    /// Keep the guest console in this file [default: console.log in a
    /// temporary run directory, kept (and named) when the boot fails].
    #[arg(long, value_name = "PATH")]
    console: Option<PathBuf>,
    /// Machine UUID the guest reads from /sys/class/dmi/id/product_uuid
    /// [default: the bundle's machineIdentifier].
    #[arg(long, value_parser = parse_uuid)]
    uuid: Option<MachineUuid>,
    /// Boot this bundle (Debian rootfs, session disk, identity) [default:
    /// $XDG_DATA_HOME/coworkvm/bundle, unless --kernel or --initrd boot a
    /// bare kernel and initramfs].
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd"])]
    bundle: Option<PathBuf>,
    /// coworkvm's images to seed the bundle from [default: $COWORKVM_IMAGES,
    /// /usr/lib/coworkvm/images, or build/images].
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Size of a new session disk in GiB [default: the bundle's
    /// config.json, else 10].
    #[arg(long, value_name = "GIB")]
    disk_size_gb: Option<u64>,
    /// Seconds to wait for the guest agent to connect before giving up
    /// (exit status 125).
    #[arg(long, value_name = "SECS", default_value_t = 180)]
    boot_timeout: u64,
    /// Run CMD sandboxed as session NAME (its own user under bubblewrap,
    /// home /sessions/NAME), as the desktop client's processes run.
    /// Default: as root in the guest, like `ssh root@vm CMD`.
    #[arg(long, value_name = "NAME")]
    session: Option<String>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

fn parse_uuid(s: &str) -> Result<MachineUuid, String> {
    MachineUuid::parse(s).map_err(|e| e.to_string())
}

fn default_path(flag: Option<PathBuf>, env: &str, fallback: &str) -> PathBuf {
    flag.or_else(|| std::env::var_os(env).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(fallback))
}

/// `coworkvm run`: the command's exit status, or 125/126/127 (see
/// [`RunArgs`]'s help) with the reason on stderr.
fn run(args: RunArgs, progress: bool) -> ExitCode {
    match run_command(args, progress) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("coworkvm: {e:#}");
            let code = e
                .downcast_ref::<coworkvm_helper::run::RunError>()
                .map_or(coworkvm_helper::run::EXIT_RUN_FAILED, |e| e.exit_code());
            ExitCode::from(code)
        }
    }
}

fn run_command(args: RunArgs, progress: bool) -> anyhow::Result<i32> {
    let machine = if args.kernel.is_some() || args.initrd.is_some() {
        // A bare kernel + initramfs (the busybox test image): no rootfs,
        // no session disk, no identity unless --uuid.
        let kernel = default_path(args.kernel, "COWORKVM_KERNEL", "build/kernel/vmlinuz");
        let initrd = default_path(
            args.initrd,
            "COWORKVM_INITRD",
            "build/agent-initrd.cpio.zst",
        );
        RunMachine::Bare {
            kernel: BootFile::open_path(&kernel, false)?,
            initrd: BootFile::open_path(&initrd, false)?,
            machine_uuid: args.uuid,
        }
    } else {
        let dir = match args.bundle {
            Some(d) => d,
            None => Bundle::default_dir()
                .context("no bundle named and no default one (set HOME or XDG_DATA_HOME)")?,
        };
        // The same seeding and preparing as the helper's startVM.
        let images_dir = args.images.unwrap_or_else(Bundle::default_images_dir);
        let mut images = BundleImages { images_dir }
            .prepare(&dir, args.disk_size_gb)
            .with_context(|| format!("preparing the bundle {}", dir.display()))?;
        images.machine_uuid = args.uuid.or(images.machine_uuid);
        RunMachine::Bundle(images)
    };
    Ok(coworkvm_helper::run::run(RunConfig {
        machine,
        size: MachineSize {
            cpus: args.cpus.into(),
            mem_mib: args.mem,
        },
        console: args.console,
        command: args.command,
        connect_timeout: std::time::Duration::from_secs(args.boot_timeout),
        session: args.session,
        progress,
    })?)
}

/// The log filter: `RUST_LOG` when set, else `default`. At the default
/// `warn`, the rootfs expansion's progress lines (info, when stderr is no
/// terminal and so has no progress bar) still show: a minutes-long
/// `coworkvm run` in a log says what it is doing.
fn base_filter(default: &str) -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        if default == "warn" {
            tracing_subscriber::EnvFilter::new("warn,coworkvm_bundle::expand=info")
        } else {
            tracing_subscriber::EnvFilter::new(default)
        }
    })
}

/// The default log level: the command's own, moved by `-v`/`-q`.
fn default_level(command_default: &'static str, verbose: u8, quiet: bool) -> &'static str {
    if quiet {
        return "error";
    }
    const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
    let base = LEVELS
        .iter()
        .position(|l| *l == command_default)
        .unwrap_or(1);
    LEVELS[(base + usize::from(verbose)).min(LEVELS.len() - 1)]
}

/// Whether stderr is the journal: `JOURNAL_STREAM` (set by systemd for a
/// service whose output goes to the journal) names stderr's device and
/// inode. A child that inherited the variable but writes elsewhere does
/// not match.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Lines for the journal: each starts with its syslog priority (`<3>`
/// error, `<4>` warning, `<6>` info, `<7>` debug), which journald reads
/// and strips; no timestamp (the journal keeps its own), no level word, no
/// colour. A multi-line message gets the prefix on every line.
struct JournalFormat(
    tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Full, ()>,
);

impl JournalFormat {
    fn new() -> Self {
        Self(
            tracing_subscriber::fmt::format()
                .without_time()
                .with_level(false)
                .with_target(false)
                .with_ansi(false),
        )
    }

    fn priority(level: tracing::Level) -> u8 {
        match level {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        }
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JournalFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = Self::priority(*event.metadata().level());
        let mut line = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        for part in line.trim_end_matches('\n').split('\n') {
            writeln!(writer, "<{priority}>{part}")?;
        }
        Ok(())
    }
}

/// One readable line per event on stderr (journal lines when stderr is the
/// journal). Returns the switch that `setDebugLogging` flips (debug on, or
/// back to the base filter).
fn init_logging(default: &'static str) -> coworkvm_helper::DebugSwitch {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let (filter, handle) = tracing_subscriber::reload::Layer::new(base_filter(default));
    let journal = stderr_is_journal();
    let plain = (!journal).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
    });
    let journal = journal.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(JournalFormat::new())
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(journal)
        .init();
    std::sync::Arc::new(move |debug: bool| {
        let f = if debug {
            tracing_subscriber::EnvFilter::new("debug")
        } else {
            base_filter(default)
        };
        if let Err(e) = handle.reload(f) {
            eprintln!("coworkvm: cannot change the log filter: {e}");
        }
    })
}

/// The client starts its helper as `HELPER -socket PATH`, with no
/// subcommand: that (and `--socket PATH`) means `serve --socket PATH`, and
/// so does `SCRIPT.js -socket PATH` (the community build's Node stub, run
/// by whatever `COWORK_NODE_PATH` names). A single-dash `-socket` is
/// accepted after `serve` too.
fn normalize_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    // `serve`'s flags, which also come in the client's single-dash form.
    const SERVE_FLAGS: &[&str] = &[
        "socket",
        "config",
        "egress-resolve",
        "egress-allow",
        "idle-exit",
    ];
    let serve_flag = |a: &str| -> Option<&'static str> {
        let bare = a.strip_prefix("--").or_else(|| a.strip_prefix('-'))?;
        SERVE_FLAGS.iter().copied().find(|f| {
            bare.strip_prefix(f)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
        })
    };
    // The community build's bwrap backend starts
    // `"$COWORK_NODE_PATH" <resources>/cowork-vm-service.js -socket PATH`:
    // with COWORK_NODE_PATH=/usr/bin/coworkvm the script's path comes first.
    // It names the stub coworkvm stands in for; it is not read.
    if args
        .get(1)
        .is_some_and(|a| a.to_string_lossy().ends_with(".js"))
        && args
            .get(2)
            .is_some_and(|a| serve_flag(&a.to_string_lossy()).is_some())
    {
        args.remove(1);
    }
    if args
        .get(1)
        .is_some_and(|a| serve_flag(&a.to_string_lossy()).is_some())
    {
        args.insert(1, "serve".into());
    }
    if args.get(1).is_some_and(|a| a == "serve") {
        for a in args.iter_mut().skip(2) {
            let s = a.to_string_lossy().into_owned();
            if s.starts_with("--") {
                continue;
            }
            if let Some(flag) = serve_flag(&s) {
                let rest = &s[1 + flag.len()..];
                *a = format!("--{flag}{rest}").into();
            }
        }
    }
    args
}

fn boot(args: BootArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.launch_config()?.open()?;
    if args.no_sandbox {
        eprintln!(
            "coworkvm: warning: --no-sandbox: the VMM runs unconfined (no seccomp, Landlock, \
             namespaces or rlimits); a guest that breaks a device model gets all of your \
             privileges"
        );
    }
    let outcome =
        coworkvm_vmm::run_with(&cfg, !args.no_sandbox).context("cannot boot the guest")?;
    let code = outcome.exit.code();
    let why = match &outcome.exit {
        GuestExit::PowerOff => None,
        GuestExit::Reset { panic: Some(line) } => {
            Some(format!("the guest kernel panicked ({})", line.trim()))
        }
        GuestExit::Reset { panic: None } => Some("the guest asked for a reset".to_string()),
        GuestExit::Fatal(why) => Some(format!("the guest stopped: {why}")),
    };
    if let Some(why) = why {
        eprintln!("coworkvm: {why}; last console lines:");
        for line in &outcome.console_tail {
            eprintln!("  | {line}");
        }
    }
    Ok(ExitCode::from(code as u8))
}

fn bundle_dir(dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match dir {
        Some(dir) => Ok(dir),
        None => Bundle::default_dir()
            .context("no bundle directory given, and neither XDG_DATA_HOME nor HOME is set"),
    }
}

fn bytes_text(n: Option<u64>) -> String {
    match n {
        None => "absent".into(),
        Some(n) if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        Some(n) if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        Some(n) => format!("{n} bytes"),
    }
}

fn bundle(command: BundleCommand) -> anyhow::Result<ExitCode> {
    match command {
        BundleCommand::Status { dir, json } => {
            let dir = bundle_dir(dir)?;
            let status = Bundle::open_existing(&dir)?.status();
            if json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                let or_not_yet =
                    |v: &Option<String>| v.clone().unwrap_or_else(|| "not created yet".into());
                let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
                println!("bundle:          {}", status.dir.display());
                println!("MAC address:     {}", or_not_yet(&status.mac));
                println!("machine id:      {}", or_not_yet(&status.machine_id));
                println!(
                    "rootfs applied:  {}",
                    or_none(&status.applied_rootfs_version)
                );
                println!(
                    "rootfs pending:  {}",
                    or_none(&status.pending_rootfs_version)
                );
                println!("kernel:          {}", or_none(&status.kernel_version));
                for file in &status.files {
                    let allocated = match file.allocated {
                        Some(a) if file.size.is_some() => {
                            format!(" ({} allocated)", bytes_text(Some(a)))
                        }
                        _ => String::new(),
                    };
                    println!("{:<16} {}{allocated}", file.name, bytes_text(file.size));
                }
                for problem in &status.problems {
                    println!("problem:         {problem}");
                }
            }
            Ok(if status.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        BundleCommand::Prepare {
            dir,
            images,
            disk_size_gb,
        } => {
            let default_bundle = dir.is_none();
            let bundle = Bundle::open(bundle_dir(dir)?)?;
            // Only the default bundle follows the installed images on its
            // own; another bundle is seeded when asked.
            // A default images directory that holds no images (a source
            // checkout before `make`) is no error: the bundle may be seeded.
            let images = images.or_else(|| {
                default_bundle
                    .then(Bundle::default_images_dir)
                    .filter(|d| d.join(MANIFEST_FILE).is_file())
            });
            if let Some(images) = images {
                match bundle.seed_from(&images) {
                    Ok(SeedOutcome::Seeded {
                        rootfs_version,
                        previous,
                    }) => eprintln!(
                        "coworkvm: seeded rootfs {rootfs_version} from {} (was {})",
                        images.display(),
                        previous.as_deref().unwrap_or("none")
                    ),
                    Ok(SeedOutcome::UpToDate { .. }) => {}
                    Err(e) => return Err(e).context("cannot seed the bundle"),
                }
            }
            let prepared = bundle.prepare(disk_size_gb)?;
            if let Some(expanded) = &prepared.expanded {
                eprintln!(
                    "coworkvm: applied rootfs {} ({:.0} MB in {:.1} s)",
                    expanded.rootfs_version,
                    expanded.size as f64 / 1e6,
                    expanded.seconds
                );
            }
            println!("kernel:       {}", prepared.kernel.display());
            println!("initrd:       {}", prepared.initrd.display());
            println!("rootfs:       {}", prepared.rootfs.display());
            println!("session disk: {}", prepared.session_disk.display());
            println!("MAC address:  {}", prepared.identity.mac);
            println!("machine id:   {}", prepared.identity.machine_id);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `coworkvm serve`'s socket: the one systemd passed (which `--socket`,
/// when given too, must name), else `--socket`, else the default path.
fn serve_source(
    socket: Option<PathBuf>,
    inherited: Option<coworkvm_helper::activation::InheritedSocket>,
) -> anyhow::Result<coworkvm_helper::SocketSource> {
    use coworkvm_helper::SocketSource;
    Ok(match inherited {
        Some(sock) => {
            if let Some(p) = socket.filter(|p| *p != sock.path) {
                anyhow::bail!(
                    "--socket {} but systemd passed a socket bound to {}",
                    p.display(),
                    sock.path.display()
                );
            }
            SocketSource::Inherited(sock)
        }
        None => SocketSource::Bind(socket.unwrap_or_else(coworkvm_helper::default_socket_path)),
    })
}

/// `--idle-exit SECS`: 0 never; unset: [`coworkvm_helper::DEFAULT_IDLE_EXIT`]
/// when socket-activated, else never.
fn idle_exit(secs: Option<u64>, activated: bool) -> Option<std::time::Duration> {
    match secs {
        Some(0) => None,
        Some(n) => Some(std::time::Duration::from_secs(n)),
        None => activated.then_some(coworkvm_helper::DEFAULT_IDLE_EXIT),
    }
}

fn main() -> ExitCode {
    let args = normalize_args(std::env::args_os().collect());
    // `coworkvm run` keeps 0-124 and 128+ for the command: its own usage
    // errors are coworkvm's failures too (125), not a status 2 the command
    // could have returned.
    let is_run = args
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'))
        .is_some_and(|a| a == "run");
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(match (e.use_stderr(), is_run) {
                (false, _) => 0,
                (true, true) => coworkvm_helper::run::EXIT_RUN_FAILED,
                (true, false) => 2,
            });
        }
    };
    // Before anything else runs (no thread yet): the socket systemd passed,
    // taken off the environment so that no child sees it.
    let inherited = match cli.command {
        Command::Serve { .. } => coworkvm_helper::activation::take_listen_socket(),
        _ => Ok(None),
    };
    let debug_switch = init_logging(default_level(
        match cli.command {
            Command::Serve { .. } | Command::ShareKeeper { .. } => "info",
            _ => "warn",
        },
        cli.verbose,
        cli.quiet,
    ));
    let result = match cli.command {
        Command::Serve {
            socket,
            idle_exit: idle_secs,
            egress_resolve,
            egress_allow,
            config,
        } => inherited
            .context("socket activation")
            .and_then(|inherited| serve_source(socket, inherited))
            .and_then(|source| {
                let activated = matches!(source, coworkvm_helper::SocketSource::Inherited(_));
                let egress = coworkvm_helper::egress::config::load(
                    &egress_resolve,
                    &egress_allow,
                    config.as_deref(),
                )
                .context("the egress settings")?;
                coworkvm_helper::serve(
                    source,
                    Some(debug_switch),
                    egress,
                    idle_exit(idle_secs, activated),
                )
            })
            .map(|()| ExitCode::SUCCESS),
        Command::Boot(args) => boot(args),
        Command::SandboxProbe(args) => Ok(ExitCode::from(
            coworkvm_vmm::sandbox_probe::run(&args).clamp(0, 255) as u8,
        )),
        Command::Run(args) => Ok(run(args, !cli.quiet)),
        Command::ShareKeeper {
            control_fd,
            listen_fd,
            staging,
            virtiofsd,
        } => Ok(ExitCode::from(
            coworkvm_helper::share::keeper_main(&coworkvm_helper::share::KeeperArgs {
                control_fd,
                listen_fd,
                staging,
                virtiofsd,
            })
            .clamp(0, 255) as u8,
        )),
        Command::Bundle { command } => bundle(command),
        Command::Doctor {
            json,
            client,
            virtiofsd,
        } => {
            let kvm = doctor::run_doctor();
            let shares = coworkvm_helper::virtiofsd::resolve_all(virtiofsd.as_deref());
            let report = doctor_checks::run(&doctor_checks::Host::current(), kvm, &shares, client);
            if json {
                match serde_json::to_string(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("coworkvm: {e}"),
                }
            } else {
                for line in doctor_checks::text(&report) {
                    println!("{line}");
                }
            }
            Ok(ExitCode::from(report.exit_code()))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("coworkvm: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_args(args.iter().map(Into::into).collect())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn the_clients_helper_command_line_serves() {
        assert_eq!(
            norm(&["/x/helper", "-socket", "/run/s"]),
            ["/x/helper", "serve", "--socket", "/run/s"]
        );
        assert_eq!(
            norm(&["coworkvm", "--socket=/run/s"]),
            ["coworkvm", "serve", "--socket=/run/s"]
        );
        assert_eq!(
            norm(&["coworkvm", "serve", "-socket", "/s"]),
            ["coworkvm", "serve", "--socket", "/s"]
        );
        // Other subcommands are left alone.
        assert_eq!(
            norm(&["coworkvm", "run", "-socket"]),
            ["coworkvm", "run", "-socket"]
        );
        let cli = Cli::parse_from(norm(&["helper", "-socket", "/run/s"]));
        assert!(
            matches!(cli.command, Command::Serve { socket: Some(p), .. } if p == std::path::Path::new("/run/s"))
        );
        let cli = Cli::parse_from(norm(&["coworkvm", "serve"]));
        assert!(matches!(cli.command, Command::Serve { socket: None, .. }));
    }

    #[test]
    fn the_community_builds_node_command_line_serves() {
        // "$COWORK_NODE_PATH" <resources>/cowork-vm-service.js -socket PATH
        assert_eq!(
            norm(&[
                "/usr/bin/coworkvm",
                "/usr/lib/claude-desktop/resources/cowork-vm-service.js",
                "-socket",
                "/run/user/1000/claude-cowork-vm.sock"
            ]),
            [
                "/usr/bin/coworkvm",
                "serve",
                "--socket",
                "/run/user/1000/claude-cowork-vm.sock"
            ]
        );
        let cli = Cli::parse_from(norm(&[
            "coworkvm",
            "x.js",
            "-socket",
            "/s",
            "-idle-exit",
            "5",
        ]));
        assert!(matches!(
            cli.command,
            Command::Serve { socket: Some(p), idle_exit: Some(5), .. } if p == std::path::Path::new("/s")
        ));
        // A script path with no helper flag after it is not the stub's
        // command line: left for clap to refuse.
        assert_eq!(norm(&["coworkvm", "x.js"]), ["coworkvm", "x.js"]);
        assert!(Cli::try_parse_from(norm(&["coworkvm", "x.js"])).is_err());
        // Nor is a .js argument of another subcommand.
        assert_eq!(
            norm(&["coworkvm", "run", "x.js", "-socket", "/s"]),
            ["coworkvm", "run", "x.js", "-socket", "/s"]
        );
    }

    #[test]
    fn socket_activation_settings() {
        use std::time::Duration;
        assert_eq!(
            idle_exit(None, true),
            Some(coworkvm_helper::DEFAULT_IDLE_EXIT)
        );
        assert_eq!(idle_exit(None, false), None);
        assert_eq!(idle_exit(Some(0), true), None);
        assert_eq!(idle_exit(Some(7), false), Some(Duration::from_secs(7)));
        assert_eq!(default_level("info", 0, false), "info");
        assert_eq!(default_level("warn", 1, false), "info");
        assert_eq!(default_level("warn", 9, false), "trace");
        assert_eq!(default_level("info", 0, true), "error");
        // `--socket` naming another path than systemd's socket is refused
        // rather than silently served elsewhere.
        let dir = std::env::temp_dir().join(format!("cvm-src-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let inherited = || coworkvm_helper::activation::InheritedSocket {
            fd: std::os::fd::OwnedFd::from(l.try_clone().unwrap()),
            path: path.clone(),
            name: None,
        };
        let e = serve_source(Some(dir.join("b.sock")), Some(inherited()))
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("systemd passed a socket bound to"),
            "{e}"
        );
        assert!(matches!(
            serve_source(Some(path.clone()), Some(inherited())).unwrap(),
            coworkvm_helper::SocketSource::Inherited(_)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_run_and_serve_option_says_its_unit_or_kind() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for sub in ["run", "serve"] {
            let sub = cmd.find_subcommand(sub).unwrap();
            for arg in sub.get_arguments() {
                if arg.is_positional() || arg.get_id() == "help" {
                    continue;
                }
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                assert!(!help.is_empty(), "--{} has no help", arg.get_id());
            }
        }
        let run = cmd.find_subcommand("run").unwrap();
        let help_of = |id: &str| {
            run.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_help())
                .map(|h| h.to_string())
                .unwrap()
        };
        assert!(help_of("mem").contains("MiB"));
        assert!(help_of("disk_size_gb").contains("GiB"));
        assert!(help_of("boot_timeout").contains("Seconds"));
    }

    #[test]
    fn serve_takes_the_egress_flags_in_either_form() {
        assert_eq!(
            norm(&[
                "/x/helper",
                "-socket",
                "/run/s",
                "-egress-resolve",
                "h=1.2.3.4",
                "-config=/c"
            ]),
            [
                "/x/helper",
                "serve",
                "--socket",
                "/run/s",
                "--egress-resolve",
                "h=1.2.3.4",
                "--config=/c"
            ]
        );
        assert_eq!(
            norm(&["coworkvm", "-config", "/c", "-socket", "/s"]),
            ["coworkvm", "serve", "--config", "/c", "--socket", "/s"]
        );
        // A value that looks like a flag name is not one.
        assert_eq!(
            norm(&["coworkvm", "serve", "--egress-allow", "-configx"]),
            ["coworkvm", "serve", "--egress-allow", "-configx"]
        );
        let cli = Cli::parse_from(norm(&[
            "helper",
            "-socket",
            "/run/s",
            "--egress-resolve",
            "a.example=192.0.2.1",
            "--egress-resolve",
            "b.example:443=192.0.2.2",
            "--egress-allow",
            "127.0.0.1/32",
            "--config",
            "/etc/c.toml",
        ]));
        let Command::Serve {
            socket,
            egress_resolve,
            egress_allow,
            config,
            ..
        } = cli.command
        else {
            panic!("not serve");
        };
        assert_eq!(socket.as_deref(), Some(std::path::Path::new("/run/s")));
        assert_eq!(
            egress_resolve,
            ["a.example=192.0.2.1", "b.example:443=192.0.2.2"]
        );
        assert_eq!(egress_allow, ["127.0.0.1/32"]);
        assert_eq!(config.as_deref(), Some(std::path::Path::new("/etc/c.toml")));
    }
}
