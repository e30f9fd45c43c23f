//! Rewrites debian/copyright from Cargo.lock and debian/copyright.in
//! (see coworkvm_tests::copyright); run after a dependency changes:
//! `cargo run -p coworkvm-tests --bin gen-copyright`.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = coworkvm_tests::copyright::render(&root)?;
    let path = root.join("debian/copyright");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}
