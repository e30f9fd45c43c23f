//! `coworkvm-agent`: the guest's `/init`. It mounts the pseudo filesystems,
//! loads the initramfs's kernel modules, reaps every zombie, and serves the
//! guest protocol to the helper over vsock: spawning, streaming, feeding
//! and killing processes, each session as its own user under bubblewrap
//! when the session disk and bwrap are there; the session disk's janitor
//! requests; the SDK install; and the shared folders of the virtio-fs
//! device, bound into each session's sandbox (`share`).

mod agent;
mod cgroup;
mod conn;
mod egress;
mod init;
mod procs;
mod rootfs;
mod sandbox;
#[cfg(test)]
mod sandbox_it;
mod sdk;
mod seccomp;
mod sessions;
mod share;

/// An I/O error and what it was about (a path, or an action and its path):
/// the one I/O variant every module's error enum wraps.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct IoError {
    what: String,
    #[source]
    source: std::io::Error,
}

/// `map_err(io_at(path))`: an I/O error about `what`.
fn io_at(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> IoError {
    let what = what.to_string();
    move |source| IoError { what, source }
}

/// A lock that a panicking holder cannot poison for the others: the data
/// is still the best there is (the release build aborts on panic anyway;
/// tests unwind), and one failed request must not take every later one
/// down with it.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `setDebugLogging`: verbose agent logs on the console.
pub fn set_debug(on: bool) {
    DEBUG.store(on, std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "coworkvm-agent: debug logging {}",
        if on { "on" } else { "off" }
    );
}

pub fn debug_enabled() -> bool {
    DEBUG.load(std::sync::atomic::Ordering::Relaxed)
}

/// Logs to the console when debug logging is on. Never pass it secrets
/// (env, tokens, params): names and ids only.
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => {
        if $crate::debug_enabled() {
            eprintln!("coworkvm-agent: debug: {}", format_args!($($t)*));
        }
    };
}

/// Seconds since the kernel started (`CLOCK_BOOTTIME`); 0 if unreadable.
pub fn uptime_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, a live local.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// When each stage of the agent's start ended, in seconds since the kernel
/// started: printed on the console once the helper is reached, so that a
/// slow `startVM` shows where its time went (kernel, the agent's own
/// steps, or waiting for the host).
#[derive(Debug, Default)]
pub struct BootTimeline(Vec<(&'static str, f64)>);

impl BootTimeline {
    pub fn mark(&mut self, stage: &'static str) {
        self.0.push((stage, uptime_s()));
    }

    /// `agent: boot (s since the kernel started): init 2.91, ...`
    pub fn line(&self) -> String {
        let stages: Vec<String> = self
            .0
            .iter()
            .map(|(stage, at)| format!("{stage} {at:.2}"))
            .collect();
        format!("boot (s since the kernel started): {}", stages.join(", "))
    }
}

/// How one boot step went, reported to the helper before `ready`.
#[derive(Debug, Clone)]
pub struct StartupStep {
    pub step: &'static str,
    pub error: Option<String>,
}

/// Stage two: the rootfs and the session disk, when the VMM named them.
fn prepare_disks() -> Vec<StartupStep> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let disks = rootfs::BootDisks::from_cmdline(&cmdline);
    let mut steps = Vec::new();
    let mut run = |step: &'static str, r: Result<(), rootfs::BootDiskError>| {
        if let Err(e) = &r {
            eprintln!("coworkvm-agent: {step}: {e}");
        }
        steps.push(StartupStep {
            step,
            error: r.err().map(|e| e.to_string()),
        });
    };
    if let Some(dev) = &disks.rootfs {
        run("rootfs", rootfs::switch_to_rootfs(dev));
    }
    if let Some(dev) = &disks.sessions {
        run("sessions", rootfs::mount_sessions(dev));
    }
    steps
}

fn main() {
    let pid1 = std::process::id() == 1;
    let mut timeline = BootTimeline::default();
    timeline.mark("init");
    if pid1 {
        init::mount_pseudo_filesystems();
        init::bound_user_namespaces();
        init::load_modules();
        timeline.mark("modules");
        std::env::set_var("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
    }
    let steps = if pid1 { prepare_disks() } else { Vec::new() };
    timeline.mark("disks");
    let procs = procs::Procs::default();
    let reaper = procs.clone();
    let started = std::thread::Builder::new()
        .name("agent-reaper".into())
        .spawn(move || {
            let Err(e) = reaper.reap_forever();
            fatal(&format!("cannot start the reaper's drain thread: {e}"));
        });
    if let Err(e) = started {
        fatal(&format!("cannot start the reaper thread: {e}"));
    }
    let workers = conn::Workers::start(conn::WORKER_THREADS, conn::MAX_QUEUED_REQUESTS)
        .unwrap_or_else(|e| fatal(&format!("cannot start the request workers: {e}")));
    let agent = agent::Agent::detect(procs);
    timeline.mark("checks");
    conn::serve(agent, workers, steps, timeline);
}

/// The agent cannot work at all (a thread it needs from boot on could not
/// be made): says why on the console and exits, which as PID 1 stops the
/// guest.
fn fatal(why: &str) -> ! {
    eprintln!("coworkvm-agent: fatal: {why}");
    std::process::exit(1)
}

#[cfg(test)]
mod boot_timeline_tests {
    use super::*;

    #[test]
    fn the_timeline_names_each_stage_at_its_uptime_in_order() {
        let before = uptime_s();
        assert!(before > 0.0);
        let mut t = BootTimeline::default();
        t.mark("init");
        t.mark("connected");
        assert!(t.0[0].1 >= before && t.0[1].1 >= t.0[0].1, "{t:?}");
        let line = t.line();
        assert!(
            line.starts_with("boot (s since the kernel started): init "),
            "{line}"
        );
        assert!(line.contains(", connected "), "{line}");
    }
}
