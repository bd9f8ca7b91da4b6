#!/usr/bin/env bash
# The main job on an embedded default: starts nexus-sim on loopback, creates an org and a key,
# joins two citadel nodes and shows them talking: they ping each other, and alpha fetches a
# page that bravo exposes on the mesh (`up --expose`) through its SOCKS5 proxy (`up --socks5`).
set -euo pipefail
cd "$(dirname "$0")"
cargo build -q --release -p citadel-cli -p nexus-sim
B=target/release
WORK=$(mktemp -d)
PORT=${NEXUS_PORT:-18480}
WEB=${DEMO_WEB_PORT:-18481}
SOCKS=${DEMO_SOCKS_PORT:-18482}
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
# A local web server on bravo's host, reachable only on loopback until bravo exposes it.
mkdir -p "$WORK/www"
echo "hello from the web server behind bravo" >"$WORK/www/index.html"
(cd "$WORK/www" && exec python3 -m http.server --bind 127.0.0.1 "$WEB" >/dev/null 2>&1) &
PIDS+=($!)
$B/citadel --state-dir "$WORK/bravo" up --expose "80=127.0.0.1:$WEB" 2>"$WORK/bravo.log" &
PIDS+=($!)
$B/citadel --state-dir "$WORK/alpha" up --socks5 "127.0.0.1:$SOCKS" 2>"$WORK/alpha.log" &
PIDS+=($!)
for n in alpha bravo; do
  for _ in $(seq 200); do [ -S "$WORK/$n/citadel.sock" ] && break; sleep 0.05; done
done
echo "== citadel status (alpha)"
$B/citadel --state-dir "$WORK/alpha" status --no-color
echo "== alpha pings bravo, bravo pings alpha (path: direct or relay)"
$B/citadel --state-dir "$WORK/alpha" ping -c 2 bravo
$B/citadel --state-dir "$WORK/bravo" ping -c 2 alpha
echo "== alpha fetches http://bravo/ through its SOCKS5 proxy; bravo forwards mesh port 80 to the web server"
curl -sS --max-time 20 --socks5-hostname "127.0.0.1:$SOCKS" http://bravo/
echo "== path to bravo after the fetch"
$B/citadel --state-dir "$WORK/alpha" status --json | python3 -c 'import json,sys
for p in json.load(sys.stdin)["peers"]: print("  %s: %s, rx %d B, tx %d B" % (p["name"], p["path"], p["rx_bytes"], p["tx_bytes"]))'
echo "== whois of bravo's address, as alpha sees it"
$B/citadel --state-dir "$WORK/alpha" whois "$($B/citadel --state-dir "$WORK/alpha" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["peers"][0]["ipv4"])')"
echo "== nexus-sim nodes list"
$B/nexus-sim nodes list
