#!/usr/bin/env bash
# Start a real (rocketmq-rust 1.0.0) name server + broker on $BIND_IP (default 127.0.0.1).
#
#   start.sh [NAMESRV_PORT] [BROKER_PORT] [DATA_DIR]
#     NAMESRV_PORT  default 9876
#     BROKER_PORT   default 10911 (the broker also binds BROKER_PORT-2 as its
#                   "fast/VIP" listener and BROKER_PORT+1 as the HA listener)
#     DATA_DIR      default /tmp/rmq-peers/run-$BROKER_PORT (wiped unless KEEP_DATA=1)
#
# Env: RMQ_PEERS_HOME (default ~/.cache/rmq-agent/peers, as scripts/install-peers.sh;
#        binaries in $RMQ_PEERS_HOME/bin),
#      BIND_IP (default 127.0.0.1): the one address both servers bind (name server
#        --bindAddress, broker bindAddress + haListenAddress), advertise (brokerIp1/2)
#        and are checked on. The e2e lab runs them in the broker netns with
#        `ip netns exec <prefix>-brk env BIND_IP=10.200.2.2 ... start.sh 9876 10911 DIR`.
#      BROKER_NAME (default broker-a), CLUSTER (DefaultCluster), KEEP_DATA=1,
#      NAMESRV=host:port: start only a broker, registered with that running name server
#        (a second broker of the same cluster; NAMESRV_PORT is then ignored),
#      RUST_LOG (default info), EXTRA_BROKER_TOML (appended to [broker]),
#      EXTRA_STORE_TOML (appended to [store]),
#      FLAVOR=compat|pristine (default: compat when installed): which binaries to run:
#        pristine = crates.io 1.0.0 as published: rocketmq-{namesrv,broker}-rust
#        compat   = same + patches/patch-rocketmq-rust.sh: rocketmq-{namesrv,broker}-rust-compat
#      NAMESRV_BIN / BROKER_BIN override the binary paths.
# Prints the PIDs; writes $DATA_DIR/{namesrv,broker}.pid and logs there.
set -euo pipefail
NS_PORT=${1:-9876}
BR_PORT=${2:-10911}
DATA=${3:-/tmp/rmq-peers/run-$BR_PORT}
HOME_DIR=${RMQ_PEERS_HOME:-$HOME/.cache/rmq-agent/peers}
BIND_IP=${BIND_IP:-127.0.0.1}
BIN=$HOME_DIR/bin
BROKER_NAME=${BROKER_NAME:-broker-a}
CLUSTER=${CLUSTER:-DefaultCluster}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}

if [ -z "${FLAVOR:-}" ]; then
  if [ -x "$BIN/rocketmq-broker-rust-compat" ] && [ -x "$BIN/rocketmq-namesrv-rust-compat" ]; then FLAVOR=compat; else FLAVOR=pristine; fi
fi
SUFFIX=""; [ "$FLAVOR" = compat ] && SUFFIX="-compat"
NAMESRV_BIN=${NAMESRV_BIN:-$BIN/rocketmq-namesrv-rust$SUFFIX}
BROKER_BIN=${BROKER_BIN:-$BIN/rocketmq-broker-rust$SUFFIX}
for b in "$NAMESRV_BIN" "$BROKER_BIN"; do
  [ -x "$b" ] || { echo "missing $b; run install.sh first" >&2; exit 1; }
done
# host:port, with brackets for an IPv6 address
hostport() { case "$1" in *:*) echo "[$1]:$2" ;; *) echo "$1:$2" ;; esac; }
port_busy() { (exec 3<>"/dev/tcp/$BIND_IP/$1") 2>/dev/null; }
OWN_NS=1; [ -n "${NAMESRV:-}" ] && OWN_NS=0
NS_ADDR=${NAMESRV:-$(hostport "$BIND_IP" "$NS_PORT")}
PORTS="$BR_PORT $((BR_PORT-2)) $((BR_PORT+1))"; [ $OWN_NS = 1 ] && PORTS="$NS_PORT $PORTS"
for p in $PORTS; do
  if port_busy "$p"; then echo "port $p on $BIND_IP is already in use" >&2; exit 1; fi
done

