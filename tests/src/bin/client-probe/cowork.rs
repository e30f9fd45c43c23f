//! `--cowork`: a Cowork session end to end, driven the way the desktop
//! client drives its helper, with the real agent runtime (Claude Code's
//! Linux binary from npm, `coworkvm_tests::runtime`) and a fake Messages
//! API (`egress-upstream`'s [`FAKE_API_HOST`]) reached through the
//! session's egress proxy:
//!
//! 1. `configure`, `subscribeEvents`, `startVM` with an `apiProbeURL`,
//!    `isGuestConnected` polled (the time to connected is printed),
//!    `installSdk` of the runtime laid out as the client lays it out
//!    (answered within the client's 30 s), `addApprovedOauthToken`;
//! 2. `spawn` of `/usr/local/bin/claude --version` with the client's
//!    standard mounts, a picked folder, `allowedDomains` and an
//!    `oauthToken`: the version on stdout, `exitCode` 0;
//! 3. `claude -p` against the fake API, whose canned reply asks for a
//!    Write: the file appears in the host's `outputs` folder, owned by the
//!    host user; the same into a read-only mount is refused; a host not in
//!    `allowedDomains` is refused (403 `blocked-by-allowlist`);
//! 4. `stopVM`, `startVM`, and a resumed spawn (`isResume`) sees the
//!    session's files, while its transcript is on the host in the
//!    `.claude` mount.
//!
//! usage: client-probe --cowork SOCKET BUNDLE_DIR HOST_DIR
//!        client-probe --cowork-bench N SOCKET BUNDLE_DIR HOST_DIR
//!        client-probe --cowork-copy-bench N COPY_SOCKET BUNDLE_DIR
//! (the benchmark: see [`bench`] and [`copy_bench`])
//! (HOME holds the runtime at `SDK_SUBPATH/VERSION/claude` with its
//! `.verified`; HOST_DIR the folders, `ref/ca.pem` the fake API's CA.)

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use coworkvm_tests::egress::FAKE_API_NAME as FAKE_API_HOST;
use coworkvm_tests::fakeapi::{write_prompt, RESULT_ERROR, RESULT_OK};
use coworkvm_tests::runtime;
use serde_json::{json, Value};

use super::shares::rel;
use super::{ok, poll_connected, Events, Pipe, Probe, SDK_SUBPATH};

/// `claude -p`'s flags beyond the prompt: plain text out, and the Write
/// tool allowed without a prompt (nobody is there to answer one; the
/// bypass modes are refused as root, this works for any user).
const PRINT_FLAGS: &[&str] = &["--output-format", "text", "--allowedTools", "Write"];
/// The session's name.
const NAME: &str = "cowork-e2e";
/// The OAuth token of the spawns (the fake API accepts any).
const TOKEN: &str = "sk-ant-oat01-cowork-e2e-token";
/// The client's request timeout: `installSdk` must answer within it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The env the client sends with a runtime spawn, plus the fake API's
/// address and CA (what a user pointing the runtime elsewhere would set).
fn runtime_env(name: &str) -> Value {
    let mnt = format!("/sessions/{name}/mnt");
    json!({
        "CLAUDE_CONFIG_DIR": format!("{mnt}/.claude"),
        "CLAUDE_COWORK_MEMORY_PATH_OVERRIDE": format!("{mnt}/.claude/memory"),
        "ANTHROPIC_BASE_URL": format!("https://{FAKE_API_HOST}"),
        "NODE_EXTRA_CA_CERTS": format!("{mnt}/ref/ca.pem"),
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        // A failed request fails the run at once instead of retrying for
        // minutes.
        "CLAUDE_CODE_MAX_RETRIES": "0",
        // The client sends this empty; it must not override the token.
        "ANTHROPIC_API_KEY": "",
    })
}

