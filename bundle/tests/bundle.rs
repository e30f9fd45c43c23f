//! The bundle: rootfs expansion and updates, identity, session disk. Tests
//! that need a small or read-only file system mount a tmpfs; they need root,
//! and fail without it (skip with `SKIP_VM=1`: `coworkvm_tests::skip_or_fail`).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier, OnceLock};

use coworkvm_bundle::identity::{self, MACHINE_ID_FILE, MAC_FILE};
use coworkvm_bundle::session_disk::SessionDisk;
use coworkvm_bundle::{
    Bundle, BundleError, BundleIdentity, SeedOutcome, APPLIED_MANIFEST_FILE, ROOTFS_FILE,
    ROOTFS_ZST_FILE, SESSION_DISK_FILE,
};
use sha2::{Digest, Sha256};
use socket_proto::manifest::{FileEntry, Manifest, MANIFEST_FORMAT};

const MIB: usize = 1 << 20;
const GIB: u64 = 1 << 30;

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        TempDir(coworkvm_tests::temp_dir(&format!("bundle-{tag}")))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic incompressible bytes (xorshift64*).
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A synthetic rootfs: random data with a zero run in the middle (a file
/// system image's free space, which expansion leaves as a hole) and an odd
/// tail.
fn synthetic_rootfs(seed: u64) -> Vec<u8> {
    let mut image = pseudo_random(seed, 3 * MIB);
    image.extend(std::iter::repeat_n(0u8, 2 * MIB));
    image.extend(pseudo_random(seed + 1, MIB + 1234));
    image
}

/// Compressed like the rootfs builder does (`--long=27`, checksummed like
/// the zstd CLI).
fn compress(data: &[u8]) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    encoder.long_distance_matching(true).unwrap();
    encoder.window_log(27).unwrap();
    encoder.include_checksum(true).unwrap();
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    socket_proto::manifest::hex(&Sha256::digest(data))
}

fn entry(data: &[u8]) -> FileEntry {
    FileEntry {
        sha256: sha256_hex(data),
        size: data.len() as u64,
    }
}

fn manifest(version: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    let m = Manifest {
        format: MANIFEST_FORMAT,
        builder_version: "test".into(),
        kernel_version: format!("6.1.0-test-{version}"),
        rootfs_version: version.into(),
        files: files
            .iter()
            .map(|(name, data)| (name.to_string(), entry(data)))
            .collect::<BTreeMap<_, _>>(),
        not_reproducible: vec![],
        inputs: None,
    };
    serde_json::to_vec_pretty(&m).unwrap()
}

/// One version of the images, as `coworkvm-rootfs build` leaves them.
struct Images {
    version: String,
    rootfs: Vec<u8>,
    zst: Vec<u8>,
    kernel: Vec<u8>,
    initrd: Vec<u8>,
}

/// v1 and v2, built once for all tests (compression is slow in a debug
/// build).
fn images(version: &str) -> &'static Images {
    static V1: OnceLock<Images> = OnceLock::new();
    static V2: OnceLock<Images> = OnceLock::new();
    match version {
        "v1" => V1.get_or_init(|| Images::build("v1", 1)),
        "v2" => V2.get_or_init(|| Images::build("v2", 2)),
        _ => unreachable!(),
    }
}

impl Images {
    fn build(version: &str, seed: u64) -> Self {
        let rootfs = synthetic_rootfs(seed);
        Images {
            version: version.into(),
            zst: compress(&rootfs),
            rootfs,
            kernel: format!("kernel {version}").into_bytes(),
            initrd: format!("initrd {version}").into_bytes(),
        }
    }

    fn manifest(&self) -> Vec<u8> {
        manifest(
            &self.version,
            &[
                ("vmlinuz", &self.kernel),
                ("initrd.img", &self.initrd),
                (ROOTFS_FILE, &self.rootfs),
                (ROOTFS_ZST_FILE, &self.zst),
            ],
        )
    }

    /// Writes an images directory.
    fn write_dir(&self, dir: &Path) {
        std::fs::write(dir.join("vmlinuz"), &self.kernel).unwrap();
        std::fs::write(dir.join("initrd.img"), &self.initrd).unwrap();
        std::fs::write(dir.join(ROOTFS_FILE), &self.rootfs).unwrap();
        std::fs::write(dir.join(ROOTFS_ZST_FILE), &self.zst).unwrap();
        std::fs::write(dir.join("manifest.json"), self.manifest()).unwrap();
    }

    /// A fresh images directory holding this version.
    fn images_dir(&self) -> TempDir {
        let dir = TempDir::new("images");
        self.write_dir(dir.path());
        dir
    }

