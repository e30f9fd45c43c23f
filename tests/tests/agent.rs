//! End-to-end: coworkvm-agent driven over the guest protocol from the host,
//! as the helper will drive it (see tests/src/bin/agent-probe.rs).

use coworkvm_tests::{paths_or_skip, Batch, Case};

#[test]
fn agent_serves_the_guest_protocol() {
    let Some(paths) = paths_or_skip() else { return };
    let script = r#"$AGENT_PROBE $TMPDIR/a.sock -- $COWORKVM boot --kernel $KERNEL \
    --initrd $P/agent.cpio.zst --cpus 2 --mem 256 --cmdline quiet \
    --vsock $TMPDIR/a.sock --console $TMPDIR/agent-console.log"#;
    let batch = Batch {
        cases: vec![Case::new("agent", script, 300)],
        files: vec![(paths.agent_initrd.clone(), "agent.cpio.zst".into())],
        disks: vec![],
    };
    let result = batch.run(&paths).expect("the rig runs");
    let c = result.case("agent");
    eprintln!("{}", c.output);
    let ctx = || result.context("agent");
    assert_eq!(c.rc, Some(0), "{}", ctx());
    for what in [
        "agent.info",
        "20 concurrent spawns: own output and exit code, nothing crossed",
        "isProcessRunning while it runs",
        "kill ends it with the signal reported",
        "isProcessRunning after kill",
        "the killed process's children are gone too",
        "readFile returns base64 of the file",
        "readFile refuses a path outside the session",
        "unknown method answered with -32601",
        "connection drop seen after the guest died",
    ] {
        assert!(
            c.has_line(&format!("@@AGENT pass {what}")),
            "{what}\n{}",
            ctx()
        );
    }
    // The guest died by panicking: the VMM says so with a non-zero exit.
    assert_eq!(c.lines_with("@@AGENT vmm-exit"), ["Some(1)"], "{}", ctx());
    assert_eq!(c.lines_with("@@AGENT drop-seen-ms").len(), 1, "{}", ctx());
}