/// The client's standard mounts (and a picked folder, `project`) of the
/// folders under `t`.
fn standard_mounts(t: &Path) -> Value {
    let m = |path: String, mode: &str| json!({"path": path, "mode": mode});
    json!({
        "outputs": m(rel(&t.join("outputs")), "rw"),
        ".claude": m(rel(&t.join("claude")), "rw"),
        ".claude/skills": m(rel(&t.join("claude/skills")), "ro"),
        "uploads": m(rel(&t.join("uploads")), "rw"),
        "project": m(rel(&t.join("project")), "rwd"),
        "ref": m(rel(&t.join("ref")), "ro"),
    })
}

/// The client's spawn of the runtime, as it sends it.
fn spawn_runtime_as_sent(
    pipe: &mut Pipe,
    name: &str,
    mounts: &Value,
    id: &str,
    args: Vec<String>,
    resume: bool,
) -> Value {
    pipe.call(
        "spawn",
        json!({"id": id, "name": name, "command": "/usr/local/bin/claude", "args": args,
               "cwd": format!("/sessions/{name}"), "env": runtime_env(name),
               "additionalMounts": mounts, "allowedDomains": [FAKE_API_HOST],
               "oauthToken": TOKEN, "isResume": resume, "oneShot": false,
               "mountSkeletonHome": false}),
    )
}

/// `claude -p PROMPT` with [`PRINT_FLAGS`].
fn print_args(prompt: String) -> Vec<String> {
    let mut a: Vec<String> = vec!["-p".into(), prompt];
    a.extend(PRINT_FLAGS.iter().map(|s| s.to_string()));
    a
}

fn exit_code(exit: &Option<Value>) -> Option<i64> {
    exit.as_ref().and_then(|e| e["exitCode"].as_i64())
}

