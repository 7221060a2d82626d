#!/usr/bin/env bash
# Validates every resource that deploy/kustomization.yaml lists against the Kubernetes
# OpenAPI-derived JSON schemas, strictly (unknown fields are errors), with the PyPI package
# kubernetes-validate, which bundles those schemas (nothing is fetched while validating).
#
#   scripts/validate-manifests.sh             install if needed, then validate
#   scripts/validate-manifests.sh --install   only install (needs PyPI; run before the tests)
#
# The tool is installed once, pinned, into a venv under ~/.cache/rmq-agent (override with
# RMQ_KV_VENV). The test that runs this (tests/deploy_manifests.rs) runs in a sandbox without
# network: there the venv must already exist, and this script says how to make it.
# K8S_VERSIONS: schema versions to check against (default: the oldest and the newest bundled
# ones the manifests must work with; maxSurge for DaemonSets is GA since 1.25).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KV_VERSION=1.37.0
VENV=${RMQ_KV_VENV:-$HOME/.cache/rmq-agent/kubernetes-validate-$KV_VERSION}
K8S_VERSIONS=${K8S_VERSIONS:-"1.25.0 1.37.0"}

installed() {
  "$VENV/bin/python" - "$KV_VERSION" 2>/dev/null <<'EOF'
import importlib.metadata as m, sys
import kubernetes_validate, yaml  # noqa: F401 (importable, not just recorded)
sys.exit(m.version("kubernetes-validate") != sys.argv[1])
EOF
}

install() {
  mkdir -p "$(dirname "$VENV")"
  # One installer at a time (parallel test runs share the cache).
  exec 9>"$VENV.lock"
  flock 9
  if installed; then return 0; fi
  if [ -n "${RMQ_SANDBOX_NETNS:-}" ]; then
    echo "validate-manifests: kubernetes-validate==$KV_VERSION is not installed in $VENV, and this runs" \
         "inside the network sandbox, which cannot reach PyPI. Install it first, outside the sandbox:" \
         "scripts/validate-manifests.sh --install" >&2
    return 1
  fi
  echo "validate-manifests: installing kubernetes-validate==$KV_VERSION into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV" || {
    echo "validate-manifests: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
    return 1
  }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-input "kubernetes-validate==$KV_VERSION"
  installed || { echo "validate-manifests: kubernetes-validate==$KV_VERSION did not install" >&2; return 1; }
}

install
[ "${1:-}" = --install ] && exit 0

cd "$ROOT/deploy"
# The files kustomize would apply, in its order (this kustomization adds no transformers,
# so the files are exactly what reaches the cluster).
mapfile -t FILES < <("$VENV/bin/python" -c '
import sys, yaml
k = yaml.safe_load(open("kustomization.yaml"))
extra = set(k) - {"apiVersion", "kind", "resources"}
if extra:
    sys.exit("kustomization.yaml uses %s: validate the output of kubectl kustomize instead" % sorted(extra))
print("\n".join(k["resources"]))')
[ ${#FILES[@]} -gt 0 ] || { echo "validate-manifests: kustomization.yaml lists no resources" >&2; exit 1; }

for v in $K8S_VERSIONS; do
  "$VENV/bin/kubernetes-validate" --strict -k "$v" "${FILES[@]}"
done
echo "validate-manifests: ${#FILES[@]} file(s) valid against Kubernetes $K8S_VERSIONS (kubernetes-validate $KV_VERSION, strict)"