    /// Drops this version into a bundle as a pending update, by hand.
    fn drop_into(&self, bundle: &Path) {
        std::fs::write(bundle.join("vmlinuz"), &self.kernel).unwrap();
        std::fs::write(bundle.join("initrd.img"), &self.initrd).unwrap();
        std::fs::write(bundle.join(ROOTFS_ZST_FILE), &self.zst).unwrap();
        std::fs::write(bundle.join("manifest.json"), self.manifest()).unwrap();
    }
}

/// Every name in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The data extents of a file, `(offset, len)`, from SEEK_DATA/SEEK_HOLE:
/// holes read as zeros, so hashing the extents and the size identifies the
/// contents without reading a sparse GiB.
fn data_extents(file: &std::fs::File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let size = file.metadata().unwrap().size() as i64;
    let mut extents = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        // SAFETY: lseek on a descriptor owned by `file`; no memory passed.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        assert!(hole > data);
        extents.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    extents
}

/// Every file in `dir` with a hash of its contents.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    listing(dir)
        .into_iter()
        .filter(|n| dir.join(n).is_file())
        .map(|n| {
            let mut f = std::fs::File::open(dir.join(&n)).unwrap();
            let mut hasher = Sha256::new();
            hasher.update(f.metadata().unwrap().size().to_le_bytes());
            for (offset, len) in data_extents(&f) {
                hasher.update(offset.to_le_bytes());
                f.seek(SeekFrom::Start(offset)).unwrap();
                let mut bytes = Vec::new();
                (&mut f).take(len).read_to_end(&mut bytes).unwrap();
                // Extents may hold allocated zeros; hash only non-zero
                // bytes with their offsets, so allocation does not matter.
                for (i, chunk) in bytes.chunks(4096).enumerate() {
                    if chunk.iter().any(|&b| b != 0) {
                        hasher.update((offset + i as u64 * 4096).to_le_bytes());
                        hasher.update(chunk);
                    }
                }
            }
            (n, socket_proto::manifest::hex(&hasher.finalize()))
        })
        .collect()
}

fn prepared_bundle(dir: &Path, images: &Images) -> Bundle {
    prepared_from(dir, images.images_dir().path())
}

/// A bundle in `dir` seeded from `images_dir` and prepared.
fn prepared_from(dir: &Path, images_dir: &Path) -> Bundle {
    let bundle = Bundle::open(dir).unwrap();
    bundle.seed_from(images_dir).unwrap();
    bundle.prepare(Some(1)).unwrap();
    bundle
}

#[test]
fn seed_and_expand_then_second_prepare_is_a_no_op() {
    let v1 = images("v1");
    let images_dir = v1.images_dir();
    let root = TempDir::new("happy");
    let dir = root.path().join("bundle");
    let bundle = Bundle::open(&dir).unwrap();
    assert_eq!(
        std::fs::metadata(&dir).unwrap().mode() & 0o777,
        0o700,
        "the bundle holds user data: owner only"
    );

    let seeded = bundle.seed_from(images_dir.path()).unwrap();
    assert_eq!(
        seeded,
        SeedOutcome::Seeded {
            rootfs_version: "v1".into(),
            previous: None
        }
    );
    assert_eq!(std::fs::read(dir.join(ROOTFS_ZST_FILE)).unwrap(), v1.zst);
    assert!(
        !dir.join(ROOTFS_FILE).exists(),
        "seeding copies the .zst only"
    );
    let status = bundle.status();
    assert_eq!(status.pending_rootfs_version.as_deref(), Some("v1"));
    assert_eq!(status.applied_rootfs_version, None);

    let prepared = bundle.prepare(Some(1)).unwrap();
    assert_eq!(std::fs::read(&prepared.rootfs).unwrap(), v1.rootfs);
    assert_eq!(std::fs::read(&prepared.kernel).unwrap(), v1.kernel);
    assert_eq!(std::fs::read(&prepared.initrd).unwrap(), v1.initrd);
    assert_eq!(prepared.rootfs, dir.join(ROOTFS_FILE));
    assert_eq!(prepared.session_disk, dir.join(SESSION_DISK_FILE));
    assert_eq!(prepared.rootfs_version.as_deref(), Some("v1"));
    let expanded = prepared.expanded.expect("the pending rootfs was expanded");
    assert_eq!(expanded.size, v1.rootfs.len() as u64);
    assert!(!dir.join(ROOTFS_ZST_FILE).exists(), "the .zst is removed");
    assert_eq!(
        std::fs::read(dir.join(APPLIED_MANIFEST_FILE)).unwrap(),
        v1.manifest(),
        "the applied manifest is recorded"
    );
    let rootfs_meta = std::fs::metadata(&prepared.rootfs).unwrap();
    assert!(
        rootfs_meta.blocks() * 512 <= rootfs_meta.size() - MIB as u64,
        "the 2 MiB zero run is a hole: {} allocated of {}",
        rootfs_meta.blocks() * 512,
        rootfs_meta.size()
    );
    assert_eq!(
        listing(&dir),
        [
            ".lock",
            "initrd.img",
            "macAddress",
            "machineIdentifier",
            "manifest.json",
            "rootfs.img",
            "rootfs.img.manifest.json",
            "sessiondata.img",
            "vmlinuz"
        ]
    );

    let before = snapshot(&dir);
    let again = bundle.prepare(Some(1)).unwrap();
    assert!(again.expanded.is_none(), "nothing pending: no expansion");
    assert!(!again.session_disk_created);
    assert_eq!(again.identity, prepared.identity);
    let meta = std::fs::metadata(&again.rootfs).unwrap();
    assert_eq!(meta.ino(), rootfs_meta.ino(), "rootfs.img was not replaced");
    assert_eq!(meta.mtime_nsec(), rootfs_meta.mtime_nsec());
    assert_eq!(snapshot(&dir), before);

    assert_eq!(
        bundle.seed_from(images_dir.path()).unwrap(),
        SeedOutcome::UpToDate {
            rootfs_version: "v1".into()
        },
        "the same images are not copied again"
    );
    assert!(!dir.join(ROOTFS_ZST_FILE).exists());
    let status = bundle.status();
    assert_eq!(status.applied_rootfs_version.as_deref(), Some("v1"));
    assert_eq!(status.pending_rootfs_version, None);
    assert_eq!(status.kernel_version.as_deref(), Some("6.1.0-test-v1"));
    assert_eq!(
        status.mac.as_deref(),
        Some(prepared.identity.mac.to_string().as_str())
    );
    assert!(status.problems.is_empty(), "{:?}", status.problems);
}

