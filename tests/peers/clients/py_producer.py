#!/usr/bin/env python3
"""Sends N messages with bodies '<prefix> i=<i>' and keys 'k<i>' (PyPI `rocketmq` 0.4.4).

  py_producer.py NAMESRV --topic T -n N --prefix P [--interval S]

Prints 'SENT_OK <body>' per acknowledged send, then 'SENT ok=<n> failed=<f>';
exits 0 iff every send succeeded.
"""
import argparse
import os
import sys
import time

from rocketmq.client import Message, Producer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("namesrv")
    ap.add_argument("--topic", required=True)
    ap.add_argument("-n", type=int, required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--interval", type=float, default=0.0)
    a = ap.parse_args()
    p = Producer("pg_%d" % os.getpid())
    p.set_namesrv_addr(a.namesrv)
    p.start()
    ok = failed = 0
    for i in range(a.n):
        m = Message(a.topic)
        m.set_keys("k%d" % i)
        m.set_tags("TagA")
        body = "%s i=%d" % (a.prefix, i)
        m.set_body(body)
        try:
            r = p.send_sync(m)
            if int(r.status) == 0:
                ok += 1
                print("SENT_OK %s" % body, flush=True)
            else:
                failed += 1
        except Exception as e:
            failed += 1
            print("send failed:", e, file=sys.stderr)
        if a.interval:
            time.sleep(a.interval)
    p.shutdown()
    print("SENT ok=%d failed=%d" % (ok, failed), flush=True)
    os._exit(0 if failed == 0 else 1)


if __name__ == "__main__":
    main()
