#!/usr/bin/env bash
# `make test-quick`: `cargo test --workspace` with SKIP_VM=1, so that the VM
# batches and every test that cannot run here skip instead of failing. Each
# skip writes an `@@SKIPPED <test> (<file>:<line>): <reason>` line
# (tests/src/skip.rs); this counts the skipped tests (a test that skips two
# parts counts once) and ends with "N VM tests skipped", whatever the
# outcome, then exits with cargo's status.
set -uo pipefail
cd "$(dirname "$0")/.."
log=target/test-quick.log
mkdir -p target
SKIP_VM=1 cargo test --workspace "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
# Keyed by test name and file: the same test skipping twice is one test.
skipped=$(grep -o '@@SKIPPED [^ ]* ([^:)]*' "$log" | sort -u | wc -l)
echo
if [ "$skipped" -gt 0 ]; then
    echo "skipped (SKIP_VM=1):"
    grep -o '@@SKIPPED .*' "$log" | sed 's/^@@SKIPPED /  /'
fi
echo "$skipped VM tests skipped"
exit "$rc"
