#!/usr/bin/env bash
# Installs the real RocketMQ test peers, idempotently, into a cache directory:
#   - name server + broker: crates.io rocketmq-namesrv / rocketmq-broker 1.0.0 with the
#     interop patches in tests/peers/patches (the "compat" flavour; see tests/peers/README.md)
#   - Python SDK: PyPI rocketmq 0.4.4 (bundles Apache rocketmq-client-cpp) in a venv
#   - Rust SDK: crates.io rocketmq-client-rust 1.0.0 driver (tests/peers/clients/rust_client)
#
#   scripts/install-peers.sh [all|servers|python|rust-client]
#
# Env: RMQ_PEERS_HOME (default ~/.cache/rmq-agent/peers). A cold build takes ~20 min on
# 2 cores; a warm run takes seconds. The patch script's hash keys the server cache.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=$ROOT/tests/peers
HOME_DIR=${RMQ_PEERS_HOME:-$HOME/.cache/rmq-agent/peers}
WHAT=${1:-all}
mkdir -p "$HOME_DIR/bin"
export CARGO_TARGET_DIR=$HOME_DIR/target

install_servers() {
  local want="1.0.0+$(sha256sum "$PEERS/patches/patch-rocketmq-rust.sh" | cut -c1-12)"
  if [ -x "$HOME_DIR/bin/rocketmq-broker-rust-compat" ] && [ -x "$HOME_DIR/bin/rocketmq-namesrv-rust-compat" ] \
     && [ "$(cat "$HOME_DIR/bin/.compat-version" 2>/dev/null)" = "$want" ]; then
    echo "servers $want: cached"; return; fi
  local SRC=$HOME_DIR/src
  mkdir -p "$SRC/fetch/src"
  # A throwaway manifest makes cargo download and unpack the three crate sources.
  cat > "$SRC/fetch/Cargo.toml" <<'TOML'
[package]
name = "rmq-peers-fetch"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
rocketmq-protocol = "=1.0.0"
rocketmq-broker = "=1.0.0"
rocketmq-namesrv = "=1.0.0"
[workspace]
TOML
  echo 'fn main() {}' > "$SRC/fetch/src/main.rs"
  (cd "$SRC/fetch" && cargo fetch -q)
  local REG
  REG=$(dirname "$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/rocketmq-broker-1.0.0 | head -1)")
  for c in protocol broker namesrv; do
    rm -rf "$SRC/rocketmq-$c-1.0.0-compat"
    cp -r "$REG/rocketmq-$c-1.0.0" "$SRC/rocketmq-$c-1.0.0-compat"
    chmod -R u+w "$SRC/rocketmq-$c-1.0.0-compat"
  done
  "$PEERS/patches/patch-rocketmq-rust.sh" "$SRC/rocketmq-protocol-1.0.0-compat" \
    "$SRC/rocketmq-broker-1.0.0-compat" "$SRC/rocketmq-namesrv-1.0.0-compat"
  for c in broker namesrv; do
    # No --locked: the [patch] swaps rocketmq-protocol's source; every other
    # dependency keeps the version pinned by the crate's own Cargo.lock.
    (cd "$SRC/rocketmq-$c-1.0.0-compat" && cargo build --release --bin "rocketmq-$c-rust")
    install -m 755 "$CARGO_TARGET_DIR/release/rocketmq-$c-rust" "$HOME_DIR/bin/rocketmq-$c-rust-compat"
  done
  echo "$want" > "$HOME_DIR/bin/.compat-version"
}

install_python() {
  [ -x "$HOME_DIR/venv/bin/python" ] || python3 -m venv "$HOME_DIR/venv"
  if "$HOME_DIR/venv/bin/python" -c 'import importlib.metadata as m,sys; sys.exit(m.version("rocketmq")!="0.4.4")' 2>/dev/null; then
    echo "python rocketmq 0.4.4: cached"
  else
    "$HOME_DIR/venv/bin/pip" install -q 'rocketmq==0.4.4'
  fi
}

install_rust_client() {
  local want; want=$(cat "$PEERS"/clients/rust_client/{Cargo.toml,Cargo.lock,src/main.rs} | sha256sum | cut -c1-12)
  if [ -x "$HOME_DIR/bin/rust_produce_consume" ] && [ "$(cat "$HOME_DIR/bin/.rust-client-version" 2>/dev/null)" = "$want" ]; then
    echo "rust client $want: cached"; return; fi
  cargo build --release --locked --manifest-path "$PEERS/clients/rust_client/Cargo.toml"
  install -m 755 "$CARGO_TARGET_DIR/release/rust_produce_consume" "$HOME_DIR/bin/"
  echo "$want" > "$HOME_DIR/bin/.rust-client-version"
}

case "$WHAT" in
  all) install_servers; install_python; install_rust_client ;;
  servers) install_servers ;;
  python) install_python ;;
  rust-client) install_rust_client ;;
  *) echo "unknown target $WHAT (all|servers|python|rust-client)" >&2; exit 2 ;;
esac
echo "install-peers $WHAT: done ($HOME_DIR)"
