//! `manifest.json`: what a set of guest images is, written by
//! `coworkvm-rootfs build` and read by the VMM's bundle code, which checks
//! an expanded `rootfs.img` against it before swapping it in.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

impl FileEntry {
    /// Size and SHA-256 of a file.
    pub fn of_file(path: &Path) -> io::Result<Self> {
        Self::read_hashing(std::fs::File::open(path)?, |_| Ok(()))
    }

    /// Size and SHA-256 of everything `input` yields, read in 1 MiB
    /// blocks; each block also goes to `sink` (a copy, say).
    pub fn read_hashing(
        mut input: impl Read,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<Self> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            sink(&buf[..n])?;
            size += n as u64;
        }
        Ok(FileEntry {
            sha256: hex(&hasher.finalize()),
            size,
        })
    }
}

/// Lowercase hex, the form the manifest stores hashes in.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
    }

    #[test]
    fn read_hashing_hashes_and_passes_every_byte() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut copy = Vec::new();
        let e = FileEntry::read_hashing(&data[..], |b| {
            copy.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(copy, data);
        assert_eq!(e.size, data.len() as u64);
        assert_eq!(e.sha256, hex(&Sha256::digest(&data)));
    }
}
