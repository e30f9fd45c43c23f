//! End-to-end: `coworkvm run -- CMD` boots a VM whose /init is
//! coworkvm-agent, runs CMD in it over vsock, streams its output and stdin,
//! forwards Ctrl-C, and exits with CMD's exit code; 125 when coworkvm itself
//! failed, 126 when CMD cannot be executed, 127 when it is not found.

use coworkvm_tests::{paths_or_skip, Batch, Case};

const RUN: &str = "$COWORKVM run --kernel $KERNEL --initrd $P/agent.cpio.zst --cpus 2 --mem 256";

#[test]
fn run_streams_output_stdin_exit_codes_and_signals() {
    let Some(paths) = paths_or_skip() else { return };
    let exit_case = format!(
        r#"{RUN} -- sh -c 'echo out; echo err >&2; exit 3' > $TMPDIR/o 2> $TMPDIR/e
echo "rc=$?"
echo "stdout=[$(cat $TMPDIR/o)]"
echo "stderr=[$(grep -v '^coworkvm' $TMPDIR/e)]"
"#
    );
    let stdin_case = format!(
        r#"head -c 8388608 /dev/urandom > $TMPDIR/in
{RUN} -- cat < $TMPDIR/in > $TMPDIR/out
echo "rc=$?"
echo "in=$(sha256sum < $TMPDIR/in | cut -d' ' -f1) size=$(wc -c < $TMPDIR/in)"
echo "out=$(sha256sum < $TMPDIR/out | cut -d' ' -f1) size=$(wc -c < $TMPDIR/out)"
"#
    );
    let signal_case = format!(
        r#"{RUN} -- sh -c 'echo started; sleep 1000 & sleep 1000' > $TMPDIR/s 2>&1 &
VM=$!
i=0
while ! grep -q started $TMPDIR/s 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
kill -INT $VM
wait $VM
echo "rc=$?"
"#
    );
    let uuid_case = format!(
        r#"{RUN} --uuid 0F1E2D3C-4b5a-4968-8776-a5b4c3d2e1f0 -- cat /sys/class/dmi/id/product_uuid /sys/class/dmi/id/sys_vendor
echo "rc=$?"
"#
    );
    let batch = Batch {
        cases: vec![
            Case::new("uuid", &uuid_case, 180),
            Case::new("exit", &exit_case, 180),
            Case::new("stdin", &stdin_case, 300),
            Case::new("signal", &signal_case, 180),
        ],
        files: vec![(paths.agent_initrd.clone(), "agent.cpio.zst".into())],
        disks: vec![],
    };
    let result = batch.run(&paths).expect("the rig runs");
    result.print_cases();
    let ctx = |name: &str| result.context(name);

    let c = result.case("exit");
    assert_eq!(c.lines_with("rc="), ["3"], "{}", ctx("exit"));
    assert_eq!(c.lines_with("stdout="), ["[out]"], "{}", ctx("exit"));
    assert_eq!(c.lines_with("stderr="), ["[err]"], "{}", ctx("exit"));

    // SMBIOS type 1 reaches the guest's DMI in the text form, lowercase.
    let c = result.case("uuid");
    assert_eq!(c.lines_with("rc="), ["0"], "{}", ctx("uuid"));
    assert!(
        c.output
            .lines()
            .any(|l| l.trim() == "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"),
        "{}",
        ctx("uuid")
    );
    assert!(
        c.output.lines().any(|l| l.trim() == "coworkvm"),
        "{}",
        ctx("uuid")
    );

    let c = result.case("stdin");
    assert_eq!(c.lines_with("rc="), ["0"], "{}", ctx("stdin"));
    let input = c.lines_with("in=");
    let output = c.lines_with("out=");
    assert_eq!(input.len(), 1, "{}", ctx("stdin"));
    // Raw random bytes: binary-safe both ways (the spawn asks for base64
    // streams), not just text.
    assert!(
        input[0].ends_with("size=8388608"),
        "8 MiB of random bytes went in: {input:?}"
    );
    assert_eq!(
        input,
        output,
        "what came back is what went in\n{}",
        ctx("stdin")
    );

    let c = result.case("signal");
    assert_eq!(
        c.lines_with("rc="),
        ["130"],
        "Ctrl-C ends the command with SIGINT\n{}",
        ctx("signal")
    );
}

#[test]
fn run_exit_statuses_say_who_failed() {
    let Some(paths) = paths_or_skip() else { return };
    // Each case: the status, then the lines coworkvm wrote on stderr.
    let case = |cmd: &str| {
        format!("{cmd} > $TMPDIR/o 2> $TMPDIR/e\necho \"rc=$?\"\nsed 's/^/err| /' $TMPDIR/e\n")
    };
    let not_found = case(&format!("{RUN} -- /no/such/command"));
    let not_found_in_path = case(&format!("{RUN} -- no-such-command-anywhere"));
    let cannot_execute = case(&format!("{RUN} -- /"));
    let own_status = case(&format!("{RUN} -- sh -c 'exit 42'"));
    // The initramfs is no bzImage: the VMM stops before any agent.
    let boot_fails = case(
        "$COWORKVM run --kernel $P/agent.cpio.zst --initrd $P/agent.cpio.zst --cpus 1 --mem 256 -- true",
    );
    // No agent connects within a second.
    let agent_timeout = case(&format!("{RUN} --boot-timeout 1 -- true"));
    let batch = Batch {
        cases: vec![
            Case::new("not-found", &not_found, 180),
            Case::new("not-found-in-path", &not_found_in_path, 180),
            Case::new("cannot-execute", &cannot_execute, 180),
            Case::new("own-status", &own_status, 180),
            Case::new("boot-fails", &boot_fails, 180),
            Case::new("agent-timeout", &agent_timeout, 180),
        ],
        files: vec![(paths.agent_initrd.clone(), "agent.cpio.zst".into())],
        disks: vec![],
    };
    let result = batch.run(&paths).expect("the rig runs");
    result.print_cases();
    for (name, want) in [
        ("not-found", "127"),
        ("not-found-in-path", "127"),
        ("cannot-execute", "126"),
        ("own-status", "42"),
        ("boot-fails", "125"),
        ("agent-timeout", "125"),
    ] {
        let c = result.case(name);
        assert_eq!(c.lines_with("rc="), [want], "{}", result.context(name));
    }
    // A failed boot names the console log it kept.
    for name in ["boot-fails", "agent-timeout"] {
        let c = result.case(name);
        assert!(
            c.lines_with("err|")
                .iter()
                .any(|l| l.contains("the guest console log is")),
            "{}",
            result.context(name)
        );
    }
    let c = result.case("not-found");
    assert!(
        c.lines_with("err|")
            .iter()
            .any(|l| l.contains("/no/such/command")),
        "the reason names the command\n{}",
        result.context("not-found")
    );
}
