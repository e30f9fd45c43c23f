#!/usr/bin/env bash
# Fetches the guest kernel (the newest linux-image-*-cloud-amd64 apt offers)
# and Debian's static busybox into build/, without installing either on the
# host. Idempotent: a kernel already unpacked for the same package version
# is kept.
set -euo pipefail
BUILD=${BUILD:-build}
mkdir -p "$BUILD/debs"
BUILD=$(cd "$BUILD" && pwd)

apt_lists_ready() { compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; }
if ! apt_lists_ready; then apt-get update -qq; fi

# Newest cloud kernel by Debian version order (signed image, not -unsigned/-dbg).
pick_kernel() {
    apt-cache search --names-only '^linux-image-[0-9].*-cloud-amd64$' | awk '{print $1}' |
        while read -r pkg; do
            ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
            [ -n "$ver" ] && [ "$ver" != "(none)" ] && echo "$ver $pkg"
        done | sort -V -k1,1 | tail -n 1
}
read -r KVER KPKG < <(pick_kernel) || true
if [ -z "${KPKG:-}" ]; then
    apt-get update -qq
    read -r KVER KPKG < <(pick_kernel)
fi
[ -n "${KPKG:-}" ] || { echo "fetch-kernel: no linux-image-*-cloud-amd64 package found" >&2; exit 1; }
RELEASE=${KPKG#linux-image-}

KDIR=$BUILD/kernel
if [ -f "$KDIR/version" ] && grep -qx "package=$KPKG $KVER" "$KDIR/version"; then
    echo "fetch-kernel: $KPKG $KVER already in $KDIR"
else
    echo "fetch-kernel: fetching $KPKG $KVER"
    rm -rf "$KDIR" "$BUILD/debs/kernel"
    mkdir -p "$BUILD/debs/kernel" "$KDIR"
    (cd "$BUILD/debs/kernel" && apt-get download -q "$KPKG=$KVER" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    deb=$(ls "$BUILD"/debs/kernel/*.deb)
    dpkg-deb -x "$deb" "$BUILD/debs/kernel/root"
    root=$BUILD/debs/kernel/root
    cp "$root/boot/vmlinuz-$RELEASE" "$KDIR/vmlinuz"
    cp "$root/boot/config-$RELEASE" "$KDIR/config"
    # Only the module directories the guest and the rig use, decompressed so
    # that busybox insmod and finit_module take them as they are.
    src=$root/lib/modules/$RELEASE/kernel
    dst=$KDIR/modules/$RELEASE/kernel
    for d in drivers/virtio drivers/block drivers/char/hw_random net/vmw_vsock \
             arch/x86/kvm virt/lib fs/overlayfs fs/fuse drivers/net lib; do
        [ -d "$src/$d" ] || continue
        mkdir -p "$dst/$d"
        cp -r "$src/$d/." "$dst/$d/"
    done
    find "$dst" -name '*.ko.xz' -exec xz -d -f {} +
    find "$dst" -name '*.ko.zst' -exec zstd -q -d --rm -f {} +
    cp "$root/lib/modules/$RELEASE/modules.builtin" "$KDIR/modules/$RELEASE/" 2>/dev/null || true
    rm -rf "$root"
    printf 'package=%s %s\nrelease=%s\n' "$KPKG" "$KVER" "$RELEASE" > "$KDIR/version"
fi

if [ ! -x "$BUILD/busybox" ]; then
    echo "fetch-kernel: fetching busybox-static"
    rm -rf "$BUILD/debs/busybox"
    mkdir -p "$BUILD/debs/busybox"
    (cd "$BUILD/debs/busybox" && apt-get download -q busybox-static 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    dpkg-deb -x "$BUILD"/debs/busybox/*.deb "$BUILD/debs/busybox/root"
    cp "$BUILD/debs/busybox/root/bin/busybox" "$BUILD/busybox.tmp"
    mv "$BUILD/busybox.tmp" "$BUILD/busybox"
    rm -rf "$BUILD/debs/busybox/root"
fi
cat "$KDIR/version"
