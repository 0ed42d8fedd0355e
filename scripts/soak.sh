#!/usr/bin/env bash
# The soak run (tests/soak.rs) with N steps and an optional seed:
#   scripts/soak.sh 1000            # a random seed, printed first
#   scripts/soak.sh 1000 12345      # repeat a run exactly
# On a violation it prints the seed, the step and the whole history.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 STEPS [SEED]" >&2
    exit 2
fi
export VMHOP_SOAK_STEPS=$1
export VMHOP_SOAK_SEED=${2:-}
exec cargo test --release --test soak -- --nocapture
