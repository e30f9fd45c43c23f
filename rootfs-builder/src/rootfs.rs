//! `coworkvm-rootfs build`: the guest images from Debian packages.
//!
//! Steps, each cached or cheap to redo:
//! 1. a Debian minbase tree from `mmdebstrap` (the packages in
//!    `packages.txt`), kept as a tarball under the cache directory, keyed by
//!    suite, packages, SOURCE_DATE_EPOCH and the mmdebstrap version;
//! 2. the tree unpacked on a tmpfs (so directory order, which `mkfs.ext4
//!    -d` follows, depends only on the tarball), our agent and
//!    `/etc/coworkvm-release` added, non-reproducible leftovers removed,
//!    every timestamp clamped to SOURCE_DATE_EPOCH;
//! 3. `rootfs.img`: `mkfs.ext4 -d` with a fixed UUID and hash seed and
//!    `E2FSPROGS_FAKE_TIME`, no journal (the guest mounts it read-only);
//! 4. `rootfs.img.zst` (zstd, all cores, long-distance matching), the
//!    initramfs `initrd.img` (agent + modules), `vmlinuz`;
//! 5. `manifest.json`, written last: its presence with a matching input
//!    stamp is what makes a rerun a no-op.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::initramfs::{self, Compression, InitramfsSpec};
use socket_proto::manifest::{hex, FileEntry, Manifest, MANIFEST_FILE, MANIFEST_FORMAT};

/// The Debian packages of the rootfs beyond minbase.
pub const PACKAGES: &str = include_str!("../packages.txt");
/// What the `office` profile adds to [`PACKAGES`].
pub const OFFICE_PACKAGES: &str = include_str!("../packages-office.txt");

/// Which package set an image carries (`make images PROFILE=...`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// `packages.txt`: the everyday userland.
    #[default]
    Default,
    /// Plus `packages-office.txt` (LibreOffice, headless).
    Office,
}
/// Default SOURCE_DATE_EPOCH: 2026-01-01T00:00:00Z.
pub const DEFAULT_EPOCH: u64 = 1_767_225_600;
/// Fixed filesystem UUID and directory hash seed of `rootfs.img`.
pub const FS_UUID: &str = "c0e0c0e0-5a5a-4b4b-8c8c-000000000001";
/// Modules the initramfs loads before it mounts the rootfs.
pub const INITRD_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio-rng",
    "vmw_vsock_virtio_transport",
    "overlay",
    // The shared-folder device (pulls in `fuse`); built in on 6.12.
    "virtiofs",
];
/// Files of an image directory, in manifest order.
pub const IMAGE_FILES: &[&str] = &["vmlinuz", "initrd.img", "rootfs.img", "rootfs.img.zst"];

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{cmd} failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{0} is missing: run `make kernel` (scripts/fetch-kernel.sh)")]
    NoKernel(PathBuf),
    #[error(transparent)]
    Initramfs(#[from] initramfs::InitramfsError),
    #[error("writing the manifest: {0}")]
    Manifest(#[from] serde_json::Error),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_owned();
    move |source| RootfsError::Io { what, path, source }
}

/// What a build needs.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    pub out: PathBuf,
    pub kernel_dir: PathBuf,
    pub agent: PathBuf,
    pub cache_dir: PathBuf,
    pub suite: String,
    pub mirror: String,
    pub epoch: u64,
    /// `/etc/coworkvm-release`; default: builder version + input hash.
    pub version_tag: Option<String>,
    /// zstd level of `rootfs.img.zst`.
    pub zstd_level: i32,
    /// The package set.
    pub profile: Profile,
}

/// The package list of `profile`, one per line in its files, comments and
/// blanks dropped.
pub fn packages(profile: Profile) -> Vec<&'static str> {
    let extra = match profile {
        Profile::Default => "",
        Profile::Office => OFFICE_PACKAGES,
    };
    PACKAGES
        .lines()
        .chain(extra.lines())
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect()
}