#[test]
fn update_replaces_rootfs_and_keeps_identity_and_session_data() {
    let root = TempDir::new("update");
    let dir = root.path().to_owned();
    let v1 = images("v1");
    let bundle = prepared_bundle(&dir, v1);
    {
        let mut disk = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(SESSION_DISK_FILE))
            .unwrap();
        disk.seek(SeekFrom::Start(GIB / 2)).unwrap();
        disk.write_all(b"the user's data").unwrap();
    }
    let kept = [MAC_FILE, MACHINE_ID_FILE, SESSION_DISK_FILE];
    let before = snapshot(&dir);

    let v2 = images("v2");
    assert_ne!(v1.rootfs, v2.rootfs);
    let images_dir = v2.images_dir();
    assert_eq!(
        bundle.seed_from(images_dir.path()).unwrap(),
        SeedOutcome::Seeded {
            rootfs_version: "v2".into(),
            previous: Some("v1".into())
        }
    );
    assert_eq!(
        bundle.seed_from(images_dir.path()).unwrap(),
        SeedOutcome::UpToDate {
            rootfs_version: "v2".into()
        },
        "already pending: not copied twice"
    );
    let status = bundle.status();
    assert_eq!(status.applied_rootfs_version.as_deref(), Some("v1"));
    assert_eq!(status.pending_rootfs_version.as_deref(), Some("v2"));

    let prepared = bundle.prepare(None).unwrap();
    assert_eq!(std::fs::read(&prepared.rootfs).unwrap(), v2.rootfs);
    assert_eq!(std::fs::read(&prepared.kernel).unwrap(), v2.kernel);
    assert_eq!(prepared.rootfs_version.as_deref(), Some("v2"));
    assert!(!dir.join(ROOTFS_ZST_FILE).exists());
    let after = snapshot(&dir);
    for file in kept {
        assert_eq!(after[file], before[file], "{file} changed across an update");
    }
    assert_ne!(after[ROOTFS_FILE], before[ROOTFS_FILE]);
    let mut disk = std::fs::File::open(dir.join(SESSION_DISK_FILE)).unwrap();
    disk.seek(SeekFrom::Start(GIB / 2)).unwrap();
    let mut marker = [0u8; 15];
    disk.read_exact(&mut marker).unwrap();
    assert_eq!(&marker, b"the user's data");
}

/// Prepares v1, then drops in v2 with its `.zst` replaced by `zst`, and
/// checks that prepare fails with an error containing `expected` and
/// changes nothing.
fn assert_bad_update_changes_nothing(
    tag: &str,
    v2_manifest: impl FnOnce(&Images) -> Vec<u8>,
    zst: impl FnOnce(&Images) -> Vec<u8>,
    expected: &[&str],
) {
    let root = TempDir::new(tag);
    let dir = root.path().to_owned();
    let v1 = images("v1");
    let bundle = prepared_bundle(&dir, v1);
    let v2 = images("v2");
    v2.drop_into(&dir);
    std::fs::write(dir.join("manifest.json"), v2_manifest(v2)).unwrap();
    std::fs::write(dir.join(ROOTFS_ZST_FILE), zst(v2)).unwrap();
    let before = snapshot(&dir);
    let names = listing(&dir);

    let err = bundle.prepare(None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BundleError::Expand(_)), "{err:?}");
    for part in expected {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    assert_eq!(listing(&dir), names, "no temporary file is left");
    assert_eq!(snapshot(&dir), before, "the bundle is as it was");
    assert_eq!(std::fs::read(dir.join(ROOTFS_FILE)).unwrap(), v1.rootfs);
    // And it keeps failing the same way rather than booting something.
    assert!(bundle.prepare(None).is_err());
}

