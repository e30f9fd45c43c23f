//! The agent's side of the SDK transfer (`socket_proto::sdk` has the wire
//! format): `installSdk`, `installSdk.chunk`, `installSdk.commit`.
//!
//! On the session disk, beneath `.coworkvm/sdk/` (0755, root):
//! `<version>/claude` (0755), `<version>/claude.sha256` (its hex SHA-256,
//! written after the binary is in place, so a binary without it is never
//! taken as cached), `<version>/claude.partial` while a transfer runs, and
//! `current`, the version installed last: the one a `spawn` of `claude`
//! runs. One transfer at a time; a new `installSdk` drops an unfinished one.
//! When the agent starts it keeps the current version and the newest other
//! one, and removes the rest.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use socket_proto::host::InstallSdkParams;
use socket_proto::manifest::hex;
use socket_proto::sdk::{
    is_sha256_hex, validate_version, BadSdkVersion, InstallSdkChunkParams, InstallSdkChunkResult,
    InstallSdkCommitResult, InstallSdkResult, SDK_BINARY, SDK_CHUNK_MAX,
};

use crate::sessions::{fsync_dir, write_atomic, SessionError};

/// The largest SDK accepted (the real one is 100-250 MB).
pub const MAX_SDK_SIZE: u64 = 2 << 30;