pub fn cowork(socket: &str, bundle: &str, host_dir: &str) {
    let mut p = Probe { failed: false };
    let t = Path::new(host_dir);
    let long = Duration::from_secs(300);
    let run_timeout = Duration::from_secs(900);

    // 1. The client's opening.
    let mut pipe = Pipe::open(socket);
    let r = pipe.call(
        "configure",
        json!({"memoryMB": 2048, "cpuCount": 2, "virtiofsdPath": null}),
    );
    p.check("configure without userDataRoot", ok(&r), &r);
    let (ev, ack) = Events::subscribe(socket);
    p.check("subscribeEvents", ok(&ack), &ack);
    let t0 = Instant::now();
    let r = pipe.call(
        "startVM",
        json!({"bundlePath": bundle, "memoryGB": 2, "cpuCount": 2,
               "apiProbeURL": format!("https://{FAKE_API_HOST}/")}),
    );
    p.check("startVM", ok(&r), &r);
    let up = poll_connected(socket, long);
    p.check("isGuestConnected turns true", up.is_some(), "timed out");
    if let Some(d) = up {
        println!("@@CLIENT start_to_connected_s {:.1}", d.as_secs_f64());
    }
    let reach = ev.wait(0, Duration::from_secs(120), |v| {
        v["type"] == "apiReachability" && v["status"] == "REACHABLE"
    });
    p.check(
        "apiReachability REACHABLE (the fake API through the egress path)",
        reach.is_some(),
        "no REACHABLE event",
    );

    let t1 = Instant::now();
    let r = pipe.call(
        "installSdk",
        json!({"sdkSubpath": SDK_SUBPATH, "version": runtime::VERSION}),
    );
    let took = t1.elapsed();
    println!("@@CLIENT install_sdk_s {:.1}", took.as_secs_f64());
    p.check("installSdk of the real runtime", ok(&r), &r);
    p.check(
        "installSdk answers within the client's 30 s",
        took < CLIENT_TIMEOUT,
        format!("{took:?}"),
    );
    let r = pipe.call(
        "installSdk",
        json!({"sdkSubpath": SDK_SUBPATH, "version": runtime::VERSION}),
    );
    p.check("installSdk again (a client's retry) works", ok(&r), &r);
    let r = pipe.call("addApprovedOauthToken", json!({"token": TOKEN}));
    p.check("addApprovedOauthToken", ok(&r), &r);

    // 2. The client's spawn of the runtime, as sent.
    let mounts = standard_mounts(t);
    let spawn_runtime = |pipe: &mut Pipe, id: &str, args: Vec<String>, resume: bool| {
        spawn_runtime_as_sent(pipe, NAME, &mounts, id, args, resume)
    };
    let t2 = Instant::now();
    let r = spawn_runtime(&mut pipe, "version", vec!["--version".into()], false);
    p.check("spawn /usr/local/bin/claude --version", ok(&r), &r);
    let failed = r["result"]["failedMounts"].clone();
    p.check(
        "every standard mount is made",
        failed.as_array().is_none_or(|a| a.is_empty()),
        &failed,
    );
    let exit = ev.exit_of("version", run_timeout);
    let out = ev.stdout("version");
    println!(
        "@@CLIENT version_spawn_to_exit_s {:.1}",
        t2.elapsed().as_secs_f64()
    );
    p.check(
        "the runtime prints its version on stdout",
        out.contains(&runtime::version_line()),
        format!("{out:?} stderr {:?}", stderr_of(&ev, "version")),
    );
    p.check(
        "--version exits 0",
        exit_code(&exit) == Some(0),
        format!("{exit:?}"),
    );

    // 3. A non-interactive run against the fake API: a Write into outputs,
    // then one into the read-only mount (one run, two tool calls: the fake
    // API's final answer has a RESULT line for each, in order).
    let mnt = format!("/sessions/{NAME}/mnt");
    let t3 = Instant::now();
    let prompt = format!(
        "{}\n{}",
        write_prompt(
            &format!("{mnt}/outputs/from-claude.txt"),
            "written-by-claude"
        ),
        write_prompt(&format!("{mnt}/ref/not-here.txt"), "must-not-appear")
    );
    let r = spawn_runtime(&mut pipe, "write", print_args(prompt), false);
    p.check(
        "spawn claude -p (a Write into outputs, one into a ro mount)",
        ok(&r),
        &r,
    );
    let exit = ev.exit_of("write", run_timeout);
    let out = ev.stdout("write");
    println!(
        "@@CLIENT print_round_trip_s {:.1}",
        t3.elapsed().as_secs_f64()
    );
    for l in out.lines().take(40) {
        println!("@@CLIENT guest write| {l}");
    }
    for l in stderr_of(&ev, "write").lines().take(40) {
        println!("@@CLIENT guest write-err| {l}");
    }
    // claude exits 0 whatever its tools did: the fake API's final answer
    // says how each Write went.
    p.check(
        "claude -p exits 0",
        exit_code(&exit) == Some(0),
        format!("{exit:?}"),
    );
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(RESULT_OK) || l.starts_with(RESULT_ERROR))
        .collect();
    p.check(
        "the fake API saw the Write into outputs succeed",
        lines.first().is_some_and(|l| {
            l.starts_with(RESULT_OK) && l.contains(&format!("{mnt}/outputs/from-claude.txt"))
        }),
        &out,
    );
    let host_file = t.join("outputs/from-claude.txt");
    let content = std::fs::read_to_string(&host_file).unwrap_or_default();
    p.check(
        "the file appears in the host's outputs folder",
        content.contains("written-by-claude"),
        format!("{content:?}"),
    );
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let owner = std::fs::metadata(&host_file).map(|m| m.uid()).ok();
    p.check(
        "the file is owned by the host user",
        owner == Some(me),
        format!("{owner:?} vs {me}"),
    );
    p.check(
        "a Write into a ro mount is refused",
        lines.get(1).is_some_and(|l| l.starts_with(RESULT_ERROR))
            && !t.join("ref/not-here.txt").exists(),
        format!("{out:?} {exit:?}"),
    );

    // A host not in allowedDomains, from the client's workspace tools.
    let r = pipe.call(
        "spawn",
        json!({"id": "denied", "name": NAME, "command": "bash",
               "args": ["-c", format!(
                   "curl -sS -o /dev/null -D - --cacert {mnt}/ref/ca.pem https://denied.test/ 2>&1 \
                    | tr -d '\\r' | grep -i -E '^(HTTP|x-proxy-error)'")],
               "allowedDomains": [FAKE_API_HOST], "oneShot": true, "isResume": false}),
    );
    p.check("spawn bash -c curl (oneShot)", ok(&r), &r);
    let _ = ev.exit_of("denied", run_timeout);
    let out = ev.stdout("denied");
    p.check(
        "a host not in allowedDomains is refused (403 blocked-by-allowlist)",
        out.contains(" 403") && out.to_lowercase().contains("blocked-by-allowlist"),
        &out,
    );

    // 4. Stop, start, resume.
    let r = pipe.call(
        "spawn",
        json!({"id": "mark", "name": NAME, "command": "bash",
               "args": ["-c", "echo kept-across-boots > marker.txt"], "isResume": false}),
    );
    p.check("spawn a marker write", ok(&r), &r);
    let exit = ev.exit_of("mark", run_timeout);
    p.check(
        "the marker is written",
        exit_code(&exit) == Some(0),
        format!("{exit:?}"),
    );
    let r = pipe.call("stopVM", json!({}));
    p.check("stopVM", ok(&r), &r);
    let r = pipe.call(
        "startVM",
        json!({"bundlePath": bundle, "memoryGB": 2, "cpuCount": 2}),
    );
    p.check("startVM again", ok(&r), &r);
    let up = poll_connected(socket, long);
    p.check("connected again", up.is_some(), "timed out");
    let r = pipe.call(
        "spawn",
        json!({"id": "resumed", "name": NAME, "command": "bash",
               "args": ["-c", format!("cat marker.txt; ls {mnt}/.claude/projects | wc -l")],
               "cwd": format!("/sessions/{NAME}"), "additionalMounts": mounts,
               "isResume": true}),
    );
    p.check("a resumed spawn", ok(&r), &r);
    let exit = ev.exit_of("resumed", run_timeout);
    let out = ev.stdout("resumed");
    p.check(
        "the resumed session sees its files",
        out.contains("kept-across-boots") && exit_code(&exit) == Some(0),
        format!("{out:?} {exit:?}"),
    );
    let transcripts = walk_count(&t.join("claude/projects"), "jsonl");
    p.check(
        "the runtime's transcript is on the host in the .claude mount",
        transcripts > 0,
        format!("{transcripts} .jsonl files"),
    );
    let r = pipe.call("stopVM", json!({}));
    p.check("stopVM at the end", ok(&r), &r);
    println!("@@CLIENT total_s {:.1}", t0.elapsed().as_secs_f64());
    std::process::exit(i32::from(p.failed));
}