#[test]
fn corrupt_zst_changes_nothing() {
    assert_bad_update_changes_nothing(
        "corrupt",
        Images::manifest,
        |v2| {
            let mut zst = v2.zst.clone();
            let mid = zst.len() / 2;
            for b in &mut zst[mid..mid + 16] {
                *b ^= 0x5a;
            }
            zst
        },
        &["rootfs.img.zst", "is truncated or corrupt"],
    );
}

#[test]
fn truncated_zst_changes_nothing() {
    assert_bad_update_changes_nothing(
        "truncated",
        Images::manifest,
        |v2| v2.zst[..v2.zst.len() * 3 / 5].to_vec(),
        &["rootfs.img.zst", "is truncated or corrupt"],
    );
}

#[test]
fn hash_mismatch_changes_nothing() {
    assert_bad_update_changes_nothing(
        "hash",
        |v2| {
            let mut wrong = v2.rootfs.clone();
            wrong[12345] ^= 1;
            manifest("v2", &[(ROOTFS_FILE, &wrong)])
        },
        |v2| v2.zst.clone(),
        &[
            "rootfs.img.zst",
            "SHA-256",
            &sha256_hex(&images("v2").rootfs),
        ],
    );
}

#[test]
fn another_valid_zst_than_the_listed_one_changes_nothing() {
    // v1's stream decompresses cleanly to an image of v2's size, but it is
    // not the .zst v2's manifest lists: the compressed hash refuses it.
    let v1_zst = images("v1").zst.clone();
    assert_bad_update_changes_nothing(
        "other-zst",
        |v2| {
            manifest(
                "v2",
                &[(ROOTFS_FILE, &v2.rootfs), (ROOTFS_ZST_FILE, &v2.zst)],
            )
        },
        move |_| v1_zst,
        &["rootfs.img.zst", "SHA-256", &sha256_hex(&images("v2").zst)],
    );
}

#[test]
fn size_mismatch_changes_nothing() {
    assert_bad_update_changes_nothing(
        "size",
        |v2| manifest("v2", &[(ROOTFS_FILE, &v2.rootfs[..v2.rootfs.len() - 1])]),
        |v2| v2.zst.clone(),
        &["rootfs.img.zst", "expands to", "bytes"],
    );
}

#[test]
fn missing_manifest_entry_changes_nothing() {
    assert_bad_update_changes_nothing(
        "noentry",
        |v2| manifest("v2", &[("vmlinuz", &v2.kernel)]),
        |v2| v2.zst.clone(),
        &["manifest.json", "lists no rootfs.img"],
    );
}

/// What the desktop client may leave in a bundle coworkvm already serves:
/// its vendor's compressed rootfs for Apple's VM, with no coworkvm agent.
fn vendor_image() -> Vec<u8> {
    compress(&pseudo_random(99, 3 * MIB))
}

/// The files a user must never see change: identity and session data.
fn identity_and_sessions(dir: &Path) -> BTreeMap<String, String> {
    snapshot(dir)
        .into_iter()
        .filter(|(n, _)| [MAC_FILE, MACHINE_ID_FILE, SESSION_DISK_FILE].contains(&n.as_str()))
        .collect()
}

#[test]
fn vendor_zst_in_an_up_to_date_bundle_is_removed_not_applied() {
    let v1 = images("v1");
    let images_dir = v1.images_dir();
    let root = TempDir::new("vendor-zst");
    let dir = root.path().to_owned();
    let bundle = prepared_from(&dir, images_dir.path());
    let kept = identity_and_sessions(&dir);
    assert_eq!(kept.len(), 3);

    std::fs::write(dir.join(ROOTFS_ZST_FILE), vendor_image()).unwrap();
    let status = bundle.status();
    assert_eq!(status.pending_rootfs_version, None);
    assert!(
        status
            .problems
            .iter()
            .any(|p| p.contains("not coworkvm's image")),
        "{:?}",
        status.problems
    );
    assert_eq!(
        bundle.seed_from(images_dir.path()).unwrap(),
        SeedOutcome::UpToDate {
            rootfs_version: "v1".into()
        }
    );
    assert!(
        !dir.join(ROOTFS_ZST_FILE).exists(),
        "the vendor image is removed"
    );
    assert!(bundle.status().problems.is_empty());
    let prepared = bundle.prepare(None).unwrap();
    assert!(prepared.expanded.is_none(), "nothing was expanded");
    assert_eq!(std::fs::read(dir.join(ROOTFS_FILE)).unwrap(), v1.rootfs);
    assert_eq!(identity_and_sessions(&dir), kept);
}

