#!/usr/bin/env python3
"""Minimal RocketMQ remoting client for probing a name server / broker.

This is OUR OWN tool (not a real peer): it hand-builds remoting frames the way
the Java client 4.9/5.x does (JSON header serialization, language JAVA), so we
can check a broker's answers to individual request codes deterministically.

Usage (all addresses host:port):
  rmq_cli.py cluster NAMESRV                      GET_BROKER_CLUSTER_INFO (106)
  rmq_cli.py route   NAMESRV TOPIC                GET_ROUTEINFO_BY_TOPIC (105)
  rmq_cli.py send    BROKER TOPIC N [QID]         SEND_MESSAGE (10) x N
  rmq_cli.py pull    BROKER TOPIC GROUP QID OFFSET PULL_MESSAGE (11), no suspend
  rmq_cli.py offset  BROKER TOPIC GROUP QID        QUERY_CONSUMER_OFFSET (14)
  rmq_cli.py popcheck BROKER TOPIC GROUP N [BROKER_NAME]  full POP scenario, see below
  rmq_cli.py wait-ready NAMESRV [TIMEOUT_S] [BROKER_NAME]
                                                  wait until >=1 broker (or that one) is registered
  rmq_cli.py set-mode BROKER TOPIC GROUP POP|PULL [SHARE_N]
                                                  SET_MESSAGE_REQUEST_MODE (401), what
                                                  `mqadmin setConsumeMode` sends: makes
                                                  RocketMQ-5-style push consumers (which ask
                                                  QUERY_ASSIGNMENT, 400) use POP for that group

popcheck: sends N messages, then POP_MESSAGE (200050) them all (queueId -1,
invisibleTime 3 s), ACK_MESSAGE (200051) the first half, CHANGE_MESSAGE_
INVISIBLETIME (200053) one message, BATCH_ACK is not used; waits for the
invisible time to pass and pops again: the un-acked messages must come back
(re-delivered via the broker's revive/retry mechanism), the acked must not.
Exit code 0 when all checks pass.
"""
import json
import re
import socket
import struct
import sys
import time

LANG_JAVA = "JAVA"
VERSION = 453  # V4_9_4-ish; brokers only use it for feature gating


class Remoting:
    def __init__(self, addr, timeout=10.0):
        host, port = addr.rsplit(":", 1)
        host = host.strip("[]")  # "[fd00::2]:9876" -> IPv6 host
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.opaque = 0
        self.buf = b""

    def close(self):
        self.sock.close()

    def request(self, code, ext=None, body=b"", timeout=None):
        self.opaque += 1
        hdr = {"code": code, "language": LANG_JAVA, "version": VERSION, "opaque": self.opaque,
               "flag": 0, "extFields": {k: str(v) for k, v in (ext or {}).items()},
               "serializeTypeCurrentRPC": "JSON"}
        h = json.dumps(hdr, separators=(",", ":")).encode()
        frame = struct.pack(">II", 4 + len(h) + len(body), len(h)) + h + body
        self.sock.sendall(frame)
        if timeout is not None:
            self.sock.settimeout(timeout)
        while True:
            resp = self._read_frame()
            if resp["flag"] & 1 and resp["opaque"] == self.opaque:
                return resp

    def _recv_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _read_frame(self):
        total = struct.unpack(">I", self._recv_exact(4))[0]
        data = self._recv_exact(total)
        raw = struct.unpack(">I", data[:4])[0]
        stype, hlen = raw >> 24, raw & 0xFFFFFF
        h = data[4:4 + hlen]
        body = data[4 + hlen:]
        if stype == 0:
            j = json.loads(h)
            return {"code": j.get("code"), "flag": j.get("flag", 0), "opaque": j.get("opaque"),
                    "remark": j.get("remark"), "ext": j.get("extFields") or {}, "body": body, "ser": "JSON"}
        code, _lang, _ver, opaque, flag = struct.unpack(">hBhii", h[:13])
        p = 13
        rl = struct.unpack(">i", h[p:p + 4])[0]; p += 4
        remark = h[p:p + rl].decode() if rl > 0 else None; p += max(rl, 0)
        el = struct.unpack(">i", h[p:p + 4])[0]; p += 4
        ext = {}
        end = p + max(el, 0)
        while p < end:
            kl = struct.unpack(">h", h[p:p + 2])[0]; p += 2
            k = h[p:p + kl].decode(); p += kl
            vl = struct.unpack(">i", h[p:p + 4])[0]; p += 4
            ext[k] = h[p:p + vl].decode(); p += vl
        return {"code": code, "flag": flag, "opaque": opaque, "remark": remark, "ext": ext, "body": body,
                "ser": "ROCKETMQ"}


