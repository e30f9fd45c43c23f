//! Applying a pending rootfs: `rootfs.img.zst` is stream-decompressed into
//! a fresh `rootfs.img.partial`, checked against `manifest.json`, made
//! durable and only then renamed over `rootfs.img`; the `.zst` goes last.
//! Until the rename nothing the guest uses has changed, so any failure
//! (corrupt or truncated stream, wrong hash, full or read-only disk) leaves
//! the bundle exactly as it was, minus the temporary file.
//!
//! What is hashed: when the manifest lists `rootfs.img.zst` (every image
//! coworkvm builds does), the compressed bytes as they are read, against
//! that entry; decompression is deterministic, so they fix the output,
//! whose size is still checked against `rootfs.img`'s entry. Hashing the
//! compressed stream costs an eighth of hashing the image (its free space
//! included), which is most of an expansion's time where SHA-256 runs in
//! software. A manifest without that entry gets the output hashed against
//! `rootfs.img`'s.

use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::fsutil::{self, TempFileGuard};
use super::manifest_file::{load_manifest, ManifestError};
use super::BundleLock;
use socket_proto::manifest::MANIFEST_FILE;

pub const ROOTFS_FILE: &str = "rootfs.img";
pub const ROOTFS_ZST_FILE: &str = "rootfs.img.zst";
/// The manifest the current `rootfs.img` came from, copied there when it
/// was swapped in: status tells the applied version from a pending one by
/// it, and seeding decides whether the images directory holds an update.
pub const APPLIED_MANIFEST_FILE: &str = "rootfs.img.manifest.json";
/// Where the expansion writes before the swap. Only ever written while the
/// bundle lock is held, so a leftover one is from a crash and is removed.
pub const PARTIAL_FILE: &str = "rootfs.img.partial";

/// The rootfs builder compresses with `zstd --long=27`; decoders refuse
/// windows above 2^27 unless told. 31 is zstd's maximum on 64-bit hosts.
const WINDOW_LOG_MAX: u32 = 31;
/// Output is written and checked for holes in blocks of this size.
const SPARSE_BLOCK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ExpandError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "{ROOTFS_ZST_FILE} is pending in {dir} but there is no {MANIFEST_FILE} to check it against"
    )]
    NoManifest { dir: PathBuf },
    #[error(
        "{MANIFEST_FILE} in {dir} lists no {ROOTFS_FILE}, so {ROOTFS_ZST_FILE} cannot be checked"
    )]
    NoManifestEntry { dir: PathBuf },
    #[error("cannot open {ROOTFS_ZST_FILE} in {dir}: {source}")]
    OpenCompressed { dir: PathBuf, source: io::Error },
    #[error("{ROOTFS_ZST_FILE} in {dir} is truncated or corrupt: {source}")]
    Corrupt { dir: PathBuf, source: io::Error },
    #[error(
        "{ROOTFS_ZST_FILE} in {dir} expands to {actual} bytes, but {MANIFEST_FILE} gives \
         {expected} for {ROOTFS_FILE}"
    )]
    SizeMismatch {
        dir: PathBuf,
        expected: u64,
        /// At least this many: the expansion stops once it is past `expected`.
        actual: u64,
    },
    #[error(
        "{ROOTFS_ZST_FILE} in {dir} expands to data with SHA-256 {actual}, but \
         {MANIFEST_FILE} gives {expected} for {ROOTFS_FILE}"
    )]
    HashMismatch {
        dir: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "{ROOTFS_ZST_FILE} in {dir} is {actual_size} bytes with SHA-256 {actual}, but \
         {MANIFEST_FILE} gives {expected_size} bytes with SHA-256 {expected}"
    )]
    CompressedMismatch {
        dir: PathBuf,
        expected: String,
        expected_size: u64,
        actual: String,
        actual_size: u64,
    },
    #[error("no space left expanding {ROOTFS_ZST_FILE} into {dir} (needs {needed} bytes)")]
    NoSpace { dir: PathBuf, needed: u64 },
    #[error("cannot expand {ROOTFS_ZST_FILE}: {dir} is on a read-only file system")]
    ReadOnly { dir: PathBuf },
    #[error("cannot {action} in {dir} while expanding {ROOTFS_ZST_FILE}: {source}")]
    Io {
        action: &'static str,
        dir: PathBuf,
        source: io::Error,
    },
}

/// What an expansion did.
#[derive(Debug, Clone, PartialEq)]
pub struct Expanded {
    pub rootfs_version: String,
    pub size: u64,
    pub seconds: f64,
}

