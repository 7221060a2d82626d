#!/usr/bin/env bash
# Installs what the demo, tests and benchmark need on a Debian machine (as root),
# idempotently: Debian packages, cargo-nextest, and the real RocketMQ test peers
# (built once, cached under ~/.cache/rmq-agent; a cold build takes ~20 min).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "setup-host: run as root (apt, network namespaces, iptables)" >&2; exit 1; }

PKGS=(iptables iproute2 haproxy conntrack tcpdump kmod procps util-linux containernetworking-plugins python3 python3-venv)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || { echo "setup-host: cargo not found; install a Rust toolchain (rustup) first" >&2; exit 1; }
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

"$ROOT/scripts/install-peers.sh" all
# The manifest test validates offline, inside the sandbox: install its schema tool now.
"$ROOT/scripts/validate-manifests.sh" --install
