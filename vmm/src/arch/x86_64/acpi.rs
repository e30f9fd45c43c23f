//! ACPI tables for a hardware-reduced x86_64 machine.
//!
//! Debian's kernel has `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` off, so the only
//! way to tell it about virtio-mmio devices is firmware: one `LNRO0005`
//! device per slot in the DSDT, as Firecracker and QEMU microvm do. The
//! hardware-reduced FADT also tells Linux there is no 8042, RTC or VGA to
//! probe (each probe is a slow run of port I/O exits), and points power-off
//! and reset at [`crate::devices::legacy::acpi_pm`].
//!
//! Layout: RSDP at `ACPI_START`, then XSDT, FADT, MADT, DSDT, each 16-byte
//! aligned, all below `ACPI_END`.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, IO,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout;
use crate::devices::legacy::acpi_pm;

pub const OEM_ID: [u8; 6] = *b"CWKVM ";
const OEM_TABLE_ID: [u8; 8] = *b"COWORKVM";
const OEM_REVISION: u32 = 1;

/// One virtio-mmio slot as the guest must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes, only {room} fit below {end:#x}")]
    NoRoom { needed: u64, room: u64, end: u64 },
    #[error("{0} vCPUs do not fit in the MADT's 8-bit APIC ids")]
    TooManyCpus(usize),
    #[error("virtio-mmio slot at {0:#x} is outside the 32-bit MMIO gap")]
    SlotAddress(u64),
    #[error("writing ACPI tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

// FADT field offsets (ACPI 6.5, table 5.9).
const FADT_LEN: u32 = 276;
const FADT_IAPC_BOOT_ARCH: usize = 109;
const FADT_FLAGS: usize = 112;
const FADT_RESET_REG: usize = 116;
const FADT_RESET_VALUE: usize = 128;
const FADT_MINOR_VERSION: usize = 131;
const FADT_X_DSDT: usize = 140;
const FADT_SLEEP_CONTROL_REG: usize = 244;
const FADT_SLEEP_STATUS_REG: usize = 256;
const FADT_HYPERVISOR_ID: usize = 268;

const FADT_F_RESET_REG_SUP: u32 = 1 << 10;
const FADT_F_HW_REDUCED_ACPI: u32 = 1 << 20;
/// IAPC_BOOT_ARCH: VGA not present, MSI not supported, CMOS RTC not present.
/// The "8042 present" bit (1) stays clear.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_LAPIC_ENABLED: u32 = 1;

/// A Generic Address Structure for a byte-wide system I/O port.
fn io_port_gas(port: u16) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[0] = 1; // system I/O space
    gas[1] = 8; // register bit width
    gas[2] = 0; // bit offset
    gas[3] = 1; // byte access
    gas[4..12].copy_from_slice(&(port as u64).to_le_bytes());
    gas
}

pub fn fadt(dsdt_addr: u64) -> Sdt {
    let mut fadt = Sdt::new(*b"FACP", FADT_LEN, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    fadt.write_u16(
        FADT_IAPC_BOOT_ARCH,
        IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT,
    );
    fadt.write_u32(FADT_FLAGS, FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP);
    fadt.write_bytes(
        FADT_RESET_REG,
        &io_port_gas(layout::PM_IO_BASE + acpi_pm::RESET),
    );
    fadt.write_u8(FADT_RESET_VALUE, acpi_pm::RESET_VALUE);
    fadt.write_u8(FADT_MINOR_VERSION, 5);
    fadt.write_u64(FADT_X_DSDT, dsdt_addr);
    fadt.write_bytes(
        FADT_SLEEP_CONTROL_REG,
        &io_port_gas(layout::PM_IO_BASE + acpi_pm::SLEEP_CONTROL),
    );
    fadt.write_bytes(
        FADT_SLEEP_STATUS_REG,
        &io_port_gas(layout::PM_IO_BASE + acpi_pm::SLEEP_STATUS),
    );
    fadt.write_bytes(FADT_HYPERVISOR_ID, b"COWORKVM");
    fadt.update_checksum();
    fadt
}

pub fn madt(num_cpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, layout::LAPIC_ADDR as u32);
    // Flags stay 0: no legacy 8259 set-up expected of the OS.
    for id in 0..num_cpus {
        madt.append_slice(&[MADT_LOCAL_APIC, 8, id, id]);
        madt.append_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    }
    madt.append_slice(&[MADT_IO_APIC, 12, 0, 0]);
    madt.append_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    madt.append_slice(&0u32.to_le_bytes()); // GSI base
    madt.update_checksum();
    madt
}

