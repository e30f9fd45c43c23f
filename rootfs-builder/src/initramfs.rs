//! Initramfs assembly: `/init`, an optional busybox userland, kernel
//! modules with their load order, and extra files, as one reproducible
//! newc archive (optionally zstd-compressed).

use std::path::{Path, PathBuf};

use crate::cpio::{Archive, CpioError, Entry};
use crate::modules::{ModuleError, ModuleTree};

/// busybox applets linked into `/bin` when busybox is included.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "mount",
    "umount",
    "cat",
    "echo",
    "insmod",
    "ls",
    "dd",
    "sync",
    "poweroff",
    "reboot",
    "sleep",
    "head",
    "tail",
    "tr",
    "cut",
    "nproc",
    "uname",
    "grep",
    "sed",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "ln",
    "chmod",
    "od",
    "wc",
    "test",
    "[",
    "printf",
    "env",
    "date",
    "seq",
    "sha256sum",
    "md5sum",
    "kill",
    "ps",
    "find",
    "xargs",
    "true",
    "false",
    "dmesg",
    "mknod",
    "awk",
    "stat",
    "timeout",
    "hexdump",
    "cmp",
    "df",
    "free",
    "hostname",
    "id",
    "whoami",
    "base64",
    "basename",
    "dirname",
    "pidof",
    "killall",
    "tee",
    "sort",
    "uniq",
    "which",
    "uptime",
    "touch",
    "readlink",
    "realpath",
    "mktemp",
    "truncate",
    "sha1sum",
    "sha512sum",
    "setsid",
    "chroot",
    "switch_root",
    "losetup",
    "lsmod",
    "modprobe",
    "rmmod",
    "ip",
    "vi",
    "less",
    "xxd",
];

/// `/init` when none is given (needs busybox): mounts the pseudo
/// filesystems, loads the modules in `load-order`, then runs a shell on the
/// console and powers off when it exits.
pub const DEFAULT_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
rel=$(uname -r)
if [ -f /lib/modules/$rel/load-order ]; then
    for m in $(cat /lib/modules/$rel/load-order); do
        insmod /lib/modules/$rel/$m || echo "init: insmod $m failed"
    done
fi
echo "init: up after $(cut -d' ' -f1 /proc/uptime) s"
sh
poweroff -f
"#;

/// The module tree of a kernel directory made by `scripts/fetch-kernel.sh`:
/// `DIR/modules/<release>`, the release read from `DIR/version`.
pub fn kernel_dir_module_tree(kernel_dir: &Path) -> Result<PathBuf, InitramfsError> {
    let version = kernel_dir.join("version");
    let text =
        std::fs::read_to_string(&version).map_err(|e| InitramfsError::Read(version.clone(), e))?;
    let release = text
        .lines()
        .find_map(|l| l.strip_prefix("release="))
        .map(str::trim)
        .filter(|r| !r.is_empty() && !r.contains('/'))
        .ok_or(InitramfsError::NoRelease(version))?;
    Ok(kernel_dir.join("modules").join(release))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "zstd" => Ok(Self::Zstd),
            other => Err(format!("unknown compression '{other}' (none or zstd)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// Becomes `/init`.
    pub init: PathBuf,
    /// A static busybox, installed as `/bin/busybox` with applet links.
    pub busybox: Option<PathBuf>,
    /// An unpacked module tree, `.../lib/modules/<release>`.
    pub module_tree: Option<PathBuf>,
    /// Modules to include (their dependencies come along).
    pub modules: Vec<String>,
    /// Extra files: (source on the host, absolute path in the image).
    pub files: Vec<(PathBuf, String)>,
    pub compression: Compression,
    /// mtime of every entry (SOURCE_DATE_EPOCH).
    pub mtime: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("modules were requested but no module tree was given")]
    NoModuleTree,
    #[error("{0} has no release= line")]
    NoRelease(PathBuf),
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error("compressing: {0}")]
    Compress(std::io::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(|e| InitramfsError::Read(path.to_owned(), e))
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o644)
}

/// Builds the archive; returns its bytes.
pub fn build(spec: &InitramfsSpec) -> Result<Vec<u8>, InitramfsError> {
    let mut archive = Archive::new();
    for dir in ["dev", "proc", "sys", "tmp", "run", "mnt", "root"] {
        archive.add(dir, Entry::Dir { mode: 0o755 })?;
    }
    archive.add(
        "init",
        Entry::File {
            mode: 0o755,
            data: read(&spec.init)?,
        },
    )?;
    if let Some(bb) = &spec.busybox {
        archive.add(
            "bin/busybox",
            Entry::File {
                mode: 0o755,
                data: read(bb)?,
            },
        )?;
        for applet in BUSYBOX_APPLETS {
            archive.add(
                &format!("bin/{applet}"),
                Entry::Symlink {
                    target: "busybox".into(),
                },
            )?;
        }
    }
    if !spec.modules.is_empty() {
        let root = spec
            .module_tree
            .as_ref()
            .ok_or(InitramfsError::NoModuleTree)?;
        let tree = ModuleTree::open(root)?;
        let release = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let wanted: Vec<&str> = spec.modules.iter().map(String::as_str).collect();
        let resolved = tree.resolve(&wanted)?;
        let mut load_order = String::new();
        for name in &resolved.order {
            let rel = tree.path_of(name)?.to_string_lossy().into_owned();
            archive.add(
                &format!("lib/modules/{release}/{rel}"),
                Entry::File {
                    mode: 0o644,
                    data: read(&root.join(&rel))?,
                },
            )?;
            load_order.push_str(&rel);
            load_order.push('\n');
        }
        archive.add(
            &format!("lib/modules/{release}/load-order"),
            Entry::File {
                mode: 0o644,
                data: load_order.into_bytes(),
            },
        )?;
        archive.add(
            &format!("lib/modules/{release}/modules.dep"),
            Entry::File {
                mode: 0o644,
                data: tree.modules_dep(&resolved)?.into_bytes(),
            },
        )?;
    }
    for (src, dst) in &spec.files {
        archive.add(
            dst,
            Entry::File {
                mode: mode_of(src),
                data: read(src)?,
            },
        )?;
    }
    let mut raw = Vec::new();
    archive.write(&mut raw, spec.mtime)?;
    match spec.compression {
        Compression::None => Ok(raw),
        Compression::Zstd => zstd::encode_all(raw.as_slice(), 9).map_err(InitramfsError::Compress),
    }
}

