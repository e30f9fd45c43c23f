//! Per-thread seccomp filters: one allow-list per kind of VMM thread.
//!
//! Filters are installed by each thread on itself (no TSYNC), as the first
//! thing it does once its resources are set up. A syscall outside the
//! thread's list raises SIGSYS ([`SeccompAction::Trap`]); the handler
//! installed by [`install_sigsys_handler`] writes one line naming the
//! syscall and the thread kind and ends the process with
//! [`SECCOMP_KILL_STATUS`].
//!
//! Filters stack: a thread keeps its parent's filters and adds its own,
//! and a syscall must pass all of them. Device workers are therefore
//! started by a dedicated spawner thread ([`super::spawner`]) whose filter
//! is the union of the workers' lists plus what creating a thread takes,
//! and not by the vCPU thread whose MMIO write activated the device: a
//! worker started by a vCPU would be limited to the vCPU's list.
//!
//! How the lists were measured: from reading the code paths each thread
//! runs (the VMM's own, rust-vmm's, std's and glibc's thread start-up and
//! exit), then checked by booting the stock Debian kernel with every
//! device in the L1 rig with these filters: every missing syscall shows as
//! a named SIGSYS kill there.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::syscall_names::SYSCALL_NAMES;

/// Exit status of a VMM killed for a forbidden syscall: 128 + SIGSYS, what
/// a shell reports for a process that SIGSYS killed.
pub const SECCOMP_KILL_STATUS: i32 = 128 + libc::SIGSYS;

/// `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = 0xae80;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {0} seccomp filter: {1}")]
    Build(&'static str, seccompiler::BackendError),
    #[error("installing the {0} seccomp filter: {1}")]
    Install(&'static str, seccompiler::Error),
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The kinds of threads of a running VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// The thread that built the machine and then waits for its end.
    Main = 1,
    /// A vCPU: KVM_RUN and the device emulation of its exits.
    Vcpu = 2,
    /// Starts device workers (see the module comment).
    Spawner = 3,
    /// virtio-blk: positioned reads and writes of the disk image.
    BlockWorker = 4,
    /// virtio-rng: reads of the already open `/dev/urandom`.
    RngWorker = 5,
    /// virtio-vsock: Unix sockets, accepted and connected.
    VsockWorker = 6,
    /// A worker of a device this module does not know: the event loop only.
    OtherWorker = 7,
    /// virtio-fs: vhost-user requests to its back-end (virtiofsd).
    FsWorker = 8,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Spawner => "worker-spawner",
            ThreadKind::BlockWorker => "virtio-blk",
            ThreadKind::RngWorker => "virtio-rng",
            ThreadKind::VsockWorker => "virtio-vsock",
            ThreadKind::OtherWorker => "device-worker",
            ThreadKind::FsWorker => "virtio-fs",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => ThreadKind::Main,
            2 => ThreadKind::Vcpu,
            3 => ThreadKind::Spawner,
            4 => ThreadKind::BlockWorker,
            5 => ThreadKind::RngWorker,
            6 => ThreadKind::VsockWorker,
            7 => ThreadKind::OtherWorker,
            8 => ThreadKind::FsWorker,
            _ => return None,
        })
    }

    /// The worker kind for a device worker thread, by the thread name that
    /// `DeviceWorker::start` gives it. An unknown device gets the bare
    /// event-loop list: it fails loudly (a named SIGSYS) rather than open.
    pub fn for_worker(thread_name: &str) -> Self {
        match thread_name {
            "virtio-blk" => ThreadKind::BlockWorker,
            "virtio-rng" => ThreadKind::RngWorker,
            "virtio-vsock" => ThreadKind::VsockWorker,
            "virtio-fs" => ThreadKind::FsWorker,
            _ => ThreadKind::OtherWorker,
        }
    }
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Only fails for an argument index above 5; every index here is a constant below.
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .expect("argument index is at most 5")
}

fn dword(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .expect("argument index is at most 5")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    // Only fails for an empty condition list; every caller passes one or more.
    SeccompRule::new(conds).expect("a rule has at least one condition")
}

/// Allows `nr` whatever its arguments.
fn allow(rules: &mut Rules, nr: i64) {
    rules.insert(nr, Vec::new());
}

/// Allows `nr` when one of `alternatives` matches; adds to what is already
/// allowed (an unconditional allowance stays unconditional).
fn allow_if(rules: &mut Rules, nr: i64, alternatives: Vec<SeccompRule>) {
    match rules.get_mut(&nr) {
        Some(existing) if existing.is_empty() => {}
        Some(existing) => existing.extend(alternatives),
        None => {
            rules.insert(nr, alternatives);
        }
    }
}

