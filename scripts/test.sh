#!/usr/bin/env bash
# The whole test suite, from a fresh clone: dependencies, formatting, lints,
# unit tests, integration tests against real KVM, and the NUMA box (a two-node
# QEMU host with KVM inside, see tests/numabox/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
start=$(date +%s)
phase() {
    echo "== [$(( $(date +%s) - start )) s] $*"
}

# One build serves the host tests and the NUMA box: the box has no libc, so
# vmhop is linked statically (crt-static) for both, and the box reuses the
# binary the tests built instead of compiling everything a second time.
# An explicit target keeps the flag off build scripts and proc macros.
export CARGO_BUILD_TARGET=x86_64-unknown-linux-gnu
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
export NUMABOX_BUILD_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

phase "cargo fmt --check"
cargo fmt --check
phase "cargo clippy -D warnings"
cargo clippy --release --all-targets -- -D warnings
phase "cargo test (unit and integration tests on this host's KVM)"
cargo test --release --no-fail-fast "$@" -- --skip numabox
# The NUMA box runs a QEMU TCG host per test: one at a time, since two
# emulated hosts on two cores only slow each other down.
phase "cargo test --test numabox (the two-node host inside QEMU)"
retries="$PWD/target/numabox-logs/platform-retries.log"
rm -f "$retries"
cargo test --release --no-fail-fast --test numabox "$@" -- --test-threads=1
# A box that failed the platform's way (its kernel crashed or froze, a
# Linux guest died while booting, or a guest triple-faulted later, within
# the suite's budget) is booted again (tests/numabox.rs, BOOT_RETRIES,
# TRIPLE_FAULT_BUDGET): say so, with each failed attempt kept in the file.
if [ -s "$retries" ]; then
    echo "NUMA box: boots retried after a platform failure (QEMU's emulated SVM, tests/numabox/README.md):"
    grep '^numabox retry:' "$retries"
    echo "(each failed attempt's output: $retries)"
else
    echo "NUMA box: no boot retried"
fi
phase "test suite done"