if [ "${KEEP_DATA:-0}" != 1 ]; then rm -rf "$DATA"; fi
mkdir -p "$DATA/home/conf" "$DATA/namesrv" "$DATA/store/commitlog"

cat > "$DATA/namesrv.toml" <<TOML
rocketmqHome = "$DATA/home"
kvConfigPath = "$DATA/namesrv/kvConfig.json"
configStorePath = "$DATA/namesrv/namesrv.properties"
TOML

cat > "$DATA/broker.toml" <<TOML
[broker]
namesrvAddr = "$NS_ADDR"
brokerIp1 = "$BIND_IP"
brokerIp2 = "$BIND_IP"
listenPort = $BR_PORT
storePathRootDir = "$DATA/store"
autoCreateTopicEnable = true
autoCreateSubscriptionGroup = true
${EXTRA_BROKER_TOML:-}

[broker.brokerServerConfig]
bindAddress = "$BIND_IP"

[broker.brokerIdentity]
brokerName = "$BROKER_NAME"
brokerClusterName = "$CLUSTER"
brokerId = 0

[store]
storePathRootDir = "$DATA/store"
storePathCommitLog = "$DATA/store/commitlog"
haListenAddress = "$BIND_IP"
haListenPort = $((BR_PORT+1))
mappedFileSizeCommitLog = 67108864
# small index file (default 5M slots/20M entries = ~420 MB per broker)
maxHashSlotNum = 50000
maxIndexNum = 200000
# The timer drains 64 records a tick by default; POP checkpoints and their ACKs then reach
# the revive queue seconds late, and with patch P6 (arrival time as delivery time) the
# revive service can act on a checkpoint before its ACK arrives and revive an acked
# message. A large batch keeps the timer on time for the test loads.
timerDueBatchMessages = 4096
${EXTRA_STORE_TOML:-}
TOML

export ROCKETMQ_HOME="$DATA/home"
export RUST_LOG=${RUST_LOG:-info}
unset NAMESRV_ADDR

if [ $OWN_NS = 1 ]; then
  ( cd "$DATA" && exec setsid "$NAMESRV_BIN" -c "$DATA/namesrv.toml" --listenPort "$NS_PORT" \
    --bindAddress "$BIND_IP" >"$DATA/namesrv.log" 2>&1 < /dev/null ) &
  echo $! > "$DATA/namesrv.pid"
  for i in $(seq 1 100); do port_busy "$NS_PORT" && break; sleep 0.2; done
  port_busy "$NS_PORT" || { echo "namesrv did not open port $NS_PORT; see $DATA/namesrv.log" >&2; tail -20 "$DATA/namesrv.log" >&2; exit 1; }
fi

# exec: the background subshell must become the broker itself, or it would keep
# our stdout open (and its PID would not be the broker's).
( cd "$DATA" && exec setsid "$BROKER_BIN" -c "$DATA/broker.toml" >"$DATA/broker.log" 2>&1 < /dev/null ) &
echo $! > "$DATA/broker.pid"
for i in $(seq 1 150); do port_busy "$BR_PORT" && break; sleep 0.2; done
port_busy "$BR_PORT" || { echo "broker did not open port $BR_PORT; see $DATA/broker.log" >&2; tail -30 "$DATA/broker.log" >&2; exit 1; }
# Ready = the name server knows this broker.
if ! $PY "$HERE/tools/rmq_cli.py" wait-ready "$NS_ADDR" 60 "$BROKER_NAME" >"$DATA/ready.json"; then
  echo "broker never registered with the name server; see $DATA/broker.log" >&2; tail -30 "$DATA/broker.log" >&2; exit 1
fi
if [ $OWN_NS = 1 ]; then echo "namesrv pid=$(cat "$DATA/namesrv.pid") addr=$NS_ADDR log=$DATA/namesrv.log"
else echo "namesrv (not ours) addr=$NS_ADDR"; fi
echo "broker  pid=$(cat "$DATA/broker.pid") addr=$(hostport "$BIND_IP" "$BR_PORT") log=$DATA/broker.log registered=$(cat "$DATA/ready.json")"
echo "flavor=$FLAVOR namesrv_bin=$NAMESRV_BIN broker_bin=$BROKER_BIN"
echo "data=$DATA"
