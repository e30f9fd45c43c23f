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
//! (HOME holds the runtime at `SDK_SUBPATH/VERSION/claude` with its
//! `.verified`; HOST_DIR the folders, `ref/ca.pem` the fake API's CA.)

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use coworkvm_tests::egress::FAKE_API_NAME as FAKE_API_HOST;
use coworkvm_tests::fakeapi::{write_prompt, RESULT_ERROR, RESULT_OK};
use coworkvm_tests::runtime;
use serde_json::{json, Value};

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

fn rel(p: &Path) -> String {
    p.to_string_lossy().trim_start_matches('/').to_owned()
}

/// The env the client sends with a runtime spawn, plus the fake API's
/// address and CA (what a user pointing the runtime elsewhere would set).
fn runtime_env() -> Value {
    let mnt = format!("/sessions/{NAME}/mnt");
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
    let m = |path: String, mode: &str| json!({"path": path, "mode": mode});
    let mounts = json!({
        "outputs": m(rel(&t.join("outputs")), "rw"),
        ".claude": m(rel(&t.join("claude")), "rw"),
        ".claude/skills": m(rel(&t.join("claude/skills")), "ro"),
        "uploads": m(rel(&t.join("uploads")), "rw"),
        "project": m(rel(&t.join("project")), "rwd"),
        "ref": m(rel(&t.join("ref")), "ro"),
    });
    let spawn_runtime = |pipe: &mut Pipe, id: &str, args: Vec<String>, resume: bool| {
        pipe.call(
            "spawn",
            json!({"id": id, "name": NAME, "command": "/usr/local/bin/claude", "args": args,
                   "cwd": format!("/sessions/{NAME}"), "env": runtime_env(),
                   "additionalMounts": mounts, "allowedDomains": [FAKE_API_HOST],
                   "oauthToken": TOKEN, "isResume": resume, "oneShot": false,
                   "mountSkeletonHome": false}),
        )
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

    // 3. A non-interactive run against the fake API: a Write into outputs.
    let mnt = format!("/sessions/{NAME}/mnt");
    let print_args = |prompt: String| -> Vec<String> {
        let mut a: Vec<String> = vec!["-p".into(), prompt];
        a.extend(PRINT_FLAGS.iter().map(|s| s.to_string()));
        a
    };
    let t3 = Instant::now();
    let r = spawn_runtime(
        &mut pipe,
        "write",
        print_args(format!(
            "WRITE {mnt}/outputs/from-claude.txt written-by-claude"
        )),
        false,
    );
    p.check("spawn claude -p (a Write into outputs)", ok(&r), &r);
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
    p.check(
        "claude -p exits 0",
        exit_code(&exit) == Some(0),
        format!("{exit:?}"),
    );
    p.check(
        "the fake API saw the Write succeed",
        out.contains(RESULT_OK),
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

    let r = spawn_runtime(
        &mut pipe,
        "ro",
        print_args(write_prompt(
            &format!("{mnt}/ref/not-here.txt"),
            "must-not-appear",
        )),
        false,
    );
    p.check("spawn claude -p (a Write into a ro mount)", ok(&r), &r);
    let exit = ev.exit_of("ro", run_timeout);
    let out = ev.stdout("ro");
    p.check(
        "a Write into a ro mount is refused",
        out.contains(RESULT_ERROR) && !t.join("ref/not-here.txt").exists(),
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
