//! The sandbox for real: the agent's spawn path (session user, bwrap
//! arguments, kill, exit reporting) run on this machine's bubblewrap, with
//! a temporary directory as the session disk. Needs root (to become the
//! session user), `/usr/bin/bwrap`, perl and a cgroup2 hierarchy; fails
//! without them, or with `SKIP_VM=1` skips (`coworkvm_tests::skip_or_fail`).

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use serde_json::{json, Value};
use socket_proto::frame::read_frame;
use socket_proto::guest::{GuestEvent, GuestFrame};
use socket_proto::host::SpawnParams;

use crate::agent::{Agent, RequestError, Sandbox, WithoutSandbox};
use crate::cgroup::{is_cgroup2, SessionCgroups};
use crate::conn::Sender;
use crate::egress::{self, Egress};
use crate::procs::Procs;
use crate::sandbox::{scan_system, BWRAP};
use crate::sessions::Sessions;

fn available() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let have = Path::new(BWRAP).is_file();
    if root && have {
        return true;
    }
    let why = if have {
        "not root"
    } else {
        "no /usr/bin/bwrap (apt-get install bubblewrap)"
    };
    coworkvm_tests::skip_or_fail(format!("the bwrap sandbox test: {why}"));
    false
}

struct Rig {
    agent: Agent,
    events: Receiver<GuestEvent>,
    /// The session each egress open line named, in order.
    egress_sessions: Receiver<String>,
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
}

#[derive(Default, Debug)]
struct Outcome {
    stdout: String,
    stderr: String,
    code: Option<i32>,
    signal: Option<Value>,
}

