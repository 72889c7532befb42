#!/usr/bin/env bash
# Runs every test of the workspace, after validating the deployment files. The integration tests
# start real nats-server and PostgreSQL processes: both are installed here from Debian's packages
# when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nats-server >/dev/null 2>&1; then
  echo "nats-server is not on PATH; installing Debian's nats-server package" >&2
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  # Debian's package also starts a system service on 4222; the tests use their own free ports.
fi
# Debian installs it under /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin"
command -v nats-server >/dev/null || { echo "nats-server could not be installed" >&2; exit 1; }

# PostgreSQL (the store's other engine, and its failover tests) from Debian's package; the tests
# start their own servers on free ports (as the postgres user when run as root).
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "PostgreSQL is not installed; installing Debian's postgresql package" >&2
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# The deployment files (compose, Kubernetes) against their schemas; tools from PyPI, cached.
./deploy/validate.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# The end-to-end suite once more with the store's log on PostgreSQL (each test cluster starts a
# PostgreSQL of its own): both engines keep the same promises to clients. `--workspace` as above, so
# that features resolve the same and the test binaries are reused rather than built a second time.
EVENTBUS_TEST_ENGINE=postgres cargo test --workspace --locked --no-fail-fast \
  --test end_to_end --test sse --test groups --test groups_ws --test snapshots --test channels \
  --test cloudevents --test least_privilege --test webhooks --test presence --test retention \
  --test gateways --test bad_input --test hooks_takeover "$@" 2>&1 | tee -a "$log" || status=1

# The browser client: its logic under Node's test runner, then the demo in a real Chromium against
# the eventbus binary the cargo tests just built.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian's ${missing[*]} for the browser tests" >&2
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
(cd web && npm ci --no-audit --no-fund --silent)
node --test web/test/ 2>&1 | tee -a "$log" | grep -E "^# (pass|fail)" || status=1
# The npm package: packed, installed into a fresh project, run from Node against a real bus.
EVENTBUS_BIN="$PWD/target/debug/eventbus" node --test web/package-test/ 2>&1 | tee -a "$log" \
  | grep -E "^(not )?ok|^# (pass|fail)" || status=1
EVENTBUS_BIN="$PWD/target/debug/eventbus" node --test web/browser-test/ 2>&1 | tee -a "$log" \
  | grep -E "^(not )?ok|^# (pass|fail)" || status=1
# The Python client: installed from the repo as a user would, then pytest against a real bus
# (deploy/validate.sh above made sure python3 can make a venv).
pyvenv=target/python-client
if [ ! -x "$pyvenv/bin/pytest" ]; then
  python3 -m venv "$pyvenv"
  "$pyvenv/bin/pip" install --quiet --disable-pip-version-check pytest==9.2.0
fi
"$pyvenv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall ./clients/python
EVENTBUS_BIN="$PWD/target/debug/eventbus" "$pyvenv/bin/pytest" -q clients/python/tests 2>&1 | tee -a "$log" \
  | grep -E "passed|failed|error" || status=1
# The HTTP API against its description: schemathesis, every check, a short run (the long one is
# in docs/testing.md).
# Its exit status is the verdict; its closing line ("No issues found in …", "2 warnings in …",
# "1 failure in …") is shown.
EVENTBUS_BIN="$PWD/target/debug/eventbus" scripts/schemathesis.sh 20 2>&1 | tee -a "$log" \
  | { grep -E " in [0-9.]+s =+$" || true; } || status=1
# One closing line for the whole workspace, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     /^# pass / { p += $3 } /^# fail / { f += $3 }
     / passed in | failed in / { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "workspace: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
