//! `make bench`: boot-time comparison of coworkvm and QEMU microvm.
use anyhow::{bail, Result};

use crate::Paths;

pub fn run(_paths: &Paths, _args: &[String]) -> Result<()> {
    bail!("the benchmark is not built yet")
}
