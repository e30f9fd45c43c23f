//! The one place where a test that cannot run here decides between failing
//! and skipping.
//!
//! Strict by default: a test that needs KVM, root, the rig, a Debian
//! package or the build's artifacts, and finds them missing, fails, so that
//! `make test` never shows `ok` for a test that did not run. Skipping is
//! the explicit choice of `SKIP_VM=1` (`make test-quick`), and `CI=true`
//! keeps a run strict even then. Every skip writes one
//! [`SKIP_MARKER`] line to the process's stderr, past libtest's output
//! capture, which `make test-quick` counts into its "N VM tests skipped"
//! summary.

use std::fmt::Display;
use std::io::Write;
use std::panic::Location;

/// `SKIP_VM=1` allows skipping (and skips the VM batches outright).
pub const SKIP_ENV: &str = "SKIP_VM";
/// Starts the line each skip writes: `@@SKIPPED <test> (<file>:<line>): <reason>`.
pub const SKIP_MARKER: &str = "@@SKIPPED";

/// Whether a test that cannot run may skip: `SKIP_VM=1`, and not `CI=true`.
pub fn skipping_allowed() -> bool {
    allowed_by(
        std::env::var("CI").ok().as_deref(),
        std::env::var(SKIP_ENV).ok().as_deref(),
    )
}

fn allowed_by(ci: Option<&str>, skip_vm: Option<&str>) -> bool {
    skip_vm == Some("1") && ci != Some("true")
}

/// Ends a test that cannot run here: a panic (the test fails) unless
/// [`skipping_allowed`], else a [`SKIP_MARKER`] line on stderr, after which
/// the caller returns. Also for a part of a test that cannot run (the rest
/// goes on): the test then counts as skipped once.
#[track_caller]
pub fn skip_or_fail(reason: impl Display) {
    let at = Location::caller();
    if !skipping_allowed() {
        panic!(
            "this test cannot run here: {reason} \
             ({SKIP_ENV}=1, e.g. `make test-quick`, skips it instead)"
        );
    }
    let line = marker_line(&test_name(at), at, &reason);
    // Straight to fd 2: libtest captures `eprintln!` of a passing test, and
    // the skip must show (and be counted) whatever the test's outcome.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// [`skip_or_fail`] for a `Result`: the value, or `None` after a skip.
#[track_caller]
pub fn ok_or_skip<T, E: Display>(result: Result<T, E>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            skip_or_fail(e);
            None
        }
    }
}

/// libtest names each test's thread after the test; with one test thread
/// the tests run on `main`, and the call site has to name it.
fn test_name(at: &Location<'_>) -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_owned(),
        _ => format!("{}:{}", at.file(), at.line()),
    }
}

fn marker_line(test: &str, at: &Location<'_>, reason: &dyn Display) -> String {
    // One line whatever the reason holds, so that counting lines counts skips.
    let reason = reason.to_string().replace('\n', " | ");
    format!(
        "{SKIP_MARKER} {test} ({}:{}): {reason}\n",
        at.file(),
        at.line()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_skip_vm_1_allows_a_skip_and_ci_true_overrules_it() {
        assert!(!allowed_by(None, None), "strict by default");
        assert!(!allowed_by(None, Some("0")));
        assert!(!allowed_by(None, Some("")));
        assert!(!allowed_by(Some("false"), None));
        assert!(allowed_by(None, Some("1")));
        assert!(allowed_by(Some("false"), Some("1")));
        assert!(!allowed_by(Some("true"), Some("1")), "CI=true stays strict");
    }

    #[test]
    fn the_marker_is_one_line_naming_the_test_and_its_place() {
        let at = Location::caller();
        let line = marker_line("boot::boots", at, &"no /dev/kvm\nand no qemu");
        assert!(line.starts_with("@@SKIPPED boot::boots (tests/src/skip.rs:"));
        assert!(line.ends_with("): no /dev/kvm | and no qemu\n"), "{line}");
        assert_eq!(line.matches('\n').count(), 1);
    }
}
