//! Which broker served each pop of a Pop-native client (a RocketMQ 5 push consumer in POP
//! mode), so that its ACK, BATCH_ACK or CHANGE_INVISIBLETIME can reach that broker even when
//! it arrives on a connection to another one (stale route, broker address change, a pop the
//! agent served elsewhere). Pure: the relay feeds it headers and bodies.
//!
//! A pop is identified the way the broker merges acks (`rf@qid@ckOffset@popTime`, protocol.md
//! §3.3) plus group and original topic. Every handle the client builds from a POP response
//! carries those fields: `startOffsetInfo` gives `rf qid ckOffset` per queue and all messages
//! of one response share `popTime`; revived messages carry a broker-built `POP_CK` with the
//! same values. A CHANGE_INVISIBLETIME makes a new handle (`ckOffset` = the message's offset,
//! the response's `popTime`), recorded when its response passes.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde_json::Value;

use crate::codec::header::Header;

use super::error::PopError;
use super::receipt::{parse_extra_info, parse_start_offset_info, RETRY_PREFIX};

/// Entries outlive the pop's invisible time by this much (an ACK after that is pointless
/// but still harmless to route).
pub const GRACE_MS: u64 = 30_000;
/// Bounds the table against a client that pops without ever acking.
pub const MAX_ROUTES: usize = 200_000;
/// Expired entries are dropped at most this often, on insert.
const SWEEP_EVERY_MS: u64 = 5_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct AckKey {
    pub group: String,
    /// The topic the client popped (retry topics folded back to it).
    pub topic: String,
    pub retry_flag: String,
    pub queue_id: i32,
    pub ck_offset: i64,
    pub pop_time: i64,
}

/// The topic a client popped, from an ACK/CHANGE_INVISIBLETIME header topic, which names the
/// pop-retry topic (`%RETRY%group_topic`, `%RETRY%group+topic`) for revived messages.
pub fn popped_topic(group: &str, header_topic: &str, retry_flag: &str) -> String {
    let sep = match retry_flag {
        "1" => '_',
        "2" => '+',
        _ => return header_topic.to_owned(),
    };
    let prefix = format!("{RETRY_PREFIX}{group}{sep}");
    match header_topic.strip_prefix(&prefix) {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => header_topic.to_owned(),
    }
}

/// Keys of every handle a SUCCESS POP response lets the client build, and the invisible time.
pub fn keys_from_pop(group: &str, topic: &str, resp: &Header) -> Result<(Vec<AckKey>, i64), PopError> {
    let field = |f: &'static str| -> Result<i64, PopError> {
        let v = resp.ext(f).ok_or(PopError::ResponseField { what: "POP_MESSAGE", field: f, problem: "missing".into() })?;
        v.trim().parse().map_err(|_| PopError::ResponseField { what: "POP_MESSAGE", field: f, problem: format!("not a number: {v:?}") })
    };
    let pop_time = field("popTime")?;
    let invisible = field("invisibleTime")?;
    let Some(start) = resp.ext("startOffsetInfo") else {
        // Brokers before startOffsetInfo: clients build per-message handles we cannot predict.
        return Ok((Vec::new(), invisible));
    };
    let mut keys = Vec::new();
    for (k, ck_offset) in parse_start_offset_info(start)? {
        let Some((rf, qid)) = k.split_once('@') else { continue };
        let Ok(queue_id) = qid.parse() else { continue };
        keys.push(AckKey { group: group.into(), topic: topic.into(), retry_flag: rf.into(), queue_id, ck_offset, pop_time });
    }
    keys.sort_by_key(|k| (k.queue_id, k.retry_flag.clone()));
    Ok((keys, invisible))
}

/// The key of an ACK_MESSAGE / CHANGE_MESSAGE_INVISIBLETIME request (header `extraInfo`).
pub fn key_from_request(h: &Header) -> Result<AckKey, PopError> {
    let group = h.ext("consumerGroup").unwrap_or_default();
    let topic = h.ext("topic").unwrap_or_default();
    let extra = h.ext("extraInfo").ok_or(PopError::ResponseField { what: "ACK", field: "extraInfo", problem: "missing".into() })?;
    let e = parse_extra_info(extra)?;
    Ok(AckKey {
        group: group.into(),
        topic: popped_topic(group, topic, &e.retry_flag),
        retry_flag: e.retry_flag,
        queue_id: e.queue_id,
        ck_offset: e.ck_queue_offset,
        pop_time: e.pop_time,
    })
}

