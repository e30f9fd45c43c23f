//! The shared-folder part of `make bench`: the same workload in a folder
//! shared through virtio-fs, under coworkvm and under QEMU microvm with the
//! same virtiofsd, and on a virtio-blk ext4 disk under coworkvm for
//! reference.
//!
//! Workload (guest `tests/guest/fs-bench.init`, timed by the guest's clock):
//! a sequential write of N MiB (`dd bs=1M conv=fsync`), the sequential read
//! of that file with the guest's caches dropped, the extraction of a
//! tarball of small files the bench makes itself ([`write_source_tarball`])
//! followed by `sync`, and, caches dropped again, `find` of the extracted
//! tree and `stat` of every entry.
//!
//! Each run is one rig case ([`run_script`]) with the three boots in an
//! order that rotates from run to run. virtiofsd runs as an unprivileged
//! user (uid 1000) with the share keeper's own flags ([`keeper_flags`]), on
//! a fresh empty directory per boot; the ext4 image and that directory both
//! live in the same tmpfs, so neither backend touches a disk.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::stats;

/// `bench.label` of coworkvm with virtio-fs.
pub const COWORKVM_FS: &str = "coworkvm-virtiofs";
/// `bench.label` of QEMU microvm with virtio-fs.
pub const QEMU_FS: &str = "qemu-virtiofs";
/// `bench.label` of coworkvm with the virtio-blk ext4 disk.
pub const COWORKVM_BLK: &str = "coworkvm-blk";
/// The three, in the order of the first run.
pub const LABELS: [&str; 3] = [COWORKVM_FS, QEMU_FS, COWORKVM_BLK];

/// The uid and gid virtiofsd runs as in the case, like the helper's user.
pub const SHARE_USER_ID: u32 = 1000;
/// Guest memory and vCPUs of every boot.
pub const GUEST_MEM_MIB: u64 = 512;
/// Where the tarball is in the guest's initramfs.
pub const TARBALL_IN_GUEST: &str = "/bench/src.tar";
/// Files per leaf directory and leaf directories per top directory of the
/// tarball's tree (a source tree's shape: many directories of a few dozen
/// files).
const FILES_PER_DIR: u32 = 20;
const DIRS_PER_TOP: u32 = 5;
/// Bounds of the tarball's file sizes (bytes): small source files.
const MIN_FILE: u64 = 64;
const MAX_FILE: u64 = 8192;

/// What the shared-folder benchmark does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Runs, each booting all three guests once.
    pub runs: u32,
    /// Times each boot runs the workload (each in a new directory).
    pub reps: u32,
    /// Size of the sequential file.
    pub mib: u64,
    /// Files in the tarball.
    pub files: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 3,
            reps: 1,
            mib: 256,
            files: 5000,
        }
    }
}

impl Options {
    /// Refuses sizes the guest or L1 cannot hold: the sequential file and
    /// the ext4 image live in L1's tmpfs, the tarball in the guest's RAM.
    pub fn validate(&self) -> Result<()> {
        if !(1..=512).contains(&self.mib) {
            bail!("--fs-mib {}: 1 to 512", self.mib);
        }
        if !(1..=20_000).contains(&self.files) {
            bail!("--fs-files {}: 1 to 20000", self.files);
        }
        if self.runs > 20 {
            bail!("--fs-runs {}: at most 20", self.runs);
        }
        if !(1..=10).contains(&self.reps) {
            bail!("--fs-reps {}: 1 to 10", self.reps);
        }
        Ok(())
    }
}

/// virtiofsd's flags as the share keeper gives them (one definition:
/// `socket_proto::guest::virtiofsd_flags`).
pub use socket_proto::guest::virtiofsd_flags as keeper_flags;

/// What [`write_source_tarball`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceTree {
    pub files: u32,
    pub dirs: u32,
    pub file_bytes: u64,
    pub tar_bytes: u64,
}

/// Size of file `i` of the tree: spread over [MIN_FILE, MAX_FILE), the
/// same on every run (a multiplicative hash, no state).
fn file_size(i: u32) -> u64 {
    let x = (u64::from(i) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    MIN_FILE + (x >> 33) % (MAX_FILE - MIN_FILE)
}

/// An octal tar header field: zero-padded digits and a NUL.
fn octal(field: &mut [u8], value: u64) {
    let digits = format!("{value:0width$o}\0", width = field.len() - 1);
    field.copy_from_slice(digits.as_bytes());
}

/// A POSIX ustar header for `name` (< 100 bytes): root-owned, mtime 0.
fn ustar_header(name: &str, size: u64, dir: bool) -> [u8; 512] {
    assert!(name.len() < 100, "tar name {name} too long for ustar");
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], if dir { 0o755 } else { 0o644 });
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 0);
    h[156] = if dir { b'5' } else { b'0' };
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum counts its own field as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Writes a ustar archive of `files` small text files, source-tree shaped
/// (`dNNN/sN/fNNNNN.c`, 20 files a directory, 5 directories under each top
/// one, 64 B to 8 KiB each), made by the bench so every run and every VMM
/// extracts the same bytes.
pub fn write_source_tarball(out: &Path, files: u32) -> Result<SourceTree> {
    let f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let mut tree = SourceTree {
        files: 0,
        dirs: 0,
        file_bytes: 0,
        tar_bytes: 0,
    };
    let mut put = |w: &mut std::io::BufWriter<std::fs::File>, bytes: &[u8]| -> Result<()> {
        w.write_all(bytes)?;
        tree.tar_bytes += bytes.len() as u64;
        Ok(())
    };
    let mut line = String::new();
    for i in 0..files {
        let leaf = i / FILES_PER_DIR;
        let top = leaf / DIRS_PER_TOP;
        if i % (FILES_PER_DIR * DIRS_PER_TOP) == 0 {
            put(&mut w, &ustar_header(&format!("d{top:03}/"), 0, true))?;
            tree.dirs += 1;
        }
        if i % FILES_PER_DIR == 0 {
            let name = format!("d{top:03}/s{}/", leaf % DIRS_PER_TOP);
            put(&mut w, &ustar_header(&name, 0, true))?;
            tree.dirs += 1;
        }
        let size = file_size(i);
        let name = format!("d{top:03}/s{}/f{i:05}.c", leaf % DIRS_PER_TOP);
        put(&mut w, &ustar_header(&name, size, false))?;
        let mut body = Vec::with_capacity(size as usize + 64);
        let mut k = 0;
        while (body.len() as u64) < size {
            line.clear();
            let _ = writeln!(line, "/* bench source file {i}, line {k} */");
            body.extend_from_slice(line.as_bytes());
            k += 1;
        }
        body.truncate(size as usize);
        body.resize(size.div_ceil(512) as usize * 512, 0);
        put(&mut w, &body)?;
        tree.files += 1;
        tree.file_bytes += size;
    }
    put(&mut w, &[0u8; 1024])?;
    w.flush()?;
    Ok(tree)
}

