//! `coworkvm run`'s own failures exit 125 (a shell's 126/127 and the
//! command's statuses stay the command's): the cases that need no guest.
//! The guest's 126/127 and a command's own status are in the rig's
//! tests/tests/rig/run.rs.

use std::process::Command;

const COWORKVM: &str = env!("CARGO_BIN_EXE_coworkvm");

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(COWORKVM)
        .arg("run")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_usage_error_or_a_missing_kernel_is_coworkvms_failure() {
    let (code, err) = run(&["--no-such-option", "true"]);
    assert_eq!(code, Some(125), "{err}");
    let (code, err) = run(&["--mem", "lots", "--", "true"]);
    assert_eq!(code, Some(125), "{err}");
    let (code, err) = run(&["--kernel", "/nonexistent/vmlinuz", "--", "true"]);
    assert_eq!(code, Some(125), "{err}");
    assert!(err.contains("/nonexistent/vmlinuz"), "{err}");
    // --help is no failure.
    let (code, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
}

#[test]
fn a_guest_that_does_not_boot_exits_125_and_names_its_console_log() {
    if !std::path::Path::new("/dev/kvm").exists() {
        coworkvm_tests::skip_or_fail("no /dev/kvm");
        return;
    }
    let dir = coworkvm_tests::temp_dir("run-125");
    // No bzImage: the VMM stops before any agent could connect.
    let junk = dir.join("not-a-kernel");
    std::fs::write(&junk, vec![0x5a; 64 * 1024]).unwrap();
    let console = dir.join("console.log");
    let (code, err) = run(&[
        "--kernel",
        junk.to_str().unwrap(),
        "--initrd",
        junk.to_str().unwrap(),
        "--console",
        console.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains(&format!("the guest console log is {}", console.display())),
        "{err}"
    );
    assert!(err.contains("before its agent connected"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
