//! KVM's binary statistics (KVM_GET_STATS_FD), used to count VM exits: a
//! measure of a VMM's boot cost that does not depend on the machine's speed.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;
const HEADER_SIZE: usize = 24;
const DESC_FIXED_SIZE: usize = 16;

/// Opens the binary stats file of a VM or vCPU fd.
pub fn open_stats(fd: &impl AsRawFd) -> io::Result<File> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd (or
    // -1); it does not touch our memory.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ret` is a fresh fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(ret) })
}

/// Reads the first value of the statistic called `name`.
pub fn read_stat(stats: &File, name: &str) -> io::Result<Option<u64>> {
    let mut header = [0u8; HEADER_SIZE];
    stats.read_exact_at(&mut header, 0)?;
    let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let name_size = word(&header, 4) as usize;
    let num_desc = word(&header, 8) as usize;
    let desc_offset = word(&header, 16) as u64;
    let data_offset = word(&header, 20) as u64;
    if name_size == 0 || name_size > 4096 || num_desc > 100_000 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "implausible stats header",
        ));
    }
    let desc_size = DESC_FIXED_SIZE + name_size;
    let mut descs = vec![0u8; desc_size * num_desc];
    stats.read_exact_at(&mut descs, desc_offset)?;
    for d in descs.chunks_exact(desc_size) {
        let raw_name = &d[DESC_FIXED_SIZE..];
        let end = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        if &raw_name[..end] == name.as_bytes() {
            let offset = word(d, 8) as u64;
            let mut v = [0u8; 8];
            stats.read_exact_at(&mut v, data_offset + offset)?;
            return Ok(Some(u64::from_le_bytes(v)));
        }
    }
    Ok(None)
}
