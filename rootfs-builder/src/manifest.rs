//! `manifest.json`: what a set of guest images is, written by
//! `coworkvm-rootfs build` and read by the VMM's bundle code, which checks
//! an expanded `rootfs.img` against it before swapping it in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The file name inside an image directory or a bundle.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The schema version this crate writes and understands.
pub const MANIFEST_FORMAT: u32 = 1;

/// Size and SHA-256 of one image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Lowercase hex SHA-256 of the file's bytes.
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`] of the writer.
    pub format: u32,
    /// `coworkvm-rootfs` version that built the images.
    pub builder_version: String,
    /// Guest kernel release (`uname -r` in the guest).
    pub kernel_version: String,
    /// The rootfs version, also in the image's `/etc/coworkvm-release`.
    pub rootfs_version: String,
    /// Image files by name (`vmlinuz`, `initrd.img`, `rootfs.img`,
    /// `rootfs.img.zst`).
    pub files: BTreeMap<String, FileEntry>,
    /// Parts of the build that are not bit-for-bit reproducible, each with
    /// why; empty when pinned inputs give identical files.
    #[serde(default)]
    pub not_reproducible: Vec<String>,
    /// Hash of everything the build read (agent, kernel, base tree,
    /// settings): a build whose inputs hash the same is a no-op.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<String>,
}

impl Manifest {
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.get(name)
    }
}
