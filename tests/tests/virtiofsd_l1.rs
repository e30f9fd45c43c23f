//! The rig carries the virtiofsd of `make build` (`$VIRTIOFSD`; in L1 at
//! `/usr/lib/coworkvm/virtiofsd`, where coworkvm's package installs it), and
//! it runs there the way the share keeper runs it: as an unprivileged user,
//! with its `--sandbox namespace` (user, mount, pid and net namespaces, then
//! pivot_root into the shared directory). This needs unprivileged user
//! namespaces in L1's kernel and a root that pivot_root accepts, which the
//! initramfs's rootfs is not (L1's init runs from a bind mount of it).

use coworkvm_tests::{paths_or_skip, Batch, Case, Mode, VIRTIOFSD_IN_L1};

/// Runs `sh FILE` as uid/gid 1000: util-linux setpriv where there is one (a
/// host in direct mode), else busybox su with a passwd entry (L1 has only
/// busybox, and its /etc is its own); as is when not root.
const AS_USER: &str = r#"
as_user() {
    if [ "$(id -u)" != 0 ]; then
        sh "$1"
    elif command -v setpriv >/dev/null && setpriv --help 2>&1 | grep -q reuid; then
        setpriv --reuid=1000 --regid=1000 --clear-groups sh "$1"
    else
        mkdir -p /etc
        grep -q '^rigu:' /etc/passwd 2>/dev/null || echo 'rigu:x:1000:1000::/tmp:/bin/sh' >>/etc/passwd
        busybox su -s /bin/sh rigu -c "sh $1"
    fi
}
bb() { if command -v "$1" >/dev/null; then "$@"; else busybox "$@"; fi; }
"#;

const CASE: &str = r#"
echo "@@VFSD path=$VIRTIOFSD"
echo "@@VFSD version=$($VIRTIOFSD --version)"
echo "@@VFSD userns_clone=$(cat /proc/sys/kernel/unprivileged_userns_clone 2>/dev/null || echo absent)"
echo "@@VFSD max_user_namespaces=$(cat /proc/sys/user/max_user_namespaces)"
d=$(mktemp -d)
mkdir "$d/shared" "$d/sock"
echo hello >"$d/shared/file"
bb chown -R 1000:1000 "$d"
chmod 0755 "$d"

# A user namespace and a mount namespace as that user.
cat >"$d/unshare.sh" <<EOF
echo "@@VFSD user uid=\$(id -u)"
bb() { if command -v "\$1" >/dev/null; then "\$@"; else busybox "\$@"; fi; }
bb unshare -U -m -r sh -c 'echo "@@VFSD unshare uid=\$(id -u)"'
EOF
as_user "$d/unshare.sh"

# virtiofsd as that user with its namespace sandbox and the share keeper's
# id translation: it logs that it waits for the VMM only after the sandbox
# is set up.
cat >"$d/vfsd.sh" <<EOF
echo \$\$ >"$d/pid"
exec setsid "$VIRTIOFSD" --socket-path "$d/sock/fs.sock" --shared-dir "$d/shared" \
    --sandbox namespace --inode-file-handles=never --cache auto --log-level info \
    --translate-uid squash-guest:0:1000:4294967295 --translate-gid squash-guest:0:1000:4294967295 \
    --translate-uid host:1000:60000:1 --translate-gid host:1000:60000:1 \
    2>"$d/log"
EOF
as_user "$d/vfsd.sh" &
i=0
while [ $i -lt 100 ] && ! grep -q 'Waiting for vhost-user socket connection' "$d/log" 2>/dev/null; do
    sleep 0.2; i=$((i+1))
done
sed 's/^/@@VFSD log: /' "$d/log"
[ -S "$d/sock/fs.sock" ] && echo "@@VFSD socket"
sid=$(cat "$d/pid")
n=0
for st in /proc/[0-9]*/stat; do
    set -- $(cat "$st" 2>/dev/null)
    [ "$6" = "$sid" ] || continue
    n=$((n+1))
    echo "@@VFSD proc $2 uid=$(grep '^Uid:' /proc/$1/status | cut -f2)"
done
[ $n -gt 0 ] && echo "@@VFSD alive"
for st in /proc/[0-9]*/stat; do
    set -- $(cat "$st" 2>/dev/null)
    [ "$6" = "$sid" ] && kill -9 "$1" 2>/dev/null
done
wait
exit 0
"#;

#[test]
fn virtiofsd_runs_its_namespace_sandbox_as_an_unprivileged_user_in_l1() {
    let Some(paths) = paths_or_skip() else { return };
    let batch = Batch {
        cases: vec![Case::new("virtiofsd", &format!("{AS_USER}{CASE}"), 120)],
        files: vec![],
        disks: vec![],
    };
    let result = batch.run(&paths).expect("the rig runs");
    let case = result.case("virtiofsd");
    let report = result.report();
    assert!(case.passed(), "{report}");
    assert_eq!(
        case.lines_with("@@VFSD version="),
        ["virtiofsd 1.14.0"],
        "{report}"
    );
    assert_eq!(case.lines_with("@@VFSD unshare uid="), ["0"], "{report}");
    assert!(
        case.output
            .contains("Waiting for vhost-user socket connection"),
        "virtiofsd's sandbox did not come up:\n{report}"
    );
    assert!(case.has_line("@@VFSD socket"), "{report}");
    assert!(case.has_line("@@VFSD alive"), "{report}");
    if result.mode == Mode::L1 {
        // In L1 the tool is where coworkvm's package puts it, and the case
        // ran as root, so the probes ran as uid 1000.
        assert_eq!(
            case.lines_with("@@VFSD path="),
            [VIRTIOFSD_IN_L1],
            "{report}"
        );
        assert_eq!(case.lines_with("@@VFSD user uid="), ["1000"], "{report}");
        for line in case.lines_with("@@VFSD proc ") {
            assert!(line.ends_with("uid=1000"), "{line}\n{report}");
        }
    }
}
