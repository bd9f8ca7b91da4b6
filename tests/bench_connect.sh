#!/usr/bin/env bash
# `./bench.sh connect [MB] [RUNS]`: bulk bytes through `citadel connect` (as an ssh
# ProxyCommand or `scp` would use it): stdin -> alpha's mesh TCP -> bravo's `--expose` -> an
# `nc` sink on loopback. Two `citadel up` nodes of one org on a nexus-sim, all on loopback.
# Prints MB/s per run and the median. No tsnet figure: Caddy's tsnet node has no `nc`.
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${1:-512}
RUNS=${2:-5}
B=target/release
WORK=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
SINK=$(free_port)
export NEXUS_URL=http://127.0.0.1:$PORT NEXUS_API_KEY=bench-connect-key
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
$B/nexus-sim serve --listen 127.0.0.1:"$PORT" --api-key "$NEXUS_API_KEY" 2>"$WORK/nexus.log" &
PIDS+=($!)
for _ in $(seq 200); do $B/nexus-sim users list >/dev/null 2>&1 && break; sleep 0.05; done
$B/nexus-sim users create acme >/dev/null
KEY=$($B/nexus-sim preauthkeys create --user acme --reusable)
for n in alpha bravo; do
    $B/citadel --state-dir "$WORK/$n" init --authkey "$KEY" --nexus "$NEXUS_URL" --hostname $n >/dev/null
done
$B/citadel --state-dir "$WORK/bravo" up --expose "9000=127.0.0.1:$SINK" 2>"$WORK/bravo.log" &
PIDS+=($!)
$B/citadel --state-dir "$WORK/alpha" up 2>"$WORK/alpha.log" &
PIDS+=($!)
for n in alpha bravo; do
    for _ in $(seq 200); do [ -S "$WORK/$n/citadel.sock" ] && break; sleep 0.05; done
done
$B/citadel --state-dir "$WORK/alpha" ping -c 2 bravo >/dev/null
rates=()
for _ in $(seq "$RUNS"); do
    timeout 120 nc -l 127.0.0.1 "$SINK" >/dev/null &
    sink=$!
    for _ in $(seq 100); do ss -ltn "sport = :$SINK" | grep -q LISTEN && break; sleep 0.02; done
    start=$(date +%s%N)
    head -c "${MB}M" /dev/zero | timeout 120 $B/citadel --state-dir "$WORK/alpha" connect bravo:9000 >/dev/null
    end=$(date +%s%N)
    wait "$sink" || true
    rate=$(python3 -c "print('%.1f' % ($MB * 1.048576 / (($end - $start) / 1e9)))")
    echo "citadel connect, ${MB} MiB: $rate MB/s"
    rates+=("$rate")
done
python3 -c "import statistics, sys; print('median %.1f MB/s over %d runs' % (statistics.median(map(float, sys.argv[1:])), len(sys.argv) - 1))" "${rates[@]}"
