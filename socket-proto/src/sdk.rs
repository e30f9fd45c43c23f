//! coworkvm's SDK transfer extension of the guest protocol: how the helper
//! copies the agent runtime (`$HOME/<sdkSubpath>/<version>/claude`, 100-250
//! MB) into the guest over the control connection.
//!
//! Bulk data rides on the control connection as frames (at most 10 MiB
//! each), so the binary goes in chunks, each one a request that the agent
//! answers before the helper sends the next: that answer is the flow
//! control, and a slow disk in the guest slows the sender down instead of
//! filling memory.
//!
//! 1. `installSdk {sdkSubpath, version, sha256, size}` → [`InstallSdkResult`]
//!    `{cached: true, path}` when the guest already holds that version with
//!    that SHA-256 (nothing more to send), else `{cached: false}`: the agent
//!    has opened a fresh temporary file for it (any earlier, unfinished
//!    transfer is dropped).
//! 2. `installSdk.chunk {version, offset, data}` ([`InstallSdkChunkParams`],
//!    `data` base64 of at most [`SDK_CHUNK_MAX`] raw bytes) → `{received}`,
//!    the bytes the agent holds so far. Chunks go in order: `offset` must be
//!    exactly `received`; a wrong offset, an oversize chunk, bytes past
//!    `size` or bad base64 abort the transfer (the temporary file is
//!    deleted) with an error.
//! 3. `installSdk.commit {version}` → `{path}`: the agent checks size and
//!    SHA-256, fsyncs, makes the file 0755 and renames it into place; the
//!    version becomes the one a `spawn` of `claude` runs. A mismatch is an
//!    error and deletes the temporary file.
//!
//! [`upload_sdk`] drives the whole sequence through a request function that
//! the caller provides (the helper plugs in its agent connection).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::guest::{GuestError, GuestRequest};
use crate::host::InstallSdkParams;

/// The chunk request's method name.
pub const METHOD_CHUNK: &str = "installSdk.chunk";
/// The commit request's method name.
pub const METHOD_COMMIT: &str = "installSdk.commit";
/// The most raw bytes one chunk carries (base64 makes 5.3 MiB of it, well
/// inside a 10 MiB frame).
pub const SDK_CHUNK_MAX: usize = 4 << 20;
/// The binary's name inside its version directory, on the host and in the
/// guest.
pub const SDK_BINARY: &str = "claude";
/// Spawn commands that mean "the installed agent runtime": the bare name,
/// and the absolute paths the desktop client spawns (`/usr/local/bin/claude`,
/// where the vendor's guest image installs it) or a user might.
pub const RUNTIME_COMMANDS: &[&str] = &["claude", "/usr/local/bin/claude", "/usr/bin/claude"];
/// The marker beside a complete download on the host.
pub const SDK_VERIFIED_MARKER: &str = ".verified";

/// `installSdk.chunk {version, offset, data}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallSdkChunkParams {
    /// The version being transferred (as in `installSdk`).
    pub version: String,
    /// Where `data` starts in the file: the bytes sent so far.
    pub offset: u64,
    /// Standard base64 of at most [`SDK_CHUNK_MAX`] bytes.
    pub data: String,
}

/// `installSdk.commit {version}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallSdkCommitParams {
    /// The version being transferred.
    pub version: String,
}

/// The agent's answer to `installSdk`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallSdkResult {
    /// True: the guest already holds this version with this SHA-256.
    pub cached: bool,
    /// The binary's path in the guest, when `cached`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// The agent's answer to `installSdk.chunk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallSdkChunkResult {
    /// Bytes the agent holds so far (the next chunk's `offset`).
    pub received: u64,
}

/// The agent's answer to `installSdk.commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallSdkCommitResult {
    /// The installed binary's path in the guest.
    pub path: String,
}

/// Whether `s` is 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A version becomes a directory name on both sides: one plain path
/// component, at most 128 bytes, no control characters, not starting
/// with a dot.
pub fn validate_version(v: &str) -> Result<(), BadSdkVersion> {
    if v.is_empty() || v.len() > 128 {
        return Err(BadSdkVersion::Length(v.to_owned()));
    }
    if v.starts_with('.') || v.contains('/') || v.chars().any(|c| c.is_control()) {
        return Err(BadSdkVersion::NotOneComponent(v.to_owned()));
    }
    Ok(())
}

/// A version that cannot be a directory name ([`validate_version`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSdkVersion {
    /// Empty, or longer than 128 bytes.
    #[error("bad SDK version {0:?}: empty or longer than 128 bytes")]
    Length(String),
    /// A dot first, a slash or a control character.
    #[error("bad SDK version {0:?}: it must be one plain path component")]
    NotOneComponent(String),
}