def loose_json(b):
    """RocketMQ (fastjson) emits integer map keys unquoted: {0:"addr"}."""
    s = b.decode("utf-8")
    s = re.sub(r'([{,])\s*(-?\d+)\s*:', r'\1"\2":', s)
    return json.loads(s)


def decode_messages(body):
    """MessageDecoder.decodes: list of MessageExt records."""
    msgs = []
    p = 0
    while p + 4 <= len(body):
        store_size = struct.unpack(">i", body[p:p + 4])[0]
        rec = body[p:p + store_size]
        q = 4
        magic, = struct.unpack(">i", rec[q:q + 4]); q += 4
        q += 4  # bodyCRC
        queue_id, flag = struct.unpack(">ii", rec[q:q + 8]); q += 8
        queue_offset, phys = struct.unpack(">qq", rec[q:q + 16]); q += 16
        sys_flag, = struct.unpack(">i", rec[q:q + 4]); q += 4
        born_ts, = struct.unpack(">q", rec[q:q + 8]); q += 8
        q += (16 if sys_flag & (1 << 4) else 4) + 4  # born host + port
        store_ts, = struct.unpack(">q", rec[q:q + 8]); q += 8
        q += (16 if sys_flag & (1 << 5) else 4) + 4  # store host + port
        reconsume, = struct.unpack(">i", rec[q:q + 4]); q += 4
        q += 8  # prepared tx offset
        blen, = struct.unpack(">i", rec[q:q + 4]); q += 4
        mbody = rec[q:q + blen]; q += blen
        if magic == -626843477:  # MESSAGE_MAGIC_CODE_V2: topic length is a short
            tlen, = struct.unpack(">h", rec[q:q + 2]); q += 2
        else:
            tlen = rec[q]; q += 1
        topic = rec[q:q + tlen].decode(); q += tlen
        plen, = struct.unpack(">h", rec[q:q + 2]); q += 2
        props = {}
        for kv in rec[q:q + plen].decode("utf-8", "replace").split("\x02"):
            if "\x01" in kv:
                k, v = kv.split("\x01", 1)
                props[k] = v
        msgs.append({"queueId": queue_id, "queueOffset": queue_offset, "topic": topic, "body": mbody,
                     "props": props, "reconsumeTimes": reconsume, "sysFlag": sys_flag})
        p += store_size
    return msgs


def cmd_cluster(ns):
    r = Remoting(ns)
    resp = r.request(106)
    print("code", resp["code"], resp["remark"])
    if resp["body"]:
        print(json.dumps(loose_json(resp["body"]), indent=1))
    return 0 if resp["code"] == 0 else 1


def cmd_route(ns, topic):
    r = Remoting(ns)
    resp = r.request(105, {"topic": topic})
    print("code", resp["code"], resp["remark"])
    if resp["body"]:
        print(json.dumps(loose_json(resp["body"]), indent=1))
    return 0 if resp["code"] == 0 else 1


def send(r, topic, i, qid=0, group="rmq_cli_pg"):
    props = "KEYS\x01k%d\x02TAGS\x01TagA\x02WAIT\x01true\x02" % i
    ext = {"producerGroup": group, "topic": topic, "defaultTopic": "TBW102", "defaultTopicQueueNums": 4,
           "queueId": qid, "sysFlag": 0, "bornTimestamp": int(time.time() * 1000), "flag": 0,
           "properties": props, "reconsumeTimes": 0, "unitMode": "false", "batch": "false"}
    return r.request(10, ext, ("hello-%d" % i).encode())


def cmd_send(broker, topic, n, qid=0):
    r = Remoting(broker)
    ok = 0
    for i in range(int(n)):
        resp = send(r, topic, i, int(qid))
        if resp["code"] == 0:
            ok += 1
        else:
            print("send failed", resp["code"], resp["remark"])
    print("sent ok=%d/%s last_ext=%s" % (ok, n, resp["ext"]))
    return 0 if ok == int(n) else 1


def pull(r, topic, group, qid, offset, maxn=32):
    ext = {"consumerGroup": group, "topic": topic, "queueId": qid, "queueOffset": offset, "maxMsgNums": maxn,
           "sysFlag": 4, "commitOffset": 0, "suspendTimeoutMillis": 0, "subscription": "*", "subVersion": 0,
           "expressionType": "TAG"}
    return r.request(11, ext)