impl Rig {
    fn with_cgroups(cgroups: Option<SessionCgroups>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The session user must be able to reach its directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path().join("sessions");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        let sessions = Sessions::open(&root, &dir.path().join("etc")).unwrap();
        let root = sessions.root().to_owned();
        // In the guest the agent is PID 1 and inherits bwrap's orphaned
        // pid-namespace init (the outer bwrap exits without waiting for
        // it); here this process stands in as their subreaper.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let procs = Procs::default();
        let (ours, theirs) = UnixStream::pair().unwrap();
        procs.set_sender(Some(Sender::new(std::fs::File::from(
            std::os::fd::OwnedFd::from(theirs),
        ))));
        let reaper = procs.clone();
        std::thread::spawn(move || reaper.reap_forever());
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(ours);
            while let Ok(Some(obj)) = read_frame(&mut r) {
                if let Ok(Some(GuestFrame::Event { event, params })) = GuestFrame::parse(obj) {
                    if let Ok(ev) = GuestEvent::parse(&event, params) {
                        let _ = tx.send(ev);
                    }
                }
            }
        });
        let sandbox = Sandbox::new(BWRAP.into(), scan_system(Path::new("/")), cgroups).unwrap();
        // As in the guest: each session in its own network namespace with
        // its proxies, relayed to a fake host.
        let (dialer, egress_sessions) = fake_egress_host();
        let agent = Agent::new(
            procs,
            root.clone(),
            Some(sessions),
            Some(sandbox),
            WithoutSandbox::Refuse("unused: the sandbox is there".into()),
        )
        .with_egress(Egress::per_session(dialer, egress::Bounds::default()));
        Rig {
            agent,
            events,
            egress_sessions,
            _dir: dir,
            root,
        }
    }

    fn spawn(
        &mut self,
        id: &str,
        name: &str,
        script: &str,
        cwd: Option<&str>,
    ) -> Result<Value, String> {
        let p: SpawnParams = serde_json::from_value(json!({
            "id": id, "name": name, "command": "sh", "args": ["-c", script],
            "isResume": false, "cwd": cwd,
        }))
        .unwrap();
        self.agent.spawn(&p).map_err(|e| e.to_string())
    }

    /// Events until `id` exits.
    fn wait(&mut self, id: &str, seen: &mut HashMap<String, Outcome>) -> Outcome {
        loop {
            if seen
                .get(id)
                .is_some_and(|o| o.code.is_some() || o.signal.is_some())
            {
                return seen.remove(id).unwrap();
            }
            let ev = self
                .events
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no exit of {id}; so far {seen:?}"));
            match ev {
                GuestEvent::Stdout { id, data } => {
                    seen.entry(id).or_default().stdout.push_str(&data)
                }
                GuestEvent::Stderr { id, data } => {
                    seen.entry(id).or_default().stderr.push_str(&data)
                }
                GuestEvent::Exit {
                    id, code, signal, ..
                } => {
                    let o = seen.entry(id).or_default();
                    o.code = code;
                    o.signal = signal.filter(|s| !s.is_null());
                    if o.code.is_none() && o.signal.is_none() {
                        o.code = Some(-1000);
                    }
                }
                _ => {}
            }
        }
    }

    fn run(&mut self, name: &str, script: &str) -> Outcome {
        let id = format!("run-{}", rand_id());
        self.spawn(&id, name, script, None).unwrap();
        let mut seen = HashMap::new();
        self.wait(&id, &mut seen)
    }

    /// Waits for the first stdout of `id`.
    fn first_stdout(&mut self, id: &str, seen: &mut HashMap<String, Outcome>) {
        while seen.get(id).is_none_or(|o| o.stdout.is_empty()) {
            match self
                .events
                .recv_timeout(Duration::from_secs(30))
                .expect("output")
            {
                GuestEvent::Stdout { id, data } => {
                    seen.entry(id).or_default().stdout.push_str(&data)
                }
                GuestEvent::Stderr { id, data } => {
                    seen.entry(id).or_default().stderr.push_str(&data)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// A host that refuses every stream: `blocked-by-allowlist` for session
/// beta, `dns-failure` for the others; each open line's session is sent
/// on the receiver.
fn fake_egress_host() -> (egress::Dialer, Receiver<String>) {
    use socket_proto::egress::{
        decode_line, encode_line, EgressOpen, EgressRefusal, EgressReply, MAX_OPEN_LINE,
    };
    use std::io::{Read, Write};
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let dialer: egress::Dialer = std::sync::Arc::new(move || {
        let (agent, mut host) = UnixStream::pair().expect("socketpair");
        let tx = crate::lock(&tx).clone();
        std::thread::spawn(move || {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while b[0] != b'\n' && host.read_exact(&mut b).is_ok() {
                line.push(b[0]);
            }
            let Ok(open) = decode_line::<EgressOpen>(&line, MAX_OPEN_LINE) else {
                return;
            };
            let session = open.session.unwrap_or_default();
            let why = if session == "beta" {
                EgressRefusal::BlockedByAllowlist
            } else {
                EgressRefusal::DnsFailure
            };
            let _ = tx.send(session);
            let _ = host.write_all(&encode_line(&EgressReply::refused(why, "test")));
        });
        Ok(agent.into())
    });
    (dialer, rx)
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn uid_processes(uid: u32) -> usize {
    uid_pids(uid).len()
}

/// The processes whose real uid is `uid`.
fn uid_pids(uid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(e.path().join("status")) {
            if s.lines().any(|l| {
                l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string())
            }) {
                v.push(pid);
            }
        }
    }
    v
}

/// The interpreter the probes need, or why the test cannot run.
fn have_perl() -> bool {
    if Path::new("/usr/bin/perl").is_file() {
        return true;
    }
    coworkvm_tests::skip_or_fail("the sandbox probes need /usr/bin/perl");
    false
}

/// A cgroup2 hierarchy of this host that root can make groups in: the
/// unified one, or the hybrid layout's `unified`.
fn host_cgroup2() -> Option<std::path::PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(Path::new)
        .find(|p| is_cgroup2(p))
        .map(Path::to_owned)
}

/// What the probes print inside a sandbox.
const PROBES: &str = r#"
perl -e 'socket(my $s, 40, 1, 0) ? print "vsock=open\n" : print "vsock=denied $!\n"'
perl -e 'socket(my $s, 17, 3, 0) ? print "packet=open\n" : print "packet=denied $!\n"'
perl -e 'use Socket; socket(my $srv, AF_INET, SOCK_STREAM, 0) or die "socket: $!";
  bind($srv, pack_sockaddr_in(0, inet_aton("127.0.0.1"))) or die "bind: $!"; listen($srv, 1);
  my ($port) = unpack_sockaddr_in(getsockname($srv));
  socket(my $c, AF_INET, SOCK_STREAM, 0) or die "socket: $!";
  connect($c, pack_sockaddr_in($port, inet_aton("127.0.0.1"))) ? print "inet=ok\n" : print "inet=$!\n"'
perl -e 'use Socket; socketpair(my $a, my $b, AF_UNIX, SOCK_STREAM, 0) ? print "unix=ok\n" : print "unix=$!\n"'
grep '^Seccomp:' /proc/self/status
echo "init-$(grep '^Seccomp:' /proc/1/status)"
echo "me=$(id -un)"
echo "--passwd"; cat /etc/passwd; echo "--group"; cat /etc/group; echo "--end"
getent passwd cowork1003 >/dev/null && echo "getent-gamma=yes" || echo "getent-gamma=no"
getent passwd cowork1004 >/dev/null && echo "getent-delta=yes" || echo "getent-delta=no"
touch /etc/passwd 2>/dev/null && echo "passwd-write=yes" || echo "passwd-write=no"
"#;

/// The lines of `out` between `--from` and `--to`.
fn section<'a>(out: &'a str, from: &str, to: &str) -> Vec<&'a str> {
    out.lines()
        .skip_while(|l| *l != from)
        .skip(1)
        .take_while(|l| *l != to)
        .collect()
}