/// The host's SDK binary: `<home>/<sdkSubpath>/<version>/claude`, with
/// `sdkSubpath` relative and free of `..`, and the `.verified` marker
/// beside the binary (a download still in progress has none).
pub fn sdk_binary_path(
    home: &Path,
    sdk_subpath: &str,
    version: &str,
) -> Result<PathBuf, UploadError> {
    validate_version(version)?;
    let sub = Path::new(sdk_subpath);
    if sdk_subpath.is_empty()
        || sub.is_absolute()
        || sub
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(UploadError::Local(format!(
            "bad sdkSubpath {sdk_subpath:?}: it must be relative to the home directory, without `..`"
        )));
    }
    let dir = home.join(sub).join(version);
    let bin = dir.join(SDK_BINARY);
    if !dir.join(SDK_VERIFIED_MARKER).exists() {
        return Err(UploadError::Local(format!(
            "{} has no {SDK_VERIFIED_MARKER} marker: the download is not complete",
            dir.display()
        )));
    }
    Ok(bin)
}

/// What [`upload_sdk`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadOutcome {
    /// The binary's path in the guest.
    pub guest_path: String,
    /// True: the guest had it already and nothing was sent.
    pub cached: bool,
    /// Raw bytes sent in chunks.
    pub bytes_sent: u64,
    /// Chunk requests made.
    pub chunks: u64,
}

/// Why [`upload_sdk`] failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UploadError {
    /// The version cannot be a directory name.
    #[error(transparent)]
    BadVersion(#[from] BadSdkVersion),
    /// Reading or checking the file on the host.
    #[error("{0}")]
    Local(String),
    /// The agent answered an error.
    #[error("the guest refused {method}: {error}")]
    Guest {
        /// The request that failed.
        method: &'static str,
        /// The agent's error.
        error: GuestError,
    },
    /// The agent answered something that is not the expected result.
    #[error("unexpected answer to {method}: {detail}")]
    BadAnswer {
        /// The request.
        method: &'static str,
        /// What was wrong.
        detail: String,
    },
}