#[test]
fn vendor_zst_and_manifest_with_an_update_waiting_give_the_update() {
    let v1 = images("v1");
    let v2 = images("v2");
    let root = TempDir::new("vendor-update");
    let dir = root.path().to_owned();
    let bundle = prepared_bundle(&dir, v1);
    let kept = identity_and_sessions(&dir);

    // A stranger's manifest too, in no format coworkvm reads.
    std::fs::write(dir.join(ROOTFS_ZST_FILE), vendor_image()).unwrap();
    std::fs::write(dir.join("manifest.json"), b"{\"version\": \"vendor-7\"}").unwrap();
    let images_dir = v2.images_dir();
    assert_eq!(
        bundle.seed_from(images_dir.path()).unwrap(),
        SeedOutcome::Seeded {
            rootfs_version: "v2".into(),
            previous: Some("v1".into())
        }
    );
    let prepared = bundle.prepare(None).unwrap();
    assert_eq!(prepared.rootfs_version.as_deref(), Some("v2"));
    assert_eq!(std::fs::read(dir.join(ROOTFS_FILE)).unwrap(), v2.rootfs);
    assert!(!dir.join(ROOTFS_ZST_FILE).exists());
    assert_eq!(identity_and_sessions(&dir), kept);
}

#[test]
fn pending_own_zst_is_kept_and_applied() {
    // The images' own .zst, seeded but not applied yet (a crash between
    // seeding and expanding): seeding again keeps it and hashes it only.
    let v1 = images("v1");
    let images_dir = v1.images_dir();
    let root = TempDir::new("pending-own");
    let dir = root.path().to_owned();
    let bundle = Bundle::open(&dir).unwrap();
    bundle.seed_from(images_dir.path()).unwrap();
    assert_eq!(
        bundle.seed_from(images_dir.path()).unwrap(),
        SeedOutcome::UpToDate {
            rootfs_version: "v1".into()
        }
    );
    assert_eq!(std::fs::read(dir.join(ROOTFS_ZST_FILE)).unwrap(), v1.zst);
    let prepared = bundle.prepare(Some(1)).unwrap();
    assert!(prepared.expanded.is_some());
}

#[test]
fn rootfs_overwritten_by_another_image_is_applied_again() {
    let v1 = images("v1");
    let images_dir = v1.images_dir();
    let root = TempDir::new("vendor-img");
    let dir = root.path().to_owned();
    let bundle = prepared_from(&dir, images_dir.path());
    let kept = identity_and_sessions(&dir);

    std::fs::write(dir.join(ROOTFS_FILE), pseudo_random(98, 5 * MIB)).unwrap();
    assert!(matches!(
        bundle.seed_from(images_dir.path()).unwrap(),
        SeedOutcome::Seeded { .. }
    ));
    let prepared = bundle.prepare(None).unwrap();
    assert!(prepared.expanded.is_some());
    assert_eq!(std::fs::read(dir.join(ROOTFS_FILE)).unwrap(), v1.rootfs);
    assert_eq!(identity_and_sessions(&dir), kept);
}

#[test]
fn stale_partial_file_is_replaced() {
    let root = TempDir::new("stale");
    let dir = root.path();
    let v1 = images("v1");
    v1.drop_into(dir);
    std::fs::write(dir.join("rootfs.img.partial"), b"left by a crash").unwrap();
    let prepared = Bundle::open(dir).unwrap().prepare(Some(1)).unwrap();
    assert_eq!(std::fs::read(prepared.rootfs).unwrap(), v1.rootfs);
    assert!(!dir.join("rootfs.img.partial").exists());
}

#[test]
fn prepare_without_rootfs_says_what_is_missing() {
    let root = TempDir::new("empty");
    let err = Bundle::open(root.path())
        .unwrap()
        .prepare(None)
        .unwrap_err();
    assert!(err.to_string().contains("has no rootfs.img"), "{err}");
    assert!(
        !root.path().join(MAC_FILE).exists(),
        "nothing is created for a bundle that cannot boot"
    );
}

/// A tmpfs mounted for one test, unmounted (and its mount point removed)
/// when dropped, whatever the test did.
struct TmpfsMount {
    dir: TempDir,
}

