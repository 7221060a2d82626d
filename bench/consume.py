#!/usr/bin/env python3
"""Runs the consume benchmark inside the lab scripts/bench-consume built (see that script).

Per run (mode pull or pop, interleaved pull/pop then pop/pull so drift hits both): a fresh
topic and group, CONSUMERS real SDK consumers in the pod (their traffic captured into
rmq-agent), time to register and for classic rebalancing to settle (one 20 s rebalance
round), then the consumers are frozen (SIGSTOP) while `rmq-bench produce` writes MSGS
messages straight into the broker (from its own netns), and thawed at once: the backlog is
there before anyone consumes, so the broker's produce speed does not bound the result.
Throughput = MSGS / (time the last new message was printed by a consumer, from the output
files' modification times - thaw time).
Fairness = Jain's index over per-consumer deliveries. CPU = utime+stime of the agent and the
broker from thaw to drained, per 1,000 messages.
"""
import argparse
import os
import re
import signal
import statistics
import subprocess
import time

ap = argparse.ArgumentParser()
for k in ("tmp", "sdk", "lab", "broker", "out", "samples"):
    ap.add_argument("--" + k, required=True)
for k in ("reps", "msgs", "consumers", "queues", "body", "agent-pid", "broker-pid"):
    ap.add_argument("--" + k, type=int, required=True)
a = ap.parse_args()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.environ["RMQ_PEERS_HOME"]
NS = "%s:9876" % a.broker
WARM_S = 25          # consumers register, fetch routes, and classic rebalancing settles
LIMIT_S = 180        # a run that has not drained by then is reported as such
HZ = os.sysconf("SC_CLK_TCK")


def netns(role, *cmd, **kw):
    return ["ip", "netns", "exec", "%s-%s" % (a.lab, role)] + list(cmd)


