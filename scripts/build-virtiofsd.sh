#!/usr/bin/env bash
# Builds virtiofsd (the virtio-fs vhost-user daemon, Rust, crates.io) as one
# static binary at $BUILD/virtiofsd/bin/virtiofsd, for the share keeper, the
# rig's L1 VM and the Debian package. Debian 12 ships only QEMU's legacy C
# daemon, whose CLI and features (no --translate-uid) differ, so we build the
# Rust one. Static (crt-static on the gnu target, libseccomp and libcap-ng from
# their .a archives) so it runs in the rig's L1 and on any glibc host.
# Skipped when the binary is there and reports this version; the cargo target
# dir stays under $BUILD so a version bump rebuilds only what changed.
set -euo pipefail
BUILD=${1:-build}
# The one place the version is set: tests/src/copyright.rs (make copyright)
# reads this line to list the crates linked into this virtiofsd.
VERSION=1.14.0
TARGET=x86_64-unknown-linux-gnu
root="$BUILD/virtiofsd"
bin="$root/bin/virtiofsd"

doc="$root/share/doc/virtiofsd"
# Built with line tables (CARGO_PROFILE_RELEASE_DEBUG below), which the
# package's -dbgsym keeps: a binary without them is from an older recipe.
if [ -x "$bin" ] && [ "$("$bin" --version 2>/dev/null)" = "virtiofsd $VERSION" ] \
    && [ -f "$doc/LICENSE-BSD-3-Clause" ] && readelf -SW "$bin" | grep -q '\.debug_line'; then
    exit 0
fi
for lib in libseccomp.a libcap-ng.a; do
    [ -e "/usr/lib/x86_64-linux-gnu/$lib" ] || {
        echo "build-virtiofsd: /usr/lib/x86_64-linux-gnu/$lib missing: run make deps" >&2
        exit 1
    }
done
echo "build-virtiofsd: building virtiofsd $VERSION (static) into $root"
start=$(date +%s)
# --force: reached only when the binary is missing or not this version, so
# whatever cargo recorded as installed is stale. LIB{SECCOMP,CAPNG}_LINK_TYPE=
# static: libseccomp-sys and capng link the .a archives instead of the .so's
# (without it capng links libcap-ng.so into a crt-static binary, which then
# segfaults at start). --locked: the crate's own Cargo.lock, as upstream tested.
# Line tables (as coworkvm's release profile): scripts/build-deb.sh moves
# them, with the symbols, into the coworkvm-dbgsym package.
env -u CARGO_BUILD_TARGET \
    CARGO_TARGET_DIR="$BUILD/virtiofsd-target" \
    RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
    LIBSECCOMP_LINK_TYPE=static \
    LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
    LIBCAPNG_LINK_TYPE=static \
    LIBCAPNG_LIB_PATH=/usr/lib/x86_64-linux-gnu \
    cargo install --locked --force --root "$root" --target "$TARGET" --version "$VERSION" virtiofsd
# A crt-static binary with a shared library left in it links but crashes at
# start: check the ELF itself (no PT_INTERP, no NEEDED) before running it.
if readelf -lW "$bin" | grep -q 'INTERP' || readelf -dW "$bin" | grep -q '(NEEDED)'; then
    echo "build-virtiofsd: $bin is not statically linked:" >&2
    readelf -dW "$bin" | grep '(NEEDED)' >&2 || true
    exit 1
fi
got=$("$bin" --version) || { echo "build-virtiofsd: $bin --version failed" >&2; exit 1; }
[ "$got" = "virtiofsd $VERSION" ] || { echo "build-virtiofsd: $bin says '$got'" >&2; exit 1; }
# Its licence texts (Apache-2.0 AND BSD-3-Clause), for the package's
# copyright file: from the crate cargo just unpacked.
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"virtiofsd-$VERSION" 2>/dev/null | head -n1)
[ -f "$src/LICENSE-BSD-3-Clause" ] || { echo "build-virtiofsd: virtiofsd-$VERSION sources not found under ${CARGO_HOME:-$HOME/.cargo}/registry/src" >&2; exit 1; }
mkdir -p "$doc"
cp "$src/LICENSE-APACHE" "$src/LICENSE-BSD-3-Clause" "$doc/"
echo "build-virtiofsd: $got in $(( $(date +%s) - start )) s"