impl TmpfsMount {
    /// When mounting is not possible here, a failure, or with `SKIP_VM=1`
    /// `None` (the test is skipped).
    #[track_caller]
    fn new(test: &str, size: &str) -> Option<Self> {
        let dir = TempDir::new(test);
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        let failure = match out {
            Ok(o) if o.status.success() => return Some(TmpfsMount { dir }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => format!("cannot run mount: {e}"),
        };
        coworkvm_tests::skip_or_fail(format!("{test} needs root to mount a tmpfs ({failure})"));
        None
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount_read_only(&self) {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// An image that compresses to almost nothing but has no zero block, so it
/// needs its full size on disk.
fn large_dense_image(len: usize) -> Vec<u8> {
    let pattern = pseudo_random(7, 64 * 1024);
    pattern.iter().copied().cycle().take(len).collect()
}

#[test]
fn full_disk_is_a_clear_error_and_changes_nothing() {
    let Some(mount) = TmpfsMount::new("full_disk", "4m") else {
        return;
    };
    let dir = mount.path();
    let old_rootfs = pseudo_random(3, 64 * 1024);
    std::fs::write(dir.join(ROOTFS_FILE), &old_rootfs).unwrap();
    let big = large_dense_image(16 * MIB);
    let zst = compress(&big);
    assert!(
        zst.len() < MIB,
        "the test needs a small .zst: {}",
        zst.len()
    );
    std::fs::write(dir.join(ROOTFS_ZST_FILE), &zst).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        manifest("v2", &[(ROOTFS_FILE, &big)]),
    )
    .unwrap();
    std::fs::write(dir.join("vmlinuz"), b"k").unwrap();
    std::fs::write(dir.join("initrd.img"), b"i").unwrap();
    let bundle = Bundle::open(dir).unwrap();
    // Created up front, so the listing below compares like with like.
    std::fs::write(dir.join(".lock"), b"").unwrap();
    let before = snapshot(dir);

    let err = bundle.prepare(Some(1)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "no space left expanding rootfs.img.zst into {} (needs {} bytes)",
            dir.display(),
            16 * MIB
        )),
        "{msg}"
    );
    assert_eq!(snapshot(dir), before, "the bundle is as it was");
    assert_eq!(
        listing(dir),
        [
            ".lock",
            "initrd.img",
            "manifest.json",
            "rootfs.img",
            "rootfs.img.zst",
            "vmlinuz"
        ]
    );
}

#[test]
fn read_only_bundle_is_a_clear_error_and_changes_nothing() {
    let Some(mount) = TmpfsMount::new("read_only", "64m") else {
        return;
    };
    let dir = mount.path();
    let v1 = images("v1");
    let bundle = prepared_bundle(dir, v1);
    let v2 = images("v2");
    v2.drop_into(dir);
    let before = snapshot(dir);
    mount.remount_read_only();

    let err = bundle.prepare(None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("rootfs.img.zst") && msg.contains("read-only"),
        "{msg}"
    );
    assert_eq!(snapshot(dir), before);
    assert_eq!(std::fs::read(dir.join(ROOTFS_FILE)).unwrap(), v1.rootfs);
}

#[test]
fn identity_is_created_once_and_stable() {
    let root = TempDir::new("identity");
    let dir = root.path();
    let status = Bundle::open(dir).unwrap().status();
    assert_eq!((status.mac, status.machine_id), (None, None));
    assert!(!dir.join(MAC_FILE).exists(), "status creates nothing");

    let first = BundleIdentity::load_or_create(dir).unwrap();
    let mac_text = std::fs::read_to_string(dir.join(MAC_FILE)).unwrap();
    let id_text = std::fs::read_to_string(dir.join(MACHINE_ID_FILE)).unwrap();
    assert_eq!(mac_text, format!("{}\n", first.mac));
    assert_eq!(id_text, format!("{}\n", first.machine_id));
    assert_eq!(mac_text.len(), 18);
    assert_eq!(id_text.len(), 37);
    assert_eq!(first.mac.octets()[0] & 0b11, 0b10, "local, unicast");
    assert_eq!(&id_text[14..15], "4", "UUID version 4");

    for _ in 0..3 {
        assert_eq!(BundleIdentity::load_or_create(dir).unwrap(), first);
    }
    assert_eq!(
        std::fs::read_to_string(dir.join(MAC_FILE)).unwrap(),
        mac_text
    );
    assert_eq!(identity::read_mac(dir).unwrap(), Some(first.mac));
    assert_eq!(
        identity::read_machine_id(dir).unwrap(),
        Some(first.machine_id)
    );
    // A second bundle gets a different identity.
    let other = TempDir::new("identity-other");
    assert_ne!(BundleIdentity::load_or_create(other.path()).unwrap(), first);
}

#[test]
fn concurrent_identity_creators_agree() {
    for round in 0..20 {
        let root = TempDir::new("race");
        let dir = Arc::new(root.path().to_owned());
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (dir, barrier) = (dir.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    BundleIdentity::load_or_create(&dir).unwrap()
                })
            })
            .collect();
        let ids: Vec<BundleIdentity> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "round {round}: {ids:?}");
        assert_eq!(BundleIdentity::load_or_create(&dir).unwrap(), ids[0]);
        assert_eq!(
            listing(&dir),
            [MAC_FILE, MACHINE_ID_FILE],
            "round {round}: no temporary file is left"
        );
    }
}

