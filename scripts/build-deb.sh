#!/usr/bin/env bash
# Builds the Debian packages from what `make build` made, with Debian's own
# tools (dpkg-shlibdeps, dpkg-gencontrol, dpkg-deb) and the metadata in
# debian/ (docs/packaging.md says why not cargo-deb):
#   coworkvm_VERSION_ARCH.deb
#     /usr/bin/coworkvm                  the static VMM, helper and tools
#     /usr/lib/coworkvm/virtiofsd        the static virtiofsd for shared
#                                        folders, where the helper's search
#                                        (helper/src/virtiofsd.rs) finds it
#     /usr/lib/coworkvm/images/          kernel, initramfs, rootfs.img.zst and
#                                        manifest.json: what every bundle is
#                                        seeded from (Bundle::default_images_dir)
#     /usr/lib/systemd/user/             coworkvm.socket, coworkvm.service
#                                        (user units, enabled by no one)
#     /usr/share/man/man1/               coworkvm(1) and a page per subcommand
#     /usr/share/{bash-completion,zsh,fish}/...  completions
#     /usr/share/doc/coworkvm/           README, copyright, changelog
#   coworkvm-dbgsym_VERSION_ARCH.deb     the binaries' debug symbols under
#                                        /usr/lib/debug/.build-id/
# Both binaries are stripped; the VERSION is debian/changelog's (0.1.0-1).
# No maintainer scripts: the package only adds files, each user's bundle is
# made on first use under their own $XDG_DATA_HOME, and the user units are
# for each user to enable.
#
# usage: scripts/build-deb.sh [OUTDIR]     (default: build)
# Prints the main package's path; the -dbgsym package is beside it.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-build}
target_dir=${CARGO_TARGET_DIR:-target}
bin=${COWORKVM_BIN:-$target_dir/x86_64-unknown-linux-gnu/release/coworkvm}
images=build/images
virtiofsd=build/virtiofsd/bin/virtiofsd
kernel_version_file=build/kernel/version
for f in "$bin" "$virtiofsd" "$images/vmlinuz" "$images/initrd.img" "$images/rootfs.img.zst" \
    "$images/manifest.json" "$kernel_version_file" build/debs/busybox/*.deb; do
    [ -f "$f" ] || { echo "build-deb: $f is missing; run make build" >&2; exit 1; }
done
for tool in dpkg-deb dpkg-gencontrol dpkg-shlibdeps dpkg-parsechangelog objcopy debugfs zstd; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool not found; run make deps" >&2; exit 1; }
done

upstream=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' Cargo.toml)
version=$(dpkg-parsechangelog -S Version)
[ "${version%-*}" = "$upstream" ] || {
    echo "build-deb: debian/changelog is at $version, Cargo.toml at $upstream: add a changelog entry" >&2
    exit 1
}
arch=$(dpkg --print-architecture)
# The files' times: the last commit's, so two builds of one commit give the
# same package (dpkg-deb takes the archive's own times from the same value).
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 1767225600)}

stage=$(mktemp -d "${TMPDIR:-/tmp}/coworkvm-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/coworkvm
dbg=$stage/coworkvm-dbgsym
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/usr/lib/coworkvm/images" \
    "$root/usr/share/doc/coworkvm" "$root/usr/lib/systemd/user" "$root/usr/share/man/man1" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d" "$root/usr/share/lintian/overrides" \
    "$dbg/DEBIAN"

# Strip as dh_strip does: the debug sections (line tables) and the symbol
# table go to /usr/lib/debug/.build-id/NN/REST.debug in the -dbgsym
# package, which gdb and debuginfod find by the binary's build ID.
build_ids=()
strip_into() {
    local from=$1 to=$2 id
    id=$(readelf -nW "$from" | sed -n 's/.*Build ID: \([0-9a-f]*\).*/\1/p')
    [ -n "$id" ] || { echo "build-deb: $from has no build ID" >&2; exit 1; }
    local debug=$dbg/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug
    install -d -m 0755 "$(dirname "$debug")"
    objcopy --only-keep-debug --compress-debug-sections "$from" "$debug"
    chmod 0644 "$debug"
    objcopy --strip-unneeded --remove-section=.comment --remove-section=.note \
        --add-gnu-debuglink="$debug" "$from" "$to"
    chmod 0755 "$to"
    build_ids+=("$id")
}
strip_into "$bin" "$root/usr/bin/coworkvm"
strip_into "$virtiofsd" "$root/usr/lib/coworkvm/virtiofsd"

for f in vmlinuz initrd.img rootfs.img.zst manifest.json; do
    install -m 0644 "$images/$f" "$root/usr/lib/coworkvm/images/$f"
done
install -m 0644 systemd/coworkvm.socket systemd/coworkvm.service "$root/usr/lib/systemd/user/"