fn stderr_of(ev: &Events, id: &str) -> String {
    ev.of_kind("stderr", id)
}

/// Files under `dir` (recursively) whose name ends in `.ext`.
fn walk_count(dir: &Path, ext: &str) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            match e.file_type() {
                Ok(ft) if ft.is_dir() => stack.push(path),
                Ok(_) if path.extension().is_some_and(|x| x == ext) => n += 1,
                _ => {}
            }
        }
    }
    n
}

/// When the first `stdout` event of process `id` arrived; `None` when the
/// process exited without one or nothing came within `timeout`.
fn first_stdout_at(ev: &Events, id: &str, timeout: Duration) -> Option<Instant> {
    let is = |v: &Value, kind: &str| v["type"] == kind && v["id"] == id;
    ev.wait(0, timeout, |v| is(v, "stdout") || is(v, "exit"))?;
    ev.seen
        .lock()
        .unwrap()
        .iter()
        .find(|(_, v)| is(v, "stdout"))
        .map(|(at, _)| *at)
}

/// `installSdk` of `version` as the client sends it: the reply and its
/// seconds.
fn install(pipe: &mut Pipe, version: &str) -> (Value, f64) {
    let t = Instant::now();
    let r = pipe.call(
        "installSdk",
        json!({"sdkSubpath": SDK_SUBPATH, "version": version}),
    );
    (r, t.elapsed().as_secs_f64())
}