#[test]
fn malformed_identity_is_an_error_and_left_alone() {
    let root = TempDir::new("malformed");
    let dir = root.path();
    std::fs::write(dir.join(MAC_FILE), "not a mac\n").unwrap();
    let err = BundleIdentity::load_or_create(dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "macAddress in {} is not a MAC address",
            dir.display()
        )),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join(MAC_FILE)).unwrap(),
        "not a mac\n"
    );

    std::fs::remove_file(dir.join(MAC_FILE)).unwrap();
    std::fs::write(dir.join(MACHINE_ID_FILE), "1234\n").unwrap();
    let err = BundleIdentity::load_or_create(dir).unwrap_err();
    assert!(err.to_string().contains("is not a UUID"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join(MACHINE_ID_FILE)).unwrap(),
        "1234\n"
    );
    let status = Bundle::open(dir).unwrap().status();
    assert_eq!(status.machine_id, None);
    assert!(
        status.problems.iter().any(|p| p.contains("is not a UUID")),
        "{:?}",
        status.problems
    );
}

#[test]
fn unreadable_identity_is_an_error_and_left_alone() {
    let root = TempDir::new("unreadable");
    let dir = root.path();
    // Root reads any file whatever its mode: a directory cannot be read as
    // one by anybody.
    std::fs::create_dir(dir.join(MAC_FILE)).unwrap();
    std::fs::write(dir.join(MAC_FILE).join("inside"), "x").unwrap();
    let err = BundleIdentity::load_or_create(dir).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("macAddress in {} cannot be read", dir.display())),
        "{err}"
    );
    assert!(dir.join(MAC_FILE).is_dir());
    assert!(dir.join(MAC_FILE).join("inside").exists());
    assert!(!dir.join(MACHINE_ID_FILE).exists());
}

#[test]
fn session_disk_is_sparse_and_never_recreated() {
    let root = TempDir::new("session");
    let dir = root.path();
    let disk = SessionDisk::ensure(dir, Some(2)).unwrap();
    assert!(disk.created);
    let meta = std::fs::metadata(&disk.path).unwrap();
    assert_eq!(meta.size(), 2 * GIB);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    assert_eq!(meta.mode() & 0o777, 0o600);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.path)
            .unwrap();
        f.seek(SeekFrom::Start(GIB)).unwrap();
        f.write_all(b"marker").unwrap();
    }
    let again = SessionDisk::ensure(dir, Some(5)).unwrap();
    assert!(!again.created);
    assert_eq!(again.size_bytes, 2 * GIB, "never resized");
    let meta2 = std::fs::metadata(&disk.path).unwrap();
    assert_eq!(meta2.ino(), meta.ino(), "never replaced");
    assert_eq!(meta2.size(), 2 * GIB);
    let mut f = std::fs::File::open(&disk.path).unwrap();
    f.seek(SeekFrom::Start(GIB)).unwrap();
    let mut marker = [0u8; 6];
    f.read_exact(&mut marker).unwrap();
    assert_eq!(&marker, b"marker");
    assert_eq!(listing(dir), [SESSION_DISK_FILE]);
}

#[test]
fn session_disk_size_comes_from_argument_then_config_then_default() {
    let from_config = TempDir::new("config");
    std::fs::write(
        from_config.path().join("config.json"),
        r#"{"diskSizeGB": 3}"#,
    )
    .unwrap();
    assert_eq!(
        SessionDisk::ensure(from_config.path(), None)
            .unwrap()
            .size_bytes,
        3 * GIB
    );
    let argument_wins = TempDir::new("config-arg");
    std::fs::write(
        argument_wins.path().join("config.json"),
        r#"{"diskSizeGB": 3}"#,
    )
    .unwrap();
    assert_eq!(
        SessionDisk::ensure(argument_wins.path(), Some(4))
            .unwrap()
            .size_bytes,
        4 * GIB
    );
    let default = TempDir::new("config-none");
    assert_eq!(
        SessionDisk::ensure(default.path(), None)
            .unwrap()
            .size_bytes,
        10 * GIB
    );
    let broken = TempDir::new("config-broken");
    std::fs::write(broken.path().join("config.json"), "{").unwrap();
    let err = SessionDisk::ensure(broken.path(), None).unwrap_err();
    assert!(err.to_string().contains("config.json in"), "{err}");
    assert!(!broken.path().join(SESSION_DISK_FILE).exists());
    let zero = TempDir::new("config-zero");
    assert!(SessionDisk::ensure(zero.path(), Some(0)).is_err());
}

