//! The seccomp filter of every session process, handed to bwrap
//! (`--seccomp FD`, a raw array of `struct sock_filter`), which installs it
//! right before it executes the session's command.
//!
//! The filter is a deny list: a session runs arbitrary developer tools, so
//! an allow list would break them one by one, while the escapes it closes
//! are few and known:
//!
//! - `socket()`/`socketpair()` of any family but `AF_UNIX`, `AF_INET`,
//!   `AF_INET6` and `AF_NETLINK` fail with EPERM. Above all `AF_VSOCK`:
//!   vsock has no network namespace, so `--unshare-net` does not stop a
//!   session from connecting to the host's agent port. The rest (packet,
//!   alg, key, bluetooth, ...) are kernel surface no session needs.
//! - Netfilter's netlink (`AF_NETLINK` with `NETLINK_NETFILTER`): a
//!   session may make user and network namespaces of its own (the
//!   runtime's nested sandbox), and root in such a namespace reaches
//!   nf_tables, the kernel surface behind most recent user-namespace
//!   privilege escalations. Routing netlink, which tools use to read their
//!   addresses, stays.
//! - io_uring (`IORING_OP_SOCKET` would make a socket without `socket()`).
//! - Kernel surface no session needs: bpf, perf_event_open, userfaultfd,
//!   the module and kexec calls, the keyrings (not namespaced), syslog.
//!
//! `ptrace` (and `process_vm_readv`/`writev`) stay allowed: debuggers and
//! `strace` are ordinary developer tools, and the pid namespace plus the
//! single-uid user namespace already confine them to the session's own
//! processes.
//!
//! Architecture: seccompiler's program kills a process whose syscall comes
//! from another ABI (the i386 `int 0x80` entry, whose `socketcall` would
//! otherwise go around the x86_64 numbers). The x32 ABI shares x86_64's
//! audit arch with bit 30 set in the syscall number, which no rule below
//! would match, so a short prefix fails every x32 call with EPERM first
//! (the guest kernel is built without x32; this is depth).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// Socket families a session may create.
pub const ALLOWED_FAMILIES: [i32; 4] = [
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// Syscalls that fail with EPERM whatever their arguments.
pub const DENIED_SYSCALLS: &[(&str, libc::c_long)] = &[
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("keyctl", libc::SYS_keyctl),
    ("syslog", libc::SYS_syslog),
];

/// `__X32_SYSCALL_BIT`: set in the number of every x32 syscall.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the session seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("the session seccomp filter's memfd: {0}")]
    Memfd(#[source] std::io::Error),
}

/// The session filter, compiled: default Allow, every deny EPERM.
pub fn session_filter() -> Result<BpfProgram, SeccompError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| seccompiler::BackendError::InvalidTargetArch(std::env::consts::ARCH.into()))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // One rule, all conditions together: the family is none of the allowed.
    // Dword: the kernel reads `int family`, the low 32 bits.
    let not_allowed = ALLOWED_FAMILIES
        .iter()
        .map(|f| SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, *f as u64))
        .collect::<Result<Vec<_>, _>>()?;
    let family_rule = SeccompRule::new(not_allowed)?;
    let netfilter_rule = SeccompRule::new(vec![
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_NETLINK as u64,
        )?,
        SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::NETLINK_NETFILTER as u64,
        )?,
    ])?;
    rules.insert(libc::SYS_socket, vec![family_rule.clone(), netfilter_rule]);
    rules.insert(libc::SYS_socketpair, vec![family_rule]);
    for (_, nr) in DENIED_SYSCALLS {
        // An empty chain matches the syscall whatever its arguments.
        rules.insert(*nr, Vec::new());
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    let program: BpfProgram = filter.try_into()?;
    Ok(with_abi_prefix(program))
}

