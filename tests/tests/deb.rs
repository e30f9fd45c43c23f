//! The Debian package (`make deb`, `scripts/build-deb.sh`): built from
//! `make build`'s output, installed with dpkg into a scratch root (no
//! change to this host), and used from there: the installed binary is
//! static and seeds a bundle from the installed images, the shipped
//! virtiofsd is static and runs, and removal takes every file it installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use coworkvm_tests::{images, ok_or_skip, Paths};
use socket_proto::manifest::Manifest;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn built_or_skip() -> Option<(Paths, PathBuf)> {
    let paths = ok_or_skip(Paths::locate().map_err(|e| format!("{e:#}")))?;
    let images = images::images_or_skip(&paths.root)?;
    Some((paths, images))
}

/// A dpkg database of its own under `root`, so the install touches nothing
/// of the host's.
fn dpkg(root: &Path) -> Command {
    let mut c = Command::new("dpkg");
    c.arg(format!("--root={}", root.display()))
        .arg("--log=/dev/null")
        .arg("--force-not-root");
    c
}

#[test]
fn deb_installs_runs_and_removes_cleanly() {
    let Some((paths, images)) = built_or_skip() else {
        return;
    };
    let work = paths.root.join("target/deb-test");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let deb = run(Command::new(paths.root.join("scripts/build-deb.sh")).arg(work.join("out")));
    let deb = PathBuf::from(deb.trim());
    assert!(deb.is_file(), "{deb:?}");

    let field = |name: &str| run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name));
    assert_eq!(field("Package").trim(), "coworkvm");
    assert_eq!(field("Version").trim(), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        field("Architecture").trim(),
        run(Command::new("dpkg").arg("--print-architecture")).trim()
    );
    assert_eq!(field("Depends").trim(), "", "a static binary needs nothing");

    // Install into a scratch root with its own dpkg database.
    let root = work.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), b"").unwrap();
    run(dpkg(&root).arg("-i").arg(&deb));
    let status = run(dpkg(&root).args(["-s", "coworkvm"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    // Every installed file is the one the package lists.
    run(Command::new("md5sum")
        .arg("--quiet")
        .arg("-c")
        .arg("var/lib/dpkg/info/coworkvm.md5sums")
        .current_dir(&root));

    let bin = root.join("usr/bin/coworkvm");
    let program_headers = run(Command::new("readelf").arg("-lW").arg(&bin));
    assert!(
        !program_headers.contains("INTERP"),
        "the binary must not need a dynamic loader:\n{program_headers}"
    );
    // The shipped virtiofsd: static, the version the helper accepts, where
    // the helper looks for it, with its licences in the copyright file.
    let virtiofsd = root.join("usr/lib/coworkvm/virtiofsd");
    let program_headers = run(Command::new("readelf").arg("-lW").arg(&virtiofsd));
    assert!(
        !program_headers.contains("INTERP"),
        "virtiofsd must not need a dynamic loader:\n{program_headers}"
    );
    assert_eq!(
        run(Command::new(&virtiofsd).arg("--version")).trim(),
        "virtiofsd 1.14.0"
    );
    let copyright = std::fs::read_to_string(root.join("usr/share/doc/coworkvm/copyright")).unwrap();
    assert!(
        copyright.contains("Files: usr/lib/coworkvm/virtiofsd")
            && copyright.contains("License: Apache-2.0 AND BSD-3-Clause")
            && copyright.contains("License: BSD-3-Clause\n Copyright 2017 The Chromium OS Authors"),
        "{copyright}"
    );
    let installed_images = root.join("usr/lib/coworkvm/images");
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(installed_images.join("manifest.json")).unwrap())
            .unwrap();
    let built: Manifest =
        serde_json::from_slice(&std::fs::read(images.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest, built, "the package carries the built images");

    // The installed binary seeds and prepares a bundle from the installed
    // images: the rootfs it expands is the one the manifest names.
    let bundle = work.join("bundle");
    run(Command::new(&bin)
        .args(["bundle", "prepare"])
        .arg(&bundle)
        .arg("--images")
        .arg(&installed_images)
        .args(["--disk-size-gb", "1"]));
    let status = run(Command::new(&bin).args(["bundle", "status"]).arg(&bundle));
    assert!(
        status.contains(&format!("rootfs applied:  {}", manifest.rootfs_version)),
        "{status}"
    );
    assert!(!status.contains("problem"), "{status}");

    // Removal takes every file the package installed; the bundle, which is
    // the user's, stays.
    run(dpkg(&root).args(["-r", "coworkvm"]));
    assert!(!bin.exists());
    assert!(!virtiofsd.exists());
    assert!(!installed_images.exists());
    assert!(bundle.join("machineIdentifier").is_file());
    let _ = std::fs::remove_dir_all(&work);
}