/// Why an SDK transfer step failed. The text is the answer the helper gets;
/// every error after `installSdk` has opened a transfer aborts it.
#[derive(Debug, thiserror::Error)]
pub enum SdkStoreError {
    /// The version cannot be a directory name.
    #[error("installSdk: {0}")]
    BadVersion(#[from] BadSdkVersion),
    /// The client's own `installSdk` (no hash, no size) for a version the
    /// guest does not have.
    #[error(
        "SDK {0} is not installed in the guest, and installSdk came without sha256 and size: \
         the helper must send the binary (coworkvm's installSdk transfer extension)"
    )]
    NotInstalled(String),
    #[error("installSdk: sha256 {0:?} is not 64 hex digits")]
    BadSha256(String),
    #[error("installSdk: {0} bytes is more than the {MAX_SDK_SIZE} an SDK may have")]
    TooLarge(u64),
    #[error("installSdk: the session disk has {free} bytes free, the SDK needs {size}")]
    NoSpace { free: u64, size: u64 },
    /// A chunk or a commit with no transfer open.
    #[error("{method}: no SDK transfer in progress (send installSdk first)")]
    NoTransfer { method: &'static str },
    #[error(
        "{method}: version {got} is not the one being transferred ({expected}); transfer aborted"
    )]
    OtherVersion {
        method: &'static str,
        got: String,
        expected: String,
    },
    #[error(
        "installSdk.chunk: offset {offset} but {received} bytes were received; transfer aborted"
    )]
    WrongOffset { offset: u64, received: u64 },
    #[error("installSdk.chunk: more than {SDK_CHUNK_MAX} bytes in one chunk; transfer aborted")]
    ChunkTooLarge,
    #[error("installSdk.chunk: data is not base64 ({0}); transfer aborted")]
    NotBase64(base64::DecodeError),
    #[error(
        "installSdk.chunk: {total} bytes would pass the announced size {size}; transfer aborted"
    )]
    PastSize { total: u64, size: u64 },
    #[error("installSdk.chunk: {}: {source}; transfer aborted", path.display())]
    ChunkWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("installSdk.commit: {received} of {size} bytes received; transfer aborted")]
    Short { received: u64, size: u64 },
    #[error(
        "installSdk.commit: SHA-256 mismatch (got {got}, expected {expected}); transfer aborted"
    )]
    HashMismatch { got: String, expected: String },
    /// A file operation on the session disk.
    #[error(transparent)]
    Io(#[from] crate::IoError),
    /// Writing or syncing through the session disk's helpers.
    #[error(transparent)]
    Disk(#[from] SessionError),
    /// Putting the received binary in place failed (the transfer is gone).
    #[error("installSdk.commit: {0}; transfer aborted")]
    Commit(Box<SdkStoreError>),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SdkStoreError + '_ {
    move |e| SdkStoreError::Io(crate::io_at(path.display())(e))
}

struct Pending {
    version: String,
    sha256: String,
    size: u64,
    received: u64,
    hasher: Sha256,
    file: File,
    tmp: PathBuf,
}

pub struct SdkStore {
    dir: PathBuf,
    pending: Option<Pending>,
}

impl SdkStore {
    /// The store beneath `dir` (`/sessions/.coworkvm/sdk`).
    pub fn new(dir: PathBuf) -> Self {
        SdkStore { dir, pending: None }
    }

    fn version_dir(&self, v: &str) -> PathBuf {
        self.dir.join(v)
    }

    /// Drops an unfinished transfer and its temporary file.
    pub fn abort(&mut self) {
        if let Some(p) = self.pending.take() {
            drop(p.file);
            let _ = fs::remove_file(&p.tmp);
        }
    }

    fn fail<T>(&mut self, e: SdkStoreError) -> Result<T, SdkStoreError> {
        self.abort();
        Err(e)
    }

    /// The installed binary of `version` and its recorded SHA-256, if any.
    fn installed(&self, version: &str) -> Option<(PathBuf, String, u64)> {
        let d = self.version_dir(version);
        let bin = d.join(SDK_BINARY);
        let md = fs::symlink_metadata(&bin).ok().filter(|m| m.is_file())?;
        let sha = fs::read_to_string(d.join(format!("{SDK_BINARY}.sha256"))).ok()?;
        Some((bin, sha.trim().to_owned(), md.len()))
    }

    fn set_current(&self, version: &str) -> Result<(), SdkStoreError> {
        Ok(write_atomic(
            &self.dir.join("current"),
            version.as_bytes(),
            0o644,
        )?)
    }

    /// The binary of the version installed last, if it is still there.
    pub fn current(&self) -> Option<PathBuf> {
        let v = self.current_version()?;
        self.installed(&v).map(|(bin, _, _)| bin)
    }

    fn ensure_dir(p: &Path) -> Result<(), SdkStoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(p)
            .map_err(io(p))?;
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).map_err(io(p))
    }

    /// `installSdk`: `{cached: true, path}` when this version is here with
    /// this hash; otherwise a transfer starts (`{cached: false}`).
    pub fn begin(&mut self, p: &InstallSdkParams) -> Result<InstallSdkResult, SdkStoreError> {
        self.abort();
        validate_version(&p.version)?;
        let (Some(sha), Some(size)) = (p.sha256.as_deref(), p.size) else {
            // The client's own form, without the transfer extension: fine
            // when the version is here already.
            return match self.installed(&p.version) {
                Some((bin, _, _)) => {
                    self.set_current(&p.version)?;
                    Ok(InstallSdkResult {
                        cached: true,
                        path: Some(bin.to_string_lossy().into_owned()),
                    })
                }
                None => Err(SdkStoreError::NotInstalled(p.version.clone())),
            };
        };
        let sha = sha.to_ascii_lowercase();
        if !is_sha256_hex(&sha) {
            return Err(SdkStoreError::BadSha256(sha));
        }
        if size > MAX_SDK_SIZE {
            return Err(SdkStoreError::TooLarge(size));
        }
        if let Some((bin, have, len)) = self.installed(&p.version) {
            if have == sha && len == size {
                self.set_current(&p.version)?;
                return Ok(InstallSdkResult {
                    cached: true,
                    path: Some(bin.to_string_lossy().into_owned()),
                });
            }
        }
        Self::ensure_dir(&self.dir)?;
        let vdir = self.version_dir(&p.version);
        Self::ensure_dir(&vdir)?;
        if let Ok((_, free)) = crate::sessions::statvfs(&vdir) {
            if free < size {
                return Err(SdkStoreError::NoSpace { free, size });
            }
        }
        let tmp = vdir.join(format!("{SDK_BINARY}.partial"));
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        self.pending = Some(Pending {
            version: p.version.clone(),
            sha256: sha,
            size,
            received: 0,
            hasher: Sha256::new(),
            file,
            tmp,
        });
        Ok(InstallSdkResult {
            cached: false,
            path: None,
        })
    }

    /// `installSdk.chunk`: the next bytes, in order. Any error aborts the
    /// transfer and deletes the temporary file.
    pub fn chunk(
        &mut self,
        c: &InstallSdkChunkParams,
    ) -> Result<InstallSdkChunkResult, SdkStoreError> {
        let Some(p) = self.pending.as_ref() else {
            return Err(SdkStoreError::NoTransfer {
                method: socket_proto::sdk::METHOD_CHUNK,
            });
        };
        if p.version != c.version {
            let e = SdkStoreError::OtherVersion {
                method: socket_proto::sdk::METHOD_CHUNK,
                got: c.version.clone(),
                expected: p.version.clone(),
            };
            return self.fail(e);
        }
        if c.offset != p.received {
            let e = SdkStoreError::WrongOffset {
                offset: c.offset,
                received: p.received,
            };
            return self.fail(e);
        }
        // Bound the base64 text before decoding it.
        if c.data.len() > SDK_CHUNK_MAX.div_ceil(3) * 4 {
            return self.fail(SdkStoreError::ChunkTooLarge);
        }
        let bytes = match base64::engine::general_purpose::STANDARD.decode(&c.data) {
            Ok(b) => b,
            Err(e) => return self.fail(SdkStoreError::NotBase64(e)),
        };
        if bytes.len() > SDK_CHUNK_MAX {
            return self.fail(SdkStoreError::ChunkTooLarge);
        }
        if p.received + bytes.len() as u64 > p.size {
            let e = SdkStoreError::PastSize {
                total: p.received + bytes.len() as u64,
                size: p.size,
            };
            return self.fail(e);
        }
        let p = self.pending.as_mut().expect("checked above");
        if let Err(e) = p.file.write_all(&bytes) {
            let e = SdkStoreError::ChunkWrite {
                path: p.tmp.clone(),
                source: e,
            };
            return self.fail(e);
        }
        p.hasher.update(&bytes);
        p.received += bytes.len() as u64;
        Ok(InstallSdkChunkResult {
            received: p.received,
        })
    }

    /// `installSdk.commit`: checks size and hash, fsyncs, renames into
    /// place (0755), records the hash and makes the version current.
    pub fn commit(&mut self, version: &str) -> Result<InstallSdkCommitResult, SdkStoreError> {
        match &self.pending {
            None => {
                return Err(SdkStoreError::NoTransfer {
                    method: socket_proto::sdk::METHOD_COMMIT,
                })
            }
            Some(p) if p.version != version => {
                let e = SdkStoreError::OtherVersion {
                    method: socket_proto::sdk::METHOD_COMMIT,
                    got: version.to_owned(),
                    expected: p.version.clone(),
                };
                return self.fail(e);
            }
            Some(_) => {}
        }
        let p = self.pending.take().expect("checked above");
        let cleanup = |p: &Pending| {
            let _ = fs::remove_file(&p.tmp);
        };
        if p.received != p.size {
            cleanup(&p);
            return Err(SdkStoreError::Short {
                received: p.received,
                size: p.size,
            });
        }
        let got = hex(&p.hasher.clone().finalize());
        if got != p.sha256 {
            cleanup(&p);
            return Err(SdkStoreError::HashMismatch {
                got,
                expected: p.sha256,
            });
        }
        let vdir = self.version_dir(&p.version);
        let bin = vdir.join(SDK_BINARY);
        let sha_file = vdir.join(format!("{SDK_BINARY}.sha256"));
        let finish = || -> Result<(), SdkStoreError> {
            p.file.sync_all().map_err(io(&p.tmp))?;
            fs::set_permissions(&p.tmp, fs::Permissions::from_mode(0o755)).map_err(io(&p.tmp))?;
            // The hash file goes first and comes back last: a binary
            // without one is never taken as cached.
            match fs::remove_file(&sha_file) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(&sha_file)(err))
                }
                _ => {}
            }
            fs::rename(&p.tmp, &bin).map_err(io(&bin))?;
            fsync_dir(&vdir)?;
            write_atomic(&sha_file, format!("{}\n", p.sha256).as_bytes(), 0o644)?;
            Ok(())
        };
        if let Err(err) = finish() {
            cleanup(&p);
            return Err(SdkStoreError::Commit(Box::new(err)));
        }
        self.set_current(&p.version)?;
        Ok(InstallSdkCommitResult {
            path: bin.to_string_lossy().into_owned(),
        })
    }

    /// The version `current` names, if it is a valid name.
    fn current_version(&self) -> Option<String> {
        let v = fs::read_to_string(self.dir.join("current")).ok()?;
        let v = v.trim();
        validate_version(v).ok()?;
        Some(v.to_owned())
    }

    /// Removes every version directory but the current one and the newest
    /// other (so that going back costs no transfer): each runtime update by
    /// copy would otherwise leave a few hundred MB on the session disk for
    /// good. Called when the agent starts, before any session runs, so
    /// that no running session loses the binary its sandbox binds. Best
    /// effort: what cannot go now goes at a later boot.
    pub fn prune_old_versions(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let current = self.current_version();
        let mut others: Vec<(std::time::SystemTime, std::ffi::OsString)> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| validate_version(n).is_ok() && Some(n) != current.as_deref())
            })
            .map(|e| {
                let mtime = e.metadata().and_then(|m| m.modified());
                (mtime.unwrap_or(std::time::UNIX_EPOCH), e.file_name())
            })
            .collect();
        // Newest first; the first one stays.
        others.sort_by(|a, b| b.cmp(a));
        for (_, name) in others.into_iter().skip(1) {
            let path = self.dir.join(&name);
            if let Err(err) = fs::remove_dir_all(&path) {
                eprintln!(
                    "coworkvm-agent: removing the old SDK {}: {err}",
                    path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    fn begin_params(v: &str, data: &[u8]) -> InstallSdkParams {
        InstallSdkParams {
            sdk_subpath: ".local/share/claude".into(),
            version: v.into(),
            sha256: Some(hex(&Sha256::digest(data))),
            size: Some(data.len() as u64),
            shared_path: None,
        }
    }

    fn chunk(v: &str, offset: u64, data: &[u8]) -> InstallSdkChunkParams {
        InstallSdkChunkParams {
            version: v.into(),
            offset,
            data: B64.encode(data),
        }
    }

    fn partials(dir: &Path) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            for f in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().ends_with(".partial") {
                    v.push(f.path());
                }
            }
        }
        v
    }

    #[test]
    fn a_transfer_installs_and_is_then_cached() {
        let d = tempfile::tempdir().unwrap();
        let mut s = SdkStore::new(d.path().join("sdk"));
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        assert_eq!(s.current(), None);
        let r = s.begin(&begin_params("1.0", &data)).unwrap();
        assert!(!r.cached);
        assert_eq!(
            s.chunk(&chunk("1.0", 0, &data[..4000])).unwrap().received,
            4000
        );
        assert_eq!(
            s.chunk(&chunk("1.0", 4000, &data[4000..]))
                .unwrap()
                .received,
            10_000
        );
        let path = PathBuf::from(s.commit("1.0").unwrap().path);
        assert_eq!(path, d.path().join("sdk/1.0/claude"));
        assert_eq!(fs::read(&path).unwrap(), data);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o755);
        assert_eq!(s.current(), Some(path.clone()));
        assert!(partials(&d.path().join("sdk")).is_empty());

        // Again, with the same hash: cached. A fresh store (a reboot) too.
        let mut s = SdkStore::new(d.path().join("sdk"));
        let r = s.begin(&begin_params("1.0", &data)).unwrap();
        assert_eq!(
            r,
            InstallSdkResult {
                cached: true,
                path: Some(path.to_string_lossy().into())
            }
        );
        // The client's own form (no hash) is fine for an installed version...
        let mut plain = begin_params("1.0", &data);
        plain.sha256 = None;
        plain.size = None;
        assert!(s.begin(&plain).unwrap().cached);
        // ...and an error for one that is not.
        plain.version = "9.9".into();
        let e = s.begin(&plain).unwrap_err();
        assert!(matches!(e, SdkStoreError::NotInstalled(_)), "{e}");
        assert!(e.to_string().contains("sha256"), "{e}");
        // Another hash for the same version: not cached, a new transfer.
        assert!(!s.begin(&begin_params("1.0", b"other")).unwrap().cached);
        s.abort();

        // A second version becomes current.
        s.begin(&begin_params("2.0", b"v2")).unwrap();
        s.chunk(&chunk("2.0", 0, b"v2")).unwrap();
        s.commit("2.0").unwrap();
        assert_eq!(s.current(), Some(d.path().join("sdk/2.0/claude")));
        // Asking for 1.0 (cached) makes it current again.
        assert!(s.begin(&begin_params("1.0", &data)).unwrap().cached);
        assert_eq!(s.current(), Some(path.clone()));
    }

    /// What a start keeps: the current version and the newest other one.
    #[test]
    fn a_start_keeps_the_current_and_the_newest_other_version_only() {
        let d = tempfile::tempdir().unwrap();
        let sdk = d.path().join("sdk");
        let mut s = SdkStore::new(sdk.clone());
        let install = |s: &mut SdkStore, v: &str| {
            s.begin(&begin_params(v, v.as_bytes())).unwrap();
            s.chunk(&chunk(v, 0, v.as_bytes())).unwrap();
            s.commit(v).unwrap();
            // Distinct modification times, oldest first.
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        for v in ["1.0", "2.0", "3.0", "4.0"] {
            install(&mut s, v);
        }
        // Back to 2.0 (cached): current, while 4.0 is the newest other.
        assert!(s.begin(&begin_params("2.0", b"2.0")).unwrap().cached);
        // Not version directories: left alone.
        fs::write(sdk.join("notes"), b"x").unwrap();
        fs::create_dir(sdk.join(".hidden")).unwrap();
        // Nothing goes while the agent runs: a session may use any of them.
        let names = |sdk: &Path| {
            let mut n: Vec<String> = fs::read_dir(sdk)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            n.sort();
            n
        };
        assert_eq!(
            names(&sdk),
            [".hidden", "1.0", "2.0", "3.0", "4.0", "current", "notes"]
        );
        // The next start.
        let s = SdkStore::new(sdk.clone());
        s.prune_old_versions();
        assert_eq!(names(&sdk), [".hidden", "2.0", "4.0", "current", "notes"]);
        assert_eq!(s.current(), Some(sdk.join("2.0/claude")));
        // Again: nothing more goes.
        s.prune_old_versions();
        assert_eq!(names(&sdk), [".hidden", "2.0", "4.0", "current", "notes"]);
    }

    #[test]
    fn bad_transfers_fail_and_leave_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let sdk = d.path().join("sdk");
        let mut s = SdkStore::new(sdk.clone());
        let data = vec![7u8; 3000];

        // A chunk without installSdk.
        assert!(s.chunk(&chunk("1", 0, &data)).is_err());
        assert!(s.commit("1").is_err());

        type Case<'a> = Box<dyn Fn(&mut SdkStore) -> Result<(), SdkStoreError> + 'a>;
        let cases: Vec<(&str, Case<'_>)> = vec![
            (
                "wrong offset",
                Box::new(|s| s.chunk(&chunk("1", 1, &data[..10])).map(drop)),
            ),
            (
                "out of order",
                Box::new(|s| {
                    s.chunk(&chunk("1", 0, &vec![7u8; 1000]))?;
                    s.chunk(&chunk("1", 2000, &vec![7u8; 1000])).map(drop)
                }),
            ),
            (
                "past the size",
                Box::new(|s| s.chunk(&chunk("1", 0, &vec![7u8; 3001])).map(drop)),
            ),
            (
                "oversize chunk",
                Box::new(|s| {
                    let mut c = chunk("1", 0, &[]);
                    c.data = B64.encode(vec![0u8; SDK_CHUNK_MAX + 3]);
                    s.chunk(&c).map(drop)
                }),
            ),
            (
                "not base64",
                Box::new(|s| {
                    let mut c = chunk("1", 0, &[]);
                    c.data = "!!!".into();
                    s.chunk(&c).map(drop)
                }),
            ),
            (
                "other version",
                Box::new(|s| s.chunk(&chunk("2", 0, &data)).map(drop)),
            ),
            (
                "short",
                Box::new(|s| {
                    s.chunk(&chunk("1", 0, &vec![7u8; 2999]))?;
                    s.commit("1").map(drop)
                }),
            ),
            (
                "bad sha256",
                Box::new(|s| {
                    s.chunk(&chunk("1", 0, &vec![8u8; 3000]))?;
                    s.commit("1").map(drop)
                }),
            ),
        ];
        for (what, case) in cases {
            s.begin(&begin_params("1", &data)).unwrap();
            assert_eq!(
                partials(&sdk).len(),
                1,
                "{what}: the transfer writes a temporary file"
            );
            assert!(case(&mut s).is_err(), "{what} must fail");
            assert!(
                partials(&sdk).is_empty(),
                "{what}: temporary file left behind"
            );
            assert!(
                s.chunk(&chunk("1", 0, &data)).is_err(),
                "{what}: the transfer is over"
            );
            assert!(!sdk.join("1/claude").exists(), "{what}: nothing installed");
            assert_eq!(s.current(), None);
        }

        // Bad begin params.
        let mut p = begin_params("1", &data);
        p.sha256 = Some("xyz".into());
        assert!(s.begin(&p).is_err());
        let mut p = begin_params("../1", &data);
        assert!(s.begin(&p).is_err());
        p.version = "1".into();
        p.size = Some(MAX_SDK_SIZE + 1);
        assert!(s.begin(&p).is_err());
        // Uppercase hex is fine.
        let mut p = begin_params("1", &data);
        p.sha256 = p.sha256.map(|h| h.to_uppercase());
        s.begin(&p).unwrap();
        s.chunk(&chunk("1", 0, &data)).unwrap();
        assert!(s.commit("1").is_ok());
    }
}
