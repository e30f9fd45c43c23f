//! The Debian package (`make deb`, `scripts/build-deb.sh`): built from
//! `make build`'s output, checked by lintian (no error, no warning that is
//! not overridden with a reason), installed with dpkg into a scratch root
//! (no change to this host), and used from there: the installed binary is
//! static and seeds a bundle from the installed images, the shipped
//! virtiofsd is static and runs, the user units, man pages, completions and
//! copyright are where Debian looks for them, the binaries are stripped
//! with their symbols in the -dbgsym package, and removal takes every file
//! it installed.

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
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    let arch = arch.trim();

    let field = |name: &str| run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name));
    let version = field("Version").trim().to_owned();
    assert_eq!(field("Package").trim(), "coworkvm");
    assert_eq!(
        version,
        format!("{}-1", env!("CARGO_PKG_VERSION")),
        "upstream version and Debian revision"
    );
    assert_eq!(field("Architecture").trim(), arch);
    assert_eq!(field("Depends").trim(), "", "a static binary needs nothing");
    let maintainer = field("Maintainer");
    assert!(
        maintainer.contains('<') && maintainer.trim().ends_with('>'),
        "{maintainer}"
    );
    // Built-Using names the Debian sources of what the images embed (the
    // kernel, busybox, the rootfs's packages) and of the static libraries.
    let built_using = field("Built-Using");
    let kernel_deb = std::fs::read_dir(paths.root.join("build/debs/kernel"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("the kernel's .deb in build/debs/kernel");
    let kernel_source = run(Command::new("dpkg-deb")
        .arg("-f")
        .arg(&kernel_deb)
        .arg("Source"));
    let kernel_source = kernel_source.split_whitespace().next().unwrap_or_default();
    for source in [
        kernel_source,
        "busybox",
        "glibc",
        "libseccomp",
        "libcap-ng",
        "bash",
        "bubblewrap",
    ] {
        assert!(
            built_using
                .split(", ")
                .any(|e| e.starts_with(&format!("{source} (= "))),
            "Built-Using has no {source}: {built_using}"
        );
    }
    // Nothing runs at install: no maintainer script enables the units.
    let control = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        assert!(!control.contains(script), "{script} in\n{control}");
    }

    // lintian (Debian 12's), with the package's own overrides: no error
    // and no warning left.
    let dbgsym = deb.with_file_name(format!("coworkvm-dbgsym_{version}_{arch}.deb"));
    assert!(dbgsym.is_file(), "{dbgsym:?}");
    let lintian = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--info"])
        .arg(&deb)
        .arg(&dbgsym)
        .output()
        .expect("lintian (make deps installs it)");
    let lintian_out = String::from_utf8_lossy(&lintian.stdout);
    assert!(
        lintian.status.success()
            && !lintian_out
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian: {}\n{lintian_out}\n{}",
        lintian.status,
        String::from_utf8_lossy(&lintian.stderr)
    );

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
    check_units_docs_and_completions(&root, &paths.root);
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
            && copyright.contains("License: Apache-2.0 and BSD-3-Clause")
            && copyright.contains("\nLicense: BSD-3-Clause\n Redistribution and use"),
        "{copyright}"
    );
    // Stripped, with each binary's debug file in the -dbgsym package under
    // its build ID.
    let dbg_root = work.join("dbgsym");
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&dbgsym)
        .arg(&dbg_root));
    for b in [&bin, &virtiofsd] {
        let sections = run(Command::new("readelf").arg("-SW").arg(b));
        assert!(
            // (.debug_gdb_scripts is loaded data, Rust's gdb pretty-printer
            // hook, not debug information.)
            ![".symtab", ".debug_info", ".debug_line", ".debug_str"]
                .iter()
                .any(|s| sections.contains(s)),
            "{b:?} is not stripped:\n{sections}"
        );
        let debug = dbg_root.join(debug_file(b));
        let debug_sections = run(Command::new("readelf").arg("-SW").arg(&debug));
        assert!(
            debug_sections.contains(".symtab"),
            "{debug:?}:\n{debug_sections}"
        );
    }
    let coworkvm_debug_sections = run(Command::new("readelf")
        .arg("-SW")
        .arg(dbg_root.join(debug_file(&bin))));
    assert!(
        coworkvm_debug_sections.contains(".debug_line"),
        "coworkvm's line tables belong in its debug file:\n{coworkvm_debug_sections}"
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
    assert!(!root.join("usr/lib/systemd/user/coworkvm.socket").exists());
    let _ = std::fs::remove_dir_all(&work);
}

/// Where the -dbgsym package keeps `binary`'s debug file: under its build ID.
fn debug_file(binary: &Path) -> PathBuf {
    let notes = run(Command::new("readelf").arg("-nW").arg(binary));
    let id = notes
        .split("Build ID: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("{binary:?} has no build ID:\n{notes}"));
    PathBuf::from(format!(
        "usr/lib/debug/.build-id/{}/{}.debug",
        &id[..2],
        &id[2..]
    ))
}

/// The installed package's user units, man pages, completions and copyright.
fn check_units_docs_and_completions(root: &Path, repo: &Path) {
    // The user units, as shipped, and enabled for no one: nothing under
    // /etc/systemd (an enablement symlink would live there).
    let units = root.join("usr/lib/systemd/user");
    let socket = std::fs::read_to_string(units.join("coworkvm.socket")).unwrap();
    for line in [
        "ListenStream=%t/claude-cowork-vm.sock",
        "SocketMode=0600",
        "DirectoryMode=0700",
    ] {
        assert!(
            socket.lines().any(|l| l == line),
            "no {line} in coworkvm.socket:\n{socket}"
        );
    }
    let service = std::fs::read_to_string(units.join("coworkvm.service")).unwrap();
    for prefix in [
        "ExecStart=/usr/bin/coworkvm serve",
        "MemoryMax=",
        "TasksMax=",
    ] {
        assert!(
            service.lines().any(|l| l.starts_with(prefix)),
            "no {prefix} in coworkvm.service:\n{service}"
        );
    }
    assert!(
        !root.join("etc/systemd").exists(),
        "the package enables nothing"
    );
    // A man page for coworkvm and each visible subcommand, gzipped.
    let man = root.join("usr/share/man/man1");
    for page in [
        "coworkvm",
        "coworkvm-run",
        "coworkvm-serve",
        "coworkvm-doctor",
        "coworkvm-bundle-prepare",
    ] {
        let gz = man.join(format!("{page}.1.gz"));
        let text = run(Command::new("gzip").arg("-dc").arg(&gz));
        assert!(text.contains(&format!(".TH {page} 1")), "{gz:?}:\n{text}");
    }
    let hidden = ["coworkvm-share-keeper.1.gz", "coworkvm-sandbox-probe.1.gz"];
    for page in hidden {
        assert!(!man.join(page).exists(), "a hidden subcommand got {page}");
    }
    // Completions where bash-completion, zsh and fish look for them.
    for (path, marker) in [
        (
            "usr/share/bash-completion/completions/coworkvm",
            "complete -F",
        ),
        (
            "usr/share/zsh/vendor-completions/_coworkvm",
            "#compdef coworkvm",
        ),
        (
            "usr/share/fish/vendor_completions.d/coworkvm.fish",
            "complete -c coworkvm",
        ),
    ] {
        let text =
            std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            text.contains(marker) && text.contains("serve"),
            "{path}:\n{text}"
        );
    }
    // The copyright file is the generated, checked-in one.
    assert_eq!(
        std::fs::read(root.join("usr/share/doc/coworkvm/copyright")).unwrap(),
        std::fs::read(repo.join("debian/copyright")).unwrap()
    );
}
