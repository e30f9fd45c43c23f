//! The skip policy as `make test` and `make test-quick` see it: this test
//! binary runs its own `#[ignore]`d probe (a test that cannot run) in a
//! child process under each setting and looks at the outcome and at the
//! marker line `make test-quick` counts.

use std::process::{Command, Output};

use coworkvm_tests::skip::SKIP_MARKER;

/// Stands for any test that finds what it needs missing. Ignored, so that
/// it runs only when [`run_probe`] asks for it.
#[test]
#[ignore = "run by the_skip_policy_* in a child process"]
fn probe_that_cannot_run() {
    coworkvm_tests::skip_or_fail("the probe's resource is missing");
    // A partial skip in the same test: still one skipped test.
    coworkvm_tests::skip_or_fail("a second part is missing too");
}

fn run_probe(env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--ignored", "--exact", "probe_that_cannot_run"])
        .env_remove("CI")
        .env_remove("SKIP_VM");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn markers(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with(SKIP_MARKER))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_skip_policy_fails_a_test_that_cannot_run_by_default() {
    for env in [
        &[][..],
        &[("SKIP_VM", "0")],
        &[("SKIP_VM", "1"), ("CI", "true")],
    ] {
        let out = run_probe(env);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{env:?}: a silent ok\n{text}");
        assert!(
            text.contains("this test cannot run here: the probe's resource is missing"),
            "{env:?}: {text}"
        );
        assert!(markers(&out).is_empty(), "{env:?}: no skip recorded");
    }
}

#[test]
fn the_skip_policy_skips_with_skip_vm_1_and_says_so_past_the_capture() {
    let out = run_probe(&[("SKIP_VM", "1")]);
    assert!(out.status.success(), "{out:?}");
    let m = markers(&out);
    assert_eq!(m.len(), 2, "one line per skip: {m:?}");
    for (line, reason) in m.iter().zip(["resource", "second part"]) {
        assert!(
            line.starts_with("@@SKIPPED probe_that_cannot_run (tests/tests/skip.rs:"),
            "{line}"
        );
        assert!(line.contains(reason), "{line}");
    }
}
