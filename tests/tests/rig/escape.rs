//! Adversarial, end to end: what one session (or guest root) can do to the
//! agent channel, to other sessions and to the host, in real VMs booted
//! from the Debian images.
//!
//! - `escape`: `coworkvm -socket PATH` driven by `client-probe --escape` as
//!   the client drives it, with a victim and an attacker session in one VM:
//!   AF_VSOCK, packet sockets and io_uring denied to sessions; the victim's
//!   environment never reaches the attacker; each session sees only its own
//!   user and files; readFile traps (FIFO, symlink, `..`, a 1 GiB sparse
//!   file) refused at once; a stdin flood and a fork bomb in one session do
//!   not stall another; the VMM runs with no_new_privs under seccomp; a
//!   symlinked session disk is refused and its target untouched. The
//!   helper's log must show one agent connection and no other dialer.
//! - `root-ports`: guest root outside any sandbox (`coworkvm run`, as
//!   `ssh root@vm` would) opens AF_VSOCK streams to the agent's host port:
//!   from an unprivileged source port the host answers RST; from a
//!   privileged one the stream gets past that rule to the host side (where
//!   `coworkvm run` has closed its listener after the agent's one
//!   connection), so the refusal is the port rule, not a broken device. Guest root also opens 1,000 streams from privileged
//!   ports to a port with no host listener: the VMM answers each with RST
//!   and holds no descriptor for any of them.

use coworkvm_tests::images;
use coworkvm_tests::{paths_or_skip, Batch, Case};

/// Both cases run in one L1: the first mounts the disks, the second finds
/// them mounted.
const SETUP: &str = r#"mkdir -p /images /bundle
grep -q " /images " /proc/mounts || mount -o ro $DISK0 /images || exit 90
grep -q " /bundle " /proc/mounts || mount $DISK1 /bundle || exit 91
export HOME=$TMPDIR/home COWORKVM_IMAGES=/images
mkdir -p $HOME $TMPDIR/run /bundle/c
chmod 700 $TMPDIR/run
"#;

