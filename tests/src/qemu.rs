//! QEMU as a second VMM inside a batch: the reference the tests and the
//! benchmark hold coworkvm against. [`payload`] ships the host's
//! `qemu-system-x86_64` with the shared libraries `ldd` names and the
//! firmware files `-M microvm` loads, so it runs inside the rig's L1
//! initramfs (and, the same way, directly on the host).
//!
//! In a case script, [`SH`] is the command, e.g.
//! `$QEMU -M microvm -enable-kvm -cpu host ...` after `QEMU="..."`; or use
//! [`Microvm`] to write the whole command line.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Firmware and option ROMs microvm and `-kernel` boots read from `-L`.
pub const DATA_FILES: &[&str] = &[
    "bios-microvm.bin",
    "linuxboot_dma.bin",
    "pvh.bin",
    "kvmvapic.bin",
];
/// Where the host keeps them (Debian's qemu-system-data).
pub const DATA_DIR: &str = "/usr/share/qemu";

/// The shipped QEMU as a shell command, for case scripts: the binary run
/// through the shipped dynamic loader with the shipped libraries.
pub const SH: &str =
    "$P/qemu/ld.so --library-path $P/qemu/lib $P/qemu/qemu-system-x86_64 -L $P/qemu/share";

/// Payload files (host path, name under `$P`) that make [`SH`] work:
/// `qemu/qemu-system-x86_64`, `qemu/ld.so`, `qemu/lib/*`, `qemu/share/*`.
pub fn payload() -> Result<Vec<(PathBuf, String)>> {
    let qemu = crate::which("qemu-system-x86_64").context(
        "qemu-system-x86_64 not found: run `make deps` (Debian package qemu-system-x86)",
    )?;
    let mut files = vec![(qemu.clone(), "qemu/qemu-system-x86_64".to_string())];
    let ldd = std::process::Command::new("ldd")
        .arg(&qemu)
        .output()
        .context("running ldd")?;
    if !ldd.status.success() {
        bail!(
            "ldd {}: {}",
            qemu.display(),
            String::from_utf8_lossy(&ldd.stderr)
        );
    }
    let libs = parse_ldd(&String::from_utf8_lossy(&ldd.stdout));
    if !libs.iter().any(|p| is_loader(p)) {
        bail!("ldd {} names no dynamic loader", qemu.display());
    }
    for lib in libs {
        let name = lib.file_name().unwrap().to_string_lossy().into_owned();
        let dst = if is_loader(&lib) {
            "qemu/ld.so".to_string()
        } else {
            format!("qemu/lib/{name}")
        };
        files.push((lib, dst));
    }
    for f in DATA_FILES {
        // Often symlinks (bios-microvm.bin -> qboot.rom); the image builder
        // and the direct mode's copy both follow them.
        let src = Path::new(DATA_DIR).join(f);
        if !src.exists() {
            bail!(
                "{} missing: run `make deps` (Debian package qemu-system-data)",
                src.display()
            );
        }
        files.push((src, format!("qemu/share/{f}")));
    }
    Ok(files)
}

fn is_loader(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("ld-linux"))
}

/// The absolute paths in `ldd` output: "libz.so.1 => /lib/.../libz.so.1
/// (0x...)" and the loader's "/lib64/ld-linux-x86-64.so.2 (0x...)".
pub fn parse_ldd(out: &str) -> Vec<PathBuf> {
    let mut libs: Vec<PathBuf> = out
        .lines()
        .filter_map(|line| {
            let path = line
                .split("=>")
                .nth(1)
                .unwrap_or(line)
                .split_whitespace()
                .next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// A QEMU `-M microvm` command line for a case script: firmware-less boot
/// (qboot) of `$KERNEL`, ACPI-described virtio-mmio devices, console on
/// stdout, exit on guest power-off.
#[derive(Debug, Clone)]
pub struct Microvm {
    /// Initramfs, as the script names it (e.g. `$P/guest.cpio.zst`).
    pub initrd: String,
    pub cpus: u32,
    pub mem_mib: u32,
    /// Kernel command line.
    pub append: String,
    /// Disks as the script names them (`$DISK0`), read-only or not: vda, vdb, ...
    pub disks: Vec<(String, bool)>,
    pub rng: bool,
}

impl Microvm {
    pub fn new(initrd: &str) -> Self {
        Self {
            initrd: initrd.into(),
            cpus: 1,
            mem_mib: 256,
            append: "console=ttyS0 reboot=k panic=-1 quiet".into(),
            disks: vec![],
            rng: false,
        }
    }

    /// The shell command (one line).
    pub fn command(&self) -> String {
        let mut s = format!(
            "{SH} -M microvm -enable-kvm -cpu host -smp {} -m {} -nodefaults -no-user-config \
             -nographic -serial stdio -no-reboot -kernel $KERNEL -initrd {} -append \"{}\"",
            self.cpus, self.mem_mib, self.initrd, self.append
        );
        for (i, (disk, ro)) in self.disks.iter().enumerate() {
            let ro = if *ro { ",readonly=on" } else { "" };
            let _ = write!(
                s,
                " -drive id=d{i},file={disk},format=raw,if=none{ro} \
                 -device virtio-blk-device,drive=d{i}"
            );
        }
        if self.rng {
            s.push_str(" -device virtio-rng-device");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_absolute_paths_once() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                   \tlibgone.so => not found\n";
        let libs = parse_ldd(out);
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(is_loader(&libs[2]) && !is_loader(&libs[0]));
    }

    #[test]
    fn microvm_command_line() {
        let mut m = Microvm::new("$P/g.cpio.zst");
        m.cpus = 2;
        m.disks = vec![("$DISK0".into(), true), ("$DISK1".into(), false)];
        m.rng = true;
        let c = m.command();
        assert!(c.starts_with(SH));
        assert!(c.contains(" -M microvm -enable-kvm -cpu host -smp 2 -m 256 "));
        assert!(c.contains("-drive id=d0,file=$DISK0,format=raw,if=none,readonly=on -device virtio-blk-device,drive=d0"));
        assert!(c.contains(
            "-drive id=d1,file=$DISK1,format=raw,if=none -device virtio-blk-device,drive=d1"
        ));
        assert!(c.ends_with(" -device virtio-rng-device"));
    }

    /// On a host with QEMU installed, the payload has the binary, its
    /// loader, libc and qboot.
    #[test]
    fn payload_of_the_installed_qemu() {
        if crate::which("qemu-system-x86_64").is_none() {
            crate::skip_or_fail("qemu-system-x86_64 not installed (make deps)");
            return;
        }
        let files = payload().unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.1.as_str()).collect();
        for want in [
            "qemu/qemu-system-x86_64",
            "qemu/ld.so",
            "qemu/lib/libc.so.6",
            "qemu/share/bios-microvm.bin",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(files.iter().all(|f| f.0.exists()));
    }
}
