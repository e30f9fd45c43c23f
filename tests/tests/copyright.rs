//! debian/copyright is generated (coworkvm_tests::copyright, `make
//! copyright`): this fails when the checked-in file is not what Cargo.lock
//! and debian/copyright.in give now, e.g. after a dependency was added or
//! bumped, so the package never ships a stale list of licence notices.

use std::path::Path;

#[test]
fn debian_copyright_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let want = coworkvm_tests::copyright::render(&root).expect("renders");
    let have = std::fs::read_to_string(root.join("debian/copyright")).expect("debian/copyright");
    if want != have {
        let first = want
            .lines()
            .zip(have.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| want.lines().count().min(have.lines().count()));
        panic!(
            "debian/copyright is not current (first difference at line {}: want {:?}, have {:?}); \
             run `make copyright` and commit the result",
            first + 1,
            want.lines().nth(first),
            have.lines().nth(first)
        );
    }
}

/// Every licence deny.toml allows has its text (or its pointer to
/// /usr/share/common-licenses) in debian/copyright, so allowing a licence
/// cannot skip adding its text; that every linked crate's licence is
/// allowed is cargo-deny's own check (make lint) for Cargo.lock and the
/// generator's (copyright::satisfiable) for virtiofsd's own lock.
#[test]
fn every_linked_licence_has_its_text() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let copyright = std::fs::read_to_string(root.join("debian/copyright")).unwrap();
    let deny = std::fs::read_to_string(root.join("deny.toml")).unwrap();
    let allowed =
        coworkvm_tests::copyright::deny_allowed(&deny).expect("deny.toml's [licenses] allow list");
    for id in &allowed {
        assert!(
            copyright.contains(&format!("\nLicense: {id}\n")),
            "deny.toml allows {id} but debian/copyright has no text for it"
        );
    }
}
