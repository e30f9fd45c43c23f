//! The VMM's launch contract: everything `coworkvm boot` is asked to run,
//! as one typed value.
//!
//! The helper (and `coworkvm run`) build a [`LaunchConfig`], call
//! [`LaunchConfig::validate`] *before* they fork, so a request the VMM
//! would refuse (64 vCPUs, a writable rootfs) fails the client's call with
//! a reason instead of a VMM that dies after `startVM` said yes, and hand
//! it to the child as JSON on an inherited descriptor (`coworkvm boot
//! --config-fd N`). `coworkvm boot`'s flags build the same value. The VMM
//! validates it again ([`LaunchConfig::open`]): it trusts no parent.
//!
//! Disks are given by role. The guest finds them by name (`vda`, `vdb`,
//! ...) in attachment order, so the order is fixed here, once: the rootfs,
//! then the sessions disk, then any data disks
//! ([`LaunchConfig::guest_disk_name`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout;
use crate::arch::x86_64::smbios::MachineUuid;
use crate::boot_file::{BootFileError, FileArg};
use crate::builder::{DiskSpec, FsSpec, MachineConfig, VsockSpec};
use crate::devices::virtio::fs::MAX_TAG_BYTES;

/// The most vCPUs a VM gets.
pub const MAX_CPUS: u8 = 32;
/// The least guest memory a VM gets (MiB): below it Debian's kernel and
/// initramfs do not fit.
pub const MIN_MEM_MIB: u64 = 64;
/// The most guest memory a VM gets (MiB): 1 TiB.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// The largest launch configuration `coworkvm boot --config-fd` reads
/// (bytes); a real one is well under 2 KiB.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// The longest extra kernel command line (bytes); the whole line must fit
/// the boot protocol's limit with the VMM's own parameters.
pub const MAX_CMDLINE_BYTES: usize = 1024;

/// Why a launch configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("vCPUs must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u64),
    #[error("guest memory must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB, got {0}")]
    Mem(u64),
    #[error("too many virtio devices ({0}); at most {1}")]
    TooManyDevices(usize, usize),
    #[error("more than one {0} disk")]
    DuplicateRole(DiskRole),
    #[error("the {0} disk must come before every {1} disk (the guest names disks in order)")]
    DiskOrder(DiskRole, DiskRole),
    #[error("the rootfs disk must be read-only")]
    WritableRootfs,
    #[error("the kernel command line is {0} bytes; at most {MAX_CMDLINE_BYTES}")]
    Cmdline(usize),
    #[error("the vsock CID must be 3 or above, got {0}")]
    Cid(u64),
    #[error("the virtio-fs tag must be 1 to {MAX_TAG_BYTES} bytes without NUL, got {0:?}")]
    FsTag(String),
    #[error("the virtio-fs socket: {0}")]
    FsSocket(BootFileError),
    #[error(transparent)]
    File(#[from] BootFileError),
}

/// What a disk is for; it decides the disk's place ([`DiskRole::rank`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskRole {
    /// The guest's OS image, read-only: always the first disk.
    Rootfs,
    /// `sessiondata.img`: the sessions' home directories, after the rootfs.
    Sessions,
    /// Any other disk (`coworkvm boot --disk`), after those two.
    Data,
}

impl DiskRole {
    fn rank(self) -> u8 {
        match self {
            DiskRole::Rootfs => 0,
            DiskRole::Sessions => 1,
            DiskRole::Data => 2,
        }
    }
}

impl std::fmt::Display for DiskRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskRole::Rootfs => "rootfs",
            DiskRole::Sessions => "sessions",
            DiskRole::Data => "data",
        })
    }
}

/// One disk of a [`LaunchConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub role: DiskRole,
    /// `fd:N` or a path.
    pub file: FileArg,
    pub read_only: bool,
}

/// A virtio-fs device served by a vhost-user back-end (virtiofsd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The back-end: `{"fd": N}`, an inherited Unix stream socket already
    /// connected to it (what the helper passes), or `{"path": P}`, its
    /// listening socket, which the VMM connects to (tests, `coworkvm boot`).
    pub socket: FileArg,
    /// The name the guest mounts (`mount -t virtiofs TAG`): 1 to 36 bytes.
    pub tag: String,
}