pub fn sha256_file(path: &Path) -> Result<FileEntry, RootfsError> {
    FileEntry::of_file(path).map_err(io("reading", path))
}

fn run(cmd: &mut Command) -> Result<String, RootfsError> {
    let out = cmd.output().map_err(|e| RootfsError::Command {
        cmd: format!("{cmd:?}"),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(RootfsError::Command {
            cmd: format!("{cmd:?}"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kernel_release(kernel_dir: &Path) -> Result<String, RootfsError> {
    let v = kernel_dir.join("version");
    let text = std::fs::read_to_string(&v).map_err(|_| RootfsError::NoKernel(v.clone()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("release="))
        .map(|r| r.trim().to_owned())
        .ok_or(RootfsError::NoKernel(v))
}

/// The key of the base tarball in the cache.
pub fn base_key(suite: &str, packages: &[&str], epoch: u64, mmdebstrap: &str) -> String {
    let mut h = Sha256::new();
    for part in [suite, &packages.join(","), &epoch.to_string(), mmdebstrap] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())[..16].to_owned()
}

/// The code that turns a base tree into the images: any change to it, a
/// comment included, makes the next build redo the images (seconds, with
/// the base tree cached) rather than keep ones made the old way.
const RECIPE: [&str; 4] = [
    include_str!("rootfs.rs"),
    include_str!("initramfs.rs"),
    include_str!("cpio.rs"),
    include_str!("modules.rs"),
];

/// Everything a build's output depends on, hashed: a build whose stamp
/// matches the manifest's is already done. `tools` is the version of the
/// e2fsprogs that lays out the ext4 image.
pub fn input_stamp(
    spec: &BuildSpec,
    agent: &FileEntry,
    kernel: &str,
    base: &str,
    tools: &str,
) -> String {
    let mut h = Sha256::new();
    for part in RECIPE {
        h.update(Sha256::digest(part.as_bytes()));
    }
    for part in [
        env!("CARGO_PKG_VERSION"),
        tools,
        &agent.sha256,
        kernel,
        base,
        &spec.epoch.to_string(),
        &spec.zstd_level.to_string(),
        spec.version_tag.as_deref().unwrap_or(""),
        &format!("{INITRD_MODULES:?}"),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())
}

/// Prints progress: one line per step with its time.
pub struct Progress {
    step: usize,
    total: usize,
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        Progress {
            step: 0,
            total,
            started: Instant::now(),
            bar,
        }
    }

    pub fn step(&mut self, what: &str) -> Instant {
        self.step += 1;
        let line = format!("[{}/{}] {what}", self.step, self.total);
        match &self.bar {
            Some(b) => b.set_message(line),
            None => eprintln!("{line}"),
        }
        Instant::now()
    }

    pub fn done(&self, what: &str, since: Instant) {
        let line = format!(
            "[{}/{}] {what} ({:.1} s)",
            self.step,
            self.total,
            since.elapsed().as_secs_f64()
        );
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        eprintln!(
            "images built in {:.1} s",
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Files left by package installation that differ run to run and that the
/// guest does not need.
pub const NOISE: &[&str] = &[
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/bootstrap.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/cache/ldconfig/aux-cache",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/available-old",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "etc/hostname",
    "etc/resolv.conf",
];

/// Image size for a tree of `bytes` in `inodes` files: a quarter more plus
/// 64 MiB of room, in whole MiB.
pub fn image_size_mib(bytes: u64, inodes: u64) -> u64 {
    let mib = 1 << 20;
    let need = bytes + bytes / 4 + inodes * 512 + 64 * mib;
    need.div_ceil(mib)
}

fn tree_usage(dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            inodes += 1;
            if let Ok(md) = e.path().symlink_metadata() {
                if md.is_dir() {
                    stack.push(e.path());
                } else {
                    bytes += md.len().div_ceil(4096) * 4096;
                }
            }
        }
    }
    (bytes, inodes)
}

/// Makes `rootfs.img` from `tree`, deterministically.
pub fn make_ext4(tree: &Path, out: &Path, epoch: u64) -> Result<(), RootfsError> {
    let (bytes, inodes) = tree_usage(tree);
    let _ = std::fs::remove_file(out);
    clamp_times(tree, epoch)?;
    // LC_ALL=C: `-d` lists each directory with scandir + alphasort, which
    // collates by locale; the byte order keeps the image the same whatever
    // the caller's locale.
    run(Command::new("mkfs.ext4")
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .env("LC_ALL", "C")
        .args([
            "-q",
            "-F",
            "-L",
            "coworkvm-root",
            "-U",
            FS_UUID,
            "-O",
            "^has_journal",
        ])
        .args([
            "-E",
            &format!("hash_seed={FS_UUID},root_owner=0:0,lazy_itable_init=0"),
        ])
        .args(["-N", &(inodes + inodes / 4 + 1024).to_string()])
        .arg("-d")
        .arg(tree)
        .arg(out)
        .arg(format!("{}M", image_size_mib(bytes, inodes))))?;
    reset_inode_times(tree, out, epoch)?;
    // debugfs -w edits the image in place; a full read-only check proves
    // the result is a clean file system before it is hashed and shipped.
    run(Command::new("e2fsck")
        .env("LC_ALL", "C")
        .args(["-f", "-n"])
        .arg(out))?;
    Ok(())
}

/// `mkfs.ext4 -d` (e2fsprogs 1.47.0) copies each file's ctime, which is
/// when the tree was unpacked: no tool can set it. debugfs can, on the
/// image: every path gets ctime = `epoch`. Its atime too: `-d` lists a
/// directory (moving its atime on the tmpfs) before it copies the times,
/// so only the image can hold the clamped value for sure.
fn reset_inode_times(tree: &Path, img: &Path, epoch: u64) -> Result<(), RootfsError> {
    let mut cmds = String::new();
    for root in ["/", "/lost+found"] {
        cmds.push_str(&format!(
            "sif {root} ctime @{epoch}\nsif {root} atime @{epoch}\n"
        ));
    }
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(tree.join(&rel))
            .map_err(io("reading", &tree.join(&rel)))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = rel.join(e.file_name());
            let text = path.to_string_lossy();
            if text.contains(['"', '\n', '\\']) {
                return Err(RootfsError::Command {
                    cmd: "debugfs".into(),
                    detail: format!("cannot quote the path {text:?}"),
                });
            }
            cmds.push_str(&format!("sif \"/{text}\" ctime @{epoch}\n"));
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cmds.push_str(&format!("sif \"/{text}\" atime @{epoch}\n"));
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            }
        }
    }
    let file = img.with_extension("debugfs");
    std::fs::write(&file, cmds).map_err(io("writing", &file))?;
    let out = Command::new("debugfs")
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .env("LC_ALL", "C")
        .arg("-w")
        .arg("-f")
        .arg(&file)
        .arg(img)
        .output();
    let _ = std::fs::remove_file(&file);
    let out = out.map_err(io("running debugfs on", img))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // debugfs exits 0 whatever its commands did; its complaints name them.
    if !out.status.success()
        || stderr
            .lines()
            .any(|l| l.starts_with("sif:") || l.contains("not found"))
    {
        return Err(RootfsError::Command {
            cmd: format!("debugfs -w -f (inode times) {}", img.display()),
            detail: stderr.lines().take(5).collect::<Vec<_>>().join("; "),
        });
    }
    Ok(())
}

/// `mke2fs -V`'s first line (it prints on stderr): the ext4 layout
/// depends on it.
pub fn mke2fs_version() -> Result<String, RootfsError> {
    let cmd = "mke2fs -V";
    let out = Command::new("mke2fs")
        .arg("-V")
        .output()
        .map_err(|e| RootfsError::Command {
            cmd: cmd.into(),
            detail: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stderr);
    match text.lines().next() {
        Some(line) if out.status.success() && line.starts_with("mke2fs") => Ok(line.to_owned()),
        _ => Err(RootfsError::Command {
            cmd: cmd.into(),
            detail: text.trim().to_owned(),
        }),
    }
}

pub fn mmdebstrap_version() -> Result<String, RootfsError> {
    Ok(run(Command::new("mmdebstrap").arg("--version"))?
        .trim()
        .to_owned())
}

/// Where the base tarball of these inputs is cached.
pub fn base_tarball_path(cache_dir: &Path, suite: &str, key: &str) -> PathBuf {
    cache_dir.join(format!("base-{suite}-{key}.tar"))
}

/// The cached base tarball, built when missing.
fn base_tarball(
    spec: &BuildSpec,
    key: &str,
    progress: &mut Progress,
) -> Result<PathBuf, RootfsError> {
    let tar = spec
        .cache_dir
        .join(format!("base-{}-{key}.tar", spec.suite));
    let t = progress.step(&format!(
        "mmdebstrap {} minbase (+{} packages)",
        spec.suite,
        packages(spec.profile).len()
    ));
    if tar.is_file() {
        progress.done(&format!("base tree cached at {}", tar.display()), t);
        return Ok(tar);
    }
    std::fs::create_dir_all(&spec.cache_dir).map_err(io("creating", &spec.cache_dir))?;
    let partial = tar.with_extension("tar.partial");
    run(Command::new("mmdebstrap")
        .env("SOURCE_DATE_EPOCH", spec.epoch.to_string())
        .args(["--quiet", "--variant=minbase", "--format=tar"])
        .arg(format!("--include={}", packages(spec.profile).join(",")))
        // Documentation and translations: nothing in the guest reads them.
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
        ])
        .arg(&spec.suite)
        .arg(&partial)
        .arg(&spec.mirror))?;
    std::fs::rename(&partial, &tar).map_err(io("renaming", &partial))?;
    progress.done("base tree built", t);
    Ok(tar)
}

/// A scratch directory on a tmpfs when there is one (`/dev/shm`): its
/// directory order is creation order, the same on every host.
fn scratch_dir(cache: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm } else { cache };
    base.join(format!("coworkvm-rootfs-{}", std::process::id()))
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Unpacks the base tarball and adds coworkvm's parts.
pub fn assemble_tree(
    tar: &Path,
    tree: &Path,
    agent: &Path,
    release: &str,
) -> Result<(), RootfsError> {
    let _ = std::fs::remove_dir_all(tree);
    std::fs::create_dir_all(tree).map_err(io("creating", tree))?;
    run(Command::new("tar")
        .args(["-x", "--numeric-owner", "-p", "--xattrs", "-f"])
        .arg(tar)
        .arg("-C")
        .arg(tree))?;
    for f in NOISE {
        let _ = std::fs::remove_file(tree.join(f));
    }
    // systemd-style machine-id: empty, so nothing identifies the image.
    std::fs::write(tree.join("etc/machine-id"), b"").map_err(io("writing", tree))?;
    // mmdebstrap copies the build host's name; the guest is "coworkvm".
    std::fs::write(tree.join("etc/hostname"), b"coworkvm\n").map_err(io("writing", tree))?;
    let sbin = tree.join("usr/sbin/coworkvm-agent");
    std::fs::copy(agent, &sbin).map_err(io("copying the agent to", &sbin))?;
    let rel = tree.join("etc/coworkvm-release");
    std::fs::write(&rel, format!("{release}\n")).map_err(io("writing", &rel))?;
    // Times are clamped by make_ext4, right before mkfs reads them.
    std::fs::create_dir_all(tree.join("sessions")).map_err(io("creating", tree))
}

/// Sets every timestamp in `tree` (links themselves too) to `epoch`.
/// `mkfs.ext4 -d` copies atimes as well, and reading a file moves its
/// atime, so this runs right before each mkfs.
fn clamp_times(tree: &Path, epoch: u64) -> Result<(), RootfsError> {
    run(Command::new("find")
        .arg(tree)
        .args(["-exec", "touch", "--no-dereference", "--date"])
        .arg(format!("@{epoch}"))
        .args(["{}", "+"]))?;
    Ok(())
}

pub fn zstd_compress(input: &Path, out: &Path, level: i32) -> Result<(), RootfsError> {
    let partial = out.with_extension("zst.partial");
    let src = std::fs::File::open(input).map_err(io("reading", input))?;
    let dst = std::fs::File::create(&partial).map_err(io("creating", &partial))?;
    let mut enc = zstd::stream::Encoder::new(dst, level).map_err(io("zstd", out))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    enc.multithread(threads).map_err(io("zstd threads", out))?;
    enc.long_distance_matching(true).map_err(io("zstd", out))?;
    enc.window_log(27).map_err(io("zstd", out))?;
    enc.include_checksum(true).map_err(io("zstd", out))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, src);
    std::io::copy(&mut r, &mut enc).map_err(io("compressing", input))?;
    let f = enc.finish().map_err(io("compressing", input))?;
    f.sync_all().map_err(io("syncing", &partial))?;
    std::fs::rename(&partial, out).map_err(io("renaming", &partial))?;
    Ok(())
}

/// Whether DIR already holds the images of these inputs.
pub fn up_to_date(out: &Path, stamp: &str) -> bool {
    let Ok(bytes) = std::fs::read(out.join(MANIFEST_FILE)) else {
        return false;
    };
    let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
        return false;
    };
    m.inputs.as_deref() == Some(stamp)
        && IMAGE_FILES.iter().all(|f| {
            std::fs::metadata(out.join(f))
                .is_ok_and(|md| m.file(f).is_some_and(|e| e.size == md.len()))
        })
}

