#!/usr/bin/env bash
# Node-level capture rules for the lab (run inside the node netns, under scripts/sandbox).
# Stand-in for the rmq-cni plugin until it owns the rules; values come from the
# agent's shared constants (`rmq-agent constants`), never from copies here.
#
#   capture-rules.sh up   tproxy|redirect POD_IP [POD_IP...]
#   capture-rules.sh down
# Env: RMQ_AGENT (path of the rmq-agent binary), PORTS (comma list, default the
#      RocketMQ ports), ON_PORT (listener port, default the agent port).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
AGENT=${RMQ_AGENT:-$HERE/target/release/rmq-agent}
eval "$("$AGENT" constants --shell)"
PORTS=${PORTS:-$ROCKETMQ_PORTS}
ON_PORT=${ON_PORT:-$AGENT_PORT}
ipt() { local fam=$1; shift; if [ "$fam" = 6 ]; then ip6tables -w 5 "$@"; else iptables -w 5 "$@"; fi; }

plumbing_up() { # shared, idempotent: divert chain, socket rule, policy route
  for f in 4 6; do
    ipt $f -t mangle -N "$CHAIN_DIVERT" 2>/dev/null || true
    ipt $f -t mangle -C "$CHAIN_DIVERT" -j MARK --set-xmark "$CAPTURE_MARK/$CAPTURE_MASK" 2>/dev/null ||
      ipt $f -t mangle -A "$CHAIN_DIVERT" -j MARK --set-xmark "$CAPTURE_MARK/$CAPTURE_MASK"
    ipt $f -t mangle -C "$CHAIN_DIVERT" -j ACCEPT 2>/dev/null || ipt $f -t mangle -A "$CHAIN_DIVERT" -j ACCEPT
    ipt $f -t mangle -C PREROUTING -p tcp -m socket --transparent -j "$CHAIN_DIVERT" 2>/dev/null ||
      ipt $f -t mangle -I PREROUTING 1 -p tcp -m socket --transparent -j "$CHAIN_DIVERT"
    ipt $f -t mangle -N "$CHAIN_TPROXY" 2>/dev/null || true
    ipt $f -t mangle -C PREROUTING -j "$CHAIN_TPROXY" 2>/dev/null || ipt $f -t mangle -A PREROUTING -j "$CHAIN_TPROXY"
    ipt $f -t nat -N "$CHAIN_REDIRECT" 2>/dev/null || true
    ipt $f -t nat -C PREROUTING -j "$CHAIN_REDIRECT" 2>/dev/null || ipt $f -t nat -A PREROUTING -j "$CHAIN_REDIRECT"
  done
  ip -4 rule show | grep -q "lookup $ROUTE_TABLE" || ip -4 rule add fwmark "$CAPTURE_MARK/$CAPTURE_MASK" lookup "$ROUTE_TABLE" priority "$RULE_PRIORITY"
  ip -6 rule show | grep -q "lookup $ROUTE_TABLE" || ip -6 rule add fwmark "$CAPTURE_MARK/$CAPTURE_MASK" lookup "$ROUTE_TABLE" priority "$RULE_PRIORITY"
  ip -4 route replace local 0.0.0.0/0 dev lo table "$ROUTE_TABLE"
  ip -6 route replace local ::/0 dev lo table "$ROUTE_TABLE"
}

pod_up() { # mode ip
  local mode=$1 ip=$2 f=4 plen=32 onip=0.0.0.0
  case "$ip" in *:*) f=6 plen=128 onip=:: ;; esac
  local c="$RULE_COMMENT_PREFIX$ip"
  if [ "$mode" = tproxy ]; then
    ipt $f -t mangle -A "$CHAIN_TPROXY" -s "$ip/$plen" -p tcp -m multiport --dports "$PORTS" -m comment --comment "$c" \
      -j TPROXY --on-port "$ON_PORT" --on-ip "$onip" --tproxy-mark "$CAPTURE_MARK/$CAPTURE_MASK"
  else
    ipt $f -t nat -A "$CHAIN_REDIRECT" -s "$ip/$plen" -p tcp -m multiport --dports "$PORTS" -m comment --comment "$c" \
      -j REDIRECT --to-ports "$ON_PORT"
  fi
}

down() {
  for f in 4 6; do
    ipt $f -t mangle -D PREROUTING -p tcp -m socket --transparent -j "$CHAIN_DIVERT" 2>/dev/null || true
    ipt $f -t mangle -D PREROUTING -j "$CHAIN_TPROXY" 2>/dev/null || true
    ipt $f -t nat -D PREROUTING -j "$CHAIN_REDIRECT" 2>/dev/null || true
    for t in "mangle $CHAIN_TPROXY" "mangle $CHAIN_DIVERT" "nat $CHAIN_REDIRECT"; do
      set -- $t; ipt $f -t "$1" -F "$2" 2>/dev/null || true; ipt $f -t "$1" -X "$2" 2>/dev/null || true
    done
  done
  ip -4 rule del lookup "$ROUTE_TABLE" 2>/dev/null || true
  ip -6 rule del lookup "$ROUTE_TABLE" 2>/dev/null || true
  ip -4 route flush table "$ROUTE_TABLE" 2>/dev/null || true
  ip -6 route flush table "$ROUTE_TABLE" 2>/dev/null || true
}

case "${1:-}" in
  up) mode=${2:?mode tproxy|redirect}; shift 2; plumbing_up; for ip in "$@"; do pod_up "$mode" "$ip"; done ;;
  down) down ;;
  *) echo "usage: capture-rules.sh up tproxy|redirect POD_IP... | down" >&2; exit 2 ;;
esac
