//! The Debian package's `copyright` file (debian/copyright), in the
//! machine-readable format, generated from `cargo metadata`: the hand-written
//! paragraphs of debian/copyright.in (coworkvm itself, the images,
//! virtiofsd), then one paragraph per crates.io crate linked into a shipped
//! binary (`coworkvm`, and `coworkvm-agent` inside the images), then the
//! text of every licence they name that Debian does not carry in
//! /usr/share/common-licenses (debian/licenses/<SPDX id>).
//!
//! "Linked" means a normal dependency, on x86_64-unknown-linux-gnu, that is
//! not a proc-macro: build-dependencies and proc-macros run on the build
//! machine and put no code of theirs into the binary. A crate's copyright
//! lines come from its own licence and notice files (else its `authors`,
//! else "the NAME authors"); its NOTICE files, which Apache-2.0 requires be
//! carried, go in verbatim.
//!
//! `cargo run -p coworkvm-tests --bin gen-copyright` rewrites the file;
//! tests/tests/copyright.rs fails when the checked-in one is not current.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The workspace packages whose binaries the package ships.
pub const SHIPPED: [&str; 2] = ["coworkvm", "coworkvm-agent"];
/// The target the shipped binaries are built for (Makefile's TARGET).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Licences whose text Debian ships in /usr/share/common-licenses.
const COMMON_LICENSES: [&str; 5] = ["Apache-2.0", "CC0-1.0", "GPL-2", "LGPL-2.1", "MPL-2.0"];
/// The longest copyright line carried; longer "lines" are prose, not notices.
const MAX_NOTICE_LINE: usize = 200;

#[derive(Deserialize)]
struct Metadata {
    packages: Vec<Package>,
    resolve: Resolve,
}

#[derive(Deserialize)]
struct Package {
    id: String,
    name: String,
    version: String,
    source: Option<String>,
    license: Option<String>,
    #[serde(default)]
    authors: Vec<String>,
    manifest_path: PathBuf,
    targets: Vec<Target>,
}

#[derive(Deserialize)]
struct Target {
    kind: Vec<String>,
}

#[derive(Deserialize)]
struct Resolve {
    nodes: Vec<Node>,
}

#[derive(Deserialize)]
struct Node {
    id: String,
    deps: Vec<NodeDep>,
}

#[derive(Deserialize)]
struct NodeDep {
    pkg: String,
    dep_kinds: Vec<DepKind>,
}

#[derive(Deserialize)]
struct DepKind {
    kind: Option<String>,
}

/// A crate's copyright lines and its NOTICE files (name, text).
type Notices = (Vec<String>, Vec<(String, String)>);

/// One linked crates.io crate.
struct Crate {
    name: String,
    version: String,
    license: String,
    copyright: Vec<String>,
    notices: Vec<(String, String)>,
    linked_into: BTreeSet<&'static str>,
}

/// Renders debian/copyright for the workspace at `root` (Cargo.lock as
/// checked in: `--locked`).
pub fn render(root: &Path) -> anyhow::Result<String> {
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--filter-platform",
            TARGET,
        ])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: Metadata = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let crates = linked_crates(&meta)?;

    let head = std::fs::read_to_string(root.join("debian/copyright.in"))
        .context("reading debian/copyright.in")?;
    let mut s = head.trim_end().to_owned();
    s.push('\n');
    // The hand-written paragraphs' licences need their texts too.
    let mut ids: BTreeSet<String> = head
        .lines()
        .filter_map(|l| l.strip_prefix("License: "))
        .flat_map(license_ids)
        .collect();
    for c in &crates {
        ids.extend(license_ids(&c.license));
        let _ = write!(s, "\nFiles: vendor/{}-{}/*\nCopyright:", c.name, c.version);
        for (i, line) in c.copyright.iter().enumerate() {
            let sep = if i == 0 { " " } else { "\n " };
            let _ = write!(s, "{sep}{line}");
        }
        let into: Vec<_> = c.linked_into.iter().map(|b| shipped_path(b)).collect();
        let _ = write!(
            s,
            "\nLicense: {}\nComment: crates.io {} {}, linked into {}.",
            dep5_expression(&c.license),
            c.name,
            c.version,
            into.join(" and ")
        );
        for (file, text) in &c.notices {
            let _ = write!(s, "\n .\n Its {file}:");
            for line in text.lines() {
                s.push_str("\n ");
                s.push_str(if line.trim().is_empty() {
                    "."
                } else {
                    line.trim_end()
                });
            }
        }
        s.push('\n');
    }
    for id in ids
        .iter()
        .filter(|id| !COMMON_LICENSES.contains(&id.as_str()))
    {
        let path = root.join("debian/licenses").join(id);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: a linked crate is under {id}; add its text there",
                path.display()
            )
        })?;
        let _ = write!(s, "\nLicense: {id}");
        for line in text.trim_end().lines() {
            s.push_str("\n ");
            s.push_str(if line.trim().is_empty() {
                "."
            } else {
                line.trim_end()
            });
        }
        s.push('\n');
    }
    for id in ids
        .iter()
        .filter(|id| COMMON_LICENSES.contains(&id.as_str()))
    {
        let _ = write!(
            s,
            "\nLicense: {id}\n On Debian systems the full text of this licence is in\n /usr/share/common-licenses/{id}.\n"
        );
    }
    Ok(s)
}

