#!/usr/bin/env bash
# Validates deploy/*.yaml against the Kubernetes JSON schemas bundled in the PyPI
# package kubernetes-validate (pinned; installed once into ~/.cache/rmq-agent/kv).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${RMQ_KV_VENV:-$HOME/.cache/rmq-agent/kv}
VERSION=1.37.0
K8S=${K8S_VERSION:-1.34.0}
if ! "$VENV/bin/python" -c 'import importlib.metadata as m,sys; sys.exit(m.version("kubernetes-validate")!="'$VERSION'")' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "kubernetes-validate==$VERSION"
fi
cd "$ROOT/deploy"
"$VENV/bin/kubernetes-validate" --strict -k "$K8S" namespace.yaml serviceaccount.yaml configmap.yaml daemonset.yaml
