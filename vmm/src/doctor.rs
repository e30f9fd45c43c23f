//! Host checks: is KVM usable, and is it fast enough to boot Linux?
//!
//! Some hosts expose a `/dev/kvm` that emulates guest kernel code
//! instruction by instruction (nested set-ups without hardware help). Such a
//! KVM passes every API check yet needs minutes to boot a kernel. The probe
//! measures it: a tiny 64-bit guest runs a counted loop in ring 0 and we
//! time it; the guest counts its own iterations, and the instruction count
//! comes from that count, read back from its registers.

use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{cpu, regs};
use crate::vstate::vm::Vm;

/// Loop iterations of the probe guest: 3 instructions each.
pub const PROBE_ITERATIONS: u32 = 200_000;
/// Below this many million guest ring-0 instructions per second, booting
/// Linux takes minutes. Measured: a PVM-nested host emulating ring 0 runs
/// about 1; KVM inside a QEMU TCG guest about 30 (Linux boots in 3 s);
/// hardware virtualization thousands.
pub const BOOTABLE_MIPS: f64 = 10.0;
const CODE_ADDR: u64 = 0x10_0000;

/// What the KVM probe found (`coworkvm doctor --json` keeps these fields
/// at its top level).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoctorReport {
    pub kvm_device: bool,
    pub kvm_usable: bool,
    pub kvm_error: Option<String>,
    pub ring0_instructions: u64,
    pub ring0_elapsed_us: Option<u64>,
    pub ring0_mips: Option<f64>,
    pub can_boot_linux: bool,
    pub verdict: String,
}

/// Machine code: `xor eax, eax; mov ecx, N; 1: inc eax; dec ecx; jnz 1b;
/// hlt`. At the `hlt`, eax holds the iterations the guest ran.
pub fn probe_code(iterations: u32) -> Vec<u8> {
    let mut code = vec![0x31, 0xc0, 0xb9];
    code.extend_from_slice(&iterations.to_le_bytes());
    code.extend_from_slice(&[0xff, 0xc0, 0xff, 0xc9, 0x75, 0xfa, 0xf4]);
    code
}

/// Instructions of the probe outside its loop: `xor`, `mov`, `hlt`.
const PROBE_FIXED_INSTRUCTIONS: u64 = 3;
/// Instructions of one iteration: `inc`, `dec`, `jnz`.
const PROBE_LOOP_INSTRUCTIONS: u64 = 3;

/// One run of the probe guest, as the guest reports it.
#[derive(Debug, Clone, Copy)]
pub struct Ring0Run {
    /// Loop iterations the guest counted (its eax at the `hlt`).
    pub iterations: u64,
    /// Guest instructions executed, from `iterations`.
    pub instructions: u64,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("probe guest memory: {0}")]
    Memory(String),
    #[error("KVM_{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("probe guest stopped unexpectedly: {0}")]
    Exit(String),
    #[error("the probe guest needs at least one loop iteration")]
    NoIterations,
}

