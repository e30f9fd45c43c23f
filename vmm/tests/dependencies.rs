//! The VMM process is the one a guest attacks, so its crate links only what
//! a machine needs. This walks the resolved dependency graph (`cargo
//! metadata`, normal dependencies only: what ends up in the binary) from
//! `coworkvm-vmm` and fails when it reaches a crate that belongs to another
//! process role.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

/// Crates of the helper, the bundle and the image builder, and the async
/// runtime: none of them has a place in the VMM process.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "serde_json",
    "zstd",
    "sha2",
    "indicatif",
    "base64",
    "socket-proto",
    "coworkvm-helper",
    "coworkvm-bundle",
    "coworkvm-rootfs",
    "coworkvm",
];

fn normal_dependency_closure(metadata: &Value, root: &str) -> BTreeSet<String> {
    let packages: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, &Value> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let root_id = packages
        .iter()
        .find(|(_, name)| **name == root)
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("{root} is not in the workspace"));
    let mut seen = BTreeSet::new();
    let mut todo = vec![root_id];
    while let Some(id) = todo.pop() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            // A dependency edge counts when one of its kinds is "normal"
            // (null in cargo metadata); dev and build edges do not link.
            let normal = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null());
            let dep_id = dep["pkg"].as_str().unwrap();
            if normal && seen.insert(packages[dep_id].to_string()) {
                todo.push(dep_id);
            }
        }
    }
    seen
}

fn metadata() -> Value {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_vmm_crate_links_no_runtime_and_no_other_process_role() {
    let deps = normal_dependency_closure(&metadata(), "coworkvm-vmm");
    // The walk itself works: the crates the VMM does need are found.
    for needed in ["kvm-ioctls", "vm-memory", "virtio-queue", "seccompiler"] {
        assert!(deps.contains(needed), "{needed} missing from {deps:?}");
    }
    let found: Vec<_> = FORBIDDEN.iter().filter(|c| deps.contains(**c)).collect();
    assert!(
        found.is_empty(),
        "coworkvm-vmm depends on {found:?}; the VMM process must not link them"
    );
}

#[test]
fn the_walk_sees_the_helpers_runtime() {
    // The same walk from the helper reaches tokio: a check that cannot
    // see a forbidden crate would prove nothing above.
    let deps = normal_dependency_closure(&metadata(), "coworkvm-helper");
    assert!(deps.contains("tokio") && deps.contains("coworkvm-vmm"));
}
