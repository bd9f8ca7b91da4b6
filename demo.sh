#!/usr/bin/env bash
# The main job on an embedded default: starts nexus-sim on loopback, creates an org and a key,
# joins two citadel nodes and shows them seeing (and, with the data plane, talking to) each other.
set -euo pipefail
cd "$(dirname "$0")"
cargo build -q --release -p citadel-cli -p nexus-sim
B=target/release
WORK=$(mktemp -d)
PORT=${NEXUS_PORT:-18480}
export NEXUS_URL=http://127.0.0.1:$PORT NEXUS_API_KEY=demo-admin-key
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
PIDS=()
trap cleanup EXIT
$B/nexus-sim serve --listen 127.0.0.1:$PORT --api-key "$NEXUS_API_KEY" 2>"$WORK/nexus.log" &
PIDS+=($!)
for _ in $(seq 100); do $B/nexus-sim users list >/dev/null 2>&1 && break; sleep 0.05; done
echo "== nexus-sim on $NEXUS_URL"
$B/nexus-sim users create acme >/dev/null
KEY=$($B/nexus-sim preauthkeys create --user acme --reusable)
for n in alpha bravo; do
  ip=$($B/citadel --state-dir "$WORK/$n" init --authkey "$KEY" --nexus "$NEXUS_URL" --hostname $n)
  echo "== $n joined as $ip"
done
$B/citadel --state-dir "$WORK/bravo" up 2>"$WORK/bravo.log" &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$WORK/bravo/citadel.sock" ] && break; sleep 0.05; done
echo "== citadel status (alpha)"
$B/citadel --state-dir "$WORK/alpha" status
echo "== nexus-sim nodes list"
$B/nexus-sim nodes list
