//! Stage two of boot: from the initramfs onto the Debian rootfs.
//!
//! The VMM names the disks on the kernel command line
//! (`coworkvm.rootfs=vda coworkvm.sessions=vdb`); without them the agent
//! stays in the initramfs, which is what the busybox test image wants.
//!
//! - rootfs: ext4, mounted read-only, under an overlay whose upper layer is
//!   a tmpfs: the image is shared by every boot and updates replace it
//!   whole, so nothing a session does may land in it;
//! - the overlay becomes `/` (MS_MOVE + chroot, as switch_root does) and
//!   the initramfs's files are deleted to give their RAM back;
//! - sessions: ext4 on the second disk at `/sessions`. Formatted only when
//!   the disk is blank (its first MiB all zeros, as a new sparse image
//!   reads): a disk that holds anything else is the user's data, and an
//!   error is better than formatting it.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use socket_proto::guest::{ROOTFS_PARAM, SESSIONS_PARAM};

const NEW_ROOT: &str = "/.root";
const LOWER: &str = "/.lower";
const RW: &str = "/.rw";
/// How long a disk named on the command line may take to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(5);
/// The part of a disk that must be all zeros before it is formatted.
const BLANK_CHECK_BYTES: usize = 1 << 20;
/// ext2/3/4 superblock magic, at byte 1080.
const EXT_MAGIC_OFFSET: usize = 1080;
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];

/// Disks named by the VMM on the kernel command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootDisks {
    pub rootfs: Option<String>,
    pub sessions: Option<String>,
}

impl BootDisks {
    pub fn from_cmdline(cmdline: &str) -> Self {
        let mut d = BootDisks::default();
        for word in cmdline.split_whitespace() {
            let dev = |v: &str| {
                // Only plain device names: the value becomes a /dev path.
                (!v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric()))
                    .then(|| format!("/dev/{v}"))
            };
            if let Some(v) = word.strip_prefix(ROOTFS_PARAM) {
                d.rootfs = dev(v);
            } else if let Some(v) = word.strip_prefix(SESSIONS_PARAM) {
                d.sessions = dev(v);
            }
        }
        d
    }
}

/// What the first bytes of a disk say about it.
#[derive(Debug, PartialEq, Eq)]
pub enum DiskContent {
    Blank,
    Ext,
    Unknown,
}

pub fn classify(head: &[u8]) -> DiskContent {
    if head.get(EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2) == Some(&EXT_MAGIC[..]) {
        DiskContent::Ext
    } else if head.len() >= BLANK_CHECK_BYTES.min(EXT_MAGIC_OFFSET + 2)
        && head.iter().all(|&b| b == 0)
    {
        DiskContent::Blank
    } else {
        DiskContent::Unknown
    }
}

