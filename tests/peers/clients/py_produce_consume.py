#!/usr/bin/env python3
"""Produce N messages and consume them back with the PyPI `rocketmq` 0.4.4 package
(messense's ctypes binding; the wheel bundles Apache rocketmq-client-cpp's
librocketmq.so, so this is the real C++ remoting client).

  py_produce_consume.py NAMESRV [--topic T] [--group G] [-n N] [--mode push|pull]
                        [--timeout S]

  --mode push  (default) PushConsumer: client-side rebalance + long-polling
               PULL_MESSAGE, offsets committed with UPDATE_CONSUMER_OFFSET.
               The consumer is started first, then the messages are sent.
  --mode pull  PullConsumer: sends first, then FetchSubscriptionMessageQueues +
               PULL_MESSAGE from offset 0 of every queue (no broker-side offsets).

Every message has its own key ("k<i>"), tag "TagA" and a body "run=<run> i=<i> <payload>"
whose payload is deterministic, varies in length (0..~6 KB, so some bodies cross the
client's 4 KB compression threshold) and contains non-ASCII UTF-8. Each received
message is compared byte for byte (body) and exactly (keys, tags) with what was sent.

Prints 'sent=N received=M unique=U', 'verify exact=E/N mismatched=X' (plus one
'MISMATCH ...' line per bad message), and 'RESULT PASS|FAIL'; exits 0 iff every
message came back exactly as sent.
Run with the venv that scripts/install-peers.sh creates ($RMQ_PEERS_HOME/venv/bin/python).
"""
import argparse
import os
import sys
import threading
import time
import uuid

from rocketmq.client import Message, Producer, PullConsumer, PushConsumer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("namesrv", help="name server address host:port (may be a proxy)")
    ap.add_argument("--topic", default="PeerTestTopic")
    ap.add_argument("--group", default=None, help="consumer group (default: random per run)")
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--mode", choices=["push", "pull"], default="push")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--send-interval", type=float, default=0.0,
                    help="seconds between sends, for sustained load (e.g. during an agent upgrade)")
    a = ap.parse_args()

    run = uuid.uuid4().hex[:8]
    group = a.group or "py_cg_%s" % run
    received = []
    lock = threading.Lock()
    done = threading.Event()
    prefix = ("run=%s " % run).encode()
    expected = {}  # body bytes -> (keys, tags)
    exact = set()  # bodies received with exactly the keys/tags they were sent with
    mismatches = []

    def on_msg(msg):
        body = bytes(msg.body)
        if body.startswith(prefix):
            keys, tags = bytes(msg.keys or b""), bytes(msg.tags or b"")
            with lock:
                received.append(body)
                want = expected.get(body)
                if want is None:
                    mismatches.append("unexpected body %r (keys=%r)" % (body[:80], keys))
                elif (keys, tags) != want:
                    mismatches.append("body %r: keys/tags %r, sent %r" % (body[:40], (keys, tags), want))
                else:
                    exact.add(body)
                if len(exact) >= a.n:
                    done.set()

    consumer = None
    if a.mode == "push":
        consumer = PushConsumer(group)
        consumer.set_namesrv_addr(a.namesrv)
        consumer.set_instance_name("py-%d" % os.getpid())
        consumer.subscribe(a.topic, on_msg)
        # The topic must exist before the consumer subscribes (route lookup);
        # send one warm-up message first so auto-create happens.

    producer = Producer("py_pg_%s" % run)
    producer.set_namesrv_addr(a.namesrv)
    producer.start()
    warm = Message(a.topic)
    warm.set_body("warmup %s" % run)
    producer.send_sync(warm)

    if consumer is not None:
        consumer.start()
        time.sleep(float(os.environ.get("REBALANCE_WAIT_S", "3")))

    sent = 0
    send_failed = 0
    t0 = time.time()
    for i in range(a.n):
        body = prefix + ("i=%d " % i).encode() + payload(i)
        with lock:
            expected[body] = (("k%d" % i).encode(), b"TagA")
        m = Message(a.topic)
        m.set_keys("k%d" % i)
        m.set_tags("TagA")
        m.set_body(body)
        try:
            r = producer.send_sync(m)
            ok_send = int(r.status) == 0
            if not ok_send:
                print("send status", r.status, file=sys.stderr)
        except Exception as e:  # the SDK raises on connection errors
            ok_send = False
            print("send failed:", e, file=sys.stderr)
        if ok_send:
            sent += 1
        else:
            send_failed += 1
            with lock:
                expected.pop(body, None)
        if a.send_interval:
            time.sleep(a.send_interval)
    print("sent=%d send_failed=%d in %.2fs (group=%s topic=%s)" % (sent, send_failed, time.time() - t0, group, a.topic))

    if a.mode == "push":
        done.wait(a.timeout)
        consumer.shutdown()
    else:
        pc = PullConsumer(group)
        pc.set_namesrv_addr(a.namesrv)
        pc.start()
        deadline = time.time() + a.timeout
        while time.time() < deadline and len(exact) < a.n:
            for msg in pc.pull(a.topic):
                on_msg(msg)
            if len(exact) < a.n:
                time.sleep(0.5)
        pc.shutdown()
    producer.shutdown()

    with lock:
        uniq = len(set(received))
        n_exact, bad = len(exact), list(mismatches)
    print("mode=%s sent=%d received=%d unique=%d duplicates=%d send_failed=%d"
          % (a.mode, sent, len(received), uniq, len(received) - uniq, send_failed))
    for m in bad[:20]:
        print("MISMATCH", m)
    print("verify exact=%d/%d mismatched=%d" % (n_exact, a.n, len(bad)))
    ok = sent == a.n and uniq == a.n and n_exact == a.n and not bad
    print("RESULT", "PASS" if ok else "FAIL")
    sys.stdout.flush()
    os._exit(0 if ok else 1)  # skip ctypes __del__ teardown noise


ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 -_.:/äöü€中"


def payload(i):
    """Deterministic, length-varying (0..~6 KB) UTF-8 payload without NUL bytes
    (the C client takes bodies as C strings)."""
    n = (i * 389) % 6200
    return "".join(ALPHABET[(i * 7 + j * 13) % len(ALPHABET)] for j in range(n)).encode("utf-8")


if __name__ == "__main__":
    main()