/// The AML body: `_S5_` (so Linux offers ACPI power-off), COM1, and the
/// virtio-mmio devices.
pub fn dsdt_body(slots: &[VirtioMmioSlot]) -> Result<Vec<u8>, AcpiError> {
    let mut body = Vec::new();
    // Name (_S5, Package () { 5, 0 }): sleep type a/b values for S5.
    let s5 = Package::new(vec![&acpi_pm::S5_SLEEP_TYPE, &aml::ZERO]);
    Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let com1_io = IO::new(layout::SERIAL_PORT_BASE, layout::SERIAL_PORT_BASE, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, layout::IRQ_SERIAL);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);

    for (i, slot) in slots.iter().enumerate() {
        let base = u32::try_from(slot.base)
            .ok()
            .filter(|b| (*b as u64) >= layout::MMIO_GAP_START)
            .ok_or(AcpiError::SlotAddress(slot.base))?;
        let size = u32::try_from(slot.size).map_err(|_| AcpiError::SlotAddress(slot.base))?;
        let window = Memory32Fixed::new(true, base, size);
        // Edge-triggered: each irqfd write is one interrupt, no resample needed.
        let irq = Interrupt::new(true, true, false, false, slot.gsi);
        let crs = ResourceTemplate::new(vec![&window, &irq]);
        let path = format!("_SB_.V{i:03X}");
        let uid = i;
        Device::new(
            path.as_str().into(),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &uid),
                &Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    Ok(body)
}

pub fn dsdt(slots: &[VirtioMmioSlot]) -> Result<Sdt, AcpiError> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_body(slots)?);
    dsdt.update_checksum();
    Ok(dsdt)
}

fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// Writes all tables into guest memory; returns the RSDP address for the
/// zero page's `acpi_rsdp_addr`.
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    num_cpus: u8,
    slots: &[VirtioMmioSlot],
) -> Result<GuestAddress, AcpiError> {
    if num_cpus as usize > 254 {
        return Err(AcpiError::TooManyCpus(num_cpus as usize));
    }
    let rsdp_addr = layout::ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    let xsdt_len = 36 + 3 * 8;
    let fadt_addr = align16(xsdt_addr + xsdt_len);
    let madt_addr = align16(fadt_addr + FADT_LEN as u64);
    let madt = madt(num_cpus);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let dsdt = dsdt(slots)?;
    let end = dsdt_addr + dsdt.len() as u64;
    if end > layout::ACPI_END {
        return Err(AcpiError::NoRoom {
            needed: end - layout::ACPI_START,
            room: layout::ACPI_END - layout::ACPI_START,
            end: layout::ACPI_END,
        });
    }
    let fadt = fadt(dsdt_addr);
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, dsdt_addr] {
        xsdt.append(addr);
    }
    xsdt.update_checksum();

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);

    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))?;
    mem.write_slice(xsdt.as_slice(), GuestAddress(xsdt_addr))?;
    mem.write_slice(fadt.as_slice(), GuestAddress(fadt_addr))?;
    mem.write_slice(madt.as_slice(), GuestAddress(madt_addr))?;
    mem.write_slice(dsdt.as_slice(), GuestAddress(dsdt_addr))?;
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn slots(n: usize) -> Vec<VirtioMmioSlot> {
        (0..n)
            .map(|i| VirtioMmioSlot {
                base: layout::VIRTIO_MMIO_BASE + i as u64 * layout::VIRTIO_MMIO_SIZE,
                size: layout::VIRTIO_MMIO_SIZE,
                gsi: layout::IRQ_VIRTIO_BASE + i as u32,
            })
            .collect()
    }

    fn read(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        m.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads a whole table at `addr`, checking signature and checksum.
    fn table(m: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let head = read(m, addr, 36);
        assert_eq!(&head[0..4], sig);
        let len = u32_at(&head, 4) as usize;
        assert!(len >= 36);
        assert!(
            addr + len as u64 <= layout::ACPI_END,
            "{sig:?} within the window"
        );
        let t = read(m, addr, len);
        assert_eq!(sum(&t), 0, "{:?} checksum", std::str::from_utf8(sig));
        t
    }

    fn build(cpus: u8, n: usize) -> (GuestMemoryMmap, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
        let m = mem();
        let rsdp = create_acpi_tables(&m, cpus, &slots(n)).unwrap();
        assert_eq!(rsdp.0, layout::ACPI_START);
        let r = read(&m, rsdp.0, 36);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(r[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(sum(&r[0..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&r), 0, "RSDP extended checksum");
        let xsdt = table(&m, u64_at(&r, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 24);
        let fadt = table(&m, u64_at(&xsdt, 36), b"FACP");
        let madt = table(&m, u64_at(&xsdt, 44), b"APIC");
        let dsdt = table(&m, u64_at(&xsdt, 52), b"DSDT");
        assert_eq!(u64_at(&fadt, FADT_X_DSDT), u64_at(&xsdt, 52));
        (m, xsdt, fadt, madt, dsdt)
    }

    #[test]
    fn tables_chain_and_checksum() {
        build(2, 3);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_pm_registers() {
        let (_, _, fadt, _, _) = build(1, 1);
        assert_eq!(fadt.len(), FADT_LEN as usize);
        assert_eq!(fadt[8], 6, "FADT major revision");
        let flags = u32_at(&fadt, FADT_FLAGS);
        assert_ne!(flags & FADT_F_HW_REDUCED_ACPI, 0);
        assert_ne!(flags & FADT_F_RESET_REG_SUP, 0);
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(boot_arch & 0b10, 0, "no 8042");
        assert_ne!(boot_arch & IAPC_CMOS_RTC_NOT_PRESENT, 0);
        let ctl = &fadt[FADT_SLEEP_CONTROL_REG..FADT_SLEEP_CONTROL_REG + 12];
        assert_eq!(ctl[0], 1, "system I/O");
        assert_eq!(u64_at(ctl, 4), layout::PM_IO_BASE as u64);
        let sts = &fadt[FADT_SLEEP_STATUS_REG..FADT_SLEEP_STATUS_REG + 12];
        assert_eq!(u64_at(sts, 4), layout::PM_IO_BASE as u64 + 1);
        let rst = &fadt[FADT_RESET_REG..FADT_RESET_REG + 12];
        assert_eq!(u64_at(rst, 4), (layout::PM_IO_BASE + acpi_pm::RESET) as u64);
        assert_eq!(fadt[FADT_RESET_VALUE], acpi_pm::RESET_VALUE);
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let (_, _, _, madt, _) = build(4, 1);
        assert_eq!(u32_at(&madt, 36), layout::LAPIC_ADDR as u32);
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut ioapics = 0;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2);
            match kind {
                MADT_LOCAL_APIC => {
                    assert_eq!(madt[off + 2], madt[off + 3], "uid = apic id");
                    assert_eq!(u32_at(&madt, off + 4), MADT_LAPIC_ENABLED);
                    lapics.push(madt[off + 3]);
                }
                MADT_IO_APIC => {
                    assert_eq!(u32_at(&madt, off + 4), layout::IOAPIC_ADDR as u32);
                    assert_eq!(u32_at(&madt, off + 8), 0);
                    ioapics += 1;
                }
                other => panic!("unexpected MADT entry {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, vec![0, 1, 2, 3]);
        assert_eq!(ioapics, 1);
    }

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn dsdt_describes_every_slot_and_s5() {
        let (_, _, _, _, dsdt) = build(1, 5);
        assert_eq!(count(&dsdt, b"LNRO0005"), 5);
        assert_eq!(count(&dsdt, b"_S5_"), 1);
        assert_eq!(count(&dsdt, b"COM1"), 1);
        // Each slot's Memory32Fixed descriptor carries its base address.
        for s in slots(5) {
            let mut desc = vec![0x86, 9, 0, 1];
            desc.extend_from_slice(&(s.base as u32).to_le_bytes());
            desc.extend_from_slice(&(s.size as u32).to_le_bytes());
            assert_eq!(count(&dsdt, &desc), 1, "slot {:#x}", s.base);
            // Extended interrupt descriptor with its GSI.
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend_from_slice(&s.gsi.to_le_bytes());
            assert_eq!(count(&dsdt, &irq), 1, "gsi {}", s.gsi);
        }
    }

    #[test]
    fn tables_that_do_not_fit_are_an_error() {
        let m = mem();
        let r = create_acpi_tables(&m, 1, &slots(2000));
        assert!(matches!(r, Err(AcpiError::NoRoom { .. })), "{r:?}");
        assert!(matches!(
            create_acpi_tables(&m, 255, &slots(1)),
            Err(AcpiError::TooManyCpus(255))
        ));
        let bad = [VirtioMmioSlot {
            base: 0x1000,
            size: 0x1000,
            gsi: 5,
        }];
        assert!(matches!(
            create_acpi_tables(&m, 1, &bad),
            Err(AcpiError::SlotAddress(0x1000))
        ));
    }
}