/// `ioctl(fd, request, ...)` for the listed requests only.
fn allow_ioctls(rules: &mut Rules, requests: &[u64]) {
    let alts = requests
        .iter()
        .map(|&r| rule(vec![dword(1, SeccompCmpOp::Eq, r)]))
        .collect();
    allow_if(rules, libc::SYS_ioctl, alts);
}

/// `fcntl(fd, cmd, ...)` for the listed commands only.
fn allow_fcntls(rules: &mut Rules, cmds: &[i32]) {
    let alts = cmds
        .iter()
        .map(|&c| rule(vec![dword(1, SeccompCmpOp::Eq, c as u64)]))
        .collect();
    allow_if(rules, libc::SYS_fcntl, alts);
}

/// Unions `other` into `rules`.
fn merge(rules: &mut Rules, other: Rules) {
    for (nr, alts) in other {
        if alts.is_empty() {
            allow(rules, nr);
        } else {
            allow_if(rules, nr, alts);
        }
    }
}

/// What every thread needs: memory (never executable), locks, time, its
/// own exit, logging to stderr, and `abort()` for a panic (panic = abort).
fn common() -> Rules {
    let mut r = Rules::new();
    for nr in [
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_getrandom,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ] {
        allow(&mut r, nr);
    }
    // No new executable memory: mmap and mprotect without PROT_EXEC.
    let no_exec = || {
        vec![rule(vec![dword(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )])]
    };
    allow_if(&mut r, libc::SYS_mmap, no_exec());
    allow_if(&mut r, libc::SYS_mprotect, no_exec());
    // Debug builds of std check that a descriptor is open before closing it.
    allow_fcntls(&mut r, &[libc::F_GETFD]);
    // abort(): tgkill(own pid, own tid, SIGABRT) only. The filters are
    // compiled in the VMM's own process, so its pid is known here; without
    // it a VMM taken over could abort any process of the user's.
    // SAFETY: getpid(2) takes nothing and cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    allow_if(
        &mut r,
        libc::SYS_tgkill,
        vec![rule(vec![
            dword(0, SeccompCmpOp::Eq, pid),
            dword(2, SeccompCmpOp::Eq, libc::SIGABRT as u64),
        ])],
    );
    r
}

/// A vCPU: KVM_RUN, and what its exits do: serial output to the console
/// (which may truncate it at its bound), irqfd and ioeventfd writes, and
/// device activation and reset (duplicating eventfds and files for the
/// worker, handing it to the spawner, joining a stopped worker).
fn vcpu() -> Rules {
    let mut r = common();
    allow_ioctls(&mut r, &[KVM_RUN]);
    allow(&mut r, libc::SYS_eventfd2);
    allow_fcntls(&mut r, &[libc::F_DUPFD_CLOEXEC]);
    allow(&mut r, libc::SYS_ftruncate);
    allow(&mut r, libc::SYS_lseek);
    r
}

/// The event loop every device worker runs: epoll over its queue
/// eventfds and stop event, eventfd reads, irqfd writes.
fn worker_base() -> Rules {
    let mut r = common();
    for nr in [
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_read,
    ] {
        allow(&mut r, nr);
    }
    r
}

fn block_worker() -> Rules {
    let mut r = worker_base();
    for nr in [
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
    ] {
        allow(&mut r, nr);
    }
    r
}

fn rng_worker() -> Rules {
    worker_base()
}

