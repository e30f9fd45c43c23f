//! `coworkvm-gendoc OUTDIR`: renders coworkvm's man pages (OUTDIR/man/
//! coworkvm.1 and one page per visible subcommand, coworkvm-run.1,
//! coworkvm-bundle-status.1, ...) and its bash, zsh and fish completions
//! (OUTDIR/completions/) from the same clap definition the binary parses,
//! so that neither can drift from the CLI. scripts/build-deb.sh runs it.

use std::path::PathBuf;

use anyhow::Context;
use clap_complete::Shell;

// The CLI's definition lives in the binary's own source; including it here
// (rather than splitting the binary into a library) keeps main.rs the one
// place a flag is declared. Only `command()` is used from it.
#[allow(dead_code, unused_imports)]
#[path = "../main.rs"]
mod coworkvm_main;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        anyhow::bail!("usage: coworkvm-gendoc OUTDIR");
    };
    let out = PathBuf::from(out);
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut root = coworkvm_main::command().disable_help_subcommand(true);
    // build() names each subcommand as its page does (coworkvm-run, ...).
    root.build();
    let source = format!("coworkvm {}", env!("CARGO_PKG_VERSION"));
    write_pages(&root, &source, &man)?;
    let mut cmd = coworkvm_main::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "coworkvm", &completions).with_context(
            || {
                format!(
                    "writing the {shell} completion to {}",
                    completions.display()
                )
            },
        )?;
    }
    Ok(())
}

/// One page for `cmd` and one for each of its visible subcommands, each
/// titled with the package's name and version (clap_mangen's default for a
/// subcommand is its bare name).
fn write_pages(cmd: &clap::Command, source: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, source, dir)?;
    }
    clap_mangen::Man::new(cmd.clone())
        .source(source)
        .manual("coworkvm manual")
        .generate_to(dir)
        .with_context(|| {
            format!(
                "writing the man page of {} to {}",
                cmd.get_name(),
                dir.display()
            )
        })?;
    Ok(())
}
