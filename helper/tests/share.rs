//! The share keeper with the real virtiofsd, no VM: grants are checked
//! through `/proc/<keeper>/root/<staging>/shared/...` (the keeper's mount
//! namespace) and `/proc/<virtiofsd server>/root/shared/...` (the tree
//! virtiofsd serves after its pivot_root).
//!
//! Needs a virtiofsd >= 1.13 (`$COWORKVM_VIRTIOFSD`, `build/virtiofsd/bin`,
//! `/usr/lib/coworkvm/virtiofsd`, `/usr/libexec/virtiofsd`) and either root
//! or unprivileged user namespaces.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coworkvm_helper::mounts::{DenyConfig, MountMode, MountPolicy, PlannedMount};
use coworkvm_helper::share::{Share, ShareError};
use serde_json::json;

fn virtiofsd() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("COWORKVM_VIRTIOFSD") {
        c.push(p.into());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    c.push(root.join("build/virtiofsd/bin/virtiofsd"));
    c.push("/usr/lib/coworkvm/virtiofsd".into());
    c.push("/usr/libexec/virtiofsd".into());
    c.into_iter().find(|p| {
        std::process::Command::new(p)
            .arg("--version")
            .output()
            .ok()
            .is_some_and(|o| {
                let v = String::from_utf8_lossy(&o.stdout);
                v.starts_with("virtiofsd 1.1")
                    && !v.starts_with("virtiofsd 1.10")
                    && !v.starts_with("virtiofsd 1.11")
                    && !v.starts_with("virtiofsd 1.12")
            })
    })
}

/// The keeper executable: the `share_keeper` example, built with the tests.
/// (`cargo test -p coworkvm-helper` builds it; `--test share` alone does
/// not: `cargo build -p coworkvm-helper --examples` first.)
/// `$COWORKVM_SHARE_KEEPER_EXE` (e.g. the `coworkvm` binary) instead.
fn keeper_exe() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COWORKVM_SHARE_KEEPER_EXE") {
        return Some(p.into());
    }
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples/share_keeper");
    p.is_file().then_some(p)
}

struct Fixture {
    _cleanup: RemoveOnDrop,
    dir: PathBuf,
    home: PathBuf,
    share: Share,
    _vhost: std::os::fd::OwnedFd,
}