/// The vsock muxer: accepts host connections on its listener, connects to
/// `<uds>_PORT` for the guest (AF_UNIX only: no other socket family),
/// moves bytes, and reads peer credentials.
fn vsock_worker() -> Rules {
    let mut r = worker_base();
    for nr in [
        libc::SYS_connect,
        libc::SYS_accept4,
        libc::SYS_shutdown,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
    ] {
        allow(&mut r, nr);
    }
    allow_if(
        &mut r,
        libc::SYS_socket,
        vec![rule(vec![dword(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])],
    );
    allow_if(
        &mut r,
        libc::SYS_getsockopt,
        [libc::SO_PEERCRED, libc::SO_ERROR]
            .iter()
            .map(|&opt| {
                rule(vec![
                    dword(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64),
                    dword(2, SeccompCmpOp::Eq, opt as u64),
                ])
            })
            .collect(),
    );
    // std's set_nonblocking is ioctl(FIONBIO); fcntl for the F_GETFL /
    // F_SETFL way of doing the same, and try_clone.
    allow_ioctls(&mut r, &[libc::FIONBIO]);
    allow_fcntls(
        &mut r,
        &[libc::F_GETFL, libc::F_SETFL, libc::F_DUPFD_CLOEXEC],
    );
    r
}

/// virtio-fs: the vring setup and teardown on the already connected
/// vhost-user socket (vmm-sys-util's `sendmsg(.., MSG_NOSIGNAL)` with the
/// memfd, irqfd and kick descriptors, `recvmsg(.., 0)` for the
/// acknowledgements). No socket, connect or any file: the handshake and
/// the connection happened before the sandbox. The back-end's data path
/// (rings, irqfd) needs nothing from this thread.
fn fs_worker() -> Rules {
    let mut r = worker_base();
    allow_if(
        &mut r,
        libc::SYS_sendmsg,
        vec![rule(vec![dword(
            2,
            SeccompCmpOp::Eq,
            libc::MSG_NOSIGNAL as u64,
        )])],
    );
    allow_if(
        &mut r,
        libc::SYS_recvmsg,
        vec![rule(vec![dword(2, SeccompCmpOp::Eq, 0)])],
    );
    r
}

/// The spawner: every worker's list (a worker keeps it beneath its own),
/// plus starting a thread: glibc's pthread_create (clone with CLONE_THREAD
/// only: no new processes; clone3, whose flags a filter cannot see, gets
/// ENOSYS from [`clone3_enosys`] and glibc falls back to clone), and the
/// new thread's own start-up in std and glibc before it installs its
/// filter (robust list, rseq, its name, the stack-guard query, seccomp).
fn spawner() -> Rules {
    let mut r = common();
    merge(&mut r, block_worker());
    merge(&mut r, rng_worker());
    merge(&mut r, vsock_worker());
    merge(&mut r, fs_worker());
    allow_if(
        &mut r,
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )])],
    );
    allow(&mut r, libc::SYS_clone3);
    allow(&mut r, libc::SYS_set_robust_list);
    allow(&mut r, libc::SYS_rseq);
    allow(&mut r, libc::SYS_sched_getaffinity);
    // PR_SET_NO_NEW_PRIVS: seccompiler sets it (again: it is one-way)
    // before each filter it installs.
    allow_if(
        &mut r,
        libc::SYS_prctl,
        [libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS]
            .iter()
            .map(|&op| rule(vec![dword(0, SeccompCmpOp::Eq, op as u64)]))
            .collect(),
    );
    allow_if(
        &mut r,
        libc::SYS_seccomp,
        vec![rule(vec![dword(
            0,
            SeccompCmpOp::Eq,
            libc::SECCOMP_SET_MODE_FILTER as u64,
        )])],
    );
    r
}

/// The main thread once the vCPUs run: waits for the end, reads the KVM
/// statistics files, flushes the disks and the console, reports, exits.
fn main_thread() -> Rules {
    let mut r = common();
    for nr in [libc::SYS_pread64, libc::SYS_fdatasync, libc::SYS_fsync] {
        allow(&mut r, nr);
    }
    r
}

fn rules_for(kind: ThreadKind) -> Rules {
    match kind {
        ThreadKind::Main => main_thread(),
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Spawner => spawner(),
        ThreadKind::BlockWorker => block_worker(),
        ThreadKind::RngWorker => rng_worker(),
        ThreadKind::VsockWorker => vsock_worker(),
        ThreadKind::OtherWorker => worker_base(),
        ThreadKind::FsWorker => fs_worker(),
    }
}

/// The syscall numbers a thread kind may make (for the tests).
#[cfg(test)]
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<i64> {
    rules_for(kind).into_keys().collect()
}

/// The name of syscall `nr`, or "" if unknown.
pub fn syscall_name(nr: i64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|i| SYSCALL_NAMES.get(i).copied())
        .unwrap_or("")
}

/// A compiled filter for one thread kind.
#[derive(Clone)]
pub struct ThreadFilter {
    kind: ThreadKind,
    programs: Vec<BpfProgram>,
}

impl std::fmt::Debug for ThreadFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadFilter")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Makes clone3 fail with ENOSYS (and allows everything else): stacked
/// with an allow-list that allows clone3, the kernel picks the errno.
fn clone3_enosys() -> Result<BpfProgram, SeccompError> {
    let mut rules = Rules::new();
    allow(&mut rules, libc::SYS_clone3);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build("clone3", e))?;
    filter
        .try_into()
        .map_err(|e| SeccompError::Build("clone3", e))
}

