//! Pop-native clients (RocketMQ 5 push consumers in POP mode): their POP, ACK, BATCH_ACK and
//! CHANGE_INVISIBLETIME are relayed as they are, and the agent remembers which broker served
//! each pop (`pop::ackroute`). An acknowledgement that arrives on a connection to another
//! broker is sent to the one that served the pop over the agent's own connection, and the
//! client gets that broker's answer with its own opaque.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::broker_client::BrokerClients;
use crate::codec::header::Header;
use crate::codec::{code, decode_frame, encode_frame, Limits};
use crate::metrics::Metrics;
use crate::pop::ackroute::{key_after_change, key_from_request, keys_from_pop, parse_batch_ack, AckKey, AckRoutes, BatchItem};
use crate::pop::requests;
use crate::relay::{ConnHandle, Verdict};
use crate::state::now_ms;

const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Unanswered requests remembered per agent; a flood of them cannot grow memory without bound.
const MAX_PENDING: usize = 65_536;

/// A request whose response adds a route.
#[derive(serde::Serialize, serde::Deserialize)]
enum Pending {
    Pop { group: String, topic: String },
    /// A CHANGE_INVISIBLETIME relayed to the broker that served the pop: its response's new
    /// handle is served by the same broker.
    Change { key: AckKey, offset: i64 },
}

pub struct NativePop {
    brokers: Arc<BrokerClients>,
    metrics: Arc<Metrics>,
    limits: Limits,
    routes: Mutex<AckRoutes>,
    pending: Mutex<HashMap<(u64, i32), Pending>>,
}

/// Where an acknowledgement goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// No route known: relayed as sent.
    Unknown,
    /// Its own connection leads to the broker that served the pop.
    Direct,
    /// Another broker served the pop.
    Elsewhere(SocketAddr),
}

impl NativePop {
    pub fn new(brokers: Arc<BrokerClients>, metrics: Arc<Metrics>, limits: Limits) -> Self {
        NativePop { brokers, metrics, limits, routes: Default::default(), pending: Default::default() }
    }

    /// Entries in the ack-routing table (for the state dump and the gauge).
    pub fn routes(&self) -> usize {
        lock(&self.routes).len()
    }

    fn route(&self, conn: &ConnHandle, key: &AckKey) -> Route {
        match lock(&self.routes).lookup(key, now_ms()) {
            None => Route::Unknown,
            Some(a) if a == conn.dst.0 => Route::Direct,
            Some(a) => Route::Elsewhere(a),
        }
    }

    fn remember(&self, conn: &ConnHandle, opaque: i32, p: Pending) {
        let mut pending = lock(&self.pending);
        if pending.len() < MAX_PENDING {
            pending.insert((conn.id, opaque), p);
        }
    }

    fn count(&self, kind: &'static str, result: &'static str, n: u64) {
        self.metrics.pop_native_ack(kind, result, n);
    }

    /// The verdict for a Pop-native request, or None for any other code.
    pub fn client_request(&self, conn: &ConnHandle, h: &Header) -> Option<Verdict> {
        match h.code {
            code::POP_MESSAGE => {
                if !h.is_oneway() {
                    let (group, topic) = (h.ext("consumerGroup").unwrap_or_default(), h.ext("topic").unwrap_or_default());
                    self.remember(conn, h.opaque, Pending::Pop { group: group.into(), topic: topic.into() });
                }
                Some(Verdict::Forward)
            }
            code::ACK_MESSAGE | code::CHANGE_MESSAGE_INVISIBLETIME => {
                let kind = kind(h.code);
                let Ok(key) = key_from_request(h) else {
                    self.count(kind, "unknown", 1);
                    return Some(Verdict::Forward);
                };
                let route = self.route(conn, &key);
                match route {
                    Route::Elsewhere(_) => return Some(Verdict::Take),
                    Route::Direct => self.count(kind, "direct", 1),
                    Route::Unknown => self.count(kind, "unknown", 1),
                }
                // The new handle lives where this request goes: on this connection's broker.
                if h.code == code::CHANGE_MESSAGE_INVISIBLETIME && !h.is_oneway() {
                    if let Some(offset) = h.ext("offset").and_then(|o| o.parse().ok()) {
                        self.remember(conn, h.opaque, Pending::Change { key, offset });
                    }
                }
                Some(Verdict::Forward)
            }
            // The routes are in the body: decide once it is complete.
            code::BATCH_ACK_MESSAGE => Some(Verdict::Take),
            _ => None,
        }
    }

