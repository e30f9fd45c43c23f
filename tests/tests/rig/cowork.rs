//! A real Cowork session end to end, in a real VM from the Debian images:
//! `coworkvm -socket PATH` run as uid 1000 the way the client runs it,
//! driven by `client-probe --cowork` exactly as the client drives it, with
//! the real agent runtime (Claude Code's Linux binary from npm, pinned in
//! `coworkvm_tests::runtime`, fetched once into `build/claude-code/`) laid
//! out as the client lays it out (`$HOME/<sdkSubpath>/<version>/claude`
//! and `.verified`, here a read-only disk mounted there), and a fake
//! Messages API (`egress-upstream`) that the session reaches through its
//! egress proxy. See tests/src/bin/client-probe/cowork.rs for the checks:
//! installSdk within the client's timeout, `/usr/local/bin/claude
//! --version`, `claude -p` writing into the host's outputs folder, a
//! refused write into a read-only mount, a refused host, and a resumed
//! session after a restart. The probe prints the timings the benchmark
//! reports (`@@CLIENT start_to_connected_s`, `install_sdk_s`, ...).

use coworkvm_tests::{build_dir, cowork, images, runtime};
use coworkvm_tests::{paths_or_skip, Batch, Case};

#[test]
fn a_cowork_session_runs_the_real_runtime_end_to_end() {
    let Some(paths) = paths_or_skip() else { return };
    let Some(images) = images::images_or_skip(&paths.root) else {
        return;
    };
    let Some(claude) = coworkvm_tests::ok_or_skip(
        runtime::fetch(&build_dir(&paths.root)).map_err(|e| format!("the runtime: {e:#}")),
    ) else {
        return;
    };
    let rig = images::HelperDisks::new(&paths.root, &images, "cowork-e2e", false)
        .expect("the rig's disks");
    // The runtime as the client lays it out under its sdkSubpath, on the
    // third disk ($DISK2).
    let sdk_disk = cowork::runtime_disk(&claude, &rig.work, &[]).expect("runtime disk");
    let script = cowork::case_script("--cowork $S /bundle/c $T", 2);
    let batch = Batch {
        cases: vec![Case::new("cowork", &script, 2400)],
        files: vec![],
        disks: [&rig.disks[..], &[sdk_disk]].concat(),
    };
    let result = batch.run(&paths).expect("the rig runs");
    drop(rig);
    result.print_cases();

    let c = result.case("cowork");
    let ctx = || result.context("cowork");
    result.assert_client_passed(
        "cowork",
        &[
            "installSdk of the real runtime",
            "installSdk answers within the client's 30 s",
            "installSdk again (a client's retry) works",
            "the runtime prints its version on stdout",
            "--version exits 0",
            "claude -p exits 0",
            "the fake API saw the Write into outputs succeed",
            "the file appears in the host's outputs folder",
            "the file is owned by the host user",
            "a Write into a ro mount is refused",
            "a host not in allowedDomains is refused (403 blocked-by-allowlist)",
            "the resumed session sees its files",
            "the runtime's transcript is on the host in the .claude mount",
        ],
    );
    assert_eq!(c.lines_with("helper-rc="), ["0"], "{}", ctx());
    let api: usize = c.lines_with("fakeapi-requests=")[0].parse().unwrap_or(0);
    assert!(
        api >= 3,
        "the fake API did not see the runtime's three turns (two Writes, the answer)\n{}",
        ctx()
    );
    assert_eq!(
        c.lines_with("upstream-denied="),
        ["0"],
        "a request for denied.test reached the upstream\n{}",
        ctx()
    );
}
