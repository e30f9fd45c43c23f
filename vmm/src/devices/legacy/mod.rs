//! Port-I/O devices of the PC that the guest kernel expects.

pub mod acpi_pm;
pub mod serial;