    pub fn watches(request_code: i32) -> bool {
        matches!(request_code, code::POP_MESSAGE | code::CHANGE_MESSAGE_INVISIBLETIME)
    }

    /// A response to a request remembered in `client_request`, before the client sees it.
    pub fn response_header(&self, conn: &ConnHandle, h: &Header) {
        let Some(p) = lock(&self.pending).remove(&(conn.id, h.opaque)) else { return };
        if h.code != code::SUCCESS {
            return;
        }
        match p {
            Pending::Pop { group, topic } => match keys_from_pop(&group, &topic, h) {
                Ok((keys, invisible)) => {
                    self.metrics.pop("native_pop");
                    let now = now_ms();
                    let mut routes = lock(&self.routes);
                    for k in keys {
                        routes.insert(k, conn.dst.0, now, invisible);
                    }
                }
                Err(e) => debug!(pod = %conn.pod, error = %e, "POP response without usable offsets; its acks are relayed as sent"),
            },
            Pending::Change { key, offset } => self.record_change(&key, offset, h, conn.dst.0),
        }
    }

    fn record_change(&self, key: &AckKey, offset: i64, resp: &Header, served_by: SocketAddr) {
        if let Some((k, invisible)) = key_after_change(key, offset, resp) {
            lock(&self.routes).insert(k, served_by, now_ms(), invisible);
        }
    }

    /// The connection is gone: its unanswered requests will never be answered.
    pub fn closed(&self, conn: &ConnHandle) {
        lock(&self.pending).retain(|(id, _), _| *id != conn.id);
    }

    /// The connection moves to a successor agent: its unanswered requests, to be answered there.
    pub fn export_conn(&self, conn: &ConnHandle) -> serde_json::Value {
        let out = crate::pop::take_conn_entries(&mut lock(&self.pending), conn.id);
        serde_json::to_value(out).unwrap_or_default()
    }

    /// Unanswered requests of a connection a predecessor handed over.
    pub fn adopt_conn(&self, conn: &ConnHandle, v: serde_json::Value) {
        let Ok(list) = serde_json::from_value::<Vec<(i32, Pending)>>(v) else { return };
        let mut pending = lock(&self.pending);
        for (o, p) in list {
            if pending.len() < MAX_PENDING {
                pending.insert((conn.id, o), p);
            }
        }
    }

    /// The routing table, for a successor agent.
    pub fn export_routes(&self) -> Vec<(AckKey, SocketAddr, u64)> {
        lock(&self.routes).entries(now_ms())
    }

    pub fn adopt_routes(&self, entries: Vec<(AckKey, SocketAddr, u64)>) {
        lock(&self.routes).adopt(entries, now_ms());
    }

    /// A request taken by `client_request` (ACK/CIT served elsewhere, every BATCH_ACK).
    pub async fn taken(&self, conn: ConnHandle, h: Header, frame: Vec<u8>, name_of: impl Fn(SocketAddr) -> Option<String>) {
        let Ok((_, body)) = decode_frame(&frame, &self.limits) else { return };
        let body = &frame[body];
        match h.code {
            code::BATCH_ACK_MESSAGE => self.batch_ack(&conn, h, &frame, body, name_of).await,
            _ => {
                let kind = kind(h.code);
                let routed = key_from_request(&h).ok().map(|k| (self.route(&conn, &k), k));
                let Some((Route::Elsewhere(addr), key)) = routed else {
                    // The route expired meanwhile: nothing better than where the client sent it.
                    self.count(kind, "unknown", 1);
                    conn.send_to_broker(frame);
                    return;
                };
                let offset = h.ext("offset").and_then(|o| o.parse().ok());
                match self.resend(&conn, addr, &h, body).await {
                    Ok(resp) => {
                        self.count(kind, "rerouted", 1);
                        info!(pod = %conn.pod, orig_dst = %conn.dst, broker = %addr, code = h.code, "acknowledgement sent to the broker that served the pop");
                        if let (code::CHANGE_MESSAGE_INVISIBLETIME, Some(off)) = (h.code, offset) {
                            self.record_change(&key, off, &resp.0, addr);
                        }
                        reply(&conn, h.opaque, resp, h.is_oneway());
                    }
                    Err(e) => {
                        self.count(kind, "reroute_failed", 1);
                        warn!(pod = %conn.pod, broker = %addr, error = %e, "could not send an acknowledgement to the broker that served the pop; the message may be delivered again");
                        let (rh, b) = requests::system_busy(h.opaque, &format!("rmq-agent: {e}"));
                        if !h.is_oneway() {
                            conn.send_to_client(encode_frame(&rh, &b));
                        }
                    }
                }
            }
        }
    }

