//! Register state that puts a vCPU straight into 64-bit long mode at the
//! kernel's `startup_64`, as the Linux 64-bit boot protocol allows.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing the boot GDT/IDT to guest memory: {0}")]
    Gdt(vm_memory::GuestMemoryError),
    #[error("writing the boot page tables to guest memory: {0}")]
    PageTables(vm_memory::GuestMemoryError),
    #[error("KVM_{0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
}

type Result<T> = std::result::Result<T, RegsError>;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Boot GDT: null, 64-bit code, data, TSS (the TSS is only there so TR is valid).
const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_SELECTOR: u16 = 1 << 3;
const DATA_SELECTOR: u16 = 2 << 3;
const TSS_SELECTOR: u16 = 3 << 3;

/// Packs a segment descriptor; `flags` holds the access byte and the
/// granularity/size nibble as in the descriptor's bytes 5-6.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Expands a descriptor into the form KVM wants in `kvm_sregs`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

/// Writes the GDT, an empty IDT and identity page tables for the first GiB.
pub fn write_boot_structures<M: GuestMemory>(mem: &M) -> Result<()> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        let addr = GuestAddress(layout::BOOT_GDT_START + (i as u64) * 8);
        mem.write_obj(*entry, addr).map_err(RegsError::Gdt)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(RegsError::Gdt)?;

    // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> 2 MiB page i (present, rw, huge).
    mem.write_obj(layout::PDPTE_START | 0x03, GuestAddress(layout::PML4_START))
        .map_err(RegsError::PageTables)?;
    mem.write_obj(layout::PDE_START | 0x03, GuestAddress(layout::PDPTE_START))
        .map_err(RegsError::PageTables)?;
    for i in 0..512u64 {
        let pde = GuestAddress(layout::PDE_START).unchecked_add(i * 8);
        mem.write_obj((i << 21) | 0x83, pde)
            .map_err(RegsError::PageTables)?;
    }
    Ok(())
}

/// Long-mode system registers: paging on with the identity map, flat segments.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], CODE_SELECTOR);
    let data = segment_from_gdt(BOOT_GDT[2], DATA_SELECTOR);
    let tss = segment_from_gdt(BOOT_GDT[3], TSS_SELECTOR);

    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Puts `vcpu` in long mode at `entry`, with `rsi` pointing at the boot
/// parameters as the 64-bit boot protocol requires.
pub fn setup_long_mode(vcpu: &VcpuFd, entry: GuestAddress, boot_params: u64) -> Result<()> {
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Ioctl("GET_SREGS", e))?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(|e| RegsError::Ioctl("SET_SREGS", e))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: boot_params,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Ioctl("SET_REGS", e))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Ioctl("SET_FPU", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment_from_gdt(BOOT_GDT[1], CODE_SELECTOR);
        assert_eq!(code.l, 1, "code segment must be 64-bit");
        assert_eq!(code.db, 0, "L and D/B may not both be set");
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.present, 1);
        let data = segment_from_gdt(BOOT_GDT[2], DATA_SELECTOR);
        assert_eq!(data.type_, 0x3);
        assert_eq!(data.db, 1);
        assert_eq!(data.base, 0);
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn gdt_entry_round_trips_base_and_limit() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 0x10);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_structures(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPTE_START);
        let pdpte: u64 = mem.read_obj(GuestAddress(layout::PDPTE_START)).unwrap();
        assert_eq!(pdpte & !0xfff, layout::PDE_START);
        for i in [0u64, 1, 511] {
            let pde: u64 = mem
                .read_obj(GuestAddress(layout::PDE_START + i * 8))
                .unwrap();
            assert_eq!(pde, (i << 21) | 0x83);
        }
        let sregs = long_mode_sregs(kvm_sregs::default());
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
    }
}
