#!/usr/bin/env bash
# The whole test suite: unit, property, end-to-end and real-peer tests.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --workspace --bins
cargo test --workspace -- --test-threads "${TEST_THREADS:-4}"