/// Where a shipped package's binary is installed.
fn shipped_path(package: &str) -> &'static str {
    match package {
        "coworkvm-agent" => "coworkvm-agent (in usr/lib/coworkvm/images/initrd.img)",
        _ => "usr/bin/coworkvm",
    }
}

fn linked_crates(meta: &Metadata) -> anyhow::Result<Vec<Crate>> {
    let packages: HashMap<&str, &Package> =
        meta.packages.iter().map(|p| (p.id.as_str(), p)).collect();
    let nodes: HashMap<&str, &Node> = meta
        .resolve
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n))
        .collect();
    let mut linked: BTreeMap<(String, String), Crate> = BTreeMap::new();
    for bin in SHIPPED {
        let Some(root) = meta
            .packages
            .iter()
            .find(|p| p.name == bin && p.source.is_none())
        else {
            bail!("the workspace has no package {bin}");
        };
        let mut seen = BTreeSet::new();
        let mut todo = vec![root.id.as_str()];
        while let Some(id) = todo.pop() {
            if !seen.insert(id) {
                continue;
            }
            let node = nodes
                .get(id)
                .with_context(|| format!("{id}: not in the resolve graph"))?;
            for dep in &node.deps {
                let p = packages
                    .get(dep.pkg.as_str())
                    .with_context(|| format!("{}: not a package", dep.pkg))?;
                let normal = dep.dep_kinds.iter().any(|k| k.kind.is_none());
                let proc_macro = p
                    .targets
                    .iter()
                    .all(|t| t.kind.iter().any(|k| k == "proc-macro"));
                if normal && !proc_macro {
                    todo.push(p.id.as_str());
                }
            }
        }
        for id in seen {
            let p = packages[id];
            if p.source.is_none() {
                // The workspace's own crates: coworkvm's "Files: *" paragraph.
                continue;
            }
            let key = (p.name.clone(), p.version.clone());
            if let Some(c) = linked.get_mut(&key) {
                c.linked_into.insert(bin);
                continue;
            }
            let Some(license) = p.license.clone() else {
                bail!("{} {}: no licence in its Cargo.toml", p.name, p.version);
            };
            let dir = p.manifest_path.parent().unwrap_or(Path::new("."));
            let (copyright, notices) = notices_of(dir, p)?;
            linked.insert(
                key,
                Crate {
                    name: p.name.clone(),
                    version: p.version.clone(),
                    license,
                    copyright,
                    notices,
                    linked_into: BTreeSet::from([bin]),
                },
            );
        }
    }
    Ok(linked.into_values().collect())
}

