#!/usr/bin/env bash
# Writes a data directory with a given eventbus binary, for the upgrade test
# (eventbus/tests/upgrade.rs): every later version must open it with everything intact.
#
#   scripts/make-upgrade-fixture.sh BINARY OUT_DIR [COMMIT]
#
# COMMIT names the commit BINARY was built from (recorded in expected.json; default: this
# checkout's HEAD). To build an older commit beside this checkout:
#   git worktree add /tmp/old <commit> && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target cargo build -p eventbus)
#
# What it leaves in OUT_DIR:
#   data/           the all-in-one bus's data directory: log segments, an index checkpoint written at
#                   a clean stop, a tail written after it and then cut off by kill -9, a snapshot,
#                   the signing key, a webhook registration
#   expected.json   what the bus answered before the kill: every channel's history and compacted
#                   read, the snapshot, the key ids, the webhook, and the ids to retry
#
# Run once per on-disk format change with the binary of the commit that writes the old format; the
# result is committed and never regenerated for that format.
set -euo pipefail
bin=${1:?usage: make-upgrade-fixture.sh BINARY OUT_DIR}
out=${2:?usage: make-upgrade-fixture.sh BINARY OUT_DIR}
commit=${3:-$(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || echo unknown)}
rm -rf "$out"
mkdir -p "$out"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"

start() {
  "$bin" serve --dev --listen "127.0.0.1:$port" --data "$out/data" >>"$out/.log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do
    curl -sf "$url/healthz" >/dev/null && return 0
    sleep 0.1
  done
  echo "the bus did not start" >&2
  exit 1
}
post() { curl -sf -H "Authorization: Bearer $token" -H 'Content-Type: application/json' -d "$2" "$url$1"; }

start
token=$(curl -sf -X POST -H 'Content-Type: application/json' -d '{"role":"service","ttl_s":600}' "$url/v1/tokens" | jq -r .token)
# orders: keyed events, one key deleted; chat.room-1: plain events.
for n in $(seq 1 20); do
  key="k$((n % 5))"
  deleted=false
  if [ "$n" = 13 ]; then deleted=true; fi
  post /v1/events "{\"id\":\"order-$n\",\"channel\":\"orders\",\"type\":\"order_placed\",\"key\":\"$key\",\"deleted\":$deleted,\"data\":{\"n\":$n}}" >/dev/null
done
post /v1/events "$(for n in $(seq 1 10); do echo "{\"id\":\"chat-$n\",\"channel\":\"chat.room-1\",\"type\":\"said\",\"data\":\"line $n\"}"; done | jq -s .)" >/dev/null
curl -sf -X PUT -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d '{"seq":10,"data":{"orders":10}}' "$url/v1/channels/orders/snapshot" >/dev/null
post /v1/webhooks '{"url":"http://127.0.0.1:9/hook","channels":["orders"],"secret":"fixture-secret-0123456789"}' >/dev/null
# A clean stop writes the index checkpoint.
kill -TERM "$pid"
wait "$pid" || true

start
token=$(curl -sf -X POST -H 'Content-Type: application/json' -d '{"role":"service","ttl_s":600}' "$url/v1/tokens" | jq -r .token)
for n in $(seq 21 30); do
  post /v1/events "{\"id\":\"order-$n\",\"channel\":\"orders\",\"type\":\"order_placed\",\"key\":\"k$((n % 5))\",\"data\":{\"n\":$n}}" >/dev/null
done
post /v1/events '{"id":"late-1","channel":"late","type":"said","data":null}' >/dev/null
history() { curl -sf -H "Authorization: Bearer $token" "$url/v1/channels/$1/events?after=0&limit=1000$2"; }
jq -n \
  --argjson orders "$(history orders '')" \
  --argjson orders_compact "$(history orders '&compact=true')" \
  --argjson chat "$(history chat.room-1 '')" \
  --argjson late "$(history late '')" \
  --argjson snapshot "$(curl -sf -H "Authorization: Bearer $token" "$url/v1/channels/orders/snapshot")" \
  --argjson jwks "$(curl -sf "$url/v1/jwks")" \
  --argjson webhooks "$(curl -sf -H "Authorization: Bearer $token" "$url/v1/webhooks")" \
  '{written_by: $ARGS.named.version, history: {orders: $orders, "chat.room-1": $chat, late: $late},
    compacted: {orders: $orders_compact}, snapshot: {orders: $snapshot},
    kids: [$jwks.keys[].kid], webhooks: $webhooks,
    retry: [{id: "order-3", channel: "orders"}, {id: "chat-7", channel: "chat.room-1"}, {id: "order-30", channel: "orders"}]}' \
  --arg version "$commit" \
  >"$out/expected.json"
# The tail after the checkpoint is left for recovery to scan.
kill -KILL "$pid"
wait "$pid" 2>/dev/null || true
rm -f "$out/.log"
echo "fixture written to $out"
