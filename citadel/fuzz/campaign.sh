#!/usr/bin/env bash
# The fuzz campaign: builds every target with cargo-fuzz (nightly, coverage-instrumented, no
# sanitizer: the code under test is safe Rust), runs them one after another at low priority,
# then minimises each corpus into corpus/<target> (what .ci/run replays), keeping an input only
# for new edges (-use_counters=0: hit counts would keep many near-duplicates in git).
#   citadel/fuzz/campaign.sh SECONDS [TARGET...]     (default: all targets)
# FUZZ_FEATURES picks the target groups to build (Cargo.toml [features]; default all);
# FUZZ_SKIP_BUILD=1 runs what is built already; FUZZ_RUNS caps executions (default 10 million).
# Each target stops at 10 million executions or SECONDS, whichever comes first; the last line
# of its log (fuzz-logs/<target>.log, not committed) has libFuzzer's final statistics.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:?seconds per target}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(stun_parse control_noise_frame socks5_request http_proxy_head resp_reply derp_frame disco_open
           map_frame tailcfg_json noise_handshake policy_hujson scenario_toml rest_api)
fi
mkdir -p "${FUZZ_TARGET_DIR:-../../target/fuzz-nightly}"
tdir=$(cd "${FUZZ_TARGET_DIR:-../../target/fuzz-nightly}" && pwd)
[ -n "${FUZZ_SKIP_BUILD:-}" ] || (cd .. && RUSTFLAGS="--cfg tokio_unstable" CARGO_INCREMENTAL=0 \
  cargo +nightly fuzz build -s none -a --codegen-units 16 --target-dir "$tdir" \
    --features "${FUZZ_FEATURES:-work node server scenario}")
bin=$tdir/x86_64-unknown-linux-gnu/release
mkdir -p fuzz-logs artifacts
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "fuzz-logs/work-$t"
  case $t in
    tailcfg_json|map_frame|policy_hujson|scenario_toml|rest_api) max_len=16384 ;;
    *) max_len=4096 ;;
  esac
  before=$(ls "corpus/$t" | wc -l)
  start=$(date +%s)
  nice -n 19 "$bin/$t" -runs="${FUZZ_RUNS:-10000000}" -max_total_time="$secs" -max_len=$max_len -timeout=10 \
    -rss_limit_mb=1024 -print_final_stats=1 -artifact_prefix="artifacts/$t-" \
    "fuzz-logs/work-$t" "corpus/$t" > "fuzz-logs/$t.log" 2>&1 || echo "$t: fuzzer exited non-zero (see fuzz-logs/$t.log)"
  took=$(( $(date +%s) - start ))
  rm -rf "fuzz-logs/min-$t" && mkdir -p "fuzz-logs/min-$t"
  nice -n 19 "$bin/$t" -merge=1 -use_counters=0 -max_len=$max_len -timeout=10 "fuzz-logs/min-$t" "corpus/$t" "fuzz-logs/work-$t" \
    > "fuzz-logs/$t.merge.log" 2>&1
  rm -rf "corpus/$t" && mv "fuzz-logs/min-$t" "corpus/$t"
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "fuzz-logs/$t.log" | grep -o '[0-9]*$' || echo "?")
  echo "$t execs=$execs seconds=$took corpus_before=$before corpus_after=$(ls "corpus/$t" | wc -l) crashes=$(ls artifacts | grep -c "^$t-" || true)" | tee -a fuzz-logs/summary.txt
done
