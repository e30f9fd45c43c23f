//! End-to-end: the userspace virtio-vsock device with its hybrid Unix-socket
//! host side. The guest opens 4 concurrent streams to a host echo server
//! (1 MiB each way per stream, byte-checked) from privileged source ports,
//! is refused on a port nobody listens on and, from an unprivileged source
//! port, on the echo server's port, and accepts a stream the host opens with
//! `CONNECT <port>`.

use coworkvm_tests::{paths_or_skip, Batch, Case};

#[test]
fn vsock_streams_both_ways() {
    let Some(paths) = paths_or_skip() else { return };
    let dir = std::env::temp_dir().join(format!("coworkvm-e2e-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("vsock.cpio.zst");
    paths
        .guest_initramfs_with(
            &paths.root.join("tests/guest/vsock.init"),
            &initrd,
            &["vmw_vsock_virtio_transport"],
            vec![(paths.vsock_probe.clone(), "/bin/vsock-probe".into())],
        )
        .unwrap();
    let script = r#"
U=$TMPDIR/v.sock
$VSOCK_PROBE echo-server ${U}_5000 &
ES=$!
sleep 0.5
$COWORKVM boot --kernel $KERNEL --initrd $P/vsock.cpio.zst --cpus 2 --mem 256 \
    --cmdline quiet --vsock $U --console $TMPDIR/vsock-console.log &
VM=$!
i=0
while ! grep -q "@@VSOCK listening" $TMPDIR/vsock-console.log 2>/dev/null && [ $i -lt 900 ]; do
    sleep 0.1; i=$((i+1))
done
$VSOCK_PROBE host-connect $U 6000
wait $VM
rc=$?
kill $ES
grep -a "@@VSOCK" $TMPDIR/vsock-console.log | sed 's/^/guest: /'
exit $rc
"#;
    let batch = Batch {
        cases: vec![Case::new("vsock", script, 240)],
        files: vec![(initrd, "vsock.cpio.zst".into())],
        disks: vec![],
    };
    let result = batch.run(&paths).expect("the rig runs");
    let c = result.case("vsock");
    let ctx = || result.context("vsock");
    assert_eq!(c.rc, Some(0), "guest powered off cleanly\n{}", ctx());
    assert_eq!(
        c.lines_with("guest: @@VSOCK echo"),
        ["ok streams=4 bytes=1048576"],
        "{}",
        ctx()
    );
    let refused = c.lines_with("guest: @@VSOCK refused port=");
    assert!(
        refused.len() == 1 && refused[0].starts_with("5999"),
        "a port nobody listens on is refused: {refused:?}\n{}",
        ctx()
    );
    let unprivileged = c.lines_with("guest: @@VSOCK unprivileged refused port=");
    assert!(
        unprivileged.len() == 1 && unprivileged[0].starts_with("5000"),
        "a stream from an unprivileged source port is refused: {unprivileged:?}\n{}",
        ctx()
    );
    let host = c.lines_with("@@VSOCK host-connect OK");
    assert_eq!(host.len(), 1, "{}", ctx());
    let port: u32 = host[0].split_whitespace().next().unwrap().parse().unwrap();
    assert!(port >= 1 << 30, "host ports start at 2^30: {port}");
    assert!(host[0].ends_with("pong:ping"), "{}", ctx());
    assert_eq!(
        c.lines_with("guest: @@VSOCK listen got="),
        ["ping"],
        "{}",
        ctx()
    );
    std::fs::remove_dir_all(dir).unwrap();
}
