//! Guest physical memory layout of a coworkvm x86_64 machine.
//!
//! Low memory follows the PC conventions Linux expects (EBDA, BIOS area where
//! the RSDP is searched for); devices live in a 32-bit MMIO gap below 4 GiB.

/// GDT used while entering 64-bit mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT loaded at entry; the kernel installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux boot parameters ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer handed to the kernel.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapped page tables covering the first GiB with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the RSDP sits at the start (inside the 0xe0000..0x100000
/// window Linux scans), the other tables follow it.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0xf0000;
/// SMBIOS entry point and tables (Linux scans 0xf0000..0x100000).
pub const SMBIOS_START: u64 = 0xf0000;
/// The kernel is loaded at 1 MiB; RAM from here on is usable.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: guest RAM never overlaps it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio slots: slot `i` is at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Legacy COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const IRQ_SERIAL: u32 = 4;
/// GSI of virtio-mmio slot `i` is `IRQ_VIRTIO_BASE + i` (IOAPIC pins 5..=23).
pub const IRQ_VIRTIO_BASE: u32 = 5;
pub const IRQ_MAX: u32 = 23;
/// Hardware-reduced ACPI sleep control/status and reset registers (port I/O).
pub const PM_IO_BASE: u16 = 0x600;