impl FsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.tag.is_empty() || self.tag.len() > MAX_TAG_BYTES || self.tag.contains('\0') {
            return Err(ConfigError::FsTag(self.tag.clone()));
        }
        Ok(())
    }
}

/// Everything the VMM needs to boot one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchConfig {
    /// bzImage of the guest kernel.
    pub kernel: FileArg,
    /// Initramfs (cpio, optionally compressed).
    pub initrd: Option<FileArg>,
    /// Disks, in role order (see the module's documentation).
    pub disks: Vec<DiskConfig>,
    pub cpus: u8,
    pub mem_mib: u64,
    /// Kernel parameters appended to the VMM's own.
    pub cmdline: String,
    /// The guest console's file; standard output when absent.
    pub console: Option<PathBuf>,
    /// A virtio-vsock device and its host socket.
    pub vsock: Option<VsockSpec>,
    /// SMBIOS type 1 UUID: the guest's `/sys/class/dmi/id/product_uuid`.
    pub machine_uuid: Option<MachineUuid>,
    /// A virtio-fs device (shared folders). Absent from older
    /// configurations, which still parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsConfig>,
}

impl LaunchConfig {
    /// A machine with `kernel` and nothing else: 1 vCPU, 512 MiB.
    pub fn new(kernel: FileArg) -> Self {
        Self {
            kernel,
            initrd: None,
            disks: Vec::new(),
            cpus: 1,
            mem_mib: 512,
            cmdline: String::new(),
            console: None,
            vsock: None,
            machine_uuid: None,
            fs: None,
        }
    }

    /// Checks every limit the VMM enforces, without opening anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_limits(
            u64::from(self.cpus),
            self.mem_mib,
            self.disks.len(),
            self.vsock.is_some(),
            self.fs.is_some(),
        )?;
        if let Some(fs) = &self.fs {
            fs.validate()?;
        }
        let mut previous: Option<DiskRole> = None;
        for d in &self.disks {
            if let Some(p) = previous {
                if d.role.rank() < p.rank() {
                    return Err(ConfigError::DiskOrder(d.role, p));
                }
                if d.role == p && d.role != DiskRole::Data {
                    return Err(ConfigError::DuplicateRole(d.role));
                }
            }
            if d.role == DiskRole::Rootfs && !d.read_only {
                return Err(ConfigError::WritableRootfs);
            }
            previous = Some(d.role);
        }
        if self.cmdline.len() > MAX_CMDLINE_BYTES {
            return Err(ConfigError::Cmdline(self.cmdline.len()));
        }
        if let Some(v) = &self.vsock {
            // 0-2 are the hypervisor, local and host CIDs.
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::Cid(v.guest_cid));
            }
        }
        Ok(())
    }

    /// The guest's name for the disk with `role` (`vda`, `vdb`, ...), if
    /// the configuration has one: virtio-blk disks are named in the order
    /// they are attached, and they are attached in this list's order.
    pub fn guest_disk_name(&self, role: DiskRole) -> Option<String> {
        let index = self.disks.iter().position(|d| d.role == role)?;
        // vda..vdz is enough: the device slots run out long before.
        Some(format!("vd{}", (b'a' + index as u8) as char))
    }

    /// Validates the configuration and opens (or takes over, for `fd:N`)
    /// every file it names.
    pub fn open(&self) -> Result<MachineConfig, ConfigError> {
        self.validate()?;
        let kernel = self.kernel.open(false)?;
        let initrd = self.initrd.as_ref().map(|i| i.open(false)).transpose()?;
        let disks = self
            .disks
            .iter()
            .map(|d| {
                Ok(DiskSpec {
                    file: d.file.open(!d.read_only)?,
                    read_only: d.read_only,
                })
            })
            .collect::<Result<_, BootFileError>>()?;
        let fs = match &self.fs {
            Some(f) => Some(FsSpec {
                socket: std::sync::Arc::new(
                    f.socket.open_unix_stream().map_err(ConfigError::FsSocket)?,
                ),
                tag: f.tag.clone(),
            }),
            None => None,
        };
        Ok(MachineConfig {
            kernel,
            initrd,
            disks,
            cpus: self.cpus,
            mem_mib: self.mem_mib,
            cmdline: self.cmdline.clone(),
            console: self.console.clone(),
            vsock: self.vsock.clone(),
            machine_uuid: self.machine_uuid,
            fs,
        })
    }
}