impl ThreadFilter {
    pub fn compile(kind: ThreadKind) -> Result<Self, SeccompError> {
        let filter = SeccompFilter::new(
            rules_for(kind),
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(|e| SeccompError::Build(kind.name(), e))?;
        let mut programs = vec![filter
            .try_into()
            .map_err(|e| SeccompError::Build(kind.name(), e))?];
        if kind == ThreadKind::Spawner {
            programs.push(clone3_enosys()?);
        }
        Ok(Self { kind, programs })
    }

    /// Confines the calling thread (and the threads it starts from now on).
    pub fn install(&self) -> Result<(), SeccompError> {
        CURRENT_KIND.with(|k| k.set(self.kind as u8));
        for p in &self.programs {
            seccompiler::apply_filter(p).map_err(|e| SeccompError::Install(self.kind.name(), e))?;
        }
        Ok(())
    }
}

/// Every thread kind's filter, compiled before the sandbox is entered.
#[derive(Debug, Clone)]
pub struct Filters {
    pub main: ThreadFilter,
    pub vcpu: ThreadFilter,
    pub spawner: ThreadFilter,
    pub block: ThreadFilter,
    pub rng: ThreadFilter,
    pub vsock: ThreadFilter,
    pub other_worker: ThreadFilter,
    pub fs: ThreadFilter,
}

impl Filters {
    pub fn compile() -> Result<Self, SeccompError> {
        Ok(Self {
            main: ThreadFilter::compile(ThreadKind::Main)?,
            vcpu: ThreadFilter::compile(ThreadKind::Vcpu)?,
            spawner: ThreadFilter::compile(ThreadKind::Spawner)?,
            block: ThreadFilter::compile(ThreadKind::BlockWorker)?,
            rng: ThreadFilter::compile(ThreadKind::RngWorker)?,
            vsock: ThreadFilter::compile(ThreadKind::VsockWorker)?,
            other_worker: ThreadFilter::compile(ThreadKind::OtherWorker)?,
            fs: ThreadFilter::compile(ThreadKind::FsWorker)?,
        })
    }

    /// The filter for a device worker thread called `thread_name`.
    pub fn for_worker(&self, thread_name: &str) -> &ThreadFilter {
        match ThreadKind::for_worker(thread_name) {
            ThreadKind::BlockWorker => &self.block,
            ThreadKind::RngWorker => &self.rng,
            ThreadKind::VsockWorker => &self.vsock,
            ThreadKind::FsWorker => &self.fs,
            _ => &self.other_worker,
        }
    }
}

thread_local! {
    /// The calling thread's kind, for the SIGSYS message (0: none). A
    /// const-initialized Cell without destructor: a plain TLS load, safe
    /// to read in a signal handler.
    static CURRENT_KIND: Cell<u8> = const { Cell::new(0) };
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: i32 = 1;

/// A fixed-size line built without allocating (for the signal handler).
struct LineBuf {
    buf: [u8; 256],
    len: usize,
}

impl LineBuf {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The SIGSYS message for syscall `nr` made by a thread of kind `kind`.
fn sigsys_line(nr: i64, kind: u8) -> LineBuf {
    let mut line = LineBuf {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"coworkvm: seccomp: the ");
    line.push(
        ThreadKind::from_u8(kind)
            .map_or("unconfined", ThreadKind::name)
            .as_bytes(),
    );
    line.push(b" thread made the forbidden system call ");
    let name = syscall_name(nr);
    line.push(if name.is_empty() { "?" } else { name }.as_bytes());
    line.push(b" (");
    line.push_num(nr as u64);
    line.push(b"); the VMM stops\n");
    line
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Everything here is async-signal-safe: reads of the siginfo the
    // kernel passed and of a TLS cell, a stack buffer, write(2), _exit(2).
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // For SIGSYS the union holds { void *call_addr; int syscall; unsigned arch },
    // so the syscall number sits 8 bytes after the union's start (offset 16).
    // SAFETY: siginfo_t is 128 bytes; offset 24 is inside it and aligned for i32.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() } as i64;
    let kind = CURRENT_KIND.with(|k| k.get());
    let line = if code == SYS_SECCOMP {
        sigsys_line(nr, kind)
    } else {
        let mut l = LineBuf {
            buf: [0; 256],
            len: 0,
        };
        l.push(b"coworkvm: SIGSYS not raised by seccomp; the VMM stops\n");
        l
    };
    // SAFETY: writes `line.len` initialized bytes of a live stack buffer to
    // fd 2; the result is irrelevant as the process ends next.
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
    // SAFETY: _exit ends the process at once; nothing else runs after it.
    unsafe { libc::_exit(SECCOMP_KILL_STATUS) };
}

/// Installs the process-wide SIGSYS handler that reports a forbidden syscall.
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags).
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t owned by `act`.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: `act` is fully initialized and the handler only does
    // async-signal-safe work; the old action is not needed.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        Filters::compile().unwrap();
    }