/// The key of the handle a successful CHANGE_MESSAGE_INVISIBLETIME gives the client:
/// `offset resp.popTime resp.invisibleTime resp.reviveQid rf broker qid offset`; and its invisible time.
pub fn key_after_change(request: &AckKey, h_offset: i64, resp: &Header) -> Option<(AckKey, i64)> {
    let pop_time = resp.ext("popTime")?.trim().parse().ok()?;
    let invisible = resp.ext("invisibleTime")?.trim().parse().ok()?;
    Some((AckKey { ck_offset: h_offset, pop_time, ..request.clone() }, invisible))
}

/// One entry of a BATCH_ACK_MESSAGE body, kept verbatim so a split body re-encodes it as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    pub key: AckKey,
    /// Messages it acknowledges (bits set in `b`).
    pub messages: u32,
    pub raw: Value,
}

/// A parsed BATCH_ACK_MESSAGE body (`{"acks":[…],"brokerName":…}`, short or long key names).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchAckBody {
    pub broker_name: Option<String>,
    pub items: Vec<BatchItem>,
    /// The body without `acks`, to rebuild split bodies with everything else unchanged.
    rest: serde_json::Map<String, Value>,
}

fn get<'a>(v: &'a Value, short: &str, long: &str) -> Option<&'a Value> {
    v.get(short).or_else(|| v.get(long))
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Set bits of a BatchAck bit set: Java writes base64 of `BitSet.toByteArray()`, rocketmq-rust
/// a JSON array of bytes.
fn bit_count(v: Option<&Value>) -> u32 {
    use base64::Engine as _;
    match v {
        Some(Value::String(s)) => base64::engine::general_purpose::STANDARD.decode(s).map(|b| b.iter().map(|x| x.count_ones()).sum()).unwrap_or(0),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| (x as u8).count_ones()).sum(),
        _ => 0,
    }
}

pub fn parse_batch_ack(body: &[u8]) -> Result<BatchAckBody, PopError> {
    let bad = |problem: String| PopError::BatchAck(format!("request body: {problem}"));
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let Value::Object(mut rest) = v else { return Err(bad("not a JSON object".into())) };
    let acks = rest.remove("acks").ok_or_else(|| bad("no \"acks\"".into()))?;
    let Value::Array(acks) = acks else { return Err(bad("\"acks\" is not a list".into())) };
    let broker_name = rest.get("brokerName").and_then(as_text);
    let mut items = Vec::with_capacity(acks.len());
    for a in acks {
        let group = get(&a, "c", "consumerGroup").and_then(as_text).ok_or_else(|| bad("an ack has no group".into()))?;
        let topic = get(&a, "t", "topic").and_then(as_text).ok_or_else(|| bad("an ack has no topic".into()))?;
        let retry_flag = get(&a, "r", "retry").and_then(as_text).unwrap_or_else(|| "0".into());
        let num = |s: &str, l: &str| get(&a, s, l).and_then(as_i64).ok_or_else(|| bad(format!("an ack has no {s}")));
        let key = AckKey {
            topic: popped_topic(&group, &topic, &retry_flag),
            group,
            retry_flag,
            queue_id: num("q", "queueId")? as i32,
            ck_offset: num("so", "startOffset")?,
            pop_time: num("pt", "popTime")?,
        };
        let messages = bit_count(get(&a, "b", "bitSet"));
        items.push(BatchItem { key, messages, raw: a });
    }
    Ok(BatchAckBody { broker_name, items, rest })
}

impl BatchAckBody {
    /// A body with only `items` (for one broker), every other field as the client sent it.
    pub fn encode_part(&self, items: &[&BatchItem], broker_name: Option<&str>) -> Vec<u8> {
        let mut m = self.rest.clone();
        m.insert("acks".into(), Value::Array(items.iter().map(|i| i.raw.clone()).collect()));
        if let Some(b) = broker_name {
            m.insert("brokerName".into(), Value::String(b.into()));
        }
        serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
    }
}

/// The routing table: pop key → broker address that served it, with an expiry (agent clock, ms).
#[derive(Debug, Default)]
pub struct AckRoutes {
    map: HashMap<AckKey, (SocketAddr, u64)>,
    last_sweep: u64,
    /// Inserts refused because the table was full.
    pub refused: u64,
}