# Man pages and completions, rendered from the CLI's clap definition.
cargo run --quiet -p coworkvm --features gendoc --bin coworkvm-gendoc -- "$stage/gen"
for page in "$stage"/gen/man/*.1; do
    gzip -9n < "$page" > "$root/usr/share/man/man1/$(basename "$page").gz"
done
install -m 0644 "$stage/gen/completions/coworkvm.bash" "$root/usr/share/bash-completion/completions/coworkvm"
install -m 0644 "$stage/gen/completions/_coworkvm" "$root/usr/share/zsh/vendor-completions/_coworkvm"
install -m 0644 "$stage/gen/completions/coworkvm.fish" "$root/usr/share/fish/vendor_completions.d/coworkvm.fish"

install -m 0644 README.md "$root/usr/share/doc/coworkvm/README.md"
install -m 0644 debian/copyright "$root/usr/share/doc/coworkvm/copyright"
gzip -9n < debian/changelog > "$root/usr/share/doc/coworkvm/changelog.Debian.gz"
install -m 0644 debian/coworkvm.lintian-overrides "$root/usr/share/lintian/overrides/coworkvm"
install -d -m 0755 "$dbg/usr/share/doc"
ln -s coworkvm "$dbg/usr/share/doc/coworkvm-dbgsym"

# Built-Using: the Debian source packages whose code the package carries.
#   the guest kernel and its modules (vmlinuz, initrd.img): the kernel .deb
#   busybox (initrd.img): the busybox-static .deb
#   every package of the rootfs (rootfs.img.zst): its dpkg status
#   glibc, linked into coworkvm, coworkvm-agent and virtiofsd; libseccomp and
#   libcap-ng, linked into virtiofsd: this host's -dev packages, which the
#   static links took their .a archives from
source_of_deb() { dpkg-deb -f "$1" Package Source Version | awk '
    /^Package:/ { p = $2 } /^Version:/ { v = $2 }
    /^Source:/ { s = $2; if ($3 ~ /^\(/) { sv = $3; gsub(/[()]/, "", sv) } }
    END { if (s == "") s = p; if (sv == "") sv = v; print s " (= " sv ")" }'; }
kernel_pkg=$(sed -n 's/^package=\([^ ]*\) .*/\1/p' "$kernel_version_file")
kernel_deb=$(ls build/debs/kernel/"${kernel_pkg}"_*.deb 2>/dev/null | head -n1)
[ -f "$kernel_deb" ] || { echo "build-deb: the .deb of $kernel_pkg is not in build/debs/kernel; run make kernel" >&2; exit 1; }
rootfs_img=$stage/rootfs.img
zstd -q -d -o "$rootfs_img" "$images/rootfs.img.zst"
rootfs_status=$stage/rootfs-status
debugfs -R 'cat /var/lib/dpkg/status' "$rootfs_img" > "$rootfs_status" 2>/dev/null
rm -f "$rootfs_img"
grep -q '^Package: ' "$rootfs_status" || { echo "build-deb: no dpkg status in the rootfs image" >&2; exit 1; }
built_using=$( {
    source_of_deb "$kernel_deb"
    for d in build/debs/busybox/*.deb; do source_of_deb "$d"; done
    awk -v RS= -F '\n' '{
        p = ""; v = ""; s = ""; sv = ""; ok = 0
        for (i = 1; i <= NF; i++) {
            split($i, kv, ": ")
            if (kv[1] == "Package") p = kv[2]
            else if (kv[1] == "Version") v = kv[2]
            else if (kv[1] == "Status") ok = ($i ~ / installed$/)
            else if (kv[1] == "Source") { n = split(kv[2], w, " "); s = w[1]; if (n > 1) { sv = w[2]; gsub(/[()]/, "", sv) } }
        }
        if (!ok) next
        if (s == "") s = p
        if (sv == "") sv = v
        print s " (= " sv ")"
    }' "$rootfs_status"
    dpkg-query -W -f '${source:Package} (= ${source:Version})\n' libc6-dev libseccomp-dev libcap-ng-dev
} | LC_ALL=C sort -u | paste -sd, | sed 's/,/, /g')

# Depends: what the shipped binaries link dynamically, by dpkg-shlibdeps.
# Both are static-pie (no PT_INTERP, no NEEDED), so it finds nothing to
# depend on (and says it found no dynamic symbols); it runs anyway so that a
# dynamic build would get its Depends.
substvars=$stage/substvars
printf 'shlibs:Depends=\nmisc:Depends=\n' > "$substvars"
dpkg-shlibdeps -T"$substvars" -e"$root/usr/bin/coworkvm" -e"$root/usr/lib/coworkvm/virtiofsd" 2>"$stage/shlibdeps.log" \
    || { cat "$stage/shlibdeps.log" >&2; exit 1; }
grep -v -e 'no symbols$' -e '^$' "$stage/shlibdeps.log" >&2 || true
echo "coworkvm:Built-Using=$built_using" >> "$substvars"

find "$root" "$dbg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
for pkg in "$root" "$dbg"; do
    find "$pkg" -path "$pkg/DEBIAN" -prune -o -type f -print0 | sort -z \
        | (cd "$pkg" && xargs -0 -r md5sum | sed "s| $pkg/| |") > "$pkg/DEBIAN/md5sums"
done
dpkg-gencontrol -pcoworkvm -P"$root" -T"$substvars" -f"$stage/files"
# The -dbgsym package's control, as dh_gencontrol writes it.
cat > "$dbg/DEBIAN/control" <<EOF
Package: coworkvm-dbgsym
Source: coworkvm
Version: $version
Auto-Built-Package: debug-symbols
Architecture: $arch
Maintainer: $(sed -n 's/^Maintainer: //p' debian/control)
Installed-Size: $(du -sk --exclude=DEBIAN "$dbg" | cut -f1)
Depends: coworkvm (= $version)
Section: debug
Priority: optional
Description: debug symbols for coworkvm
Build-Ids: ${build_ids[*]}
EOF
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums" "$dbg/DEBIAN/control" "$dbg/DEBIAN/md5sums"
touch -h -d "@$SOURCE_DATE_EPOCH" "$root/DEBIAN"/* "$dbg/DEBIAN"/*

mkdir -p "$out"
deb="$out/coworkvm_${version}_${arch}.deb"
# The images are zstd already: gzip -1 keeps the build quick, costs nothing.
dpkg-deb --root-owner-group -Zgzip -z1 --build "$root" "$deb" >/dev/null
dpkg-deb --root-owner-group -Zxz --build "$dbg" "$out/coworkvm-dbgsym_${version}_${arch}.deb" >/dev/null
echo "$deb"
