//! Durable-file helpers shared by the bundle modules: every file a bundle
//! gains is written under a temporary name, fsynced, renamed into place and
//! its directory fsynced, so a crash leaves either the old file or the whole
//! new one, never a torn one.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use socket_proto::manifest::FileEntry;

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens a bundle file without trusting the name: `O_NOFOLLOW` (a symbolic
/// link planted in the bundle is refused, not followed to a host file),
/// `O_CLOEXEC`, and `O_NONBLOCK` for the open itself (a FIFO cannot hang
/// it); then only a regular file is taken, and `O_NONBLOCK` is cleared.
/// Errors keep their kind (`NotFound` stays `NotFound`); a link or another
/// kind of file is `InvalidInput` with a text that says so.
pub fn open_regular(path: &Path, writable: bool) -> io::Result<File> {
    let file = match OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is a symbolic link; bundle files must be regular files",
            ))
        }
        Err(e) => return Err(e),
    };
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is not a regular file",
        ));
    }
    coworkvm_vmm::boot_file::clear_nonblocking(&file)?;
    Ok(file)
}

/// Reads a small bundle file through [`open_regular`], refusing one over
/// `max` bytes before reading more than `max + 1`.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path, false)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("it is larger than the {max} bytes allowed"),
        ));
    }
    Ok(bytes)
}

/// Fills `buf` from the kernel's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // slice; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

/// A name for a temporary sibling of `name` that no other thread or process
/// will pick: pid, a per-process counter and random bits. Dot-prefixed so it
/// never looks like a bundle file.
pub fn unique_temp_name(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut salt = [0u8; 4];
    // Why tolerate failure: pid + counter already make the name unique
    // within this host; the random part only guards against pid reuse.
    let _ = random_bytes(&mut salt);
    format!(
        ".{name}.tmp.{}.{}.{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        u32::from_le_bytes(salt)
    )
}

/// Creates `path` fresh (O_CREAT|O_EXCL): it never reuses a file that an
/// earlier run or another process left there.
pub fn create_exclusive(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Moves `from` to `to` unless `to` exists (then `AlreadyExists`, `from`
/// left in place). `renameat2(RENAME_NOREPLACE)`, or `link` + `unlink` on
/// file systems without it; both are atomic against a concurrent creator.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let from_c = cstring(from)?;
    let to_c = cstring(to)?;
    // SAFETY: both strings are NUL-terminated and live for the call;
    // renameat2 only reads them. Called through syscall() because older
    // C libraries lack the wrapper.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // The kernel or this file system has no RENAME_NOREPLACE.
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(err),
    }
}

/// Removes a temporary file on drop unless `keep` was called: every early
/// return of a writer cleans up after itself.
pub struct TempFileGuard {
    path: Option<PathBuf>,
}

impl TempFileGuard {
    pub fn new(path: PathBuf) -> Self {
        TempFileGuard { path: Some(path) }
    }

    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// The file has been renamed away: nothing to remove any more.
    pub fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for TempFileGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Copies `src` to `dir/name` durably (temp + fsync + rename + fsync dir),
/// hashing the bytes on the way; `check` sees the size and hash before the
/// rename and can refuse the copy, which then leaves `dir/name` untouched.
pub fn copy_file_atomic(
    src: &Path,
    dir: &Path,
    name: &str,
    check: impl FnOnce(&FileEntry) -> io::Result<()>,
) -> io::Result<FileEntry> {
    let temp = TempFileGuard::new(dir.join(unique_temp_name(name)));
    let mut output = create_exclusive(temp.path(), 0o644)?;
    let copied = FileEntry::read_hashing(File::open(src)?, |block| output.write_all(block))?;
    output.sync_all()?;
    drop(output);
    check(&copied)?;
    std::fs::rename(temp.path(), dir.join(name))?;
    temp.keep();
    fsync_dir(dir)?;
    Ok(copied)
}

/// `dir`'s entries that look like leftovers of an interrupted write of
/// `name` (see [`unique_temp_name`]).
pub fn stale_temp_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let prefix = format!(".{name}.tmp.");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_differ() {
        assert_ne!(unique_temp_name("x"), unique_temp_name("x"));
        assert!(unique_temp_name("macAddress").starts_with(".macAddress.tmp."));
    }
}