/// Builds the images into `spec.out`; returns the manifest (also written).
pub fn build(spec: &BuildSpec) -> Result<Manifest, RootfsError> {
    let release = kernel_release(&spec.kernel_dir)?;
    let vmlinuz = spec.kernel_dir.join("vmlinuz");
    if !vmlinuz.is_file() {
        return Err(RootfsError::NoKernel(vmlinuz));
    }
    let agent = sha256_file(&spec.agent)?;
    let pkgs = packages(spec.profile);
    let key = base_key(&spec.suite, &pkgs, spec.epoch, &mmdebstrap_version()?);
    let stamp = input_stamp(spec, &agent, &release, &key, &mke2fs_version()?);
    if up_to_date(&spec.out, &stamp) {
        eprintln!("images in {} are up to date", spec.out.display());
        let bytes =
            std::fs::read(spec.out.join(MANIFEST_FILE)).map_err(io("reading", &spec.out))?;
        return Ok(serde_json::from_slice(&bytes)?);
    }
    let version = spec
        .version_tag
        .clone()
        .unwrap_or_else(|| format!("coworkvm-{}-{}", env!("CARGO_PKG_VERSION"), &stamp[..12]));
    std::fs::create_dir_all(&spec.out).map_err(io("creating", &spec.out))?;
    let mut progress = Progress::new(6);
    let tar = base_tarball(spec, &key, &mut progress)?;

    let t = progress.step("assembling the tree");
    let tree = scratch_dir(&spec.cache_dir);
    let _cleanup = RemoveOnDrop(tree.clone());
    assemble_tree(&tar, &tree, &spec.agent, &version)?;
    progress.done(&format!("tree assembled ({version})"), t);

    let t = progress.step("mkfs.ext4 -d rootfs.img");
    let img = spec.out.join("rootfs.img");
    make_ext4(&tree, &img, spec.epoch)?;
    drop(_cleanup);
    progress.done(
        &format!(
            "rootfs.img {} MiB",
            std::fs::metadata(&img).map_or(0, |m| m.len() >> 20)
        ),
        t,
    );

    let t = progress.step(&format!(
        "zstd -{} --long=27 rootfs.img.zst",
        spec.zstd_level
    ));
    zstd_compress(&img, &spec.out.join("rootfs.img.zst"), spec.zstd_level)?;
    progress.done("rootfs.img.zst written", t);

    let t = progress.step("initrd.img and vmlinuz");
    let initrd_spec = InitramfsSpec {
        init: spec.agent.clone(),
        busybox: None,
        module_tree: Some(initramfs::kernel_dir_module_tree(&spec.kernel_dir)?),
        modules: INITRD_MODULES.iter().map(|m| m.to_string()).collect(),
        files: vec![],
        compression: Compression::Zstd,
        mtime: u32::try_from(spec.epoch).unwrap_or(u32::MAX),
    };
    initramfs::write(&initrd_spec, &spec.out.join("initrd.img"))?;
    let dst = spec.out.join("vmlinuz");
    std::fs::copy(&vmlinuz, &dst).map_err(io("copying", &vmlinuz))?;
    progress.done("initrd.img and vmlinuz", t);

    let t = progress.step("manifest.json");
    let mut files = std::collections::BTreeMap::new();
    for f in IMAGE_FILES {
        files.insert(f.to_string(), sha256_file(&spec.out.join(f))?);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        builder_version: env!("CARGO_PKG_VERSION").into(),
        kernel_version: release,
        rootfs_version: version,
        files,
        not_reproducible: vec![
            "the base tree follows the Debian mirror: two builds at different times may \
             install different package versions; a cached base tree (build/cache) gives \
             the same rootfs.img bit for bit"
                .into(),
        ],
        inputs: Some(stamp),
    };
    let tmp = spec.out.join("manifest.json.partial");
    let mut f = std::fs::File::create(&tmp).map_err(io("writing", &tmp))?;
    f.write_all(&serde_json::to_vec_pretty(&manifest)?)
        .and_then(|_| f.sync_all())
        .map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, spec.out.join(MANIFEST_FILE)).map_err(io("renaming", &tmp))?;
    progress.done("manifest.json", t);
    progress.finish();
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_list_has_what_the_guest_needs() {
        let p = packages(Profile::Default);
        for need in [
            "bindfs",
            "bubblewrap",
            "e2fsprogs",
            "bash",
            "ca-certificates",
            "curl",
            "util-linux",
        ] {
            assert!(p.contains(&need), "{need} in {p:?}");
        }
        assert!(p.iter().all(|x| !x.contains(' ') && !x.contains('#')));
    }

    #[test]
    fn base_key_changes_with_each_input() {
        let k = base_key("bookworm", &["a", "b"], 1, "mmdebstrap 1");
        assert_eq!(k, base_key("bookworm", &["a", "b"], 1, "mmdebstrap 1"));
        for other in [
            base_key("trixie", &["a", "b"], 1, "mmdebstrap 1"),
            base_key("bookworm", &["a", "c"], 1, "mmdebstrap 1"),
            base_key("bookworm", &["a", "b"], 2, "mmdebstrap 1"),
            base_key("bookworm", &["a", "b"], 1, "mmdebstrap 2"),
        ] {
            assert_ne!(k, other);
        }
        assert_eq!(
            base_key("bookworm", &["a,b"], 1, "m"),
            base_key("bookworm", &["a", "b"], 1, "m"),
            "the list joins with commas, as mmdebstrap's --include does"
        );
    }

    fn spec() -> BuildSpec {
        BuildSpec {
            out: "/o".into(),
            kernel_dir: "/k".into(),
            agent: "/a".into(),
            cache_dir: "/c".into(),
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            epoch: DEFAULT_EPOCH,
            version_tag: None,
            zstd_level: 10,
            profile: Profile::Default,
        }
    }

    #[test]
    fn the_office_profile_is_the_default_list_plus_libreoffice() {
        let default = packages(Profile::Default);
        let office = packages(Profile::Office);
        assert!(!default.contains(&"libreoffice-core"));
        assert!(office.contains(&"libreoffice-core"));
        assert_eq!(&office[..default.len()], &default[..]);
        // A different list: a different cached base tree and stamp.
        assert_ne!(
            base_key("bookworm", &default, 1, "m"),
            base_key("bookworm", &office, 1, "m")
        );
    }

    #[test]
    fn the_stamp_covers_agent_kernel_base_tools_and_settings() {
        let agent = FileEntry {
            sha256: "aa".into(),
            size: 1,
        };
        let s = spec();
        let base = input_stamp(&s, &agent, "6.12", "k", "e2fs");
        assert_eq!(base, input_stamp(&s, &agent, "6.12", "k", "e2fs"));
        let other_agent = FileEntry {
            sha256: "bb".into(),
            size: 1,
        };
        assert_ne!(base, input_stamp(&s, &other_agent, "6.12", "k", "e2fs"));
        assert_ne!(base, input_stamp(&s, &agent, "6.13", "k", "e2fs"));
        assert_ne!(base, input_stamp(&s, &agent, "6.12", "j", "e2fs"));
        assert_ne!(base, input_stamp(&s, &agent, "6.12", "k", "e2fs 1.48"));
        let mut s2 = spec();
        s2.zstd_level = 3;
        assert_ne!(base, input_stamp(&s2, &agent, "6.12", "k", "e2fs"));
        let mut s3 = spec();
        s3.version_tag = Some("x".into());
        assert_ne!(base, input_stamp(&s3, &agent, "6.12", "k", "e2fs"));
    }

    #[test]
    fn image_size_has_room() {
        let mib = 1 << 20;
        assert_eq!(image_size_mib(0, 0), 64);
        let s = image_size_mib(400 * mib, 20_000);
        assert!((500 + 64..600 + 64).contains(&s), "{s}");
    }

    #[test]
    fn up_to_date_needs_the_stamp_and_every_file() {
        let dir = std::env::temp_dir().join(format!("coworkvm-rootfs-utd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!up_to_date(&dir, "s"));
        let mut files = std::collections::BTreeMap::new();
        for f in IMAGE_FILES {
            std::fs::write(dir.join(f), f.as_bytes()).unwrap();
            files.insert(f.to_string(), sha256_file(&dir.join(f)).unwrap());
        }
        let m = Manifest {
            format: MANIFEST_FORMAT,
            builder_version: "0".into(),
            kernel_version: "k".into(),
            rootfs_version: "r".into(),
            files,
            not_reproducible: vec![],
            inputs: Some("s".into()),
        };
        std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(up_to_date(&dir, "s"));
        assert!(!up_to_date(&dir, "t"));
        std::fs::write(dir.join("rootfs.img"), b"longer than before").unwrap();
        assert!(!up_to_date(&dir, "s"), "a file of the wrong size");
        std::fs::remove_file(dir.join("rootfs.img")).unwrap();
        assert!(!up_to_date(&dir, "s"), "a missing file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mkfs_of_the_same_tree_is_bit_for_bit_the_same() {
        let dir = std::env::temp_dir().join(format!("coworkvm-rootfs-mkfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("etc/sub")).unwrap();
        for i in 0..50 {
            std::fs::write(
                tree.join(format!("etc/f{i}")),
                format!("file {i}\n").repeat(i),
            )
            .unwrap();
        }
        std::os::unix::fs::symlink("f1", tree.join("etc/sub/link")).unwrap();
        Command::new("find")
            .arg(&tree)
            .args([
                "-exec",
                "touch",
                "--no-dereference",
                "--date",
                "@1000",
                "{}",
                "+",
            ])
            .status()
            .unwrap();
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        make_ext4(&tree, &a, 1000).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        make_ext4(&tree, &b, 1000).unwrap();
        assert_eq!(sha256_file(&a).unwrap(), sha256_file(&b).unwrap());
        make_ext4(&tree, &b, 2000).unwrap();
        assert_ne!(
            sha256_file(&a).unwrap(),
            sha256_file(&b).unwrap(),
            "the epoch is in the image: the check above could fail"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