/// A crate's copyright lines (from its licence files, else its authors) and
/// its NOTICE files' texts.
fn notices_of(dir: &Path, p: &Package) -> anyhow::Result<Notices> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: reading {}", p.name, dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            let u = n.to_ascii_uppercase();
            [
                "LICENSE",
                "LICENCE",
                "COPYING",
                "COPYRIGHT",
                "NOTICE",
                "UNLICENSE",
            ]
            .iter()
            .any(|p| u.starts_with(p))
        })
        .collect();
    files.sort();
    let mut lines = Vec::new();
    let mut notices = Vec::new();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(dir.join(f)) else {
            continue;
        };
        if f.to_ascii_uppercase().starts_with("NOTICE") {
            notices.push((f.clone(), text.trim().to_owned()));
        }
        for line in text.lines() {
            if let Some(l) = copyright_line(line) {
                if !lines.contains(&l) {
                    lines.push(l);
                }
            }
        }
    }
    if lines.is_empty() {
        lines = p.authors.iter().map(|a| a.trim().to_owned()).collect();
    }
    if lines.is_empty() {
        lines.push(format!("the {} authors", p.name));
    }
    Ok((lines, notices))
}

/// `line` as a copyright notice ("Copyright (c) 2015 Someone"), or None for
/// prose and for the licence templates' placeholders.
fn copyright_line(line: &str) -> Option<String> {
    let l = line.trim().trim_start_matches(['/', '#', '*', ' ']).trim();
    let lower = l.to_ascii_lowercase();
    let is_notice = (lower.starts_with("copyright") || l.starts_with('©'))
        && (l.contains('©')
            || lower.contains("(c)")
            || l.split_whitespace()
                .nth(1)
                .is_some_and(|w| w.starts_with(|c: char| c.is_ascii_digit())));
    let placeholder = [
        "yyyy",
        "<year>",
        "[year]",
        "{year}",
        "copyright owner",
        "copyright holder",
    ]
    .iter()
    .any(|p| lower.contains(p));
    (is_notice && !placeholder && l.len() <= MAX_NOTICE_LINE)
        .then(|| {
            let l = l
                .trim_start_matches("Copyright")
                .trim_start_matches("COPYRIGHT")
                .trim();
            l.trim_start_matches("(c)")
                .trim_start_matches("(C)")
                .trim()
                .to_owned()
        })
        .filter(|l| !l.is_empty())
}

/// An SPDX expression in the copyright format's words ("or", "and"; the
/// old "/" means OR).
fn dep5_expression(spdx: &str) -> String {
    spdx.replace('/', " OR ")
        .split_whitespace()
        .map(|w| match w {
            "OR" => "or",
            "AND" => "and",
            w => w,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The licence identifiers an SPDX expression names.
fn license_ids(spdx: &str) -> BTreeSet<String> {
    spdx.replace(['/', '(', ')'], " ")
        .split_whitespace()
        .filter(|w| !matches!(*w, "OR" | "AND" | "WITH" | "or" | "and" | "with"))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_use_the_formats_words() {
        assert_eq!(dep5_expression("MIT/Apache-2.0"), "MIT or Apache-2.0");
        assert_eq!(
            dep5_expression("(MIT OR Apache-2.0) AND Unicode-3.0"),
            "(MIT or Apache-2.0) and Unicode-3.0"
        );
        assert_eq!(
            license_ids("(MIT OR Apache-2.0) AND Unicode-3.0"),
            BTreeSet::from(["MIT".into(), "Apache-2.0".into(), "Unicode-3.0".into()])
        );
    }

    #[test]
    fn copyright_lines_skip_templates_and_prose() {
        assert_eq!(
            copyright_line("Copyright (c) 2015 Andrew Gallant").as_deref(),
            Some("2015 Andrew Gallant")
        );
        assert_eq!(
            copyright_line("// Copyright 2017 The Chromium OS Authors").as_deref(),
            Some("2017 The Chromium OS Authors")
        );
        assert_eq!(
            copyright_line("Copyright © 1991-2023 Unicode, Inc.").as_deref(),
            Some("© 1991-2023 Unicode, Inc.")
        );
        assert_eq!(
            copyright_line("   Copyright [yyyy] [name of copyright owner]"),
            None
        );
        assert_eq!(
            copyright_line("Copyright (c) <year> <copyright holders>"),
            None
        );
        assert_eq!(
            copyright_line("copyright notice and this permission notice appear"),
            None
        );
        assert_eq!(copyright_line("COPYRIGHT AND PERMISSION NOTICE"), None);
    }
}