/// Why a boot step (the rootfs switch, the session disk) failed; the agent
/// reports it to the helper as that step's error and goes on.
#[derive(Debug, thiserror::Error)]
pub enum BootDiskError {
    #[error("mount {source_path} on {target}: {error}")]
    Mount {
        source_path: String,
        target: String,
        error: std::io::Error,
    },
    #[error("{dev} did not appear within {DEVICE_WAIT:?}")]
    NoDevice { dev: String },
    /// A file operation on the way.
    #[error(transparent)]
    Io(#[from] crate::IoError),
    #[error("mkfs.ext4 {dev}: {stderr}")]
    Mkfs { dev: String, stderr: String },
    #[error("{dev} holds data that is not an ext4 filesystem; not formatting it")]
    NotExt4 { dev: String },
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn sys_mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), BootDiskError> {
    let _ = std::fs::create_dir_all(target);
    crate::share::sys_mount(source, Path::new(target), fstype, flags, data).map_err(|error| {
        BootDiskError::Mount {
            source_path: source.to_owned(),
            target: target.to_owned(),
            error,
        }
    })
}

fn wait_for(dev: &str) -> Result<(), BootDiskError> {
    let start = Instant::now();
    while !Path::new(dev).exists() {
        if start.elapsed() > DEVICE_WAIT {
            return Err(BootDiskError::NoDevice {
                dev: dev.to_owned(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Mounts the rootfs with its overlay and makes it `/`. On error the agent
/// is still in the initramfs, which keeps working.
pub fn switch_to_rootfs(dev: &str) -> Result<(), BootDiskError> {
    wait_for(dev)?;
    sys_mount(dev, LOWER, Some("ext4"), libc::MS_RDONLY, "")?;
    sys_mount("tmpfs", RW, Some("tmpfs"), 0, "mode=0755")?;
    for d in ["upper", "work"] {
        std::fs::create_dir_all(Path::new(RW).join(d))
            .map_err(crate::io_at(format!("{RW}/{d}")))?;
    }
    sys_mount(
        "overlay",
        NEW_ROOT,
        Some("overlay"),
        0,
        &format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work"),
    )?;
    for m in ["/dev", "/proc", "/sys"] {
        sys_mount(m, &format!("{NEW_ROOT}{m}"), None, libc::MS_MOVE, "")?;
    }
    // The initramfs's /tmp and /run held nothing yet; the rootfs gets its own.
    for m in ["/tmp", "/run"] {
        let c = cstr(m);
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    free_initramfs();
    std::env::set_current_dir(NEW_ROOT).map_err(crate::io_at(format!("chdir {NEW_ROOT}")))?;
    sys_mount(".", "/", None, libc::MS_MOVE, "")?;
    let dot = cstr(".");
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(crate::io_at("chroot")(std::io::Error::last_os_error()).into());
    }
    std::env::set_current_dir("/").map_err(crate::io_at("chdir /"))?;
    sys_mount("tmpfs", "/tmp", Some("tmpfs"), 0, "mode=1777")?;
    sys_mount("tmpfs", "/run", Some("tmpfs"), 0, "mode=0755")?;
    set_hostname_from("/etc/hostname");
    Ok(())
}

/// The image names the machine (no init system here does it); without a
/// name, shells and tools show "(none)". Best effort: a missing or empty
/// file leaves the kernel's name.
fn set_hostname_from(file: &str) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    let name = text.trim();
    if name.is_empty() || name.len() > 64 {
        return;
    }
    // SAFETY: a pointer and the length of a live byte slice; the kernel
    // copies it.
    unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
}

/// Deletes the initramfs's own files (as switch_root does), staying on the
/// initramfs filesystem: mount points beneath `/` are left alone.
fn free_initramfs() {
    use std::os::unix::fs::MetadataExt;
    let Ok(root_dev) = std::fs::symlink_metadata("/").map(|m| m.dev()) else {
        return;
    };
    // Entries on another filesystem (the new root's parts, moved mounts)
    // are skipped by device; the new root's mount points by name too.
    fn remove(dir: &Path, root_dev: u64, keep: &[&str]) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if keep
                .iter()
                .any(|k| p.as_os_str().as_bytes() == k.as_bytes())
            {
                continue;
            }
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.dev() != root_dev {
                continue;
            }
            if md.is_dir() {
                remove(&p, root_dev, keep);
                let _ = std::fs::remove_dir(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    remove(Path::new("/"), root_dev, &[NEW_ROOT, LOWER, RW]);
}

fn read_head(dev: &str) -> Result<Vec<u8>, BootDiskError> {
    let mut f = std::fs::File::open(dev).map_err(crate::io_at(format!("open {dev}")))?;
    let mut head = vec![0u8; BLANK_CHECK_BYTES];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(crate::io_at(format!("read {dev}"))(e).into()),
        }
    }
    head.truncate(got);
    Ok(head)
}

/// Mounts the session disk at `/sessions`, formatting it first only when it
/// is blank. Runs after the switch: mkfs.ext4 comes from the rootfs.
pub fn mount_sessions(dev: &str) -> Result<(), BootDiskError> {
    wait_for(dev)?;
    match classify(&read_head(dev)?) {
        DiskContent::Ext => {}
        DiskContent::Blank => {
            eprintln!("coworkvm-agent: {dev} is blank; formatting it ext4 for /sessions");
            let out = std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "sessions", "-m", "0", dev])
                .output()
                .map_err(crate::io_at("mkfs.ext4"))?;
            if !out.status.success() {
                return Err(BootDiskError::Mkfs {
                    dev: dev.to_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
        }
        DiskContent::Unknown => {
            return Err(BootDiskError::NotExt4 {
                dev: dev.to_owned(),
            })
        }
    }
    // The default data=ordered plus the journal: a VMM killed mid-write
    // leaves a disk that the next mount recovers.
    sys_mount(dev, "/sessions", Some("ext4"), libc::MS_NODEV, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_come_from_the_command_line() {
        let d = BootDisks::from_cmdline(
            "console=ttyS0 coworkvm.rootfs=vda quiet coworkvm.sessions=vdb",
        );
        assert_eq!(d.rootfs.as_deref(), Some("/dev/vda"));
        assert_eq!(d.sessions.as_deref(), Some("/dev/vdb"));
        assert_eq!(
            BootDisks::from_cmdline("console=ttyS0"),
            BootDisks::default()
        );
    }

    #[test]
    fn disk_names_cannot_escape_dev() {
        let d = BootDisks::from_cmdline("coworkvm.rootfs=../etc/x coworkvm.sessions=");
        assert_eq!(d, BootDisks::default());
    }

    #[test]
    fn only_a_blank_disk_is_formatted() {
        let blank = vec![0u8; BLANK_CHECK_BYTES];
        assert_eq!(classify(&blank), DiskContent::Blank);
        let mut ext = blank.clone();
        ext[EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2].copy_from_slice(&EXT_MAGIC);
        ext[0] = 0xeb;
        assert_eq!(classify(&ext), DiskContent::Ext);
        let mut other = blank.clone();
        other[BLANK_CHECK_BYTES - 1] = 1;
        assert_eq!(classify(&other), DiskContent::Unknown);
        // A disk too short to read a superblock from is not "blank".
        assert_eq!(classify(&[0u8; 16]), DiskContent::Unknown);
    }
}
