#!/usr/bin/env bash
# Issue 17's publishing figures: single-event requests (wrk -t2 -c64, fresh ids) and batches of
# 100 (wrk -t2 -c16), fsync before every 200, on a fresh bus for every run; the load tool shares
# the machine's cores. Prints one line per run and the medians.
#   cargo build --release -p eventbus && bench/wrk/publish.sh [all-in-one|separate] [runs]
# all-in-one: `eventbus serve --dev`. separate: nats-server, `eventbus store`, `auth` and
# `ingest` as processes of their own, talking gRPC over loopback.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode=${1:-all-in-one}
runs=${2:-3}
seconds=${SECONDS_PER_RUN:-10}
bin=${EVENTBUS_BIN:-target/release/eventbus}
base=${PORT:-18181}
command -v wrk >/dev/null || { echo "wrk is not on PATH (apt-get install wrk)" >&2; exit 1; }
pids=()
stop() { [ ${#pids[@]} -eq 0 ] || { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }; pids=(); }
trap 'stop; rm -rf "$data"' EXIT
ready() { for _ in $(seq 200); do curl -sf "$1/readyz" >/dev/null && return; sleep 0.1; done; echo "not ready: $1" >&2; exit 1; }

start() {
  data=$(mktemp -d)
  if [ "$mode" = all-in-one ]; then
    "$bin" serve --dev --listen "127.0.0.1:$base" --data "$data" >"$data/log" 2>&1 &
    pids+=($!)
    url="http://127.0.0.1:$base"
    ready "$url"
    token_url=$url
  else
    export EVENTBUS_INTERNAL_TOKEN=bench-internal-token-0123456789
    export EVENTBUS_NATS_URL="nats://127.0.0.1:$((base + 4))"
    export EVENTBUS_STORE_URL="http://127.0.0.1:$((base + 1))" EVENTBUS_AUTH_URL="http://127.0.0.1:$((base + 2))"
    nats-server --addr 127.0.0.1 --port $((base + 4)) >"$data/nats.log" 2>&1 &
    pids+=($!)
    "$bin" store --listen "127.0.0.1:$((base + 1))" --data "$data/store" >"$data/store.log" 2>&1 &
    pids+=($!)
    ready "http://127.0.0.1:$((base + 1))"
    "$bin" auth --dev --listen "127.0.0.1:$((base + 2))" --keys-dir "$data/auth" >"$data/auth.log" 2>&1 &
    pids+=($!)
    ready "http://127.0.0.1:$((base + 2))"
    "$bin" ingest --listen "127.0.0.1:$((base + 3))" >"$data/ingest.log" 2>&1 &
    pids+=($!)
    url="http://127.0.0.1:$((base + 3))"
    ready "$url"
    token_url="http://127.0.0.1:$((base + 2))"
  fi
  TOKEN=$(curl -sf -X POST "$token_url/v1/tokens" | jq -r .token)
  export TOKEN
}

rate() { grep -E '^Requests/sec' | awk '{print $2}'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
singles=() batches=()
for run in $(seq "$runs"); do
  start
  single=$(wrk -t2 -c64 -d"${seconds}s" -s bench/wrk/publish.lua "$url/v1/events" | rate)
  batch=$(BATCH=100 wrk -t2 -c16 -d"${seconds}s" -s bench/wrk/publish.lua "$url/v1/events" | rate)
  stop
  rm -rf "$data"
  batch_events=$(awk -v r="$batch" 'BEGIN {printf "%.0f", r * 100}')
  echo "run $run ($mode): single-event requests $single/s; batches of 100: $batch_events events/s"
  singles+=("$single") batches+=("$batch_events")
done
echo "median ($mode, $runs runs): single $(printf '%s\n' "${singles[@]}" | median)/s, batched $(printf '%s\n' "${batches[@]}" | median) events/s"
