#!/usr/bin/env bash
# schemathesis against docs/openapi.json: the all-in-one bus in production mode (an API key, no
# development mode), a service token, every check (docs/schemathesis.toml says which operations
# skip one, and why). Nothing may be found: a request valid by the description is accepted, an
# invalid one refused with a documented status, every answer as described.
#   scripts/schemathesis.sh [examples per operation, default 20] [extra schemathesis options]
# The fetch of a durable group is left out of the short run: a fetch may wait up to 60 s for
# events (wait_s). The long run in docs/testing.md includes it.
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-20}
shift || true
bin=${EVENTBUS_BIN:-target/debug/eventbus}
venv=target/schemathesis
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check schemathesis==4.32.5
fi
data=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
key=schemathesis-key-0123456789abcdef
EVENTBUS_API_KEYS="st:$key" EVENTBUS_LOG=warn "$bin" serve --listen "127.0.0.1:$port" --data "$data" >"$data/log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$data"' EXIT
# Ready, then a service token for the key (python3 rather than curl: it is here already).
token=$(python3 - "$port" "$key" <<'PY'
import json, sys, time, urllib.request
port, key = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 60
while True:
    try:
        urllib.request.urlopen(base + "/readyz", timeout=1)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the bus was not ready within 60 s")
        time.sleep(0.1)
request = urllib.request.Request(
    base + "/v1/tokens", data=b"", method="POST", headers={"Authorization": f"Bearer {key}"}
)
print(json.load(urllib.request.urlopen(request, timeout=10))["token"])
PY
)
exclude=(--exclude-path "/v1/groups/{group}/fetch")
for arg in "$@"; do [ "$arg" = --with-fetch ] && exclude=(); done
args=()
for arg in "$@"; do [ "$arg" = --with-fetch ] || args+=("$arg"); done
"$venv/bin/schemathesis" --config-file docs/schemathesis.toml run docs/openapi.json \
  --url "http://127.0.0.1:$port" --header "Authorization: Bearer $token" \
  --max-examples "$examples" --no-color "${exclude[@]}" "${args[@]}"
