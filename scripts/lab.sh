#!/usr/bin/env bash
# The namespace lab: pod(s) -> node (router, agent, capture rules) -> broker.
# Must run inside scripts/sandbox (checked: refuses to touch the real network).
#
#   scripts/lab.sh up [PREFIX]     build the topology (PREFIX default "rmq")
#   scripts/lab.sh down [PREFIX]   kill processes inside its namespaces (by PID) and delete them
#
#  PREFIX-pod  eth0 10.200.1.2/24 fd00:200:1::2/64 ─veth─ pod0 10.200.1.1 fd00:200:1::1  ┐
#  PREFIX-pod2 eth0 10.200.3.2/24 fd00:200:3::2/64 ─veth─ pod1 10.200.3.1 fd00:200:3::1  ├ PREFIX-node
#  PREFIX-brk  eth0 10.200.2.2/24 + 10.200.2.3/32 (no listener: a "down" broker)         │ (forwarding,
#              fd00:200:2::2/64   ─veth─ brk0 10.200.2.1 fd00:200:2::1                    ┘  kube-proxy-like
#                                                                                           INVALID drop)
#  PREFIX-cni  only lo: a fresh pod sandbox for the CNI tests to wire with real plugins
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
"$HERE/lab-guard"
CMD=${1:?usage: lab.sh up|down [PREFIX]}
P=${2:-rmq}
NODE=$P-node POD=$P-pod POD2=$P-pod2 BRK=$P-brk CNIPOD=$P-cni
nsx() { ip netns exec "$@"; }

down() {
  for ns in "$CNIPOD" "$POD" "$POD2" "$BRK" "$NODE"; do
    [ -e "/run/netns/$ns" ] || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
  done
  sleep 0.3
  for ns in "$CNIPOD" "$POD" "$POD2" "$BRK" "$NODE"; do
    [ -e "/run/netns/$ns" ] || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}

link_pod() { # podns hostif v4net(10.200.X) v6net(fd00:200:X)
  local ns=$1 hif=$2 n=$3
  ip netns add "$ns"
  ip link add "$hif" netns "$NODE" type veth peer name eth0 netns "$ns"
  nsx "$ns" ip link set lo up
  nsx "$ns" ip link set eth0 up
  nsx "$ns" ip addr add "10.200.$n.2/24" dev eth0
  nsx "$ns" ip -6 addr add "fd00:200:$n::2/64" dev eth0 nodad
  nsx "$ns" ip route add default via "10.200.$n.1"
  nsx "$ns" ip -6 route add default via "fd00:200:$n::1"
  nsx "$NODE" ip link set "$hif" up
  nsx "$NODE" ip addr add "10.200.$n.1/24" dev "$hif"
  nsx "$NODE" ip -6 addr add "fd00:200:$n::1/64" dev "$hif" nodad
}

up() {
  down
  ip netns add "$NODE"
  nsx "$NODE" ip link set lo up
  nsx "$NODE" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
  link_pod "$POD" pod0 1
  link_pod "$POD2" pod1 3
  link_pod "$BRK" brk0 2
  nsx "$BRK" ip addr add 10.200.2.3/32 dev eth0
  nsx "$NODE" ip route add 10.200.2.3/32 via 10.200.2.2
  # An empty pod sandbox, wired up by CNI plugins in the CNI tests (as a runtime would).
  ip netns add "$CNIPOD"
  nsx "$CNIPOD" ip link set lo up
  # A fresh netns has no conntrack until a rule needs it; nodes with kube-proxy
  # drop INVALID packets, so the lab does too (proves the relay keeps state sane).
  for t in iptables ip6tables; do
    for c in INPUT FORWARD OUTPUT; do nsx "$NODE" $t -A $c -m conntrack --ctstate INVALID -j DROP; done
  done
}

case "$CMD" in
  up) up; echo "lab $P up" ;;
  down) down; echo "lab $P down" ;;
  *) echo "usage: lab.sh up|down [PREFIX]" >&2; exit 2 ;;
esac