/// Expands a pending `rootfs.img.zst`; `Ok(None)` when none is pending.
/// Taking the lock as an argument makes sure no second process expands
/// into the same `rootfs.img.partial`.
pub fn expand_pending(dir: &Path, _lock: &BundleLock) -> Result<Option<Expanded>, ExpandError> {
    let zst_path = dir.join(ROOTFS_ZST_FILE);
    let compressed = match super::fsutil::open_regular(&zst_path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ExpandError::OpenCompressed {
                dir: dir.to_owned(),
                source,
            })
        }
    };
    let loaded =
        load_manifest(&dir.join(MANIFEST_FILE))?.ok_or_else(|| ExpandError::NoManifest {
            dir: dir.to_owned(),
        })?;
    let entry =
        loaded
            .manifest
            .file(ROOTFS_FILE)
            .cloned()
            .ok_or_else(|| ExpandError::NoManifestEntry {
                dir: dir.to_owned(),
            })?;
    let needed = entry.size;
    let out_err = |action: &'static str, source: io::Error| match source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ExpandError::NoSpace {
            dir: dir.to_owned(),
            needed,
        },
        Some(libc::EROFS) => ExpandError::ReadOnly {
            dir: dir.to_owned(),
        },
        _ => ExpandError::Io {
            action,
            dir: dir.to_owned(),
            source,
        },
    };
    let corrupt = |source| ExpandError::Corrupt {
        dir: dir.to_owned(),
        source,
    };

    tracing::info!(
        "expanding {} (rootfs {}, {} MiB)",
        zst_path.display(),
        loaded.manifest.rootfs_version,
        needed >> 20
    );
    let started = Instant::now();

    let partial_path = dir.join(PARTIAL_FILE);
    match std::fs::remove_file(&partial_path) {
        Ok(()) => tracing::info!(
            "removed {} left by an interrupted expansion",
            partial_path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(out_err("remove a stale rootfs.img.partial", e)),
    }
    let partial = TempFileGuard::new(partial_path);
    let out = fsutil::create_exclusive(partial.path(), 0o644)
        .map_err(|e| out_err("create rootfs.img.partial", e))?;

    // What is checked (see the module comment): the compressed stream
    // against its own entry, or, without one, the output.
    let mut check = match loaded.manifest.file(ROOTFS_ZST_FILE).cloned() {
        Some(zst) => Check::Compressed(zst),
        None => Check::Output(Sha256::new()),
    };
    let hashing = HashingReader {
        inner: compressed,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut decoder = zstd::stream::read::Decoder::new(hashing).map_err(corrupt)?;
    decoder.window_log_max(WINDOW_LOG_MAX).map_err(corrupt)?;
    let mut progress = Progress::new(needed);
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let n = read_full(&mut decoder, &mut buf).map_err(corrupt)?;
        if n == 0 {
            break;
        }
        if written + n as u64 > needed {
            // Stop before a wrong image fills the disk.
            return Err(ExpandError::SizeMismatch {
                dir: dir.to_owned(),
                expected: needed,
                actual: written + n as u64,
            });
        }
        if let Check::Output(h) = &mut check {
            h.update(&buf[..n]);
        }
        write_skipping_zero_blocks(&out, &buf[..n], written)
            .map_err(|e| out_err("write rootfs.img.partial", e))?;
        written += n as u64;
        progress.advance(written);
    }
    if written != needed {
        return Err(ExpandError::SizeMismatch {
            dir: dir.to_owned(),
            expected: needed,
            actual: written,
        });
    }
    match check {
        Check::Output(h) => {
            let actual = socket_proto::manifest::hex(&h.finalize());
            if !actual.eq_ignore_ascii_case(&entry.sha256) {
                return Err(ExpandError::HashMismatch {
                    dir: dir.to_owned(),
                    expected: entry.sha256,
                    actual,
                });
            }
        }
        Check::Compressed(zst) => {
            // Whatever follows the last frame counts too.
            let mut rest = decoder.finish();
            io::copy(&mut rest, &mut io::sink()).map_err(corrupt)?;
            let HashingReader { hasher, bytes, .. } = rest.into_inner();
            let actual = socket_proto::manifest::hex(&hasher.finalize());
            if bytes != zst.size || !actual.eq_ignore_ascii_case(&zst.sha256) {
                return Err(ExpandError::CompressedMismatch {
                    dir: dir.to_owned(),
                    expected: zst.sha256,
                    expected_size: zst.size,
                    actual,
                    actual_size: bytes,
                });
            }
        }
    }
    // Zero blocks at the end were skipped: set_len gives the file its size
    // (as a hole).
    out.set_len(written)
        .map_err(|e| out_err("size rootfs.img.partial", e))?;
    out.sync_all()
        .map_err(|e| out_err("flush rootfs.img.partial", e))?;
    drop(out);

    // The record of what is applied is written before the swap too, so the
    // swap itself needs no space.
    let applied = TempFileGuard::new(dir.join(fsutil::unique_temp_name(APPLIED_MANIFEST_FILE)));
    {
        let mut f = fsutil::create_exclusive(applied.path(), 0o644)
            .map_err(|e| out_err("record the applied manifest", e))?;
        io::Write::write_all(&mut f, &loaded.bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| out_err("record the applied manifest", e))?;
    }
    std::fs::rename(partial.path(), dir.join(ROOTFS_FILE))
        .map_err(|e| out_err("rename rootfs.img.partial to rootfs.img", e))?;
    partial.keep();
    // From here rootfs.img is the new one. Should what follows fail, the
    // .zst is still there and the next prepare expands it again: wasted
    // time, never a wrong image.
    std::fs::rename(applied.path(), dir.join(APPLIED_MANIFEST_FILE))
        .map_err(|e| out_err("record the applied manifest", e))?;
    applied.keep();
    fsutil::fsync_dir(dir).map_err(|e| out_err("flush the bundle directory", e))?;
    match std::fs::remove_file(&zst_path).and_then(|()| fsutil::fsync_dir(dir)) {
        Ok(()) => {}
        // The new rootfs is in place and recorded; a .zst that stays only
        // costs a needless expansion next time, not worth failing a boot.
        Err(e) => tracing::warn!(
            "cannot remove {} after expanding it: {e}",
            zst_path.display()
        ),
    }

    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    tracing::info!(
        "expanded {} MiB in {seconds:.1} s ({:.0} MB/s)",
        written >> 20,
        written as f64 / 1e6 / seconds.max(1e-9)
    );
    Ok(Some(Expanded {
        rootfs_version: loaded.manifest.rootfs_version,
        size: written,
        seconds,
    }))
}

