#!/usr/bin/env bash
# Starts Sockudo (a Pusher-protocol server) the way `bench --target pusher` expects it: one app
# (id bench-app, key bench-key, secret bench-secret) on 127.0.0.1:${PORT:-16001}, no rate limits,
# room for 100k connections. Sockudo keeps nothing on disk.
#   apt-get install protobuf-compiler && cargo install sockudo@5.2.0 --locked
#   bench/pusher/sockudo.sh &
#   ./target/release/bench latency --target pusher --pusher-url http://127.0.0.1:16001
set -euo pipefail
exec env HOST=127.0.0.1 PORT="${PORT:-16001}" METRICS_ENABLED=false RATE_LIMITER_ENABLED=false \
  SOCKUDO_MAX_CONNECTIONS=100000 \
  SOCKUDO_DEFAULT_APP_ID=bench-app SOCKUDO_DEFAULT_APP_KEY=bench-key \
  SOCKUDO_DEFAULT_APP_SECRET=bench-secret SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS=100000 \
  SOCKUDO_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SECOND=1000000 \
  "${SOCKUDO:-sockudo}"