def cmd_pull(broker, topic, group, qid, offset):
    r = Remoting(broker)
    resp = pull(r, topic, group, int(qid), int(offset))
    msgs = decode_messages(resp["body"]) if resp["code"] == 0 else []
    print("code=%s remark=%s ext=%s msgs=%d" % (resp["code"], resp["remark"], resp["ext"], len(msgs)))
    for m in msgs:
        print("  q%d@%d %s %r" % (m["queueId"], m["queueOffset"], m["topic"], m["body"]))
    return 0


def cmd_offset(broker, topic, group, qid):
    r = Remoting(broker)
    resp = r.request(14, {"consumerGroup": group, "topic": topic, "queueId": qid})
    print("code=%s remark=%s ext=%s" % (resp["code"], resp["remark"], resp["ext"]))
    return 0


def pop(r, topic, group, maxn=32, invisible_ms=3000, poll_ms=1000, qid=-1, init_mode=0, broker_name="broker-a"):
    ext = {"consumerGroup": group, "topic": topic, "queueId": qid, "maxMsgNums": maxn,
           "invisibleTime": invisible_ms, "pollTime": poll_ms, "bornTime": int(time.time() * 1000),
           "initMode": init_mode, "expType": "TAG", "exp": "*", "order": "false"}
    resp = r.request(200050, ext, timeout=poll_ms / 1000.0 + 10)
    msgs = []
    if resp["code"] == 0 and resp["body"]:
        msgs = decode_messages(resp["body"])
        e = resp["ext"]
        start = {}
        for one in (e.get("startOffsetInfo") or "").split(";"):
            if one:
                parts = one.split(" ")
                start["%s@%s" % (parts[0], parts[1])] = int(parts[2])
        for m in msgs:
            if m["props"].get("POP_CK"):
                # broker-built receipt handle (retry-topic messages re-labelled with the
                # original topic carry it), exactly what the Java client uses as-is
                m["extraInfo"] = m["props"]["POP_CK"]
                continue
            retry = "0"
            if m["topic"].startswith("%RETRY%"):  # pop retry topic: v1 %RETRY%{group}_{topic}, v2 %RETRY%{group}+{topic}
                retry = "2" if "+" in m["topic"][len("%RETRY%"):] else "1"
            key = "%s@%d" % (retry, m["queueId"])
            ck = start.get(key, m["queueOffset"])
            m["extraInfo"] = " ".join(str(x) for x in [
                ck, e["popTime"], e["invisibleTime"], e["reviveQid"], retry, broker_name, m["queueId"],
                m["queueOffset"]])
    return resp, msgs


def real_topic(topic, group, extra_info):
    """Java ExtraInfoUtil.getRealTopic: the handle's retry marker picks the topic to ack."""
    mark = extra_info.split(" ")[4]
    if mark == "1":
        return "%RETRY%" + group + "_" + topic
    if mark == "2":
        return "%RETRY%" + group + "+" + topic
    return topic


def ack(r, topic, group, m):
    parts = m["extraInfo"].split(" ")
    ext = {"consumerGroup": group, "topic": real_topic(topic, group, m["extraInfo"]),
           "queueId": parts[6], "extraInfo": m["extraInfo"], "offset": parts[7]}
    return r.request(200051, ext)


def change_invisible(r, topic, group, m, invisible_ms):
    parts = m["extraInfo"].split(" ")
    ext = {"consumerGroup": group, "topic": real_topic(topic, group, m["extraInfo"]),
           "queueId": parts[6], "extraInfo": m["extraInfo"], "offset": parts[7],
           "invisibleTime": invisible_ms}
    return r.request(200053, ext)