/// What an expansion's bytes are checked against.
enum Check {
    /// The manifest's `rootfs.img.zst` entry: the compressed bytes read.
    Compressed(socket_proto::manifest::FileEntry),
    /// No such entry: the output, against `rootfs.img`'s.
    Output(Sha256),
}

/// A reader that hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Fills `buf` as far as the stream allows; less than its length only at
/// the end of the stream.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn is_zero(block: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets
        // the aligned middle of the slice and leaves the rest to head/tail.
        unsafe { block.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes `data` at `offset`, leaving whole zero blocks as holes: a file
/// system image is mostly free space, and the fresh file reads zeros there
/// anyway.
fn write_skipping_zero_blocks(out: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + SPARSE_BLOCK).min(data.len());
        if is_zero(&data[pos..end]) {
            if let Some(start) = run_start.take() {
                out.write_all_at(&data[start..pos], offset + start as u64)?;
            }
        } else if run_start.is_none() {
            run_start = Some(pos);
        }
        pos = end;
    }
    if let Some(start) = run_start {
        out.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

/// A progress bar on a terminal, a log line every ~10% otherwise.
enum Progress {
    Bar(indicatif::ProgressBar),
    Log { total: u64, next_tenth: u64 },
}

impl Progress {
    fn new(total: u64) -> Self {
        if io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "expanding rootfs.img [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            Progress::Bar(bar)
        } else {
            Progress::Log {
                total,
                next_tenth: 1,
            }
        }
    }

    fn advance(&mut self, done: u64) {
        match self {
            Progress::Bar(bar) => bar.set_position(done),
            Progress::Log { total, next_tenth } => {
                while *next_tenth < 10 && done * 10 >= *total * *next_tenth {
                    tracing::info!("expanding rootfs.img: {}%", *next_tenth * 10);
                    *next_tenth += 1;
                }
            }
        }
    }

    fn finish(self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut block = vec![0u8; 4099];
        assert!(is_zero(&block[1..]));
        block[4098] = 1;
        assert!(!is_zero(&block[1..]));
        block[4098] = 0;
        block[1] = 1;
        assert!(!is_zero(&block[1..]));
    }
}
