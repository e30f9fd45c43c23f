//! KVM state: the VM (memory, interrupt controllers) and its vCPUs.

pub mod vcpu;
pub mod vm;