    async fn batch_ack(&self, conn: &ConnHandle, h: Header, frame: &[u8], body: &[u8], name_of: impl Fn(SocketAddr) -> Option<String>) {
        let parsed = match parse_batch_ack(body) {
            Ok(p) => p,
            Err(e) => {
                debug!(pod = %conn.pod, error = %e, "BATCH_ACK body not understood; relayed as sent");
                self.count("ack", "unknown", 1);
                conn.send_to_broker(frame.to_vec());
                return;
            }
        };
        // Split by the broker that served each pop; unknown ones stay with this connection's broker.
        let mut by_broker: Vec<(SocketAddr, Vec<&BatchItem>)> = Vec::new();
        let (mut direct, mut unknown) = (0u64, 0u64);
        for item in &parsed.items {
            let addr = match self.route(conn, &item.key) {
                Route::Elsewhere(a) => a,
                Route::Direct => {
                    direct += u64::from(item.messages.max(1));
                    conn.dst.0
                }
                Route::Unknown => {
                    unknown += u64::from(item.messages.max(1));
                    conn.dst.0
                }
            };
            match by_broker.iter_mut().find(|(a, _)| *a == addr) {
                Some((_, v)) => v.push(item),
                None => by_broker.push((addr, vec![item])),
            }
        }
        self.count("ack", "direct", direct);
        self.count("ack", "unknown", unknown);
        if by_broker.iter().all(|(a, _)| *a == conn.dst.0) {
            // Nothing to reroute: on its way as the client sent it, on its own connection.
            conn.send_to_broker(frame.to_vec());
            return;
        }
        let mut answer: Option<(Header, Vec<u8>)> = None;
        for (addr, items) in &by_broker {
            let part = parsed.encode_part(items, name_of(*addr).as_deref());
            let n: u64 = items.iter().map(|i| u64::from(i.messages.max(1))).sum();
            let res = self.resend(conn, *addr, &h, &part).await;
            let elsewhere = *addr != conn.dst.0;
            match res {
                Ok(resp) => {
                    if elsewhere {
                        self.count("ack", "rerouted", n);
                        info!(pod = %conn.pod, orig_dst = %conn.dst, broker = %addr, acks = items.len(), "batch acknowledgement sent to the broker that served the pop");
                    }
                    // The client hears success only if every part succeeded.
                    if answer.as_ref().is_none_or(|(a, _)| a.code == code::SUCCESS) {
                        answer = Some(resp);
                    }
                }
                Err(e) => {
                    if elsewhere {
                        self.count("ack", "reroute_failed", n);
                    }
                    warn!(pod = %conn.pod, broker = %addr, error = %e, "could not deliver part of a batch acknowledgement; those messages may be delivered again");
                    answer = Some(requests::system_busy(h.opaque, &format!("rmq-agent: {e}")));
                }
            }
        }
        if let Some(resp) = answer {
            reply(conn, h.opaque, resp, h.is_oneway());
        }
    }

    async fn resend(&self, conn: &ConnHandle, addr: SocketAddr, h: &Header, body: &[u8]) -> Result<(Header, Vec<u8>), crate::broker_client::BrokerError> {
        let mut fh = h.clone();
        fh.opaque = self.brokers.opaque();
        // Oneway or not, the agent wants the answer: it decides what the client hears.
        fh.flag &= !crate::codec::header::FLAG_ONEWAY;
        debug!(pod = %conn.pod, broker = %addr, code = h.code, "resending an acknowledgement");
        self.brokers.request(addr, fh, body, ACK_TIMEOUT).await
    }
}

fn reply(conn: &ConnHandle, opaque: i32, (mut rh, body): (Header, Vec<u8>), oneway: bool) {
    if oneway {
        return;
    }
    rh.opaque = opaque;
    conn.send_to_client(encode_frame(&rh, &body));
}

