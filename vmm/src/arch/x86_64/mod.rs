//! x86_64: memory layout, boot protocol, CPU set-up, ACPI and SMBIOS tables.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod layout;
pub mod regs;
pub mod smbios;
