#!/usr/bin/env bash
# Cleans up after e2e test processes that died without running their Drop (killed on a
# timeout, SIGKILL, ...). The sandbox namespaces vanish with their test process, but
# peer servers and agents started inside them may survive: stop exactly the PIDs the
# harness recorded under /tmp/rmq-e2e (after checking each is still the same program),
# then remove the scratch directory.
#   tests/cleanup.sh
set -u
ROOT=/tmp/rmq-e2e
[ -d "$ROOT" ] || { echo "nothing to clean ($ROOT does not exist)"; exit 0; }
for f in "$ROOT"/*/agent.pid "$ROOT"/*/peers-*/namesrv.pid "$ROOT"/*/peers-*/broker.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  case "$(basename "$f")" in agent.pid) want=rmq-agent ;; namesrv.pid) want=rocketmq-namesrv-rust ;; *) want=rocketmq-broker-rust ;; esac
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "$want"; then
    kill -KILL "$pid" && echo "killed $want pid $pid ($f)"
  fi
done
rm -rf "$ROOT"
echo "removed $ROOT"
