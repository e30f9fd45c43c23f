//! `coworkvm sandbox-probe` (hidden): sets up the same sandbox as `boot`,
//! with the same thread layout (main, a vCPU-kind thread, the spawner and
//! a device worker started through it), and then makes one chosen access
//! from one chosen thread. The tests (`vmm/tests/sandbox.rs`) use it to
//! prove from inside the VMM's own context what the sandbox stops, and
//! that what the VMM needs still works.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::seccomp::{Filters, ThreadFilter};
use super::{spawner, Policy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeThread {
    /// The main thread, after its filter (installed last, as in `boot`).
    Main,
    /// The main thread after the process-wide layers but before any
    /// seccomp filter: isolates Landlock, namespaces and rlimits.
    BeforeSeccomp,
    /// A thread with the vCPU filter.
    Vcpu,
    /// A virtio-vsock worker started through the spawner.
    VsockWorker,
    /// A virtio-blk worker started through the spawner.
    BlockWorker,
}

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// Skip the sandbox (the control case).
    #[arg(long)]
    pub no_sandbox: bool,
    /// The vsock socket whose directory the sandbox grants.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// Which thread makes the access.
    #[arg(long, value_enum, default_value = "main")]
    pub thread: ProbeThread,
    /// The access: `wait` (print "ready", then sleep up to 60 s in every
    /// thread kind), `open:PATH` (read a file), `connect:PATH` (a Unix
    /// socket), `socket-inet` (an IPv4 socket), `execve`.
    #[arg(long)]
    pub access: String,
}

/// What the probe's access did, as one line on stdout.
fn access(what: &str) -> String {
    if let Some(path) = what.strip_prefix("open:") {
        match std::fs::read(path) {
            Ok(b) => format!("probe: ok: read {} bytes", b.len()),
            Err(e) => format!("probe: error: {e}"),
        }
    } else if let Some(path) = what.strip_prefix("connect:") {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => "probe: ok: connected".into(),
            Err(e) => format!("probe: error: {e}"),
        }
    } else if what == "socket-inet" {
        // SAFETY: socket takes integers only; the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            format!("probe: error: {}", std::io::Error::last_os_error())
        } else {
            // SAFETY: `fd` is the socket just created and owned here.
            unsafe { libc::close(fd) };
            "probe: ok: socket".into()
        }
    } else if what == "execve" {
        // Raw execve: std's Command::exec would first reset SIGPIPE
        // (rt_sigaction), and that, not execve, would be the call named.
        let prog = c"/bin/true";
        let argv = [prog.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        // SAFETY: a NUL-terminated path and NULL-terminated argv and envp
        // arrays that outlive the call; on success this process is replaced.
        unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        format!("probe: error: {}", std::io::Error::last_os_error())
    } else {
        format!("probe: error: unknown access {what}")
    }
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Sleeps on a condition variable (futex with a time-out), which every
/// thread kind may do, unlike nanosleep.
fn idle(for_: Duration) {
    let pair = (Mutex::new(()), Condvar::new());
    let guard = pair.0.lock().unwrap_or_else(|p| p.into_inner());
    let _ = pair.1.wait_timeout(guard, for_);
}

fn install(filter: Option<&ThreadFilter>) {
    if let Some(f) = filter {
        if let Err(e) = f.install() {
            say(&format!("probe: setup failed: {e}"));
            std::process::exit(2);
        }
    }
}

/// Runs the probe; returns the process's exit code.
pub fn run(args: &ProbeArgs) -> i32 {
    let filters = if args.no_sandbox {
        None
    } else {
        let filters = match Filters::compile() {
            Ok(f) => f,
            Err(e) => {
                say(&format!("probe: setup failed: {e}"));
                return 2;
            }
        };
        // As `boot` does: the vsock socket by its name in its directory.
        let uds = match args.vsock.as_deref().map(super::enter_vsock_dir) {
            Some(Ok(name)) => Some(name),
            Some(Err(e)) => {
                say(&format!("probe: setup failed: {e}"));
                return 2;
            }
            None => None,
        };
        let policy = Policy::new(uds.as_deref(), 64 << 20);
        if let Err(e) = super::apply_process(&policy) {
            say(&format!("probe: setup failed: {e}"));
            return 2;
        }
        Some(filters)
    };
    if args.thread == ProbeThread::BeforeSeccomp {
        say(&access(&args.access));
        return 0;
    }
    if let Some(f) = &filters {
        if let Err(e) = spawner::start(f.clone()) {
            say(&format!("probe: setup failed: {e}"));
            return 2;
        }
    }
    let wait = args.access == "wait";
    let what = Arc::new(args.access.clone());

    // A vCPU-kind thread, started before the main filter as in `boot`.
    let vcpu_filter = filters.as_ref().map(|f| f.vcpu.clone());
    let vcpu_access = (wait || args.thread == ProbeThread::Vcpu).then(|| what.clone());
    let (confined_tx, confined) = std::sync::mpsc::channel();
    let vcpu = std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            install(vcpu_filter.as_ref());
            let _ = confined_tx.send(());
            if let Some(what) = vcpu_access {
                if what.as_str() == "wait" {
                    idle(Duration::from_secs(60));
                } else {
                    say(&access(&what));
                }
            }
        });
    let vcpu = match vcpu {
        Ok(h) => h,
        Err(e) => {
            say(&format!("probe: setup failed: {e}"));
            return 2;
        }
    };

    // As in `boot`, the main thread confines itself once the vCPU has.
    let _ = confined.recv();
    install(filters.as_ref().map(|f| &f.main));

    let worker_name = match args.thread {
        ProbeThread::BlockWorker => Some("virtio-blk"),
        ProbeThread::VsockWorker => Some("virtio-vsock"),
        _ if wait => Some("virtio-vsock"),
        _ => None,
    };
    let worker = worker_name.map(|name| {
        let what = what.clone();
        spawner::spawn_worker(
            name.into(),
            Box::new(move || {
                if what.as_str() == "wait" {
                    idle(Duration::from_secs(60));
                } else {
                    say(&access(&what));
                }
            }),
        )
    });
    if wait {
        say("ready");
        idle(Duration::from_secs(60));
        return 0;
    }
    if args.thread == ProbeThread::Main {
        say(&access(&what));
    }
    let _ = vcpu.join();
    if let Some(Ok(w)) = worker {
        let _ = w.join();
    }
    0
}
