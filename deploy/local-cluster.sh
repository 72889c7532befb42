#!/usr/bin/env bash
# The topology of deploy/compose.yaml as plain processes, for machines without a container engine:
# nats-server, store, two auth, two hooks, ingest and two gateways, each started with the environment compose.yaml
# gives it (read from that file), host names replaced by 127.0.0.1. The entry proxy is replaced
# by direct ports: ingest :7003, auth :7002 and :7008 (the services use the first), hooks :7006 and
# :7007, gateway-a :7004, gateway-b :7005.
#
#   cargo build --release -p eventbus && deploy/local-cluster.sh      # Ctrl-C stops everything
#
# EVENTBUS_BIN (default target/release/eventbus), EVENTBUS_LOCAL_DATA (default ./data/local),
# NATS_PORT (default 4222) and deploy/.env (or else .env.example) change what it runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
bin="${EVENTBUS_BIN:-$root/target/release/eventbus}"
data="${EVENTBUS_LOCAL_DATA:-$root/data/local}"
nats_port="${NATS_PORT:-4222}"
envfile="$here/.env"
[ -f "$envfile" ] || envfile="$here/.env.example"
[ -x "$bin" ] || { echo "no eventbus binary at $bin (cargo build --release -p eventbus)" >&2; exit 1; }
command -v nats-server >/dev/null || { echo "nats-server is not on PATH (apt-get install nats-server)" >&2; exit 1; }
mkdir -p "$data"

# KEY=value lines of one service's `environment:` map in compose.yaml.
compose_env() {
  awk -v service="$1" '
    /^  [a-z][a-z0-9-]*:$/ { current = substr($1, 1, length($1) - 1); inenv = 0; next }
    current == service && /^    environment:$/ { inenv = 1; next }
    inenv && /^      [A-Z_]+: / { key = $1; sub(/:$/, "", key); $1 = ""; sub(/^ /, ""); print key "=" $0; next }
    inenv && !/^      / { inenv = 0 }
  ' "$here/compose.yaml"
}

pids=()
stop() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -eq 0 ] || kill -TERM "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

# run <compose service> <subcommand> <port>
run() {
  local service=$1 sub=$2 port=$3 vars=()
  while IFS= read -r line; do
    line="${line//nats:\/\/nats:4222/nats://127.0.0.1:$nats_port}"
    line="${line//http:\/\/store:/http://127.0.0.1:}"
    line="${line//http:\/\/auth:/http://127.0.0.1:}"
    case "$line" in
      *_LISTEN=*) line="${line%%=*}=127.0.0.1:$port" ;;
      EVENTBUS_STORE_DATA=*) line="EVENTBUS_STORE_DATA=$data/store" ;;
      EVENTBUS_AUTH_KEYS_DIR=*) line="EVENTBUS_AUTH_KEYS_DIR=$data/auth" ;;
      EVENTBUS_WEBHOOKS_DIR=*) line="EVENTBUS_WEBHOOKS_DIR=$data/webhooks" ;;
    esac
    vars+=("$line")
  done < <(compose_env "$service")
  [ ${#vars[@]} -gt 0 ] || { echo "no environment for $service in compose.yaml" >&2; exit 1; }
  # The env file first, then the service's own variables, as compose does.
  env $(grep -E '^[A-Z_]+=' "$envfile" | tr '\n' ' ') "${vars[@]}" "$bin" "$sub" &
  pids+=($!)
  for _ in $(seq 1 200); do
    "$bin" probe --timeout-s 1 "http://127.0.0.1:$port/readyz" 2>/dev/null && { echo "$service ready on :$port"; return; }
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "$service exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "$service not ready on :$port" >&2
  exit 1
}

# NATS with the bus's credentials, from the env file, as compose runs it.
nats_user=$(grep -E '^EVENTBUS_NATS_USER=' "$envfile" | cut -d= -f2-)
nats_password=$(grep -E '^EVENTBUS_NATS_PASSWORD=' "$envfile" | cut -d= -f2-)
nats-server --addr 127.0.0.1 --port "$nats_port" ${nats_user:+--user "$nats_user" --pass "$nats_password"} >"$data/nats.log" 2>&1 &
pids+=($!)
run store store 7001
run auth-a auth 7002
run auth-b auth 7008
run hooks-a hooks 7006
run hooks-b hooks 7007
run ingest ingest 7003
run gateway-a gateway 7004
run gateway-b gateway 7005
echo "eventbus is up: publish to http://127.0.0.1:7003/v1/events, tokens at http://127.0.0.1:7002/v1/tokens,"
echo "WebSocket at ws://127.0.0.1:7004/v1/ws and ws://127.0.0.1:7005/v1/ws (Ctrl-C stops)"
wait -n "${pids[@]}"
