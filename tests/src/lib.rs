//! The test rig: runs batches of VM tests directly on hardware KVM or inside an L1 VM under QEMU TCG.
