//! coworkvm: a minimal KVM virtual machine monitor built on the rust-vmm
//! crates, which boots a stock Debian kernel with virtio-mmio devices
//! described in ACPI.

pub mod arch;
pub mod boot_file;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod doctor;
pub mod sandbox;
pub mod vstate;
