//! The Debian package's `copyright` file (debian/copyright), in the
//! machine-readable format, generated from `cargo metadata`: the hand-written
//! paragraphs of debian/copyright.in (coworkvm itself, the images,
//! virtiofsd), then one paragraph per crates.io crate linked into a shipped
//! binary (`coworkvm`, `coworkvm-agent` inside the images, and the static
//! virtiofsd), then the text of every licence they name that Debian does
//! not carry in /usr/share/common-licenses (debian/licenses/<SPDX id>).
//!
//! virtiofsd's crates come from its own graph: scripts/build-virtiofsd.sh
//! builds it with `cargo install --locked`, which uses the Cargo.lock
//! inside the published crate, so this reads `cargo metadata --locked` of
//! that crate's unpacked source (VERSION as the script sets it). A crate
//! both graphs link at the same version gets one paragraph naming both.
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
/// The crates.io package of the shipped virtiofsd, built from its own lock.
pub const VIRTIOFSD: &str = "virtiofsd";
/// The script that builds virtiofsd and sets its version (`VERSION=`).
pub const VIRTIOFSD_SCRIPT: &str = "scripts/build-virtiofsd.sh";
/// debian/copyright.in's placeholder for that version.
const VIRTIOFSD_VERSION_VAR: &str = "@VIRTIOFSD_VERSION@";
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
/// checked in: `--locked`) and the virtiofsd that
/// scripts/build-virtiofsd.sh builds (its own Cargo.lock).
pub fn render(root: &Path) -> anyhow::Result<String> {
    let meta = metadata(&root.join("Cargo.toml"))?;
    let mut linked = BTreeMap::new();
    linked_crates(&meta, &SHIPPED, &mut linked)?;
    let vfsd_version = virtiofsd_version(root)?;
    let vfsd_manifest = virtiofsd_manifest(&vfsd_version)?;
    let vfsd_meta = metadata(&vfsd_manifest)?;
    linked_crates(&vfsd_meta, &[VIRTIOFSD], &mut linked)?;
    let crates: Vec<Crate> = linked.into_values().collect();
    // cargo-deny checks our Cargo.lock only; virtiofsd's crates are held
    // to the same allow-list here.
    let deny = std::fs::read_to_string(root.join("deny.toml")).context("reading deny.toml")?;
    let allowed = deny_allowed(&deny).context("deny.toml has no [licenses] allow list")?;
    for c in &crates {
        if !satisfiable(&c.license, &allowed) {
            bail!(
                "{} {} (linked into {}): licence {:?} is not within deny.toml's allow list {allowed:?}",
                c.name,
                c.version,
                c.linked_into.iter().copied().collect::<Vec<_>>().join(", "),
                c.license
            );
        }
    }

    let head = std::fs::read_to_string(root.join("debian/copyright.in"))
        .context("reading debian/copyright.in")?
        .replace(VIRTIOFSD_VERSION_VAR, &vfsd_version);
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
            push_text(&mut s, text);
        }
        s.push('\n');
    }
    for id in ids
        .iter()
        .filter(|id| !COMMON_LICENSES.contains(&id.as_str()))
    {
        // "BASE WITH EXCEPTION": the exception's text, under the format's
        // "BASE with NAME exception"; BASE has its own paragraph.
        let (file, base) = match id.split_once(" WITH ") {
            Some((base, exception)) => (exception, Some(base)),
            None => (id.as_str(), None),
        };
        let path = root.join("debian/licenses").join(file);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: a linked crate is under {id}; add its text there",
                path.display()
            )
        })?;
        let _ = write!(s, "\nLicense: {}", dep5_expression(id));
        if let Some(base) = base {
            let _ = write!(
                s,
                "\n {base} (its paragraph is in this file) with this exception:\n ."
            );
        }
        push_text(&mut s, text.trim_end());
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

/// `cargo metadata --locked` of the workspace or package at `manifest`,
/// resolved for TARGET with the default features (as they are built).
fn metadata(manifest: &Path) -> anyhow::Result<Metadata> {
    let out = Command::new(cargo())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--filter-platform",
            TARGET,
        ])
        .arg("--manifest-path")
        .arg(manifest)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata --manifest-path {}: {}",
            manifest.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing cargo metadata")
}

fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// The virtiofsd version scripts/build-virtiofsd.sh builds: its one
/// `VERSION=` line, so the version is set in one place.
pub fn virtiofsd_version(root: &Path) -> anyhow::Result<String> {
    let path = root.join(VIRTIOFSD_SCRIPT);
    let script =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    script_version(&script).with_context(|| format!("{}: no VERSION=x.y.z line", path.display()))
}

/// The value of a script's `VERSION=` line when it is a plain version.
fn script_version(script: &str) -> Option<String> {
    let v = script
        .lines()
        .find_map(|l| l.trim().strip_prefix("VERSION="))?
        .trim();
    let plain = !v.is_empty()
        && v.split('.').count() == 3
        && v.split('.')
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    plain.then(|| v.to_owned())
}