/// Prepends the x32 check (see the module comment). BPF jumps are relative,
/// so seccompiler's program runs unchanged after it.
#[cfg(target_arch = "x86_64")]
fn with_abi_prefix(program: BpfProgram) -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const SECCOMP_DATA_NR: u32 = 0;
    const SECCOMP_DATA_ARCH: u32 = 4;
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let mut v = vec![
        // Another arch: on to seccompiler's check, which kills.
        ins(LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        ins(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        ins(LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        ins(JGE_K, 0, 1, X32_SYSCALL_BIT),
        ins(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ];
    v.extend(program);
    v
}

#[cfg(not(target_arch = "x86_64"))]
fn with_abi_prefix(program: BpfProgram) -> BpfProgram {
    program
}

/// The program as the bytes of `struct sock_filter[]`, what bwrap reads.
pub fn to_bytes(program: &[seccompiler::sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for i in program {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    out
}

/// A close-on-exec memfd holding `data`, its offset at 0, sealed against
/// any change: how the agent hands bwrap the filter and the per-session
/// passwd and group files.
pub fn sealed_memfd(name: &std::ffi::CStr, data: &[u8]) -> Result<OwnedFd, SeccompError> {
    let err = |_| SeccompError::Memfd(std::io::Error::last_os_error());
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(err(()));
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.write_all(data).map_err(SeccompError::Memfd)?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0))
        .map_err(SeccompError::Memfd)?;
    let fd = OwnedFd::from(f);
    use std::os::fd::AsRawFd;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(err(()));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `probe` in a forked child under `program` (none: unfiltered);
    /// returns the child's wait status. The child only makes system calls.
    /// It is a "clone" child (exit signal 0): the agent's reaper in the
    /// sandbox tests, which run in this process too, waits without
    /// `__WCLONE` and so never takes it from us.
    fn in_child(program: Option<&[seccompiler::sock_filter]>, probe: &dyn Fn() -> i32) -> i32 {
        let prog = program.map(|p| libc::sock_fprog {
            len: p.len() as u16,
            filter: p.as_ptr() as *mut libc::sock_filter,
        });
        // SAFETY: clone without CLONE_VM and with a null stack is fork
        // without its exit signal; the child makes only system calls
        // (prctl, the probe's, _exit) on data prepared before, and never
        // returns.
        unsafe {
            let pid = libc::syscall(libc::SYS_clone, 0, 0, 0, 0, 0) as libc::pid_t;
            assert!(pid >= 0);
            if pid == 0 {
                if let Some(prog) = &prog {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || libc::prctl(
                            libc::PR_SET_SECCOMP,
                            libc::SECCOMP_MODE_FILTER,
                            prog as *const libc::sock_fprog,
                        ) != 0
                    {
                        libc::_exit(100);
                    }
                }
                libc::_exit(probe());
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, libc::__WCLONE), pid);
            status
        }
    }

    /// 0: created; the errno otherwise.
    fn socket_errno(family: i32, ty: i32) -> i32 {
        // SAFETY: socket takes integers; the descriptor is closed at once.
        let fd = unsafe { libc::socket(family, ty, 0) };
        if fd >= 0 {
            // SAFETY: a descriptor this function just made.
            unsafe { libc::close(fd) };
            return 0;
        }
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }

    fn exit_code(status: i32) -> i32 {
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn the_filter_is_well_formed() {
        let p = session_filter().unwrap();
        assert!(p.len() < 4096, "{}", p.len());
        let bytes = to_bytes(&p);
        assert_eq!(bytes.len(), p.len() * 8);
        // The last instruction of seccompiler's program is the default:
        // RET ALLOW.
        let last = p.last().unwrap();
        assert_eq!((last.code, last.k), (0x06, libc::SECCOMP_RET_ALLOW));
        // Every other return is ALLOW, ERRNO(EPERM) or the arch kill.
        for i in p.iter().filter(|i| i.code == 0x06) {
            assert!(
                [
                    libc::SECCOMP_RET_ALLOW,
                    libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
                    libc::SECCOMP_RET_KILL_PROCESS
                ]
                .contains(&i.k),
                "{i:?}"
            );
        }
    }

    #[test]
    fn vsock_and_other_families_are_denied_with_eperm() {
        let p = session_filter().unwrap();
        // Without the filter a vsock socket is not refused with EPERM
        // (made, or EAFNOSUPPORT where the host has no vsock).
        let unfiltered = exit_code(in_child(None, &|| {
            socket_errno(libc::AF_VSOCK, libc::SOCK_STREAM)
        }));
        assert_ne!(unfiltered, libc::EPERM);
        for (family, ty) in [
            (libc::AF_VSOCK, libc::SOCK_STREAM),
            (libc::AF_PACKET, libc::SOCK_RAW),
            (libc::AF_ALG, libc::SOCK_SEQPACKET),
            (libc::AF_KEY, libc::SOCK_RAW),
            (libc::AF_BLUETOOTH, libc::SOCK_STREAM),
        ] {
            let r = exit_code(in_child(Some(&p), &|| socket_errno(family, ty)));
            assert_eq!(r, libc::EPERM, "family {family}");
        }
        // Upper bits of the int argument do not slip a family through.
        let r = exit_code(in_child(Some(&p), &|| {
            // SAFETY: raw socket(2) with integer arguments.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_socket,
                    (1u64 << 32) | libc::AF_VSOCK as u64,
                    libc::SOCK_STREAM,
                    0,
                )
            };
            if fd >= 0 {
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
            }
        }));
        assert_eq!(r, libc::EPERM);
        // socketpair: the same rule.
        let r = exit_code(in_child(Some(&p), &|| {
            let mut fds = [0i32; 2];
            // SAFETY: socketpair writes two descriptors into a live array.
            let rc =
                unsafe { libc::socketpair(libc::AF_VSOCK, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
            if rc == 0 {
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
            }
        }));
        assert_eq!(r, libc::EPERM);
    }

    #[test]
    fn netfilter_netlink_is_denied_and_routing_netlink_is_not() {
        let p = session_filter().unwrap();
        let netfilter = || {
            // SAFETY: socket takes integers; the descriptor is closed at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_NETFILTER,
                )
            };
            if fd >= 0 {
                // SAFETY: a descriptor this closure just made.
                unsafe { libc::close(fd) };
                return 0;
            }
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        };
        // Unfiltered: made (or EPROTONOSUPPORT without nfnetlink), not EPERM.
        assert_ne!(exit_code(in_child(None, &netfilter)), libc::EPERM);
        assert_eq!(exit_code(in_child(Some(&p), &netfilter)), libc::EPERM);
        let route = || socket_errno(libc::AF_NETLINK, libc::SOCK_RAW);
        assert_eq!(exit_code(in_child(Some(&p), &route)), 0);
    }

    #[test]
    fn unix_and_inet_sockets_still_work() {
        let p = session_filter().unwrap();
        let probes: [&dyn Fn() -> i32; 5] = [
            &|| socket_errno(libc::AF_UNIX, libc::SOCK_STREAM),
            &|| socket_errno(libc::AF_INET, libc::SOCK_STREAM),
            &|| socket_errno(libc::AF_INET, libc::SOCK_DGRAM),
            &|| socket_errno(libc::AF_NETLINK, libc::SOCK_RAW),
            &|| {
                let mut fds = [0i32; 2];
                // SAFETY: socketpair writes two descriptors into a live array.
                unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) }
            },
        ];
        for probe in probes {
            assert_eq!(exit_code(in_child(Some(&p), probe)), 0);
        }
    }

    #[test]
    fn io_uring_and_the_kernel_surface_are_denied() {
        let p = session_filter().unwrap();
        let r = exit_code(in_child(Some(&p), &|| {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup reads and writes a 120-byte
            // io_uring_params; the buffer is that large and zeroed.
            let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
            if fd >= 0 {
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
            }
        }));
        assert_eq!(r, libc::EPERM);
        // bpf(BPF_PROG_LOAD-less garbage) and keyctl: EPERM before any
        // argument is looked at.
        for nr in [libc::SYS_bpf, libc::SYS_keyctl, libc::SYS_userfaultfd] {
            let r = exit_code(in_child(Some(&p), &|| {
                // SAFETY: the probed calls get null or zero arguments,
                // which the filter refuses before the kernel reads them.
                let rc = unsafe { libc::syscall(nr, 0, 0, 0) };
                if rc >= 0 {
                    0
                } else {
                    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
                }
            }));
            assert_eq!(r, libc::EPERM, "syscall {nr}");
        }
        // Ordinary calls still run.
        assert_eq!(
            exit_code(in_child(Some(&p), &|| {
                // SAFETY: getppid takes no arguments.
                i32::from(unsafe { libc::getppid() } <= 0)
            })),
            0
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_numbers_are_denied() {
        let p = session_filter().unwrap();
        let r = exit_code(in_child(Some(&p), &|| {
            // SAFETY: an x32 socket(2); integers only.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_socket | X32_SYSCALL_BIT as libc::c_long,
                    libc::AF_VSOCK,
                    libc::SOCK_STREAM,
                    0,
                )
            };
            if rc >= 0 {
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
            }
        }));
        assert_eq!(r, libc::EPERM);
    }

    /// The i386 entry (`int 0x80`) would reach socketcall(2) under numbers
    /// the x86_64 rules do not know: the arch check kills the process.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_i386_entry_is_killed() {
        fn int80_getpid() -> i32 {
            let mut rax: u64 = 20; // i386 getpid
                                   // SAFETY: int 0x80 with eax = getpid touches no memory; the
                                   // clobbered registers are declared.
            unsafe {
                std::arch::asm!("int 0x80", inout("rax") rax, out("rcx") _, out("r11") _,
                                lateout("r8") _, lateout("r9") _, lateout("r10") _);
            }
            i32::from(rax as i64 <= 0)
        }
        // Unfiltered, the host either runs it (0) or has no i386 entry
        // (SIGSEGV); the test means something only in the first case.
        let plain = in_child(None, &int80_getpid);
        if !(libc::WIFEXITED(plain) && libc::WEXITSTATUS(plain) == 0) {
            coworkvm_tests::skip_or_fail("this host has no i386 syscall entry");
            return;
        }
        let p = session_filter().unwrap();
        let s = in_child(Some(&p), &int80_getpid);
        assert!(
            libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == libc::SIGSYS,
            "status {s:#x}"
        );
    }

    #[test]
    fn a_sealed_memfd_reads_back_from_the_start() {
        use std::io::Read;
        let fd = sealed_memfd(c"t", b"root:x:0:0\n").unwrap();
        let mut f = std::fs::File::from(fd);
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "root:x:0:0\n");
        use std::io::Write;
        assert!(f.write_all(b"x").is_err(), "sealed against writes");
    }
}
