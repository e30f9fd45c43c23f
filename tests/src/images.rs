//! Guest images for the rig: `build/images` (made by `make build`) put on
//! an ext4 disk that L1 mounts, and empty ext4 disks for bundles.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use socket_proto::manifest::{FileEntry, Manifest};

/// The size of the bundle disk of [`HelperDisks`], in MiB.
pub const BUNDLE_DISK_MIB: u64 = 3072;

/// The disks of a rig test that runs the helper with real VMs, in a fresh
/// work directory `target/rig-tmp/<name>` that goes when this does:
/// `$DISK0` the images ([`images_disk`]), `$DISK1` an empty ext4 bundle
/// disk of [`BUNDLE_DISK_MIB`].
pub struct HelperDisks {
    pub work: PathBuf,
    pub disks: Vec<PathBuf>,
}

impl HelperDisks {
    /// Both disks for the test `name`, the images with their update when
    /// `with_update`.
    pub fn new(root: &Path, images: &Path, name: &str, with_update: bool) -> Result<Self> {
        let work = root.join("target/rig-tmp").join(name);
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let images_disk = images_disk(images, &work, with_update).context("the images disk")?;
        let bundle_disk = work.join("bundle.ext4");
        ext4_image(&bundle_disk, None, BUNDLE_DISK_MIB).context("the bundle disk")?;
        Ok(HelperDisks {
            work,
            disks: vec![images_disk, bundle_disk],
        })
    }
}

impl Drop for HelperDisks {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// `/etc/coworkvm-release` of the update made by [`images_disk`].
pub const UPDATE_RELEASE: &str = "coworkvm-e2e-update";

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// An ext4 image of `size_mib`, holding `tree` when given.
pub fn ext4_image(out: &Path, tree: Option<&Path>, size_mib: u64) -> Result<()> {
    let _ = std::fs::remove_file(out);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F"]);
    if let Some(t) = tree {
        cmd.arg("-d").arg(t);
    }
    cmd.arg(out).arg(format!("{size_mib}M"));
    run(&mut cmd)
}

fn tree_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(md) if md.is_dir() => tree_size(&e.path()),
            Ok(md) => md.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The images directory for a rig run (`images` in [`crate::build_dir`]),
/// or why there is none.
pub fn images_dir(root: &Path) -> Result<PathBuf> {
    let dir = crate::build_dir(root).join("images");
    if !dir.join("manifest.json").exists() {
        bail!("{} is missing: run `make build`", dir.display());
    }
    Ok(dir)
}

/// [`images_dir`] for a VM test: when the images were not built, a failure,
/// or with `SKIP_VM=1` `None` (a counted skip; [`crate::skip_or_fail`]).
#[track_caller]
pub fn images_or_skip(root: &Path) -> Option<PathBuf> {
    crate::ok_or_skip(images_dir(root).map_err(|e| format!("{e:#}")))
}

/// The delivered image files (`vmlinuz`, `initrd.img`, `manifest.json`,
/// `rootfs.img.zst`) on an ext4 disk, plus, with `with_update`, `update/`:
/// the same rootfs with `/etc/coworkvm-release` = [`UPDATE_RELEASE`],
/// recompressed, and its manifest.
pub fn images_disk(images: &Path, work: &Path, with_update: bool) -> Result<PathBuf> {
    let tree = work.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree)?;
    for f in ["vmlinuz", "initrd.img", "manifest.json", "rootfs.img.zst"] {
        std::fs::copy(images.join(f), tree.join(f))
            .with_context(|| format!("{}", images.join(f).display()))?;
    }
    if with_update {
        std::fs::create_dir_all(tree.join("update"))?;
        let img = work.join("update-rootfs.img");
        std::fs::copy(images.join("rootfs.img"), &img)?;
        let rel = work.join("release");
        std::fs::write(&rel, format!("{UPDATE_RELEASE}\n"))?;
        run(Command::new("debugfs")
            .args(["-w", "-R", "rm /etc/coworkvm-release"])
            .arg(&img))?;
        run(Command::new("debugfs")
            .arg("-w")
            .arg("-R")
            .arg(format!("write {} /etc/coworkvm-release", rel.display()))
            .arg(&img))?;
        let zst = tree.join("update/rootfs.img.zst");
        run(Command::new("zstd")
            .args(["-q", "-f", "-T0", "--long=27", "-3", "-o"])
            .arg(&zst)
            .arg(&img))?;
        let mut m: Manifest =
            serde_json::from_slice(&std::fs::read(images.join("manifest.json"))?)?;
        m.rootfs_version = UPDATE_RELEASE.into();
        m.files
            .insert("rootfs.img".into(), FileEntry::of_file(&img)?);
        m.files
            .insert("rootfs.img.zst".into(), FileEntry::of_file(&zst)?);
        std::fs::write(
            tree.join("update/manifest.json"),
            serde_json::to_vec_pretty(&m)?,
        )?;
        let _ = std::fs::remove_file(&img);
    }
    let disk = work.join("images.ext4");
    ext4_image(
        &disk,
        Some(&tree),
        tree_size(&tree) / (1 << 20) * 11 / 10 + 64,
    )?;
    let _ = std::fs::remove_dir_all(&tree);
    Ok(disk)
}
