//! `make bench` starts virtiofsd itself, in the rig, for coworkvm and for
//! QEMU alike (coworkvm_tests::bench::fs); its flags must be the share
//! keeper's, or the benchmark measures a virtiofsd the helper never runs.

#[test]
fn the_bench_runs_virtiofsd_with_the_share_keepers_flags() {
    for (uid, gid) in [(1000, 1000), (1000, 1001), (0, 0)] {
        assert_eq!(
            coworkvm_tests::bench::fs::keeper_flags(uid, gid),
            coworkvm_helper::share::virtiofsd_flags(uid, gid)
        );
    }
}