/// The Cargo.toml of virtiofsd VERSION as cargo unpacked it from crates.io
/// (where `cargo install` builds it, with the Cargo.lock beside it).
/// When no build has unpacked it, `cargo metadata` on a scratch manifest
/// that depends on exactly that version downloads and unpacks it.
fn virtiofsd_manifest(version: &str) -> anyhow::Result<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let find = || -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(cargo_home.join("registry/src"))
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join(format!("{VIRTIOFSD}-{version}")))
            .filter(|d| d.join("Cargo.toml").is_file() && d.join("Cargo.lock").is_file())
            .collect();
        found.sort();
        found.pop().map(|d| d.join("Cargo.toml"))
    };
    if let Some(m) = find() {
        return Ok(m);
    }
    let scratch =
        std::env::temp_dir().join(format!("coworkvm-fetch-virtiofsd-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let fetched = (|| {
        std::fs::write(
            scratch.join("Cargo.toml"),
            format!(
                "[package]\nname = \"fetch-virtiofsd\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
                 [lib]\npath = \"lib.rs\"\n[dependencies]\n{VIRTIOFSD} = \"={version}\"\n\
                 [workspace]\n"
            ),
        )?;
        std::fs::write(scratch.join("lib.rs"), "")?;
        metadata_unlocked(&scratch.join("Cargo.toml"))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    fetched?;
    find().with_context(|| {
        format!(
            "{VIRTIOFSD}-{version} (with its Cargo.lock) is not under {}/registry/src \
             even after cargo fetched it",
            cargo_home.display()
        )
    })
}

/// `cargo metadata` that may resolve and download (no --locked): only
/// to unpack a crate's source.
fn metadata_unlocked(manifest: &Path) -> anyhow::Result<()> {
    let out = Command::new(cargo())
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(manifest)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "fetching {VIRTIOFSD}: cargo metadata: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `text` as the continuation lines of a field: each indented by one
/// space, blank lines written as the format's ` .`.
fn push_text(s: &mut String, text: &str) {
    for line in text.lines() {
        s.push_str("\n ");
        s.push_str(if line.trim().is_empty() {
            "."
        } else {
            line.trim_end()
        });
    }
}

/// Where a shipped package's binary is installed.
fn shipped_path(package: &str) -> &'static str {
    match package {
        "coworkvm-agent" => "coworkvm-agent (in usr/lib/coworkvm/images/initrd.img)",
        VIRTIOFSD => "usr/lib/coworkvm/virtiofsd",
        _ => "usr/bin/coworkvm",
    }
}

/// Adds to `linked` the crates.io crates linked into the binaries of
/// `shipped` (root packages of `meta` without a source), keyed by name and
/// version so that a crate two graphs share is one entry.
fn linked_crates(
    meta: &Metadata,
    shipped: &[&'static str],
    linked: &mut BTreeMap<(String, String), Crate>,
) -> anyhow::Result<()> {
    let packages: HashMap<&str, &Package> =
        meta.packages.iter().map(|p| (p.id.as_str(), p)).collect();
    let nodes: HashMap<&str, &Node> = meta
        .resolve
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n))
        .collect();
    for &bin in shipped {
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
                // A proc-macro package's library is its proc-macro target;
                // its other targets (tests, benches) are not linked.
                let proc_macro = p
                    .targets
                    .iter()
                    .any(|t| t.kind.iter().any(|k| k == "proc-macro"));
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
    Ok(())
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
/// old "/" means OR; "WITH LLVM-exception" is "with LLVM exception").
fn dep5_expression(spdx: &str) -> String {
    let spdx = spdx.replace('/', " OR ");
    let mut words = Vec::new();
    let mut after_with = false;
    for w in spdx.split_whitespace() {
        words.push(match w {
            "OR" => "or".to_owned(),
            "AND" => "and".to_owned(),
            "WITH" => "with".to_owned(),
            w if after_with => match w.strip_suffix("-exception") {
                Some(name) => format!("{name} exception"),
                None => format!("{w} exception"),
            },
            w => w.to_owned(),
        });
        after_with = w == "WITH";
    }
    words.join(" ")
}

/// The licence identifiers an SPDX expression names; "BASE WITH
/// EXCEPTION" is one identifier (the exception's text goes with it) and
/// also names BASE.
fn license_ids(spdx: &str) -> BTreeSet<String> {
    let spdx = spdx.replace(['/', '(', ')'], " ");
    let words: Vec<&str> = spdx
        .split_whitespace()
        .filter(|w| !matches!(*w, "OR" | "AND" | "or" | "and"))
        .collect();
    let mut ids = BTreeSet::new();
    let mut i = 0;
    while i < words.len() {
        if matches!(words[i], "WITH" | "with") {
            i += 1;
            continue;
        }
        ids.insert(words[i].to_owned());
        if let (Some(w), Some(exception)) = (words.get(i + 1), words.get(i + 2)) {
            if matches!(*w, "WITH" | "with") {
                ids.insert(format!("{} WITH {exception}", words[i]));
                i += 3;
                continue;
            }
        }
        i += 1;
    }
    ids
}

/// The licences deny.toml's `[licenses] allow = [...]` lists.
pub fn deny_allowed(deny_toml: &str) -> Option<Vec<&str>> {
    let list = deny_toml.split("allow = [").nth(1)?.split(']').next()?;
    Some(
        list.lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(|l| l.split(','))
            .map(|s| s.trim().trim_matches('"'))
            .filter(|s| !s.is_empty())
            .collect(),
    )
}

/// Whether an SPDX expression can be satisfied with the licences in
/// `allowed` (an OR needs one side, an AND both; "A WITH E" needs A).
pub fn satisfiable(spdx: &str, allowed: &[&str]) -> bool {
    let spdx = spdx
        .replace('/', " OR ")
        .replace('(', " ( ")
        .replace(')', " ) ");
    let tokens: Vec<&str> = spdx.split_whitespace().collect();
    let mut pos = 0;
    let ok = or_expr(&tokens, &mut pos, allowed);
    ok == Some(true) && pos == tokens.len()
}

fn or_expr(t: &[&str], pos: &mut usize, allowed: &[&str]) -> Option<bool> {
    let mut ok = and_expr(t, pos, allowed)?;
    while t.get(*pos).is_some_and(|w| w.eq_ignore_ascii_case("OR")) {
        *pos += 1;
        ok |= and_expr(t, pos, allowed)?;
    }
    Some(ok)
}

fn and_expr(t: &[&str], pos: &mut usize, allowed: &[&str]) -> Option<bool> {
    let mut ok = atom(t, pos, allowed)?;
    while t.get(*pos).is_some_and(|w| w.eq_ignore_ascii_case("AND")) {
        *pos += 1;
        ok &= atom(t, pos, allowed)?;
    }
    Some(ok)
}

fn atom(t: &[&str], pos: &mut usize, allowed: &[&str]) -> Option<bool> {
    let w = *t.get(*pos)?;
    *pos += 1;
    if w == "(" {
        let ok = or_expr(t, pos, allowed)?;
        (t.get(*pos) == Some(&")")).then_some(())?;
        *pos += 1;
        return Some(ok);
    }
    if matches!(w, ")" | "OR" | "AND" | "WITH") {
        return None;
    }
    if t.get(*pos).is_some_and(|x| x.eq_ignore_ascii_case("WITH")) {
        t.get(*pos + 1)?;
        *pos += 2;
    }
    Some(allowed.contains(&w))
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
        // rustix's, via virtiofsd: the exception is one identifier whose
        // paragraph lintian accepts ("NAME with KEYWORD exception").
        let rustix = "Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT";
        assert_eq!(
            dep5_expression(rustix),
            "Apache-2.0 with LLVM exception or Apache-2.0 or MIT"
        );
        assert_eq!(
            license_ids(rustix),
            BTreeSet::from([
                "Apache-2.0".into(),
                "Apache-2.0 WITH LLVM-exception".into(),
                "MIT".into()
            ])
        );
    }

    #[test]
    fn satisfiable_needs_one_side_of_or_and_both_of_and() {
        let allowed = ["MIT", "Apache-2.0", "BSD-3-Clause"];
        assert!(satisfiable("MIT/Apache-2.0", &allowed));
        assert!(satisfiable(
            "Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT",
            &allowed
        ));
        assert!(satisfiable("Apache-2.0 AND BSD-3-Clause", &allowed));
        assert!(!satisfiable(
            "(MIT OR Apache-2.0) AND Unicode-DFS-2016",
            &allowed
        ));
        assert!(!satisfiable("LGPL-2.1-or-later", &allowed));
        assert!(!satisfiable("MIT OR", &allowed));
        assert!(!satisfiable("(MIT", &allowed));
    }

    #[test]
    fn deny_allowed_reads_the_list_without_comments() {
        let toml =
            "[licenses]\nallow = [\n    \"MIT\", # why\n    # \"GPL-3.0\",\n    \"ISC\",\n]\n";
        assert_eq!(deny_allowed(toml), Some(vec!["MIT", "ISC"]));
        assert_eq!(deny_allowed("[licenses]\n"), None);
    }

    #[test]
    fn script_version_is_the_plain_version_line() {
        assert_eq!(
            script_version("set -e\nBUILD=x\nVERSION=1.14.0\nTARGET=y\n").as_deref(),
            Some("1.14.0")
        );
        assert_eq!(script_version("VERSION=$(cat v)\n"), None);
        assert_eq!(script_version("VERSION=1.14\n"), None);
        assert_eq!(script_version("echo\n"), None);
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
