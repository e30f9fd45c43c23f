//! ACPI tables for a hardware-reduced x86_64 machine.
//!
//! Debian's kernel has `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` off, so the only
//! way to tell it about virtio-mmio devices is firmware: one `LNRO0005`
//! device per slot in the DSDT, as Firecracker and Cloud Hypervisor do. The
//! hardware-reduced FADT also tells Linux there is no 8042, RTC or VGA to
//! probe (each probe is a slow run of port I/O exits), and points power-off
//! and reset at [`crate::devices::legacy::acpi_pm`].
//!
//! Layout: RSDP at `ACPI_START`, then XSDT, FADT, MADT, DSDT, each 16-byte
//! aligned, all below `ACPI_END`.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout;
use crate::devices::legacy::acpi_pm;

const OEM_ID: [u8; 6] = *b"CWKVM ";
const OEM_TABLE_ID: [u8; 8] = *b"COWORKVM";
const OEM_REVISION: u32 = 1;
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"COWORKVM";

/// Length of every table's standard header.
const SDT_HEADER_LEN: u64 = 36;
/// The XSDT lists FADT, MADT and DSDT.
const XSDT_ENTRIES: u64 = 3;
/// Device names are `V000`..`VFFF`: AML name segments are four characters.
const MAX_SLOTS: usize = 0x1000;

/// IAPC_BOOT_ARCH bits (ACPI 6.5, table 5.10). Bit 1 ("8042 present") and
/// bit 0 ("legacy devices") stay clear so Linux skips the i8042 and PnP BIOS
/// probes.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// One virtio-mmio slot as the guest must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("a machine needs at least one vCPU")]
    NoCpus,
    #[error("{0} virtio-mmio slots do not fit the DSDT's device names (at most {MAX_SLOTS})")]
    TooManySlots(usize),
    #[error(
        "virtio-mmio slot {index} ({base:#x}, {size:#x} bytes) is not inside the 32-bit MMIO gap"
    )]
    SlotAddress { index: usize, base: u64, size: u64 },
    #[error("virtio-mmio slot {index} has GSI {gsi}, beyond the IOAPIC's last pin {max}", max = layout::IRQ_MAX)]
    SlotGsi { index: usize, gsi: u32 },
    #[error("ACPI tables need {needed} bytes, only {room} fit below {end:#x}")]
    NoRoom { needed: u64, room: u64, end: u64 },
    #[error("writing ACPI tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// A byte-wide register in port I/O space, the only access width
/// [`acpi_pm::AcpiPmDevice`] decodes.
fn io_port(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn fadt(dsdt_addr: u64) -> FADT {
    // HW_REDUCED_ACPI: no PM1/GPE blocks or SCI to emulate; Linux then uses
    // the sleep control/status registers for S5 and skips the legacy PIC and
    // PIT set-up it would otherwise do on the firmware's word.
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.reset_reg = io_port(layout::PM_IO_BASE + acpi_pm::RESET);
    fadt.reset_value = acpi_pm::RESET_VALUE;
    fadt.sleep_control_reg = io_port(layout::PM_IO_BASE + acpi_pm::SLEEP_CONTROL);
    fadt.sleep_status_reg = io_port(layout::PM_IO_BASE + acpi_pm::SLEEP_STATUS);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    fadt.finalize()
}

fn madt(num_cpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR as u32),
    );
    // APIC id = index is what the vCPU set-up programs into each LAPIC;
    // the processor UID only has to be unique.
    for id in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // No interrupt source overrides: every ISA IRQ is identity-mapped onto
    // the IOAPIC pin of the same number, which Linux assumes by default.
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR as u32, 0));
    madt
}

fn check_slot(index: usize, slot: &VirtioMmioSlot) -> Result<(u32, u32), AcpiError> {
    let in_gap = slot.size > 0
        && slot.base >= layout::MMIO_GAP_START
        && slot
            .base
            .checked_add(slot.size)
            .is_some_and(|end| end <= layout::MMIO_GAP_END);
    // The gap ends at 4 GiB, so a slot inside it always fits Memory32Fixed.
    let (Some(base), Some(size), true) = (
        u32::try_from(slot.base).ok(),
        u32::try_from(slot.size).ok(),
        in_gap,
    ) else {
        return Err(AcpiError::SlotAddress {
            index,
            base: slot.base,
            size: slot.size,
        });
    };
    // Linux could not route a GSI past the IOAPIC's pins; the device would
    // then fail to probe in the guest with no hint why.
    if slot.gsi > layout::IRQ_MAX {
        return Err(AcpiError::SlotGsi {
            index,
            gsi: slot.gsi,
        });
    }
    Ok((base, size))
}

