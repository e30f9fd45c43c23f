//! coworkvm: a minimal KVM VMM.