// ---------------------------------------------------------------------------
// Issue 11: bundle files by descriptor, never through a link or a FIFO.

/// A host file the guest must never reach, with its content and mtime.
struct Canary {
    path: PathBuf,
    mtime: i64,
}

impl Canary {
    fn new(dir: &Path) -> Self {
        let path = dir.join("canary-secret");
        std::fs::write(&path, b"the user's secret, not a disk").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().mtime();
        Canary { path, mtime }
    }

    fn assert_untouched(&self) {
        assert_eq!(
            std::fs::read(&self.path).unwrap(),
            b"the user's secret, not a disk"
        );
        assert_eq!(std::fs::metadata(&self.path).unwrap().mtime(), self.mtime);
    }
}

/// `sessiondata.img` (or another boot file) replaced by a symbolic link to
/// a host file: startVM's preparation refuses it and never opens the file
/// it points at.
#[test]
fn a_boot_file_symlinked_to_a_host_file_is_refused_and_the_file_untouched() {
    use coworkvm_helper::{BundleImages, ImageSource};
    let v1 = images("v1");
    let images_dir = v1.images_dir();
    let root = TempDir::new("symlink");
    let dir = root.path().join("bundle");
    prepared_from(&dir, images_dir.path());
    let canary = Canary::new(root.path());
    let source = BundleImages {
        images_dir: images_dir.path().to_owned(),
    };
    // It boots as it is.
    source.prepare(&dir, None).unwrap();

    std::fs::remove_file(dir.join(SESSION_DISK_FILE)).unwrap();
    std::os::unix::fs::symlink(&canary.path, dir.join(SESSION_DISK_FILE)).unwrap();
    let e = source.prepare(&dir, None).unwrap_err().to_string();
    assert!(
        e.contains(SESSION_DISK_FILE) && e.contains("not a regular file"),
        "{e}"
    );
    canary.assert_untouched();
    std::fs::remove_file(dir.join(SESSION_DISK_FILE)).unwrap();

    // The same for the files the guest only reads.
    for file in ["vmlinuz", "initrd.img", ROOTFS_FILE] {
        let real = root.path().join(format!("{file}.real"));
        std::fs::rename(dir.join(file), &real).unwrap();
        std::os::unix::fs::symlink(&real, dir.join(file)).unwrap();
        let e = source.prepare(&dir, None).unwrap_err().to_string();
        assert!(
            e.contains(file) && e.contains("symbolic link"),
            "{file}: {e}"
        );
        std::fs::remove_file(dir.join(file)).unwrap();
        std::fs::rename(&real, dir.join(file)).unwrap();
    }
    canary.assert_untouched();
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs `f` on a thread and gives its result, or panics after `limit`
/// (a hang would otherwise hang the test).
fn within<T: Send + 'static>(
    limit: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("no answer in time: it hangs")
}

/// `manifest.json` as a FIFO (nobody ever writes it): prepare answers with
/// a clear error at once instead of hanging under the bundle lock; one
/// over 1 MiB is refused before it is read whole.
#[test]
fn a_fifo_or_huge_manifest_is_a_clear_error_quickly() {
    let v1 = images("v1");
    let root = TempDir::new("fifo");
    let dir = root.path().join("bundle");
    std::fs::create_dir_all(&dir).unwrap();
    v1.drop_into(&dir);
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    mkfifo(&dir.join("manifest.json"));
    let d = dir.clone();
    let r = within(std::time::Duration::from_secs(10), move || {
        Bundle::open(&d).unwrap().prepare(Some(1)).map(|_| ())
    });
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("manifest.json") && e.contains("not a regular file"),
        "{e}"
    );
    // The lock was released: the next prepare gets as far.
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let mut huge = v1.manifest();
    huge.resize(2 << 20, b' ');
    std::fs::write(dir.join("manifest.json"), huge).unwrap();
    let d = dir.clone();
    let e = within(std::time::Duration::from_secs(10), move || {
        Bundle::open(&d).unwrap().prepare(Some(1)).map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("larger than the 1048576 bytes"), "{e}");
    // A FIFO seeding source is refused as quickly.
    let images = TempDir::new("fifo-images");
    v1.write_dir(images.path());
    std::fs::remove_file(images.path().join("manifest.json")).unwrap();
    mkfifo(&images.path().join("manifest.json"));
    let (d, i) = (dir.clone(), images.path().to_owned());
    let e = within(std::time::Duration::from_secs(10), move || {
        Bundle::open(&d).unwrap().seed_from(&i).map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a regular file"), "{e}");
}
