#!/usr/bin/env bash
# Installs the Debian packages the build and the test rig use, only those
# missing. apt-get update runs at most once: when apt has no package lists,
# or when an install from the lists it has fails.
#   qemu-system-x86   the rig's L1 VM (TCG) and the QEMU microvm reference VMM
#   qemu-system-data  qboot (bios-microvm.bin) and option ROMs for microvm
#   xz-utils, zstd    decompressing kernel modules
#   dpkg              dpkg-deb, to unpack the kernel and busybox packages and
#                     to build coworkvm's own (make deb)
#   binutils          objcopy and readelf for the package and its test
#   mmdebstrap        the guest's Debian rootfs tree
#   e2fsprogs         mkfs.ext4 -d and debugfs for rootfs.img
#   bubblewrap        the agent's sandbox test runs the real bwrap (as in the guest)
#   libseccomp-dev,   virtiofsd (built from crates.io by make build) links
#   libcap-ng-dev     libseccomp and libcap-ng statically: their .a archives
#   pkg-config        and the pkg-config that finds them
#   dpkg-dev          dpkg-gencontrol, dpkg-shlibdeps, dpkg-parsechangelog
#                     for the package (scripts/build-deb.sh)
#   lintian           checks the built package (tests/tests/deb.rs)
#   systemd           systemd-socket-activate, which starts `coworkvm serve`
#                     as the user unit does (cli/tests/activation.rs)
# and, with cargo (no root needed), the cargo tools at pinned versions, each
# only when missing or another version:
#   cargo-deny        make lint's licence, ban, source and advisory checks
# `install-deps.sh --cargo-tools` installs only those (make lint).
set -euo pipefail

# name, version: `cargo NAME --version` must print "cargo-NAME VERSION".
CARGO_TOOLS=("deny 0.20.2")
install_cargo_tools() {
    local tool name version start
    for tool in "${CARGO_TOOLS[@]}"; do
        read -r name version <<<"$tool"
        [ "$(cargo "$name" --version 2>/dev/null)" = "cargo-$name $version" ] && continue
        echo "install-deps: cargo install cargo-$name@$version (a few minutes, once)"
        start=$(date +%s)
        # Its own temporary target dir, not the build's (make exports one).
        # --debug: unoptimised builds in about 2 min where the release one
        # takes over 15 on 2 cores, and checking our lock file takes 2 s
        # either way.
        env -u CARGO_TARGET_DIR cargo install --locked --debug --quiet "cargo-$name@$version"
        echo "install-deps: cargo-$name $version in $(($(date +%s) - start)) s"
    done
}
install_cargo_tools
[ "${1:-}" != --cargo-tools ] || exit 0

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -e /usr/share/qemu/bios-microvm.bin ] || need+=(qemu-system-data)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v objcopy >/dev/null && command -v readelf >/dev/null || need+=(binutils)
[ -x /usr/bin/bwrap ] || need+=(bubblewrap)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v debugfs >/dev/null || need+=(e2fsprogs)
[ -e /usr/lib/x86_64-linux-gnu/libseccomp.a ] || need+=(libseccomp-dev)
[ -e /usr/lib/x86_64-linux-gnu/libcap-ng.a ] || need+=(libcap-ng-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v dpkg-gencontrol >/dev/null && command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v lintian >/dev/null || need+=(lintian)
[ -x /usr/bin/systemd-socket-activate ] || need+=(systemd)
command -v apt-get >/dev/null || { echo "install-deps: needs a Debian-based system (apt-get)" >&2; exit 1; }
[ ${#need[@]} -gt 0 ] || exit 0

if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing ${need[*]}; run: sudo apt-get install ${need[*]}" >&2
    exit 1
fi
echo "install-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt_install() { apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null || ! apt_install; then
    apt-get update -qq
    apt_install
fi