const ESCAPE: &str = r#"S=$TMPDIR/run/cowork.sock
$COWORKVM -socket $S 2> $TMPDIR/helper.log &
H=$!
i=0; while [ ! -S $S ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
$CLIENT_PROBE --escape $S /bundle/c
echo "probe-rc=$?"
kill -TERM $H
wait $H
echo "helper-rc=$?"
echo "agent-connections=$(grep -c 'guest agent connected' $TMPDIR/helper.log)"
echo "refused-agent-connections=$(grep -c 'refused another connection on the guest agent' $TMPDIR/helper.log)"
echo "secret-lines=$(grep -c victim-secret-5b1e $TMPDIR/helper.log)"
echo "log-lines=$(wc -l < $TMPDIR/helper.log)"
sed 's/^/helper| /' $TMPDIR/helper.log | tail -n 60
"#;

/// Perl as guest root: streams to CID 2 port 51234 from chosen source
/// ports (0: the kernel picks one above 1023), and 1,000 streams to a port
/// nobody listens on.
const ROOT_PORTS: &str = r#"cat > $TMPDIR/ports.pl <<'PERL'
sub vs { my ($src, $port) = @_;
  socket(my $s, 40, 1, 0) or return "socket:" . ($!+0);
  if ($src) { bind($s, pack("SSLLCx3", 40, 0, $src, 0xFFFFFFFF, 0)) or return "bind:" . ($!+0); }
  connect($s, pack("SSLLCx3", 40, 0, $port, 2, 0)) or return "connect:" . ($!+0);
  return "connected"; }
print "unpriv=", vs(2000, 51234), "\n";
print "auto=", vs(0, 51234), "\n";
print "priv=", vs(1000, 51234), "\n";
my %seen;
for my $i (1..1000) { $seen{vs($i, 40000)}++ }
print "flood=", join(",", map { "$_:$seen{$_}" } sort keys %seen), "\n";
PERL
$COWORKVM run --bundle /bundle/r --images /images --cpus 1 --mem 512 -- perl -e "$(cat $TMPDIR/ports.pl)" > $TMPDIR/ports.out 2> $TMPDIR/ports.err &
R=$!
max=0
while kill -0 $R 2>/dev/null; do
  v=$(for d in /proc/[0-9]*; do tr '\0' ' ' < $d/cmdline 2>/dev/null | grep -q '^/bin/coworkvm run' && echo ${d#/proc/}; done | head -n 1)
  if [ -n "$v" ]; then n=$(ls /proc/$v/fd 2>/dev/null | wc -l); [ "$n" -gt "$max" ] && max=$n; fi
  sleep 0.5
done
wait $R
echo "run-rc=$?"
echo "vmm-fd-max=$max"
cat $TMPDIR/ports.out
sed 's/^/run| /' $TMPDIR/ports.err | tail -n 30
"#;

#[test]
fn sessions_cannot_escape_or_starve_each_other() {
    let Some(paths) = paths_or_skip() else { return };
    let Some(images) = images::images_or_skip(&paths.root) else {
        return;
    };
    let rig = images::HelperDisks::new(&paths.root, &images, "escape-e2e", false)
        .expect("the rig's disks");
    let batch = Batch {
        cases: vec![
            Case::new("escape", &format!("{SETUP}{ESCAPE}"), 1500),
            Case::new("root-ports", &format!("{SETUP}{ROOT_PORTS}"), 900),
        ],
        files: vec![],
        disks: rig.disks.clone(),
    };
    let result = batch.run(&paths).expect("the rig runs");
    drop(rig);
    result.print_cases();

    let c = result.case("escape");
    let ctx = || result.context("escape");
    result.assert_client_passed(
        "escape",
        &[
            "isGuestConnected turns true",
            "the VMM has no_new_privs",
            "the VMM runs under a seccomp filter",
            "the VMM's root is its vsock directory",
            "the victim runs with its environment",
            "a session cannot create an AF_VSOCK socket",
            "a session cannot create datagram vsock or packet sockets",
            "a session keeps inet and unix sockets",
            "a session cannot set up io_uring",
            "the attacker read environments, none the victim's",
            "the attacker's passwd does not name the victim's user",
            "the attacker cannot read the victim's files",
            "readFile of a FIFO is refused at once",
            "readFile of a symlink to another session's file is refused at once",
            "readFile of the agent's users.json through .. is refused at once",
            "readFile of a 1 GiB sparse file is refused at once",
            "another session's isProcessRunning answers during a stdin flood",
            "another session runs while a fork bomb goes off",
            "the guest is still connected",
            "startVM refuses a symlinked session disk",
            "the canary is untouched",
        ],
    );
    assert_eq!(c.lines_with("helper-rc="), ["0"], "{}", ctx());
    // One boot in this case, so one agent connection, and no other
    // dialer ever reached the agent's port.
    assert_eq!(
        c.lines_with("agent-connections="),
        ["1"],
        "the agent channel changed hands\n{}",
        ctx()
    );
    assert_eq!(
        c.lines_with("refused-agent-connections="),
        ["0"],
        "something besides the agent dialed the agent's port\n{}",
        ctx()
    );
    assert_eq!(
        c.lines_with("secret-lines="),
        ["0"],
        "a secret reached the log\n{}",
        ctx()
    );

    // 300 refused stdin chunks are 300 guest error events: the helper's log
    // must not grow with what a guest sends.
    let log_lines: usize = c.lines_with("log-lines=")[0]
        .trim()
        .parse()
        .unwrap_or(usize::MAX);
    assert!(
        log_lines < 150,
        "{log_lines} helper log lines: guest events flood the log\n{}",
        ctx()
    );

    let c = result.case("root-ports");
    let ctx = || result.context("root-ports");
    assert_eq!(c.lines_with("run-rc="), ["0"], "{}", ctx());
    // ECONNRESET (104): the VMM answered the request with RST.
    assert_eq!(
        c.lines_with("unpriv="),
        ["connect:104"],
        "an unprivileged source port reached the agent's port\n{}",
        ctx()
    );
    assert_eq!(c.lines_with("auto="), ["connect:104"], "{}", ctx());
    // A privileged source port passes the rule and reaches the host side:
    // `coworkvm run` uses the helper's agent client, which accepts the
    // connection and closes it unread (one agent connection per boot).
    assert_eq!(c.lines_with("priv="), ["connected"], "{}", ctx());
    assert!(
        c.output
            .contains("unprivileged port: guest port 2000 to host port 51234"),
        "the VMM did not refuse port 2000 by the port rule\n{}",
        ctx()
    );
    assert!(
        c.output
            .contains("refused another connection on the guest agent's port"),
        "the privileged port 1000 got past the port rule but was not refused as a \
         second agent connection\n{}",
        ctx()
    );
    assert_eq!(
        c.lines_with("flood="),
        ["connect:104:1000"],
        "each of 1,000 streams to a port with no host listener gets RST\n{}",
        ctx()
    );
    let fds: usize = c.lines_with("vmm-fd-max=")[0].parse().unwrap_or(usize::MAX);
    assert!(
        (1..256).contains(&fds),
        "the VMM (run's process) held {fds} fds while the guest opened 1,000 streams\n{}",
        ctx()
    );
}
