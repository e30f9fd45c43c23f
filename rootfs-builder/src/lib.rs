//! Guest image assembly for coworkvm: a reproducible newc cpio writer,
//! kernel module dependency resolution, and initramfs building.

pub mod cpio;
pub mod initramfs;
pub mod modules;
pub mod rootfs;
