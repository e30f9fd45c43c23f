//! Per-vCPU CPUID, MSR and local APIC set-up.

use kvm_bindings::{kvm_lapic_state, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM_{0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
    #[error("building the MSR list: {0}")]
    Msrs(String),
}

type Result<T> = std::result::Result<T, CpuError>;

const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back: without it Linux warns and may
/// map RAM uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Returns the CPUID table for vCPU `id` out of `count`: KVM's supported set
/// with this vCPU's APIC id in the leaves that report it.
pub fn cpuid_for_vcpu(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            0x1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((count as u32) << 16);
                entry.ecx |= CPUID_HYPERVISOR_BIT;
            }
            0xb | 0x1f => {
                // x2APIC topology: EDX is the x2APIC id on every sub-leaf.
                entry.edx = id as u32;
            }
            0x8000_001e => {
                entry.eax = id as u32;
            }
            _ => {}
        }
    }
    cpuid
}

pub fn setup_cpuid(vcpu: &VcpuFd, supported: &CpuId, id: u8, count: u8) -> Result<()> {
    let cpuid = cpuid_for_vcpu(supported, id, count);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| CpuError::Ioctl("SET_CPUID2", e))
}

pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = [kvm_msr_entry {
        index: MSR_MTRR_DEF_TYPE,
        data: MTRR_ENABLE_WB,
        ..Default::default()
    }];
    let msrs = Msrs::from_entries(&entries).map_err(|e| CpuError::Msrs(format!("{e:?}")))?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|e| CpuError::Ioctl("SET_MSRS", e))?;
    if written != entries.len() {
        tracing::debug!(written, wanted = entries.len(), "KVM accepted fewer MSRs");
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as PC firmware leaves them.
pub fn setup_lapic_lints(state: &mut kvm_lapic_state) {
    let lvt0 = get_reg(state, APIC_LVT0);
    set_reg(state, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(state, APIC_LVT1);
    set_reg(state, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
}

pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    let mut state = vcpu
        .get_lapic()
        .map_err(|e| CpuError::Ioctl("GET_LAPIC", e))?;
    setup_lapic_lints(&mut state);
    vcpu.set_lapic(&state)
        .map_err(|e| CpuError::Ioctl("SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_carries_the_apic_id() {
        let supported = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xdead_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        let c = cpuid_for_vcpu(&supported, 3, 4);
        let leaf1 = c.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "brand/clflush bits kept");
        assert_ne!(leaf1.ecx & CPUID_HYPERVISOR_BIT, 0);
        assert_eq!(c.as_slice()[1].edx, 3);
    }

    #[test]
    fn lint_modes() {
        let mut s = kvm_lapic_state::default();
        set_reg(&mut s, APIC_LVT0, 0x0001_0700);
        setup_lapic_lints(&mut s);
        assert_eq!((get_reg(&s, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!(get_reg(&s, APIC_LVT0) & 0x0001_0000, 0x0001_0000);
        assert_eq!((get_reg(&s, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