/// Runs the probe guest once, `iterations` times round its loop (0 would
/// mean 2^32: `dec ecx` wraps); returns what the guest reports and the time.
pub fn measure_ring0(iterations: u32) -> Result<Ring0Run, ProbeError> {
    if iterations == 0 {
        return Err(ProbeError::NoIterations);
    }
    let code = probe_code(iterations);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)])
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    mem.write_slice(&code, GuestAddress(CODE_ADDR))
        .map_err(|e| ProbeError::Memory(e.to_string()))?;
    regs::write_boot_structures(&mem)?;
    let vm = Vm::new(mem, false)?;
    let supported = vm
        .kvm()
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| ProbeError::Kvm("GET_SUPPORTED_CPUID", e))?;
    let mut vcpu = vm
        .fd()
        .create_vcpu(0)
        .map_err(|e| ProbeError::Kvm("CREATE_VCPU", e))?;
    cpu::setup_cpuid(&vcpu, &supported, 0, 1)?;
    regs::setup_long_mode(&vcpu, GuestAddress(CODE_ADDR), 0)?;
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(other) => return Err(ProbeError::Exit(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(ProbeError::Kvm("RUN", e)),
        }
    }
    let elapsed = start.elapsed();
    // The guest's own account: a halt anywhere but past the final `hlt`, or
    // with the loop counter not run down, means the probe did not run as
    // written, and its time measures something else.
    let regs = vcpu
        .get_regs()
        .map_err(|e| ProbeError::Kvm("GET_REGS", e))?;
    let end = CODE_ADDR + code.len() as u64;
    if regs.rip != end || regs.rcx & 0xffff_ffff != 0 {
        return Err(ProbeError::Exit(format!(
            "halted at {:#x} (want {end:#x}) with ecx {:#x}",
            regs.rip, regs.rcx
        )));
    }
    let counted = regs.rax & 0xffff_ffff;
    Ok(Ring0Run {
        iterations: counted,
        instructions: PROBE_FIXED_INSTRUCTIONS + PROBE_LOOP_INSTRUCTIONS * counted,
        elapsed,
    })
}

pub fn run_doctor() -> DoctorReport {
    let kvm_device = std::path::Path::new("/dev/kvm").exists();
    match measure_ring0(PROBE_ITERATIONS) {
        Ok(Ring0Run {
            instructions,
            elapsed,
            ..
        }) => {
            let us = elapsed.as_micros().max(1) as u64;
            let mips = instructions as f64 / us as f64;
            let can_boot_linux = mips >= BOOTABLE_MIPS;
            let verdict = if can_boot_linux {
                format!("KVM runs guest kernel code at {mips:.0} MIPS: VMs boot directly")
            } else {
                format!(
                    "KVM works but runs guest kernel code at {mips:.1} MIPS (instruction \
                     emulation, e.g. nested virtualization without hardware help): Linux \
                     guests would take minutes to boot here"
                )
            };
            DoctorReport {
                kvm_device,
                kvm_usable: true,
                kvm_error: None,
                ring0_instructions: instructions,
                ring0_elapsed_us: Some(us),
                ring0_mips: Some(mips),
                can_boot_linux,
                verdict,
            }
        }
        Err(e) => DoctorReport {
            kvm_device,
            kvm_usable: false,
            verdict: format!("KVM is not usable: {e}"),
            kvm_error: Some(e.to_string()),
            ring0_instructions: 0,
            ring0_elapsed_us: None,
            ring0_mips: None,
            can_boot_linux: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_code_shape() {
        let c = probe_code(0x1234);
        assert_eq!(&c[..3], &[0x31, 0xc0, 0xb9], "xor eax, eax; mov ecx, imm32");
        assert_eq!(&c[3..7], &0x1234u32.to_le_bytes());
        assert_eq!(&c[7..9], &[0xff, 0xc0], "inc eax");
        assert_eq!(*c.last().unwrap(), 0xf4, "ends in hlt");
        // jnz jumps back exactly onto `inc eax`.
        assert_eq!(c[c.len() - 2] as i8, -6);
    }

    #[test]
    fn zero_iterations_are_refused_before_any_guest_runs() {
        assert!(matches!(measure_ring0(0), Err(ProbeError::NoIterations)));
    }

    /// Runs a real 64-bit guest through the same register, page-table and
    /// CPUID set-up the Linux boot path uses, and checks the guest's own
    /// count of its loop. Needs /dev/kvm.
    #[test]
    fn probe_guest_runs_under_kvm_and_counts_its_loop() {
        if !std::path::Path::new("/dev/kvm").exists() {
            coworkvm_tests::skip_or_fail("no /dev/kvm");
            return;
        }
        for want in [1, 1000, 54_321] {
            let run = measure_ring0(want).expect("probe guest runs to hlt");
            assert_eq!(run.iterations, u64::from(want), "the guest's own count");
            assert!(run.elapsed > Duration::ZERO);
        }
    }
}
