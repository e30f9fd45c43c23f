//! coworkvm-vmm: the VMM process (`coworkvm boot`), a minimal KVM virtual
//! machine monitor built on the rust-vmm crates, which boots a stock Debian
//! kernel with virtio-mmio devices described in ACPI.
//!
//! A guest attacks this process, so it links only what a machine needs
//! (`tests/dependencies.rs` holds the line) and exports only its launch
//! contract ([`config`], [`boot_file`]), the entry point ([`run_with`]),
//! the host check ([`doctor`]) and the machine identity type. Everything
//! else is private to the crate, so the compiler reports what is unused.

mod arch;
pub mod boot_file;
mod builder;
pub mod config;
mod device_manager;
mod devices;
pub mod doctor;
mod sandbox;
mod vstate;

pub use arch::x86_64::smbios::{MachineUuid, SmbiosError};
pub use builder::{run_with, BuildError, FsSpec, GuestExit, MachineConfig, RunOutcome, VsockSpec};
/// The test hook behind `coworkvm sandbox-probe`: sets up the VMM's
/// sandbox and makes one access.
pub use sandbox::landlock_abi;
pub use sandbox::probe as sandbox_probe;

/// The vsock muxer's harness, for the fuzz target in `vmm/fuzz`.
#[cfg(feature = "fuzzing")]
pub use devices::virtio::vsock::testing as vsock_testing;
