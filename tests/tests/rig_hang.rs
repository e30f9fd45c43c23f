//! The rig survives a hung L1: a case plays one (it stops L1's heartbeat
//! and goes quiet, as L1 did when `make bench` hung under TCG), the runner
//! ends that L1 after the silence limit instead of waiting for the case
//! time-outs, and runs the cases it had not finished in a fresh L1, once.
//! A case that is quiet for longer than the silence limit is not a hang:
//! L1's heartbeat keeps it alive.
//! Needs only the kernel and busybox (`make kernel`), like rig_qemu_l2.

use std::time::Duration;

use coworkvm_tests::{base_paths_or_skip, Batch, Case, RunOptions, Scratch};

/// Written to the disk by the first run of the case that hangs, so that
/// its second run (in the fresh L1) passes instead of hanging again.
const FLAG: &str = "hung-once";
const SILENCE: Duration = Duration::from_secs(20);
/// The hanging case's own time-out: far beyond what the recovery may take.
const FREEZE_TIMEOUT_S: u64 = 900;

#[test]
fn a_hung_l1_is_ended_and_its_unfinished_cases_rerun_in_a_fresh_one() {
    // The hang and its recovery are L1's; on a host whose KVM boots Linux
    // the rig would run the cases directly.
    std::env::set_var("COWORKVM_RIG", "l1");
    let Some(paths) = base_paths_or_skip() else {
        return;
    };
    let dir = Scratch::new("hang").unwrap();
    let disk = dir.path.join("flag.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let freeze = format!(
        r#"if [ "$(head -c {n} $DISK0)" = "{FLAG}" ]; then echo "@@HANG second-run"; exit 0; fi
printf {FLAG} | dd of=$DISK0 conv=notrunc 2>/dev/null
sync
echo "@@HANG freezing"
kill -STOP $RIG_HEARTBEAT_PID
sleep 600
"#,
        n = FLAG.len()
    );
    let quiet = format!(
        "sleep {}; echo @@HANG quiet-done",
        SILENCE.as_secs() * 3 / 2
    );
    let batch = Batch {
        cases: vec![
            Case::new("first", "echo @@HANG first-ran", 60),
            // Longer than the silence limit without a word: the heartbeat
            // alone keeps this L1 alive.
            Case::new("quiet", &quiet, 120),
            Case::new("freeze", &freeze, FREEZE_TIMEOUT_S),
            Case::new("last", "echo @@HANG last-ran", 60),
        ],
        files: vec![],
        disks: vec![disk.clone()],
    };
    let opts = RunOptions {
        silence_limit: SILENCE,
    };
    let result = batch.run_with(&paths, &opts).expect("the rig runs");
    let report = result.report();

    assert_eq!(result.hangs.len(), 1, "one hung L1\n{report}");
    assert!(
        result.hangs[0].contains("during case freeze"),
        "the hang names the case it cut\n{report}"
    );
    assert_eq!(
        result.rerun,
        ["freeze", "last"],
        "the unfinished cases, rerun once\n{report}"
    );
    let first = result.case("first");
    assert!(
        first.passed() && first.has_line("@@HANG first-ran"),
        "{report}"
    );
    assert_eq!(
        result.console.matches("@@RIG-BEGIN first").count(),
        1,
        "a finished case is not rerun\n{report}"
    );
    assert!(
        result.console.contains("@@HANG freezing"),
        "the first L1 ran the freeze\n{report}"
    );
    let quiet = result.case("quiet");
    assert!(
        quiet.passed() && quiet.has_line("@@HANG quiet-done"),
        "a quiet case is no hang while the heartbeat goes on\n{report}"
    );
    assert_eq!(
        result.console.matches("@@RIG-BEGIN quiet").count(),
        1,
        "{report}"
    );
    let freeze = result.case("freeze");
    assert!(
        freeze.passed() && freeze.has_line("@@HANG second-run"),
        "{report}"
    );
    let last = result.case("last");
    assert!(
        last.passed() && last.has_line("@@HANG last-ran"),
        "{report}"
    );
    assert_eq!(
        &std::fs::read(&disk).unwrap()[..FLAG.len()],
        FLAG.as_bytes(),
        "the first L1 wrote the flag before it froze"
    );
    // Bounded by two boots and the silence limit, not by the case time-out.
    assert!(
        result.wall < Duration::from_secs(FREEZE_TIMEOUT_S / 2),
        "took {:?}\n{report}",
        result.wall
    );
    eprintln!(
        "timing: recovered from the hang in a batch of {:.1} s (silence limit {:?}); L1 up \
         after {:.1} s",
        result.wall.as_secs_f64(),
        SILENCE,
        result.l1_up.unwrap_or_default().as_secs_f64()
    );
}
