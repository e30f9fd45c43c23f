//! Initramfs and rootfs assembly.
