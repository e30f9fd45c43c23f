//! `coworkvm-rootfs`: builds coworkvm's guest images.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use coworkvm_rootfs::cpio;
use coworkvm_rootfs::initramfs::{self, Compression, InitramfsSpec};

#[derive(Parser)]
#[command(
    name = "coworkvm-rootfs",
    version,
    about = "Build coworkvm guest images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write an initramfs: /init, optional busybox, modules and extra files.
    /// Same inputs, same bytes: entries sorted, owner root, every mtime
    /// $SOURCE_DATE_EPOCH (default 0).
    Initramfs {
        #[arg(long)]
        out: PathBuf,
        /// Script or binary to install as /init [default: a busybox shell
        /// init that mounts /proc, /sys, /dev and loads the modules].
        #[arg(long)]
        init: Option<PathBuf>,
        /// Static busybox to install as /bin/busybox (with applet links).
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// Kernel directory made by scripts/fetch-kernel.sh (its `version`
        /// file names the release; modules come from DIR/modules/<release>).
        #[arg(long, conflicts_with = "modules_dir")]
        kernel_dir: Option<PathBuf>,
        /// Unpacked module tree of the guest kernel (lib/modules/<release>).
        #[arg(long)]
        modules_dir: Option<PathBuf>,
        /// Comma-separated module names; their dependencies are added too.
        #[arg(long, value_delimiter = ',')]
        modules: Vec<String>,
        /// Extra file as SRC:DST (DST is the absolute path in the image).
        #[arg(long = "add")]
        add: Vec<String>,
        /// zstd or none.
        #[arg(long, default_value = "zstd")]
        compress: Compression,
    },
    /// Build the guest images from Debian packages into DIR: vmlinuz,
    /// initrd.img (agent + modules), rootfs.img (ext4), rootfs.img.zst and
    /// manifest.json. A no-op when DIR already holds these inputs' images.
    Build {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Kernel directory made by scripts/fetch-kernel.sh.
        #[arg(long, default_value = "build/kernel")]
        kernel_dir: PathBuf,
        /// The static coworkvm-agent binary.
        #[arg(long)]
        agent: PathBuf,
        /// Where the mmdebstrap base tree is kept between builds.
        #[arg(long, default_value = "build/cache")]
        cache_dir: PathBuf,
        #[arg(long, default_value = "bookworm")]
        suite: String,
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
        /// /etc/coworkvm-release [default: builder version + input hash].
        #[arg(long)]
        version_tag: Option<String>,
        /// zstd level of rootfs.img.zst.
        #[arg(long, default_value_t = 12)]
        zstd_level: i32,
        /// The package set: `default` (packages.txt) or `office` (plus
        /// packages-office.txt, LibreOffice headless).
        #[arg(long, value_enum, default_value_t = coworkvm_rootfs::rootfs::Profile::Default)]
        profile: coworkvm_rootfs::rootfs::Profile,
    },
    /// List the entries of a newc archive (plain or zstd-compressed).
    List { file: PathBuf },
}

fn initramfs_cmd(
    out: PathBuf,
    init: Option<PathBuf>,
    busybox: Option<PathBuf>,
    module_tree: Option<PathBuf>,
    modules: Vec<String>,
    add: Vec<String>,
    compress: Compression,
) -> anyhow::Result<()> {
    let files = add
        .iter()
        .map(|a| {
            a.split_once(':')
                .filter(|(s, d)| !s.is_empty() && d.starts_with('/'))
                .map(|(s, d)| (PathBuf::from(s), d.to_owned()))
                .with_context(|| format!("--add {a}: expected SRC:/ABSOLUTE/DST"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mtime = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={s} is not a u32 timestamp"))?,
        Err(_) => 0,
    };
    // Without --init, the built-in busybox init goes in (through a
    // temporary file next to the output).
    let default_init = out.with_extension("default-init.tmp");
    let init = match init {
        Some(p) => p,
        None if busybox.is_some() => {
            std::fs::write(&default_init, initramfs::DEFAULT_INIT)?;
            default_init.clone()
        }
        None => bail!("without --busybox there is no shell for the default init: give --init"),
    };
    let spec = InitramfsSpec {
        init,
        busybox,
        module_tree,
        modules,
        files,
        compression: compress,
        mtime,
    };
    let result = initramfs::write(&spec, &out);
    let _ = std::fs::remove_file(&default_init);
    let size = result.with_context(|| format!("building {}", out.display()))?;
    println!("{}: {size} bytes", out.display());
    Ok(())
}

fn list(file: &Path) -> anyhow::Result<()> {
    let mut data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        data = zstd::decode_all(data.as_slice()).context("zstd")?;
    }
    let entries = cpio::parse(&data).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    for (name, mode, bytes) in entries {
        let kind = match mode & 0o170000 {
            cpio::MODE_DIR => 'd',
            cpio::MODE_SYMLINK => 'l',
            _ => '-',
        };
        let extra = if kind == 'l' {
            format!(" -> {}", String::from_utf8_lossy(&bytes))
        } else {
            String::new()
        };
        println!(
            "{kind}{:04o} {:>10} {name}{extra}",
            mode & 0o7777,
            bytes.len()
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Initramfs {
            out,
            init,
            busybox,
            kernel_dir,
            modules_dir,
            modules,
            add,
            compress,
        } => {
            let module_tree = match kernel_dir {
                Some(k) => Some(initramfs::kernel_dir_module_tree(&k)?),
                None => modules_dir,
            };
            initramfs_cmd(out, init, busybox, module_tree, modules, add, compress)
        }
        Command::List { file } => list(&file),
        Command::Build {
            out,
            kernel_dir,
            agent,
            cache_dir,
            suite,
            mirror,
            version_tag,
            zstd_level,
            profile,
        } => {
            let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
                Ok(s) => s
                    .parse()
                    .with_context(|| format!("SOURCE_DATE_EPOCH={s} is not a timestamp"))?,
                Err(_) => coworkvm_rootfs::rootfs::DEFAULT_EPOCH,
            };
            let m = coworkvm_rootfs::rootfs::build(&coworkvm_rootfs::rootfs::BuildSpec {
                out: out.clone(),
                kernel_dir,
                agent,
                cache_dir,
                suite,
                mirror,
                epoch,
                version_tag,
                zstd_level,
                profile,
            })
            .context("building the guest images")?;
            for (name, f) in &m.files {
                println!(
                    "{}/{name}: {} bytes sha256 {}",
                    out.display(),
                    f.size,
                    f.sha256
                );
            }
            println!("rootfs {} kernel {}", m.rootfs_version, m.kernel_version);
            Ok(())
        }
    }
}