/// Size of the ext4 image: the sequential file, the extracted tree (4 KiB
/// blocks: small files take a block each) and room for the journal.
/// The trees of all repetitions of a boot stay until its end.
pub fn ext4_image_mib(opts: &Options, tree: &SourceTree) -> u64 {
    let tree_mib = (u64::from(tree.files + tree.dirs) * 4096).div_ceil(1 << 20);
    opts.mib + (u64::from(opts.reps) + 1) * tree_mib + 64
}

/// An empty ext4 image for the reference disk, its inode tables and
/// journal written now (no lazy init running in the guest during the runs).
pub fn make_ext4_image(out: &Path, size_mib: u64) -> Result<()> {
    let _ = std::fs::remove_file(out);
    let o = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(out)
        .arg(format!("{size_mib}M"))
        .output()
        .context("mkfs.ext4 (Debian package e2fsprogs)")?;
    if !o.status.success() {
        bail!(
            "mkfs.ext4 {}: {}",
            out.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// Runs `sh FILE` as uid/gid [`SHARE_USER_ID`] when root (util-linux or
/// busybox setpriv, else busybox su with a passwd entry: L1 has only
/// busybox); as is when not root.
const AS_USER: &str = r#"as_user() {
    if [ "$(id -u)" != 0 ]; then
        sh "$1"
    elif setpriv --help 2>&1 | grep -q reuid; then
        setpriv --reuid=@UID@ --regid=@UID@ --clear-groups sh "$1"
    else
        mkdir -p /etc
        grep -q '^rigu:' /etc/passwd 2>/dev/null || echo 'rigu:x:@UID@:@UID@::/tmp:/bin/sh' >>/etc/passwd
        busybox su -s /bin/sh rigu -c "sh $1"
    fi
}
bb() { if command -v "$1" >/dev/null; then "$@"; else busybox "$@"; fi; }
"#;

/// The rig case of run `run` (0-based): the three boots, in an order that
/// rotates with `run`, each printing the guest's `@@FS-BENCH` line and
/// then `@@FS-VMM LABEL rc=N`. `disk` is the batch disk holding the empty
/// ext4 image; the case copies it into `$TMPDIR` (tmpfs in L1), beside
/// the shared directory.
pub fn run_script(run: u32, opts: &Options, disk: usize) -> String {
    let tag = socket_proto::guest::SHARE_TAG;
    let mib = format!("{} bench.reps={}", opts.mib, opts.reps);
    let mem = GUEST_MEM_MIB;
    let flags = keeper_flags(SHARE_USER_ID, SHARE_USER_ID).join(" ");
    let cmdline = super::CMDLINE;
    let mut order = String::new();
    for k in 0..LABELS.len() {
        let label = LABELS[(k + run as usize) % LABELS.len()];
        let _ = writeln!(order, "boot_{} || rc=1", label.replace('-', "_"));
    }
    let as_user = AS_USER.replace("@UID@", &SHARE_USER_ID.to_string());
    format!(
        r#"set -u
{as_user}
QEMU="{qemu}"
FS=$TMPDIR/fsbench
mkdir -p $FS && chmod 755 $FS
rc=0
if [ ! -f $FS/blk.img ]; then
    dd if=$DISK{disk} of=$FS/blk.img bs=1M 2>/dev/null || {{ echo "@@FS-BENCH-ERROR copying the ext4 image"; exit 90; }}
fi
# A fresh empty shared directory, and virtiofsd on it as the share keeper
# runs it: unprivileged, its namespace sandbox, the keeper's flags.
vfsd_start() {{
    rm -rf $FS/share $FS/sock
    mkdir -p $FS/share $FS/sock
    bb chown {uid}:{uid} $FS/share $FS/sock
    # The pid and the log go where that user may write.
    cat >$FS/vfsd.sh <<EOF
echo \$\$ >$FS/sock/vfsd.pid
exec $VIRTIOFSD --socket-path=$FS/sock/fs.sock --shared-dir=$FS/share {flags} 2>$FS/sock/vfsd.log
EOF
    as_user $FS/vfsd.sh &
    i=0
    while [ ! -S $FS/sock/fs.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
    [ -S $FS/sock/fs.sock ] && return 0
    echo "@@FS-BENCH-ERROR virtiofsd did not listen: $(cat $FS/sock/vfsd.log)"
    return 1
}}
# virtiofsd ends when its VMM disconnects; one still there after 10 s is
# reported and killed.
vfsd_end() {{
    pid=$(cat $FS/sock/vfsd.pid 2>/dev/null || true)
    i=0
    while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        echo "@@FS-BENCH-ERROR virtiofsd $pid still running 10 s after its VMM: killed"
        kill -9 "$pid"
    fi
    wait
    grep -i -E 'error|panic' $FS/sock/vfsd.log | head -n 5 | sed 's/^/virtiofsd: /'
    rm -rf $FS/share $FS/sock
}}
boot_coworkvm_virtiofs() {{
    vfsd_start || return 1
    timeout -s KILL 900 $COWORKVM boot --kernel $KERNEL --initrd $P/fsbench.cpio.zst --cpus 1 \
        --mem {mem} --cmdline "quiet bench.fs=virtiofs bench.tag={tag} bench.label={COWORKVM_FS} bench.mib={mib}" \
        --fs-socket $FS/sock/fs.sock --fs-tag {tag}
    r=$?
    echo "@@FS-VMM {COWORKVM_FS} rc=$r"
    vfsd_end
    return $r
}}
boot_qemu_virtiofs() {{
    vfsd_start || return 1
    timeout -s KILL 900 $QEMU -M microvm,memory-backend=mem -enable-kvm -cpu host -smp 1 -m {mem} \
        -object memory-backend-memfd,id=mem,size={mem}M,share=on -global virtio-mmio.force-legacy=false \
        -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
        -kernel $KERNEL -initrd $P/fsbench.cpio.zst \
        -append "{cmdline} bench.fs=virtiofs bench.tag={tag} bench.label={QEMU_FS} bench.mib={mib}" \
        -chardev socket,id=fs,path=$FS/sock/fs.sock \
        -device vhost-user-fs-device,chardev=fs,tag={tag},queue-size=1024
    r=$?
    echo "@@FS-VMM {QEMU_FS} rc=$r"
    vfsd_end
    return $r
}}
boot_coworkvm_blk() {{
    timeout -s KILL 900 $COWORKVM boot --kernel $KERNEL --initrd $P/fsbench.cpio.zst --cpus 1 \
        --mem {mem} --cmdline "quiet bench.fs=blk bench.label={COWORKVM_BLK} bench.mib={mib}" \
        --disk $FS/blk.img
    r=$?
    echo "@@FS-VMM {COWORKVM_BLK} rc=$r"
    return $r
}}
{order}exit $rc
"#,
        qemu = crate::qemu::SH,
        uid = SHARE_USER_ID,
    )
}

/// One guest's `@@FS-BENCH` result.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Sample {
    pub label: String,
    pub fs: String,
    /// Repetition in its boot, from 1.
    #[serde(default)]
    pub rep: u32,
    pub mib: u64,
    /// Bytes of the sequential file after the write.
    pub size: u64,
    pub write_us: u64,
    pub read_us: u64,
    pub extract_us: u64,
    pub find_stat_us: u64,
    /// Lines `find` printed (the tree's root, directories and files) and
    /// sizes `stat` printed for them.
    pub entries: u64,
    pub stats: u64,
    pub files: u64,
    pub file_bytes: u64,
}

impl Sample {
    /// Why this result does not show the workload done in full, if it
    /// does not: a short file, a partial extraction, a missed stat.
    pub fn check(&self, opts: &Options, tree: &SourceTree) -> Result<(), String> {
        let want_entries = u64::from(tree.files + tree.dirs) + 1;
        if self.size != opts.mib << 20 {
            return Err(format!(
                "{}: file of {} bytes, not {} MiB",
                self.label, self.size, opts.mib
            ));
        }
        if self.files != u64::from(tree.files) || self.file_bytes != tree.file_bytes {
            return Err(format!(
                "{}: extracted {} files of {} bytes, not {} of {}",
                self.label, self.files, self.file_bytes, tree.files, tree.file_bytes
            ));
        }
        if self.entries != want_entries || self.stats != want_entries {
            return Err(format!(
                "{}: find listed {} entries and stat gave {}, not {want_entries}",
                self.label, self.entries, self.stats
            ));
        }
        if [
            self.write_us,
            self.read_us,
            self.extract_us,
            self.find_stat_us,
        ]
        .contains(&0)
        {
            return Err(format!("{}: a step took no time: {self:?}", self.label));
        }
        Ok(())
    }
}

/// The `@@FS-BENCH` results in a case's output (lines that do not parse
/// are left out; the caller counts what is missing).
pub fn parse_samples(output: &str) -> Vec<Sample> {
    super::tagged(output, "@@FS-BENCH")
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect()
}

/// The samples of each label that pass [`Sample::check`], and a line for
/// every run and label without one (with the case's error lines).
pub fn collect(
    outputs: &[String],
    opts: &Options,
    tree: &SourceTree,
) -> (Vec<Vec<Sample>>, Vec<String>) {
    let mut by_label = vec![Vec::new(); LABELS.len()];
    let mut missing = Vec::new();
    for (run, out) in outputs.iter().enumerate() {
        let samples = parse_samples(out);
        for (k, label) in LABELS.iter().enumerate() {
            let mine: Vec<&Sample> = samples.iter().filter(|s| s.label == *label).collect();
            for s in &mine {
                match s.check(opts, tree) {
                    Ok(()) => by_label[k].push((*s).clone()),
                    Err(e) => missing.push(format!("fs{run}: {e}")),
                }
            }
            if mine.len() < opts.reps as usize {
                let why: Vec<&str> = out
                    .lines()
                    .map(str::trim_end)
                    .filter(|l| {
                        l.starts_with("@@FS-BENCH-ERROR")
                            || l.starts_with(&format!("@@FS-VMM {label} "))
                    })
                    .collect();
                missing.push(format!(
                    "fs{run}: {} of {} {label} results ({})",
                    mine.len(),
                    opts.reps,
                    why.join("; ")
                ));
            }
        }
    }
    (by_label, missing)
}

/// A cell: median (min-max) of times in ms, and the median's throughput
/// when the step moved `mib`.
fn cell(us: &[f64], mib: Option<u64>) -> String {
    let Some(s) = stats(us) else {
        return "n/a".into();
    };
    let ms = |v: f64| v / 1000.0;
    let mut c = format!("{:.0} ms ({:.0}-{:.0})", ms(s.median), ms(s.min), ms(s.max));
    if let Some(mib) = mib {
        let _ = write!(c, ", {:.0} MiB/s", mib as f64 / (s.median / 1e6));
    }
    c
}

/// The section of bench/results.md: per figure the medians of coworkvm and
/// QEMU with virtio-fs, their ratio (time, so lower is better for
/// coworkvm; the target is at most 1.10), and the virtio-blk reference.
pub fn render(
    by_label: &[Vec<Sample>],
    opts: &Options,
    tree: &SourceTree,
    heading_note: &str,
) -> String {
    let mut s = String::from(SECTION_HEADING);
    s.push_str("\n\n");
    let n = by_label.iter().map(Vec::len).min().unwrap_or(0);
    let _ = writeln!(
        s,
        "{heading_note}; {} run(s), each booting the three guests once, in an order that \
         rotates from run to run, each boot doing the workload {} time(s) (each time in a new \
         directory); {n} results each; medians (min-max).\n",
        opts.runs, opts.reps
    );
    let d = Options::default();
    if *opts != d {
        let _ = writeln!(
            s,
            "Sized down from `make bench`'s defaults ({} MiB, {} files, {} runs of {} \
             repetition) with `--fs-runs {} --fs-reps {} --fs-mib {} --fs-files {}`, to fit \
             the time the rig had.\n",
            d.mib, d.files, d.runs, d.reps, opts.runs, opts.reps, opts.mib, opts.files
        );
    }
    let _ = writeln!(
        s,
        "Every guest: the same kernel, 1 vCPU, {GUEST_MEM_MIB} MiB, busybox \
         (`tests/guest/fs-bench.init`). virtio-fs: virtiofsd 1.14.0 (the one `make build` \
         builds), started per boot on a fresh empty directory in L1's tmpfs, as uid \
         {SHARE_USER_ID} with the share keeper's flags (`{}`); the guest mounts \
         `-t virtiofs`. coworkvm: `coworkvm boot --fs-socket` (sandboxed, as the helper runs \
         it). QEMU: `-M microvm,memory-backend=mem`, `memory-backend-memfd,share=on`, \
         `vhost-user-fs-device` (queue-size 1024; coworkvm's queues are 1024 too). Reference: \
         `coworkvm boot --disk` of an empty ext4 image (mkfs.ext4 on the host) copied into \
         the same tmpfs, mounted `-t ext4`. Times are the guest's (adjtimex, µs):\n",
        keeper_flags(SHARE_USER_ID, SHARE_USER_ID).join(" ")
    );
    let _ = writeln!(
        s,
        "- sequential write: `dd if=/dev/zero bs=1M count={} conv=fsync` into a new file;\n\
         - sequential read: caches dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`), \
         `dd bs=1M` of that file to /dev/null;\n\
         - extract: `tar -xf` of a tarball the bench makes ({} files of 64 B-8 KiB text in \
         {} directories, {:.1} MiB; from the initramfs) into a new directory, then `sync`;\n\
         - find + stat: caches dropped, `find` of the extracted tree, then `stat` of each of \
         its {} entries (`xargs stat`).\n",
        opts.mib,
        tree.files,
        tree.dirs,
        tree.tar_bytes as f64 / 1048576.0,
        tree.files + tree.dirs + 1
    );
    let _ = writeln!(
        s,
        "| figure | coworkvm + virtiofsd | QEMU microvm + virtiofsd | coworkvm / QEMU | \
         coworkvm, virtio-blk ext4 |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    type Step = fn(&Sample) -> u64;
    let steps: [(String, Step, Option<u64>); 4] = [
        (
            format!("sequential write, {} MiB", opts.mib),
            |x| x.write_us,
            Some(opts.mib),
        ),
        (
            format!("sequential read, {} MiB", opts.mib),
            |x| x.read_us,
            Some(opts.mib),
        ),
        (
            format!("extract {} files", tree.files),
            |x| x.extract_us,
            None,
        ),
        (
            format!("find + stat {} entries", tree.files + tree.dirs + 1),
            |x| x.find_stat_us,
            None,
        ),
    ];
    let mut over = Vec::new();
    let mut compared = 0;
    for (name, get, mib) in &steps {
        let us = |k: usize| -> Vec<f64> {
            by_label
                .get(k)
                .map(|v| v.iter().map(|x| get(x) as f64).collect())
                .unwrap_or_default()
        };
        let (cw, qm, blk) = (us(0), us(1), us(2));
        let ratio = match (stats(&cw), stats(&qm)) {
            (Some(a), Some(b)) if b.median > 0.0 => {
                let r = a.median / b.median;
                compared += 1;
                if r > TARGET_RATIO {
                    over.push(name.clone());
                }
                format!("{r:.2}")
            }
            _ => "n/a".into(),
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {ratio} | {} |",
            cell(&cw, *mib),
            cell(&qm, *mib),
            cell(&blk, *mib)
        );
    }
    let _ = writeln!(
        s,
        "\nTarget: coworkvm within {TARGET_RATIO:.1}x of QEMU on each figure (ratio of the \
         median times): {}.\n",
        if compared == 0 {
            "no figure to compare".to_string()
        } else if over.is_empty() {
            format!("met on all {compared}")
        } else {
            format!(
                "met on {} of {compared}; over on {}",
                compared - over.len(),
                over.join(", ")
            )
        }
    );
    s
}

/// coworkvm's time over QEMU's that each figure must stay within.
pub const TARGET_RATIO: f64 = 1.1;
/// The section's heading in bench/results.md.
pub const SECTION_HEADING: &str = "## Shared folders: virtio-fs, coworkvm vs QEMU microvm";
/// Sections that are measured on the host, which the shared-folder
/// section goes before when it is new to a file.
const HOST_SECTIONS: &[&str] = &[
    "## Helper with real VMs",
    "## Helper (host, no VM)",
    "## Guest images (host)",
];

/// `existing` results with the shared-folder section replaced by
/// `section` (from its heading to the next `## ` heading), or, when it has
/// none yet, with `section` put before the host-measured sections (or at
/// the end). The other sections stay byte for byte.
pub fn splice_section(existing: &str, section: &str) -> String {
    splice_named(existing, SECTION_HEADING, section)
}

/// [`splice_section`] for the section headed `heading`.
pub fn splice_named(existing: &str, heading: &str, section: &str) -> String {
    let section = format!("{}\n", section.trim_end());
    let next_heading = |from: usize| {
        existing[from..]
            .match_indices("\n## ")
            .next()
            .map_or(existing.len(), |(i, _)| from + i + 1)
    };
    let heading_at = |h: &str| {
        if existing.starts_with(&format!("{h}\n")) {
            Some(0)
        } else {
            existing.find(&format!("\n{h}\n")).map(|i| i + 1)
        }
    };
    if let Some(start) = heading_at(heading) {
        let end = next_heading(start + heading.len());
        let sep = if end < existing.len() { "\n" } else { "" };
        return format!("{}{section}{sep}{}", &existing[..start], &existing[end..]);
    }
    if let Some(at) = HOST_SECTIONS.iter().filter_map(|h| heading_at(h)).min() {
        return format!("{}{section}\n{}", &existing[..at], &existing[at..]);
    }
    let body = existing.trim_end();
    if body.is_empty() {
        section
    } else {
        format!("{body}\n\n{section}")
    }
}

/// Payload and cases for the batch: the guest initramfs (with the tarball
/// and, for 6.1 kernels, the virtiofs and ext4 modules), the ext4 image as
/// the next batch disk, one case per run.
pub struct Prepared {
    pub tree: SourceTree,
    pub files: Vec<(PathBuf, String)>,
    pub disk: PathBuf,
    pub cases: Vec<crate::Case>,
}

/// Case name of run `run`.
pub fn case_name(run: u32) -> String {
    format!("fs{run}")
}

/// Makes the tarball, the initramfs and the ext4 image under `scratch`;
/// `disk_index` is the index the image will have among the batch's disks.
pub fn prepare(
    paths: &crate::Paths,
    scratch: &Path,
    opts: &Options,
    disk_index: usize,
) -> Result<Prepared> {
    opts.validate()?;
    let tar = scratch.join("src.tar");
    let tree = write_source_tarball(&tar, opts.files)?;
    let initrd = scratch.join("fsbench.cpio.zst");
    paths.guest_initramfs_with(
        &paths.root.join("tests/guest/fs-bench.init"),
        &initrd,
        &["virtiofs", "ext4"],
        vec![(tar.clone(), TARBALL_IN_GUEST.to_string())],
    )?;
    let disk = scratch.join("fsbench-ext4.img");
    make_ext4_image(&disk, ext4_image_mib(opts, &tree))?;
    // A boot: 20-60 s in the rig; the workload a few minutes at most.
    let per_run =
        3 * (120 + u64::from(opts.reps) * (10 * opts.mib / 16 + u64::from(opts.files) / 20));
    let cases = (0..opts.runs)
        .map(|r| crate::Case::new(&case_name(r), &run_script(r, opts, disk_index), per_run))
        .collect();
    Ok(Prepared {
        tree,
        files: vec![(initrd, "fsbench.cpio.zst".to_string())],
        disk,
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> SourceTree {
        SourceTree {
            files: 10,
            dirs: 3,
            file_bytes: 40_000,
            tar_bytes: 50_000,
        }
    }

    fn sample(label: &str, write_ms: u64) -> Sample {
        Sample {
            label: label.into(),
            fs: if label == COWORKVM_BLK {
                "blk"
            } else {
                "virtiofs"
            }
            .into(),
            rep: 1,
            mib: 256,
            size: 256 << 20,
            write_us: write_ms * 1000,
            read_us: 1_000_000,
            extract_us: 2_000_000,
            find_stat_us: 500_000,
            entries: 14,
            stats: 14,
            files: 10,
            file_bytes: 40_000,
        }
    }

    fn line(s: &Sample) -> String {
        format!(
            "@@FS-BENCH {{\"label\": \"{}\", \"fs\": \"{}\", \"mib\": {}, \"size\": {}, \
             \"write_us\": {}, \"read_us\": {}, \"extract_us\": {}, \"find_stat_us\": {}, \
             \"entries\": {}, \"stats\": {}, \"files\": {}, \"file_bytes\": {}}}\r",
            s.label,
            s.fs,
            s.mib,
            s.size,
            s.write_us,
            s.read_us,
            s.extract_us,
            s.find_stat_us,
            s.entries,
            s.stats,
            s.files,
            s.file_bytes
        )
    }

    #[test]
    fn the_tarball_is_a_ustar_archive_tar_reads_whole() {
        let dir = crate::Scratch::new("fsbench-tar").unwrap();
        let tar = dir.path.join("src.tar");
        let t = write_source_tarball(&tar, 130).unwrap();
        assert_eq!(t.files, 130);
        // 130 files: 7 leaf directories (20 a piece), 2 top ones (100 files each).
        assert_eq!(t.dirs, 7 + 2);
        assert_eq!(t.tar_bytes, std::fs::metadata(&tar).unwrap().len());
        let out = dir.path.join("x");
        std::fs::create_dir(&out).unwrap();
        let st = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&out)
            .output()
            .expect("tar (GNU tar, Debian's) runs");
        assert!(st.status.success(), "{st:?}");
        let mut files = 0;
        let mut bytes = 0;
        let mut dirs = 0;
        fn walk(d: &Path, files: &mut u32, dirs: &mut u32, bytes: &mut u64) {
            for e in std::fs::read_dir(d).unwrap() {
                let e = e.unwrap();
                let md = e.metadata().unwrap();
                if md.is_dir() {
                    *dirs += 1;
                    walk(&e.path(), files, dirs, bytes);
                } else {
                    *files += 1;
                    *bytes += md.len();
                }
            }
        }
        walk(&out, &mut files, &mut dirs, &mut bytes);
        assert_eq!((files, dirs, bytes), (t.files, t.dirs, t.file_bytes));
        let f = std::fs::read_to_string(out.join("d001/s0/f00100.c")).unwrap();
        assert!(
            f.starts_with("/* bench source file 100, line 0 */\n"),
            "{f}"
        );
        assert_eq!(f.len() as u64, file_size(100));
        // The guest extracts it with busybox tar: where the build has
        // busybox, it reads the archive whole too.
        if let Ok(paths) = crate::Paths::locate_base() {
            let bb = dir.path.join("bb");
            std::fs::create_dir(&bb).unwrap();
            let st = std::process::Command::new(&paths.busybox)
                .arg("tar")
                .arg("-xf")
                .arg(&tar)
                .arg("-C")
                .arg(&bb)
                .output()
                .unwrap();
            assert!(st.status.success(), "{st:?}");
            let (mut f2, mut d2, mut b2) = (0, 0, 0);
            walk(&bb, &mut f2, &mut d2, &mut b2);
            assert_eq!((f2, d2, b2), (t.files, t.dirs, t.file_bytes));
        }
        // Same bytes every time.
        let again = dir.path.join("again.tar");
        write_source_tarball(&again, 130).unwrap();
        assert_eq!(std::fs::read(&tar).unwrap(), std::fs::read(&again).unwrap());
    }

    #[test]
    fn file_sizes_stay_small_and_spread() {
        let sizes: Vec<u64> = (0..5000).map(file_size).collect();
        assert!(sizes.iter().all(|s| (MIN_FILE..MAX_FILE).contains(s)));
        let mean = sizes.iter().sum::<u64>() / 5000;
        assert!((3000..5200).contains(&mean), "mean {mean}");
        assert!(sizes.iter().any(|&s| s < 512) && sizes.iter().any(|&s| s > 7680));
    }

    #[test]
    fn ustar_header_checksum_is_the_byte_sum() {
        let h = ustar_header("d000/s0/f00000.c", 1234, false);
        let field = std::str::from_utf8(&h[148..154]).unwrap();
        let stored = u32::from_str_radix(field, 8).unwrap();
        let mut blank = h;
        blank[148..156].fill(b' ');
        assert_eq!(stored, blank.iter().map(|&b| u32::from(b)).sum::<u32>());
        assert_eq!(&h[124..136], b"00000002322\0");
        assert_eq!(h[156], b'0');
        assert_eq!(ustar_header("d000/", 0, true)[156], b'5');
    }

    #[test]
    fn samples_are_parsed_checked_and_grouped_by_label() {
        let opts = Options::default();
        let t = tree();
        let mut short = sample(QEMU_FS, 900);
        short.size = 100 << 20;
        let run0 = format!(
            "boot noise\n{}\n{}\n{}\n",
            line(&sample(COWORKVM_FS, 1000)),
            line(&sample(QEMU_FS, 900)),
            line(&sample(COWORKVM_BLK, 400))
        );
        let run1 = format!(
            "{}\n@@FS-BENCH {{\"label\": \"{COWORKVM_FS}\"\n{}\n\
             @@FS-BENCH-ERROR {COWORKVM_BLK}: mount -t ext4 /dev/vda: no\n\
             @@FS-VMM {COWORKVM_BLK} rc=0\n",
            line(&short),
            line(&sample(COWORKVM_FS, 1100)),
        );
        let (by, missing) = collect(&[run0, run1], &opts, &t);
        assert_eq!(by[0].len(), 2, "{by:?}");
        assert_eq!(by[1].len(), 1, "the short file does not count");
        assert_eq!(by[2].len(), 1);
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(missing[0].contains("fs1: qemu-virtiofs: file of 104857600 bytes, not 256 MiB"));
        assert!(
            missing[1]
                .contains("fs1: 0 of 1 coworkvm-blk results (@@FS-BENCH-ERROR coworkvm-blk: mount")
                && missing[1].contains("@@FS-VMM coworkvm-blk rc=0"),
            "{missing:?}"
        );
    }

    /// With repetitions, every result of a boot counts, and a boot that
    /// gave fewer than asked is named.
    #[test]
    fn each_repetition_is_a_sample() {
        let opts = Options {
            reps: 2,
            ..Default::default()
        };
        let t = tree();
        let mut second = sample(COWORKVM_FS, 1300);
        second.rep = 2;
        let run0 = format!(
            "{}\n{}\n{}\n{}\n{}\n",
            line(&sample(COWORKVM_FS, 1000)),
            line(&second),
            line(&sample(QEMU_FS, 900)),
            line(&sample(QEMU_FS, 950)),
            line(&sample(COWORKVM_BLK, 400)),
        );
        let (by, missing) = collect(&[run0], &opts, &t);
        assert_eq!(by.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(missing, ["fs0: 1 of 2 coworkvm-blk results ()"]);
        let mut img = Options::default();
        let one = ext4_image_mib(&img, &t);
        img.reps = 3;
        assert_eq!(
            ext4_image_mib(&img, &t),
            one + 2,
            "a tree of 1 MiB more per repetition"
        );
    }

    #[test]
    fn a_partial_extraction_or_missed_stat_is_refused() {
        let opts = Options::default();
        let t = tree();
        assert_eq!(sample(COWORKVM_FS, 1).check(&opts, &t), Ok(()));
        let mut s = sample(COWORKVM_FS, 1);
        s.files = 9;
        assert!(s
            .check(&opts, &t)
            .unwrap_err()
            .contains("extracted 9 files"));
        let mut s = sample(COWORKVM_FS, 1);
        s.stats = 13;
        assert!(s
            .check(&opts, &t)
            .unwrap_err()
            .contains("stat gave 13, not 14"));
        let mut s = sample(COWORKVM_FS, 1);
        s.read_us = 0;
        assert!(s.check(&opts, &t).unwrap_err().contains("took no time"));
    }

    #[test]
    fn the_table_shows_medians_ratio_and_reference() {
        let opts = Options::default();
        let t = tree();
        let by = vec![
            vec![
                sample(COWORKVM_FS, 1000),
                sample(COWORKVM_FS, 1200),
                sample(COWORKVM_FS, 2000),
            ],
            vec![
                sample(QEMU_FS, 1000),
                sample(QEMU_FS, 1000),
                sample(QEMU_FS, 900),
            ],
            vec![sample(COWORKVM_BLK, 256), sample(COWORKVM_BLK, 512)],
        ];
        let md = render(&by, &opts, &t, "2026-11-30 06:00 UTC; mode **L1**");
        assert!(md.starts_with(SECTION_HEADING), "{md}");
        assert!(md.contains("; 3 run(s), each booting"), "{md}");
        assert!(md.contains("the workload 1 time(s)"), "{md}");
        assert!(md.contains("; 2 results each;"), "{md}");
        assert!(
            md.contains(
                "| sequential write, 256 MiB | 1200 ms (1000-2000), 213 MiB/s | \
                 1000 ms (900-1000), 256 MiB/s | 1.20 | 384 ms (256-512), 667 MiB/s |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| find + stat 14 entries | 500 ms (500-500) | 500 ms (500-500) | 1.00 | 500 ms (500-500) |"),
            "{md}"
        );
        assert!(
            md.contains("met on 3 of 4; over on sequential write, 256 MiB"),
            "{md}"
        );
        assert!(md.contains("--translate-uid=host:1000:60000:1"), "{md}");
        assert!(!md.contains("Sized down"), "{md}");
        let small = Options {
            runs: 1,
            reps: 3,
            mib: 32,
            files: 625,
        };
        let md = render(&by, &small, &t, "x");
        assert!(
            md.contains(
                "Sized down from `make bench`'s defaults (256 MiB, 5000 files, 3 runs of 1 \
                 repetition) with `--fs-runs 1 --fs-reps 3 --fs-mib 32 --fs-files 625`"
            ),
            "{md}"
        );
        let none = render(&[vec![], vec![], vec![]], &opts, &t, "x");
        assert!(
            none.contains("| extract 10 files | n/a | n/a | n/a | n/a |"),
            "{none}"
        );
        assert!(none.contains("no figure to compare"), "{none}");
    }

    #[test]
    fn the_section_is_replaced_or_put_before_the_host_sections() {
        let sec = format!("{SECTION_HEADING}\n\nnew table\n");
        let base = "# Boot benchmark\n\nboot table\n\n## Streams\n\nstreams\n\n\
                    ## Helper with real VMs\n\nhelper\n\n## Guest images (host)\n\nimages\n";
        let added = splice_section(base, &sec);
        assert_eq!(
            added,
            format!(
                "# Boot benchmark\n\nboot table\n\n## Streams\n\nstreams\n\n{SECTION_HEADING}\n\n\
                 new table\n\n## Helper with real VMs\n\nhelper\n\n## Guest images (host)\n\nimages\n"
            )
        );
        let newer = format!("{SECTION_HEADING}\n\nnewer table\n");
        let replaced = splice_section(&added, &newer);
        assert_eq!(replaced, added.replace("new table", "newer table"));
        // Last section of a file, and a file without host sections.
        let at_end = format!("# B\n\n{SECTION_HEADING}\n\nold\n");
        assert_eq!(
            splice_section(&at_end, &newer),
            format!("# B\n\n{SECTION_HEADING}\n\nnewer table\n")
        );
        assert_eq!(
            splice_section("# B\n\nx\n", &sec),
            format!("# B\n\nx\n\n{SECTION_HEADING}\n\nnew table\n")
        );
        assert_eq!(splice_section("", &sec), sec);
    }

    /// The case script as sh runs it, with stand-ins for virtiofsd, the
    /// VMMs and the guest: each boot is reached in the rotating order,
    /// virtiofsd gets the keeper's flags and a fresh directory, and the
    /// VMMs get the socket it listens on. The stand-in virtiofsd "listens"
    /// by moving a socket the test bound into place (a bound socket keeps
    /// working under a new name), so no socket tool is needed.
    #[test]
    fn the_run_script_boots_the_three_in_rotating_order() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = crate::Scratch::new("fsbench-script").unwrap();
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Written by the stand-ins, which run as uid 1000 when the test is root.
        let open = dir.path.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let write = |name: &str, body: &str| {
            let p = dir.path.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let vfsd = write(
            "virtiofsd",
            "echo \"vfsd uid=$(id -u) $*\" >>$LOG\n\
             for a in \"$@\"; do case $a in --socket-path=*) s=${a#--socket-path=};; esac; done\n\
             for p in $PRE/*.sock; do mv \"$p\" \"$s\"; break; done\n",
        );
        let vmm = write(
            "vmm",
            "echo \"vmm $*\" >>$LOG\n\
             for a in \"$@\"; do case $a in *path=*) a=${a#*path=};; esac\n\
             [ -S \"$a\" ] && echo \"socket $a\" >>$LOG; done\n\
             l=$(echo \"$*\" | sed 's/.*bench.label=\\([^ ]*\\).*/\\1/')\n\
             echo \"@@FS-BENCH {\\\"label\\\": \\\"$l\\\"}\"\n",
        );
        let log = open.join("log");
        let pre = open.join("pre");
        let disk = dir.path.join("disk.img");
        std::fs::write(&disk, b"ext4").unwrap();
        let mut listeners = Vec::new();
        let mut run = |r: u32| {
            let _ = std::fs::remove_file(&log);
            let _ = std::fs::remove_dir_all(&pre);
            std::fs::create_dir(&pre).unwrap();
            std::fs::set_permissions(&pre, std::fs::Permissions::from_mode(0o777)).unwrap();
            for i in 0..2 {
                listeners.push(
                    std::os::unix::net::UnixListener::bind(pre.join(format!("{i}.sock"))).unwrap(),
                );
            }
            let script = run_script(r, &Options::default(), 0)
                .replace(crate::qemu::SH, &format!("{} qemu", vmm.display()));
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(&script)
                .env("TMPDIR", &dir.path)
                .env("COWORKVM", &vmm)
                .env("VIRTIOFSD", &vfsd)
                .env("KERNEL", "/k")
                .env("P", "/p")
                .env("DISK0", &disk)
                .env("LOG", &log)
                .env("PRE", &pre)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let labels: Vec<String> = super::super::tagged(&stdout, "@@FS-BENCH")
                .iter()
                .map(|v| v["label"].as_str().unwrap().to_owned())
                .collect();
            (labels, std::fs::read_to_string(&log).unwrap(), stdout)
        };
        let (labels, log0, out) = run(0);
        assert_eq!(labels, [COWORKVM_FS, QEMU_FS, COWORKVM_BLK], "{out}");
        assert!(
            log0.contains(&keeper_flags(1000, 1000).join(" ")),
            "virtiofsd gets the keeper's flags: {log0}"
        );
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } == 0 {
            assert_eq!(log0.matches("vfsd uid=1000 ").count(), 2, "{log0}");
        }
        assert_eq!(log0.matches("vfsd ").count(), 2, "{log0}");
        assert_eq!(
            log0.matches("/fsbench/sock/fs.sock\n").count(),
            2,
            "both VMMs find virtiofsd's socket: {log0}"
        );
        assert!(log0.contains("--fs-socket"), "{log0}");
        assert!(
            log0.contains("vhost-user-fs-device,chardev=fs,tag=claudeshared,queue-size=1024"),
            "{log0}"
        );
        assert!(
            log0.contains("memory-backend-memfd,id=mem,size=512M,share=on"),
            "{log0}"
        );
        assert!(log0.contains("bench.fs=blk"), "{log0}");
        assert!(out.contains(&format!("@@FS-VMM {QEMU_FS} rc=0")), "{out}");
        assert!(dir.path.join("fsbench/blk.img").exists());
        assert!(
            !dir.path.join("fsbench/share").exists(),
            "the share is cleared after each boot"
        );
        let (labels, _, out) = run(1);
        assert_eq!(labels, [QEMU_FS, COWORKVM_BLK, COWORKVM_FS], "{out}");
    }

    #[test]
    fn options_are_bounded() {
        assert!(Options::default().validate().is_ok());
        for bad in [
            Options {
                mib: 0,
                ..Default::default()
            },
            Options {
                mib: 4096,
                ..Default::default()
            },
            Options {
                files: 0,
                ..Default::default()
            },
            Options {
                files: 1_000_000,
                ..Default::default()
            },
            Options {
                runs: 100,
                ..Default::default()
            },
            Options {
                reps: 0,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
