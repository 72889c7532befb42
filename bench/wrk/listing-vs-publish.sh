#!/usr/bin/env bash
# Issue 12's case 11: on an all-in-one bus holding 200k channels, single-event publishing alone,
# then with 8 clients listing a prefix nothing matches in a loop. Three rounds, alternating.
#   cargo build --release -p eventbus && bench/wrk/listing-vs-publish.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${EVENTBUS_BIN:-target/release/eventbus}
port=${PORT:-18181}
url="http://127.0.0.1:$port"
data=$(mktemp -d)
"$bin" serve --dev --listen "127.0.0.1:$port" --data "$data" >"$data.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$data" "$data.log"' EXIT
for _ in $(seq 100); do curl -sf "$url/healthz" >/dev/null && break; sleep 0.1; done
TOKEN=$(curl -sf -X POST "$url/v1/tokens" | jq -r .token)
export TOKEN
python3 - "$url" "$TOKEN" <<'PY'
import json, sys, urllib.request
url, token = sys.argv[1], sys.argv[2]
for batch in range(200):
    events = [{"id": f"c{batch}-{i}", "channel": f"many.{batch}.{i}", "type": "t"} for i in range(1000)]
    request = urllib.request.Request(url + "/v1/events", data=json.dumps(events).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + token})
    urllib.request.urlopen(request).read()
PY
echo "200k channels created"
rate() { grep -E '^Requests/sec' | awk '{print $2}'; }
for round in 1 2 3; do
  alone=$(wrk -t2 -c64 -d10s -s bench/wrk/publish.lua "$url/v1/events" | rate)
  wrk -t1 -c8 -d12s -s bench/wrk/list.lua "$url/v1/channels?prefix=nomatch&limit=10" >"$data.list" &
  lister=$!
  sleep 1
  with=$(wrk -t2 -c64 -d10s -s bench/wrk/publish.lua "$url/v1/events" | rate)
  wait $lister
  listings=$(rate <"$data.list")
  echo "round $round: publish alone $alone req/s; with 8 listers $with req/s (listings $listings req/s)"
done
