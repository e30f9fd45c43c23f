#!/usr/bin/env bash
# Builds the Debian package from what `make build` made:
#   /usr/bin/coworkvm                      the static VMM, helper and tools
#   /usr/lib/coworkvm/virtiofsd            the static virtiofsd (1.14.0) for
#                                          shared folders, where the helper's
#                                          search (helper/src/virtiofsd.rs) finds it
#   /usr/lib/coworkvm/images/              kernel, initramfs, rootfs.img.zst and
#                                          manifest.json: what every bundle is
#                                          seeded from (Bundle::default_images_dir)
#   /usr/share/doc/coworkvm/               README, copyright, changelog
# No maintainer scripts: the package only adds files, and each user's bundle
# is made on first use under their own $XDG_DATA_HOME.
#
# usage: scripts/build-deb.sh [OUTDIR]     (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-build}
bin=target/x86_64-unknown-linux-gnu/release/coworkvm
images=build/images
virtiofsd=build/virtiofsd/bin/virtiofsd
virtiofsd_doc=build/virtiofsd/share/doc/virtiofsd
for f in "$bin" "$virtiofsd" "$virtiofsd_doc/LICENSE-BSD-3-Clause" "$images/vmlinuz" "$images/initrd.img" "$images/rootfs.img.zst" "$images/manifest.json"; do
    [ -f "$f" ] || { echo "build-deb: $f is missing; run make build" >&2; exit 1; }
done
command -v dpkg-deb >/dev/null || { echo "build-deb: dpkg-deb not found" >&2; exit 1; }

version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
# The files' times: the last commit's, so two builds of one commit give the
# same package (dpkg-deb takes the archive's own times from the same value).
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 1767225600)}

stage=$(mktemp -d "${TMPDIR:-/tmp}/coworkvm-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/usr/lib/coworkvm/images" \
    "$root/usr/share/doc/coworkvm"
# Debug line tables stay in target/; symbols stay for backtraces.
objcopy --strip-debug "$bin" "$root/usr/bin/coworkvm"
chmod 0755 "$root/usr/bin/coworkvm"
objcopy --strip-debug "$virtiofsd" "$root/usr/lib/coworkvm/virtiofsd"
chmod 0755 "$root/usr/lib/coworkvm/virtiofsd"
for f in vmlinuz initrd.img rootfs.img.zst manifest.json; do
    install -m 0644 "$images/$f" "$root/usr/lib/coworkvm/images/$f"
done
install -m 0644 README.md "$root/usr/share/doc/coworkvm/README.md"

kernel=$(sed -n 's/.*"kernel_version": "\(.*\)".*/\1/p' "$images/manifest.json")
rootfs=$(sed -n 's/.*"rootfs_version": "\(.*\)".*/\1/p' "$images/manifest.json")
# BSD-3-Clause has no copy in /usr/share/common-licenses: its text goes in.
bsd_text=$(sed -e 's|^// \{0,1\}||' -e 's|^$|.|' -e 's|^| |' "$virtiofsd_doc/LICENSE-BSD-3-Clause")
cat > "$root/usr/share/doc/coworkvm/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: coworkvm

Files: *
Copyright: the coworkvm authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.

Files: usr/lib/coworkvm/images/*
Copyright: the authors of the Debian packages they contain
License: various, see each package
 vmlinuz is Debian's linux-image-$kernel (GPL-2). initrd.img holds
 coworkvm-agent (Apache-2.0), busybox (GPL-2) and kernel modules of the same
 package. rootfs.img.zst is a Debian bookworm tree ($rootfs) made from the
 packages listed in /usr/share/doc/<package>/copyright inside it; their
 sources are in the Debian archive and at snapshot.debian.org.

Files: usr/lib/coworkvm/virtiofsd
Copyright: the Virtiofs Project Developers; 2017 The Chromium OS Authors
License: Apache-2.0 AND BSD-3-Clause
 virtiofsd 1.14.0 from crates.io (https://gitlab.com/virtio-fs/virtiofsd),
 unmodified, linked statically with Debian's libseccomp, libcap-ng (both
 LGPL-2.1) and glibc (LGPL-2.1+), whose sources are in the Debian archive.
 The Apache License 2.0 is in /usr/share/common-licenses/Apache-2.0.

License: BSD-3-Clause
$bsd_text
EOF
date_rfc=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
printf 'coworkvm (%s) unstable; urgency=medium\n\n  * Upstream build, rootfs %s, kernel %s.\n\n -- coworkvm maintainers <coworkvm@example.invalid>  %s\n' \
    "$version" "$rootfs" "$kernel" "$date_rfc" | gzip -9n > "$root/usr/share/doc/coworkvm/changelog.Debian.gz"

find "$root" -path "$root/DEBIAN" -prune -o -type f -print0 | sort -z \
    | (cd "$root" && xargs -0 -r md5sum | sed "s| $root/| |") > "$root/DEBIAN/md5sums"
installed=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: coworkvm
Version: $version
Architecture: $arch
Maintainer: coworkvm maintainers <coworkvm@example.invalid>
Installed-Size: $installed
Section: admin
Priority: optional
Homepage: https://example.invalid/coworkvm
Description: KVM sandbox for the desktop agent app's Cowork mode
 coworkvm runs the agent's processes inside a small KVM virtual machine,
 so they cannot reach the user's SSH keys, API keys or browser data. One
 static binary needs only /dev/kvm: no QEMU, firmware or vhost-vsock;
 shared folders use the static virtiofsd it ships. "coworkvm serve" (or "coworkvm -socket PATH") is a drop-in
 for the client's VM helper; "coworkvm run -- CMD" runs a command in a VM;
 "coworkvm doctor" checks a host.
 .
 Includes the guest kernel ($kernel) and a Debian bookworm
 rootfs ($rootfs).
EOF
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/coworkvm_${version}_${arch}.deb"
# The images are zstd already: gzip -1 keeps the build quick, costs nothing.
dpkg-deb --root-owner-group -Zgzip -z1 --build "$root" "$deb" >/dev/null
echo "$deb"
