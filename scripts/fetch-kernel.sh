#!/usr/bin/env bash
# Fetches the guest kernel (the newest linux-image-*-cloud-amd64 apt offers)
# and Debian's static busybox into $BUILD (default build/), without
# installing either on the host (`apt-get download` + `dpkg-deb -x`).
# Idempotent: a kernel already unpacked for the same package version, and a
# busybox already there, are kept.
#
# Which kernel: Debian 12 offers two cloud kernel series (6.1 and 6.12);
# which one is "newest" depends on how fresh the machine's apt lists are, so
# lists older than a day are refreshed first (apt-get update; as root, or
# through passwordless sudo, else a warning). COWORKVM_KERNEL_SERIES=6.1 (or
# 6.12) picks the newest kernel of that series instead; with BUILD=build/k61
# it goes to its own directory and leaves the main build/kernel alone.
#
# Outputs:
#   $BUILD/kernel/vmlinuz, $BUILD/kernel/config
#   $BUILD/kernel/version         package=<pkg> <version> / release=<uname -r>
#   $BUILD/kernel/modules/<release>/kernel/...ko  (decompressed from .ko.xz)
#   $BUILD/kernel/modules/<release>/modules.builtin, modules.order
#   $BUILD/busybox                static, from busybox-static
set -euo pipefail
BUILD=${BUILD:-build}
SERIES=${COWORKVM_KERNEL_SERIES:-}
# Bump when the layout of build/kernel changes, so old caches are redone.
LAYOUT=2
# apt lists older than this are refreshed before a kernel is picked.
LISTS_MAX_AGE_S=86400

log() { echo "fetch-kernel: $*" >&2; }

if [ -n "$SERIES" ] && ! [[ $SERIES =~ ^[0-9]+\.[0-9]+$ ]]; then
    log "COWORKVM_KERNEL_SERIES=$SERIES: want a kernel series such as 6.1 or 6.12"
    exit 1
fi
mkdir -p "$BUILD/debs"
BUILD=$(cd "$BUILD" && pwd)

# The directory apt keeps its package lists in (APT_CONFIG may move it).
LISTS=$(eval "$(apt-config shell L Dir::State::Lists/d)"; echo "${L:-/var/lib/apt/lists/}")
# apt's package lists (compressed or not); without them apt-cache knows nothing.
apt_lists_ready() { compgen -G "$LISTS*_Packages*" >/dev/null; }
# Set by this script after an update of its own; apt gives lists the
# server's Last-Modified time, which can be weeks old right after an update.
UPDATE_STAMP=$BUILD/debs/apt-updated
# Seconds since the lists were last known fresh: the newest of the lists,
# the Release files, apt's periodic stamp and this script's own stamp.
lists_age() {
    local newest=0 f m
    for f in "$LISTS"*_Packages* "$LISTS"*_InRelease "$LISTS"*_Release \
        /var/lib/apt/periodic/update-success-stamp "$UPDATE_STAMP"; do
        [ -e "$f" ] || continue
        m=$(stat -c %Y "$f")
        [ "$m" -gt "$newest" ] && newest=$m
    done
    echo $(($(date +%s) - newest))
}
UPDATED=0
# apt-get update, once per run. Refreshing needs root; without it (or with
# no network) the lists there are used, with a warning.
apt_update() {
    [ "$UPDATED" = 1 ] && return 0
    UPDATED=1
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        if sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            log "WARNING: apt lists are stale and refreshing them needs root: run sudo apt-get update"
            return 1
        fi
    fi
    log "apt-get update"
    if "${sudo[@]}" apt-get update -qq; then
        touch "$UPDATE_STAMP"
    else
        log "WARNING: apt-get update failed; picking from the lists there are"
        return 1
    fi
}
if ! apt_lists_ready; then
    apt_update || true
else
    age=$(lists_age)
    if [ "$age" -gt "$LISTS_MAX_AGE_S" ]; then
        log "apt lists are $((age / 3600)) h old"
        apt_update || true
    fi
fi

# Newest cloud kernel by Debian version order: the versioned image package
# (linux-image-6.12.117+deb12-cloud-amd64, linux-image-6.1.0-56-cloud-amd64),
# not the linux-image-6.12-cloud-amd64 metapackage that carries the same
# version, nor -unsigned/-dbg; of series $SERIES when it is set. Prints
# "<version> <package>".
pick_kernel() {
    local pkgs pkg ver best_ver='' best_pkg='' series_re='[0-9]+\.[0-9]+'
    [ -z "$SERIES" ] || series_re=${SERIES//./\\.}
    pkgs=$(apt-cache search --names-only '^linux-image-[0-9].*-cloud-amd64$' | awk '{print $1}' |
        grep -E "^linux-image-${series_re}\.[0-9]+[-+][^ ]*-cloud-amd64\$" || true)
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
        apt_update || true
        (cd "$dir" && apt-get download -q "$spec" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    fi
    compgen -G "$dir/*.deb" >/dev/null || { log "apt-get download $spec failed"; exit 1; }
}

KVER='' KPKG=''
read -r KVER KPKG < <(pick_kernel) || true
if [ -z "$KPKG" ]; then
    apt_update || true
    read -r KVER KPKG < <(pick_kernel) || true
fi
[ -n "$KPKG" ] || { log "no linux-image-${SERIES:+$SERIES.}*-cloud-amd64 package found"; exit 1; }
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