def cmd_popcheck(broker, topic, group, n, broker_name="broker-a"):
    n = int(n)
    r = Remoting(broker)
    fails = []
    for i in range(n):
        resp = send(r, topic, i, i % 4)
        if resp["code"] != 0:
            fails.append("send %d -> %s %s" % (i, resp["code"], resp["remark"]))
    print("sent", n, "messages; send failures:", len(fails))
    # bring broker name from a pop response property or cluster info
    got = []
    deadline = time.time() + 20
    first_resp = None
    while len(got) < n and time.time() < deadline:
        resp, msgs = pop(r, topic, group, maxn=32, invisible_ms=5000, poll_ms=1000, broker_name=broker_name)
        first_resp = first_resp or resp
        if resp["code"] == 0:
            got.extend(msgs)
        elif resp["code"] not in (19, 20, 24, 26):  # not found / polling timeout / etc.
            print("pop ->", resp["code"], resp["remark"])
    print("POP #1: code=%s ext=%s" % (first_resp["code"], first_resp["ext"]))
    print("popped %d/%d: %s" % (len(got), n, sorted(m["body"].decode() for m in got)))
    if len(got) < n:
        fails.append("first pop got %d of %d" % (len(got), n))
    acked = got[: len(got) // 2]
    rest = got[len(got) // 2:]
    for m in acked:
        a = ack(r, topic, group, m)
        if a["code"] != 0:
            fails.append("ack %s -> %s %s" % (m["extraInfo"], a["code"], a["remark"]))
    print("acked", len(acked), "ack failures:", sum(1 for f in fails if f.startswith("ack")))
    if rest:
        c = change_invisible(r, topic, group, rest[0], 1000)
        print("CHANGE_INVISIBLE_TIME %s (%s) -> %s %s %s" % (rest[0]["body"], rest[0]["extraInfo"], c["code"], c["remark"], c["ext"]))
        if c["code"] != 0:
            fails.append("changeInvisibleTime -> %s %s" % (c["code"], c["remark"]))
    # Immediately popping again must not return anything still invisible.
    resp, msgs = pop(r, topic, group, maxn=32, invisible_ms=5000, poll_ms=500, broker_name=broker_name)
    print("immediate re-pop: code=%s msgs=%d" % (resp["code"], len(msgs)))
    if msgs:
        fails.append("immediate re-pop returned %d msgs (should be invisible)" % len(msgs))
    # Wait for invisibility to expire; the un-acked ones must be redelivered.
    want = sorted(m["body"].decode() for m in rest)
    again = []
    deadline = time.time() + 60
    while time.time() < deadline and len(again) < len(rest):
        resp, msgs = pop(r, topic, group, maxn=32, invisible_ms=30000, poll_ms=2000, broker_name=broker_name)
        for m in msgs:
            again.append(m)
            a = ack(r, topic, group, m)
            if a["code"] != 0:
                fails.append("ack redelivered %s -> %s %s" % (m["topic"], a["code"], a["remark"]))
    got_again = sorted(m["body"].decode() for m in again)
    print("redelivered %d (want %d): %s" % (len(again), len(rest), got_again))
    for m in again:
        print("  redelivered %s topic=%s q%d@%d POP_CK=%r" % (m["body"], m["topic"], m["queueId"], m["queueOffset"], m["props"].get("POP_CK")))
    print("redelivered topics:", sorted(set(m["topic"] for m in again)),
          "reconsumeTimes:", sorted(set(m["reconsumeTimes"] for m in again)))
    if got_again != want:
        fails.append("redelivery mismatch: got %s want %s" % (got_again, want))
    for f in fails:
        print("FAIL:", f)
    print("POPCHECK", "PASS" if not fails else "FAIL")
    return 0 if not fails else 1


def cmd_wait_ready(ns, timeout_s="60", broker_name=None):
    deadline = time.time() + float(timeout_s)
    last = None
    while time.time() < deadline:
        try:
            r = Remoting(ns, timeout=2)
            resp = r.request(106)
            r.close()
            if resp["code"] == 0 and resp["body"]:
                info = loose_json(resp["body"])
                table = info.get("brokerAddrTable") or {}
                if table and (broker_name is None or broker_name in table):
                    print(json.dumps(info.get("brokerAddrTable")))
                    return 0
            last = resp["remark"]
        except Exception as ex:  # noqa
            last = str(ex)
        time.sleep(0.5)
    print("not ready:", last)
    return 1


def cmd_set_mode(broker, topic, group, mode, share="0"):
    r = Remoting(broker)
    body = json.dumps({"topic": topic, "consumerGroup": group, "mode": mode.upper(),
                       "popShareQueueNum": int(share)}).encode()
    resp = r.request(401, {}, body)
    print("SET_MESSAGE_REQUEST_MODE code=%s remark=%s" % (resp["code"], resp["remark"]))
    return 0 if resp["code"] == 0 else 1


def cmd_create_topic(broker, topic, queues="2"):
    """UPDATE_AND_CREATE_TOPIC (17) with read = write queues, perm RW."""
    r = Remoting(broker)
    ext = {"topic": topic, "defaultTopic": "TBW102", "readQueueNums": str(queues),
           "writeQueueNums": str(queues), "perm": "6", "topicFilterType": "SINGLE_TAG",
           "topicSysFlag": "0", "order": "false"}
    resp = r.request(17, ext, b"")
    print("UPDATE_AND_CREATE_TOPIC code=%s remark=%s" % (resp["code"], resp["remark"]))
    return 0 if resp["code"] == 0 else 1


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmds = {"cluster": cmd_cluster, "route": cmd_route, "send": cmd_send, "pull": cmd_pull,
            "offset": cmd_offset, "popcheck": cmd_popcheck, "wait-ready": cmd_wait_ready,
            "set-mode": cmd_set_mode, "create-topic": cmd_create_topic}
    return cmds[argv[1]](*argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
