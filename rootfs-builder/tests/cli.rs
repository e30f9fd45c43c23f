//! `coworkvm-rootfs initramfs` and `list` as a user runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use coworkvm_rootfs::cpio;
use coworkvm_rootfs::modules::synthetic_module;

const BIN: &str = env!("CARGO_BIN_EXE_coworkvm-rootfs");
const RELEASE: &str = "6.12.0-test-cloud-amd64";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cwkvm-rootfs-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A kernel directory as scripts/fetch-kernel.sh lays it out.
fn kernel_dir(dir: &Path) -> PathBuf {
    let k = dir.join("kernel");
    let tree = k.join("modules").join(RELEASE);
    for (path, deps) in [
        ("kernel/drivers/virtio/virtio_mmio.ko", ""),
        ("kernel/drivers/block/virtio_blk.ko", ""),
        ("kernel/net/vmw_vsock/vsock.ko", ""),
        (
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
            "vsock",
        ),
        (
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            "vmw_vsock_virtio_transport_common,vsock",
        ),
    ] {
        let f = tree.join(path);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        let info = format!("license=GPL\0depends={deps}\0");
        std::fs::write(f, synthetic_module(info.as_bytes())).unwrap();
    }
    std::fs::write(
        tree.join("modules.builtin"),
        "kernel/drivers/virtio/virtio_pci.ko\n",
    )
    .unwrap();
    std::fs::write(
        k.join("version"),
        format!("package=linux-image-{RELEASE} 6.12.0-1\nrelease={RELEASE}\n"),
    )
    .unwrap();
    k
}

fn build(dir: &Path, out: &str, epoch: Option<&str>, extra: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("initramfs")
        .arg("--out")
        .arg(dir.join(out))
        .arg("--kernel-dir")
        .arg(dir.join("kernel"))
        .args([
            "--modules",
            "vmw_vsock_virtio_transport,virtio-mmio,virtio_pci",
        ])
        .arg("--busybox")
        .arg(dir.join("busybox"))
        .arg("--add")
        .arg(format!("{}:/etc/hello", dir.join("hello").display()))
        .args(extra)
        .env_remove("SOURCE_DATE_EPOCH");
    if let Some(e) = epoch {
        cmd.env("SOURCE_DATE_EPOCH", e);
    }
    cmd.output().unwrap()
}

#[test]
fn initramfs_is_reproducible_and_complete() {
    let dir = scratch("repro");
    kernel_dir(&dir);
    std::fs::write(dir.join("busybox"), b"\x7fELF fake busybox").unwrap();
    std::fs::write(dir.join("hello"), b"hello\n").unwrap();

    for (out, epoch) in [
        ("a.cpio.zst", None),
        ("b.cpio.zst", None),
        ("c.cpio.zst", Some("1700000000")),
    ] {
        let o = build(&dir, out, epoch, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let a = std::fs::read(dir.join("a.cpio.zst")).unwrap();
    assert_eq!(
        a,
        std::fs::read(dir.join("b.cpio.zst")).unwrap(),
        "same inputs, same bytes"
    );
    assert_ne!(
        a,
        std::fs::read(dir.join("c.cpio.zst")).unwrap(),
        "SOURCE_DATE_EPOCH is used"
    );
    assert_eq!(&a[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd by default");

    let raw = zstd::decode_all(a.as_slice()).unwrap();
    // mtime (field 6) is 0 without SOURCE_DATE_EPOCH, uid/gid 0.
    assert_eq!(&raw[6 + 2 * 8..6 + 4 * 8], b"0000000000000000");
    assert_eq!(&raw[6 + 5 * 8..6 + 6 * 8], b"00000000");
    let entries = cpio::parse(&raw).unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries are sorted");
    let get = |n: &str| entries.iter().find(|e| e.0 == n);
    let init = get("init").expect("default /init");
    assert_eq!(init.1, cpio::MODE_FILE | 0o755);
    assert!(String::from_utf8_lossy(&init.2).contains("load-order"));
    assert_eq!(get("bin/insmod").unwrap().2, b"busybox");
    assert_eq!(
        get("bin/poweroff").unwrap().1 & 0o170000,
        cpio::MODE_SYMLINK
    );
    assert_eq!(get("etc/hello").unwrap().2, b"hello\n");
    let base = format!("lib/modules/{RELEASE}");
    assert_eq!(
        String::from_utf8_lossy(&get(&format!("{base}/load-order")).unwrap().2),
        "kernel/net/vmw_vsock/vsock.ko\n\
         kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko\n\
         kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko\n\
         kernel/drivers/virtio/virtio_mmio.ko\n",
        "dependencies first; the built-in virtio_pci is skipped"
    );
    let dep = String::from_utf8_lossy(&get(&format!("{base}/modules.dep")).unwrap().2).into_owned();
    assert!(
        dep.contains(
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: \
         kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko\n"
        ),
        "{dep}"
    );

    // `list` reads it back.
    let l = Command::new(BIN)
        .arg("list")
        .arg(dir.join("a.cpio.zst"))
        .output()
        .unwrap();
    assert!(l.status.success());
    let listing = String::from_utf8_lossy(&l.stdout);
    assert!(
        listing.contains("l0777          7 bin/sh -> busybox"),
        "{listing}"
    );
    assert!(listing.contains("-0755"), "{listing}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_invocations_fail_with_a_reason() {
    let dir = scratch("bad");
    kernel_dir(&dir);
    std::fs::write(dir.join("busybox"), b"bb").unwrap();
    std::fs::write(dir.join("hello"), b"hello\n").unwrap();

    let o = build(&dir, "x.cpio", None, &["--modules", "no_such_module"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no_such_module"));

    let o = build(&dir, "x.cpio", Some("yesterday"), &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("SOURCE_DATE_EPOCH"));

    let o = Command::new(BIN)
        .args(["initramfs", "--out"])
        .arg(dir.join("y.cpio"))
        .args(["--add", "relative:etc/x", "--init"])
        .arg(dir.join("hello"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("SRC:/ABSOLUTE/DST"));

    let o = Command::new(BIN)
        .args(["initramfs", "--compress", "none", "--out"])
        .arg(dir.join("z.cpio"))
        .output()
        .unwrap();
    assert!(!o.status.success(), "no --init and no busybox");
    assert!(!dir.join("z.cpio").exists(), "nothing half-written");
    assert!(!dir.join("x.cpio").exists());
    std::fs::remove_dir_all(dir).unwrap();
}
