//! `coworkvm doctor` on this machine: one PASS/WARN/FAIL line per check,
//! the fix on every failing line, the exit status from the verdict, and
//! `--json` as one object that says the same.

use std::process::Command;

use serde_json::Value;

const COWORKVM: &str = env!("CARGO_BIN_EXE_coworkvm");

fn doctor(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(COWORKVM)
        .arg("doctor")
        .args(args)
        .env("COWORKVM_IMAGES", "/nonexistent/coworkvm-images")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn doctor_lines_json_and_exit_status_agree() {
    if !std::path::Path::new("/dev/kvm").exists() {
        coworkvm_tests::skip_or_fail("no /dev/kvm");
        return;
    }
    let (code, text) = doctor(&["--client"]);
    let (json_code, json) = doctor(&["--client", "--json"]);
    assert_eq!(json.lines().count(), 1, "one object: {json}");
    let report: Value = serde_json::from_str(&json).unwrap();
    // Reads back as the same object.
    let again: Value = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    assert_eq!(again, report);

    let checks = report["checks"].as_array().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > checks.len(), "{text}");
    for (check, line) in checks.iter().zip(&lines) {
        let status = check["status"].as_str().unwrap();
        assert!(["PASS", "WARN", "FAIL"].contains(&status), "{check}");
        assert!(
            line.contains(&format!(": {status} (")),
            "line and JSON agree: {line} / {check}"
        );
        assert_eq!(
            status != "PASS",
            line.contains("; fix: "),
            "a fix on exactly the failing lines: {line}"
        );
    }
    // The images named do not exist: coworkvm cannot run a VM from them.
    let images = checks.iter().find(|c| c["id"] == "images").unwrap();
    assert_eq!(images["status"], "FAIL", "{images}");

    let boot = checks.iter().find(|c| c["id"] == "kvm_boot").unwrap();
    let boot_line = lines
        .iter()
        .find(|l| l.starts_with("KVM can boot Linux"))
        .unwrap();
    if report["can_boot_linux"] == false {
        // This CI machine: a KVM that emulates guest kernel code.
        assert_eq!(boot["status"], "FAIL", "{boot}");
        assert!(
            boot_line.contains(": FAIL (") && boot_line.contains("; fix: "),
            "{boot_line}"
        );
    } else {
        assert_eq!(boot["status"], "PASS", "{boot}");
    }
    assert_eq!(report["can_run_vms"], false);
    assert_eq!(code, Some(1), "cannot run a VM here: non-zero\n{text}");
    assert_eq!(json_code, code);
    assert!(text.contains("coworkvm cannot run VMs here"), "{text}");
    // --client adds the client's probe.
    assert!(checks.iter().any(|c| c["id"] == "client_vsock"), "{json}");
}