/// The AML body: `_S5_` (so Linux offers ACPI power-off), COM1, and the
/// virtio-mmio devices.
fn dsdt_body(slots: &[VirtioMmioSlot]) -> Result<Vec<u8>, AcpiError> {
    if slots.len() > MAX_SLOTS {
        return Err(AcpiError::TooManySlots(slots.len()));
    }
    let mut body = Vec::new();

    // Linux registers ACPI power-off only if \_S5 evaluates; SLP_TYPa (the
    // first element) is what it writes to the sleep control register.
    let s5 = Package::new(vec![
        &acpi_pm::S5_SLEEP_TYPE,
        &aml::ZERO,
        &aml::ZERO,
        &aml::ZERO,
    ]);
    Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    // Described so 8250_pnp binds it with the right IRQ rather than relying
    // only on the legacy probe.
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

    for (index, slot) in slots.iter().enumerate() {
        let (base, size) = check_slot(index, slot)?;
        let window = Memory32Fixed::new(true, base, size);
        // Edge-triggered, active high: an irqfd write is one interrupt with
        // no resample/EOI path, and it matches the default polarity and
        // trigger Linux gives the identity-mapped ISA IRQs below 16.
        let irq = Interrupt::new(true, true, false, false, slot.gsi);
        let crs = ResourceTemplate::new(vec![&window, &irq]);
        let path = format!("_SB_.V{index:03X}");
        Device::new(
            path.as_str().into(),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &index),
                &Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    Ok(body)
}

fn dsdt(slots: &[VirtioMmioSlot]) -> Result<Sdt, AcpiError> {
    // Revision 2 or later makes AML integers 64-bit.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_body(slots)?);
    Ok(dsdt)
}

fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// Writes the tables into guest memory; returns the RSDP address (to put in
/// `boot_params.acpi_rsdp_addr`).
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    num_cpus: u8,
    slots: &[VirtioMmioSlot],
) -> Result<GuestAddress, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    let madt = to_bytes(&madt(num_cpus));
    let dsdt = dsdt(slots)?;

    let rsdp_addr = layout::ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    let fadt_addr = align16(xsdt_addr + SDT_HEADER_LEN + 8 * XSDT_ENTRIES);
    let madt_addr = align16(fadt_addr + FADT::len() as u64);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > layout::ACPI_END {
        return Err(AcpiError::NoRoom {
            needed: end - layout::ACPI_START,
            room: layout::ACPI_END - layout::ACPI_START,
            end: layout::ACPI_END,
        });
    }

    let fadt = to_bytes(&fadt(dsdt_addr));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, dsdt_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, SDT_HEADER_LEN + 8 * XSDT_ENTRIES);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (bytes, addr) in [
        (rsdp.as_slice(), rsdp_addr),
        (xsdt.as_slice(), xsdt_addr),
        (fadt.as_slice(), fadt_addr),
        (madt.as_slice(), madt_addr),
        (dsdt.as_slice(), dsdt_addr),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    // FADT field offsets (ACPI 6.5, table 5.9), to parse the table back
    // independently of the builder that wrote it.
    const FADT_LEN: usize = 276;
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
    const IAPC_8042: u16 = 1 << 1;

    const MADT_LOCAL_APIC: u8 = 0;
    const MADT_IO_APIC: u8 = 1;

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

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
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

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    /// Reads a whole table at `addr`, checking signature, header and checksum.
    fn table(m: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let name = std::str::from_utf8(sig).unwrap();
        let head = read(m, addr, 36);
        assert_eq!(&head[0..4], sig);
        let len = u32_at(&head, 4) as usize;
        assert!((36..0x10000).contains(&len), "{name} length {len}");
        assert!(
            addr >= layout::ACPI_START && addr + len as u64 <= layout::ACPI_END,
            "{name} at {addr:#x}+{len:#x} outside the ACPI window"
        );
        assert_eq!(&head[10..16], &OEM_ID, "{name} OEM id");
        assert_eq!(&head[16..24], &OEM_TABLE_ID, "{name} OEM table id");
        let t = read(m, addr, len);
        assert_eq!(sum(&t), 0, "{name} checksum");
        t
    }

    struct Tables {
        /// (address, length) of RSDP, XSDT, FADT, MADT, DSDT.
        spans: Vec<(u64, u64)>,
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    /// Builds the tables and follows the pointers from the RSDP the way the
    /// guest does.
    fn build(cpus: u8, n: usize) -> Tables {
        let m = mem();
        let rsdp_addr = create_acpi_tables(&m, cpus, &slots(n)).unwrap();
        assert_eq!(rsdp_addr.0, layout::ACPI_START);
        // Linux scans 0xe0000..0x100000 for the RSDP on 16-byte boundaries.
        assert_eq!(rsdp_addr.0 % 16, 0);
        let r = read(&m, rsdp_addr.0, 36);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(&r[9..15], &OEM_ID);
        assert_eq!(r[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(u32_at(&r, 20), 36, "RSDP length");
        assert_eq!(sum(&r[0..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&r), 0, "RSDP extended checksum");

        let xsdt_addr = u64_at(&r, 24);
        let xsdt = table(&m, xsdt_addr, b"XSDT");
        assert_eq!(xsdt.len(), 36 + 3 * 8);
        let (fadt_addr, madt_addr) = (u64_at(&xsdt, 36), u64_at(&xsdt, 44));
        let dsdt_addr = u64_at(&xsdt, 52);
        let fadt = table(&m, fadt_addr, b"FACP");
        let madt = table(&m, madt_addr, b"APIC");
        let dsdt = table(&m, dsdt_addr, b"DSDT");
        assert_eq!(u64_at(&fadt, FADT_X_DSDT), dsdt_addr);
        assert_eq!(u32_at(&fadt, 40), 0, "only X_DSDT is set");

        let mut spans = vec![
            (rsdp_addr.0, 36),
            (xsdt_addr, xsdt.len() as u64),
            (fadt_addr, fadt.len() as u64),
            (madt_addr, madt.len() as u64),
            (dsdt_addr, dsdt.len() as u64),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "tables overlap: {w:x?}");
        }
        Tables {
            spans,
            fadt,
            madt,
            dsdt,
        }
    }

    #[test]
    fn tables_chain_checksum_and_fit_the_window() {
        for (cpus, n) in [(1, 0), (2, 3), (255, 19)] {
            let t = build(cpus, n);
            let last = t.spans.last().unwrap();
            assert!(last.0 + last.1 <= layout::ACPI_END);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_pm_registers() {
        let fadt = build(1, 1).fadt;
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!((fadt[8], fadt[FADT_MINOR_VERSION]), (6, 5), "FADT 6.5");
        let flags = u32_at(&fadt, FADT_FLAGS);
        assert_ne!(flags & FADT_F_HW_REDUCED_ACPI, 0);
        assert_ne!(flags & FADT_F_RESET_REG_SUP, 0);
        let boot_arch = u16_at(&fadt, FADT_IAPC_BOOT_ARCH);
        assert_eq!(boot_arch & IAPC_8042, 0, "no 8042");
        assert_ne!(boot_arch & IAPC_VGA_NOT_PRESENT, 0);
        assert_ne!(boot_arch & IAPC_CMOS_RTC_NOT_PRESENT, 0);

        let gas = |off: usize| {
            (
                fadt[off],
                fadt[off + 1],
                fadt[off + 3],
                u64_at(&fadt, off + 4),
            )
        };
        let port = |p: u16| (1, 8, 1, u64::from(layout::PM_IO_BASE + p));
        assert_eq!(gas(FADT_SLEEP_CONTROL_REG), port(0));
        assert_eq!(gas(FADT_SLEEP_STATUS_REG), port(1));
        assert_eq!(gas(FADT_RESET_REG), port(4));
        assert_eq!(fadt[FADT_RESET_VALUE], 1);
        assert_eq!(
            &fadt[FADT_HYPERVISOR_ID..FADT_HYPERVISOR_ID + 8],
            b"COWORKVM"
        );
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        for cpus in [1u8, 4, 255] {
            let madt = build(cpus, 1).madt;
            assert_eq!(u32_at(&madt, 36), layout::LAPIC_ADDR as u32);
            let mut off = 44;
            let mut lapics = Vec::new();
            let mut ioapics = 0;
            while off < madt.len() {
                let (kind, len) = (madt[off], madt[off + 1] as usize);
                assert!(len >= 2 && off + len <= madt.len());
                match kind {
                    MADT_LOCAL_APIC => {
                        assert_eq!(len, 8);
                        assert_eq!(madt[off + 2], madt[off + 3], "uid = apic id");
                        assert_eq!(u32_at(&madt, off + 4), 1, "enabled");
                        lapics.push(madt[off + 3]);
                    }
                    MADT_IO_APIC => {
                        assert_eq!(len, 12);
                        assert_eq!(madt[off + 2], 0, "IOAPIC id");
                        assert_eq!(u32_at(&madt, off + 4), layout::IOAPIC_ADDR as u32);
                        assert_eq!(u32_at(&madt, off + 8), 0, "GSI base");
                        ioapics += 1;
                    }
                    other => panic!("unexpected MADT entry {other}"),
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            assert_eq!(lapics, (0..cpus).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
        }
    }

    #[test]
    fn dsdt_describes_every_slot_com1_and_s5() {
        let n = 5;
        let dsdt = build(1, n).dsdt;
        assert_eq!(count(&dsdt, b"LNRO0005\0"), n);
        assert_eq!(count(&dsdt, b"_UID"), n + 1);
        // Name (_S5_, Package (4) { 5, 0, 0, 0 })
        assert_eq!(
            count(
                &dsdt,
                &[0x08, b'_', b'S', b'5', b'_', 0x12, 7, 4, 0x0a, 5, 0, 0, 0]
            ),
            1
        );
        assert_eq!(count(&dsdt, b"COM1"), 1);
        // EISAID("PNP0501") and IO (Decode16, 0x3f8, 0x3f8, 1, 8).
        assert_eq!(count(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
        assert_eq!(count(&dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
        let irq = |gsi: u32| {
            // Extended IRQ: consumer, edge, active high, exclusive.
            let mut d = vec![0x89, 6, 0, 0b0011, 1];
            d.extend_from_slice(&gsi.to_le_bytes());
            d
        };
        assert_eq!(count(&dsdt, &irq(layout::IRQ_SERIAL)), 1);
        for (i, s) in slots(n).iter().enumerate() {
            assert_eq!(count(&dsdt, format!("V{i:03X}").as_bytes()), 1);
            let mut desc = vec![0x86, 9, 0, 1];
            desc.extend_from_slice(&(s.base as u32).to_le_bytes());
            desc.extend_from_slice(&(s.size as u32).to_le_bytes());
            assert_eq!(count(&dsdt, &desc), 1, "slot {:#x}", s.base);
            assert_eq!(count(&dsdt, &irq(s.gsi)), 1, "gsi {}", s.gsi);
        }
    }

    #[test]
    fn too_many_slots_or_no_cpus_is_an_error() {
        let m = mem();
        // Valid slots (shared GSIs) until the DSDT outgrows the window.
        let mut many = slots(1500);
        for (i, s) in many.iter_mut().enumerate() {
            s.gsi = layout::IRQ_VIRTIO_BASE + (i as u32 % 19);
        }
        let r = create_acpi_tables(&m, 1, &many);
        assert!(matches!(r, Err(AcpiError::NoRoom { .. })), "{r:?}");
        let r = create_acpi_tables(&m, 1, &slots(MAX_SLOTS + 1));
        assert!(matches!(r, Err(AcpiError::TooManySlots(_))), "{r:?}");
        // Slot 19 would get GSI 24, past the IOAPIC's 24 pins.
        let r = create_acpi_tables(&m, 1, &slots(20));
        assert!(
            matches!(r, Err(AcpiError::SlotGsi { index: 19, gsi: 24 })),
            "{r:?}"
        );
        let r = create_acpi_tables(&m, 0, &slots(1));
        assert!(matches!(r, Err(AcpiError::NoCpus)), "{r:?}");
        // Nothing was written by the failed calls.
        assert_eq!(read(&m, layout::ACPI_START, 8), vec![0; 8]);
    }

    #[test]
    fn slots_outside_the_mmio_gap_are_an_error() {
        let m = mem();
        for (base, size) in [
            (0x1000, 0x1000),
            (layout::MMIO_GAP_END - 0x800, 0x1000),
            (layout::VIRTIO_MMIO_BASE, 0),
            (u64::MAX - 0xfff, 0x1000),
        ] {
            let bad = [VirtioMmioSlot { base, size, gsi: 5 }];
            let r = create_acpi_tables(&m, 1, &bad);
            assert!(
                matches!(r, Err(AcpiError::SlotAddress { index: 0, .. })),
                "{base:#x}: {r:?}"
            );
        }
    }

    #[test]
    fn guest_memory_without_the_window_is_an_error() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xe0000)]).unwrap();
        let r = create_acpi_tables(&m, 1, &slots(1));
        assert!(matches!(r, Err(AcpiError::Memory(_))), "{r:?}");
    }
}
