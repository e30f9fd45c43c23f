//! The real agent runtime for the end-to-end tests: Claude Code's Linux
//! binary from npm (`@anthropic-ai/claude-code-linux-x64`), at a pinned
//! version whose registry integrity (SHA-512 of the tarball) is pinned
//! with it, fetched once into `build/claude-code/<version>/`.
//!
//! The tarball comes straight from the registry with `curl` (the same URL
//! `npm pack` downloads; no node needed on the host) and is checked against
//! [`INTEGRITY`] before anything is unpacked from it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use sha2::{Digest, Sha512};

/// The pinned runtime version.
pub const VERSION: &str = "2.1.332";
/// `npm view @anthropic-ai/claude-code-linux-x64@VERSION dist.integrity`.
pub const INTEGRITY: &str =
    "sha512-f4JWhzwYutJIHScC7/dYOPX6s28tt7ZADhsOi8zwOHq5fFPEuUeChh2NMfinSg0GrUckYxaeebC4h0DqiKzLcw==";
/// What `claude --version` prints for [`VERSION`].
pub fn version_line() -> String {
    format!("{VERSION} (Claude Code)")
}

fn tarball_url() -> String {
    format!(
        "https://registry.npmjs.org/@anthropic-ai/claude-code-linux-x64/-/claude-code-linux-x64-{VERSION}.tgz"
    )
}

/// Whether `bytes` match an npm integrity string (`sha512-<base64>`).
pub fn integrity_matches(bytes: &[u8], integrity: &str) -> bool {
    let Some(b64) = integrity.strip_prefix("sha512-") else {
        return false;
    };
    let digest = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(bytes));
    digest == b64
}

/// The runtime binary, fetched and unpacked into `build_dir` when missing.
pub fn fetch(build_dir: &Path) -> Result<PathBuf> {
    let dir = build_dir.join("claude-code").join(VERSION);
    let bin = dir.join("claude");
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tgz = dir.join("package.tgz");
    let out = Command::new("curl")
        .args(["-fsSL", "--retry", "3", "--max-time", "600", "-o"])
        .arg(&tgz)
        .arg(tarball_url())
        .output()
        .context("running curl")?;
    if !out.status.success() {
        bail!(
            "fetching {}: {}",
            tarball_url(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let bytes = std::fs::read(&tgz)?;
    if !integrity_matches(&bytes, INTEGRITY) {
        let _ = std::fs::remove_file(&tgz);
        bail!(
            "{} does not match the pinned integrity {INTEGRITY}",
            tarball_url()
        );
    }
    let partial = dir.join("unpack");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    let out = Command::new("tar")
        .arg("xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(&partial)
        .arg("package/claude")
        .output()
        .context("running tar")?;
    if !out.status.success() {
        bail!("unpacking: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    std::fs::rename(partial.join("package/claude"), &bin)?;
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_file(&tgz);
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integrity_is_checked() {
        // echo -n abc | openssl dgst -sha512 -binary | base64
        let abc = "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw==";
        assert!(integrity_matches(b"abc", abc));
        assert!(!integrity_matches(b"abd", abc));
        assert!(!integrity_matches(
            b"abc",
            "sha1-qZk+NkcGgWq6PiVxeFDCbJzQ2J0="
        ));
        assert!(INTEGRITY.starts_with("sha512-"));
    }
}
