#!/usr/bin/env bash
# Fetches the guest kernel (the newest linux-image-*-cloud-amd64 apt offers)
# and Debian's static busybox into build/, without installing either on the
# host (`apt-get download` + `dpkg-deb -x`). Idempotent: a kernel already
# unpacked for the same package version, and a busybox already there, are
# kept. Outputs:
#   build/kernel/vmlinuz, build/kernel/config
#   build/kernel/version          package=<pkg> <version> / release=<uname -r>
#   build/kernel/modules/<release>/kernel/...ko   (decompressed from .ko.xz)
#   build/kernel/modules/<release>/modules.builtin, modules.order
#   build/busybox                 static, from busybox-static
set -euo pipefail
BUILD=${BUILD:-build}
mkdir -p "$BUILD/debs"
BUILD=$(cd "$BUILD" && pwd)
# Bump when the layout of build/kernel changes, so old caches are redone.
LAYOUT=2

log() { echo "fetch-kernel: $*" >&2; }

# apt's package lists (compressed or not); without them apt-cache knows nothing.
apt_lists_ready() { compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; }
UPDATED=0
apt_update() {
    [ "$UPDATED" = 1 ] && return 0
    log "apt-get update"
    apt-get update -qq
    UPDATED=1
}
apt_lists_ready || apt_update

# Newest cloud kernel by Debian version order: the versioned image package
# (linux-image-6.12.117+deb12-cloud-amd64, linux-image-6.1.0-56-cloud-amd64),
# not the linux-image-6.12-cloud-amd64 metapackage that carries the same
# version, nor -unsigned/-dbg. Prints "<version> <package>".
pick_kernel() {
    local pkgs pkg ver best_ver='' best_pkg=''
    pkgs=$(apt-cache search --names-only '^linux-image-[0-9].*-cloud-amd64$' | awk '{print $1}' |
        grep -E '^linux-image-[0-9]+\.[0-9]+\.[0-9]+[-+][^ ]*-cloud-amd64$' || true)
    [ -n "$pkgs" ] || return 0
    # shellcheck disable=SC2086 # one word per package
    while read -r pkg ver; do
        [ -n "$ver" ] && [ "$ver" != "(none)" ] || continue
        if [ -z "$best_ver" ] || dpkg --compare-versions "$ver" gt "$best_ver"; then
            best_ver=$ver best_pkg=$pkg
        fi
    done < <(apt-cache policy $pkgs | awk '/^[^ ]/ {sub(":$", "", $1); p = $1} /Candidate:/ {print p, $2}')
    if [ -n "$best_pkg" ]; then echo "$best_ver $best_pkg"; fi
}

# apt-get download into DIR; after one apt-get update if the lists were stale.
download() {
    local dir=$1 spec=$2
    rm -f "$dir"/*.deb
    if ! (cd "$dir" && apt-get download -q "$spec" >/dev/null 2>&1); then
        apt_update
        (cd "$dir" && apt-get download -q "$spec" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    fi
    compgen -G "$dir/*.deb" >/dev/null || { log "apt-get download $spec failed"; exit 1; }
}

KVER='' KPKG=''
read -r KVER KPKG < <(pick_kernel) || true
if [ -z "$KPKG" ]; then
    apt_update
    read -r KVER KPKG < <(pick_kernel) || true
fi
[ -n "$KPKG" ] || { log "no linux-image-*-cloud-amd64 package found"; exit 1; }
RELEASE=${KPKG#linux-image-}

KDIR=$BUILD/kernel
STAMP="package=$KPKG $KVER"
if [ -f "$KDIR/version" ] && grep -qx "$STAMP" "$KDIR/version" &&
    grep -qx "layout=$LAYOUT" "$KDIR/version" && [ -f "$KDIR/vmlinuz" ]; then
    log "$KPKG $KVER already in $KDIR"
else
    log "fetching $KPKG $KVER"
    work=$BUILD/debs/kernel
    rm -rf "$work" "$KDIR.new"
    mkdir -p "$work" "$KDIR.new"
    download "$work" "$KPKG=$KVER"
    dpkg-deb -x "$work"/*.deb "$work/root"
    root=$work/root
    cp "$root/boot/vmlinuz-$RELEASE" "$KDIR.new/vmlinuz"
    cp "$root/boot/config-$RELEASE" "$KDIR.new/config"
    # The whole module tree, decompressed so that busybox insmod and
    # finit_module take the files as they are.
    mkdir -p "$KDIR.new/modules"
    mv "$root/lib/modules/$RELEASE" "$KDIR.new/modules/$RELEASE"
    mtree=$KDIR.new/modules/$RELEASE
    find "$mtree" -name '*.ko.xz' -print0 | xargs -0 -r -P "$(nproc)" -n 64 xz -d -f
    find "$mtree" -name '*.ko.zst' -print0 | xargs -0 -r -P "$(nproc)" -n 64 zstd -q -d --rm -f
    find "$mtree" -name '*.ko.gz' -print0 | xargs -0 -r -P "$(nproc)" -n 64 gzip -d -f
    n=$(find "$mtree" -name '*.ko' | wc -l)
    [ "$n" -gt 0 ] || { log "no modules in $KPKG"; exit 1; }
    printf '%s\nrelease=%s\nlayout=%s\n' "$STAMP" "$RELEASE" "$LAYOUT" >"$KDIR.new/version"
    rm -rf "$root" "$KDIR.old"
    # Swap in whole, so a reader never sees half a kernel directory.
    if [ -d "$KDIR" ]; then mv "$KDIR" "$KDIR.old"; fi
    mv "$KDIR.new" "$KDIR"
    rm -rf "$KDIR.old"
    log "$n modules in $KDIR/modules/$RELEASE"
fi

if [ ! -x "$BUILD/busybox" ]; then
    log "fetching busybox-static"
    work=$BUILD/debs/busybox
    rm -rf "$work"
    mkdir -p "$work"
    download "$work" busybox-static
    dpkg-deb -x "$work"/*.deb "$work/root"
    cp "$work/root/bin/busybox" "$BUILD/busybox.tmp"
    rm -rf "$work/root"
    # It must be static: it runs in initramfs images with no libc.
    if ldd "$BUILD/busybox.tmp" >/dev/null 2>&1; then
        log "busybox from busybox-static is dynamically linked"
        exit 1
    fi
    mv "$BUILD/busybox.tmp" "$BUILD/busybox"
fi
cat "$KDIR/version"