def cpu_s(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ


def jain(xs):
    s, s2 = sum(xs), sum(x * x for x in xs)
    return s * s / (len(xs) * s2) if s2 else 0.0


def start_consumer(i, sdk, topic, group, home):
    os.makedirs(home, exist_ok=True)
    out = open(os.path.join(a.tmp, "%s-c%d.out" % (group, i)), "w")
    if sdk == "python":
        cmd = netns("pod", PEERS + "/venv/bin/python", ROOT + "/tests/peers/clients/py_consumer.py", NS,
                    "--topic", topic, "--group", group, "--seconds", str(LIMIT_S + 60), "--id", "c%d" % i)
    else:
        cmd = netns("pod", PEERS + "/bin/rust_produce_consume", NS, "--topic", topic, "--group", group,
                    "--mode", "consume", "--timeout", str(LIMIT_S + 60))
    env = dict(os.environ, HOME=home)
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    return p, out.name


def deliveries(path, prefix):
    """i values of this run's messages, one per printed delivery."""
    got = []
    pat = re.compile(r"body=%s i=(\d+) " % re.escape(prefix))
    with open(path, errors="replace") as f:
        for line in f:
            m = pat.search(line)
            if m:
                got.append(int(m.group(1)))
    return got


def run(rep, mode):
    topic, group, prefix = "BC_%s_%d" % (mode.upper(), rep), "bc_%s_%d" % (mode, rep), "r%d%s" % (rep, mode)
    subprocess.run(netns("brk", "python3", ROOT + "/tests/peers/tools/rmq_cli.py", "create-topic",
                         "%s:10911" % a.broker, topic, str(a.queues)), check=True, stdout=subprocess.DEVNULL)
    sdks = [a.sdk if a.sdk != "mixed" else ("python" if i % 2 == 0 else "rust") for i in range(a.consumers)]
    procs = [start_consumer(i, s, topic, group, os.path.join(a.tmp, "home-%s-%d" % (group, i))) for i, s in enumerate(sdks)]
    time.sleep(WARM_S)
    for p, _ in procs:
        p.send_signal(signal.SIGSTOP)
    t_prod = time.time()
    prod = subprocess.run(netns("brk", ROOT + "/target/release/rmq-bench", "produce", "--to", "%s:10911" % a.broker,
                                "--topic", topic, "--queues", str(a.queues), "--count", str(a.msgs),
                                "--body-bytes", str(a.body), "--prefix", prefix), capture_output=True, text=True)
    if prod.returncode != 0:
        raise SystemExit("produce failed: %s %s" % (prod.stdout, prod.stderr))
    produced_s = time.time() - t_prod
    cpu0 = (cpu_s(a.agent_pid), cpu_s(a.broker_pid))
    t0 = time.time()
    for p, _ in procs:
        p.send_signal(signal.SIGCONT)
    seen, deadline = set(), t0 + LIMIT_S
    while len(seen) < a.msgs and time.time() < deadline:
        time.sleep(0.2)
        seen = set()
        for _, path in procs:
            seen.update(deliveries(path, prefix))
    # When the last delivery was printed: the newest write to any consumer's output (the
    # polling above only detects it, at its own pace).
    last_new = max(os.stat(path).st_mtime for _, path in procs) if len(seen) >= a.msgs else time.time()
    cpu1 = (cpu_s(a.agent_pid), cpu_s(a.broker_pid))
    time.sleep(1)  # let stragglers (duplicates) print before counting
    per = [len(deliveries(path, prefix)) for _, path in procs]
    for p, _ in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    secs = last_new - t0
    r = {
        "rep": rep, "mode": mode, "unique": len(seen), "deliveries": sum(per), "duplicates": sum(per) - len(seen),
        "seconds": secs, "msgs_per_s": len(seen) / secs if secs > 0 else 0.0, "fairness": jain(per),
        "active": sum(1 for x in per if x), "produce_s": produced_s,
        "agent_cpu_ms_per_1k": (cpu1[0] - cpu0[0]) * 1e6 / max(1, len(seen)),
        "broker_cpu_ms_per_1k": (cpu1[1] - cpu0[1]) * 1e6 / max(1, len(seen)),
        "per_consumer": per,
    }
    print("  rep %d %-4s: %d/%d unique in %.2fs = %.0f msg/s, fairness %.3f (%s), duplicates %d, agent %.0f ms CPU/1k msgs "
          "(backlog produced in %.2fs)" % (rep, mode, r["unique"], a.msgs, secs, r["msgs_per_s"], r["fairness"],
                                     "/".join(map(str, per)), r["duplicates"], r["agent_cpu_ms_per_1k"], produced_s), flush=True)
    return r


print("consume benchmark: REPS=%d MSGS=%d CONSUMERS=%d (%s) QUEUES=%d BODY=%d" % (a.reps, a.msgs, a.consumers, a.sdk, a.queues, a.body))
load0 = open("/proc/loadavg").read().split()[:3]
results = []
for rep in range(1, a.reps + 1):
    for mode in (("pull", "pop") if rep % 2 else ("pop", "pull")):
        results.append(run(rep, mode))
load1 = open("/proc/loadavg").read().split()[:3]

with open(a.samples, "w") as f:
    keys = ["rep", "mode", "unique", "deliveries", "duplicates", "seconds", "msgs_per_s", "fairness", "active",
            "agent_cpu_ms_per_1k", "broker_cpu_ms_per_1k", "produce_s"]
    f.write("\t".join(keys + ["per_consumer"]) + "\n")
    for r in results:
        f.write("\t".join(str(r[k]) for k in keys) + "\t" + "/".join(map(str, r["per_consumer"])) + "\n")


def med(mode, k):
    return statistics.median(r[k] for r in results if r["mode"] == mode)


pull, pop = med("pull", "msgs_per_s"), med("pop", "msgs_per_s")
ratios = [p["msgs_per_s"] / q["msgs_per_s"] for p, q in zip([r for r in results if r["mode"] == "pop"],
                                                            [r for r in results if r["mode"] == "pull"]) if q["msgs_per_s"]]
lost = [r for r in results if r["unique"] < a.msgs]
L = ["# rmq-bench consume results", "",
     "load average at start: %s · at end: %s (2-core shared VM: compare within one run)" % (" ".join(load0), " ".join(load1)), "",
     "| mode | msgs/s (median) | consumed | duplicates | Jain fairness | consumers active | agent CPU ms / 1k msgs | broker CPU ms / 1k msgs |",
     "|---|---|---|---|---|---|---|---|"]
for mode, label in (("pull", "classic PULL, relayed as-is"), ("pop", "Pull→Pop conversion")):
    rs = [r for r in results if r["mode"] == mode]
    L.append("| %s | %.0f | %s | %s | %.3f | %s | %.0f | %.0f |" % (
        label, med(mode, "msgs_per_s"), "/".join("%d" % r["unique"] for r in rs), "/".join("%d" % r["duplicates"] for r in rs),
        med(mode, "fairness"), "/".join("%d" % r["active"] for r in rs), med(mode, "agent_cpu_ms_per_1k"), med(mode, "broker_cpu_ms_per_1k")))
L += ["", "%d interleaved rep(s) (pull/pop, then pop/pull); per run a fresh topic with %d queues and group, %d %s consumer(s) "
      "in the pod (through rmq-agent, TPROXY), %d s of warm-up, then, with the consumers frozen (SIGSTOP), %d messages of %d bytes "
      "written straight into the broker; throughput = messages / (last new delivery − thaw); per-rep msgs/s: %s." % (
          a.reps, a.queues, a.consumers, a.sdk, WARM_S, a.msgs, a.body,
          "; ".join("%s %.0f" % (r["mode"], r["msgs_per_s"]) for r in results)), "",
      "**Pop/PULL consume throughput ratio: %.3f×** (ratio of medians; per rep: %s)" % (pop / pull if pull else 0, "/".join("%.2f" % x for x in ratios)), "",
      "Targets (Pop conversion):",
      "- throughput ≥ 0.8× native PULL: %.3f× — %s" % (pop / pull if pull else 0, "PASS" if pull and pop / pull >= 0.8 else "MISS"),
      "- fairness ≥ 0.9: %.3f — %s" % (med("pop", "fairness"), "PASS" if med("pop", "fairness") >= 0.9 else "MISS"),
      "- every message consumed: %s" % ("PASS" if not lost else "MISS (%s)" % ", ".join("rep %d %s %d/%d" % (r["rep"], r["mode"], r["unique"], a.msgs) for r in lost)), ""]
text = "\n".join(L) + "\n"
open(a.out, "w").write(text)
print(text)
