//! `coworkvm-rootfs`: builds coworkvm's guest images.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
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
    Initramfs {
        #[arg(long)]
        out: PathBuf,
        /// Script or binary to install as /init.
        #[arg(long)]
        init: PathBuf,
        /// Static busybox to install as /bin/busybox (with applet links).
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// Unpacked module tree of the guest kernel (lib/modules/<release>).
        #[arg(long)]
        modules_dir: Option<PathBuf>,
        /// Comma-separated module names; their dependencies are added too.
        #[arg(long, value_delimiter = ',')]
        modules: Vec<String>,
        /// Extra file as SRC:DST (DST is the absolute path in the image).
        #[arg(long = "add")]
        add: Vec<String>,
        #[arg(long, default_value = "zstd")]
        compress: Compression,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Initramfs {
            out,
            init,
            busybox,
            modules_dir,
            modules,
            add,
            compress,
        } => {
            let files = add
                .iter()
                .map(|a| {
                    a.split_once(':')
                        .map(|(s, d)| (PathBuf::from(s), d.to_owned()))
                        .with_context(|| format!("--add {a}: expected SRC:DST"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mtime = std::env::var("SOURCE_DATE_EPOCH")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let spec = InitramfsSpec {
                init,
                busybox,
                module_tree: modules_dir,
                modules,
                files,
                compression: compress,
                mtime,
            };
            let size = initramfs::write(&spec, &out)
                .with_context(|| format!("building {}", out.display()))?;
            println!("{}: {size} bytes", out.display());
            Ok(())
        }
    }
}