impl AckRoutes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `addr` served `key`, until `now + invisible + GRACE_MS`.
    pub fn insert(&mut self, key: AckKey, addr: SocketAddr, now_ms: u64, invisible_ms: i64) {
        let since = now_ms.saturating_sub(self.last_sweep);
        // A full table is swept sooner, but not on every insert.
        if since >= SWEEP_EVERY_MS || (self.map.len() >= MAX_ROUTES && since >= 1_000) {
            self.sweep(now_ms);
        }
        if self.map.len() >= MAX_ROUTES && !self.map.contains_key(&key) {
            self.refused += 1;
            return;
        }
        let expires = now_ms.saturating_add(invisible_ms.max(0) as u64).saturating_add(GRACE_MS);
        self.map.insert(key, (addr, expires));
    }

    /// Live entries with their expiry, for a successor agent.
    pub fn entries(&self, now_ms: u64) -> Vec<(AckKey, SocketAddr, u64)> {
        self.map.iter().filter(|(_, (_, exp))| *exp > now_ms).map(|(k, (a, exp))| (k.clone(), *a, *exp)).collect()
    }

    /// Entries a predecessor recorded; this agent's own entries win, and the bound holds.
    pub fn adopt(&mut self, entries: Vec<(AckKey, SocketAddr, u64)>, now_ms: u64) {
        for (k, a, exp) in entries {
            if exp <= now_ms || self.map.contains_key(&k) {
                continue;
            }
            if self.map.len() >= MAX_ROUTES {
                self.refused += 1;
                continue;
            }
            self.map.insert(k, (a, exp));
        }
    }

    pub fn lookup(&self, key: &AckKey, now_ms: u64) -> Option<SocketAddr> {
        self.map.get(key).filter(|(_, exp)| *exp > now_ms).map(|(a, _)| *a)
    }

    pub fn sweep(&mut self, now_ms: u64) {
        self.last_sweep = now_ms;
        self.map.retain(|_, (_, exp)| *exp > now_ms);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(ext: &[(&str, &str)]) -> Header {
        let mut h = Header::response(0, 1, None);
        h.ext_fields = ext.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        h
    }

    fn req(ext: &[(&str, &str)]) -> Header {
        let mut h = resp(ext);
        h.flag = 0;
        h.code = 200051;
        h
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pop_keys_match_the_handles_clients_build() {
        // A normal queue and a revived message's retry queue in one response.
        let pop = resp(&[("popTime", "1000"), ("invisibleTime", "60000"), ("reviveQid", "3"), ("startOffsetInfo", "0 1 7;1 0 2"), ("msgOffsetInfo", "0 1 7,9;1 0 2")]);
        let (keys, inv) = keys_from_pop("g", "T", &pop).unwrap();
        assert_eq!(inv, 60000);
        assert_eq!(keys.len(), 2);
        let mut routes = AckRoutes::new();
        for k in keys {
            routes.insert(k, a("10.0.0.1:10911"), 0, inv);
        }
        // ACK of the second message of queue 1 (handle built by the client).
        let ack = req(&[("consumerGroup", "g"), ("topic", "T"), ("queueId", "1"), ("extraInfo", "7 1000 60000 3 0 bk 1 9"), ("offset", "9")]);
        assert_eq!(routes.lookup(&key_from_request(&ack).unwrap(), 1), Some(a("10.0.0.1:10911")));
        // ACK of the revived one: header topic is the pop-retry topic, POP_CK has a 9th field.
        let ack = req(&[("consumerGroup", "g"), ("topic", "%RETRY%g_T"), ("queueId", "0"), ("extraInfo", "2 1000 60000 3 1 bk 0 2 0"), ("offset", "2")]);
        assert_eq!(routes.lookup(&key_from_request(&ack).unwrap(), 1), Some(a("10.0.0.1:10911")));
        // Same queue and offset from another pop (other popTime): unknown.
        let other = req(&[("consumerGroup", "g"), ("topic", "T"), ("extraInfo", "7 1001 60000 3 0 bk 1 9")]);
        assert_eq!(routes.lookup(&key_from_request(&other).unwrap(), 1), None);
        // Expiry: invisible time + grace.
        let k = key_from_request(&ack).unwrap();
        assert!(routes.lookup(&k, 60000 + GRACE_MS - 1).is_some());
        assert!(routes.lookup(&k, 60000 + GRACE_MS).is_none());
        routes.sweep(60000 + GRACE_MS);
        assert!(routes.is_empty());
    }

    #[test]
    fn pop_without_start_offsets_gives_no_keys() {
        let (keys, _) = keys_from_pop("g", "T", &resp(&[("popTime", "1"), ("invisibleTime", "5")])).unwrap();
        assert!(keys.is_empty());
        assert!(keys_from_pop("g", "T", &resp(&[("invisibleTime", "5")])).is_err());
    }

    #[test]
    fn retry_topics_fold_back() {
        assert_eq!(popped_topic("g", "%RETRY%g_T", "1"), "T");
        assert_eq!(popped_topic("g", "%RETRY%g+T", "2"), "T");
        assert_eq!(popped_topic("g", "%RETRY%g", "1"), "%RETRY%g");
        assert_eq!(popped_topic("g", "T", "0"), "T");
        assert_eq!(popped_topic("g", "%RETRY%h_T", "1"), "%RETRY%h_T");
    }

    #[test]
    fn change_invisible_makes_a_new_key() {
        let cit = req(&[("consumerGroup", "g"), ("topic", "T"), ("extraInfo", "7 1000 60000 3 0 bk 1 9"), ("offset", "9")]);
        let k = key_from_request(&cit).unwrap();
        let (nk, inv) = key_after_change(&k, 9, &resp(&[("popTime", "5000"), ("invisibleTime", "1000"), ("reviveQid", "2")])).unwrap();
        assert_eq!((nk.ck_offset, nk.pop_time, inv), (9, 5000, 1000));
        // What the client then acks with.
        let ack = req(&[("consumerGroup", "g"), ("topic", "T"), ("extraInfo", "9 5000 1000 2 0 bk 1 9")]);
        assert_eq!(key_from_request(&ack).unwrap(), nk);
        assert!(key_after_change(&k, 9, &resp(&[])).is_none());
    }

    #[test]
    fn batch_ack_bodies_parse_and_split() {
        // rocketmq-rust form (byte arrays), then Java form (base64).
        let body = br#"{"acks":[{"c":"g","t":"T","r":"0","so":7,"q":1,"rq":3,"pt":1000,"it":60000,"b":[5,0,0,0,0,0,0,0]},
                                {"c":"g","t":"T","r":"1","so":2,"q":0,"rq":3,"pt":1000,"it":60000,"b":"AQ=="}],"brokerName":"bk"}"#;
        let b = parse_batch_ack(body).unwrap();
        assert_eq!(b.broker_name.as_deref(), Some("bk"));
        assert_eq!(b.items.len(), 2);
        assert_eq!(b.items[0].key, AckKey { group: "g".into(), topic: "T".into(), retry_flag: "0".into(), queue_id: 1, ck_offset: 7, pop_time: 1000 });
        assert_eq!((b.items[0].messages, b.items[1].messages), (2, 1));
        let part = b.encode_part(&[&b.items[1]], Some("other"));
        let v: Value = serde_json::from_slice(&part).unwrap();
        assert_eq!(v["brokerName"], "other");
        assert_eq!(v["acks"].as_array().unwrap().len(), 1);
        assert_eq!(v["acks"][0]["b"], "AQ==");
        assert!(parse_batch_ack(b"{}").is_err());
        assert!(parse_batch_ack(br#"{"acks":[{"c":"g"}]}"#).is_err());
        // Long key names and string numbers (fastjson-style) are accepted too.
        let long = br#"{"acks":[{"consumerGroup":"g","topic":"T","retry":"0","startOffset":"3","queueId":2,"popTime":9,"bitSet":"Aw=="}]}"#;
        let b = parse_batch_ack(long).unwrap();
        assert_eq!((b.items[0].key.ck_offset, b.items[0].key.queue_id, b.items[0].messages), (3, 2, 2));
    }

    #[test]
    fn a_full_table_refuses_new_keys() {
        let mut r = AckRoutes::new();
        let k = |i: i64| AckKey { group: "g".into(), topic: "T".into(), retry_flag: "0".into(), queue_id: 0, ck_offset: i, pop_time: 1 };
        for i in 0..MAX_ROUTES as i64 {
            r.insert(k(i), a("10.0.0.1:1"), 0, 1000);
        }
        r.insert(k(-1), a("10.0.0.1:1"), 1, 1000);
        assert_eq!((r.len(), r.refused), (MAX_ROUTES, 1));
        // Once entries expire, room comes back.
        r.insert(k(-1), a("10.0.0.1:1"), 1000 + GRACE_MS, 1000);
        assert_eq!(r.len(), 1);
    }
}