/// Builds and writes the archive atomically (temp name, fsync, rename).
pub fn write(spec: &InitramfsSpec, out: &Path) -> Result<u64, InitramfsError> {
    use std::io::Write;
    let bytes = build(spec)?;
    let tmp = out.with_extension("tmp");
    let io = |e| InitramfsError::Read(out.to_owned(), e);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, out).map_err(io)?;
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::parse;

    #[test]
    fn init_busybox_and_files() {
        let dir = std::env::temp_dir().join(format!("cwkvm-initramfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("init"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::write(dir.join("bb"), "busybox-binary").unwrap();
        std::fs::write(dir.join("extra"), "payload").unwrap();
        let spec = InitramfsSpec {
            init: dir.join("init"),
            busybox: Some(dir.join("bb")),
            module_tree: None,
            modules: vec![],
            files: vec![(dir.join("extra"), "/opt/extra".into())],
            compression: Compression::None,
            mtime: 0,
        };
        let raw = build(&spec).unwrap();
        let entries = parse(&raw).unwrap();
        let get = |n: &str| entries.iter().find(|e| e.0 == n).map(|e| e.2.clone());
        assert_eq!(get("init").unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(get("bin/sh").unwrap(), b"busybox");
        assert_eq!(get("opt/extra").unwrap(), b"payload");
        assert!(get("proc").is_some());
        // Same inputs, same bytes; zstd output decompresses to them.
        assert_eq!(build(&spec).unwrap(), raw);
        let z = build(&InitramfsSpec {
            compression: Compression::Zstd,
            ..spec.clone()
        })
        .unwrap();
        assert_eq!(zstd::decode_all(z.as_slice()).unwrap(), raw);
        let spec_mods = InitramfsSpec {
            modules: vec!["virtio_blk".into()],
            ..spec
        };
        assert!(matches!(
            build(&spec_mods),
            Err(InitramfsError::NoModuleTree)
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn modules_come_with_load_order_and_modules_dep() {
        let dir = std::env::temp_dir().join(format!("cwkvm-initramfs-m-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rel = "6.1.0-test-cloud-amd64";
        let tree = dir.join("kernel/modules").join(rel);
        for (path, deps) in [
            ("kernel/virt/lib/irqbypass.ko", ""),
            ("kernel/arch/x86/kvm/kvm.ko", "irqbypass"),
            ("kernel/arch/x86/kvm/kvm-amd.ko", "kvm"),
        ] {
            let f = tree.join(path);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            let info = format!("depends={deps}\0");
            std::fs::write(f, crate::modules::tests::fake_module(info.as_bytes())).unwrap();
        }
        std::fs::write(
            dir.join("kernel/version"),
            format!("package=linux-image-{rel} 6.1-1\nrelease={rel}\n"),
        )
        .unwrap();
        std::fs::write(dir.join("init"), "#!/bin/sh\n").unwrap();
        assert_eq!(kernel_dir_module_tree(&dir.join("kernel")).unwrap(), tree);
        assert!(matches!(
            kernel_dir_module_tree(&dir),
            Err(InitramfsError::Read(..))
        ));
        let spec = InitramfsSpec {
            init: dir.join("init"),
            busybox: None,
            module_tree: Some(tree.clone()),
            modules: vec!["kvm-amd".into()],
            files: vec![],
            compression: Compression::None,
            mtime: 0,
        };
        let entries = parse(&build(&spec).unwrap()).unwrap();
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.0 == n)
                .map(|e| String::from_utf8_lossy(&e.2).into_owned())
        };
        let base = format!("lib/modules/{rel}");
        assert_eq!(
            get(&format!("{base}/load-order")).unwrap(),
            "kernel/virt/lib/irqbypass.ko\nkernel/arch/x86/kvm/kvm.ko\nkernel/arch/x86/kvm/kvm-amd.ko\n"
        );
        assert!(get(&format!("{base}/modules.dep"))
            .unwrap()
            .contains("kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko\n"));
        assert!(get(&format!("{base}/kernel/arch/x86/kvm/kvm.ko")).is_some());
        let init = entries.iter().find(|e| e.0 == "init").unwrap();
        assert_eq!(init.1, crate::cpio::MODE_FILE | 0o755);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