fn hash_file(path: &Path) -> Result<(String, u64), UploadError> {
    let entry = crate::manifest::FileEntry::of_file(path)
        .map_err(|e| UploadError::Local(format!("{}: {e}", path.display())))?;
    Ok((entry.sha256, entry.size))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn decode<T: serde::de::DeserializeOwned>(
    method: &'static str,
    v: Value,
) -> Result<T, UploadError> {
    serde_json::from_value(v).map_err(|e| UploadError::BadAnswer {
        method,
        detail: e.to_string(),
    })
}

/// Copies the SDK binary at `path` (on the host) into the guest as
/// `version`, through `call`, which sends one request to the agent and
/// returns its result or error (the helper wraps it in a `request` frame
/// and waits for the `response`).
///
/// The file is hashed first (SHA-256), then `installSdk` asks whether the
/// guest has it; if not, chunks of [`SDK_CHUNK_MAX`] bytes follow, one
/// request each, then `installSdk.commit`. A file that changes size while
/// it is sent is an error (the agent's hash check would catch a change of
/// content).
pub fn upload_sdk<F>(
    path: &Path,
    sdk_subpath: &str,
    version: &str,
    mut call: F,
) -> Result<UploadOutcome, UploadError>
where
    F: FnMut(GuestRequest) -> Result<Value, GuestError>,
{
    validate_version(version)?;
    let (sha256, size) = hash_file(path)?;
    let begin = GuestRequest::InstallSdk(InstallSdkParams {
        sdk_subpath: sdk_subpath.to_owned(),
        version: version.to_owned(),
        sha256: Some(sha256),
        size: Some(size),
        shared_path: None,
    });
    let r: InstallSdkResult = decode(
        "installSdk",
        call(begin).map_err(|error| UploadError::Guest {
            method: "installSdk",
            error,
        })?,
    )?;
    if r.cached {
        return Ok(UploadOutcome {
            guest_path: r.path.unwrap_or_default(),
            cached: true,
            bytes_sent: 0,
            chunks: 0,
        });
    }
    let mut f =
        File::open(path).map_err(|e| UploadError::Local(format!("{}: {e}", path.display())))?;
    let mut buf = vec![0u8; SDK_CHUNK_MAX];
    let mut offset = 0u64;
    let mut chunks = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf)
            .map_err(|e| UploadError::Local(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        if offset + n as u64 > size {
            return Err(UploadError::Local(format!(
                "{} grew while it was being sent",
                path.display()
            )));
        }
        let req = GuestRequest::InstallSdkChunk(InstallSdkChunkParams {
            version: version.to_owned(),
            offset,
            data: base64::engine::general_purpose::STANDARD.encode(&buf[..n]),
        });
        let got: InstallSdkChunkResult = decode(
            METHOD_CHUNK,
            call(req).map_err(|error| UploadError::Guest {
                method: METHOD_CHUNK,
                error,
            })?,
        )?;
        offset += n as u64;
        chunks += 1;
        if got.received != offset {
            return Err(UploadError::BadAnswer {
                method: METHOD_CHUNK,
                detail: format!("the agent holds {} bytes, {offset} were sent", got.received),
            });
        }
    }
    if offset != size {
        return Err(UploadError::Local(format!(
            "{} shrank while it was being sent",
            path.display()
        )));
    }
    let done: InstallSdkCommitResult = decode(
        METHOD_COMMIT,
        call(GuestRequest::InstallSdkCommit(InstallSdkCommitParams {
            version: version.to_owned(),
        }))
        .map_err(|error| UploadError::Guest {
            method: METHOD_COMMIT,
            error,
        })?,
    )?;
    Ok(UploadOutcome {
        guest_path: done.path,
        cached: false,
        bytes_sent: offset,
        chunks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestFrame;
    use crate::manifest::hex;
    use serde_json::json;
    use sha2::{Digest, Sha256};

    /// A fake agent: keeps what it is sent, answers like the real one.
    #[derive(Default)]
    struct FakeAgent {
        have: Option<(String, String)>,
        got: Vec<u8>,
        expect: Option<(String, u64)>,
        calls: Vec<String>,
    }

    impl FakeAgent {
        fn call(&mut self, req: GuestRequest) -> Result<Value, GuestError> {
            // Every request survives the wire: frame it and parse it back.
            let frame = GuestFrame::from_request("1", &req);
            let wire = serde_json::to_value(&frame).unwrap();
            let Some(GuestFrame::Request { method, params, .. }) =
                GuestFrame::parse(serde_json::from_value(wire).unwrap()).unwrap()
            else {
                panic!("not a request")
            };
            let req = GuestRequest::parse(&method, params).unwrap();
            self.calls.push(method);
            match req {
                GuestRequest::InstallSdk(p) => {
                    let sha = p.sha256.unwrap();
                    if self.have.as_ref() == Some(&(p.version.clone(), sha.clone())) {
                        return Ok(json!({"cached": true, "path": "/g/claude"}));
                    }
                    self.expect = Some((sha, p.size.unwrap()));
                    Ok(json!({"cached": false}))
                }
                GuestRequest::InstallSdkChunk(c) => {
                    if c.offset != self.got.len() as u64 {
                        return Err(GuestError::Text("wrong offset".into()));
                    }
                    let b = base64::engine::general_purpose::STANDARD
                        .decode(&c.data)
                        .unwrap();
                    assert!(b.len() <= SDK_CHUNK_MAX);
                    self.got.extend_from_slice(&b);
                    Ok(json!({"received": self.got.len()}))
                }
                GuestRequest::InstallSdkCommit(_) => {
                    let (sha, size) = self.expect.clone().unwrap();
                    if hex(&Sha256::digest(&self.got)) != sha || self.got.len() as u64 != size {
                        return Err(GuestError::Text("checksum mismatch".into()));
                    }
                    Ok(json!({"path": "/g/claude"}))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn file_of(len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("claude");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        (dir, p, data)
    }

    #[test]
    fn uploads_in_chunks_and_commits() {
        let len = SDK_CHUNK_MAX * 2 + 12345;
        let (_d, p, data) = file_of(len);
        let mut agent = FakeAgent::default();
        let out = upload_sdk(&p, ".claude/sdk", "2.1.0", |r| agent.call(r)).unwrap();
        assert_eq!(agent.got, data);
        assert_eq!(out.chunks, 3);
        assert_eq!(out.bytes_sent, len as u64);
        assert!(!out.cached);
        assert_eq!(out.guest_path, "/g/claude");
        assert_eq!(
            agent.calls,
            [
                "installSdk",
                METHOD_CHUNK,
                METHOD_CHUNK,
                METHOD_CHUNK,
                METHOD_COMMIT
            ]
        );
    }

    #[test]
    fn a_cached_version_sends_nothing() {
        let (_d, p, data) = file_of(1000);
        let mut agent = FakeAgent {
            have: Some(("v1".into(), hex(&Sha256::digest(&data)))),
            ..Default::default()
        };
        let out = upload_sdk(&p, "x", "v1", |r| agent.call(r)).unwrap();
        assert!(out.cached);
        assert_eq!(agent.calls, ["installSdk"]);
        assert!(agent.got.is_empty());
    }

    #[test]
    fn an_empty_file_is_just_a_commit() {
        let (_d, p, _) = file_of(0);
        let mut agent = FakeAgent::default();
        let out = upload_sdk(&p, "x", "v1", |r| agent.call(r)).unwrap();
        assert_eq!(agent.calls, ["installSdk", METHOD_COMMIT]);
        assert_eq!(out.chunks, 0);
    }

    #[test]
    fn guest_errors_stop_the_upload() {
        let (_d, p, _) = file_of(SDK_CHUNK_MAX + 1);
        let mut n = 0;
        let e = upload_sdk(&p, "x", "v1", |r| {
            n += 1;
            match r {
                GuestRequest::InstallSdk(_) => Ok(json!({"cached": false})),
                _ => Err(GuestError::Text("disk full".into())),
            }
        })
        .unwrap_err();
        assert_eq!(n, 2, "nothing is sent after the first error");
        assert!(
            matches!(&e, UploadError::Guest { method, error } if *method == METHOD_CHUNK && error.message() == "disk full"),
            "{e}"
        );
        // An agent that loses count is caught.
        let e = upload_sdk(&p, "x", "v1", |r| match r {
            GuestRequest::InstallSdk(_) => Ok(json!({"cached": false})),
            _ => Ok(json!({"received": 1})),
        })
        .unwrap_err();
        assert!(matches!(e, UploadError::BadAnswer { .. }), "{e}");
    }

    #[test]
    fn bad_versions_and_paths_are_refused() {
        for v in ["", ".", "..", "a/b", ".hidden", "a\nb", &"x".repeat(129)] {
            assert!(validate_version(v).is_err(), "{v:?}");
        }
        assert!(validate_version("2.1.3-beta+4").is_ok());
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join(".local/sdk/1.0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("claude"), b"x").unwrap();
        // No .verified yet: the download is not complete.
        assert!(sdk_binary_path(home.path(), ".local/sdk", "1.0").is_err());
        std::fs::write(dir.join(SDK_VERIFIED_MARKER), b"").unwrap();
        assert_eq!(
            sdk_binary_path(home.path(), ".local/sdk", "1.0").unwrap(),
            dir.join("claude")
        );
        for sub in ["", "/etc", "../x", "a/../../b"] {
            assert!(sdk_binary_path(home.path(), sub, "1.0").is_err(), "{sub:?}");
        }
        assert!(sdk_binary_path(home.path(), ".local/sdk", "../1.0").is_err());
    }

    #[test]
    fn messages_round_trip() {
        let chunk = GuestRequest::InstallSdkChunk(InstallSdkChunkParams {
            version: "1".into(),
            offset: 4194304,
            data: "AAEC".into(),
        });
        let (m, p) = chunk.to_wire();
        assert_eq!(m, "installSdk.chunk");
        assert_eq!(
            p,
            json!({"version": "1", "offset": 4194304, "data": "AAEC"})
        );
        assert_eq!(GuestRequest::parse(&m, p).unwrap(), chunk);
        let commit = GuestRequest::InstallSdkCommit(InstallSdkCommitParams {
            version: "1".into(),
        });
        let (m, p) = commit.to_wire();
        assert_eq!(
            (m.as_str(), &p),
            ("installSdk.commit", &json!({"version": "1"}))
        );
        assert_eq!(GuestRequest::parse(&m, p).unwrap(), commit);
        // The extension's fields on installSdk; the client's form still parses.
        let begin = json!({"sdkSubpath": "s", "version": "1", "sha256": "ab", "size": 3});
        let GuestRequest::InstallSdk(b) = GuestRequest::parse("installSdk", begin.clone()).unwrap()
        else {
            panic!()
        };
        assert_eq!((b.sha256.as_deref(), b.size), (Some("ab"), Some(3)));
        assert_eq!(GuestRequest::InstallSdk(b).to_wire().1, begin);
        let plain = GuestRequest::parse("installSdk", json!({"sdkSubpath": "s", "version": "1"}));
        assert!(matches!(
            plain,
            Ok(GuestRequest::InstallSdk(InstallSdkParams {
                sha256: None,
                ..
            }))
        ));
        // Missing fields are named.
        let e = GuestRequest::parse(METHOD_CHUNK, json!({"version": "1", "data": ""})).unwrap_err();
        assert!(e.message().contains("offset"), "{e}");
        for (v, t) in [
            (json!({"cached": false}), "installSdk"),
            (json!({"cached": true, "path": "/p"}), "installSdk"),
        ] {
            let r: InstallSdkResult = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(serde_json::to_value(&r).unwrap(), v, "{t}");
        }
        let r: InstallSdkChunkResult = serde_json::from_value(json!({"received": 7})).unwrap();
        assert_eq!(r.received, 7);
    }
}
