#!/usr/bin/env python3
"""A long-running push consumer (PyPI `rocketmq` 0.4.4 = Apache rocketmq-client-cpp),
for multi-consumer tests: prints one line per delivered message and exits after
--seconds.

  py_consumer.py NAMESRV --topic T --group G --seconds S [--id NAME]
                 [--reconsume-later SUBSTR] [--process-ms MS]

Each delivery prints  'RECV id=<NAME> reconsume=<n> queue=<q> body=<body>'.
--reconsume-later SUBSTR answers RECONSUME_LATER for bodies containing SUBSTR (every
delivery of them), so the retry path and the dead-letter queue can be exercised.
--process-ms MS makes each delivery take that long, so the consumer holds messages
(uncommitted) for a while, as a busy application does.
At the end it prints 'CONSUMER id=<NAME> received=<N>'.
"""
import argparse
import os
import sys
import threading
import time

from rocketmq.client import PushConsumer, RecvMessage, _CConsumeStatus, _to_bytes, dll, ffi_check

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("namesrv")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--id", default="py-%d" % os.getpid())
    ap.add_argument("--reconsume-later", default=None)
    ap.add_argument("--process-ms", type=float, default=0)
    a = ap.parse_args()

    received = [0]
    # The SDK calls back from several threads; print() writes text and newline
    # separately, so lines would interleave. One write per line, under a lock.
    out = threading.Lock()

    def on_message(_consumer, msg):
        m = RecvMessage(msg)
        body = m.body.decode("utf-8", "replace") if isinstance(m.body, bytes) else str(m.body)
        line = "RECV id=%s reconsume=%d queue=%d body=%s\n" % (a.id, m.reconsume_times, m.queue_id, body)
        with out:
            received[0] += 1
            sys.stdout.write(line)
            sys.stdout.flush()
        if a.process_ms:
            time.sleep(a.process_ms / 1000.0)
        # The binding turns a raised exception into CONSUME_SUCCESS, so answer directly.
        if a.reconsume_later and a.reconsume_later in body:
            return _CConsumeStatus.RECONSUME_LATER.value
        return _CConsumeStatus.CONSUME_SUCCESS.value

    c = PushConsumer(a.group)
    c.set_namesrv_addr(a.namesrv)
    c.set_instance_name(a.id)
    ffi_check(dll.Subscribe(c._handle, _to_bytes(a.topic), _to_bytes("*")))
    c._register_callback(on_message)
    c.start()
    print("READY id=%s" % a.id, flush=True)
    time.sleep(a.seconds)
    c.shutdown()
    print("CONSUMER id=%s received=%d" % (a.id, received[0]), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
