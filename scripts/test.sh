#!/usr/bin/env bash
# The whole test suite, from a fresh clone: dependencies, formatting, lints,
# unit tests, integration tests against real KVM, and the NUMA box (a two-node
# QEMU host with KVM inside, see tests/numabox/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
start=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy -D warnings"
cargo clippy --release --all-targets -- -D warnings
echo "== cargo test (unit and integration tests on this host's KVM)"
cargo test --release --no-fail-fast "$@" -- --skip numabox
# The NUMA box runs a QEMU TCG host per test: one at a time, since two
# emulated hosts on two cores only slow each other down.
echo "== cargo test --test numabox (the two-node host inside QEMU)"
cargo test --release --no-fail-fast --test numabox "$@" -- --test-threads=1
echo "== test suite took $(( $(date +%s) - start )) s"
