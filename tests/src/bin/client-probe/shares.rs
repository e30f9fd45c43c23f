//! `client-probe --shares SOCKET BUNDLE_DIR HOST_DIR`: shared folders as the
//! client asks for them, and the escape attempts against them.
//!
//! The case script made, under HOST_DIR: `picked/hello.txt`, `outputs/`,
//! `claude/skills/s.md`, `lib/lib.txt`, `permreq/`, `permresp/`,
//! `uploads/`, `late/late.txt`, `canary.txt`, `small/` (a 32 MiB tmpfs), and
//! `sshlink` (a symlink to `$HOME/.ssh`); and `$HOME/.ssh/id_test`. Every
//! check prints `@@CLIENT pass|fail WHAT`; the guest's own observations
//! print as `@@CLIENT guest KEY=VALUE`.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::{ok, open_and_start, Probe};

/// A host path as the client sends it: relative to `/`.
pub fn rel(p: &Path) -> String {
    p.to_string_lossy().trim_start_matches('/').to_owned()
}

/// The `R key=value` lines a guest script printed.
pub fn results(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("R "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The session's attack and use script (perl, as the session's user).
/// `@M@` is the session's mount directory, `@HOSTDIR@` the host directory
/// (a path that does not exist in the guest).
const SESSION_SCRIPT: &str = r#"
use strict; use warnings; use POSIX ();
my $M = "@M@"; my $H = "@HOSTDIR@";
$| = 1;
sub R { print "R $_[0]=$_[1]\n"; }
sub e { "ERR" . ($! + 0) }
sub slurp { open(my $f, "<", $_[0]) or return e(); local $/; my $c = <$f>; $c = "" unless defined $c; chomp $c; $c }
sub tryw { my ($p, $d) = @_; open(my $f, ">", $p) or return e(); print $f $d; close($f) or return e(); "ok" }
sub ls { opendir(my $d, $_[0]) or return e(); join(",", sort grep { !/^\.\.?$/ } readdir($d)) }
R("uid", $<);
R("hello", slurp("$M/picked/hello.txt"));
R("out-write", tryw("$M/outputs/out.txt", "written-by-guest\n"));
R("owner-out", (stat("$M/outputs/out.txt"))[4] // "none");
R("owner-hello", (stat("$M/picked/hello.txt"))[4] // "none");
R("append-hello", do { open(my $f, ">>", "$M/picked/hello.txt") ? "ok" : e() });
R("skills", slurp("$M/.claude/skills/s.md"));
R("claude-lists-skills", ls("$M/.claude"));
R("ro-write", tryw("$M/.cowork-lib/lib.txt", "overwritten"));
R("ro-create", tryw("$M/.cowork-lib/new.txt", "x"));
R("ro-unlink", unlink("$M/.cowork-lib/lib.txt") ? "ok" : e());
R("perm-resp-ro", tryw("$M/.cowork-perm-resp/x", "x"));
R("perm-req-rw", tryw("$M/.cowork-perm-req/req.json", "{}"));
R("uploads-rw", tryw("$M/uploads/u.bin", "u"));
# A read-only grant reopened for writing through /proc/self/fd.
R("ro-proc-fd", do { open(my $f, "<", "$M/.cowork-lib/lib.txt") or return e();
    my $n = fileno($f); open(my $w, ">>", "/proc/self/fd/$n") ? "ok" : e() });
# `..` from a mount stays in the guest.
R("dotdot", slurp("$M/picked/../../../canary.txt"));
R("dotdot-host", slurp("$M/picked/../canary.txt"));
# Symlinks created in the share resolve in the guest, never on the host.
symlink("$H/canary.txt", "$M/picked/abs-link");
R("abs-symlink-read", slurp("$M/picked/abs-link"));
R("abs-symlink-write", tryw("$M/picked/abs-link", "pwned"));
symlink("../canary.txt", "$M/picked/rel-link");
R("rel-symlink-read", slurp("$M/picked/rel-link"));
R("rel-symlink-write", tryw("$M/picked/rel-link", "pwned"));
# Hard links out of the grant, and renames out of it.
R("hardlink-guest-file", link("/etc/hostname", "$M/picked/hl1") ? "ok" : e());
R("hardlink-other-grant", link("$M/.cowork-lib/lib.txt", "$M/picked/hl2") ? "ok" : e());
mkdir("$M/picked/movedir");
R("rename-out", rename("$M/picked/movedir", "/sessions/@NAME@/moved") ? "ok" : e());
R("rename-into-ro", rename("$M/picked/hello.txt", "$M/.cowork-lib/hello.txt") ? "ok" : e());
# Devices, setuid, capabilities, xattrs, handles, ownership.
my $devpath = "$M/picked/dev";
R("mknod", syscall(133, $devpath, 0020666, 259) == 0 ? "ok" : e());
R("mkfifo", POSIX::mkfifo("$M/picked/fifo", 0600) ? "ok" : e());
system("cp", "/bin/true", "$M/picked/suid");
R("chmod-suid", chmod(04755, "$M/picked/suid") ? "ok" : e());
# syscall() needs writable scalars, not literals.
my ($hello, $suid, $tname, $tval, $cname) = ("$M/picked/hello.txt", "$M/picked/suid", "trusted.evil", "v", "security.capability");
my $cval = pack("VVVVV", 0x02000001, 0xffffffff, 0, 0, 0);
R("trusted-xattr", syscall(188, $hello, $tname, $tval, 1, 0) == 0 ? "ok" : e());
R("security-capability", syscall(188, $suid, $cname, $cval, 20, 0) == 0 ? "ok" : e());
my $handle = pack("LLx64", 64, 1);
R("open-by-handle", syscall(304, -100, $handle, 0) >= 0 ? "ok" : e());
R("chown-root", chown(0, 0, "$M/picked/hello.txt") ? "ok" : e());
# The credential stores inside the home grant stay hidden and read-only.
R("home-lists", -d "$M/home" ? "dir" : "missing");
R("home-ssh", ls("$M/home/.ssh"));
R("home-ssh-key", slurp("$M/home/.ssh/id_test"));
R("home-ssh-write", tryw("$M/home/.ssh/authorized_keys", "ssh-ed25519 AAAA evil"));
my $sshpath = "$M/home/.ssh";
R("home-ssh-umount", syscall(166, $sshpath, 2) == 0 ? "ok" : e());
R("home-aws-create", tryw("$M/home/.aws/credentials", "[default]"));
R("home-aws-mkdir", mkdir("$M/home/.aws/sub") ? "ok" : e());
R("home-ssh-rename", rename("$M/home/.ssh", "$M/home/ssh-moved") ? "ok" : e());
# Guest mounts: no session may mount, and the share's root is not visible.
my ($msrc, $mdst, $mtype) = ("none", "$M/picked", "tmpfs");
R("mount", syscall(165, $msrc, $mdst, $mtype, 0, 0) == 0 ? "ok" : e());
R("share-root", -e "/mnt/.virtiofs-root" ? "visible" : "absent");
# A 10,000-deep directory in a rw grant.
# Bounded by time too: under TCG every level costs a few round trips.
{ my $n = 0; my $t0 = time; chdir("$M/picked") or die; mkdir("deep"); chdir("deep");
  for (1 .. 10000) { mkdir("d") or last; chdir("d") or last; $n++; last if time - $t0 > 45 }
  R("deep", $n); R("deep-stop", $! + 0); chdir("/"); }
# Filling a small host filesystem through a rw grant stops at its size.
{ open(my $f, ">", "$M/small/fill") or R("fill", e());
  my $buf = "x" x 1048576; my $w = 0; my $err = "none";
  for (1 .. 64) { my $r = syswrite($f, $buf); if (!defined $r) { $err = e(); last } $w += $r }
  R("fill", $err); R("fill-mib", int($w / 1048576)); close($f); unlink("$M/small/fill"); }
# A symlink swapped in for a directory while another process opens through it.
{ mkdir("$M/picked/race-dir"); open(my $f, ">", "$M/picked/race-dir/f"); print $f "inside\n"; close($f);
  mkdir("$H") ; # does not exist in the guest; creating it here is harmless
  my $pid = fork();
  if ($pid == 0) { for (1 .. 400) { rename("$M/picked/race-dir", "$M/picked/race-tmp");
      symlink("$H", "$M/picked/race-dir"); unlink("$M/picked/race-dir"); rename("$M/picked/race-tmp", "$M/picked/race-dir"); } exit 0 }
  my $leak = 0; for (1 .. 400) { my $c = slurp("$M/picked/race-dir/../../canary.txt"); $leak++ if $c =~ /canary-host/;
      $c = slurp("$M/picked/race-dir/f"); $leak++ if $c =~ /canary-host/ }
  waitpid($pid, 0); R("race-leaks", $leak); }
R("done", "yes");
"#;

/// What another session sees.
const OTHER_SCRIPT: &str = r#"
use strict; $| = 1;
sub R { print "R $_[0]=$_[1]\n"; }
sub ls { opendir(my $d, $_[0]) or return "ERR" . ($! + 0); join(",", sort grep { !/^\.\.?$/ } readdir($d)) }
R("other-sees-main", -e "/sessions/main" ? "yes" : "no");
R("other-mnt", ls("/sessions/other/mnt"));
R("other-share-root", -e "/mnt/.virtiofs-root" ? "visible" : "absent");
R("done", "yes");
"#;

/// The share keeper's staging directory as its mount namespace sees it
/// (`/proc/<pid>/root/<staging>`), found by its command line.
fn keeper_staging() -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if pid.parse::<u32>().is_err() {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.iter().any(|a| a == "share-keeper") {
            continue;
        }
        let staging = args
            .iter()
            .position(|a| a == "--staging")
            .and_then(|i| args.get(i + 1))?;
        return Some(format!("/proc/{pid}/root{staging}").into());
    }
    None
}

pub fn shares(socket: &str, bundle: &str, host_dir: &str) {
    let mut p = Probe { failed: false };
    let long = Duration::from_secs(240);
    let short = Duration::from_secs(90);
    let t = Path::new(host_dir);
    let home = std::env::var("HOME").expect("HOME");
    let home = Path::new(&home);
    let (mut pipe, ev) = open_and_start(&mut p, socket, bundle, long);

    // The seven standard mounts, a picked folder, the home directory, and
    // mounts that must fail.
    let m = |path: String, mode: &str| json!({"path": path, "mode": mode});
    let mounts = json!({
        "outputs": m(rel(&t.join("outputs")), "rw"),
        ".claude": m(rel(&t.join("claude")), "rw"),
        ".claude/skills": m(rel(&t.join("claude/skills")), "ro"),
        ".cowork-lib": m(rel(&t.join("lib")), "ro"),
        ".cowork-perm-req": m(rel(&t.join("permreq")), "rw"),
        ".cowork-perm-resp": m(rel(&t.join("permresp")), "ro"),
        "uploads": m(rel(&t.join("uploads")), "rw"),
        "picked": m(rel(&t.join("picked")), "rwd"),
        "small": m(rel(&t.join("small")), "rw"),
        "home": m(String::new(), "rw"),
        "missing": m(rel(&t.join("nope")), "rw"),
        "sshlink": m(rel(&t.join("sshlink")), "ro"),
        "ssh": m(rel(&home.join(".ssh")), "ro"),
        "dotdot": m(format!("{}/../..", rel(&t.join("picked"))), "ro"),
        "absolute": m("/etc".into(), "ro"),
        "nul": m("tmp\u{0}x".into(), "ro"),
        "badmode": m(rel(&t.join("uploads")), "rwx"),
        "../escape": m(rel(&t.join("uploads")), "ro"),
        "/abs-name": m(rel(&t.join("uploads")), "ro"),
    });
    let must_fail = [
        "missing",
        "sshlink",
        "ssh",
        "dotdot",
        "absolute",
        "nul",
        "badmode",
        "../escape",
        "/abs-name",
    ];
    let script = SESSION_SCRIPT
        .replace("@M@", "/sessions/main/mnt")
        .replace("@HOSTDIR@", host_dir)
        .replace("@NAME@", "main");
    let r = pipe.call(
        "spawn",
        json!({"id": "s1", "name": "main", "command": "perl", "args": ["-e", script],
               "additionalMounts": mounts}),
    );
    p.check("spawn with the standard mounts", ok(&r), &r);
    let failed: Vec<String> = r["result"]["failedMounts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    println!("@@CLIENT mounts-that-failed {failed:?}");
    for name in must_fail {
        p.check(
            &format!("mount {name:?} comes back in failedMounts"),
            failed.iter().any(|f| f == name),
            format!("{failed:?}"),
        );
    }
    for name in ["outputs", ".claude", ".claude/skills", "picked", "home"] {
        p.check(
            &format!("mount {name:?} is made"),
            !failed.iter().any(|f| f == name),
            format!("{failed:?}"),
        );
    }
    let exit = ev.exit_of("s1", Duration::from_secs(600));
    let out = ev.stdout("s1");
    for l in out.lines() {
        println!("@@CLIENT guest {l}");
    }
    p.check(
        "the session's script ran to its end",
        exit.is_some() && out.contains("R done=yes"),
        format!("{exit:?}"),
    );
    let g = results(&out);
    let get = |k: &str| g.get(k).cloned().unwrap_or_else(|| "(none)".into());
    let uid = get("uid");
    let expect = |p: &mut Probe, what: &str, key: &str, want: &dyn Fn(&str) -> bool| {
        let v = get(key);
        p.check(what, want(&v), format!("{key}={v}"));
    };
    let errno = |n: i32| move |v: &str| v == format!("ERR{n}");
    let denied = |v: &str| v.starts_with("ERR");
    expect(
        &mut p,
        "the session reads a host file in the picked folder",
        "hello",
        &|v| v == "hello-from-host",
    );
    expect(
        &mut p,
        "the session writes into outputs",
        "out-write",
        &|v| v == "ok",
    );
    expect(
        &mut p,
        "nested .claude/skills is seen inside .claude",
        "skills",
        &|v| v == "skill",
    );
    expect(
        &mut p,
        "a ro mount refuses writes with EROFS",
        "ro-write",
        &errno(30),
    );
    expect(
        &mut p,
        "a ro mount refuses creation",
        "ro-create",
        &errno(30),
    );
    expect(&mut p, "a ro mount refuses unlink", "ro-unlink", &errno(30));
    expect(
        &mut p,
        ".cowork-perm-resp is read-only",
        "perm-resp-ro",
        &errno(30),
    );
    expect(
        &mut p,
        ".cowork-perm-req is writable",
        "perm-req-rw",
        &|v| v == "ok",
    );
    expect(&mut p, "uploads is writable", "uploads-rw", &|v| v == "ok");
    expect(
        &mut p,
        "a ro grant cannot be reopened rw via /proc/self/fd",
        "ro-proc-fd",
        &errno(30),
    );
    expect(
        &mut p,
        "the session owns what it created (guest view)",
        "owner-out",
        &|v| v == uid,
    );
    expect(
        &mut p,
        "host-user files belong to the session in the guest",
        "owner-hello",
        &|v| v == uid,
    );
    expect(
        &mut p,
        "`..` from a mount does not reach the host",
        "dotdot",
        &denied,
    );
    expect(
        &mut p,
        "`..` above a mount does not reach the host dir",
        "dotdot-host",
        &denied,
    );
    for k in [
        "abs-symlink-read",
        "abs-symlink-write",
        "rel-symlink-read",
        "rel-symlink-write",
    ] {
        expect(
            &mut p,
            &format!("{k}: a symlink resolves in the guest only"),
            k,
            &|v| v != "canary-host" && v != "ok",
        );
    }
    expect(
        &mut p,
        "a hard link to a guest file across the mount fails",
        "hardlink-guest-file",
        &errno(18),
    );
    expect(
        &mut p,
        "a hard link across grants fails",
        "hardlink-other-grant",
        &errno(18),
    );
    expect(
        &mut p,
        "renaming a directory out of the grant fails",
        "rename-out",
        &errno(18),
    );
    expect(
        &mut p,
        "renaming into a ro grant fails",
        "rename-into-ro",
        &denied,
    );
    expect(&mut p, "mknod of a device fails", "mknod", &denied);
    expect(
        &mut p,
        "trusted.* xattrs are refused",
        "trusted-xattr",
        &denied,
    );
    expect(
        &mut p,
        "security.capability is refused",
        "security-capability",
        &denied,
    );
    expect(
        &mut p,
        "open_by_handle_at is refused",
        "open-by-handle",
        &denied,
    );
    expect(&mut p, "chown to root is refused", "chown-root", &denied);
    expect(&mut p, "a home grant is made", "home-lists", &|v| {
        v == "dir"
    });
    expect(
        &mut p,
        "~/.ssh inside a home grant is empty",
        "home-ssh",
        &|v| v.is_empty(),
    );
    expect(
        &mut p,
        "the hidden key cannot be read",
        "home-ssh-key",
        &denied,
    );
    expect(
        &mut p,
        "~/.ssh cannot be written through a rw home grant",
        "home-ssh-write",
        &denied,
    );
    expect(
        &mut p,
        "the cover over ~/.ssh cannot be unmounted",
        "home-ssh-umount",
        &denied,
    );
    expect(
        &mut p,
        "an absent ~/.aws cannot be created through a rw home grant",
        "home-aws-create",
        &denied,
    );
    expect(&mut p, "nor a directory in it", "home-aws-mkdir", &denied);
    expect(
        &mut p,
        "the cover over ~/.ssh cannot be renamed away",
        "home-ssh-rename",
        &denied,
    );
    expect(&mut p, "a session cannot mount", "mount", &errno(1));
    expect(
        &mut p,
        "the share's root is not visible to a session",
        "share-root",
        &|v| v == "absent",
    );
    expect(
        &mut p,
        "a 10,000-deep directory is created or bounded",
        "deep",
        &|v| v.parse::<u32>().is_ok(),
    );
    expect(
        &mut p,
        "filling a small host filesystem ends with ENOSPC",
        "fill",
        &errno(28),
    );
    expect(
        &mut p,
        "no symlink swap reaches the host canary",
        "race-leaks",
        &|v| v == "0",
    );

    // The host's side of it.
    let host_read = |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| format!("({e})"));
    let out_file = t.join("outputs/out.txt");
    p.check(
        "the host sees the bytes the session wrote",
        host_read(&out_file) == "written-by-guest\n",
        host_read(&out_file),
    );
    let me = unsafe_geteuid();
    let owner = std::fs::metadata(&out_file).map(|m| m.uid()).ok();
    p.check(
        "the file is owned by the host user on the host",
        owner == Some(me),
        format!("{owner:?} vs {me}"),
    );
    let suid = std::fs::metadata(t.join("picked/suid")).ok();
    p.check(
        "a setuid file made in the share belongs to the host user (no privilege)",
        suid.as_ref().is_none_or(|m| m.uid() == me),
        format!("{:?}", suid.map(|m| (m.uid(), m.mode()))),
    );
    p.check(
        "the ro grant's file is unchanged on the host",
        host_read(&t.join("lib/lib.txt")) == "lib-original\n",
        host_read(&t.join("lib/lib.txt")),
    );
    p.check(
        "the host canary is unchanged",
        host_read(&t.join("canary.txt")) == "canary-host\n",
        host_read(&t.join("canary.txt")),
    );
    p.check(
        "~/.ssh on the host is unchanged",
        !home.join(".ssh/authorized_keys").exists()
            && host_read(&home.join(".ssh/id_test")) == "secret-key\n",
        "changed",
    );
    p.check(
        "nothing was created in ~/.aws on the host",
        !home.join(".aws/credentials").exists() && !home.join(".aws/sub").exists(),
        "created",
    );
    p.check(
        "the small filesystem is not full after the session",
        !t.join("small/fill").exists(),
        "left behind",
    );

    // A second session sees none of the first one's mounts.
    let r = pipe.call(
        "spawn",
        json!({"id": "o1", "name": "other", "command": "perl", "args": ["-e", OTHER_SCRIPT]}),
    );
    p.check("spawn a second session", ok(&r), &r);
    let _ = ev.exit_of("o1", short);
    let out = ev.stdout("o1");
    let o = results(&out);
    p.check(
        "a second session does not see the first",
        o.get("other-sees-main").is_some_and(|v| v == "no")
            && o.get("other-mnt")
                .is_some_and(|v| v.is_empty() || v.starts_with("ERR"))
            && o.get("other-share-root").is_some_and(|v| v == "absent"),
        &out,
    );

    // mountPath adds a folder to a running session.
    let waiter = "for i in $(seq 1 240); do if [ -f /sessions/main/mnt/late/late.txt ]; then \
                  echo late=$(cat /sessions/main/mnt/late/late.txt); exit 0; fi; sleep 0.5; done; \
                  echo late=missing";
    let r = pipe.call(
        "spawn",
        json!({"id": "w1", "name": "main", "command": "sh", "args": ["-c", waiter],
               "additionalMounts": {"picked": m(rel(&t.join("picked")), "rwd")}}),
    );
    p.check("spawn a waiting process", ok(&r), &r);
    std::thread::sleep(Duration::from_secs(2));
    let staged = keeper_staging();
    let picked_staged = staged.as_ref().map(|s| {
        s.join("shared")
            .join(rel(&t.join("picked")))
            .join("hello.txt")
    });
    p.check(
        "while the session runs, its grant is in the staging directory",
        picked_staged.as_ref().is_some_and(|p| p.exists()),
        format!("{picked_staged:?}"),
    );
    let r = pipe.call(
        "mountPath",
        json!({"processId": "w1", "subpath": rel(&t.join("late")), "mountName": "late", "mode": "ro"}),
    );
    p.check("mountPath", ok(&r), &r);
    let exit = ev.exit_of("w1", Duration::from_secs(150));
    p.check(
        "mountPath's folder appears in the running session",
        exit.is_some() && ev.stdout("w1").contains("late=late-file"),
        ev.stdout("w1"),
    );
    // The session has no process left: its grants leave the staging tree.
    let mut gone = false;
    for _ in 0..40 {
        if picked_staged.as_ref().is_some_and(|p| !p.exists()) {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    p.check(
        "after the session ends its grant is gone from the staging directory",
        gone,
        format!("{picked_staged:?}"),
    );
    let r = pipe.call("stopVM", json!({}));
    p.check("stopVM", ok(&r), &r);
    std::process::exit(i32::from(p.failed));
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