/// The sandbox tests, in one: every rig's reaper waits for any child of
/// this process (as PID 1 does in the guest), so two rigs, at once or one
/// after the other, would take each other's exits.
#[test]
fn sessions_run_in_bwrap() {
    if !available() {
        return;
    }
    // The shared-folder part mounts: in a private mount namespace of this
    // thread, made before the rig so that its threads and children share
    // it (the session trees live there, and the reaper detaches them).
    let private_mounts = private_mount_namespace();
    // A test group in this host's cgroup2 hierarchy (no controllers needed:
    // the test checks the move into the group, not the limits).
    let cg_base = host_cgroup2().map(|b| b.join(format!("coworkvm-it-{}", std::process::id())));
    let cgroups = cg_base.as_ref().and_then(|b| {
        std::fs::create_dir(b)
            .and_then(|_| SessionCgroups::without_limits(b).map_err(std::io::Error::other))
            .map_err(|e| {
                // Gone before a strict run fails here, so no group is left behind.
                let _ = std::fs::remove_dir(b);
                coworkvm_tests::skip_or_fail(format!("cgroup part: {}: {e}", b.display()))
            })
            .ok()
    });
    if cg_base.is_none() {
        coworkvm_tests::skip_or_fail("cgroup part: this host has no cgroup2 hierarchy");
    }
    let cg_base = cg_base.filter(|_| cgroups.is_some());
    let mut rig = Rig::with_cgroups(cgroups);
    own_users_signals_and_janitor(&mut rig);
    if have_perl() {
        filtered_with_own_accounts_in_their_cgroup(&mut rig, cg_base.as_deref());
    }
    sessions_reach_their_own_proxies(&mut rig);
    match private_mounts {
        Ok(()) => shared_folders(rig),
        Err(e) => coworkvm_tests::skip_or_fail(format!(
            "shared-folder part: no private mount namespace: {e}"
        )),
    }
    // Leave no groups behind on the host.
    if let Some(base) = cg_base {
        for _ in 0..50 {
            for uid in crate::sessions::FIRST_UID..crate::sessions::FIRST_UID + 4 {
                let _ = std::fs::remove_dir(base.join(format!("sessions/cowork{uid}")));
            }
            let _ = std::fs::remove_dir(base.join("sessions"));
            if std::fs::remove_dir(&base).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Identity, namespaces, the view of the disk, cwd, stdin, signals, the
/// janitor: sessions alpha and beta (the first two uids).
fn own_users_signals_and_janitor(rig: &mut Rig) {
    // Identity, pid namespace, privileges, network, the view of the disk.
    let o = rig.run(
        "alpha",
        r#"echo "pid=$$"; echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
           echo "procs=$(ls /proc | grep -c '^[0-9]')"
           grep -E '^(NoNewPrivs|CapEff|CapBnd):' /proc/self/status
           echo "netdevs=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ,)"
           echo "home=$HOME pwd=$(pwd)"
           echo "sessions=$(ls -A /sessions 2>&1 | tr '\n' ,) $(ls -A "$(dirname "$HOME")" | tr '\n' ,)"
           echo hi > "$HOME/written" && echo "home-write=ok"
           touch /usr/x 2>/dev/null && echo "usr-write=yes" || echo "usr-write=no"
           touch /etc/x 2>/dev/null && echo "etc-write=yes" || echo "etc-write=no"
           touch /tmp/x && echo "tmp-write=ok"
           exit 7"#,
    );
    let out = &o.stdout;
    assert_eq!(o.code, Some(7), "the inner command's exit code: {o:?}");
    let uid = crate::sessions::FIRST_UID;
    assert!(out.contains("pid=2\n"), "own pid namespace: {o:?}");
    assert!(
        out.contains(&format!("uid={uid} gid={uid} groups={uid}\n")),
        "{o:?}"
    );
    let procs: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(procs <= 6, "few processes in the namespace: {o:?}");
    assert!(out.contains("NoNewPrivs:\t1"), "{o:?}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{o:?}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{o:?}");
    assert!(out.contains("netdevs=lo,\n"), "only loopback: {o:?}");
    let home = rig.root.join("alpha");
    assert!(
        out.contains(&format!("home={0} pwd={0}\n", home.display())),
        "{o:?}"
    );
    assert!(out.contains("home-write=ok"), "{o:?}");
    assert!(out.contains("usr-write=no"), "{o:?}");
    assert!(out.contains("etc-write=no"), "{o:?}");
    assert!(out.contains("tmp-write=ok"), "{o:?}");
    // Only its own directory of the session disk.
    assert!(out.contains("alpha,\n") || out.contains(" alpha,"), "{o:?}");
    assert!(!out.contains(".coworkvm"), "{o:?}");
    assert_eq!(
        std::fs::read_to_string(home.join("written")).unwrap(),
        "hi\n"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(home.join("written")).unwrap().uid(), uid);

    // A second session: the next uid, and the first one's home is not there.
    let o = rig.run(
        "beta",
        &format!(
            "id -u; cat {}/written 2>&1 || echo unreachable",
            home.display()
        ),
    );
    assert!(o.stdout.starts_with(&format!("{}\n", uid + 1)), "{o:?}");
    assert!(o.stdout.contains("unreachable"), "{o:?}");
    assert_eq!(o.code, Some(0));

    // cwd: inside works (and is made), outside is refused.
    let sub = home.join("work/deep");
    let id = "cwd";
    rig.spawn(id, "alpha", "pwd", Some(sub.to_str().unwrap()))
        .unwrap();
    let o = rig.wait(id, &mut HashMap::new());
    assert_eq!(o.stdout.trim(), sub.to_str().unwrap());
    for bad in ["/etc", "/", "../beta"] {
        let e = rig.spawn("bad-cwd", "alpha", "pwd", Some(bad)).unwrap_err();
        assert!(e.contains("outside the session"), "{bad}: {e}");
    }
    assert!(rig.spawn("x", "../etc", "true", None).is_err());

    // stdin reaches the command through bwrap.
    rig.spawn("cat", "alpha", "cat; echo done", None).unwrap();
    rig.agent.procs.stdin("cat", "hello\n", true).unwrap();
    let o = rig.wait("cat", &mut HashMap::new());
    assert_eq!(o.stdout, "hello\ndone\n");
    assert_eq!(o.code, Some(0));

    // A handled SIGTERM is just that: the command handles it and exits.
    let mut seen = HashMap::new();
    rig.spawn(
        "trap",
        "alpha",
        "trap 'echo caught; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
        None,
    )
    .unwrap();
    rig.first_stdout("trap", &mut seen);
    // bwrap reports the sandbox's group on its info pipe; give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    rig.agent
        .procs
        .kill(
            "trap",
            Some(&socket_proto::host::Signal::Name("SIGTERM".into())),
        )
        .unwrap();
    let o = rig.wait("trap", &mut seen);
    assert_eq!(o.stdout, "ready\ncaught\n", "{o:?}");
    assert_eq!(o.code, Some(3), "{o:?}");

    // An unhandled one ends it, reported as the signal; kill reaches the
    // whole tree, background children included.
    rig.spawn(
        "tree",
        "alpha",
        "sleep 1000 & sleep 1000 & echo started; wait",
        None,
    )
    .unwrap();
    rig.first_stdout("tree", &mut seen);
    std::thread::sleep(Duration::from_millis(200));
    assert!(uid_processes(uid) >= 3, "the tree runs as the session user");
    rig.agent
        .procs
        .kill(
            "tree",
            Some(&socket_proto::host::Signal::Name("SIGKILL".into())),
        )
        .unwrap();
    let o = rig.wait("tree", &mut seen);
    assert_eq!(o.signal, Some(json!("SIGKILL")), "{o:?}");
    assert_eq!(o.code, None, "{o:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(uid_processes(uid), 0, "nothing of the session is left");
    assert!(!rig.agent.procs.running_sessions().contains("alpha"));

    // A session with a running process is not deleted; an idle one is.
    rig.spawn("busy", "beta", "echo up; sleep 1000", None)
        .unwrap();
    rig.first_stdout("busy", &mut seen);
    let r = rig
        .agent
        .delete_sessions(&["alpha".into(), "beta".into()])
        .unwrap();
    assert_eq!(r["deleted"], json!(["alpha"]), "{r}");
    assert!(
        r["errors"]["beta"].as_str().unwrap().contains("running"),
        "{r}"
    );
    assert!(!home.exists());
    assert!(rig.root.join("beta").exists());
    rig.agent.procs.kill("busy", None).unwrap();
    let o = rig.wait("busy", &mut seen);
    assert_eq!(o.signal, Some(json!("SIGTERM")), "{o:?}");

    // A command that is not there is an error, as outside the sandbox.
    let p: SpawnParams = serde_json::from_value(json!({
        "id": "nope", "name": "beta", "command": "no-such-command-xyz", "isResume": false,
    }))
    .unwrap();
    let e = rig.agent.spawn(&p).unwrap_err();
    assert!(matches!(e, RequestError::NotFound { .. }), "{e}");
}

/// Issue 14 on the session side: every spawn of a session is in the
/// session's network namespace (one per session, shared by its spawns),
/// which has loopback and the two proxies listening; a session's request
/// reaches the host tagged with its own name, and the refusal comes back
/// as the HTTP proxy's 403 with `X-Proxy-Error`.
fn sessions_reach_their_own_proxies(rig: &mut Rig) {
    let script = r#"echo "ns=$(readlink /proc/self/ns/net)"
        echo "listen=$(awk '$4 == "0A" {print $2}' /proc/net/tcp | sort | tr '\n' ,)"
        echo "netdevs=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ,)"
        bash -c 'exec 3<>/dev/tcp/127.0.0.1/3128 || exit 1
          printf "CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n" >&3
          tr -d "\r" <&3'"#;
    let ns = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("ns="))
            .unwrap_or_default()
            .to_owned()
    };
    let beta = rig.run("beta", script);
    assert_eq!(beta.code, Some(0), "{beta:?}");
    let out = &beta.stdout;
    assert!(out.starts_with("ns=net:["), "{beta:?}");
    // 127.0.0.1:3128 and 127.0.0.1:1080, listening.
    assert!(
        out.contains("listen=0100007F:0438,0100007F:0C38,\n"),
        "{beta:?}"
    );
    assert!(out.contains("netdevs=lo,\n"), "only loopback: {beta:?}");
    assert!(
        out.contains("HTTP/1.1 403 Forbidden\nX-Proxy-Error: blocked-by-allowlist\n"),
        "{beta:?}"
    );
    assert_eq!(
        rig.egress_sessions
            .recv_timeout(Duration::from_secs(5))
            .unwrap(),
        "beta"
    );
    // The same session's next spawn shares the namespace; another
    // session's is another, with its own proxies and its own answer.
    let again = rig.run("beta", "readlink /proc/self/ns/net | sed 's/^/ns=/'");
    assert_eq!(ns(&again.stdout), ns(out), "{again:?}");
    let gamma = rig.run("gamma", script);
    assert_eq!(gamma.code, Some(0), "{gamma:?}");
    assert_ne!(ns(&gamma.stdout), ns(out), "{gamma:?}");
    assert!(
        gamma
            .stdout
            .contains("HTTP/1.1 502 Bad Gateway\nX-Proxy-Error: dns-failure\n"),
        "{gamma:?}"
    );
    assert_eq!(
        rig.egress_sessions
            .recv_timeout(Duration::from_secs(5))
            .unwrap(),
        "gamma"
    );
    // Not the agent's own namespace.
    let agent_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(ns(out), agent_ns.to_string_lossy(), "{beta:?}");
    assert!(rig
        .agent
        .capabilities()
        .contains(&socket_proto::egress::EGRESS_CAPABILITY.to_string()));
}

/// The adversarial half of issue 11 on the session side: no vsock (the
/// agent channel) or other odd socket families from a session, only the
/// session's own user in its passwd and group, and every process of the
/// session in its cgroup.
fn filtered_with_own_accounts_in_their_cgroup(rig: &mut Rig, cg_base: Option<&Path>) {
    // Sessions gamma and delta: the third and fourth uids.
    let uid = crate::sessions::FIRST_UID + 2;

    let o = rig.run("gamma", PROBES);
    let out = &o.stdout;
    assert_eq!(o.code, Some(0), "{o:?}");
    // AF_VSOCK (40) and AF_PACKET (17): EPERM from the filter.
    assert!(
        out.contains("vsock=denied Operation not permitted\n"),
        "{o:?}"
    );
    assert!(
        out.contains("packet=denied Operation not permitted\n"),
        "{o:?}"
    );
    // Loopback TCP and unix sockets still work.
    assert!(out.contains("inet=ok\n"), "{o:?}");
    assert!(out.contains("unix=ok\n"), "{o:?}");
    assert!(out.contains("\nSeccomp:\t2\n"), "{o:?}");
    // bwrap's init (pid 1 in the sandbox, which a session could ptrace)
    // is filtered too.
    assert!(out.contains("init-Seccomp:\t2\n"), "{o:?}");
    // Its own passwd and group: root, nobody, itself; read-only.
    assert!(out.contains(&format!("me=cowork{uid}\n")), "{o:?}");
    let home = rig.root.join("gamma");
    assert_eq!(
        section(out, "--passwd", "--group"),
        [
            "root:x:0:0:root:/root:/bin/bash",
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
            &format!(
                "cowork{uid}:x:{uid}:{uid}:coworkvm session:{}:/bin/bash",
                home.display()
            ),
        ],
        "{o:?}"
    );
    assert_eq!(
        section(out, "--group", "--end"),
        [
            "root:x:0:",
            "nogroup:x:65534:",
            &format!("cowork{uid}:x:{uid}:")
        ],
        "{o:?}"
    );
    assert!(out.contains("passwd-write=no"), "{o:?}");

    // A second session sees itself, not the first.
    let o = rig.run("delta", PROBES);
    let out = &o.stdout;
    assert!(out.contains(&format!("me=cowork{}\n", uid + 1)), "{o:?}");
    assert!(out.contains("getent-delta=yes"), "{o:?}");
    assert!(out.contains("getent-gamma=no"), "{o:?}");
    assert!(
        !out.contains(&format!("cowork{uid}")) && !out.contains("/gamma"),
        "{o:?}"
    );
    assert!(
        out.contains("vsock=denied Operation not permitted\n"),
        "{o:?}"
    );

    let Some(base) = cg_base else {
        return;
    };
    // Every process of the session, the outer bwrap included, is in the
    // session's group; the agent (this process) is not.
    let mut seen = HashMap::new();
    rig.spawn("bg", "gamma", "sleep 1000 & echo started; wait", None)
        .unwrap();
    rig.first_stdout("bg", &mut seen);
    std::thread::sleep(Duration::from_millis(200));
    let rel = |p: &Path| {
        let top = host_cgroup2().unwrap();
        format!("0::/{}", p.strip_prefix(&top).unwrap().display())
    };
    let group = rel(&base.join(format!("sessions/cowork{uid}")));
    let pids = uid_pids(uid);
    assert!(pids.len() >= 3, "bwrap, its init, sh, sleep: {pids:?}");
    for pid in &pids {
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(
            cg.lines().any(|l| l == group),
            "pid {pid} is not in {group}: {cg}"
        );
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    assert!(!own.contains("coworkvm-it"), "{own}");
    rig.agent
        .procs
        .kill(
            "bg",
            Some(&socket_proto::host::Signal::Name("SIGKILL".into())),
        )
        .unwrap();
    rig.wait("bg", &mut seen);
}

/// Moves this thread into a mount namespace of its own, private
/// throughout, so that nothing it mounts reaches the host's.
fn private_mount_namespace() -> std::io::Result<()> {
    // SAFETY: unshare and mount with constant arguments and static strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0
            || libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn chown(p: &Path, id: u32) {
    std::os::unix::fs::lchown(p, Some(id), Some(id)).unwrap();
}

/// Shared folders with a tmpfs standing in for the virtio-fs share (the
/// host user's files owned by SHARE_OWNER_ID): grants at spawn, one added
/// by mountPath to the running sandbox, read-only and idmapped binds,
/// refused links and paths, the tree detached after the last exit, and
/// the SDK from the share. Session gamma and delta (the third and fourth
/// uids).
fn shared_folders(rig: Rig) {
    use crate::share::Share;
    use socket_proto::guest::SHARE_OWNER_ID;
    use socket_proto::host::{InstallSdkParams, MountPathParams};
    use std::sync::Arc;

    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let share_root = d.path().join("share");
    std::fs::create_dir(&share_root).unwrap();
    crate::share::tests_support::mount_tmpfs(&share_root);
    let home = share_root.join("shared/home/u");
    for dir in ["work", "ro", "sdk/1.0", "outside"] {
        std::fs::create_dir_all(home.join(dir)).unwrap();
    }
    for dir in [
        "shared",
        "shared/home",
        "shared/home/u",
        "shared/home/u/sdk",
    ] {
        std::fs::set_permissions(share_root.join(dir), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    std::fs::write(home.join("work/hello"), "hello from the host\n").unwrap();
    std::fs::write(home.join("ro/doc"), "read me\n").unwrap();
    std::fs::write(
        home.join("sdk/1.0/claude"),
        "#!/bin/sh\necho sdk-ran \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        home.join("sdk/1.0/claude"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc", home.join("link")).unwrap();
    for p in [
        "work",
        "work/hello",
        "ro",
        "ro/doc",
        "sdk/1.0",
        "sdk/1.0/claude",
    ] {
        chown(&home.join(p), SHARE_OWNER_ID);
    }
    let run = d.path().join("run");
    let share = Arc::new(Share::open(&share_root, &run).unwrap());
    let Rig {
        agent,
        events,
        egress_sessions,
        _dir,
        root,
    } = rig;
    let mut rig = Rig {
        agent: agent.with_share(share.clone()),
        events,
        egress_sessions,
        _dir,
        root,
    };
    assert!(rig
        .agent
        .capabilities()
        .contains(&socket_proto::guest::SHARE_CAPABILITY.to_string()));

    // Grants at spawn; the failures are named, the spawn goes on.
    let p: SpawnParams = serde_json::from_value(json!({
        "id": "fs-1", "name": "gamma", "command": "sh", "isResume": false,
        "args": ["-c", r#"
            cat ~/mnt/work/hello
            echo "owner=$(stat -c %u ~/mnt/work/hello) me=$(id -u)"
            echo made > ~/mnt/work/made && echo wrote
            echo x > ~/mnt/docs/ro/new 2>/dev/null || echo ro-refused
            rm ~/mnt/docs/ro/doc 2>/dev/null || echo ro-kept
            touch ~/mnt/own 2>/dev/null || echo tree-is-roots
            echo "mnt=$(ls ~/mnt | tr '\n' ' ')"
            echo ready
            i=0
            while [ ! -e ~/mnt/later/hello ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
            echo "later=$(cat ~/mnt/later/hello)"
            grep -c '/gamma/mnt/later ' /proc/self/mountinfo
        "#],
        "additionalMounts": {
            "work": {"path": "home/u/work", "mode": "rw"},
            "docs/ro": {"path": "home/u/ro", "mode": "ro"},
            "evil": {"path": "home/u/link", "mode": "ro"},
            "escape": {"path": "home/u/../../../etc", "mode": "ro"},
            "abs": {"path": "/etc", "mode": "ro"},
            "../up": {"path": "home/u/work", "mode": "ro"},
            "missing": {"path": "home/u/nope", "mode": "rw"},
        },
    }))
    .unwrap();
    let r = rig.agent.spawn(&p).unwrap();
    assert_eq!(
        r,
        json!({"failedMounts": ["../up", "abs", "escape", "evil", "missing"]})
    );
    let tree = run.join("mnt/gamma");
    assert!(share.has_tree("gamma"));
    let mut seen = HashMap::new();
    // Wait until it is ready, then add one while it runs.
    while !seen
        .get("fs-1")
        .is_some_and(|o: &Outcome| o.stdout.contains("ready"))
    {
        match rig.events.recv_timeout(Duration::from_secs(30)).unwrap() {
            GuestEvent::Stdout { id, data } => seen.entry(id).or_default().stdout.push_str(&data),
            GuestEvent::Stderr { id, data } => seen.entry(id).or_default().stderr.push_str(&data),
            other => panic!("unexpected {other:?}; so far {seen:?}"),
        }
    }
    let mp = |id: &str, name: &str, sub: &str, mode: &str| MountPathParams {
        process_id: id.into(),
        subpath: sub.into(),
        mount_name: name.into(),
        mode: mode.into(),
    };
    let r = rig
        .agent
        .mount_path(&mp("fs-1", "later", "home/u/work", "ro"))
        .unwrap();
    assert_eq!(
        r["guestPath"],
        rig.root.join("gamma/mnt/later").to_string_lossy().as_ref()
    );
    for (bad, why) in [
        (mp("nobody", "x", "home/u/work", "ro"), "no running process"),
        (mp("fs-1", "../x", "home/u/work", "ro"), "mount name"),
        (mp("fs-1", "x", "home/u/../..", "ro"), "path"),
        (mp("fs-1", "x", "home/u/link", "ro"), "shared/home/u/link"),
        (mp("fs-1", "x", "home/u/work", "rwx"), "mode"),
        (mp("fs-1", "later", "home/u/ro", "ro"), "already mounted"),
    ] {
        let e = rig.agent.mount_path(&bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
    let o = rig.wait("fs-1", &mut seen);
    assert_eq!(o.code, Some(0), "{o:?}");
    let uid = o
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("owner="))
        .unwrap();
    let (owner, me) = uid.split_once(" me=").unwrap();
    // Idmapped: the host user's files are the session's.
    assert_eq!(owner, me, "{o:?}");
    for want in [
        "hello from the host",
        "wrote",
        "ro-refused",
        "ro-kept",
        "tree-is-roots",
        "mnt=docs work ",
        "later=hello from the host",
    ] {
        assert!(o.stdout.contains(want), "{want:?} missing: {o:?}");
    }
    // The later mount propagated into the running sandbox.
    assert!(o.stdout.trim_end().ends_with('1'), "{o:?}");
    // Written through the idmap: the host user's file.
    use std::os::unix::fs::MetadataExt;
    let made = std::fs::metadata(home.join("work/made")).unwrap();
    assert_eq!(made.uid(), SHARE_OWNER_ID);
    assert!(home.join("ro/doc").exists());
    assert!(!home.join("outside/x").exists());
    // The last process gone: the tree is detached and removed.
    let mut gone = false;
    for _ in 0..100 {
        if !share.has_tree("gamma") && !tree.exists() {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone, "the tree of gamma outlived its last process");
    let e = rig
        .agent
        .mount_path(&mp("fs-1", "again", "home/u/work", "ro"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no running process"), "{e}");

    // A session that left a link where its mount tree goes: its mounts
    // fail by name, nothing is bound through the link, the spawn runs.
    let o = rig.run("epsilon", "true");
    assert_eq!(o.code, Some(0), "{o:?}");
    let eps = rig.root.join("epsilon");
    std::fs::remove_dir(eps.join("mnt")).unwrap();
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, eps.join("mnt")).unwrap();
    let p: SpawnParams = serde_json::from_value(json!({
        "id": "fs-3", "name": "epsilon", "command": "sh", "isResume": false,
        "args": ["-c", "echo ran"],
        "additionalMounts": {"work": {"path": "home/u/work", "mode": "rw"}},
    }))
    .unwrap();
    assert_eq!(
        rig.agent.spawn(&p).unwrap(),
        json!({"failedMounts": ["work"]})
    );
    let o = rig.wait("fs-3", &mut HashMap::new());
    assert_eq!((o.code, o.stdout.as_str()), (Some(0), "ran\n"), "{o:?}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);

    // The SDK from the share: checked, bound read-only, run as `claude`.
    let sdk = |path: &str| InstallSdkParams {
        sdk_subpath: "x".into(),
        version: "1.0".into(),
        shared_path: Some(path.into()),
        ..Default::default()
    };
    for (bad, why) in [
        ("home/u/ro", "claude"),
        ("home/u/link", "shared/home/u/link"),
        ("home/u/../u/sdk/1.0", "path"),
    ] {
        let e = rig.agent.install_sdk(&sdk(bad)).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
    let r = rig.agent.install_sdk(&sdk("home/u/sdk/1.0")).unwrap();
    let bin = run.join("sdk/1.0/claude");
    assert_eq!(r, json!({"cached": true, "path": bin.to_string_lossy()}));
    let p: SpawnParams = serde_json::from_value(json!({
        "id": "fs-2", "name": "delta", "command": "claude", "args": ["--version"],
        "isResume": false,
    }))
    .unwrap();
    assert_eq!(rig.agent.spawn(&p).unwrap(), json!({}));
    let o = rig.wait("fs-2", &mut HashMap::new());
    assert_eq!(o.code, Some(0), "{o:?}");
    assert_eq!(o.stdout, "sdk-ran --version\n");
    drop(share);
}