/// The limits [`LaunchConfig::validate`] and the builder share.
pub(crate) fn check_limits(
    cpus: u64,
    mem_mib: u64,
    disks: usize,
    vsock: bool,
    fs: bool,
) -> Result<(), ConfigError> {
    if cpus == 0 || cpus > u64::from(MAX_CPUS) {
        return Err(ConfigError::Cpus(cpus));
    }
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
        return Err(ConfigError::Mem(mem_mib));
    }
    let max_slots = (layout::IRQ_MAX - layout::IRQ_VIRTIO_BASE + 1) as usize;
    // One slot per disk, the rng, and the vsock and virtio-fs devices if any.
    let slots_needed = disks + 1 + vsock as usize + fs as usize;
    if slots_needed > max_slots {
        return Err(ConfigError::TooManyDevices(slots_needed, max_slots));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(role: DiskRole, fd: i32, read_only: bool) -> DiskConfig {
        DiskConfig {
            role,
            file: FileArg::Fd(fd),
            read_only,
        }
    }

    fn bundle_vm() -> LaunchConfig {
        LaunchConfig {
            initrd: Some(FileArg::Fd(4)),
            disks: vec![
                disk(DiskRole::Rootfs, 5, true),
                disk(DiskRole::Sessions, 6, false),
            ],
            vsock: Some(VsockSpec {
                guest_cid: 3,
                uds: "/run/v.sock".into(),
            }),
            ..LaunchConfig::new(FileArg::Fd(3))
        }
    }

    #[test]
    fn a_bundle_vm_is_valid_and_names_its_disks_by_role() {
        let c = bundle_vm();
        c.validate().unwrap();
        assert_eq!(c.guest_disk_name(DiskRole::Rootfs).as_deref(), Some("vda"));
        assert_eq!(
            c.guest_disk_name(DiskRole::Sessions).as_deref(),
            Some("vdb")
        );
        assert_eq!(c.guest_disk_name(DiskRole::Data), None);
        // Without a rootfs the sessions disk is the first.
        let mut c = bundle_vm();
        c.disks.remove(0);
        c.validate().unwrap();
        assert_eq!(
            c.guest_disk_name(DiskRole::Sessions).as_deref(),
            Some("vda")
        );
    }

    #[test]
    fn every_limit_is_refused_with_its_reason() {
        let refused = |edit: &dyn Fn(&mut LaunchConfig), want: &str| {
            let mut c = bundle_vm();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        };
        refused(&|c| c.cpus = 0, "vCPUs must be between 1 and 32, got 0");
        refused(&|c| c.cpus = 33, "got 33");
        refused(&|c| c.mem_mib = 63, "guest memory must be between 64");
        refused(&|c| c.mem_mib = MAX_MEM_MIB + 1, "guest memory");
        refused(&|c| c.disks.swap(0, 1), "the rootfs disk must come before");
        refused(
            &|c| c.disks.push(disk(DiskRole::Sessions, 7, false)),
            "more than one sessions disk",
        );
        refused(
            &|c| c.disks[0].read_only = false,
            "rootfs disk must be read-only",
        );
        refused(
            &|c| c.disks.insert(0, disk(DiskRole::Data, 7, false)),
            "must come before every data disk",
        );
        refused(
            &|c| c.cmdline = "x".repeat(MAX_CMDLINE_BYTES + 1),
            "command line",
        );
        refused(
            &|c| c.vsock.as_mut().unwrap().guest_cid = 2,
            "CID must be 3 or above",
        );
        refused(
            &|c| {
                c.disks = (0..40)
                    .map(|i| disk(DiskRole::Data, 10 + i, true))
                    .collect()
            },
            "too many virtio devices",
        );
        // Data disks may repeat, after the others.
        let mut c = bundle_vm();
        c.disks.push(disk(DiskRole::Data, 7, false));
        c.disks.push(disk(DiskRole::Data, 8, true));
        c.validate().unwrap();
    }

    #[test]
    fn the_json_form_round_trips_and_refuses_unknown_fields() {
        let c = LaunchConfig {
            machine_uuid: Some(MachineUuid::parse("12345678-9abc-def0-1234-56789abcdef0").unwrap()),
            console: Some("/run/console.log".into()),
            ..bundle_vm()
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["kernel"], serde_json::json!({"fd": 3}));
        assert_eq!(json["disks"][0]["role"], "rootfs");
        assert_eq!(json["machine_uuid"], "12345678-9abc-def0-1234-56789abcdef0");
        assert_eq!(
            serde_json::from_value::<LaunchConfig>(json.clone()).unwrap(),
            c
        );
        let mut extra = json.clone();
        extra["sandbox"] = false.into();
        assert!(serde_json::from_value::<LaunchConfig>(extra).is_err());
        let mut bad_uuid = json;
        bad_uuid["machine_uuid"] = "nope".into();
        assert!(serde_json::from_value::<LaunchConfig>(bad_uuid).is_err());
    }

    fn with_fs(socket: FileArg, tag: &str) -> LaunchConfig {
        LaunchConfig {
            fs: Some(FsConfig {
                socket,
                tag: tag.into(),
            }),
            ..bundle_vm()
        }
    }

    #[test]
    fn the_fs_device_has_its_json_form_and_older_configurations_still_parse() {
        let c = with_fs(FileArg::Fd(9), "claudeshared");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            json["fs"],
            serde_json::json!({"socket": {"fd": 9}, "tag": "claudeshared"})
        );
        assert_eq!(
            serde_json::from_value::<LaunchConfig>(json.clone()).unwrap(),
            c
        );
        let path = with_fs(FileArg::Path("/run/vfs.sock".into()), "t");
        let json = serde_json::to_value(&path).unwrap();
        assert_eq!(
            json["fs"]["socket"],
            serde_json::json!({"path": "/run/vfs.sock"})
        );
        // Without a device the key is left out, and a configuration
        // written before it existed parses.
        let old = serde_json::to_value(bundle_vm()).unwrap();
        assert!(old.get("fs").is_none());
        assert_eq!(
            serde_json::from_value::<LaunchConfig>(old).unwrap().fs,
            None
        );
        let mut extra = serde_json::to_value(&c).unwrap();
        extra["fs"]["cache"] = "auto".into();
        assert!(serde_json::from_value::<LaunchConfig>(extra).is_err());
    }

    #[test]
    fn the_fs_tag_and_slot_are_checked() {
        with_fs(FileArg::Fd(9), "claudeshared").validate().unwrap();
        with_fs(FileArg::Fd(9), &"x".repeat(MAX_TAG_BYTES))
            .validate()
            .unwrap();
        for bad in [String::new(), "x".repeat(MAX_TAG_BYTES + 1), "a\0b".into()] {
            let e = with_fs(FileArg::Fd(9), &bad).validate().unwrap_err();
            assert!(matches!(e, ConfigError::FsTag(_)), "{bad:?}: {e}");
        }
        // The device takes a slot: a configuration that fills every slot
        // without it has none left for it.
        let max_slots = (layout::IRQ_MAX - layout::IRQ_VIRTIO_BASE + 1) as usize;
        let mut c = bundle_vm();
        // rng + vsock + the disks.
        let data = max_slots - 2 - c.disks.len();
        c.disks
            .extend((0..data).map(|i| disk(DiskRole::Data, 20 + i as i32, true)));
        c.validate().unwrap();
        c.fs = with_fs(FileArg::Fd(9), "t").fs;
        let e = c.validate().unwrap_err();
        assert!(
            matches!(e, ConfigError::TooManyDevices(n, m) if n == m + 1),
            "{e}"
        );
    }
}
