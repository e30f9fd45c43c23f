#!/usr/bin/env bash
# cargo-deny over Cargo.lock (deny.toml): licences, bans (duplicate
# versions, wildcards) and sources always; advisories only when RustSec's
# advisory database (a git clone from github.com) can be fetched. Where it
# cannot (CI reaches crates.io, npm and Debian only), this says so loudly
# and the other checks still run and still fail the build.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deny >/dev/null || { echo "cargo-deny: not installed; run scripts/install-deps.sh --cargo-tools" >&2; exit 1; }
checks=(licenses bans sources)
if cargo deny fetch db >/dev/null 2>&1; then
    checks=(advisories "${checks[@]}")
else
    echo "cargo-deny: WARNING: RustSec's advisory database (https://github.com/RustSec/advisory-db) cannot be fetched from here: ADVISORIES ARE NOT CHECKED; licences, bans and sources are" >&2
fi
# --offline: the database was just fetched (or is not wanted); --locked: as CI.
exec cargo deny --log-level error --locked --offline check "${checks[@]}"