impl Fixture {
    fn start(name: &str) -> Option<Self> {
        let Some(vfsd) = virtiofsd() else {
            coworkvm_tests::skip_or_fail("no virtiofsd >= 1.13 (set COWORKVM_VIRTIOFSD)");
            return None;
        };
        let Some(keeper) = keeper_exe() else {
            coworkvm_tests::skip_or_fail(
                "the share_keeper example is not built (cargo build -p coworkvm-helper --examples)",
            );
            return None;
        };
        let dir =
            std::env::temp_dir().join(format!("coworkvm-share-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let dir = fs::canonicalize(&dir).unwrap();
        let home = dir.join("home/u");
        fs::create_dir_all(&home).unwrap();
        let staging = dir.join("staging");
        let (share, vhost) = match Share::start(&vfsd, &keeper, &staging) {
            Ok(s) => s,
            Err(e) => panic!("Share::start: {e}"),
        };
        Some(Self {
            _cleanup: RemoveOnDrop(dir.clone()),
            dir,
            home,
            share,
            _vhost: vhost,
        })
    }

    fn policy(&self) -> MountPolicy {
        MountPolicy::new(self.home.clone(), &DenyConfig::default()).unwrap()
    }

    fn plan(&self, path: &Path, mode: &str) -> PlannedMount {
        let rel = path.strip_prefix("/").unwrap().to_str().unwrap();
        let plan = self
            .policy()
            .plan_additional_mounts(&json!({"m": {"path": rel, "mode": mode}}));
        assert!(plan.failed.is_empty(), "{:?}", plan.failed);
        plan.mounts.into_iter().next().unwrap()
    }

    /// `shared/<rel>` as the keeper's namespace sees it.
    fn in_keeper(&self, rel: &str) -> PathBuf {
        let staging = self.share.staging().strip_prefix("/").unwrap();
        PathBuf::from(format!("/proc/{}/root", self.share.keeper_pid()))
            .join(staging)
            .join("shared")
            .join(rel)
    }

    /// `shared/<rel>` as virtiofsd's serving process sees it.
    fn in_virtiofsd(&self, rel: &str) -> Option<PathBuf> {
        virtiofsd_server(self.share.virtiofsd_pid())
            .map(|pid| PathBuf::from(format!("/proc/{pid}/root/shared")).join(rel))
    }

    fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.dir.join(rel);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

/// Removes the test's directory last (after the share has ended).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// virtiofsd (`--sandbox namespace`) forks twice; the serving process is
/// the grandchild-most descendant that has pivoted into the share.
fn virtiofsd_server(pid: i32) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut cur = pid;
        // A process of the chain may exit between two reads (the middle
        // fork does): an unreadable one means look again, not "none".
        while let Ok(kids) = fs::read_to_string(format!("/proc/{cur}/task/{cur}/children")) {
            match kids.split_whitespace().next().and_then(|k| k.parse().ok()) {
                Some(k) => cur = k,
                None => break,
            }
        }
        if cur != pid && fs::metadata(format!("/proc/{cur}/root/shared")).is_ok() {
            return Some(cur);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_err(p: &Path) -> Option<i32> {
    match fs::File::create(p).and_then(|mut f| f.write_all(b"x")) {
        Ok(()) => None,
        Err(e) => Some(e.raw_os_error().unwrap_or(-1)),
    }
}

#[test]
fn grants_are_bound_read_only_or_writable_with_credential_stores_covered() {
    let Some(f) = Fixture::start("modes") else {
        return;
    };
    let docs = f.mkdir("home/u/docs");
    fs::write(docs.join("a.txt"), "hello").unwrap();
    let work = f.mkdir("home/u/work");

    // ro: readable, a write fails EROFS (host level), the host is untouched.
    let ro = f.plan(&docs, "ro");
    let rel = f.share.grant(&ro).unwrap();
    assert_eq!(rel, docs.strip_prefix("/").unwrap().to_str().unwrap());
    assert_eq!(
        fs::read_to_string(f.in_keeper(&rel).join("a.txt")).unwrap(),
        "hello"
    );
    assert_eq!(
        write_err(&f.in_keeper(&rel).join("new.txt")),
        Some(libc::EROFS)
    );
    assert!(!docs.join("new.txt").exists());

    // rw: writes land on the host.
    let rw = f.plan(&work, "rw");
    let wrel = f.share.grant(&rw).unwrap();
    assert_eq!(write_err(&f.in_keeper(&wrel).join("out.txt")), None);
    assert_eq!(fs::read_to_string(work.join("out.txt")).unwrap(), "x");

    // Propagation: virtiofsd started before these grants and sees them.
    let Some(served) = f.in_virtiofsd(&rel) else {
        panic!("virtiofsd's serving process not found");
    };
    assert_eq!(fs::read_to_string(served.join("a.txt")).unwrap(), "hello");
    assert_eq!(write_err(&served.join("new.txt")), Some(libc::EROFS));
    let served_work = f.in_virtiofsd(&wrel).unwrap();
    assert_eq!(
        fs::read_to_string(served_work.join("out.txt")).unwrap(),
        "x"
    );

    // Nothing of it is mounted in the helper's own namespace.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(f.share.staging().to_str().unwrap()),
        "{mountinfo}"
    );

    // The scaffolding around the grants is read-only for virtiofsd (and so
    // for the guest), though the keeper's tmpfs under it is not.
    let staging_view = served.ancestors().nth(rel.split('/').count()).unwrap();
    assert!(
        staging_view.ends_with("shared"),
        "{}",
        staging_view.display()
    );
    assert_eq!(write_err(&staging_view.join("planted")), Some(libc::EROFS));
    assert_eq!(
        fs::create_dir(staging_view.join("tmp/d"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    assert_eq!(write_err(&f.in_keeper("planted")), Some(libc::EROFS));

    // Release: the bind goes, in the keeper and in virtiofsd's tree.
    f.share.release(&docs, MountMode::ReadOnly).unwrap();
    assert!(!f.in_keeper(&rel).join("a.txt").exists());
    assert!(
        !served.join("a.txt").exists(),
        "released grant still served"
    );
    assert!(matches!(
        f.share.release(&docs, MountMode::ReadOnly),
        Err(ShareError::NotGranted(..))
    ));
    // The mountpoint directories it created in the tmpfs are gone too
    // (`docs` was the only grant under `home/u`... `work` still is).
    assert!(!f.in_keeper(&rel).exists());
    f.share.release(&work, MountMode::ReadWrite).unwrap();
    assert!(!f.in_keeper(&wrel).exists());
    assert!(!f
        .in_keeper(
            docs.parent()
                .unwrap()
                .strip_prefix("/")
                .unwrap()
                .to_str()
                .unwrap()
        )
        .exists());
    // The host keeps its files.
    assert!(docs.join("a.txt").exists() && work.join("out.txt").exists());
}

#[test]
fn home_grants_hide_existing_and_absent_credential_stores() {
    let Some(f) = Fixture::start("home") else {
        return;
    };
    let ssh = f.mkdir("home/u/.ssh");
    fs::write(ssh.join("id_ed25519"), "secret").unwrap();
    fs::write(f.home.join("notes.txt"), "n").unwrap();
    f.mkdir("home/u/.docker");
    // `.aws` and `.docker/config.json` do not exist.

    let ro = f.plan(&f.home, "ro");
    assert_eq!(ro.hidden, std::slice::from_ref(&ssh));
    let rel = f.share.grant(&ro).unwrap();
    let k = f.in_keeper(&rel);
    assert_eq!(fs::read_to_string(k.join("notes.txt")).unwrap(), "n");
    // The hidden .ssh is empty and read-only.
    assert_eq!(fs::read_dir(k.join(".ssh")).unwrap().count(), 0);
    assert_eq!(
        write_err(&k.join(".ssh/authorized_keys")),
        Some(libc::EROFS)
    );
    // A ro grant creates nothing on the host.
    assert!(!f.home.join(".aws").exists());

    // A writable grant of the same path: the bind turns writable, and the
    // absent stores are created empty on the host and covered.
    let rw = f.plan(&f.home, "rw");
    assert!(rw
        .absent_denied
        .iter()
        .any(|a| a.path == f.home.join(".aws")));
    assert_eq!(f.share.grant(&rw).unwrap(), rel);
    assert_eq!(write_err(&k.join("new.txt")), None);
    assert!(f.home.join("new.txt").exists());
    let aws = f.home.join(".aws");
    let meta = fs::symlink_metadata(&aws).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    assert_eq!(write_err(&k.join(".aws/credentials")), Some(libc::EROFS));
    assert!(!aws.join("credentials").exists());
    let cfg = f.home.join(".docker/config.json");
    let meta = fs::symlink_metadata(&cfg).unwrap();
    assert!(meta.is_file() && meta.len() == 0);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(write_err(&k.join(".docker/config.json")), Some(libc::EROFS));
    // .ssh is still covered, and the guest's view through virtiofsd too.
    assert_eq!(fs::read_dir(k.join(".ssh")).unwrap().count(), 0);
    let served = f.in_virtiofsd(&rel).unwrap();
    assert_eq!(fs::read_dir(served.join(".ssh")).unwrap().count(), 0);
    assert!(!served.join(".ssh/id_ed25519").exists());
    assert_eq!(write_err(&served.join(".aws/x")), Some(libc::EROFS));

    // The rebind reaches virtiofsd's tree too: writable there now.
    assert_eq!(write_err(&served.join("from-guest.txt")), None);
    assert!(f.home.join("from-guest.txt").exists());

    // Releasing the writable one turns it read-only again, everywhere.
    f.share.release(&f.home, MountMode::ReadWrite).unwrap();
    assert_eq!(write_err(&k.join("new2.txt")), Some(libc::EROFS));
    assert_eq!(write_err(&served.join("new2.txt")), Some(libc::EROFS));
    assert_eq!(fs::read_dir(served.join(".ssh")).unwrap().count(), 0);
    assert_eq!(fs::read_to_string(k.join("notes.txt")).unwrap(), "n");
    f.share.release(&f.home, MountMode::ReadOnly).unwrap();
    assert!(!k.join("notes.txt").exists());
}

#[test]
fn file_grants_and_hidden_files_are_bound_as_files() {
    let Some(f) = Fixture::start("files") else {
        return;
    };
    let notes = f.home.join("notes.txt");
    fs::write(&notes, "n").unwrap();
    let rel = f.share.grant(&f.plan(&notes, "ro")).unwrap();
    let k = f.in_keeper(&rel);
    assert_eq!(fs::read_to_string(&k).unwrap(), "n");
    assert_eq!(write_err(&k), Some(libc::EROFS));
    assert_eq!(
        fs::read_to_string(f.in_virtiofsd(&rel).unwrap()).unwrap(),
        "n"
    );
    f.share.release(&notes, MountMode::ReadOnly).unwrap();
    assert!(!k.exists(), "the file mountpoint is pruned");

    // An existing credential file inside a grant is covered by an empty,
    // read-only file.
    let cfg = f.home.join(".docker/config.json");
    fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    fs::write(&cfg, "secret").unwrap();
    let docker = f.home.join(".docker");
    let plan = f.plan(&docker, "rw");
    assert_eq!(plan.hidden, std::slice::from_ref(&cfg));
    let drel = f.share.grant(&plan).unwrap();
    let covered = f.in_keeper(&drel).join("config.json");
    assert_eq!(fs::read_to_string(&covered).unwrap(), "");
    assert_eq!(write_err(&covered), Some(libc::EROFS));
    let served = f.in_virtiofsd(&drel).unwrap().join("config.json");
    assert_eq!(fs::read_to_string(&served).unwrap(), "");
    assert_eq!(fs::read_to_string(&cfg).unwrap(), "secret");
}

#[test]
fn a_path_swapped_for_a_symlink_after_planning_is_refused() {
    let Some(f) = Fixture::start("swap") else {
        return;
    };
    let work = f.mkdir("home/u/work");
    let other = f.mkdir("other");
    let secret = f.mkdir("elsewhere");
    fs::write(secret.join("s"), "s").unwrap();
    let plan = f.plan(&work, "rw");
    fs::remove_dir(&work).unwrap();
    std::os::unix::fs::symlink(&secret, &work).unwrap();
    let e = f.share.grant(&plan).unwrap_err();
    assert!(matches!(e, ShareError::Keeper(_)), "{e}");
    assert!(!f
        .in_keeper(plan.staging_relative().to_str().unwrap())
        .join("s")
        .exists());
    // A directory replaced by another one (another inode: both exist at
    // once, so tmpfs cannot reuse the number) is refused too.
    fs::remove_file(&work).unwrap();
    fs::rename(&other, &work).unwrap();
    let e = f.share.grant(&plan).unwrap_err();
    assert!(
        e.to_string().contains("changed since it was planned"),
        "{e}"
    );
    // And the keeper still serves: a fresh plan of it binds.
    let fresh = f.plan(&work, "rw");
    f.share.grant(&fresh).unwrap();
    // A symlink in an ancestor is refused as well.
    let real = f.mkdir("real/deep");
    let link = f.dir.join("link");
    std::os::unix::fs::symlink(f.dir.join("real"), &link).unwrap();
    let mut through = f.plan(&real, "ro");
    through.host_path = link.join("deep");
    assert!(matches!(
        f.share.grant(&through),
        Err(ShareError::Keeper(_))
    ));
}

#[test]
fn nested_grants_stack_in_either_order_and_survive_their_parent() {
    let Some(f) = Fixture::start("nested") else {
        return;
    };
    let proj = f.mkdir("home/u/proj");
    let sub = f.mkdir("home/u/proj/sub");
    fs::write(sub.join("f"), "f").unwrap();

    // Child first, then the parent over it: the child stays visible, with
    // its own mode.
    let child = f.plan(&sub, "ro");
    let crel = f.share.grant(&child).unwrap();
    let parent = f.plan(&proj, "rw");
    let prel = f.share.grant(&parent).unwrap();
    assert_eq!(
        fs::read_to_string(f.in_keeper(&crel).join("f")).unwrap(),
        "f"
    );
    assert_eq!(write_err(&f.in_keeper(&crel).join("g")), Some(libc::EROFS));
    assert_eq!(write_err(&f.in_keeper(&prel).join("p")), None);
    let served = f.in_virtiofsd(&crel).unwrap();
    assert_eq!(fs::read_to_string(served.join("f")).unwrap(), "f");
    assert_eq!(write_err(&served.join("g")), Some(libc::EROFS));

    // The parent goes, the child stays.
    f.share.release(&proj, MountMode::ReadWrite).unwrap();
    assert_eq!(
        fs::read_to_string(f.in_keeper(&crel).join("f")).unwrap(),
        "f"
    );
    assert_eq!(write_err(&f.in_keeper(&crel).join("g")), Some(libc::EROFS));
    assert!(!f.in_keeper(&prel).join("p").exists());
    assert_eq!(fs::read_to_string(served.join("f")).unwrap(), "f");

    // Parent first, then a nested grant inside it.
    let prel = f.share.grant(&parent).unwrap();
    let other = f.mkdir("home/u/proj/other");
    let orel = f.share.grant(&f.plan(&other, "ro")).unwrap();
    assert_eq!(write_err(&f.in_keeper(&orel).join("x")), Some(libc::EROFS));
    assert_eq!(write_err(&f.in_keeper(&prel).join("y")), None);
    // The mountpoint was not created on the host by the keeper: it existed.
    f.share.release(&other, MountMode::ReadOnly).unwrap();
    assert!(other.is_dir(), "release must not remove host directories");
    f.share.release(&sub, MountMode::ReadOnly).unwrap();
    f.share.release(&proj, MountMode::ReadWrite).unwrap();
    assert!(sub.join("f").exists());
}

#[test]
fn the_returned_stream_is_connected_to_virtiofsd() {
    let Some(f) = Fixture::start("vhost") else {
        return;
    };
    use std::io::Read;
    use std::os::fd::AsFd;
    let mut stream =
        std::os::unix::net::UnixStream::from(f._vhost.as_fd().try_clone_to_owned().unwrap());
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // VHOST_USER_GET_FEATURES (1), version 1 flags, no payload.
    let mut req = Vec::new();
    req.extend_from_slice(&1u32.to_le_bytes());
    req.extend_from_slice(&1u32.to_le_bytes());
    req.extend_from_slice(&0u32.to_le_bytes());
    stream.write_all(&req).unwrap();
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).unwrap();
    let field = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().unwrap());
    assert_eq!(field(0), 1, "reply to GET_FEATURES");
    assert_eq!(field(4) & 0x4, 0x4, "reply flag");
    assert_eq!(field(8), 8);
    let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    // VHOST_USER_F_PROTOCOL_FEATURES (bit 30) and VIRTIO_F_VERSION_1 (32).
    assert_ne!(features & (1 << 30), 0, "{features:#x}");
    assert_ne!(features & (1 << 32), 0, "{features:#x}");
}

#[test]
fn virtiofsd_dying_ends_the_keeper_and_later_requests_fail_cleanly() {
    let Some(f) = Fixture::start("vfsd-dies") else {
        return;
    };
    let work = f.mkdir("home/u/work");
    // SAFETY: kill with the pid of a process this test started (the
    // keeper has not reaped it: it is still running).
    let killed = unsafe { libc::kill(f.share.virtiofsd_pid(), libc::SIGKILL) };
    assert_eq!(killed, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let keeper = f.share.keeper_pid();
    while fs::read_to_string(format!("/proc/{keeper}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2) != Some("Z"))
    {
        assert!(Instant::now() < deadline, "keeper still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = f.share.grant(&f.plan(&work, "rw")).unwrap_err();
    assert!(matches!(e, ShareError::KeeperGone), "{e}");
    // And it stays an error, without waiting for a reply that never comes.
    let e = f.share.grant(&f.plan(&work, "ro")).unwrap_err();
    assert!(matches!(e, ShareError::KeeperGone), "{e}");
}

#[test]
fn the_keeper_ends_with_its_share_and_takes_virtiofsd_along() {
    let Some(f) = Fixture::start("stop") else {
        return;
    };
    let keeper = f.share.keeper_pid();
    let vfsd = f.share.virtiofsd_pid();
    let server = virtiofsd_server(vfsd).expect("virtiofsd server");
    let Fixture {
        share, _cleanup, ..
    } = f;
    share.stop();
    let gone = |pid: i32| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(e) if e.kind() == ErrorKind::NotFound => return true,
                // A zombie counts as gone.
                Ok(s) if s.split_whitespace().nth(2) == Some("Z") => return true,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    };
    assert!(gone(keeper), "keeper {keeper} still running");
    assert!(gone(vfsd), "virtiofsd {vfsd} still running");
    assert!(gone(server), "virtiofsd server {server} still running");
    drop(_cleanup);
}