    #[test]
    fn names_match_libc_numbers() {
        assert_eq!(syscall_name(libc::SYS_socket), "socket");
        assert_eq!(syscall_name(libc::SYS_openat), "openat");
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
        assert_eq!(syscall_name(libc::SYS_ioctl), "ioctl");
        assert_eq!(syscall_name(-1), "");
        assert_eq!(syscall_name(100_000), "");
    }

    #[test]
    fn sigsys_line_names_the_call_and_the_thread() {
        let l = sigsys_line(libc::SYS_socket, ThreadKind::Vcpu as u8);
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert_eq!(
            s,
            "coworkvm: seccomp: the vcpu thread made the forbidden system call socket (41); \
             the VMM stops\n"
        );
        let l = sigsys_line(9999, 0);
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert!(
            s.contains("unconfined thread") && s.contains("? (9999)"),
            "{s}"
        );
    }

    #[test]
    fn no_kind_may_open_files_or_run_programs() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Spawner,
            ThreadKind::BlockWorker,
            ThreadKind::RngWorker,
            ThreadKind::VsockWorker,
            ThreadKind::OtherWorker,
            ThreadKind::FsWorker,
        ] {
            let allowed = allowed_syscalls(kind);
            for nr in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_openat2,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_unshare,
                libc::SYS_setns,
                libc::SYS_bind,
                libc::SYS_listen,
                libc::SYS_fork,
                libc::SYS_vfork,
            ] {
                assert!(
                    !allowed.contains(&nr),
                    "{} may make {}",
                    kind.name(),
                    syscall_name(nr)
                );
            }
        }
        // Only the spawner creates threads.
        assert!(allowed_syscalls(ThreadKind::Spawner).contains(&libc::SYS_clone));
        assert!(!allowed_syscalls(ThreadKind::Vcpu).contains(&libc::SYS_clone));
        assert!(!allowed_syscalls(ThreadKind::Main).contains(&libc::SYS_clone));
        // Only the vsock worker has sockets.
        assert!(allowed_syscalls(ThreadKind::VsockWorker).contains(&libc::SYS_socket));
        assert!(!allowed_syscalls(ThreadKind::BlockWorker).contains(&libc::SYS_socket));
        // virtio-fs talks on the socket it was given, and makes none.
        let fs = allowed_syscalls(ThreadKind::FsWorker);
        assert!(fs.contains(&libc::SYS_sendmsg) && fs.contains(&libc::SYS_recvmsg));
        for nr in [libc::SYS_socket, libc::SYS_connect, libc::SYS_accept4] {
            assert!(!fs.contains(&nr), "virtio-fs may make {}", syscall_name(nr));
        }
        // Only the virtio-fs and vsock workers (and their spawner) send
        // descriptors: not a vCPU, whose MMIO exit activates the device.
        for kind in [ThreadKind::Vcpu, ThreadKind::Main, ThreadKind::BlockWorker] {
            assert!(!allowed_syscalls(kind).contains(&libc::SYS_sendmsg));
        }
        assert_eq!(
            ThreadKind::for_worker(crate::devices::virtio::fs::WORKER_THREAD),
            ThreadKind::FsWorker
        );
    }

    #[test]
    fn the_spawner_allows_whatever_a_worker_does() {
        let spawner = allowed_syscalls(ThreadKind::Spawner);
        for kind in [
            ThreadKind::BlockWorker,
            ThreadKind::RngWorker,
            ThreadKind::VsockWorker,
            ThreadKind::OtherWorker,
            ThreadKind::FsWorker,
        ] {
            for nr in allowed_syscalls(kind) {
                assert!(spawner.contains(&nr), "spawner lacks {}", syscall_name(nr));
            }
        }
    }
}