/// How long one answer may take before the probe gives up on it: a first
/// `startVM` answers when the rootfs is expanded; at rig speed, minutes.
const SLOW_ANSWER_TIMEOUT: Duration = Duration::from_secs(1800);

/// `--cowork-bench RUNS SOCKET BUNDLE HOST_DIR`: `runs` rounds against the
/// helper at `socket`, each a fresh boot of `bundle` (the first one its
/// first start: seeding and the rootfs expansion): `startVM` to
/// `isGuestConnected`, `installSdk` through the share, the spawn of
/// `/usr/local/bin/claude --version` to its first stdout event, `claude -p`
/// with the fake API's Write prompt to its exit, `stopVM`; each round a new
/// session, as each Cowork task is. Prints each round's figures as it ends
/// and then `@@COWORK-BENCH {json}`, seconds per metric, a value only for
/// a step that succeeded; exit status 1 when a check failed.
pub fn bench(runs: usize, socket: &str, bundle: &str, host_dir: &str) {
    let mut p = Probe { failed: false };
    let t = Path::new(host_dir);
    let long = Duration::from_secs(600);
    let run_timeout = Duration::from_secs(900);
    let mounts = standard_mounts(t);
    let sdk_bytes = std::env::var_os("HOME").and_then(|h| {
        std::fs::metadata(
            Path::new(&h)
                .join(SDK_SUBPATH)
                .join(runtime::VERSION)
                .join("claude"),
        )
        .ok()
        .map(|m| m.len())
    });
    let mut pipe = Pipe::open(socket);
    // The first startVM seeds the bundle and expands its rootfs before it
    // answers, at rig speed.
    let _ = pipe.r.get_ref().set_read_timeout(Some(SLOW_ANSWER_TIMEOUT));
    let r = pipe.call("configure", json!({"memoryMB": 2048, "cpuCount": 2}));
    p.check("configure", ok(&r), &r);
    let (ev, ack) = Events::subscribe(socket);
    p.check("subscribeEvents", ok(&ack), &ack);
    let (mut connect, mut share, mut version, mut print) = (vec![], vec![], vec![], vec![]);
    let mut boot: Vec<Vec<(String, f64)>> = Vec::new();
    for round in 1..=runs {
        let name = format!("cowork-bench-{round}");
        let mnt = format!("/sessions/{name}/mnt");
        let t0 = Instant::now();
        let r = pipe.call(
            "startVM",
            json!({"bundlePath": bundle, "memoryGB": 2, "cpuCount": 2,
                   "apiProbeURL": format!("https://{FAKE_API_HOST}/")}),
        );
        p.check(&format!("round {round}: startVM"), ok(&r), &r);
        let up = poll_connected(socket, long);
        p.check(
            &format!("round {round}: isGuestConnected turns true"),
            up.is_some(),
            "timed out",
        );
        if up.is_none() {
            let _ = pipe.call("stopVM", json!({}));
            continue;
        }
        connect.push(t0.elapsed().as_secs_f64());
        // Where the guest's part of that went: the agent's timeline in the
        // console log (the helper's run directory, beside its socket).
        let console = Path::new(&format!("{socket}.d")).join("console.log");
        let stages = (0..20).find_map(|_| {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            coworkvm_tests::cowork::boot_stages(&text).or_else(|| {
                std::thread::sleep(Duration::from_millis(100));
                None
            })
        });
        p.check(
            &format!("round {round}: the agent's boot timeline is on the console"),
            stages.is_some(),
            console.display(),
        );
        if let Some(st) = &stages {
            println!("@@CLIENT figures round {round}: guest boot {st:?}");
        }
        boot.push(stages.unwrap_or_default());

        let (r, took) = install(&mut pipe, runtime::VERSION);
        p.check(&format!("round {round}: installSdk (share)"), ok(&r), &r);
        if ok(&r) {
            share.push(took);
        }
        let r = pipe.call("addApprovedOauthToken", json!({"token": TOKEN}));
        p.check(&format!("round {round}: addApprovedOauthToken"), ok(&r), &r);

        let id = format!("version{round}");
        let t2 = Instant::now();
        let r = spawn_runtime_as_sent(
            &mut pipe,
            &name,
            &mounts,
            &id,
            vec!["--version".into()],
            false,
        );
        p.check(
            &format!("round {round}: spawn claude --version"),
            ok(&r),
            &r,
        );
        let first = first_stdout_at(&ev, &id, run_timeout);
        let exit = ev.exit_of(&id, run_timeout);
        let out = ev.stdout(&id);
        let good = out.contains(&runtime::version_line()) && exit_code(&exit) == Some(0);
        p.check(
            &format!("round {round}: --version prints the version and exits 0"),
            good,
            format!("{out:?} {exit:?} stderr {:?}", stderr_of(&ev, &id)),
        );
        if let (true, Some(at)) = (good, first) {
            version.push(at.duration_since(t2).as_secs_f64());
        }

        let id = format!("write{round}");
        let file = format!("bench-{round}.txt");
        let t3 = Instant::now();
        let r = spawn_runtime_as_sent(
            &mut pipe,
            &name,
            &mounts,
            &id,
            print_args(write_prompt(
                &format!("{mnt}/outputs/{file}"),
                "written-by-claude",
            )),
            false,
        );
        p.check(&format!("round {round}: spawn claude -p"), ok(&r), &r);
        let exit = ev.exit_of(&id, run_timeout);
        let took = t3.elapsed().as_secs_f64();
        let out = ev.stdout(&id);
        let content = std::fs::read_to_string(t.join("outputs").join(&file)).unwrap_or_default();
        let good = exit_code(&exit) == Some(0)
            && out.contains(RESULT_OK)
            && content.contains("written-by-claude");
        p.check(
            &format!("round {round}: claude -p wrote the file into outputs"),
            good,
            format!(
                "{out:?} {exit:?} file {content:?} stderr {:?}",
                stderr_of(&ev, &id)
            ),
        );
        if good {
            print.push(took);
        }
        let r = pipe.call("stopVM", json!({}));
        p.check(&format!("round {round}: stopVM"), ok(&r), &r);
        let last = |x: &Vec<f64>| x.last().map_or("-".into(), |v| format!("{v:.1} s"));
        println!(
            "@@CLIENT figures round {round}: connected {}, installSdk {}, --version {}, -p {}",
            last(&connect),
            last(&share),
            last(&version),
            last(&print)
        );
    }
    drop(pipe);
    println!(
        "@@COWORK-BENCH {}",
        json!({"rounds": runs, "sdk_bytes": sdk_bytes, "connect_s": connect,
               "install_share_s": share, "boot_stages": boot,
               "version_first_stdout_s": version, "print_round_trip_s": print})
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(i32::from(p.failed));
}

/// `--cowork-copy-bench RUNS COPY_SOCKET BUNDLE`: against the copy helper
/// at `copy_socket` (no virtiofsd, so no shared folders), one boot of
/// `bundle` and `runs` installs of the runtime by copy, each of its own
/// version name (`coworkvm_tests::cowork::copy_version`). Per install: the
/// seconds to `installSdk`'s answer (within the client's 30 s: a longer
/// copy runs on after it), and to the first `spawn` of the runtime the
/// helper accepts (the copy is in); that spawn is killed, except the last
/// one's, which must print the version. Prints each install's figures as
/// it ends and then `@@COWORK-COPY {json}`; exit status 1 when a check
/// failed.
pub fn copy_bench(runs: usize, copy_socket: &str, bundle: &str) {
    let mut p = Probe { failed: false };
    let (answer, ready) = copy_installs(&mut p, runs, copy_socket, bundle);
    println!(
        "@@COWORK-COPY {}",
        json!({"rounds": runs, "install_copy_answer_s": answer, "install_copy_s": ready})
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(i32::from(p.failed));
}

/// Spawns the runtime (`--version`) as `id` until the helper accepts it
/// (it refuses while the copy runs, after waiting for it a while); `false`
/// when it refused for another reason or `timeout` passed.
fn spawn_when_copied(p: &mut Probe, pipe: &mut Pipe, id: &str, timeout: Duration) -> bool {
    let t = Instant::now();
    loop {
        let r = pipe.call(
            "spawn",
            json!({"id": id, "name": "cowork-copy", "command": "/usr/local/bin/claude",
                   "args": ["--version"], "env": {"DISABLE_AUTOUPDATER": "1"},
                   "isResume": false}),
        );
        if ok(&r) {
            return true;
        }
        let copying = r["error"]
            .as_str()
            .is_some_and(|e| e.contains("is still being copied"));
        if !copying || t.elapsed() > timeout {
            p.check(&format!("{id}: the runtime's spawn is accepted"), false, &r);
            return false;
        }
    }
}

/// `installSdk` of the runtime by copy, `runs` times under as many version
/// names, in one VM of the copy helper at `copy_socket`: the seconds to
/// each answer and to each runtime spawn accepted, of those that
/// succeeded.
fn copy_installs(
    p: &mut Probe,
    runs: usize,
    copy_socket: &str,
    bundle: &str,
) -> (Vec<f64>, Vec<f64>) {
    let (mut answer, mut ready) = (Vec::new(), Vec::new());
    let run_timeout = Duration::from_secs(900);
    let mut cpipe = Pipe::open(copy_socket);
    let _ = cpipe
        .r
        .get_ref()
        .set_read_timeout(Some(SLOW_ANSWER_TIMEOUT));
    let r = cpipe.call("configure", json!({"memoryMB": 2048, "cpuCount": 2}));
    p.check("copy helper: configure", ok(&r), &r);
    let (cev, ack) = Events::subscribe(copy_socket);
    p.check("copy helper: subscribeEvents", ok(&ack), &ack);
    let r = cpipe.call(
        "startVM",
        json!({"bundlePath": bundle, "memoryGB": 2, "cpuCount": 2}),
    );
    p.check("copy helper: startVM", ok(&r), &r);
    let up = poll_connected(copy_socket, Duration::from_secs(600));
    p.check("copy helper: connected", up.is_some(), "timed out");
    if up.is_some() {
        for round in 1..=runs {
            let v = coworkvm_tests::cowork::copy_version(round);
            let t = Instant::now();
            let (r, took) = install(&mut cpipe, &v);
            p.check(&format!("copy {round}: installSdk {v} (copy)"), ok(&r), &r);
            p.check(
                &format!("copy {round}: installSdk answers within the client's 30 s"),
                took < CLIENT_TIMEOUT.as_secs_f64(),
                format!("{took:.1} s"),
            );
            if !ok(&r) {
                continue;
            }
            answer.push(took);
            let id = format!("copied{round}");
            if !spawn_when_copied(p, &mut cpipe, &id, run_timeout) {
                continue;
            }
            let in_place = t.elapsed().as_secs_f64();
            ready.push(in_place);
            println!(
                "@@CLIENT figures copy {round}: installSdk answered in {took:.1} s, the runtime \
                 spawned after {in_place:.1} s"
            );
            if round < runs {
                // Only the spawn's acceptance counts; the next copy runs
                // without the runtime starting beside it.
                let _ = cpipe.call("kill", json!({"id": id, "signal": "SIGKILL"}));
                let _ = cev.exit_of(&id, Duration::from_secs(120));
                continue;
            }
            // The last copy is the installed runtime now, and it runs.
            let exit = cev.exit_of(&id, run_timeout);
            let out = cev.stdout(&id);
            p.check(
                "the copied runtime prints its version",
                out.contains(&runtime::version_line()) && exit_code(&exit) == Some(0),
                format!("{out:?} {exit:?} stderr {:?}", stderr_of(&cev, &id)),
            );
        }
    }
    let r = cpipe.call("stopVM", json!({}));
    p.check("copy helper: stopVM", ok(&r), &r);
    (answer, ready)
}
