//! The images `make build` made (build/images): what the manifest says
//! holds, the rootfs has what the guest needs, and it is reproducible: the
//! cached Debian tree, the same agent and release give the same
//! `rootfs.img`, bit for bit.

use std::path::{Path, PathBuf};
use std::process::Command;

use coworkvm_rootfs::rootfs::{self, DEFAULT_EPOCH, IMAGE_FILES};
use socket_proto::manifest::{Manifest, MANIFEST_FILE};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// build/images; when missing, a failure, or with `SKIP_VM=1` None (a skip).
#[track_caller]
fn images() -> Option<(PathBuf, Manifest)> {
    let dir = root().join("build/images");
    match std::fs::read(dir.join(MANIFEST_FILE)) {
        Ok(b) => Some((
            dir,
            serde_json::from_slice(&b).expect("manifest.json parses"),
        )),
        Err(e) => {
            coworkvm_tests::skip_or_fail(format!("{}: {e}: run `make build`", dir.display()));
            None
        }
    }
}

fn debugfs(img: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", cmd])
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_file_matches_the_manifest() {
    let Some((dir, m)) = images() else { return };
    for f in IMAGE_FILES {
        let want = m
            .file(f)
            .unwrap_or_else(|| panic!("{f} not in the manifest"));
        assert_eq!(&rootfs::sha256_file(&dir.join(f)).unwrap(), want, "{f}");
    }
    assert!(!m.kernel_version.is_empty() && !m.rootfs_version.is_empty());
}

#[test]
fn the_rootfs_has_what_the_guest_needs() {
    let Some((dir, m)) = images() else { return };
    let img = dir.join("rootfs.img");
    assert_eq!(
        debugfs(&img, "cat /etc/coworkvm-release").trim(),
        m.rootfs_version
    );
    for path in [
        "/usr/bin/bwrap",
        "/usr/sbin/coworkvm-agent",
        "/usr/sbin/mkfs.ext4",
        "/usr/bin/bash",
        "/etc/ssl/certs/ca-certificates.crt",
        "/sessions",
    ] {
        let stat = debugfs(&img, &format!("stat {path}"));
        assert!(stat.contains("Inode:"), "{path} missing from rootfs.img");
    }
    // The agent in the rootfs is the one in the initramfs.
    let agent = debugfs(&img, "stat /usr/sbin/coworkvm-agent");
    assert!(
        agent.contains("Mode:  0755") || agent.contains("Mode:  0775"),
        "{agent}"
    );
}

#[test]
fn the_zst_decodes_to_the_rootfs() {
    let Some((dir, _)) = images() else { return };
    let f = std::fs::File::open(dir.join("rootfs.img.zst")).unwrap();
    let mut d = zstd::stream::Decoder::new(f).unwrap();
    d.window_log_max(31).unwrap();
    let mut img = std::fs::File::open(dir.join("rootfs.img")).unwrap();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    use std::io::Read;
    let mut total = 0u64;
    loop {
        let n = read_full(&mut d, &mut a);
        let m = read_full(&mut img, &mut b);
        assert_eq!(n, m, "lengths differ after {total} bytes");
        assert!(a[..n] == b[..m], "contents differ after {total} bytes");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
        let mut got = 0;
        while got < buf.len() {
            match r.read(&mut buf[got..]).unwrap() {
                0 => break,
                n => got += n,
            }
        }
        got
    }
}

#[test]
fn the_cached_tree_rebuilds_the_same_rootfs() {
    let Some((_, m)) = images() else { return };
    let key = rootfs::base_key(
        "bookworm",
        &rootfs::packages(rootfs::Profile::Default),
        DEFAULT_EPOCH,
        &rootfs::mmdebstrap_version().unwrap(),
    );
    let tar = rootfs::base_tarball_path(&root().join("build/cache"), "bookworm", &key);
    assert!(tar.is_file(), "{} missing", tar.display());
    let agent = root().join("target/x86_64-unknown-linux-gnu/release/coworkvm-agent");
    let work = root().join("target/rootfs-repro");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let tree = Path::new("/dev/shm").join(format!("coworkvm-repro-{}", std::process::id()));
    rootfs::assemble_tree(&tar, &tree, &agent, &m.rootfs_version).unwrap();
    let img = work.join("rootfs.img");
    rootfs::make_ext4(&tree, &img, DEFAULT_EPOCH).unwrap();
    let _ = std::fs::remove_dir_all(&tree);
    assert_eq!(
        rootfs::sha256_file(&img).unwrap(),
        *m.file("rootfs.img").unwrap(),
        "a rebuild from the same inputs differs from build/images/rootfs.img"
    );
    std::fs::remove_dir_all(&work).unwrap();
}
