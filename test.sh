#!/usr/bin/env bash
# The whole test suite: unit, property, end-to-end and real-peer tests.
#
# The scenario files on kernel NAT (tests/harness_real.rs, seven groups) take about three and a
# half minutes of scenario clocks, the groups side by side; the rest of the suite, run one test
# binary after another, takes about three. So that binary runs beside the rest instead of after
# it (all its groups at once), and its output is printed once both are done.
set -euo pipefail
cd "$(dirname "$0")"
threads="${TEST_THREADS:-4}"
# Every binary and test binary in one build, so the two runs below only run them. One build,
# not `cargo build --bins` and then `cargo test --no-run`: the tests' dev-dependencies change
# the features cargo unifies, so the second compiled about 120 crates again (285 s of a cold
# 2-core build). Built with the tests, the binaries the tests start are the ones `cargo test`
# itself would build.
cargo build --workspace --bins --tests
# Names the real-NAT binary's path (built above: nothing to compile).
real_bin=$(cargo test --workspace --no-run --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "harness_real" and m.get("executable"):
        print(m["executable"])')
[ -x "$real_bin" ] || { echo "test.sh: the harness_real test binary was not built" >&2; exit 1; }

real_log=$(mktemp)
# As cargo runs it: from the package's directory.
(cd tests && exec "$real_bin" --test-threads 7) > "$real_log" 2>&1 &
real_pid=$!
# Whatever ends this script ends that run too (it stops its own namespaces on SIGTERM).
trap 'kill -TERM "$real_pid" 2>/dev/null || true; rm -f "$real_log"' EXIT

rc=0
cargo test --workspace -- --test-threads "$threads" --skip _on_kernel_nat || rc=$?
real_rc=0
wait "$real_pid" || real_rc=$?
# It has ended: nothing to stop any more (its pid may be another process's by now).
trap 'rm -f "$real_log"' EXIT
echo "== tests/harness_real.rs (played beside the rest)"
cat "$real_log"
[ "$real_rc" -eq 0 ] || echo "test.sh: tests/harness_real.rs failed (exit $real_rc)" >&2
[ "$rc" -eq 0 ] || echo "test.sh: the suite failed (exit $rc)" >&2
[ "$rc" -eq 0 ] && [ "$real_rc" -eq 0 ]