fn kind(code: i32) -> &'static str {
    if code == code::CHANGE_MESSAGE_INVISIBLETIME {
        "change_invisible"
    } else {
        "ack"
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{OrigDst, PodAddr};
    use crate::socket::{CaptureMode, KernelSockets};

    fn native() -> (NativePop, Arc<Metrics>) {
        let sockets = Arc::new(KernelSockets { mode: CaptureMode::Tproxy, mark: 0, keepalive: Duration::from_secs(30) });
        let metrics = Arc::new(Metrics::new());
        (NativePop::new(Arc::new(BrokerClients::new(sockets, Limits::default(), Duration::from_secs(1))), metrics.clone(), Limits::default()), metrics)
    }

    fn conn(id: u64, dst: &str) -> ConnHandle {
        ConnHandle::for_test(id, PodAddr::new("10.200.1.2:5000".parse().unwrap()), OrigDst::new(dst.parse().unwrap())).0
    }

    fn header(code: i32, opaque: i32, flag: i32, ext: &[(&str, &str)]) -> Header {
        let mut h = Header::response(code, opaque, None);
        h.flag = flag;
        h.ext_fields = ext.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        h
    }

    fn acks(m: &Metrics, kind: &'static str, result: &'static str) -> u64 {
        m.pop_native_acks.get_or_create(&crate::metrics::KindResultLabels { kind, result }).get()
    }

    #[test]
    fn acknowledgements_follow_the_broker_that_served_the_pop() {
        let (n, m) = native();
        let (a, b) = (conn(1, "10.0.0.1:10911"), conn(2, "10.0.0.2:10911"));
        // A POP relayed to broker a; its answer records the route before the client sees it.
        let pop = header(code::POP_MESSAGE, 7, 0, &[("consumerGroup", "g"), ("topic", "T")]);
        assert!(matches!(n.client_request(&a, &pop), Some(Verdict::Forward)));
        assert!(NativePop::watches(code::POP_MESSAGE));
        n.response_header(&a, &header(0, 7, 1, &[("popTime", "1000"), ("invisibleTime", "60000"), ("reviveQid", "1"), ("startOffsetInfo", "0 1 7")]));
        assert_eq!(n.routes(), 1);

        let ack = |extra: &str| header(code::ACK_MESSAGE, 9, 0, &[("consumerGroup", "g"), ("topic", "T"), ("queueId", "1"), ("extraInfo", extra), ("offset", "8")]);
        // On its own broker's connection: relayed. On the other broker's: taken for rerouting.
        assert!(matches!(n.client_request(&a, &ack("7 1000 60000 1 0 bk 1 8")), Some(Verdict::Forward)));
        assert!(matches!(n.client_request(&b, &ack("7 1000 60000 1 0 bk 1 8")), Some(Verdict::Take)));
        // A pop nobody recorded, or a handle that does not parse: relayed as sent.
        assert!(matches!(n.client_request(&b, &ack("7 1001 60000 1 0 bk 1 8")), Some(Verdict::Forward)));
        assert!(matches!(n.client_request(&b, &ack("junk")), Some(Verdict::Forward)));
        assert_eq!((acks(&m, "ack", "direct"), acks(&m, "ack", "unknown")), (1, 2));
        // BATCH_ACK routes are in the body: always read whole. Other codes are not ours.
        assert!(matches!(n.client_request(&a, &header(code::BATCH_ACK_MESSAGE, 3, 0, &[])), Some(Verdict::Take)));
        assert!(n.client_request(&a, &header(code::PULL_MESSAGE, 3, 0, &[])).is_none());

        // CHANGE_INVISIBLETIME on broker a: the new handle (ck = its offset, the answer's popTime)
        // is served by a too.
        let cit = header(code::CHANGE_MESSAGE_INVISIBLETIME, 11, 0, &[("consumerGroup", "g"), ("topic", "T"), ("queueId", "1"), ("extraInfo", "7 1000 60000 1 0 bk 1 8"), ("offset", "8"), ("invisibleTime", "5000")]);
        assert!(matches!(n.client_request(&a, &cit), Some(Verdict::Forward)));
        n.response_header(&a, &header(0, 11, 1, &[("popTime", "2000"), ("invisibleTime", "5000"), ("reviveQid", "1")]));
        assert!(matches!(n.client_request(&b, &ack("8 2000 5000 1 0 bk 1 8")), Some(Verdict::Take)));
        assert_eq!(acks(&m, "change_invisible", "direct"), 1);

        // A failed POP records nothing; a closed connection forgets its unanswered requests.
        assert!(matches!(n.client_request(&a, &header(code::POP_MESSAGE, 12, 0, &[("consumerGroup", "g"), ("topic", "T")])), Some(Verdict::Forward)));
        n.response_header(&a, &header(210, 12, 1, &[]));
        assert!(matches!(n.client_request(&a, &header(code::POP_MESSAGE, 13, 0, &[("consumerGroup", "g"), ("topic", "T")])), Some(Verdict::Forward)));
        n.closed(&a);
        n.response_header(&a, &header(0, 13, 1, &[("popTime", "3000"), ("invisibleTime", "60000"), ("startOffsetInfo", "0 0 1")]));
        assert_eq!(n.routes(), 2);
    }
}
