# coworkvm: `make run` boots a guest and runs something in it; `make test`
# runs every test, the KVM boots included, and a test that cannot run here
# fails. Both install what they need. `make test-quick` runs the tests
# without building images, skips the VM ones (SKIP_VM=1) and says how many.
TARGET      := x86_64-unknown-linux-gnu
RELEASE_DIR := target/$(TARGET)/release
PROFILE     ?= default
# The VMM and the rig's helpers are static so they run inside the rig's L1 VM.
STATIC_ENV  := RUSTFLAGS="-C target-feature=+crt-static"
# Build outputs go to target/ and build/ only, whatever the caller's setting.
export CARGO_TARGET_DIR := $(CURDIR)/target

.PHONY: all deps kernel kernel-6.1 test-kernel-6.1 build images rootfs-refresh deb copyright lint test test-quick run bench fuzz clean

all: build

deps:
	@scripts/install-deps.sh

# The guest kernel in build/kernel: the newest Debian cloud kernel apt
# offers, after refreshing apt lists older than a day (Debian 12 offers the
# 6.1 and 6.12 series); COWORKVM_KERNEL_SERIES=6.1 picks that series. The
# package is in build/kernel/version, the release in the images' manifest.
kernel: deps
	@scripts/fetch-kernel.sh

# The newest 6.1 cloud kernel in its own directory, beside the main one.
KERNEL_61_DIR := build/k61
kernel-6.1: deps
	@BUILD=$(KERNEL_61_DIR) COWORKVM_KERNEL_SERIES=6.1 scripts/fetch-kernel.sh

# The rig's boot test (coworkvm boots the kernel inside the L1 rig, which
# runs the same kernel) on the 6.1 series, so that a machine whose apt
# offers only 6.1 cannot break unseen.
test-kernel-6.1: build kernel-6.1
	SKIP_VM= COWORKVM_BUILD_DIR=$(KERNEL_61_DIR) cargo test -p coworkvm-tests --test boot

# virtiofsd (the Rust virtio-fs daemon, for shared folders) comes from
# crates.io, static, into build/virtiofsd/bin (scripts/build-virtiofsd.sh:
# skipped when that version is already built).
build: kernel
	scripts/build-virtiofsd.sh build
	$(STATIC_ENV) cargo build --release --target $(TARGET) -p coworkvm -p coworkvm-agent -p coworkvm-tests --bins
	cargo build --release -p coworkvm-rootfs
	target/release/coworkvm-rootfs initramfs --out build/agent-initrd.cpio.zst \
	    --init $(RELEASE_DIR)/coworkvm-agent --busybox build/busybox \
	    --kernel-dir build/kernel \
	    --modules virtio_mmio,virtio_blk,virtio-rng,vmw_vsock_virtio_transport,virtiofs
	$(MAKE) --no-print-directory images

# The guest images (kernel, initramfs, Debian rootfs, manifest) in
# build/images; coworkvm-rootfs skips the work when its inputs are
# unchanged, and keeps the mmdebstrap tree in build/cache.
# PROFILE=office adds LibreOffice (rootfs-builder/packages-office.txt).
images:
	target/release/coworkvm-rootfs build --out build/images --kernel-dir build/kernel \
	    --agent $(RELEASE_DIR)/coworkvm-agent --cache-dir build/cache --profile $(PROFILE)

# Drops the cached Debian tree: the next build takes the mirror's packages.
rootfs-refresh:
	rm -rf build/cache build/images

# The Debian packages: build/coworkvm_VERSION_ARCH.deb and its -dbgsym
# (scripts/build-deb.sh, metadata in debian/; docs/packaging.md).
# tests/tests/deb.rs builds them again, runs lintian and installs them.
deb: build
	scripts/build-deb.sh build

# debian/copyright after a dependency change (tests/tests/copyright.rs
# fails until it is current).
copyright:
	cargo run -q -p coworkvm-tests --bin gen-copyright

# cargo-deny (deny.toml): licences, duplicate versions and sources, and
# RustSec advisories where its database can be fetched (a loud WARNING
# where it cannot).
lint:
	@scripts/install-deps.sh --cargo-tools
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings
	scripts/cargo-deny.sh

# Strict, as CI: a test that needs KVM, root, the rig, a Debian package or
# the build's artifacts and cannot run fails (SKIP_VM is cleared).
test: build lint
	SKIP_VM= cargo test --workspace

# The quick loop: no image build; the VM batches and any test that cannot
# run here are skipped, each with an @@SKIPPED line, and counted at the end.
test-quick: lint
	@scripts/test-quick.sh

run: build
	$(RELEASE_DIR)/coworkvm-rig demo

# BASELINE=path/to/another/coworkvm also boots that build in the same loop
# and reports new / baseline.
bench: build
	$(RELEASE_DIR)/coworkvm-rig bench --out bench/results.md $(if $(BASELINE),--baseline $(BASELINE))

# Runs each cargo-fuzz target for FUZZ_SECONDS (not part of `make test`).
# cargo-fuzz passes nightly flags (-Zsanitizer=address); RUSTC_BOOTSTRAP=1
# lets the stable toolchain accept them. Each fuzz crate builds into its
# own fuzz/target, away from the static release build in target/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := socket-proto:decode vmm:vsock_tx helper:sni
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@set -e; for t in $(FUZZ_TARGETS); do \
	    crate=$${t%%:*}; target=$${t#*:}; \
	    echo "== cargo fuzz run $$target ($$crate/fuzz, $(FUZZ_SECONDS) s)"; \
	    (cd $$crate && CARGO_TARGET_DIR=$(CURDIR)/$$crate/fuzz/target RUSTC_BOOTSTRAP=1 \
	        cargo fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS)); \
	done

clean:
	cargo clean
	rm -rf build
